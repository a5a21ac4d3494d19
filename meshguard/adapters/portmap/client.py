"""The port-mapping client: one state machine that finds a protocol the gateway offers, keeps
the mapping alive and removes it on stop.

States::

    stopped --start--> seeking(method i) --granted--> mapped --renew at 1/2..5/8 lifetime--> mapped
                          |  failed: try i+1                 |  renewal failed before expiry:
                          v                                  |  retry (backoff) until expiry,
                       waiting ("none offered")              v  then seeking again
                          |  backoff 60 s .. 1 h, or       stop: release, stopped
                          +--a new public address-->seeking(0)

Methods are tried one after another (PCP, then NAT-PMP, then UPnP), not in parallel: PCP and
NAT-PMP share the gateway's port 5351 and a gateway that speaks both (miniupnpd) would create two
mappings for one question, and each protocol's failure is fast when the gateway does not speak it
(PCP's "unsupported version" or a closed port), so order costs little and leaves one mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshguard.adapters.portmap.methods import Grant, Method

log = Logger()

#: Lifetime we ask for (RFC 6886 recommends two hours).
LIFETIME = 7200
#: Waits after "nothing offered", in turn (then the last one), each jittered by +-10 %.
NONE_BACKOFF = (60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Waits between failed renewals while the mapping still lives.
RENEW_RETRY = (5.0, 15.0, 30.0, 60.0, 120.0)
#: A permanent (lifetime 0) UPnP mapping is re-asserted this often, so a router that rebooted
#: and forgot it gets it back.
PERMANENT_REFRESH = 1800.0
#: Never renew more often than this, whatever lifetime a gateway grants.
MIN_RENEW = 2.0
#: Removal on stop waits at most this long for the gateway.
RELEASE_TIMEOUT = 2.0
#: After a gateway's announcement, ask again within this many seconds (a random point, as RFC
#: 6887 section 14.1.3 asks, so a LAN of clients does not answer at once) ...
ANNOUNCE_SPREAD = 5.0
#: ... and react to announcements at most once in this long (anyone on the LAN can forge one).
ANNOUNCE_HOLDOFF = 30.0

STOPPED, SEEKING, MAPPED, WAITING = "stopped", "seeking", "mapped", "none offered"


@dataclass(frozen=True)
class Mapping:
    """A live mapping: where the internet reaches our UDP port."""

    protocol: str
    external_address: str
    external_port: int
    internal_port: int
    lifetime: int
    obtained: float

    @property
    def expires(self) -> float | None:
        return self.obtained + self.lifetime if self.lifetime else None

    @property
    def external(self) -> tuple[str, int]:
        return (self.external_address, self.external_port)


class PortMapper:
    """Keeps one UDP port mapping of ``internal_port()`` on the gateway."""

    def __init__(
        self,
        clock: IReactorTime,
        methods: Sequence[Method],
        internal_port: Callable[[], int],
        on_change: Callable[[Mapping | None], None],
        random: Callable[[], float],
        *,
        lifetime: int = LIFETIME,
    ) -> None:
        self.clock = clock
        self.methods = list(methods)
        self.internal_port = internal_port
        self.on_change = on_change
        self.random = random
        self.lifetime = lifetime
        self.state = STOPPED
        self.mapping: Mapping | None = None
        #: The method in use (seeking: being tried; mapped: the one that granted).
        self.method_index = 0
        #: Why each method failed last time (for status).
        self.failures: dict[str, str] = {}
        self.next_attempt: float | None = None
        self._timer: IDelayedCall | None = None
        self._pending: Deferred[Grant] | None = None
        self._none_count = 0
        self._renew_failures = 0
        self._last_announce: float | None = None
        #: Bumped on every transition that makes in-flight answers stale.
        self._generation = 0

    # ------------------------------------------------------------------ events

    def start(self) -> None:
        if self.state != STOPPED:
            return
        self._seek(0)

    def public_address_changed(self) -> None:
        """Our public address changed (a peer sees us elsewhere): ask again at once, since the
        gateway may have a new address, or may offer mapping where it did not before."""
        if self.state == MAPPED:
            self._cancel_timer()
            self._renew()
        elif self.state == WAITING:
            self._cancel_timer()
            self._none_count = 0
            self._seek(0)

    def gateway_announced(self) -> None:
        """The gateway announced a restart or a new public address: its mappings are gone or
        wrong, so ask again soon (after a random wait of up to ``ANNOUNCE_SPREAD``)."""
        now = self.clock.seconds()
        if self.state not in (MAPPED, WAITING):
            return  # stopped, or an answer is on its way anyway
        if self._last_announce is not None and now - self._last_announce < ANNOUNCE_HOLDOFF:
            return
        self._last_announce = now
        delay = ANNOUNCE_SPREAD * self.random()
        if self.state == MAPPED:
            self._schedule(delay, self._renew)
        else:
            self._none_count = 0
            self._schedule(delay, lambda: self._seek(0))

    def stop(self) -> Deferred[None]:
        """Remove the mapping (waiting at most ``RELEASE_TIMEOUT`` for the gateway)."""
        previous, mapping, index = self.state, self.mapping, self.method_index
        self._cancel_timer()
        self._cancel_pending()
        self.state = STOPPED
        self.next_attempt = None
        self._generation += 1
        if mapping is not None:
            self.mapping = None
            self.on_change(None)
        if previous != MAPPED or mapping is None:
            return succeed(None)
        return self._release(self.methods[index], mapping)

    # ------------------------------------------------------------------ seeking

    def _seek(self, index: int) -> None:
        self.state = SEEKING
        self.method_index = index
        self.next_attempt = None
        if index >= len(self.methods):
            self._nothing_offered()
            return
        method = self.methods[index]
        generation = self._generation = self._generation + 1
        port = self.internal_port()
        d = self._ask(method, port, port)
        d.addCallbacks(
            lambda grant: self._granted(generation, method, port, grant),
            lambda failure: self._seek_failed(generation, index, failure),
        )

    def _ask(self, method: Method, internal: int, external: int) -> Deferred[Grant]:
        try:
            d = method.request(internal, external, self.lifetime)
        except Exception:
            d = fail()
        self._pending = d
        return d

    def _seek_failed(self, generation: int, index: int, failure: Failure) -> None:
        if generation != self._generation or isinstance(failure.value, CancelledError):
            return
        self._pending = None
        name = self.methods[index].name
        self.failures[name] = _reason(failure)
        log.debug("port mapping: {method} failed: {why}", method=name, why=self.failures[name])
        self._seek(index + 1)

    def _nothing_offered(self) -> None:
        self.state = WAITING
        delay = NONE_BACKOFF[min(self._none_count, len(NONE_BACKOFF) - 1)]
        self._none_count += 1
        if self._none_count == 1:
            tried = "; ".join(f"{k}: {v}" for k, v in self.failures.items())
            log.info("port mapping: none offered ({tried})", tried=tried)
        self._schedule(delay * (0.9 + 0.2 * self.random()), lambda: self._seek(0))

    # ------------------------------------------------------------------ mapped

    def _granted(self, generation: int, method: Method, internal: int, grant: Grant) -> None:
        if generation != self._generation:
            # An answer that arrived after stop (or a restart): do not leave it behind.
            if self.state == STOPPED:
                self._release(method, _mapping(method, grant, internal, self.clock.seconds()))
            return
        self._pending = None
        now = self.clock.seconds()
        mapping = _mapping(method, grant, internal, now)
        old = self.mapping
        self.state = MAPPED
        self.mapping = mapping
        self.failures.pop(method.name, None)
        self._none_count = 0
        self._renew_failures = 0
        if old is None or old.external != mapping.external or old.protocol != mapping.protocol:
            log.info(
                "port mapping: {method} {address}:{port} -> UDP port {internal} ({lifetime})",
                method=method.name,
                address=grant.external_address,
                port=grant.external_port,
                internal=internal,
                lifetime=f"{grant.lifetime} s" if grant.lifetime else "permanent",
            )
            self.on_change(mapping)
        if grant.lifetime:
            delay = max(MIN_RENEW, grant.lifetime * (0.5 + 0.125 * self.random()))
        else:
            delay = PERMANENT_REFRESH
        self._schedule(delay, self._renew)

    def _renew(self) -> None:
        mapping = self.mapping
        assert mapping is not None
        method = self.methods[self.method_index]
        generation = self._generation = self._generation + 1
        port = self.internal_port()
        d = self._ask(method, port, mapping.external_port)
        d.addCallbacks(
            lambda grant: self._granted(generation, method, port, grant),
            lambda failure: self._renew_failed(generation, failure),
        )

    def _renew_failed(self, generation: int, failure: Failure) -> None:
        if generation != self._generation or isinstance(failure.value, CancelledError):
            return
        self._pending = None
        mapping = self.mapping
        assert mapping is not None
        self.failures[mapping.protocol] = _reason(failure)
        now = self.clock.seconds()
        delay = RENEW_RETRY[min(self._renew_failures, len(RENEW_RETRY) - 1)]
        self._renew_failures += 1
        expires = mapping.expires
        if expires is None or now + delay < expires:
            self._schedule(delay, self._renew)
            return
        # It will lapse before another try: consider it gone and look again from the top.
        log.info(
            "port mapping: {method} renewal failed ({why}); mapping lost",
            method=mapping.protocol,
            why=self.failures[mapping.protocol],
        )
        self.mapping = None
        self.on_change(None)
        self._seek(0)

    def _release(self, method: Method, mapping: Mapping) -> Deferred[None]:
        try:
            d = method.release(mapping.internal_port, mapping.external_port)
        except Exception:
            d = fail()
        d.addTimeout(RELEASE_TIMEOUT, self.clock)

        def done(result: object) -> None:
            if isinstance(result, Failure):
                log.info(
                    "port mapping: could not remove {method} mapping ({why}); it lapses by itself",
                    method=method.name,
                    why=_reason(result),
                )

        return d.addBoth(done)

    # ------------------------------------------------------------------ plumbing

    def _schedule(self, delay: float, call: Callable[[], None]) -> None:
        self._cancel_timer()
        self.next_attempt = self.clock.seconds() + delay
        self._timer = self.clock.callLater(delay, self._fire, call)

    def _fire(self, call: Callable[[], None]) -> None:
        self._timer = None
        self.next_attempt = None
        call()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The node-level ``port_mapping`` field of ``meshguard status``."""
        status: dict[str, Any] = {"state": self.state}
        mapping = self.mapping
        if mapping is not None:
            status["protocol"] = mapping.protocol
            status["external"] = f"{mapping.external_address}:{mapping.external_port}"
            status["internal_port"] = mapping.internal_port
            if mapping.expires is not None:
                status["expires_at"] = mapping.expires
        elif self.state == SEEKING and self.method_index < len(self.methods):
            status["trying"] = self.methods[self.method_index].name
        if self.failures:
            status["failures"] = dict(self.failures)
        if self.state == WAITING and self.next_attempt is not None:
            status["next_try_at"] = self.next_attempt
        return status


def _mapping(method: Method, grant: Grant, internal: int, now: float) -> Mapping:
    return Mapping(
        method.name, grant.external_address, grant.external_port, internal, grant.lifetime, now
    )


def _reason(failure: Failure) -> str:
    text = str(failure.value).strip()
    return text or type(failure.value).__name__
