"""The data path's reactor (meshguard.adapters.hot_reactor): short dispatch, same semantics."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import error
from twisted.internet.base import ReactorBase
from twisted.internet.interfaces import IReadDescriptor
from twisted.python import context
from twisted.python.failure import Failure
from twisted.python.log import ILogContext
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from meshguard.adapters import hot_reactor
from meshguard.adapters.hot_reactor import HotReactor, IHotReaders, add_reader
from meshguard.adapters.tun import TunDevice
from meshguard.adapters.udp import UDPTransport

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@implementer(IReadDescriptor)
class SocketReader:
    """One end of a socketpair as a read descriptor that records how it was dispatched."""

    def __init__(self, sock: socket.socket, name: str, fail: BaseException | None = None) -> None:
        self.sock = sock
        self.name = name
        self.fail = fail
        self.returns: Any = None
        #: The log system in force during each doRead (Twisted's dispatch sets it to our
        #: logPrefix; the hot path does not push a context).
        self.systems: list[str] = []
        self.data: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> Any:
        self.systems.append(context.get(ILogContext)["system"])
        self.data.append(self.sock.recv(100))
        if self.fail is not None:
            raise self.fail
        return self.returns

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class HotReactorTests(SynchronousTestCase):
    """A fresh (not installed) ``HotReactor`` driven one iteration at a time, as ``mainLoop``
    does: timers (``runUntilCurrent``), then one ``doIteration``."""

    def setUp(self) -> None:
        self.reactor = HotReactor()
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.close)

    def close(self) -> None:
        self.reactor.removeAll()
        waker = self.reactor.waker
        os.close(waker.i)
        os.close(waker.o)
        self.reactor._poller.close()
        for sock in self.sockets:
            sock.close()

    def readers(self) -> list[Any]:
        """The registered readers but the reactor's own waker."""
        return [r for r in self.reactor.getReaders() if r is not self.reactor.waker]

    def pair(self, name: str, fail: BaseException | None = None) -> tuple[SocketReader, Any]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        self.sockets += [ours, theirs]
        return SocketReader(ours, name, fail), theirs

    def turn(self) -> None:
        self.reactor.runUntilCurrent()
        self.reactor.doIteration(0)

    def test_hot_reader_gets_do_read_without_the_log_context(self) -> None:
        """A hot reader's read event calls its ``doRead`` straight: no ``callWithLogger``
        (the log system stays the caller's), while a plain reader in the same poll goes
        Twisted's way (its ``logPrefix`` is the log system)."""
        hot, hot_peer = self.pair("hot")
        plain, plain_peer = self.pair("plain")
        self.reactor.addHotReader(hot)
        self.reactor.addReader(plain)
        self.assertTrue(self.reactor.isHot(hot))
        self.assertFalse(self.reactor.isHot(plain))
        hot_peer.send(b"a")
        plain_peer.send(b"b")
        self.turn()
        self.assertEqual(hot.data, [b"a"])
        self.assertEqual(plain.data, [b"b"])
        self.assertNotEqual(hot.systems, ["hot"])
        self.assertEqual(plain.systems, ["plain"])

    def test_a_raising_hot_reader_is_disconnected_and_the_loop_goes_on(self) -> None:
        """An exception from a hot ``doRead`` is logged under the descriptor's name, the
        descriptor is removed and gets ``connectionLost`` with the failure (as Twisted does),
        and other descriptors and timers keep running."""
        bad, bad_peer = self.pair("bad", fail=ValueError("bug"))
        good, good_peer = self.pair("good")
        self.reactor.addHotReader(bad)
        self.reactor.addHotReader(good)
        fired: list[int] = []
        self.reactor.callLater(0, fired.append, 1)
        bad_peer.send(b"x")
        good_peer.send(b"y")
        self.turn()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual([f.type for f in bad.lost], [ValueError])
        self.assertNotIn(bad, self.readers())
        self.assertFalse(self.reactor.isHot(bad))
        self.assertEqual(good.data, [b"y"])
        self.assertEqual(fired, [1])
        good_peer.send(b"z")
        bad_peer.send(b"ignored")
        self.reactor.callLater(0, fired.append, 2)
        self.turn()
        self.assertEqual(good.data, [b"y", b"z"])
        self.assertEqual(bad.data, [b"x"])
        self.assertEqual(fired, [1, 2])

    def test_a_reason_returned_by_a_hot_reader_disconnects_it(self) -> None:
        """``doRead`` returning a reason (``ConnectionDone``) ends the descriptor as Twisted
        does: removed, ``connectionLost`` with that reason, nothing logged."""
        done, peer = self.pair("done")
        done.returns = error.ConnectionDone()
        self.reactor.addHotReader(done)
        peer.send(b"x")
        self.turn()
        self.assertEqual([f.type for f in done.lost], [error.ConnectionDone])
        self.assertEqual(self.readers(), [])

    def test_hang_up_goes_the_standard_way(self) -> None:
        """An event other than a plain read (the peer closed: EPOLLHUP) takes Twisted's path,
        which reads what is left and reports the close."""
        stream, stream_peer = socket.socketpair()
        stream.setblocking(False)
        self.sockets += [stream, stream_peer]
        hot = SocketReader(stream, "hot")
        self.reactor.addHotReader(hot)
        stream_peer.close()
        self.turn()
        self.assertEqual(hot.systems, ["hot"])  # through callWithLogger
        self.assertEqual(hot.data, [b""])

    def test_remove_reader_ends_hot_dispatch(self) -> None:
        """``removeReader`` undoes ``addHotReader``; a plain ``addReader`` of the same
        descriptor afterwards is dispatched the standard way."""
        hot, peer = self.pair("hot")
        self.reactor.addHotReader(hot)
        self.reactor.removeReader(hot)
        self.assertFalse(self.reactor.isHot(hot))
        self.assertEqual(self.readers(), [])
        self.reactor.addReader(hot)
        peer.send(b"x")
        self.turn()
        self.assertEqual(hot.systems, ["hot"])

    def test_timers_run_between_polls(self) -> None:
        """Delayed calls run as on the standard reactor, and the poll waits no longer than
        the next one is due."""
        fired: list[str] = []
        self.reactor.callLater(0, fired.append, "now")
        self.reactor.callLater(3600, fired.append, "later")
        self.turn()
        self.assertEqual(fired, ["now"])
        timeout = self.reactor.timeout()
        assert timeout is not None
        self.assertTrue(3500 < timeout <= 3600)
        for call in self.reactor.getDelayedCalls():
            call.cancel()

    def test_adapters_register_hot(self) -> None:
        """The TUN device and the UDP sockets register as hot with a reactor that offers it,
        and as plain readers with any other."""
        tun = TunDevice("mgh0", lambda packet, now: None, self.reactor)
        udp = UDPTransport(lambda data, source, now: None, self.reactor, 0)
        udp.bind()
        self.addCleanup(udp.close)
        tun._fd, peer = os.pipe()  # any readable descriptor will do for registration
        self.addCleanup(os.close, peer)
        self.addCleanup(tun.close)
        tun.start_reading()
        udp.start_reading()
        readers = self.readers()
        self.assertIn(tun, readers)
        self.assertTrue(self.reactor.isHot(tun))
        for reader in udp._readers:
            self.assertTrue(self.reactor.isHot(reader))
        tun.stop_reading()
        udp.stop_reading()
        self.assertEqual(self.readers(), [])

        class Plain:
            def __init__(self) -> None:
                self.readers: list[Any] = []

            def addReader(self, reader: Any) -> None:
                self.readers.append(reader)

        plain = Plain()
        self.assertFalse(IHotReaders.providedBy(plain))
        add_reader(plain, tun)
        self.assertEqual(plain.readers, [tun])

    def test_install_only_when_no_reactor_is_imported(self) -> None:
        """Once a reactor is imported (trial's, or one ``--reactor`` chose) ``install_if_free``
        keeps it."""
        from twisted.internet import reactor

        self.assertFalse(hot_reactor.install_if_free())
        self.assertIs(sys.modules["twisted.internet.reactor"], reactor)


