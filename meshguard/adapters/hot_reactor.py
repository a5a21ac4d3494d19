"""An epoll reactor that dispatches the data path's descriptors without Twisted's wrapping.

Twisted's ``EPollReactor.doPoll`` runs every ready descriptor through ``log.callWithLogger``
(a log context pushed and popped, a ``try`` around it) and ``_doReadOrWrite`` (a ``fileno()``
check, event decoding) before ``doRead``. On a warm loop that is 10-15 us per event; after an
idle gap, with cold caches, it measured 47-70 us per hop, four hops per round trip through the
tunnel (docs/datapath.md, "Latency"). The TUN device and the WireGuard UDP sockets log their own
errors and never need the context, so :class:`HotReactor` hands a plain read event of a
descriptor registered with :meth:`HotReactor.addHotReader` straight to ``doRead``. Everything
else (other descriptors, hang-ups and errors, writes) goes Twisted's way, and a hot ``doRead``
that raises or returns a reason is disconnected as Twisted would (logged with the descriptor's
``logPrefix()``, then ``connectionLost``), without stopping the loop.

:func:`install_if_free` puts it in place for ``twistd meshguard``: twistd calls the plugin's
``makeService`` before anything imports the global reactor (``ApplicationRunner.run`` creates
the application before its logger imports the reactor), unless ``--reactor`` installed one while
parsing the options. Under trial, or with ``--reactor``, the reactor already chosen is kept and
the adapters register as ordinary readers (see :func:`add_reader`).

Its main loop also skips Twisted's timer pass (``runUntilCurrent`` and ``timeout``) on an
iteration where nothing can be due: no new or thread calls, no stop pending, and the earliest
timed call later than now. An idle ping's four hops each end in such an iteration.
"""

from __future__ import annotations

import sys
from select import EPOLLIN
from typing import Any, Protocol

from twisted.internet import base as _base
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

__all__ = ["HotReactor", "IHotReaders", "Readers", "add_reader", "install_if_free"]

log = Logger()

#: ``ReactorBase.timeout``'s ceiling: the longest wait ``epoll_wait`` takes (2**31 ms).
_LONGEST_WAIT = 2147483


class IHotReaders(Interface):
    """A reactor that can dispatch some read descriptors on a shorter path."""

    def addHotReader(reader: IReadDescriptor) -> None:  # noqa: N805 (a zope method)
        """Watch ``reader`` for reading (as ``addReader``) and hand its read events straight to
        ``doRead``. ``removeReader`` undoes both."""

    def isHot(reader: IReadDescriptor) -> bool:  # noqa: N805
        """Whether ``reader`` is registered as hot now."""


