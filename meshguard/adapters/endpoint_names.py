"""DNS names in ``Endpoint``: kept per peer and resolved again when the peer goes quiet or the
name's TTL runs out.

``wg`` resolves an ``Endpoint`` name once, when the config is applied; a peer on a dynamic
address (a home router's DDNS name) is then lost until someone runs ``reresolve-dns.sh``. A node
keeps the name of every configured peer whose ``Endpoint`` is one, and resolves it again, off the
reactor thread:

- when the peer is *quiet*: a handshake we started has stayed unanswered for
  :data:`QUIET_AFTER` seconds (three ``REKEY_TIMEOUT`` retransmissions; a healthy peer answers
  in milliseconds), or the name never resolved. Data sent without an answer starts such a
  handshake after 15 s, so a moved peer is looked up about 35 s after it went away;
- when the answer's TTL runs out (:data:`DEFAULT_TTL` when the resolver does not say, as
  ``getaddrinfo`` does not).

A name is looked up at most every :data:`MIN_GAP` seconds (backing off while it fails). A new
address replaces the peer's endpoint, unless roaming has since set a newer authenticated one: an
authenticated packet from the peer moves its endpoint, and that proof wins over DNS for as long as
the peer keeps answering. An operator's ``wg set ... endpoint`` drops the name (the operator said
where the peer is); a config reload brings it back.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshguard.core import constants as C
from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer

log = Logger()

#: A handshake unanswered this long makes the peer quiet.
QUIET_AFTER = 3 * C.REKEY_TIMEOUT
#: How often peers with names are checked.
CHECK_INTERVAL = C.REKEY_TIMEOUT
#: A name is resolved at most this often; failures back off from here up to DEFAULT_TTL.
MIN_GAP = 3 * C.REKEY_TIMEOUT
#: Re-resolve after this long when the resolver reports no TTL; reported TTLs are clamped.
DEFAULT_TTL = 300.0
MIN_TTL = 30.0
MAX_TTL = 86400.0


@dataclass(frozen=True)
class Resolution:
    """One answer: the endpoint (``None``: the name did not resolve) and its TTL if known."""

    endpoint: Endpoint | None
    ttl: float | None = None


class Resolver(Protocol):
    """Resolves ``host`` to one numeric endpoint, without blocking the reactor."""

    def resolve(self, host: str, port: int) -> Deferred[Resolution]: ...


class SystemResolver:
    """``getaddrinfo`` in the reactor's thread pool, IPv4 preferred, as ``wg`` resolves names:
    it honours ``/etc/hosts`` and nsswitch, and reports no TTL."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def resolve(self, host: str, port: int) -> Deferred[Resolution]:
        def lookup() -> Resolution:
            return Resolution(resolve_endpoint((host, port)))

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), lookup)


def resolve_endpoint(endpoint: tuple[str, int]) -> Endpoint | None:
    """A numeric endpoint for ``host:port``: names are resolved (IPv4 preferred, as wg does)."""
    host, port = endpoint
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return (host, port)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    infos.sort(key=lambda info: 0 if info[0] == socket.AF_INET else 1)
    for info in infos:
        address = info[4][0]
        if isinstance(address, str):
            return (address, port)
    return None