class _Script:
    """Drives a real reactor's ``run()`` one poll at a time on a fake clock.

    Each poll is recorded with the wait the loop asked for; then the next step runs (it may
    add, cancel or reset calls, call from a thread, stop) and returns how long the poll
    "waited" (a step may return early, as an I/O event would), the clock moves on by that
    much, and a real ``doPoll(0)`` handles what the descriptors (the waker) have. After the
    last step the reactor is stopped.
    """

    def __init__(self, reactor: HotReactor, steps: list[Callable[[float | None], float]]) -> None:
        self.reactor = reactor
        self.steps = list(steps)
        self.now = 1000.0
        self.events: list[tuple[Any, ...]] = []
        self.timer_passes = 0
        reactor.seconds = self.seconds  # type: ignore[method-assign]
        reactor.doIteration = self.poll  # type: ignore[method-assign]
        twisted_pass = reactor.runUntilCurrent

        def counted() -> None:
            self.timer_passes += 1
            twisted_pass()

        reactor.runUntilCurrent = counted  # type: ignore[method-assign]

    def seconds(self) -> float:
        return self.now

    def fire(self, name: str) -> Callable[[], None]:
        return lambda: self.events.append(("fired", name, self.now))

    def poll(self, timeout: float | None) -> None:
        self.events.append(("poll", timeout))
        if self.steps:
            self.now += self.steps.pop(0)(timeout)
        elif not self.reactor._stopped:
            self.reactor.stop()
        HotReactor.doPoll(self.reactor, 0)


