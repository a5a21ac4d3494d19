"""``PersistentKeepalive = auto``: find out whether we are behind a NAT, measure how long it keeps
an idle UDP mapping, and keep it open just often enough (docs/keepalive.md has the figures).

Three questions, answered with the help of meshguard peers:

- **NATed at all?** A meshguard peer's HELLO says how it sees our endpoint. If that is one of our
  local endpoints, the path to that peer is not translated and auto peers get no keepalive.
- **How long does the NAT keep an idle mapping?** In the spirit of RFC 5780's binding-lifetime
  discovery, but between two meshguard nodes: we open a *secondary* UDP socket (so the measured
  mapping is not the one our tunnel uses, and the probe does not refresh the tunnel's mapping),
  agree a random token with a helper peer over the authenticated control channel
  (``NAT_PROBE_REQUEST``), send the token from the secondary socket twice 2.5 s apart (the helper
  acks each, so the mapping looks like an established two-way flow, as the tunnel's does: Linux
  conntrack gives such flows its longer "stream" timeout), then stay silent. After ``delay``
  seconds the helper echoes the token toward the source it saw and reports ``echoed`` over the
  tunnel (``NAT_PROBE_RESULT``). The echo arrives only if the mapping survived ``delay``. Probes
  at every delay of a 15 % ladder (4 s to 600 s) run in parallel, each on its own socket; the
  first failure cancels the longer ones. Bisection between the longest delay known alive and
  the shortest known dead follows only if the ladder's answers left a wider gap.
- **Does the mapping depend on the destination?** Two meshguard peers behind the same NAT path
  that see the same public endpoint mean an endpoint-independent mapping: one keepalive stream
  (to one "carrier" peer) keeps it, and other meshguard peers need not be kept awake.
- **Is the interval still short enough?** A NAT may start forgetting sooner than it did when
  measured (under load, a new router, a changed conntrack timeout). When it re-creates an expired
  mapping on the same public port (Linux masquerade does when the port is free) no peer sees a
  change, yet inbound packets are dropped in every gap. So once after each new interval, then
  every 30 minutes, the node *self-checks* the tunnel's own mapping: it asks the peer its
  keepalive goes to (a meshguard peer with a session) for a late reply (``NAT_SELF_CHECK``),
  "interval minus a margin" after the request arrives, i.e. just before our next keepalive would
  refresh the mapping. The peer acknowledges at once and later sends a token datagram to our
  tunnel endpoint. We send that peer nothing meanwhile (both sides hold back their HELLO
  refresh), so the reply arrives only if the mapping outlived that idle. Anything we did send
  makes the check void (traffic refreshed the mapping); two misses in a row, not one (a datagram
  may be lost), are evidence of expiry.

The interval is half the lifetime known to be alive: then even one lost keepalive leaves the
mapping idle for at most the measured lifetime. Until measured, the conservative default (25 s,
WireGuard's documented value) applies. Evidence that a mapping expired (a peer sees our port
change while the address stays, or two self-checks in a row miss their reply) halves the
interval at once and starts a new measurement; a new public address (roaming) starts one too.

Keepalive plugins (:class:`IntervalOverride`, injected by the node from
:class:`meshguard.plugins.IKeepalivePolicy`) may override each choice: they are asked every time
auto decides, and the first answer that is not ``None`` wins, within the same bounds.

Unauthenticated datagrams (probe tokens, acks, echoes, late replies) only ever act on a token
learned over the authenticated channel; anything else is dropped and counted. Nothing here does
I/O: secondary sockets come from an injected :class:`ProbePaths`.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint, RandomBytes
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent, decode_json, encode_json, is_discard_only

#: Datagram magics: never a WireGuard message type (1..4 then three zero bytes).
PROBE_MAGIC: Final = b"MGn\x01"
ACK_MAGIC: Final = b"MGn\x02"
ECHO_MAGIC: Final = b"MGn\x03"
TOKEN_SIZE: Final = 16
DATAGRAM_SIZE: Final = 4 + TOKEN_SIZE

#: WireGuard's documented example interval: what auto uses until it knows better.
DEFAULT_INTERVAL: Final = 25
#: Bounds on the interval auto chooses.
INTERVAL_MIN: Final = 2
INTERVAL_MAX: Final = 300
#: Interval = this fraction of the lifetime known alive (one lost keepalive is survived).
SAFETY_FRACTION: Final = 0.5
#: Stop when known-alive and known-dead are within this fraction of known-alive (or 1 s).
PRECISION: Final = 0.15
LIFETIME_MIN: Final = 4.0
#: The longest lifetime we measure.
LIFETIME_MAX: Final = 600.0


def _ladder() -> tuple[float, ...]:
    """4 s to 600 s, each rung at most the precision above the previous one (37 rungs).

    All rungs are probed at once, so one round usually ends the measurement as soon as the
    first rung above the lifetime fails (about 1.15 times the lifetime, plus the echo wait),
    instead of a doubling ladder followed by a bisection round of another full lifetime.
    """
    rungs = [LIFETIME_MIN]
    while rungs[-1] < LIFETIME_MAX:
        step = max(1.0, PRECISION * rungs[-1])
        rungs.append(min(LIFETIME_MAX, math.floor((rungs[-1] + step) * 10) / 10))
    return tuple(rungs)


#: Probe delays tried first, all in parallel, each on its own socket.
LIFETIME_LADDER: Final = _ladder()
#: Probes per bisection round between known-alive and known-dead (needed only when the
#: ladder's answers were incomplete or inconsistent).
BISECT_POINTS: Final = 3
#: Priming: token datagrams sent from the secondary socket, this far apart.
PRIMES: Final = 2
PRIME_GAP: Final = 2.5
#: At most this many token datagrams per probe (priming plus resends while unacknowledged).
MAX_PROBE_SENDS: Final = 4
#: How long to wait for the helper's answer to a request.
REQUEST_TIMEOUT: Final = 10.0
#: The echo is due ``delay`` after our last token datagram; it is called lost (the mapping
#: expired) this much later. The helper's "echoed" report over the tunnel, when it gets
#: through, shortens the wait to ECHO_GRACE. A probe the helper never acknowledged is
#: inconclusive, never "dead".
ECHO_WAIT: Final = 3.0
ECHO_GRACE: Final = 2.0
#: A request the session could not carry is sent again this much later (after the handshake
#: we start for it), at most RELAUNCH_TRIES times.
RELAUNCH_AFTER: Final = 6.0
RELAUNCH_TRIES: Final = 5
#: A failed measurement is retried after this; a good one is repeated after REMEASURE_AFTER.
RETRY_AFTER: Final = 60.0
REMEASURE_AFTER: Final = 6 * 3600.0
#: Helper-side limits: outstanding tokens per peer and in total, datagrams answered per second.
#: (Room for two campaigns: a cancelled probe's token stays with the helper until its delay.)
MAX_HELP_PER_PEER: Final = 2 * len(LIFETIME_LADDER)
MAX_HELP_TOTAL: Final = 512
MAX_ANSWERS_PER_SECOND: Final = 64

# The self-check of the tunnel's own mapping (the module docstring's fourth question).
#: The late reply: sent by the helper from its tunnel port to ours, so it crosses our tunnel's
#: mapping. Never a WireGuard message type.
CHECK_MAGIC: Final = b"MGn\x04"
#: Delays a helper accepts for a late reply (those of intervals 3 s to 300 s fit).
CHECK_DELAY_MIN: Final = 2.0
CHECK_DELAY_MAX: Final = 300.0
#: The reply is asked for this long before our next keepalive: at least a second, a tenth of
#: the interval, or four round trips (timer jitter and the reply's way back). The check is
#: judged half a margin (or two round trips) after the reply is due, so before the keepalive.
CHECK_MARGIN_MIN: Final = 1.0
CHECK_MARGIN_FRACTION: Final = 0.1
CHECK_MARGIN_RTTS: Final = 4.0
#: Misses in a row that count as evidence of expiry (one lost datagram must not halve).
CHECK_MISSES: Final = 2
#: The first check after a new interval (or a new keepalive peer), and the rhythm after that.
CHECK_AFTER_CHANGE: Final = 10.0
CHECK_EVERY: Final = 1800.0
#: After a miss, confirm soon; after a void check (traffic), an unanswered or refused one,
#: wait (unanswered: doubling up to REMEASURE_AFTER: the peer may not know self-checks).
CHECK_AFTER_MISS: Final = 10.0
CHECK_AFTER_VOID: Final = 600.0
#: A request goes out only after the tunnel to the peer was quiet (nothing either way) this
#: long, so it starts the idle period itself; while not quiet, or without a session, look again
#: every CHECK_RETRY.
CHECK_QUIET: Final = 2.0
CHECK_RETRY: Final = 30.0
#: The helper holds its HELLO refresh this long after the reply (at least): past the
#: requester's grace (half the margin, or two round trips), which it does not know.
CHECK_HOLD_MIN: Final = 5.0
CHECK_HOLD_FRACTION: Final = 0.1
#: A request goes out only on a session that can still send this long (the ack comes back on
#: it); without one, the next session brings the check forward.
CHECK_SESSION_SLACK: Final = 10.0
#: Helper side: requests from one peer closer than this are ignored (not answered); at most
#: CHECK_HELP_PER_HOUR accepted per peer in an hour, one pending per peer, CHECK_HELP_TOTAL in all.
CHECK_HELP_MIN_GAP: Final = 5.0
CHECK_HELP_PER_HOUR: Final = 12
CHECK_HELP_TOTAL: Final = 256
#: The round trip an acknowledgement is taken to show at most (for the margin).
CHECK_RTT_MAX: Final = 1.0
#: A reply this much earlier than asked proves nothing (the helper did not wait).
CHECK_EARLY: Final = 0.5
NO_CHECK_PEER: Final = "idle: no meshguard peer to check the mapping with"
#: Why a helper refused, as a requester shows it (anything else a peer says is "unknown").
CHECK_REFUSALS: Final = frozenset({"bad_delay", "busy", "duplicate"})


class ProbePath(Protocol):
    """A secondary UDP socket (its own NAT mapping)."""

    def send(self, data: bytes, endpoint: Endpoint) -> None: ...

    def close(self) -> None: ...


class ProbePaths(Protocol):
    """Opens secondary sockets; ``receive(data, source, now)`` gets what arrives on one."""

    def open(
        self, toward: Endpoint, receive: Callable[[bytes, Endpoint, float], None]
    ) -> ProbePath | None: ...


def _precision(alive: float) -> float:
    """Stop bisecting when known-alive and known-dead are this close."""
    return max(1.0, PRECISION * alive)


def interval_for(lifetime: float) -> int:
    """The keepalive interval for a mapping known to survive ``lifetime`` idle seconds."""
    return max(INTERVAL_MIN, min(INTERVAL_MAX, int(lifetime * SAFETY_FRACTION)))


def _host(endpoint: Endpoint) -> str:
    return endpoint[0].split("%", 1)[0]


def _same_host(a: Endpoint, b: Endpoint) -> bool:
    try:
        return ipaddress.ip_address(_host(a)) == ipaddress.ip_address(_host(b))
    except ValueError:
        return False


@dataclass
class _Probe:
    """One lifetime probe of ours: a token, a delay and a secondary socket."""

    token: bytes
    delay: float
    helper: bytes
    deadline: float
    path: ProbePath | None = None
    target: Endpoint | None = None
    sends: int = 0
    next_send: float | None = None
    acked: bool = False
    echoed_at: float | None = None


@dataclass
class _Help:
    """A probe we answer for a peer: where its token came from and when to echo."""

    peer: bytes
    delay: float
    expires: float
    observed: Endpoint | None = None
    datagrams: int = 0
    echo_at: float | None = None


@dataclass
class _Check:
    """One self-check of ours in flight: the late reply we asked ``peer`` for."""

    token: bytes
    peer: bytes
    #: The keepalive interval checked and the idle (``delay``) the reply must survive.
    interval: int
    delay: float
    sent_at: float
    deadline: float
    #: ``peer.tx_bytes`` right after the request: anything sent since voids the check.
    tx_mark: int
    acked_at: float | None = None


@dataclass
class _LateReply:
    """A self-check we answer for a peer: the token datagram goes out at ``due``."""

    peer: bytes
    due: float


@dataclass
class SelfCheckState:
    """The self-check's outcome so far (shown by ``meshguard status``)."""

    #: Results: ok, missed, void, inconclusive; and how often two misses halved the interval.
    counts: dict[str, int] = field(
        default_factory=lambda: {"ok": 0, "missed": 0, "void": 0, "inconclusive": 0}
    )
    expiries: int = 0
    #: Misses in a row for the current peer and interval.
    misses: int = 0
    #: Unanswered (or refused) requests in a row: they space the next ones out.
    unanswered: int = 0
    #: Per peer: the latest result (text) and when it came.
    last: dict[bytes, tuple[str, float]] = field(default_factory=dict)
    #: The round trip the latest acknowledgement took (widens the margin).
    rtt: float = 0.0
    #: What the check is doing now ("scheduled", "waiting for ...", "pending: ...").
    state: str = "idle"