def is_name(host: str) -> bool:
    """Whether an ``Endpoint`` host is a DNS name rather than a numeric address."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True
    return False


@dataclass
class _Name:
    host: str
    port: int
    #: The endpoint the name last resolved to (what we set, or would have set).
    applied: Endpoint | None
    expires: float
    next_allowed: float
    failures: int = 0
    lookup: Deferred[Resolution] | None = None
    #: Consecutive checks that saw a handshake of ours outstanding, and the peer's last
    #: completed handshake then (a completion in between starts the count again).
    outstanding: int = 0
    seen_handshake: float = 0.0


class EndpointOffer(Protocol):
    """Where a freshly resolved endpoint goes: the path arbiter, which writes it and logs the
    move once with ``reason`` (``PathArbiter.configured``)."""

    def __call__(self, peer: Peer, endpoint: Endpoint | None, reason: str) -> None: ...


def _set_endpoint(peer: Peer, endpoint: Endpoint | None, reason: str) -> None:
    peer.endpoint = endpoint  # no arbiter (a bare device in tests or tools)


class EndpointNames:
    """The DNS-named endpoints of one device's configured peers, kept fresh."""

    def __init__(
        self,
        device: Device,
        reactor: Any,
        *,
        resolver: Resolver | None = None,
        on_change: Callable[[], None] | None = None,
        offer: EndpointOffer = _set_endpoint,
    ) -> None:
        self.device = device
        #: Writes a re-resolved endpoint (the node passes its path arbiter's).
        self.offer = offer
        self.reactor = reactor
        self.resolver: Resolver = resolver if resolver is not None else SystemResolver(reactor)
        #: Called after an endpoint changed (the node moves its timer).
        self.on_change = on_change
        self.names: dict[bytes, _Name] = {}
        self.lookups = 0
        self.changes = 0
        self._loop: LoopingCall | None = None
        self._running = False

    # ------------------------------------------------------------------ configuration

    def configure(self, names: dict[bytes, tuple[str, int]], now: float) -> None:
        """The config's peers with a DNS name in ``Endpoint`` (after the config was applied, so
        each peer's endpoint is what the name resolved to at load time)."""
        for key in list(self.names):
            if names.get(key) != (self.names[key].host, self.names[key].port):
                self.forget(key)
        for key, (host, port) in names.items():
            if key in self.names or not is_name(host):
                continue
            peer = self.device.peers.get(key)
            self.names[key] = _Name(
                host,
                port,
                peer.endpoint if peer is not None else None,
                expires=now + DEFAULT_TTL,
                next_allowed=now + MIN_GAP,
            )
        self._update_loop()

    def forget(self, key: bytes) -> None:
        """The peer is gone or its endpoint was set by hand: its name no longer applies."""
        entry = self.names.pop(key, None)
        if entry is not None and entry.lookup is not None:
            lookup, entry.lookup = entry.lookup, None
            lookup.cancel()
        self._update_loop()

    def name_of(self, key: bytes) -> str | None:
        entry = self.names.get(key)
        return f"{entry.host}:{entry.port}" if entry is not None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._running = True
        self._update_loop()

    def stop(self) -> None:
        self._running = False
        self._update_loop()
        for entry in self.names.values():
            if entry.lookup is not None:
                lookup, entry.lookup = entry.lookup, None
                lookup.cancel()

    def _update_loop(self) -> None:
        wanted = self._running and bool(self.names)
        if wanted and self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(CHECK_INTERVAL, now=False)
        elif not wanted and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def _tick(self) -> None:
        self.check(self.reactor.seconds())

    # ------------------------------------------------------------------ resolving

    def _quiet(self, entry: _Name, peer: Peer) -> bool:
        """No endpoint, or a handshake of ours has gone unanswered for QUIET_AFTER seconds.

        Retransmissions and new initiations replace the handshake state, so what counts is
        that one was outstanding at every check for that long, with none completed between.
        """
        if peer.handshake is None:
            entry.outstanding = 0
        elif peer.last_handshake_time != entry.seen_handshake:
            entry.outstanding = 1
        else:
            entry.outstanding += 1
        entry.seen_handshake = peer.last_handshake_time
        if peer.endpoint is None:
            return True
        return entry.outstanding > QUIET_AFTER / CHECK_INTERVAL

    def check(self, now: float) -> None:
        """Start a lookup for every name whose peer is quiet or whose TTL ran out."""
        for key, entry in list(self.names.items()):
            peer = self.device.peers.get(key)
            if peer is None:
                self.forget(key)
                continue
            quiet = self._quiet(entry, peer)
            if entry.lookup is not None or now < entry.next_allowed:
                continue
            if quiet or now >= entry.expires:
                self._resolve(key, entry, quiet, now)

    def _resolve(self, key: bytes, entry: _Name, quiet: bool, now: float) -> None:
        peer = self.device.peers[key]
        before = peer.endpoint
        entry.next_allowed = now + MIN_GAP
        self.lookups += 1
        try:
            lookup = self.resolver.resolve(entry.host, entry.port)
        except Exception:
            log.failure("resolving {host} failed", host=entry.host)
            return
        entry.lookup = lookup

        def done(resolution: Resolution) -> None:
            if self.names.get(key) is entry and entry.lookup is lookup:
                entry.lookup = None
                self._resolved(key, entry, resolution, quiet, before)

        def failed(failure: Failure) -> None:
            if self.names.get(key) is entry and entry.lookup is lookup:
                entry.lookup = None
                self._resolved(key, entry, Resolution(None), quiet, before)

        lookup.addCallbacks(done, failed)

    def _resolved(
        self,
        key: bytes,
        entry: _Name,
        resolution: Resolution,
        quiet: bool,
        before: Endpoint | None,
    ) -> None:
        now = self.reactor.seconds()
        peer = self.device.peers.get(key)
        if peer is None:
            return
        if resolution.endpoint is None:
            entry.failures += 1
            # Try again, backing off: MIN_GAP doubled per failure, up to DEFAULT_TTL.
            entry.expires = now
            entry.next_allowed = now + min(DEFAULT_TTL, MIN_GAP * 2**entry.failures)
            log.warn(
                "cannot resolve {host} (endpoint of peer {peer}); keeping {endpoint}",
                host=entry.host,
                peer=peer.short_name,
                endpoint=_text(peer.endpoint),
            )
            return
        entry.failures = 0
        ttl = resolution.ttl if resolution.ttl is not None else DEFAULT_TTL
        entry.expires = now + max(MIN_TTL, min(MAX_TTL, ttl))
        new = resolution.endpoint
        entry_before = entry.applied
        entry.applied = new
        if new == peer.endpoint:
            return
        if peer.endpoint != before:
            return  # roaming moved the endpoint while we looked: that proof is newer
        if not quiet and before not in (entry_before, None):
            return  # the peer answers from where roaming put it: DNS does not override that
        log.info(
            "{host} now resolves to {endpoint}: new endpoint of peer {peer}",
            host=entry.host,
            endpoint=_text(new),
            peer=peer.short_name,
        )
        self.offer(peer, new, f"{entry.host} now resolves to {_text(new)}")
        self.changes += 1
        entry.outstanding = 0
        if quiet and self.device.is_up:
            self.device.send_initiation(peer, now, retry=False)
        if self.on_change is not None:
            self.on_change()


def _text(endpoint: Endpoint | None) -> str:
    if endpoint is None:
        return "none"
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
