"""UPnP-IGD port mapping through the maintained miniupnpc binding, called in a thread.

SSDP discovery and the SOAP calls of miniupnpc block (discovery waits ``DISCOVER_DELAY_MS`` per
device type), so every call runs in a thread; one lock keeps the binding's object used by one
thread at a time. We never write SSDP or SOAP ourselves.

The threads are daemon threads of their own rather than the reactor's pool (``deferToThread``):
the reactor joins its pool at shutdown, so a node stopped during an 8-second discovery would
take 8 seconds to exit. A daemon thread's answer after shutdown is simply never delivered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from meshguard.adapters.portmap.methods import Grant, MappingRefusedError

#: How long discovery listens for SSDP answers per device type searched (milliseconds);
#: miniupnpc searches several types in turn, so finding nothing takes about 8 s.
DISCOVER_DELAY_MS = 2000
DESCRIPTION = "meshguard"


def reactor_threads(reactor: Any) -> Callable[[Callable[[], Any]], Deferred[Any]]:
    """Runs a blocking call in a daemon thread; its result comes back on the reactor thread."""

    def run(call: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()

        def work() -> None:
            try:
                result = call()
            except Exception as e:
                reactor.callFromThread(done.errback, e)
            else:
                reactor.callFromThread(done.callback, result)

        threading.Thread(target=work, name="meshguard-upnp", daemon=True).start()
        return done

    return run


class IgdUnavailableError(Exception):
    """No UPnP Internet Gateway Device answered discovery."""


def _upnp_error(error: Exception) -> str:
    return str(error).strip() or type(error).__name__


class UpnpMethod:
    """UPnP-IGD AddPortMapping / DeletePortMapping for UDP."""

    name = "UPnP"

    def __init__(
        self,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
        *,
        factory: Callable[[], Any] | None = None,
        discover_delay_ms: int = DISCOVER_DELAY_MS,
    ) -> None:
        self.run_in_thread = run_in_thread
        self.factory = factory
        self.discover_delay_ms = discover_delay_ms
        self._igd: Any = None
        self._lock = threading.Lock()

    def _device(self) -> Any:
        """The selected IGD, discovering it on first use (in the worker thread)."""
        if self._igd is not None:
            return self._igd
        if self.factory is not None:
            igd = self.factory()
        else:
            import miniupnpc

            igd = miniupnpc.UPnP()
        igd.discoverdelay = self.discover_delay_ms
        try:
            found = igd.discover()
        except Exception:
            found = 0  # the binding raises (with errno's text) when nothing answered
        if not found:
            raise IgdUnavailableError("no UPnP gateway answered")
        try:
            igd.selectigd()
        except Exception as e:
            raise IgdUnavailableError(f"no usable UPnP gateway ({_upnp_error(e)})") from None
        self._igd = igd
        return igd

    def _map_blocking(self, internal_port: int, external_port: int, lifetime: int) -> Grant:
        with self._lock:
            igd = self._device()
            try:
                address = str(igd.externalipaddress())
                ok = igd.addportmapping(
                    external_port, "UDP", igd.lanaddr, internal_port, DESCRIPTION, "", lifetime
                )
            except Exception as e:
                text = _upnp_error(e)
                if "725" not in text and "OnlyPermanent" not in text:
                    self._igd = None  # rediscover next time: the gateway may have changed
                    raise MappingRefusedError(f"refused: {text}") from None
                # IGDv1 gateways that support only permanent leases: map until we remove it.
                lifetime = 0
                ok = igd.addportmapping(
                    external_port, "UDP", igd.lanaddr, internal_port, DESCRIPTION, "", 0
                )
            if not ok:
                raise MappingRefusedError("refused")
            return Grant(address, external_port, lifetime)

    def _unmap_blocking(self, external_port: int) -> None:
        with self._lock:
            if self._igd is not None:
                self._igd.deleteportmapping(external_port, "UDP")

    def request(self, internal_port: int, external_port: int, lifetime: int) -> Deferred[Grant]:
        """Map in a thread. A thread cannot be stopped: if the caller cancels (the node stops)
        and the mapping is made anyway, it is removed again instead of left behind."""
        result: Deferred[Grant] = Deferred()
        work: Deferred[Grant] = self.run_in_thread(
            lambda: self._map_blocking(internal_port, external_port, lifetime)
        )

        def finished(outcome: object) -> None:
            if result.called:  # cancelled meanwhile
                if isinstance(outcome, Grant):
                    self.release(internal_port, outcome.external_port).addErrback(lambda f: None)
                return
            if isinstance(outcome, Grant):
                result.callback(outcome)
            elif isinstance(outcome, Failure):
                result.errback(outcome)

        work.addBoth(finished)
        return result

    def release(self, internal_port: int, external_port: int) -> Deferred[None]:
        result: Deferred[None] = self.run_in_thread(lambda: self._unmap_blocking(external_port))
        return result