@dataclass
class _Decision:
    interval: int
    reason: str
    #: The plugin that overrode auto's choice, and that choice.
    plugin: str | None = None
    auto: _Decision | None = None


@dataclass(frozen=True)
class KeepaliveFacts:
    """What auto knows when it chooses a peer's interval, for keepalive plugins to read."""

    #: Whether the path to this peer is translated (``None``: no meshguard peer said yet).
    natted: bool | None
    #: ``endpoint-independent``, ``endpoint-dependent``, ``none`` or ``unknown``.
    mapping: str
    #: Seconds an idle mapping is known to survive; ``None`` until measured.
    lifetime: float | None
    #: The NAT kept the longest probe: the lifetime may be longer still.
    lifetime_at_least: bool
    #: Why auto chose its interval (the text ``meshguard status`` shows).
    reason: str
    #: This peer carries the keepalive that keeps an endpoint-independent mapping for all.
    carrier: bool
    #: The interval in force for this peer before this decision (0: off).
    current: int
    #: Auto halved its interval after a mapping expired (until the lifetime is re-measured).
    expired: bool
    #: The peer runs meshguard (otherwise it is a stock WireGuard peer).
    meshguard: bool


class IntervalOverride(Protocol):
    """The shape :class:`meshguard.plugins.IKeepalivePolicy` gives inside the mesh core."""

    name: str

    def interval(self, public_key: bytes, chosen: int, facts: KeepaliveFacts) -> int | None: ...