def _waited(timeout: float | None) -> float:
    """A poll that sleeps its whole timeout (nothing to read)."""
    assert timeout is not None
    return timeout


class MainLoopTests(SynchronousTestCase):
    """``HotReactor.mainLoop`` skips Twisted's timer pass only when nothing can be due, and
    otherwise behaves as ``ReactorBase.mainLoop``: a real reactor's ``run()`` driven one poll
    at a time."""

    def make(self) -> HotReactor:
        reactor = HotReactor()

        def close() -> None:
            reactor.removeAll()
            os.close(reactor.waker.i)
            os.close(reactor.waker.o)
            reactor._poller.close()

        self.addCleanup(close)
        return reactor

    def timers_script(self, reactor: HotReactor, twisted_loop: bool) -> _Script:
        """Timed calls added, cancelled, reset later and sooner, a poll woken early, calls
        from a thread (here: from a step), an exception in the loop, then a stop; run through
        this class's loop or Twisted's."""
        script: _Script

        def setup() -> None:
            reactor.callLater(0.5, script.fire("a"))
            reactor.callLater(1.0, script.fire("b"))
            reactor.callLater(0.7, script.fire("cancelled")).cancel()
            reactor.callLater(2.0, script.fire("delayed, then sooner")).reset(3.0)
            reactor.callLater(9.0, script.fire("reset sooner")).reset(1.5)

        def woken_early(timeout: float | None) -> float:
            return 0.2

        def from_thread(timeout: float | None) -> float:
            reactor.callFromThread(script.fire("from thread"))
            return 0.1

        def late_call(timeout: float | None) -> float:
            reactor.callLater(0.05, script.fire("late"))
            return 0.0

        def move_sooner(timeout: float | None) -> float:
            # The delayed call, in the heap at 2.0 (to fire at 3.0): moved up in the heap.
            [later] = [c for c in reactor.getDelayedCalls() if c.getTime() > script.now + 1]
            later.reset(0.25)
            return 0.1

        steps = [woken_early, _waited, from_thread, _waited, late_call, _waited, move_sooner]
        steps += [_waited, _waited]
        script = _Script(reactor, steps)
        reactor.callWhenRunning(setup)
        if twisted_loop:
            reactor.mainLoop = partial(ReactorBase.mainLoop, reactor)  # type: ignore[method-assign]
        reactor.run(installSignalHandlers=False)
        return script

    def test_timers_fire_in_order_and_on_time(self) -> None:
        """Every timed call fires at its time and in order (cancelled ones never, reset ones
        at their new time), calls from a thread run at the next turn, the loop waits exactly
        until the next call is due (after an early wake-up too) and ends on ``stop``."""
        script = self.timers_script(self.make(), twisted_loop=False)
        fired = [(e[1], round(e[2] - 1000, 6)) for e in script.events if e[0] == "fired"]
        self.assertEqual(
            fired,
            [
                ("a", 0.5),
                ("from thread", 0.6),
                ("b", 1.0),
                ("late", 1.05),
                ("delayed, then sooner", 1.3),
                ("reset sooner", 1.5),
            ],
        )
        waits = [e[1] for e in script.events if e[0] == "poll"]
        self.assertAlmostEqual(waits[0], 0.5)
        self.assertAlmostEqual(waits[1], 0.3)  # woken after 0.2 s: the rest of the wait
        self.assertFalse(script.reactor._started)

    def test_same_polls_and_calls_as_twisted_with_fewer_timer_passes(self) -> None:
        """The same script through Twisted's ``mainLoop`` gives the same polls (exactly the
        same waits) and the same calls at the same times; only the timer passes that could
        do nothing are gone."""
        ours = self.timers_script(self.make(), twisted_loop=False)
        theirs = self.timers_script(self.make(), twisted_loop=True)
        self.assertEqual(ours.events, theirs.events)
        self.assertLess(ours.timer_passes, theirs.timer_passes)
        self.assertEqual(theirs.timer_passes, len([e for e in theirs.events if e[0] == "poll"]))

    def test_no_timer_pass_when_nothing_is_due(self) -> None:
        """Polls with a timed call pending later and nothing added run no timer pass and
        wait for the rest of the time; with no timed call at all the wait is unbounded."""
        reactor = self.make()
        script: _Script

        def woken(timeout: float | None) -> float:
            return 1.0

        def setup() -> None:
            reactor.callLater(10.0, script.fire("t"))

        script = _Script(reactor, [woken, woken, woken, _waited])
        reactor.callWhenRunning(setup)
        reactor.run(installSignalHandlers=False)
        polls = [e[1] for e in script.events if e[0] == "poll"]
        self.assertEqual([p and round(p, 6) for p in polls], [10.0, 9.0, 8.0, 7.0, None, False])
        # The first poll (the new call), the one where it is due, and the stop's.
        self.assertEqual(script.timer_passes, 3)

    def test_an_exception_in_the_loop_is_logged_and_the_loop_goes_on(self) -> None:
        """As in Twisted's loop: logged ("Unexpected error in main loop"), then the next poll."""
        reactor = self.make()
        script: _Script

        def raises(timeout: float | None) -> float:
            raise ValueError("bug in a poll")

        script = _Script(reactor, [raises, _waited])
        reactor.callWhenRunning(lambda: reactor.callLater(1.0, script.fire("after")))
        reactor.run(installSignalHandlers=False)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIn(("fired", "after", 1001.0), script.events)

    def test_call_from_another_thread_wakes_the_poll(self) -> None:
        """On the real clock and a real ``epoll_wait``: a call from another thread wakes a
        loop that would otherwise wait 30 s for its only timer, and runs at once."""
        reactor = self.make()
        ran: list[bool] = []

        def from_thread() -> None:
            ran.append(threading.current_thread() is threading.main_thread())
            reactor.stop()

        guard = reactor.callLater(30.0, reactor.stop)
        thread = threading.Thread(target=reactor.callFromThread, args=(from_thread,))
        reactor.callWhenRunning(thread.start)
        reactor.run(installSignalHandlers=False)
        thread.join(5)
        self.assertEqual(ran, [True])
        self.assertTrue(guard.active())
        guard.cancel()


