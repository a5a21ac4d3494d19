"""The data path's reactor (meshguard.adapters.hot_reactor): short dispatch, same semantics."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import error
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
        tun = TunDevice("mgh0", lambda packet: None, self.reactor)
        udp = UDPTransport(lambda data, source: None, self.reactor, 0)
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
