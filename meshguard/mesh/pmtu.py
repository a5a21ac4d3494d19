"""Path MTU discovery per meshguard peer, and what the node does with packets that do not fit.

Where a middlebox drops ICMP "fragmentation needed", a tunnel with a fixed MTU carries small
packets and silently loses big ones: the login works and the transfer hangs. So each node
measures, per peer, how large a WireGuard datagram reaches that peer, with probes sent with the
Don't-Fragment bit: control messages padded to a chosen size. The peer acknowledges each probe,
so an acknowledged size passed the whole path; an unanswered one was too big or lost.

Sizes are counted as the probe's WireGuard *plaintext* (the inner packet it stands for), always a
multiple of 16: WireGuard pads inner packets to 16 bytes, so an inner packet of ``n`` bytes
costs ``roundup16(n)`` on the wire, and the largest safe inner MTU is a multiple of 16 anyway.
The outer path MTU is that plus 32 (WireGuard) + 8 (UDP) + 20 or 40 (IP).

Search (per peer, when a session starts or the endpoint changes): the upper bound comes from the
local route toward the endpoint (``IP_MTU`` of a connected socket), so the first round probes
that guess, the IPv6-minimum "safe" size and one in between; when the guess is right it is
confirmed by the first acknowledgement. Later rounds probe the quarter points of the open
interval. Each size goes out twice per round, so one lost datagram does not pass for "too big";
a size is concluded too big when neither copy is answered within the probe timeout (4 RTTs,
0.2-2 s). A round ends early once the largest probe is answered. EMSGSIZE from the local stack
is conclusive at once. Typical convergence: one round trip when the guess is right, two
timeouts otherwise.

Steady state: every ``RECHECK_INTERVAL`` one probe of the current size and one 16 bytes larger
(when the route allows larger). The larger one answered: the path grew, search again upward.
The current size unanswered three times in a row (retried each second): the path shrank, search
again from scratch (the lower bound is reset too, tinc's pitfall). Until a search converges the
enforced MTU stays as it was: a half-finished search would teach the kernel and TCP a size
that is too small, and they keep it for minutes.

Toward a stock WireGuard peer (no control channel) the probes are ICMP echo requests of the
chosen size, sent through the tunnel to the peer's tunnel address (a host route in its
AllowedIPs) from our interface address, sealed as data and sent with DF. The peer's host answers
with a reply of the same size, which the device hands back here before it reaches the TUN
device (:meth:`PathMTUDiscovery.echo_reply`); the search is the same. A reply proves the size
passed both ways, so the result is the smaller of both directions (and of the peer's interface
MTU).

Results go to ``peer.inner_mtu`` (the device sends oversize TUN packets here, see
:meth:`PathMTUDiscovery.too_big`) and ``peer.mss_mtu`` (the smaller of both directions' inner
MTUs: the peer reports its own result in every acknowledgement, and SYNs both ways are clamped
to it).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard.core.device import Device
from meshguard.core.icmp import echo_request, frag_needed_v4, fragment_ipv4, packet_too_big_v6
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh import kinds

#: WireGuard transport header + tag.
WG_OVERHEAD: Final = 32
#: Outer IP + UDP header bytes.
IP_UDP4: Final = 28
IP_UDP6: Final = 48
#: Route MTU assumed when the local stack cannot tell.
DEFAULT_ROUTE_MTU: Final = 1500
#: Steady-state re-check period, and the retry period after an unanswered re-check.
RECHECK_INTERVAL: Final = 30.0
RECHECK_RETRY: Final = 1.0
#: How often a steady peer's endpoint is compared with the measured one (roaming).
ROAM_POLL: Final = 5.0
#: Unanswered re-checks in a row that mean the path shrank.
SHRINK_MISSES: Final = 3
#: Probe timeout bounds and the value used before any round trip was measured.
TIMEOUT_MIN: Final = 0.2
TIMEOUT_MAX: Final = 2.0
TIMEOUT_INITIAL: Final = 1.0
#: Copies of each probe per round (loss tolerance).
COPIES: Final = 2
#: Smallest plaintext size probed (outer 576 for IPv4): below it we conclude probing failed.
MIN_SIZE: Final = 512
#: A failed or paused search is tried again after this long.
RETRY_AFTER: Final = 30.0
#: A guessed echo target (a stock peer without a host route) that never answered is tried again
#: this rarely.
GUESS_RETRY_AFTER: Final = 600.0
#: Retry when no session can carry a probe (an idle tunnel has none; probing waits for one).
NO_SESSION_RETRY: Final = 10.0

#: How long after a handshake a peer not (yet) known as meshguard is left to say hello before
#: it is probed with ICMP echo as a stock WireGuard peer.
STOCK_GRACE: Final = 2.0
#: Marks our echo probes' payload (after the identifier the device matches), then the sequence.
ECHO_MAGIC: Final = b"mgPM"

_PROBE: Final = struct.Struct("!I")
_ACK: Final = struct.Struct("!III")
_CONTROL_HEADER: Final = 5

#: How probes travel: mesh control messages, or ICMP echo through the tunnel (stock peers).
VIA_CONTROL: Final = "control"
VIA_ECHO: Final = "echo"

SEARCH: Final = "searching"
STEADY: Final = "steady"
FAILED: Final = "failed"


def ip_udp_overhead(endpoint: Endpoint | None) -> int:
    return IP_UDP6 if endpoint is not None and ":" in endpoint[0] else IP_UDP4


def inner_for_route(route_mtu: int, endpoint: Endpoint | None) -> int:
    """The largest 16-aligned plaintext a datagram to ``endpoint`` can carry under ``route_mtu``."""
    return max(0, route_mtu - ip_udp_overhead(endpoint) - WG_OVERHEAD) & ~15


@dataclass
class PeerPMTU:
    """Discovery state toward one peer."""

    endpoint: Endpoint | None = None
    state: str = SEARCH
    #: Largest size acknowledged in this search (0: none yet).
    low: int = 0
    #: Smallest size known too big (exclusive upper bound).
    high: int = 0
    #: Sizes the route allows (16-aligned plaintext).
    ceiling: int = 0
    #: seq -> (size, sent at) for probes awaiting an answer.
    outstanding: dict[int, tuple[int, float]] = field(default_factory=dict)
    deadline: float | None = None
    round: int = 0
    #: The result in force (0: none): what ``peer.inner_mtu`` was set to.
    mtu: int = 0
    method: str | None = None
    #: The peer's inner MTU toward us, from its acknowledgements (0: unknown).
    reverse: int = 0
    misses: int = 0
    check_sent: bool = False
    recheck_at: float = 0.0
    check_time: float = 0.0
    check_acked: bool = False
    started: float = 0.0
    converged_in: float | None = None
    probes: int = 0
    search_probes: int = 0
    searches: int = 0
    rtt: float | None = None
    #: ``peer.data_packets`` at the last re-check (re-checks are skipped while idle).
    data_mark: int = -1
    via: str = VIA_CONTROL


IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class PathMTUDiscovery:
    """The path MTU feature of the mesh agent (see the module docstring)."""

    kinds: tuple[int, ...] = (kinds.PMTU_PROBE, kinds.PMTU_ACK)

    def __init__(
        self,
        device: Device,
        *,
        route_mtu: Callable[[Endpoint], int | None] = lambda endpoint: None,
        on_change: Callable[[Peer, int], None] | None = None,
        mark_dirty: Callable[[], None] | None = None,
        local_addresses: Callable[[], Sequence[IPInterface]] = list,
    ) -> None:
        self.device = device
        self.route_mtu = route_mtu
        self.on_change = on_change
        self.mark_dirty = mark_dirty
        #: Our interface addresses: the source of echo probes toward stock peers.
        self.local_addresses = local_addresses
        self.peers: dict[bytes, PeerPMTU] = {}
        self._seq = 0
        #: Oversize TUN packets answered with ICMP, fragmented, or dropped.
        self.icmp_sent = 0
        self.fragmented = 0
        self.too_big_dropped = 0
        device.set_too_big_handler(self.too_big)
        #: Echo probes carry this identifier; the device hands replies with it to us.
        self.echo_ident = device.random(2)
        device.set_echo_handler(self.echo_ident, self.echo_reply)
        device.add_handshake_listener(self._handshake)

    # ------------------------------------------------------------------ enforcement

    def too_big(self, peer: Peer, packet: bytes, now: float) -> None:
        """A TUN packet larger than ``peer.inner_mtu``: tell its sender, or fragment it."""
        mtu = peer.inner_mtu
        if packet[0] >> 4 == 4 and not packet[6] & 0x40:
            fragments = fragment_ipv4(packet, mtu)
            if not fragments:
                self.too_big_dropped += 1
                return
            for fragment in fragments:
                self.device.send_data(peer, fragment, now)
            self.fragmented += 1
            return
        error = (
            frag_needed_v4(packet, mtu) if packet[0] >> 4 == 4 else packet_too_big_v6(packet, mtu)
        )
        if error is None:
            self.too_big_dropped += 1
            return
        self.icmp_sent += 1
        self.device.io.write_packet(error)

    # ------------------------------------------------------------------ feature protocol

    def _state(self, peer: Peer) -> PeerPMTU:
        state = self.peers.get(peer.public_key)
        if state is None:
            state = self.peers[peer.public_key] = PeerPMTU()
        return state

    def session_started(self, peer: Peer, now: float) -> None:
        """Every new session (rekeys included): search unless this endpoint is measured."""
        state = self._state(peer)
        if state.endpoint == peer.endpoint and state.state == STEADY:
            return
        self.start(peer, now)

    def _handshake(self, peer: Peer) -> None:
        """A session with a peer not known as meshguard: unless it says hello within
        ``STOCK_GRACE`` (then ``session_started`` takes over), probe it with ICMP echo."""
        target = None if peer.is_meshguard else self.echo_target(peer)
        if target is None:
            return
        state = self._state(peer)
        if state.endpoint == peer.endpoint and state.searches and state.state != FAILED:
            return  # a rekey: the measurement (or the search under way) still holds
        if (
            state.state == FAILED
            and target[2]
            and state.deadline is not None
            and peer.last_handshake_time < state.deadline
        ):
            return  # a guess nobody answered: not again before its retry time
        self.start(peer, peer.last_handshake_time)
        state.started = state.deadline = peer.last_handshake_time + STOCK_GRACE

    def echo_addresses(self, peer: Peer) -> tuple[bytes, bytes] | None:
        """(our address, the peer's tunnel address) for echo probes, or None (see
        :meth:`echo_target`)."""
        target = self.echo_target(peer)
        return None if target is None else (target[0], target[1])

    def echo_target(self, peer: Peer) -> tuple[bytes, bytes, bool] | None:
        """(our address, where to send echo, whether that is a guess), or None.

        First the peer's first host route (/32, /128) in its AllowedIPs of a family we have an
        interface address in, IPv4 first. Without one (a stock peer that is the gateway of a
        whole subnet, or of everything), a guess: the first host of our own interface's subnet
        (where the hub of a tunnel subnet usually sits), then of each of the peer's networks
        (/8../30, /16../126), provided it routes to this peer and is not one of our addresses.
        A guess that never answers costs one failed search and then one more every
        :data:`GUESS_RETRY_AFTER` seconds; until one answers, the route MTU is shown.
        """
        local = list(self.local_addresses())
        ours: dict[int, bytes] = {a.version: a.ip.packed for a in reversed(local)}
        networks = self.device.allowed_ips.networks(peer)
        for version in (4, 6):
            source = ours.get(version)
            if source is None:
                continue
            for network in networks:
                if network.version == version and network.num_addresses == 1:
                    return source, network.network_address.packed, False
        own = {a.ip.packed for a in local}
        for version in (4, 6):
            source = ours.get(version)
            if source is None:
                continue
            shortest, longest = (8, 30) if version == 4 else (16, 126)
            candidates = [a.network for a in local if a.version == version]
            candidates += [n for n in networks if n.version == version]
            for network in candidates:
                if not shortest <= network.prefixlen <= longest:
                    continue
                guess = (network.network_address + 1).packed
                if guess not in own and self.device.allowed_ips.lookup(guess) is peer:
                    return source, guess, True
        return None

    def start(self, peer: Peer, now: float, *, keep_low: int = 0, high: int | None = None) -> None:
        """(Re)start the search toward ``peer``'s current endpoint."""
        state = self._state(peer)
        state.via = VIA_CONTROL if peer.is_meshguard else VIA_ECHO
        if state.endpoint != peer.endpoint:
            state.rtt = None
        state.endpoint = peer.endpoint
        state.ceiling = self._ceiling(peer)
        state.state = SEARCH
        state.low = keep_low
        state.high = min(high if high is not None else state.ceiling + 16, state.ceiling + 16)
        state.outstanding.clear()
        state.round = 0
        state.started = now
        state.search_probes = 0
        state.searches += 1
        state.deadline = now
        self._dirty()

    def _ceiling(self, peer: Peer) -> int:
        route = self.route_mtu(peer.endpoint) if peer.endpoint is not None else None
        return inner_for_route(route or DEFAULT_ROUTE_MTU, peer.endpoint)

    def _dirty(self) -> None:
        if self.mark_dirty is not None:
            self.mark_dirty()

    def next_deadline(self) -> float | None:
        deadlines = [s.deadline for s in self.peers.values() if s.deadline is not None]
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for key, state in list(self.peers.items()):
            peer = self.device.peers.get(key)
            if peer is None:
                del self.peers[key]
                continue
            if state.deadline is None or state.deadline > now:
                continue
            if peer.endpoint != state.endpoint and peer.endpoint is not None:
                self.start(peer, now)  # roamed: the old measurement says nothing
            elif state.via == VIA_ECHO and peer.is_meshguard:
                self.start(peer, now)  # it turned out to be a meshguard node
            if state.state == SEARCH:
                self._search_round(peer, state, now)
            elif state.state == STEADY:
                if now >= state.recheck_at or state.check_sent:
                    self._recheck(peer, state, now)
                else:
                    state.deadline = min(state.recheck_at, now + ROAM_POLL)
            else:
                self.start(peer, now)
                self._search_round(peer, state, now)

    def _timeout(self, state: PeerPMTU) -> float:
        if state.rtt is None:
            return TIMEOUT_INITIAL
        return max(TIMEOUT_MIN, min(TIMEOUT_MAX, 4 * state.rtt))

    # ------------------------------------------------------------------ search

    def _candidates(self, state: PeerPMTU) -> list[int]:
        low, high = state.low, state.high
        if state.round == 0:
            safe = inner_for_route(1280, state.endpoint)
            points = [high - 16, (max(safe, low) + high) // 2, max(safe, low + 16)]
        else:
            points = [low + (high - low) * k // 4 for k in (3, 2, 1)]
        sizes: list[int] = []
        for point in points:
            size = max(point & ~15, MIN_SIZE)
            if low < size < high and size not in sizes:
                sizes.append(size)
        return sizes

    def _search_round(self, peer: Peer, state: PeerPMTU, now: float) -> None:
        # Whatever is still unanswered from the last round was too big (both copies lost).
        for size, _sent in state.outstanding.values():
            if size > state.low:
                state.high = min(state.high, size)
        state.outstanding.clear()
        sizes = self._candidates(state)
        if not sizes:
            self._converged(peer, state, now)
            return
        state.round += 1
        for size in sizes:
            for _ in range(COPIES):
                result = self._send_probe(peer, state, size, now)
                if result is None:
                    state.outstanding.clear()
                    state.round -= 1
                    state.deadline = now + NO_SESSION_RETRY
                    return
                if result is False:
                    state.high = min(state.high, size)
                    break
        if not state.outstanding:
            state.deadline = now  # all refused locally: next round at once
            self._search_round(peer, state, now)
            return
        state.deadline = now + self._timeout(state)

    def _send_probe(self, peer: Peer, state: PeerPMTU, size: int, now: float) -> bool | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        result: bool | None
        if state.via == VIA_ECHO:
            addresses = self.echo_addresses(peer)
            if addresses is None:
                return None
            source, destination = addresses
            header = 28 if len(source) == 4 else 48
            payload = ECHO_MAGIC + _PROBE.pack(self._seq)
            payload += bytes(size - header - len(payload))
            packet = echo_request(source, destination, int.from_bytes(self.echo_ident), payload)
            result = self.device.send_packet_probe(peer, packet, now)
        else:
            body = _PROBE.pack(self._seq) + bytes(size - _CONTROL_HEADER - _PROBE.size)
            result = self.device.send_probe(peer, kinds.PMTU_PROBE, body, now)
        if result:
            state.outstanding[self._seq] = (size, now)
            state.probes += 1
            state.search_probes += 1
        return result

    def _converged(self, peer: Peer, state: PeerPMTU, now: float) -> None:
        if state.low < MIN_SIZE:
            # Nothing got through: the peer is gone or UDP is filtered, not an MTU question
            # (or, for a guessed echo target, nobody there answers pings).
            state.state = FAILED
            target = self.echo_target(peer) if state.via == VIA_ECHO else None
            guessed = target is not None and target[2]
            state.deadline = now + (GUESS_RETRY_AFTER if guessed else RETRY_AFTER)
            return
        state.state = STEADY
        state.converged_in = now - state.started
        state.misses = 0
        state.check_sent = False
        self._next_check(state, now, RECHECK_INTERVAL)
        self._apply(peer, state, state.low, "icmp-echo" if state.via == VIA_ECHO else "probe")

    def _apply(self, peer: Peer, state: PeerPMTU, mtu: int, method: str) -> None:
        state.method = method
        changed = mtu != state.mtu
        state.mtu = mtu
        peer.inner_mtu = mtu
        peer.mss_mtu = min(mtu, state.reverse) if state.reverse else mtu
        if changed and self.on_change is not None:
            self.on_change(peer, mtu)

    # ------------------------------------------------------------------ steady state

    def _recheck(self, peer: Peer, state: PeerPMTU, now: float) -> None:
        if state.check_sent:
            state.check_sent = False
            if state.check_acked:
                state.misses = 0
                self._next_check(state, now, state.check_time + RECHECK_INTERVAL - now)
            else:
                state.misses += 1
                if state.misses >= SHRINK_MISSES:
                    # The path shrank: search from scratch below the size that stopped passing.
                    self.start(peer, now, high=state.mtu)
                    self._search_round(peer, state, now)
                    return
                self._next_check(state, now, RECHECK_RETRY)
            state.outstanding.clear()
            return
        if state.misses == 0 and peer.data_packets == state.data_mark:
            # Idle since the last check: the path's size matters to nobody, and a probe would
            # only keep the NAT mapping and the peer awake (keepalive = auto relies on quiet).
            self._next_check(state, now, RECHECK_INTERVAL)
            return
        state.data_mark = peer.data_packets
        state.ceiling = self._ceiling(peer)
        sizes = [state.mtu]
        if state.mtu + 16 <= state.ceiling:
            sizes.append(state.mtu + 16)
        state.check_acked = False
        state.outstanding.clear()
        for size in sizes:
            result = self._send_probe(peer, state, size, now)
            if result is None:
                state.deadline = now + NO_SESSION_RETRY
                state.outstanding.clear()
                return
            if result is False and size == state.mtu:
                # The local route itself shrank below our size.
                self.start(peer, now, high=size)
                self._search_round(peer, state, now)
                return
        state.check_sent = True
        state.check_time = now
        state.deadline = now + self._timeout(state)

    def _next_check(self, state: PeerPMTU, now: float, delay: float) -> None:
        state.recheck_at = now + delay
        state.deadline = now + min(delay, ROAM_POLL)

    # ------------------------------------------------------------------ messages

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        if kind == kinds.PMTU_PROBE:
            if len(body) < _PROBE.size:
                return
            (seq,) = _PROBE.unpack_from(body)
            state = self.peers.get(peer.public_key)
            ours = state.mtu if state is not None else 0
            received = _CONTROL_HEADER + len(body)
            self.device.send_control(peer, kinds.PMTU_ACK, _ACK.pack(seq, received, ours), now)
            return
        if kind != kinds.PMTU_ACK or len(body) < _ACK.size:
            return
        seq, received, reverse = _ACK.unpack_from(body)
        self._answered(peer, seq, received, reverse, now)

    def echo_reply(self, peer: Peer, packet: bytes, now: float) -> bool:
        """An ICMP echo reply with our identifier from ``peer`` (the device's receive path):
        True when it answers one of our probes (it is then not written to the TUN device)."""
        if packet[0] == 0x45:
            if packet[20:21] != b"\x00" or packet[6] & 0x3F or packet[7]:
                return False  # not an echo reply, or a fragment
            offset = 28
        elif packet[0] >> 4 == 6 and packet[40:41] == b"\x81":
            offset = 48
        else:
            return False
        if packet[offset : offset + 4] != ECHO_MAGIC or len(packet) < offset + 8:
            return False
        (seq,) = _PROBE.unpack_from(packet, offset + 4)
        self._answered(peer, seq, len(packet), None, now)
        return True

    def _answered(
        self, peer: Peer, seq: int, received: int, reverse: int | None, now: float
    ) -> None:
        """Probe ``seq`` arrived with ``received`` bytes; ``reverse``: the peer's own result
        (None: unknown, as from an echo reply)."""
        state = self.peers.get(peer.public_key)
        if state is None:
            return
        probe = state.outstanding.pop(seq, None)
        if probe is None:
            return
        size, sent = probe
        if received != size:
            return  # a probe that was cut short proves nothing
        state.rtt = now - sent if state.rtt is None else 0.875 * state.rtt + 0.125 * (now - sent)
        if reverse is not None and reverse != state.reverse:
            state.reverse = reverse
            if state.mtu:
                peer.mss_mtu = min(state.mtu, reverse) if reverse else state.mtu
        if state.state == SEARCH:
            if size > state.low:
                state.low = size
            if not any(s > state.low for s, _ in state.outstanding.values()):
                # The largest probe of this round got through: go on without waiting.
                state.outstanding.clear()
                state.deadline = now
                self._dirty()
        elif state.state == STEADY:
            if size == state.mtu:
                state.check_acked = True
            elif size > state.mtu:
                # The path grew: search upward from what just passed.
                self.start(peer, now, keep_low=size)

    # ------------------------------------------------------------------ status

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        state = self.peers.get(peer.public_key)
        if state is None or not state.mtu:
            if peer.is_meshguard or peer.endpoint is None:
                return {
                    "path_mtu": None,
                    "path_mtu_source": None,
                    "pmtu_state": state.state if state is not None else None,
                }
            # A stock WireGuard peer not (yet) measured with echo: the local route's MTU.
            route = self.route_mtu(peer.endpoint)
            return {
                "path_mtu": route,
                "path_mtu_source": "route" if route else None,
                "pmtu_state": state.state if state is not None else None,
            }
        overhead = ip_udp_overhead(state.endpoint) + WG_OVERHEAD
        echo: dict[str, Any] = {}
        if state.via == VIA_ECHO and (target := self.echo_target(peer)) is not None:
            echo["pmtu_echo_target"] = str(ipaddress.ip_address(target[1]))
            echo["pmtu_echo_target_guessed"] = target[2]
        return echo | {
            "path_mtu": state.mtu + overhead,
            "path_mtu_source": state.method,
            "tunnel_mtu": state.mtu,
            "tunnel_mtu_reverse": state.reverse or None,
            "pmtu_state": state.state,
            "pmtu_probes": state.probes,
            "pmtu_converged_in": round(state.converged_in, 3)
            if state.converged_in is not None
            else None,
        }

    def node_status(self) -> dict[str, Any]:
        return {
            "pmtu_icmp_sent": self.icmp_sent,
            "pmtu_fragmented": self.fragmented,
            "pmtu_too_big_dropped": self.too_big_dropped,
        }