_TWISTD = """
import sys
from twisted.scripts._twistd_unix import ServerOptions, UnixApplicationRunner

config = ServerOptions()
config.parseOptions(sys.argv[1:])
runner = UnixApplicationRunner(config)
runner.preApplication()
runner.createOrGetApplication()  # what twistd does next: the plugin's makeService
from twisted.internet import reactor
print(type(reactor).__module__ + "." + type(reactor).__qualname__)
"""


class TwistdInstallTests(SynchronousTestCase):
    """``twistd meshguard`` runs on the hot reactor; ``--reactor`` still chooses."""

    def reactor_of(self, *argv: str) -> str:
        """The reactor class twistd ends up with for ``argv``, run in a fresh interpreter
        through twistd's own option parsing and application runner (up to the point where
        it would start the service and the reactor)."""
        key = base64.b64encode(bytes(range(32))).decode()
        with tempfile.TemporaryDirectory() as directory:
            config = os.path.join(directory, "mgt0.conf")
            with open(config, "w") as f:
                f.write(f"[Interface]\nPrivateKey = {key}\n")
            os.chmod(config, 0o600)
            env = dict(os.environ, PYTHONPATH=_REPO)
            done = subprocess.run(
                [sys.executable, "-c", _TWISTD, *argv, "meshguard", "--config", config],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=directory,
                env=env,
            )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip().splitlines()[-1]

    def test_twistd_meshguard_installs_the_hot_reactor(self) -> None:
        self.assertEqual(
            self.reactor_of("-n", "--pidfile="), "meshguard.adapters.hot_reactor.HotReactor"
        )

    def test_reactor_option_is_kept(self) -> None:
        self.assertEqual(
            self.reactor_of("-n", "--pidfile=", "--reactor=poll"),
            "twisted.internet.pollreactor.PollReactor",
        )