def _describe(value: object) -> str:
    """``repr(value)`` for status, short, even when the plugin's object cannot give one."""
    try:
        return repr(value)[:100]
    except Exception:
        return f"a {type(value).__name__}"


def override_name(override: object) -> str:
    """A plugin's ``name`` for status, or its class's name when it has no usable one."""
    try:
        name = getattr(override, "name", None)
    except Exception:
        name = None
    return name if isinstance(name, str) and name else type(override).__name__


@dataclass
class NatState:
    """What this node knows about its NAT (shown by ``meshguard status``)."""

    natted: bool | None = None
    mapping: str = "unknown"
    lifetime: float | None = None
    #: The lifetime is at least the longest delay we probe (the NAT may keep it longer).
    lifetime_at_least: bool = False
    measurement: str = "not started"
    measured_at: float | None = None
    #: Interval forced down by evidence of an expired mapping (until re-measured).
    shrunk: int | None = None
    shrink_reason: str = ""
    events: list[str] = field(default_factory=list)


class KeepalivePolicy:
    """The mesh feature behind ``PersistentKeepalive = auto`` (and the helper side of probes)."""

    kinds: tuple[int, ...] = (
        kinds.NAT_PROBE_REQUEST,
        kinds.NAT_PROBE_RESULT,
        kinds.NAT_SELF_CHECK,
        kinds.NAT_SELF_CHECK_ACK,
    )

    def __init__(
        self,
        device: Device,
        agent: MeshAgent,
        random: RandomBytes,
        paths: ProbePaths | None = None,
        overrides: Sequence[IntervalOverride] = (),
    ) -> None:
        self.device = device
        self.agent = agent
        self.random = random
        self.paths = paths
        #: Keepalive plugins, asked in this order each time auto chooses an interval (the node
        #: puts the ``IKeepalivePolicy`` plugins here, built-in ones first).
        self.overrides: list[IntervalOverride] = list(overrides)
        #: Plugin calls that raised or answered garbage (ignored), and the latest such call.
        self.plugin_errors = 0
        self.plugin_error = ""
        #: Peers (public keys) whose keepalive interval this policy chooses.
        self.auto: set[bytes] = set()
        self.nat = NatState()
        self.decisions: dict[bytes, _Decision] = {}
        self.observations: dict[bytes, Endpoint] = {}
        self.counters: dict[str, int] = {}
        self.carrier: bytes | None = None
        self.helper: bytes | None = None
        #: Completed probes as (delay, alive), newest last (for status and tests).
        self.results: list[tuple[float, bool]] = []
        self._probes: dict[bytes, _Probe] = {}
        self._help: dict[bytes, _Help] = {}
        self._alive = 0.0
        self._dead: float | None = None
        self._round_learned = 0
        self._next_campaign: float | None = None
        #: Delays whose request waits for a session, retried at ``_relaunch_at``.
        self._pending: list[float] = []
        self._relaunch_at: float | None = None
        self._relaunch_tries = 0
        self._answer_window = 0.0
        self._answers = 0
        #: Whether to self-check the tunnel's mapping (on by default; a test comparing costs
        #: may switch it off).
        self.self_check = True
        self.checks = SelfCheckState()
        self._check: _Check | None = None
        self._check_due: float | None = None
        #: The (peer, interval) the checks are about; a change resets the misses in a row.
        self._check_for: tuple[bytes, int] | None = None
        #: The peer a due check waits for a session with.
        self._check_session_wait: bytes | None = None
        #: (peer, tx_bytes, rx_bytes) when we last looked for a quiet moment.
        self._quiet: tuple[bytes, int, int] | None = None
        #: Until then the helper may still report on probe tokens of ours over the tunnel.
        self._helper_busy_until = 0.0
        #: Helper side: late replies we owe, and per peer when requests were accepted.
        self._late: dict[bytes, _LateReply] = {}
        self._late_accepted: dict[bytes, list[float]] = {}
        self._late_last_request: dict[bytes, float] = {}
        agent.observed_listeners.append(self._observed)
        device.on_unknown_datagram = self.datagram_received

    # ------------------------------------------------------------------ configuration

    def configure_auto(self, keys: set[bytes], now: float) -> None:
        """The peers with ``PersistentKeepalive = auto`` (config load or reload)."""
        self.auto = set(keys)
        for key in list(self.decisions):
            if key not in self.auto:
                del self.decisions[key]
        self.update(now)

    def release(self, key: bytes) -> None:
        """An operator set this peer's interval by number (UAPI): stop managing it."""
        self.auto.discard(key)
        self.decisions.pop(key, None)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _event(self, text: str) -> None:
        self.nat.events = [*self.nat.events[-7:], text]

    # ------------------------------------------------------------------ NAT classification

    def _local(self) -> set[Endpoint]:
        return set(self.agent.local_endpoints())

    def _path_natted(self, key: bytes) -> bool | None:
        observed = self.observations.get(key)
        if observed is None:
            return self.nat.natted
        return observed not in self._local()

    def _classify(self) -> None:
        local = self._local()
        live = {k: e for k, e in self.observations.items() if k in self.device.peers}
        if not live:
            self.nat.natted = None
            self.nat.mapping = "unknown"
            return
        natted = {k: e for k, e in live.items() if e not in local}
        self.nat.natted = bool(natted)
        if len(natted) >= 2:
            distinct = set(natted.values())
            self.nat.mapping = (
                "endpoint-independent" if len(distinct) == 1 else "endpoint-dependent"
            )
        elif natted:
            self.nat.mapping = "unknown"
        else:
            self.nat.mapping = "none"

    def _observed(self, peer: Peer, observed: Endpoint, now: float) -> None:
        key = peer.public_key
        previous = self.observations.get(key)
        self.observations[key] = observed
        if previous is not None and previous != observed and observed not in self._local():
            if not _same_host(previous, observed):
                self._event(f"public address changed {previous[0]} -> {observed[0]}: re-measure")
                self._restart_measurement(now, "public address changed")
            else:
                self._evidence_of_expiry(
                    now, f"{peer.short_name} saw our port change {previous[1]} -> {observed[1]}"
                )
        self.update(now)

    def _evidence_of_expiry(self, now: float, why: str) -> None:
        """A mapping of ours expired: halve the interval now, and measure again."""
        current = self.node_interval().interval
        shrunk = max(INTERVAL_MIN, current // 2)
        self.nat.shrunk = shrunk if self.nat.shrunk is None else min(self.nat.shrunk, shrunk)
        self.nat.shrink_reason = f"mapping expired ({why})"
        self._count("expiry_evidence")
        self._event(f"mapping expired ({why}): interval {current} -> {self.nat.shrunk} s")
        if not self._busy():
            self._next_campaign = now
            self.agent.dirty = True

    def _restart_measurement(self, now: float, why: str) -> None:
        self._cancel_probes()
        self.nat.lifetime = None
        self.nat.lifetime_at_least = False
        self.nat.shrunk = None
        self.nat.measurement = f"pending ({why})"
        self._next_campaign = now
        self.agent.dirty = True

    # ------------------------------------------------------------------ decisions

    def node_interval(self) -> _Decision:
        """The interval a NATed path needs, with its reason."""
        nat = self.nat
        if nat.lifetime is None:
            interval = DEFAULT_INTERVAL
            reason = f"conservative default until the NAT is measured ({nat.measurement})"
        elif nat.lifetime <= 0:
            interval = INTERVAL_MIN
            reason = f"NAT lifetime below {LIFETIME_LADDER[0]:g} s: minimum interval"
        else:
            interval = interval_for(nat.lifetime)
            bound = "at least " if nat.lifetime_at_least else ""
            reason = f"half the measured NAT lifetime ({bound}{nat.lifetime:g} s)"
            if interval == INTERVAL_MAX:
                reason += f", capped at {INTERVAL_MAX} s"
        if nat.shrunk is not None and nat.shrunk < interval:
            return _Decision(nat.shrunk, nat.shrink_reason + ": halved")
        return _Decision(interval, reason)

    def _choose_carrier(self, declined: set[bytes]) -> bytes | None:
        candidates = [
            key
            for key in sorted(self.auto)
            if key not in declined
            and key in self.device.peers
            and self.device.peers[key].is_meshguard
            and self.observations.get(key) is not None
            and self._path_natted(key)
        ]
        if not candidates:
            return None
        if self.carrier in candidates:
            return self.carrier
        if self.helper in candidates:
            return self.helper
        return candidates[0]

    def _decide(self, peer: Peer) -> _Decision:
        key = peer.public_key
        natted = self._path_natted(key)
        if natted is False:
            if key in self.observations:
                return _Decision(0, "not behind a NAT: this peer sees our local endpoint")
            return _Decision(0, "not behind a NAT: meshguard peers see our local endpoint")
        if natted is None:
            return _Decision(
                DEFAULT_INTERVAL,
                "conservative default until a meshguard peer reports our public endpoint",
            )
        if (
            self.nat.mapping == "endpoint-independent"
            and peer.is_meshguard
            and self.carrier is not None
            and key != self.carrier
        ):
            short = self.device.peers[self.carrier].short_name
            return _Decision(0, f"endpoint-independent NAT: the keepalive to {short} keeps it")
        return self.node_interval()

    def _decide_all(self) -> dict[bytes, _Decision]:
        """Every auto peer's interval, plugins consulted, and the carrier they rely on.

        A plugin may turn the carrier's keepalive off; then another peer carries the shared
        mapping (or, with none left, every peer keeps its own), so switching one peer off never
        silently leaves the whole node without a keepalive.
        """
        declined: set[bytes] = set()
        while True:
            self.carrier = (
                self._choose_carrier(declined)
                if self.nat.mapping == "endpoint-independent"
                else None
            )
            decisions: dict[bytes, _Decision] = {}
            for key in sorted(self.auto):
                peer = self.device.peers.get(key)
                if peer is not None:
                    decisions[key] = self._overridden(peer, self._decide(peer))
            carrier = decisions.get(self.carrier) if self.carrier is not None else None
            if carrier is None or carrier.interval or carrier.plugin is None:
                return decisions
            assert self.carrier is not None
            declined.add(self.carrier)

    def update(self, now: float) -> None:
        """Recompute every auto peer's interval and apply the ones that changed."""
        self._classify()
        for key, decision in self._decide_all().items():
            peer = self.device.peers[key]
            self.decisions[key] = decision
            was = peer.persistent_keepalive
            if decision.interval != was:
                self.device.set_persistent_keepalive(peer, decision.interval, now)
                if 0 < decision.interval < was and self.device.is_up and peer.endpoint:
                    # Shrinking: refresh the mapping now, the timer follows the new interval.
                    self.device.send_keepalive(peer, now)
        self._maybe_start(now)
        self._schedule_check(now)

    def _facts(self, peer: Peer, chosen: _Decision) -> KeepaliveFacts:
        nat = self.nat
        return KeepaliveFacts(
            natted=self._path_natted(peer.public_key),
            mapping=nat.mapping,
            lifetime=nat.lifetime,
            lifetime_at_least=nat.lifetime_at_least,
            reason=chosen.reason,
            carrier=peer.public_key == self.carrier,
            current=peer.persistent_keepalive,
            expired=nat.shrunk is not None,
            meshguard=peer.is_meshguard,
        )

    def _overridden(self, peer: Peer, chosen: _Decision) -> _Decision:
        """Auto's choice, or the first plugin answer that is not ``None``, within the bounds.

        0 (off) is taken as given: an operator may turn a peer's keepalive off in the config
        too. Any other number is clamped to auto's own bounds. A plugin that raises or answers
        anything but ``None`` or an ``int`` >= 0 is counted and skipped.
        """
        if not self.overrides:
            return chosen
        facts = self._facts(peer, chosen)
        for override in self.overrides:
            name = override_name(override)
            try:
                answer = override.interval(peer.public_key, chosen.interval, facts)
            except Exception as e:
                self._plugin_failed(name, f"raised {_describe(e)}")
                continue
            if answer is None:
                continue
            if type(answer) is not int or answer < 0:  # not bool, nor a subclass's surprises
                self._plugin_failed(name, f"answered {_describe(answer)}")
                continue
            interval = 0 if answer == 0 else max(INTERVAL_MIN, min(INTERVAL_MAX, answer))
            source = f"plugin {name}"
            if interval != answer:
                source += f", {answer} clamped to {interval}"
            reason = f"{source}; auto: {chosen.interval or 'off'}, {chosen.reason}"
            return _Decision(interval, reason, plugin=name, auto=chosen)
        return chosen

    def _plugin_failed(self, name: str, what: str) -> None:
        self.plugin_errors += 1
        self.plugin_error = f"{name} {what}"[:200]

    # ------------------------------------------------------------------ measuring (our side)

    def _wants_measurement(self) -> bool:
        if self.nat.natted is not True or self.paths is None:
            return False
        return any(
            key in self.device.peers and self._path_natted(key) is not False for key in self.auto
        )

    def _pick_helper(self, now: float) -> Peer | None:
        for key in sorted(self.observations):
            peer = self.device.peers.get(key)
            if peer is None or not peer.is_meshguard or peer.endpoint is None:
                continue
            if not self._path_natted(key):
                continue
            keypair = peer.keypairs.current
            if keypair is None or not keypair.can_send(now):
                continue
            return peer
        return None

    def _busy(self) -> bool:
        return bool(self._probes or self._pending)

    def _maybe_start(self, now: float) -> None:
        if self._busy() or not self._wants_measurement():
            return
        due = self._next_campaign
        if due is None:
            if self.nat.lifetime is not None and self.nat.shrunk is None:
                return
        elif due > now:
            return
        helper = self._pick_helper(now)
        if helper is None:
            # No deadline: the next session or observation calls us again.
            self._next_campaign = None
            self.nat.measurement = "waiting for a meshguard peer with a session"
            return
        self.helper = helper.public_key
        self._alive = 0.0
        self._dead = None
        self._round_learned = 0
        self._next_campaign = None
        self.nat.measurement = f"measuring with {helper.short_name}"
        self._count("campaigns")
        for delay in LIFETIME_LADDER:
            self._launch(helper, delay, now)

    def _launch(self, helper: Peer, delay: float, now: float) -> None:
        token = self.random(TOKEN_SIZE)
        body = encode_json({"t": token.hex(), "d": delay})
        if not self.device.send_control(helper, kinds.NAT_PROBE_REQUEST, body, now):
            # The session went stale while idle: start a handshake, send the request after it.
            self._count("request_not_sent")
            if not self._pending:
                self.device.send_keepalive(helper, now)
                self._relaunch_at = now + RELAUNCH_AFTER
            self._pending.append(delay)
            self.agent.dirty = True
            return
        self._probes[token] = _Probe(token, delay, helper.public_key, now + REQUEST_TIMEOUT)
        # The helper reports on this token over the tunnel even after we cancelled the probe.
        late = now + REQUEST_TIMEOUT + PRIME_GAP * MAX_PROBE_SENDS + delay + ECHO_GRACE
        self._helper_busy_until = max(self._helper_busy_until, late)
        self.agent.dirty = True

    def _relaunch(self, now: float) -> None:
        delays, self._pending = self._pending, []
        self._relaunch_at = None
        helper = self.device.peers.get(self.helper) if self.helper is not None else None
        self._relaunch_tries += 1
        if helper is None or self._relaunch_tries > RELAUNCH_TRIES:
            self._relaunch_tries = 0
            self._schedule_retry(now, "helper session unavailable")
            return
        for delay in delays:
            self._launch(helper, delay, now)
        if not self._pending:
            self._relaunch_tries = 0

    def _schedule_retry(self, now: float, why: str) -> None:
        if not self._busy():
            self.nat.measurement = f"retrying in {RETRY_AFTER:g} s ({why})"
            self._next_campaign = now + RETRY_AFTER
            self.agent.dirty = True

    def _cancel_probes(self, at_least: float | None = None) -> None:
        if at_least is None:
            self._pending = []
            self._relaunch_at = None
        else:
            self._pending = [d for d in self._pending if d < at_least]
        for token, probe in list(self._probes.items()):
            if at_least is None or probe.delay >= at_least:
                if probe.path is not None:
                    probe.path.close()
                del self._probes[token]

    def _ready(self, probe: _Probe, now: float) -> None:
        """The helper holds our token: open the secondary socket and prime the mapping."""
        helper = self.device.peers.get(probe.helper)
        if helper is None or helper.endpoint is None or self.paths is None:
            self._finish_probe(probe, None, now)
            return
        token = probe.token

        def receive(data: bytes, source: Endpoint, when: float) -> None:
            self.path_datagram_received(token, data, source, when)

        path = self.paths.open(helper.endpoint, receive)
        if path is None:
            self._count("no_secondary_socket")
            self._finish_probe(probe, None, now)
            return
        probe.path = path
        probe.target = helper.endpoint
        self._send_probe(probe, now)

    def _send_probe(self, probe: _Probe, now: float) -> None:
        assert probe.path is not None and probe.target is not None
        probe.path.send(PROBE_MAGIC + probe.token, probe.target)
        probe.sends += 1
        more = probe.sends < PRIMES or (not probe.acked and probe.sends < MAX_PROBE_SENDS)
        probe.next_send = now + PRIME_GAP if more else None
        probe.deadline = now + probe.delay + ECHO_WAIT
        if more:
            probe.deadline += PRIME_GAP * (MAX_PROBE_SENDS - probe.sends)
        self.agent.dirty = True

    def path_datagram_received(
        self, token: bytes, data: bytes, source: Endpoint, now: float
    ) -> None:
        """A datagram on a secondary socket: only our helper's ack or echo of its token counts."""
        probe = self._probes.get(token)
        if (
            probe is None
            or len(data) != DATAGRAM_SIZE
            or data[4:] != token
            or probe.target is None
            or source != probe.target
        ):
            self._count("path_garbage")
            return
        head = data[:4]
        if head == ACK_MAGIC:
            probe.acked = True
        elif head == ECHO_MAGIC:
            self._finish_probe(probe, True, now)
        else:
            self._count("path_garbage")

    def _finish_probe(self, probe: _Probe, alive: bool | None, now: float) -> None:
        if self._probes.pop(probe.token, None) is None:
            return
        if probe.path is not None:
            probe.path.close()
        if alive is None:
            self._count("probes_inconclusive")
        else:
            self._count("probes_alive" if alive else "probes_dead")
            self.results.append((probe.delay, alive))
            self._round_learned += 1
            if alive:
                self._alive = max(self._alive, probe.delay)
                if self._dead is not None and self._alive >= self._dead:
                    self._dead = None  # inconsistent: the NAT kept a longer one; search upward
            else:
                self._dead = probe.delay if self._dead is None else min(self._dead, probe.delay)
                # Longer delays would die too: do not wait for them.
                self._cancel_probes(at_least=self._dead)
        if not self._busy():
            self._next_round(now)

    def _next_round(self, now: float) -> None:
        helper = self.device.peers.get(self.helper) if self.helper is not None else None
        if self._round_learned == 0 or helper is None:
            self._schedule_retry(now, "no probe answered")
            return
        self._round_learned = 0
        alive, dead = self._alive, self._dead
        if dead is None:
            if alive >= LIFETIME_MAX:
                self._measured(alive, now, at_least=True)
                return
            delays = [d for d in LIFETIME_LADDER if d > alive]
        elif dead - alive <= _precision(alive) + 0.05:  # + rounding of the rungs
            self._measured(alive, now)
            return
        else:
            step = (dead - alive) / (BISECT_POINTS + 1)
            delays = [round(alive + step * i, 1) for i in range(1, BISECT_POINTS + 1)]
        for delay in delays:
            self._launch(helper, delay, now)

    def _measured(self, lifetime: float, now: float, *, at_least: bool = False) -> None:
        nat = self.nat
        nat.lifetime = lifetime
        nat.lifetime_at_least = at_least
        nat.measured_at = now
        nat.measurement = "measured"
        nat.shrunk = None
        self._event(f"measured NAT lifetime {'>= ' if at_least else ''}{lifetime:g} s")
        self._next_campaign = now + REMEASURE_AFTER
        self.agent.dirty = True
        self.update(now)

    # ------------------------------------------------------------------ control messages

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        message = decode_json(body)
        token_hex = message.get("t") if message is not None else None
        if message is None or not isinstance(token_hex, str) or len(token_hex) != 2 * TOKEN_SIZE:
            self._count("bad_control")
            return
        try:
            token = bytes.fromhex(token_hex)
        except ValueError:
            self._count("bad_control")
            return
        if kind == kinds.NAT_PROBE_REQUEST:
            self._help_requested(peer, token, message.get("d"), now)
        elif kind == kinds.NAT_PROBE_RESULT:
            self._result(peer, token, message, now)
        elif kind == kinds.NAT_SELF_CHECK:
            self._check_requested(peer, token, message.get("d"), now)
        else:
            self._check_acknowledged(peer, token, message, now)

    def _result(self, peer: Peer, token: bytes, message: dict[str, Any], now: float) -> None:
        probe = self._probes.get(token)
        if probe is None or probe.helper != peer.public_key:
            self._count("stale_result")
            return
        state = message.get("s")
        if state == "ready" and probe.path is None:
            self._ready(probe, now)
        elif state == "echoed" and probe.path is not None:
            if not probe.acked or probe.next_send is not None:
                self._finish_probe(probe, None, now)
                return
            probe.echoed_at = now
            probe.deadline = min(probe.deadline, now + ECHO_GRACE)
            self.agent.dirty = True
        else:
            # "refused" (helper limits) or out of order.
            self._count("probe_refused")
            self._finish_probe(probe, None, now)

    # ------------------------------------------------------------------ helping a peer

    def _help_requested(self, peer: Peer, token: bytes, delay: object, now: float) -> None:
        def refuse(why: str) -> None:
            self._count(f"help_refused_{why}")
            body = encode_json({"t": token.hex(), "s": "refused", "why": why})
            self.device.send_control(peer, kinds.NAT_PROBE_RESULT, body, now)

        if not isinstance(delay, int | float) or isinstance(delay, bool):
            refuse("bad_delay")
            return
        if not 1.0 <= delay <= LIFETIME_MAX:
            refuse("bad_delay")
            return
        if token in self._help:
            refuse("duplicate")
            return
        mine = sum(1 for h in self._help.values() if h.peer == peer.public_key)
        if mine >= MAX_HELP_PER_PEER or len(self._help) >= MAX_HELP_TOTAL:
            refuse("busy")
            return
        window = PRIME_GAP * MAX_PROBE_SENDS + REQUEST_TIMEOUT
        self._help[token] = _Help(peer.public_key, float(delay), now + window)
        self.agent.dirty = True
        body = encode_json({"t": token.hex(), "s": "ready"})
        self.device.send_control(peer, kinds.NAT_PROBE_RESULT, body, now)

    def _answer_allowed(self, now: float) -> bool:
        if now - self._answer_window >= 1.0:
            self._answer_window = now
            self._answers = 0
        self._answers += 1
        return self._answers <= MAX_ANSWERS_PER_SECOND

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> None:
        """A non-WireGuard datagram on our port: a token a peer told us about, or garbage."""
        if len(data) == DATAGRAM_SIZE and data[:4] == CHECK_MAGIC:
            self._late_reply_received(data[4:], source, now)
            return
        if len(data) != DATAGRAM_SIZE or data[:4] != PROBE_MAGIC:
            self.device.counters.malformed += 1
            self._count("not_a_probe")
            return
        token = data[4:]
        help = self._help.get(token)
        if help is None:
            self._count("unknown_token")
            return
        peer = self.device.peers.get(help.peer)
        if peer is None or peer.endpoint is None or not _same_host(peer.endpoint, source):
            self._count("token_source_mismatch")
            return
        if help.datagrams >= MAX_PROBE_SENDS or not self._answer_allowed(now):
            self._count("probe_rate_limited")
            return
        help.datagrams += 1
        help.observed = source
        help.echo_at = now + help.delay
        help.expires = help.echo_at + ECHO_GRACE
        self.device.io.send_datagram(ACK_MAGIC + token, source)
        self.agent.dirty = True

    # ------------------------------------------------------------------ self-check (our side)

    def _check_target(self) -> Peer | None:
        """The peer whose keepalive keeps our mapping open and that can check it: an auto peer
        running meshguard, reached directly through the NAT, with a keepalive in force (the
        carrier first, then the helper: the peers auto already relies on)."""
        candidates: list[Peer] = []
        for key in sorted(self.auto):
            peer = self.device.peers.get(key)
            if (
                peer is None
                or not peer.persistent_keepalive
                or not peer.is_meshguard
                or key not in self.observations
                or self._path_natted(key) is not True
                or peer.endpoint is None
                or peer.relay is not None
                or is_discard_only(peer.endpoint)
            ):
                continue
            candidates.append(peer)
        for preferred in (self.carrier, self.helper):
            for peer in candidates:
                if peer.public_key == preferred:
                    return peer
        return candidates[0] if candidates else None

    def _check_margin(self, interval: int) -> float:
        """How long before the next keepalive the late reply is due (see CHECK_MARGIN_MIN)."""
        return max(
            CHECK_MARGIN_MIN,
            CHECK_MARGIN_FRACTION * interval,
            CHECK_MARGIN_RTTS * self.checks.rtt,
        )

    def _schedule_check(self, now: float) -> None:
        """Auto decided again: a new keepalive peer or interval is checked soon."""
        target = self._check_target() if self.self_check else None
        if target is None:
            self._check_for = None
            self._check_due = None
            self._quiet = None
            self.checks.state = NO_CHECK_PEER
            return
        wanted = (target.public_key, target.persistent_keepalive)
        if wanted != self._check_for:
            self._check_for = wanted
            self.checks.misses = 0
            self.checks.state = "scheduled"
            self._check_due = now + CHECK_AFTER_CHANGE
            self.agent.dirty = True

    def _check_blocked(self, peer: Peer, now: float) -> tuple[str, float] | None:
        """Why a due check cannot start now, and when to look again (None: it can start)."""
        if self._busy():
            return "waiting for the NAT measurement to end", now + CHECK_RETRY
        if peer.public_key == self.helper and now < self._helper_busy_until:
            # Its reports on our probe tokens would cross the tunnel in the middle.
            return "waiting for the last probe reports", self._helper_busy_until
        keypair = peer.keypairs.current
        if keypair is None or not keypair.can_send(now + CHECK_SESSION_SLACK):
            # The next session brings the check forward (``session_started``); no polling.
            self._check_session_wait = peer.public_key
            return f"waiting for a session with {peer.short_name}", now + CHECK_EVERY
        state = self.agent.peers.get(peer.public_key)
        if state is None or not state.hello_acked:
            return f"waiting for the HELLO exchange with {peer.short_name}", now + CHECK_RETRY
        return None

    def _try_check(self, now: float) -> None:
        """A check is due: send the request at a quiet moment, when nothing else forbids it."""
        self._check_due = None
        target = self._check_target() if self.self_check else None
        if target is None:
            self._check_for = None
            self.checks.state = NO_CHECK_PEER
            return
        key, interval = target.public_key, target.persistent_keepalive
        if (key, interval) != self._check_for:
            self._check_for = (key, interval)
            self.checks.misses = 0
        delay = round(interval - self._check_margin(interval), 1)
        if delay < CHECK_DELAY_MIN:
            # Until the interval changes: a mapping this short-lived is not worth a late reply.
            self.checks.state = f"off: a {interval} s interval is too short to check"
            return
        blocked = self._check_blocked(target, now)
        if blocked is not None:
            self.checks.state, self._check_due = blocked
            return
        marks = (key, target.tx_bytes, target.rx_bytes)
        if marks != self._quiet:
            # Something crossed the tunnel since we last looked (or we never looked): look
            # again after a quiet spell, then less often while the tunnel stays busy.
            first = self._quiet is None or self._quiet[0] != key
            self._quiet = marks
            self.checks.state = "waiting for a quiet moment"
            self._check_due = now + (CHECK_QUIET if first else CHECK_RETRY)
            return
        self._quiet = None
        self._start_check(target, interval, delay, now)

    def _start_check(self, peer: Peer, interval: int, delay: float, now: float) -> None:
        token = self.random(TOKEN_SIZE)
        body = encode_json({"t": token.hex(), "d": delay})
        if not self.device.send_control(peer, kinds.NAT_SELF_CHECK, body, now):
            self._count("check_request_not_sent")
            self._check_due = now + CHECK_RETRY
            return
        self._count("check_requests")
        deadline = now + delay + self._check_margin(interval) / 2
        # Our HELLO refresh would refresh the mapping in the middle of the idle: hold it back.
        self._hold_hello(peer, deadline + CHECK_QUIET)
        self._check = _Check(token, peer.public_key, interval, delay, now, deadline, peer.tx_bytes)
        self.checks.state = f"pending: reply due after {delay:g} s idle ({peer.short_name})"
        self.agent.dirty = True

    def _hold_hello(self, peer: Peer, until: float) -> None:
        """Move the agent's next HELLO refresh with ``peer`` after ``until`` (an acknowledged
        session only: a HELLO still being retried is left alone)."""
        state = self.agent.peers.get(peer.public_key)
        if (
            state is not None
            and state.hello_acked
            and state.next_hello is not None
            and state.next_hello < until
        ):
            state.next_hello = until

    def _check_acknowledged(
        self, peer: Peer, token: bytes, message: dict[str, Any], now: float
    ) -> None:
        check = self._check
        if check is None or check.token != token or check.peer != peer.public_key:
            self._count("check_stale_ack")
            return
        state = message.get("s")
        if state == "ok" and check.acked_at is None:
            check.acked_at = now
            rtt = now - check.sent_at
            # Capped: one slow answer must not push the next request below the minimum delay.
            self.checks.rtt = min(rtt, CHECK_RTT_MAX)
            check.deadline = max(check.deadline, check.sent_at + check.delay + 2 * rtt)
            self._hold_hello(peer, check.deadline + CHECK_QUIET)
        elif state == "refused":
            why = message.get("why")
            why = why if isinstance(why, str) and why in CHECK_REFUSALS else "unknown"
            self._finish_check(check, "inconclusive", f"refused by the peer ({why})", now)
        else:
            self._count("check_stale_ack")

    def _late_reply_received(self, token: bytes, source: Endpoint, now: float) -> None:
        """The token datagram came through our tunnel's mapping: it lived as long as asked."""
        check = self._check
        if check is None or token != check.token:
            self._count("check_reply_unknown")
            return
        peer = self.device.peers.get(check.peer)
        if peer is None or peer.endpoint is None or not _same_host(peer.endpoint, source):
            self._count("check_reply_source_mismatch")
            return
        idle = now - check.sent_at
        if peer.tx_bytes != check.tx_mark:
            self._finish_check(check, "void", "void: we sent to the peer meanwhile", now)
        elif idle < check.delay - CHECK_EARLY:
            # The peer did not wait: it proves nothing about the idle we asked for.
            self._finish_check(check, "inconclusive", f"reply came early ({idle:.1f} s)", now)
        else:
            self._finish_check(check, "ok", f"ok: reply after {idle:.1f} s idle", now)

    def _judge_check(self, check: _Check, now: float) -> None:
        """No reply by the deadline (which comes before our next keepalive)."""
        peer = self.device.peers.get(check.peer)
        if peer is None:
            self._finish_check(check, "inconclusive", "the peer was removed", now)
        elif check.acked_at is None:
            # Lost request, lost ack, or a peer that does not know self-checks (whose HELLO
            # then voids it too): no evidence, and the next request waits longer.
            self._finish_check(check, "inconclusive", "not acknowledged", now)
        elif peer.tx_bytes != check.tx_mark:
            self._finish_check(check, "void", "void: we sent to the peer meanwhile", now)
        else:
            self._finish_check(check, "missed", f"no reply after {check.delay:g} s idle", now)

    def _finish_check(self, check: _Check, result: str, text: str, now: float) -> None:
        self._check = None
        self._quiet = None
        checks = self.checks
        checks.counts[result] += 1
        # A check of an interval no longer in force is shown but not counted for evidence.
        current = self._check_for == (check.peer, check.interval)
        checks.unanswered = checks.unanswered + 1 if result == "inconclusive" else 0
        expired = False
        if result == "ok" and current:
            checks.misses = 0
        elif result == "missed" and current:
            checks.misses += 1
            text = f"missed {checks.misses}: {text}"
            expired = checks.misses >= CHECK_MISSES
        elif result == "missed":
            text = f"missed: {text}"
        if not current:
            after = CHECK_AFTER_CHANGE
        elif result == "ok":
            after = CHECK_EVERY
        elif result == "missed":
            after = CHECK_AFTER_MISS
        elif result == "void":
            after = CHECK_AFTER_VOID
        else:
            after = min(REMEASURE_AFTER, CHECK_AFTER_VOID * 2 ** min(checks.unanswered - 1, 8))
        self._check_due = now + after if self._check_for is not None else None
        checks.state = "scheduled" if self._check_due is not None else NO_CHECK_PEER
        self.agent.dirty = True
        if expired:
            checks.misses = 0
            checks.expiries += 1
            checks.last[check.peer] = (f"{text}: interval halved", now)
            self._evidence_of_expiry(
                now,
                f"self-check: reply after {check.delay:g} s idle did not arrive"
                f" {CHECK_MISSES} times in a row",
            )
            self.update(now)
        else:
            checks.last[check.peer] = (text, now)

    # ------------------------------------------------------------------ self-check (helping)

    def _check_requested(self, peer: Peer, token: bytes, delay: object, now: float) -> None:
        """A peer asks for a late reply: accepted within the limits, else refused or ignored."""
        key = peer.public_key
        last = self._late_last_request.get(key)
        if last is not None and now - last < CHECK_HELP_MIN_GAP:
            # Faster than any honest requester asks: not even a refusal.
            self._count("check_help_ignored_too_soon")
            return
        self._late_last_request[key] = now

        def refuse(why: str) -> None:
            self._count(f"check_help_refused_{why}")
            body = encode_json({"t": token.hex(), "s": "refused", "why": why})
            self.device.send_control(peer, kinds.NAT_SELF_CHECK_ACK, body, now)

        if not isinstance(delay, int | float) or isinstance(delay, bool):
            refuse("bad_delay")
            return
        if not CHECK_DELAY_MIN <= delay <= CHECK_DELAY_MAX:
            refuse("bad_delay")
            return
        if token in self._late:
            refuse("duplicate")
            return
        pending = any(late.peer == key for late in self._late.values())
        if pending or len(self._late) >= CHECK_HELP_TOTAL:
            refuse("busy")
            return
        accepted = [t for t in self._late_accepted.get(key, ()) if now - t < 3600.0]
        if len(accepted) >= CHECK_HELP_PER_HOUR:
            self._late_accepted[key] = accepted
            self._count("check_help_ignored_hourly")
            return
        for gone in [k for k in self._late_accepted if k not in self.device.peers]:
            del self._late_accepted[gone]
        for gone in [k for k in self._late_last_request if k not in self.device.peers]:
            del self._late_last_request[gone]
        self._late_accepted[key] = [*accepted, now]
        due = now + float(delay)
        self._late[token] = _LateReply(key, due)
        # Our HELLO refresh would make the requester answer (and refresh its mapping) before
        # it judged the check: hold it until the requester's grace is over too.
        self._hold_hello(peer, due + max(CHECK_HOLD_MIN, CHECK_HOLD_FRACTION * float(delay)))
        self._count("check_help_accepted")
        self.agent.dirty = True
        body = encode_json({"t": token.hex(), "s": "ok"})
        self.device.send_control(peer, kinds.NAT_SELF_CHECK_ACK, body, now)

    def _send_late_reply(self, token: bytes, late: _LateReply, now: float) -> None:
        """Send the token to the requester's tunnel endpoint, from ours: through its mapping."""
        peer = self.device.peers.get(late.peer)
        if (
            peer is None
            or peer.endpoint is None
            or peer.relay is not None
            or is_discard_only(peer.endpoint)
        ):
            self._count("check_help_no_endpoint")
            return
        if not self._answer_allowed(now):
            self._count("check_help_rate_limited")
            return
        self.device.io.send_datagram(CHECK_MAGIC + token, peer.endpoint)
        self._count("check_replies_sent")

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        deadlines: list[float] = []
        if self._next_campaign is not None and self._wants_measurement():
            deadlines.append(self._next_campaign)
        for probe in self._probes.values():
            deadlines.append(probe.deadline)
            if probe.next_send is not None:
                deadlines.append(probe.next_send)
        for help in self._help.values():
            deadlines.append(help.echo_at if help.echo_at is not None else help.expires)
        if self._relaunch_at is not None:
            deadlines.append(self._relaunch_at)
        if self._check is not None:
            deadlines.append(self._check.deadline)
        elif self._check_due is not None:
            deadlines.append(self._check_due)
        deadlines.extend(late.due for late in self._late.values())
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for token, help in list(self._help.items()):
            if help.echo_at is not None and help.echo_at <= now:
                del self._help[token]
                peer = self.device.peers.get(help.peer)
                if peer is None or help.observed is None:
                    continue
                if self._answer_allowed(now):
                    self.device.io.send_datagram(ECHO_MAGIC + token, help.observed)
                body = encode_json({"t": token.hex(), "s": "echoed", "o": list(help.observed)})
                self.device.send_control(peer, kinds.NAT_PROBE_RESULT, body, now)
                self._count("echoes_sent")
            elif help.echo_at is None and help.expires <= now:
                del self._help[token]
                self._count("help_expired")
        for probe in list(self._probes.values()):
            if probe.token not in self._probes:
                continue  # cancelled by an earlier probe's result
            if probe.deadline <= now:
                # Acknowledged and primed, yet no echo by its time: the mapping expired.
                done = probe.acked and probe.next_send is None
                self._finish_probe(probe, False if done else None, now)
            elif probe.next_send is not None and probe.next_send <= now:
                self._send_probe(probe, now)
        if self._relaunch_at is not None and self._relaunch_at <= now:
            self._relaunch(now)
        if self._next_campaign is not None and self._next_campaign <= now:
            self._maybe_start(now)
        for token, late in list(self._late.items()):
            if late.due <= now:
                del self._late[token]
                self._send_late_reply(token, late, now)
        if self._check is not None and self._check.deadline <= now:
            self._judge_check(self._check, now)
        if self._check is None and self._check_due is not None and self._check_due <= now:
            self._try_check(now)

    # ------------------------------------------------------------------ mesh feature hooks

    def session_started(self, peer: Peer, now: float) -> None:
        self.update(now)
        if self._check_session_wait == peer.public_key:
            self._check_session_wait = None
            if self._check is None and self._check_due is not None:
                self._check_due = min(self._check_due, now + CHECK_QUIET)
                self.agent.dirty = True

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        key = peer.public_key
        decision = self.decisions.get(key)
        if key in self.auto and decision is not None:
            source = "" if decision.plugin is not None else "auto: "
            status: dict[str, Any] = {
                "keepalive": f"{decision.interval or 'off'} ({source}{decision.reason})",
                "keepalive_interval": decision.interval,
                "keepalive_reason": decision.reason,
                "keepalive_auto": True,
            }
            if decision.plugin is not None and decision.auto is not None:
                status["keepalive_plugin"] = decision.plugin
                status["keepalive_auto_interval"] = decision.auto.interval
                status["keepalive_auto_reason"] = decision.auto.reason
            status.update(self._check_status(key))
            return status
        interval = peer.persistent_keepalive
        reason = "configured" if interval else "off (not configured)"
        return {
            "keepalive": f"{interval or 'off'} ({reason})",
            "keepalive_interval": interval,
            "keepalive_reason": reason,
            "keepalive_auto": False,
        }

    def _check_status(self, key: bytes) -> dict[str, Any]:
        """The latest self-check with this peer: its result text and when (the node's clock)."""
        status: dict[str, Any] = {}
        last = self.checks.last.get(key)
        if last is not None:
            status["keepalive_self_check"], status["keepalive_self_check_at"] = last
        check = self._check
        if check is not None and check.peer == key:
            status["keepalive_self_check_pending"] = f"reply due after {check.delay:g} s idle"
        return status

    def node_status(self) -> dict[str, Any]:
        nat = self.nat
        natted = {True: "yes", False: "no", None: "unknown"}[nat.natted]
        status: dict[str, Any] = {
            "nat": natted,
            "nat_mapping": nat.mapping,
            "nat_lifetime": nat.lifetime,
            "nat_lifetime_at_least": nat.lifetime_at_least,
            "nat_measurement": nat.measurement,
        }
        if self.auto:
            decision = self.node_interval() if nat.natted else _Decision(0, "not behind a NAT")
            if nat.natted is None:
                decision = _Decision(DEFAULT_INTERVAL, "NAT unknown: conservative default")
            status["keepalive_interval"] = decision.interval
            status["keepalive_reason"] = decision.reason
            if self.carrier is not None and self.carrier in self.device.peers:
                status["keepalive_carrier"] = self.device.peers[self.carrier].short_name
        if self.overrides:
            status["keepalive_plugins"] = [override_name(o) for o in self.overrides]
        if self.plugin_errors:
            status["keepalive_plugin_errors"] = self.plugin_errors
            status["keepalive_plugin_error"] = self.plugin_error
        checks = self.checks
        if self._check_for is not None or any(checks.counts.values()):
            status["keepalive_self_checks"] = {**checks.counts, "halved": checks.expiries}
            status["keepalive_self_check_state"] = checks.state
            if self._check is None and self._check_due is not None:
                status["keepalive_self_check_next_at"] = self._check_due
        if nat.events:
            status["nat_events"] = list(nat.events)
        if self.counters:
            status["nat_probe_counters"] = dict(sorted(self.counters.items()))
        return status
