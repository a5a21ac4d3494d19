"""``PersistentKeepalive = auto``: how often each peer gets a keepalive, and why.

The policy answers four questions with the help of meshguard peers, and decides the interval of
every ``auto`` peer from the answers (docs/keepalive.md explains them and has the figures):

- **NATed at all?** A meshguard peer's HELLO says how it sees our endpoint. If that is one of our
  local endpoints, the path to that peer is not translated and auto peers get no keepalive.
- **How long does the NAT keep an idle mapping?** Measured with a helper peer from a secondary
  socket (:mod:`meshguard.mesh.lifetime_measurement`); this module decides whether a measurement
  is wanted and with whom, and what a new lifetime means.
- **Does the mapping depend on the destination?** Two meshguard peers behind the same NAT path
  that see the same public endpoint mean an endpoint-independent mapping: one keepalive stream
  (to one "carrier" peer) keeps the public *port* for all destinations.
- **Does the filtering depend on the remote?** A kept port is not enough: many NATs admit inbound
  packets only from a remote the node itself sent to lately. Configured peers get no hole
  punching from the mesh, so other meshguard peers go without their own keepalive only after the
  filtering check (:mod:`meshguard.mesh.filtering_check`) proved this NAT admits a remote we
  have not sent to for longer than the lifetime; until then, and when it is disproven, every
  auto peer keeps its own keepalive. This module chooses whom to check with.

The interval is half the lifetime known to be alive toward a peer whose keepalives nobody
answers (one lost keepalive then leaves the mapping idle for at most the measured lifetime), and
0.7 of it toward a meshguard peer that answers them (:mod:`meshguard.mesh.keepalive_acks`: a lost
one is resent within seconds). Until measured, the conservative default (WireGuard's documented
value) applies. Evidence that a mapping expired (a peer sees our port change while the address
stays, or two self-checks in a row miss their reply: :mod:`meshguard.mesh.selfcheck`, which
checks with the peer this module chooses) halves the interval at once and starts a new
measurement; a new public address (roaming) starts one too. Keepalive plugins
(:mod:`meshguard.mesh.interval_plugins`) may override each choice. Idle learned members' path
checks take their pace from here too (:meth:`KeepalivePolicy.path_check_interval`).

The other parts: the probe's wire format (:mod:`meshguard.mesh.lifetime_probe`) and the helper
side answering other nodes' probes (:mod:`meshguard.mesh.probe_helper`). The policy owns one of
each machine, routes their control messages and datagrams, and keeps one deadline for all.
Unauthenticated datagrams (probe tokens, acks, echoes, late replies) only ever act on a token
learned over the authenticated channel; anything else is dropped and counted. Nothing here does
I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint, RandomBytes
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import (
    MeshAgent,
    decode_json,
    same_host,
)
from meshguard.mesh.filtering_check import (
    FILTER_CLOSED,
    FILTER_OPEN,
    FILTER_UNKNOWN,
    FilteringCheck,
)
from meshguard.mesh.interval_plugins import Decision, IntervalPlugins

# Where plugins (meshguard.plugins) and the node have always imported them from.
from meshguard.mesh.interval_plugins import IntervalOverride as IntervalOverride
from meshguard.mesh.interval_plugins import KeepaliveFacts as KeepaliveFacts
from meshguard.mesh.interval_plugins import override_name as override_name
from meshguard.mesh.keepalive_acks import ACK_RESENDS, ACK_WAIT, KeepaliveAcks
from meshguard.mesh.keepalive_acks import CAPABILITY as ACK_CAPABILITY
from meshguard.mesh.lifetime_measurement import (
    LifetimeMeasurement,
    ProbeSocketOpener,
)
from meshguard.mesh.lifetime_probe import (
    DATAGRAM_SIZE,
    LIFETIME_LADDER,
    TOKEN_SIZE,
)
from meshguard.mesh.probe_helper import ProbeHelper
from meshguard.mesh.selfcheck import (
    CHECK_MAGIC,
    CHECK_RETRY,
    SelfCheck,
)

#: WireGuard's documented example interval: what auto uses until it knows better.
DEFAULT_INTERVAL: Final = 25
#: Bounds on the interval auto chooses.
INTERVAL_MIN: Final = 2
INTERVAL_MAX: Final = 300
#: Interval = this fraction of the lifetime known alive (one lost keepalive is survived).
SAFETY_FRACTION: Final = 0.5
#: With a peer that answers keepalives (mesh/keepalive_acks.py) a lost one is resent within
#: seconds, so the interval is this fraction of the lifetime, and leaves room for the resends
#: and ACK_MARGIN (timer jitter, the round trip) before the lifetime ends.
ACKED_FRACTION: Final = 0.7
ACK_MARGIN: Final = 2.0
#: A pair with no data either way this long is idle: its direct path is checked only once per
#: keepalive interval (``KeepalivePolicy.path_check_interval``).
PATH_IDLE_AFTER: Final = 30.0


#: Auto's choice for a peer (the name the policy used before the plugins' part moved out).
_Decision = Decision


def interval_for(lifetime: float, *, acked: bool = False) -> int:
    """The keepalive interval for a mapping known to survive ``lifetime`` idle seconds;
    ``acked``: the peer answers keepalives, so a lost one is resent (never less than half)."""
    chosen = lifetime * SAFETY_FRACTION
    if acked:
        resends = ACK_WAIT * ACK_RESENDS + ACK_MARGIN
        chosen = max(chosen, min(lifetime * ACKED_FRACTION, lifetime - resends))
    return max(INTERVAL_MIN, min(INTERVAL_MAX, int(chosen)))


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
    #: The filtering check's verdict (FILTER_UNKNOWN, FILTER_OPEN, FILTER_CLOSED), the peer it
    #: was checked with and when, and the misses in a row since the last reply.
    filtering: str = FILTER_UNKNOWN
    filtering_peer: str | None = None
    filtering_at: float | None = None
    filtering_misses: int = 0
    filtering_state: str = "not started"
    events: list[str] = field(default_factory=list)


class KeepalivePolicy:
    """The mesh feature behind ``PersistentKeepalive = auto`` (it hosts the helper side of
    probes, :attr:`probe_helper`, and routes its messages).

    It owns the self-check (:attr:`self_check`) and routes the self-check's control messages
    and late replies to it."""

    kinds: tuple[int, ...] = (
        kinds.NAT_PROBE_REQUEST,
        kinds.NAT_PROBE_RESULT,
        kinds.NAT_SELF_CHECK,
        kinds.NAT_SELF_CHECK_ACK,
        kinds.KEEPALIVE_REQUEST,
    )
    #: Told to peers in HELLO: we answer keepalive requests.
    capabilities: tuple[str, ...] = (ACK_CAPABILITY,)

    def __init__(
        self,
        device: Device,
        agent: MeshAgent,
        random: RandomBytes,
        paths: ProbeSocketOpener | None = None,
        overrides: Sequence[IntervalOverride] = (),
    ) -> None:
        self.device = device
        self.agent = agent
        self.random = random
        self.paths = paths
        #: Keepalive plugins, asked in this order each time auto chooses an interval (the node
        #: puts the ``IKeepalivePolicy`` plugins here, built-in ones first).
        self.overrides: list[IntervalOverride] = list(overrides)
        self.plugins = IntervalPlugins(self.overrides, (INTERVAL_MIN, INTERVAL_MAX))
        #: Peers (public keys) whose keepalive interval this policy chooses.
        self.auto: set[bytes] = set()
        self.nat = NatState()
        self.decisions: dict[bytes, _Decision] = {}
        self.observations: dict[bytes, Endpoint] = {}
        #: Per member: ``data_packets`` at the latest path check, and since when unchanged.
        self._path_marks: dict[bytes, tuple[int, float]] = {}
        self.counters: dict[str, int] = {}
        self.carrier: bytes | None = None
        #: Measuring our NAT's lifetime with a helper peer.
        self.measurement = LifetimeMeasurement(
            device,
            agent,
            self.nat,
            paths,
            new_token=lambda: self.random(TOKEN_SIZE),
            wanted=self._wants_measurement,
            pick_helper=self._pick_helper,
            measured=self._measured,
            count=self._count,
            event=self._event,
        )
        #: The helper side: answering other nodes' probes.
        self.probe_helper = ProbeHelper(device, agent, self._count)
        #: The filtering check (whether other peers may go without their own keepalive).
        self.filtering = FilteringCheck(
            device,
            agent,
            self.nat,
            new_token=lambda: self.random(TOKEN_SIZE),
            candidate=self._filter_peer,
            wanted=self._filter_wanted,
            measurement_blocks=self._measurement_blocks,
            changed=self.update,
            count=self._count,
            event=self._event,
        )
        #: The self-check of the tunnel's own mapping, both sides (``self_check.enabled``).
        self.self_check = SelfCheck(
            device,
            agent,
            new_token=lambda: self.random(TOKEN_SIZE),
            keepalive_peer=self._self_check_peer,
            measurement_blocks=self._measurement_blocks,
            evidence_of_expiry=self._self_check_expired,
            answer_allowed=self.probe_helper.answer_allowed,
            count=self._count,
        )
        #: Acknowledged keepalives (both sides). Its timers run after the self-check's, which
        #: may take the same keepalive slot first.
        self.acks = KeepaliveAcks(
            device, agent, managed=lambda: sorted(self.auto), changed=self.update, count=self._count
        )
        agent.slot_listeners.append(self.acks.watch)
        agent.observed_listeners.append(self._observed)
        device.set_unknown_datagram_handler(self.datagram_received)

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
        self.acks.forget(key)

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
            if not same_host(previous, observed):
                self._event(f"public address changed {previous[0]} -> {observed[0]}: re-measure")
                self._restart_measurement(now, "public address changed")
            else:
                self._evidence_of_expiry(
                    now, f"{peer.short_name} saw our port change {previous[1]} -> {observed[1]}"
                )
        self.update(now)

    def _evidence_of_expiry(self, now: float, why: str) -> None:
        """A mapping of ours expired: halve the interval now, and measure again."""
        current = self.node_interval(acked=self._any_acked()).interval
        shrunk = max(INTERVAL_MIN, current // 2)
        self.nat.shrunk = shrunk if self.nat.shrunk is None else min(self.nat.shrunk, shrunk)
        self.nat.shrink_reason = f"mapping expired ({why})"
        self._count("expiry_evidence")
        self._event(f"mapping expired ({why}): interval {current} -> {self.nat.shrunk} s")
        self.measurement.measure_soon(now)

    def _restart_measurement(self, now: float, why: str) -> None:
        self.measurement.restart(now, why)
        # Another NAT (or router): its filtering is not known either.
        self.filtering.forget(f"pending ({why})")

    @property
    def helper(self) -> bytes | None:
        """The peer our latest lifetime measurement ran with."""
        return self.measurement.helper

    @property
    def results(self) -> list[tuple[float, bool]]:
        """Completed probes as (delay, alive), newest last."""
        return self.measurement.results

    # ------------------------------------------------------------------ decisions

    def node_interval(self, *, acked: bool = False) -> _Decision:
        """The interval a NATed path needs, with its reason (``acked``: toward a peer that
        answers keepalives)."""
        nat = self.nat
        if nat.lifetime is None:
            interval = DEFAULT_INTERVAL
            reason = f"conservative default until the NAT is measured ({nat.measurement})"
        elif nat.lifetime <= 0:
            interval = INTERVAL_MIN
            reason = f"NAT lifetime below {LIFETIME_LADDER[0]:g} s: minimum interval"
        else:
            interval = interval_for(nat.lifetime, acked=acked)
            bound = "at least " if nat.lifetime_at_least else ""
            measured = f"the measured NAT lifetime ({bound}{nat.lifetime:g} s)"
            if interval > interval_for(nat.lifetime):
                fraction = f"{interval / nat.lifetime:.2f}".rstrip("0")
                reason = f"{fraction} of {measured}, keepalives acknowledged"
            else:
                reason = f"half {measured}"
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
        """Auto's interval for one peer. A meshguard peer other than the carrier goes without
        its own keepalive only once the filtering check showed the NAT admits remotes we did
        not send to lately (or while that very check runs with it): an endpoint-independent
        mapping keeps the port, but address/port-dependent filtering would still drop the
        peer's packets, and configured peers get no hole punching from the mesh."""
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
            nat = self.nat
            short = self.device.peers[self.carrier].short_name
            if nat.filtering == FILTER_OPEN:
                return _Decision(
                    0,
                    f"endpoint-independent NAT: the keepalive to {short} keeps it"
                    f" (filtering checked with {nat.filtering_peer})",
                )
            if self.filtering.checking(key):
                return _Decision(
                    0,
                    f"filtering check in progress: no keepalive until it ends ({short} keeps"
                    " the mapping)",
                )
            own = self.node_interval(acked=self.acks.capable(peer))
            if nat.filtering == FILTER_CLOSED:
                why = "filtering admits only peers we sent to"
            else:
                why = "filtering not known to admit other peers"
            return _Decision(own.interval, f"own keepalive: {why}; {own.reason}")
        return self.node_interval(acked=self.acks.capable(peer))

    def path_check_interval(self, peer: Peer, now: float) -> float | None:
        """How often an idle pair's direct path is checked (mesh/paths.py pings it), or None
        while it is not idle: the keepalive interval a path through our NAT needs (its ping
        is answered, like an acknowledged keepalive), so the pings keep the punched mapping
        open and cost no more than a keepalive would. Idle: no data either way for
        PATH_IDLE_AFTER seconds."""
        key = peer.public_key
        if len(self._path_marks) > 2 * len(self.device.peers) + 16:
            self._path_marks = {k: m for k, m in self._path_marks.items() if k in self.device.peers}
        mark = self._path_marks.get(key)
        if mark is None or mark[0] != peer.data_packets:
            self._path_marks[key] = (peer.data_packets, now)
            return None
        if now - mark[1] < PATH_IDLE_AFTER:
            return None
        if self.nat.natted is False:
            return float(INTERVAL_MAX)
        return float(self.node_interval(acked=True).interval)

    def _any_acked(self) -> bool:
        """Whether some auto peer answers keepalives (its interval is the longer one)."""
        return any(
            (peer := self.device.peers.get(key)) is not None and self.acks.capable(peer)
            for key in self.auto
        )

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
        self.measurement.maybe_start(now)
        self.filtering.schedule(now)
        self.self_check.schedule(now)

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
        """Auto's choice, or a keepalive plugin's (see :class:`IntervalPlugins`)."""
        return self.plugins.consult(peer.public_key, chosen, lambda: self._facts(peer, chosen))

    @property
    def plugin_errors(self) -> int:
        """Plugin calls that raised or answered garbage (ignored)."""
        return self.plugins.errors

    @property
    def plugin_error(self) -> str:
        """The latest such call."""
        return self.plugins.error

    # ------------------------------------------------------------ measuring: whether, with whom

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

    def _measured(self, now: float) -> None:
        """A new lifetime: the filtering check's delay is known now, the intervals follow."""
        self.filtering.measured()
        self.update(now)

    def path_datagram_received(
        self, token: bytes, data: bytes, source: Endpoint, now: float
    ) -> None:
        """A datagram on a secondary socket (see :class:`LifetimeMeasurement`)."""
        self.measurement.path_datagram_received(token, data, source, now)

    # ------------------------------------------------------------------ control messages

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        if kind == kinds.KEEPALIVE_REQUEST:
            self.acks.control_received(peer, kind, body, now)
            return
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
        if kind == kinds.NAT_PROBE_REQUEST and "x" in message:
            self.probe_helper.cancelled(peer, message.get("x"))
        elif kind == kinds.NAT_PROBE_REQUEST:
            self.probe_helper.requested(peer, token, message.get("d"), now)
        elif kind == kinds.NAT_PROBE_RESULT:
            self.measurement.result(peer, token, message, now)
        elif kind == kinds.NAT_SELF_CHECK:
            self.self_check.request_received(peer, token, message.get("d"), now)
        elif self.filtering.owns(token):
            self.filtering.ack(peer, message, now)
        else:
            self.self_check.ack_received(peer, token, message, now)

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> None:
        """A non-WireGuard datagram on our port: a token a peer told us about, or garbage."""
        if len(data) == DATAGRAM_SIZE and data[:4] == CHECK_MAGIC:
            if self.filtering.owns(data[4:]):
                self.filtering.reply(source, now)
            else:
                self.self_check.reply_received(data[4:], source, now)
            return
        self.probe_helper.datagram_received(data, source, now)

    # ------------------------------------------------------------------ filtering check

    def _filter_peer(self) -> Peer | None:
        """The peer to check filtering with: an auto meshguard peer other than the carrier,
        reached directly through the NAT (the late reply must cross our tunnel's mapping)."""
        for key in sorted(self.auto):
            peer = self.device.peers.get(key)
            if (
                key != self.carrier
                and peer is not None
                and peer.is_meshguard
                and key in self.observations
                and self._path_natted(key) is True
                and peer.endpoint is not None
                and peer.sends_over_udp
            ):
                return peer
        return None

    def _filter_wanted(self) -> bool:
        """Only a carrier question needs the check: an endpoint-independent mapping, a carrier
        with a keepalive in force (it keeps the port during the check) and another peer."""
        carrier = self.device.peers.get(self.carrier) if self.carrier is not None else None
        return (
            self.nat.mapping == "endpoint-independent"
            and carrier is not None
            and carrier.persistent_keepalive > 0
            and self._filter_peer() is not None
        )

    # ------------------------------------------------------------------ self-check seam

    def _self_check_peer(self) -> Peer | None:
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
                or not peer.sends_over_udp
            ):
                continue
            candidates.append(peer)
        for preferred in (self.carrier, self.helper):
            for peer in candidates:
                if peer.public_key == preferred:
                    return peer
        return candidates[0] if candidates else None

    def _measurement_blocks(self, peer: Peer, now: float) -> tuple[str, float] | None:
        """Why our lifetime measurement keeps a self-check with ``peer`` from starting now, and
        when to look again (None: it does not)."""
        if self.measurement.busy():
            return "waiting for the NAT measurement to end", now + CHECK_RETRY
        busy_until = self.measurement.helper_busy_until(now)
        if peer.public_key == self.helper and now < busy_until:
            # Its reports on our probe tokens would cross the tunnel in the middle.
            return "waiting for the last probe reports", busy_until
        return None

    def _self_check_expired(self, now: float, why: str) -> None:
        """Self-checks missed in a row: evidence of expiry, like a peer seeing our port change."""
        self._evidence_of_expiry(now, why)
        self.update(now)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        deadlines: list[float] = []
        if (measuring := self.measurement.next_deadline()) is not None:
            deadlines.append(measuring)
        if (help := self.probe_helper.next_deadline()) is not None:
            deadlines.append(help)
        if (check := self.self_check.next_deadline()) is not None:
            deadlines.append(check)
        if (ack := self.acks.next_deadline()) is not None:
            deadlines.append(ack)
        if (filtering := self.filtering.next_deadline()) is not None:
            deadlines.append(filtering)
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        self.probe_helper.run_timers(now)
        self.measurement.run_timers(now)
        self.filtering.run_timers(now)
        self.self_check.run_timers(now)
        self.acks.run_timers(now)

    # ------------------------------------------------------------------ mesh feature hooks

    def session_started(self, peer: Peer, now: float) -> None:
        self.update(now)
        self.self_check.session_started(peer, now)

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
            status.update(self.self_check.peer_status(key))
            status.update(self.acks.peer_status(peer))
            return status
        interval = peer.persistent_keepalive
        reason = "configured" if interval else "off (not configured)"
        return {
            "keepalive": f"{interval or 'off'} ({reason})",
            "keepalive_interval": interval,
            "keepalive_reason": reason,
            "keepalive_auto": False,
        }

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
            decision = (
                self.node_interval(acked=self._any_acked())
                if nat.natted
                else _Decision(0, "not behind a NAT")
            )
            if nat.natted is None:
                decision = _Decision(DEFAULT_INTERVAL, "NAT unknown: conservative default")
            status["keepalive_interval"] = decision.interval
            status["keepalive_reason"] = decision.reason
            if self.carrier is not None and self.carrier in self.device.peers:
                status["keepalive_carrier"] = self.device.peers[self.carrier].short_name
            status["nat_filtering"] = self.filtering.text()
            if nat.filtering_at is not None:
                status["nat_filtering_at"] = nat.filtering_at
            status["nat_filtering_check"] = nat.filtering_state
        if self.overrides:
            status["keepalive_plugins"] = self.plugins.names()
        if self.plugin_errors:
            status["keepalive_plugin_errors"] = self.plugin_errors
            status["keepalive_plugin_error"] = self.plugin_error
        status.update(self.self_check.node_status())
        if nat.events:
            status["nat_events"] = list(nat.events)
        if self.counters:
            status["nat_probe_counters"] = dict(sorted(self.counters.items()))
        return status