@implementer(IHotReaders)
class HotReactor(EPollReactor):  # type: ignore[misc]
    """``EPollReactor`` with a short dispatch for the registered hot read descriptors."""

    def __init__(self) -> None:
        #: fd -> the hot reader registered on it; checked against ``_selectables`` at dispatch,
        #: so a reused descriptor number never reaches a stale reader.
        self._hot: dict[int, Any] = {}
        super().__init__()  # type: ignore[no-untyped-call]

    def addHotReader(self, reader: IReadDescriptor) -> None:
        self.addReader(reader)  # type: ignore[no-untyped-call]
        self._hot[reader.fileno()] = reader

    def isHot(self, reader: IReadDescriptor) -> bool:
        return any(hot is reader for hot in self._hot.values())

    def removeReader(self, reader: IReadDescriptor) -> None:
        for fd, hot in list(self._hot.items()):
            if hot is reader:
                del self._hot[fd]
        super().removeReader(reader)  # type: ignore[no-untyped-call]

    def removeAll(self) -> list[Any]:
        self._hot.clear()
        removed: list[Any] = super().removeAll()  # type: ignore[no-untyped-call]
        return removed

    def doPoll(self, timeout: float | None) -> None:
        """``EPollReactor.doPoll``, except that a hot reader's plain read event goes straight
        to its ``doRead``."""
        if timeout is None:
            timeout = -1
        selectables = self._selectables
        try:
            events = self._poller.poll(timeout, len(selectables))
        except InterruptedError:
            return
        hot = self._hot
        for fd, event in events:
            selectable: Any = selectables.get(fd)
            if selectable is None:  # removed by an earlier event's handler
                continue
            if event == EPOLLIN and hot.get(fd) is selectable:
                try:
                    why = selectable.doRead()  # type: ignore[union-attr]
                except BaseException:
                    why = sys.exc_info()[1]
                    self._hot_failed(selectable)
                if why:
                    self._disconnectSelectable(selectable, why, True)  # type: ignore[no-untyped-call]
            else:
                self._dispatch(selectable, fd, event)

    doIteration = doPoll

    def mainLoop(self) -> None:
        """``ReactorBase.mainLoop`` with the timer pass skipped when nothing can be due.

        Twisted runs ``runUntilCurrent`` (thread calls, new timed calls into the heap, due
        calls, the stop) and ``timeout`` (the heap again, a clock read) before every poll. When
        no call was added (``callLater`` or ``callFromThread``), no stop is pending and the
        earliest timed call is later than now, both would do nothing but compute the wait,
        which this loop computes itself from one clock read. Anything else takes Twisted's
        two calls, unchanged. The exception handler sits around the inner loop instead of
        each iteration; an exception is logged by Twisted's own handler and the loop goes on,
        as Twisted's does.
        """
        while self._started:
            with _base._topHandler:
                self._turns()
        _base._log.info("Main loop terminated.")

    def _turns(self) -> None:
        """Iterate until the reactor stops (or an exception leaves for ``mainLoop``)."""
        while self._started:
            pending = self._pendingTimedCalls
            if self._newTimedCalls or self.threadCallQueue or self._justStopped:
                self.runUntilCurrent()
                timeout = self.timeout()
            elif pending:
                delay = pending[0].time - self.seconds()
                if delay > 0:
                    timeout = delay if delay < _LONGEST_WAIT else _LONGEST_WAIT
                else:
                    self.runUntilCurrent()
                    timeout = self.timeout()
            else:
                timeout = None
            self.doIteration(self.running and timeout)

    def _dispatch(self, selectable: Any, fd: int, event: int) -> None:
        """Twisted's own way: in the descriptor's log context, through ``_doReadOrWrite``."""
        legacy_log.callWithLogger(  # type: ignore[no-untyped-call]
            selectable, self._doReadOrWrite, selectable, fd, event
        )

    @staticmethod
    def _hot_failed(selectable: Any) -> None:
        """Log a hot descriptor's exception the way ``callWithLogger`` would: with its name."""
        try:
            name = selectable.logPrefix()
        except Exception:
            name = type(selectable).__name__
        log.failure(
            "{descriptor}: doRead raised; disconnecting it",
            Failure(),  # type: ignore[no-untyped-call]
            descriptor=name,
            log_system=name,
        )


class Readers(Protocol):
    """The part of ``IReactorFDSet`` :func:`add_reader` needs (``tun.FDReactor`` fits)."""

    def addReader(self, reader: Any) -> None: ...


def add_reader(reactor: Readers, reader: IReadDescriptor) -> None:
    """Register a data path descriptor: hot when the reactor offers it, plain otherwise.

    ``removeReader`` undoes either.
    """
    if IHotReaders.providedBy(reactor):
        reactor.addHotReader(reader)  # type: ignore[attr-defined]
    else:
        reactor.addReader(reader)


def install_if_free() -> bool:
    """Install :class:`HotReactor` as the global reactor unless one is imported already.

    True when it was installed. Called by ``makeService``: under ``twistd`` no reactor is
    imported yet (unless ``--reactor`` chose one); under trial or another program's own reactor
    the choice already made stands.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(HotReactor())  # type: ignore[no-untyped-call]
    return True
