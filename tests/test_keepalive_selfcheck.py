"""The self-check of the tunnel's own NAT mapping (``PersistentKeepalive = auto``), against the
simulated NATs of tests/test_keepalive.py (in memory, deterministic clock, no sleeping)."""

from __future__ import annotations

import ipaddress
import itertools
import math
import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh import keepalive as K
from meshguard.mesh import kinds
from meshguard.mesh import selfcheck as S
from meshguard.mesh.agent import encode_json
from meshguard.testing.memory import MemoryNAT, MemoryNetwork
from tests.packets import ipv4
from tests.test_keepalive import HOME, HOUR, HUB, PUBLIC, Member, Mesh

#: The NAT the home is measured behind: 110 s known alive, so a 55 s interval and a late
#: reply asked for after 55 - 5.5 = 49.5 s of idle.
LIFETIME = 120.0
INTERVAL = 55
DELAY = 49.5


def settled(lifetime: float = LIFETIME) -> Mesh:
    """A home behind a port-preserving NAT, its lifetime measured (half an hour)."""
    mesh = Mesh(lifetime, preserve_port=True)
    mesh.net.advance(30 * 60)
    return mesh


def run_until(mesh: Mesh, condition: Callable[[], bool], limit: float) -> float:
    """Advance second by second until ``condition()``; the simulated seconds it took."""
    start = mesh.net.now
    while not condition():
        if mesh.net.now - start > limit:
            raise AssertionError(f"not reached within {limit:g} s")
        mesh.net.advance(1.0)
    return mesh.net.now - start


def unreachable_seconds(mesh: Mesh, seconds: int) -> int:
    """Seconds (sampled each second) in which the hub could not reach the home's tunnel."""
    assert mesh.nat is not None
    dead = 0
    for _ in range(seconds):
        mesh.net.advance(1.0)
        if mesh.nat.mapped(HOME, HUB, mesh.net.now) is None:
            dead += 1
    return dead


def drop_first(mesh: Mesh, magic: bytes) -> list[int]:
    """Drop the first datagram starting with ``magic``; the list counts the drops."""
    dropped: list[int] = []

    def keep(data: bytes, source: Endpoint, destination: Endpoint) -> bool:
        if data[:4] == magic and not dropped:
            dropped.append(1)
            return False
        return True

    mesh.net.filters.append(keep)
    return dropped


class CheckTests(SynchronousTestCase):
    def test_nat_as_measured_checks_pass(self) -> None:
        """The NAT keeps what was measured: every self-check's reply arrives after 49.5 s of
        idle, none is void (both sides hold their HELLO back), the interval stays, and the
        checks cost two requests an hour."""
        mesh = settled()
        policy = mesh.policy
        peer = mesh.home.peer(mesh.hubs[0])
        self.assertEqual(peer.persistent_keepalive, INTERVAL)
        self.assertEqual(policy.self_check.checks.counts["ok"], 1)  # the one after the new interval
        requests = policy.counters["check_requests"]
        mesh.net.advance(3 * HOUR)
        counts = policy.self_check.checks.counts
        self.assertEqual(counts["ok"], 1 + 6)
        self.assertEqual((counts["missed"], counts["void"], counts["inconclusive"]), (0, 0, 0))
        self.assertEqual(policy.counters["check_requests"] - requests, 6)
        self.assertEqual(peer.persistent_keepalive, INTERVAL)
        self.assertEqual(policy.nat.events, ["measured NAT lifetime 110 s"])
        hub = mesh.hubs[0].policy
        self.assertEqual(hub.counters["check_help_accepted"], 7)
        self.assertEqual(hub.counters["check_replies_sent"], 7)
        text, _ = policy.self_check.checks.last[peer.public_key]
        self.assertEqual(text, f"ok: reply after {DELAY} s idle")

    def test_request_goes_instead_of_a_keepalive(self) -> None:
        """The request leaves at the keepalive's slot and re-arms its timer: over two idle
        hours with checks passing, the home never sends two datagrams closer than the
        interval (no request beside a keepalive, no HELLO, no key confirmation)."""
        mesh = settled()
        policy = mesh.policy
        requests = policy.counters["check_requests"]
        times: list[float] = []
        original = mesh.home.node.send_datagram

        def record(data: bytes, endpoint: Endpoint) -> None:
            times.append(mesh.net.now)
            original(data, endpoint)

        mesh.home.node.send_datagram = record  # type: ignore[method-assign]
        mesh.net.advance(2 * HOUR)
        self.assertEqual(policy.counters["check_requests"] - requests, 4)
        self.assertEqual(policy.self_check.checks.counts["missed"], 0)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertGreaterEqual(min(gaps), INTERVAL - S.CHECK_SLOT_SLACK - 0.5)
        self.assertLessEqual(len(times), math.ceil(2 * HOUR / INTERVAL) + 1)

    def test_short_interval_checks_pass(self) -> None:
        """A 30 s NAT (13 s interval): the reply is asked for after 13 - 1.3 s and arrives."""
        mesh = settled(30.0)
        mesh.net.advance(HOUR)
        peer = mesh.home.peer(mesh.hubs[0])
        self.assertEqual(peer.persistent_keepalive, 13)
        self.assertGreaterEqual(mesh.policy.self_check.checks.counts["ok"], 3)
        self.assertEqual(mesh.policy.self_check.checks.counts["missed"], 0)
        self.assertEqual(
            mesh.policy.self_check.checks.last[peer.public_key][0], "ok: reply after 11.7 s idle"
        )

    def test_silent_lifetime_drop_halves_and_remeasures(self) -> None:
        """The NAT starts forgetting after 40 s and re-creates the mapping on the same port, so
        no peer sees a change. The next self-check and its confirmation miss: the interval is
        halved, the lifetime measured again (below 40 s), and the hub reaches the home through a
        whole idle hour again. Without self-checks the home stays unreachable 15 s in every
        55 (the control)."""
        mesh = settled()
        control = settled()
        control.policy.self_check.enabled = False
        for each in (mesh, control):
            assert each.nat is not None
            each.nat.lifetime = 40.0
        policy = mesh.policy
        took = run_until(
            mesh, lambda: policy.self_check.checks.expiries > 0, S.CHECK_EVERY + 5 * 60
        )
        self.assertEqual(policy.self_check.checks.counts["missed"], 2)
        expired = [e for e in policy.nat.events if "mapping expired" in e]
        self.assertEqual(
            expired,
            [
                f"mapping expired (self-check: reply after {DELAY} s idle did not arrive 2 times"
                f" in a row): interval {INTERVAL} -> {INTERVAL // 2} s"
            ],
        )
        self.assertFalse(any("port change" in e for e in policy.nat.events))
        run_until(mesh, lambda: policy.nat.measurement == "measured", 5 * 60)
        assert policy.nat.lifetime is not None
        self.assertLess(policy.nat.lifetime, 40.0)
        interval = mesh.home.peer(mesh.hubs[0]).persistent_keepalive
        self.assertEqual(interval, K.interval_for(policy.nat.lifetime))
        self.assertLess(interval, 20)
        self.assertLess(took, S.CHECK_EVERY)
        # Corrected: a whole idle hour without a gap, and the new interval checks out.
        ok = policy.self_check.checks.counts["ok"]
        self.assertEqual(unreachable_seconds(mesh, int(HOUR)), 0)
        self.assertTrue(mesh.hub_reaches_home())
        self.assertGreater(policy.self_check.checks.counts["ok"], ok)
        self.assertEqual(policy.self_check.checks.expiries, 1)
        # The control never notices, and loses the home in every interval.
        control.net.advance(took + 10 * 60)
        self.assertEqual(control.home.peer(control.hubs[0]).persistent_keepalive, INTERVAL)
        self.assertGreater(unreachable_seconds(control, 10 * 60), 10 * 15 - 30)

    def test_without_secondary_sockets_checks_walk_the_default_down(self) -> None:
        """No secondary sockets (no measurement possible) behind a 15 s NAT: the default 25 s
        is checked, misses twice and is halved to 12 s, which checks out, and the home stays
        reachable."""
        mesh = Mesh(15.0, preserve_port=True)
        mesh.policy.paths = None
        mesh.net.advance(10 * 60)
        policy = mesh.policy
        self.assertEqual(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 12)
        self.assertEqual(policy.self_check.checks.expiries, 1)
        self.assertGreaterEqual(policy.self_check.checks.counts["ok"], 1)
        self.assertEqual(policy.nat.lifetime, None)
        self.assertEqual(unreachable_seconds(mesh, int(HOUR)), 0)

    def test_traffic_during_a_check_voids_it(self) -> None:
        """The home sends a packet to the hub while a check waits for its reply (the NAT has
        meanwhile started forgetting after 40 s): the check is void, not a miss, and the next
        one waits ten minutes."""
        mesh = settled()
        policy = mesh.policy
        assert mesh.nat is not None
        mesh.nat.lifetime = 40.0
        run_until(mesh, lambda: policy.self_check._check is not None, S.CHECK_EVERY + 60)
        mesh.net.advance(20.0)
        hub = mesh.hubs[0]
        mesh.net.send(mesh.home.node, ipv4(mesh.home.address, hub.address, b"traffic"))
        run_until(mesh, lambda: policy.self_check._check is None, 60)
        self.assertEqual(policy.self_check.checks.counts["void"], 1)
        self.assertEqual(policy.self_check.checks.counts["missed"], 0)
        self.assertEqual(policy.self_check.checks.misses, 0)
        text, _ = policy.self_check.checks.last[hub.public]
        self.assertEqual(text, "void: we sent to the peer meanwhile")
        self.assertEqual(mesh.home.peer(hub).persistent_keepalive, INTERVAL)
        assert policy.self_check._check_due is not None
        self.assertLessEqual(
            abs(policy.self_check._check_due - mesh.net.now - S.CHECK_AFTER_VOID), 1
        )

    def test_one_lost_reply_does_not_halve(self) -> None:
        """Exactly one late reply is lost on the way: one miss, confirmed as fine by the next
        check ten seconds later; the interval stays."""
        mesh = settled()
        policy = mesh.policy
        dropped = drop_first(mesh, S.CHECK_MAGIC)
        run_until(mesh, lambda: policy.self_check.checks.counts["missed"] == 1, S.CHECK_EVERY + 60)
        self.assertEqual(dropped, [1])
        peer = mesh.home.peer(mesh.hubs[0])
        self.assertEqual(
            policy.self_check.checks.last[peer.public_key][0],
            f"missed 1: no reply after {DELAY} s idle",
        )
        self.assertEqual(
            policy.peer_status(peer)["keepalive_self_check"],
            f"missed 1: no reply after {DELAY} s idle",
        )
        ok = policy.self_check.checks.counts["ok"]
        run_until(mesh, lambda: policy.self_check.checks.counts["ok"] > ok, 5 * 60)
        self.assertEqual(policy.self_check.checks.misses, 0)
        mesh.net.advance(HOUR)
        self.assertEqual(policy.self_check.checks.counts["missed"], 1)
        self.assertEqual(policy.self_check.checks.expiries, 0)
        self.assertEqual(peer.persistent_keepalive, INTERVAL)

    def test_lost_ack_is_no_miss_but_reply_still_counts(self) -> None:
        """The helper's acknowledgement is lost but its late reply arrives: ok."""
        mesh = settled()
        policy = mesh.policy
        ok = policy.self_check.checks.counts["ok"]
        original = mesh.hubs[0].node.device.send_control
        lost: list[int] = []

        def send_control(peer: Peer, kind: int, body: bytes, now: float) -> bool:
            if kind == kinds.NAT_SELF_CHECK_ACK and not lost:
                lost.append(kind)
                return True
            return original(peer, kind, body, now)

        mesh.hubs[0].node.device.send_control = send_control  # type: ignore[method-assign]
        run_until(mesh, lambda: policy.self_check.checks.counts["ok"] > ok, S.CHECK_EVERY + 60)
        self.assertEqual(lost, [kinds.NAT_SELF_CHECK_ACK])
        self.assertEqual(policy.self_check.checks.counts["missed"], 0)

    def test_helper_that_does_not_know_self_checks(self) -> None:
        """A meshguard peer without self-checks (the kind is unknown to it) never acknowledges:
        the checks are inconclusive, never misses, spaced out by doubling, and even a NAT that
        forgets sooner is not taken for one (that is what the acknowledgement is for)."""
        mesh = settled()
        hub = mesh.hubs[0]
        del hub.agent._by_kind[kinds.NAT_SELF_CHECK]
        assert mesh.nat is not None
        mesh.nat.lifetime = 40.0
        policy = mesh.policy
        mesh.net.advance(4 * HOUR)
        counts = policy.self_check.checks.counts
        self.assertEqual(counts["missed"], 0)
        self.assertGreaterEqual(counts["inconclusive"], 2)
        self.assertLessEqual(counts["inconclusive"], 6)  # 30 min, then 10, 20, 40, 80 ...
        self.assertEqual(policy.self_check.checks.last[hub.public][0], "not acknowledged")
        self.assertEqual(policy.self_check.checks.expiries, 0)


class NoCheckTests(SynchronousTestCase):
    def test_never_toward_stock_peers(self) -> None:
        """A stock WireGuard peer (auto too, keeping its own mapping) is never asked: the
        self-check goes to the meshguard hub only."""
        rng = random.Random(3)
        net = MemoryNetwork()
        net.add_nat(MemoryNAT(PUBLIC, {HOME[0]}, 60.0, endpoint_dependent=True))
        home = Member(net, HOME, rng)
        hub = Member(net, HUB, rng)
        stock_node = net.add(("198.51.100.9", 51820), rng.randbytes)
        stock_key = generate_private_key(rng.randbytes)
        stock_node.device.set_private_key(stock_key, net.now)
        now = net.now
        for remote_key, endpoint, address in (
            (hub.public, HUB, hub.address),
            (public_key(stock_key), stock_node.endpoint, "10.9.0.99"),
        ):
            peer = home.node.device.add_peer(remote_key)
            assert peer is not None
            home.node.device.set_endpoint(peer, endpoint)
            home.node.device.replace_allowed_ips(peer, [ipaddress.ip_network(f"{address}/32")])
        for remote in (hub.node.device, stock_node.device):
            back = remote.add_peer(home.public)
            assert back is not None
            remote.replace_allowed_ips(back, [ipaddress.ip_network(f"{home.address}/32")])
        home.policy.configure_auto({hub.public, public_key(stock_key)}, now)
        kinds_sent: dict[bytes, list[int]] = {}
        original = home.node.device.send_control

        def send_control(peer: Peer, kind: int, body: bytes, now: float) -> bool:
            kinds_sent.setdefault(peer.public_key, []).append(kind)
            return original(peer, kind, body, now)

        home.node.device.send_control = send_control  # type: ignore[method-assign]
        for node in (home.node, hub.node, stock_node):
            node.device.up(now)
        net.advance(3 * HOUR)
        stock_peer = home.node.device.peers[public_key(stock_key)]
        self.assertGreater(stock_peer.persistent_keepalive, 0)
        self.assertNotIn(kinds.NAT_SELF_CHECK, kinds_sent.get(public_key(stock_key), []))
        self.assertIn(kinds.NAT_SELF_CHECK, kinds_sent[hub.public])
        self.assertGreater(home.policy.self_check.checks.counts["ok"], 0)
        self.assertNotIn("keepalive_self_check", home.policy.peer_status(stock_peer))

    def test_only_stock_peers_no_check(self) -> None:
        """With only a stock peer, nothing is ever checked (and nothing scheduled)."""
        rng = random.Random(4)
        net = MemoryNetwork()
        net.add_nat(MemoryNAT(PUBLIC, {HOME[0]}, 60.0))
        home = Member(net, HOME, rng)
        stock = net.add(HUB, rng.randbytes)
        key = generate_private_key(rng.randbytes)
        stock.device.set_private_key(key, net.now)
        peer = home.node.device.add_peer(public_key(key))
        back = stock.device.add_peer(home.public)
        assert peer is not None and back is not None
        home.node.device.set_endpoint(peer, HUB)
        home.policy.configure_auto({public_key(key)}, net.now)
        home.node.device.up(net.now)
        stock.device.up(net.now)
        net.advance(2 * HOUR)
        self.assertEqual(peer.persistent_keepalive, K.DEFAULT_INTERVAL)
        self.assertNotIn("check_requests", home.policy.counters)
        self.assertIsNone(home.policy.self_check._check_due)
        self.assertNotIn("keepalive_self_checks", home.policy.node_status())

    def test_never_without_a_session(self) -> None:
        """The hub drops off the network: once the session has expired no request is sent,
        however long the check waits; the status says what it waits for."""
        mesh = settled()
        policy = mesh.policy
        mesh.net.filters.append(lambda data, source, destination: False)
        mesh.net.advance(200)  # the session expires (180 s)
        before = policy.counters["check_requests"]
        mesh.net.advance(2 * HOUR)
        self.assertEqual(policy.counters["check_requests"], before)
        self.assertEqual(policy.self_check.checks.counts["missed"], 0)
        self.assertTrue(policy.self_check.checks.state.startswith("waiting for a session with "))

    def test_off_switch(self) -> None:
        """``self_check = False``: no request, no status keys."""
        mesh = Mesh(LIFETIME, preserve_port=True)
        mesh.policy.self_check.enabled = False
        mesh.net.advance(2 * HOUR)
        self.assertNotIn("check_requests", mesh.policy.counters)
        self.assertNotIn("keepalive_self_checks", mesh.policy.node_status())


class HelperLimitTests(SynchronousTestCase):
    """The helper's side: hub answers requests from the home, within limits."""

    def setUp(self) -> None:
        self.mesh = settled()
        self.mesh.policy.self_check.enabled = False  # only the requests below
        self.hub = self.mesh.hubs[0]
        self.policy = self.hub.policy
        self.peer = self.hub.peer(self.mesh.home)
        # A fresh session both ways (the settled one may be too old to carry an ack).
        home = self.mesh.home
        self.mesh.net.send(home.node, ipv4(home.address, self.hub.address, b"wake up"))
        self.mesh.net.advance(1.0)
        keypair = self.peer.keypairs.current
        assert keypair is not None and keypair.can_send(self.mesh.net.now + 60)
        self.policy.self_check._late.clear()
        self.policy.self_check._late_accepted.clear()
        self.policy.self_check._late_last_request.clear()
        self.accepted = self.policy.counters["check_help_accepted"]  # the home's own checks

    def request(self, token: bytes, delay: object, at: float | None = None) -> None:
        body = encode_json({"t": token.hex(), "d": delay})
        now = self.mesh.net.now if at is None else at
        self.policy.control_received(self.peer, kinds.NAT_SELF_CHECK, body, now)

    def acks(self, since: int) -> int:
        return len(self.hub.node.sent) - since

    def test_accepted_request_answered_late_on_the_tunnel_port(self) -> None:
        """An accepted request is acknowledged at once; the token goes to the home's tunnel
        endpoint exactly ``delay`` later, and the hub's HELLO to the home waits until after."""
        sent = len(self.hub.node.sent)
        state = self.hub.agent.peers[self.mesh.home.public]
        state.next_hello = self.mesh.net.now + 1
        self.request(b"a" * 16, 30)
        self.assertEqual(self.acks(sent), 1)
        self.assertIn(b"a" * 16, self.policy.self_check._late)
        assert state.next_hello is not None
        self.assertGreater(state.next_hello, self.mesh.net.now + 30)
        self.mesh.net.advance(29.9)
        replies = [(d, ep) for d, ep in self.hub.node.sent[sent:] if d[:4] == S.CHECK_MAGIC]
        self.assertEqual(replies, [])
        self.mesh.net.advance(0.2)
        replies = [(d, ep) for d, ep in self.hub.node.sent[sent:] if d[:4] == S.CHECK_MAGIC]
        self.assertEqual(replies, [(S.CHECK_MAGIC + b"a" * 16, self.peer.endpoint)])
        self.assertEqual(self.policy.self_check._late, {})

    def test_bad_delays_refused(self) -> None:
        """Delays outside 2..300 s, or not numbers, are refused (and counted); nothing kept."""
        now = self.mesh.net.now
        bad: list[object] = [1.9, 300.1, -1, 0, True, "30", None, [30], {"d": 30}, 10**400]
        for i, delay in enumerate(bad):
            self.request(bytes([i]) * 16, delay, at=now + i * S.CHECK_HELP_MIN_GAP)
        self.assertEqual(self.policy.self_check._late, {})
        self.assertEqual(self.policy.counters["check_help_refused_bad_delay"], len(bad))
        for i, delay in enumerate((math.nan, math.inf)):  # JSON's NaN and Infinity
            at = now + (len(bad) + i) * S.CHECK_HELP_MIN_GAP
            self.request(bytes([100 + i]) * 16, delay, at=at)
        self.assertEqual(self.policy.self_check._late, {})
        self.assertEqual(self.policy.counters["check_help_refused_bad_delay"], len(bad) + 2)

    def test_too_often_ignored_one_pending_and_hourly_budget(self) -> None:
        """A second request within 5 s is ignored (not even refused); one pending per peer
        (refused "busy"); at most 12 accepted in an hour, the rest ignored."""
        now = self.mesh.net.now
        sent = len(self.hub.node.sent)
        self.request(b"\x01" * 16, 100, at=now)
        self.request(b"\x02" * 16, 100, at=now + 1)
        self.assertEqual(self.acks(sent), 1)
        self.assertEqual(self.policy.counters["check_help_ignored_too_soon"], 1)
        self.request(b"\x03" * 16, 100, at=now + 2 * S.CHECK_HELP_MIN_GAP)
        self.assertEqual(self.policy.counters["check_help_refused_busy"], 1)
        self.assertEqual(len(self.policy.self_check._late), 1)
        self.policy.self_check._late.clear()
        at = now + 3 * S.CHECK_HELP_MIN_GAP
        for i in range(S.CHECK_HELP_PER_HOUR + 3):
            self.policy.self_check._late.clear()
            self.request(bytes([10 + i]) * 16, 2, at=at + i * S.CHECK_HELP_MIN_GAP)
        accepted = self.policy.counters["check_help_accepted"] - self.accepted
        self.assertEqual(accepted, S.CHECK_HELP_PER_HOUR)  # the first one above included
        self.assertEqual(self.policy.counters["check_help_ignored_hourly"], 4)
        # An hour later the budget is back.
        self.policy.self_check._late.clear()
        self.request(b"\x77" * 16, 2, at=now + 2 * HOUR)
        accepted = self.policy.counters["check_help_accepted"] - self.accepted
        self.assertEqual(accepted, S.CHECK_HELP_PER_HOUR + 1)

    def test_duplicate_token_refused(self) -> None:
        """A token another peer's pending check already uses is refused, the other kept."""
        pending = S._LateReply(b"another peer", self.mesh.net.now + 100)
        self.policy.self_check._late[b"\x05" * 16] = pending
        self.request(b"\x05" * 16, 100)
        self.assertEqual(self.policy.counters["check_help_refused_duplicate"], 1)
        self.assertEqual(self.policy.self_check._late, {b"\x05" * 16: pending})

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_garbage_request_bodies(self, body: bytes) -> None:
        """Random bodies never raise, are never answered and never kept."""
        sent = len(self.hub.node.sent)
        self.policy.self_check._late_last_request.clear()
        self.policy.control_received(self.peer, kinds.NAT_SELF_CHECK, body, self.mesh.net.now)
        self.assertEqual(self.policy.self_check._late, {})
        self.assertEqual(len(self.hub.node.sent), sent)

    @settings(max_examples=300, deadline=None)
    @given(
        token=st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=40),
            st.binary(min_size=16, max_size=16).map(bytes.hex),
        ),
        delay=st.one_of(
            st.none(),
            st.booleans(),
            st.text(max_size=5),
            st.floats(max_value=S.CHECK_DELAY_MIN, exclude_max=True),
            st.floats(min_value=S.CHECK_DELAY_MAX, exclude_min=True),
            st.just(math.nan),
            st.integers(max_value=1),
            st.integers(min_value=301),
            st.lists(st.integers(), max_size=3),
        ),
    )
    def test_hostile_request_fields(self, token: object, delay: object) -> None:
        """Well-formed JSON with hostile fields: never raises, never keeps anything."""
        self.policy.self_check._late_last_request.clear()
        body = encode_json({"t": token, "d": delay})
        self.policy.control_received(self.peer, kinds.NAT_SELF_CHECK, body, self.mesh.net.now)
        self.assertEqual(self.policy.self_check._late, {})


class RequesterHostileInputTests(SynchronousTestCase):
    """The home's side while a check is pending: only the helper's ack or reply of its token
    counts."""

    def setUp(self) -> None:
        self.mesh = settled()
        self.policy = self.mesh.policy
        run_until(self.mesh, lambda: self.policy.self_check._check is not None, S.CHECK_EVERY + 60)
        self.hub_peer = self.mesh.home.peer(self.mesh.hubs[0])

    def snapshot(self) -> tuple[object, ...]:
        check = self.policy.self_check._check
        assert check is not None
        return (check.acked_at, check.deadline, dict(self.policy.self_check.checks.counts))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_garbage_acks(self, body: bytes) -> None:
        before = self.snapshot()
        self.policy.control_received(
            self.hub_peer, kinds.NAT_SELF_CHECK_ACK, body, self.mesh.net.now
        )
        self.assertEqual(self.snapshot(), before)

    @settings(max_examples=300, deadline=None)
    @given(
        state=st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["ok", "refused"])),
        why=st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.none())),
    )
    def test_acks_for_other_tokens(self, state: object, why: object) -> None:
        """Acks and refusals of tokens that are not ours change nothing."""
        before = self.snapshot()
        body = encode_json({"t": (b"\xee" * 16).hex(), "s": state, "why": why})
        self.policy.control_received(
            self.hub_peer, kinds.NAT_SELF_CHECK_ACK, body, self.mesh.net.now
        )
        self.assertEqual(self.snapshot(), before)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40), st.sampled_from([HUB, ("192.0.2.7", 51820)]))
    def test_garbage_datagrams(self, data: bytes, source: Endpoint) -> None:
        """Random datagrams on the tunnel port (late-reply magic or not) change nothing."""
        if data[:1] in (b"\x01", b"\x02", b"\x03", b"\x04"):
            data = b"\xff" + data[1:]
        check = self.policy.self_check._check
        assert check is not None
        if data[4:] == check.token:
            data = data[:4] + bytes(16)
        before = self.snapshot()
        self.mesh.home.node.device.datagram_received(data, source, self.mesh.net.now)
        self.mesh.home.node.device.datagram_received(
            S.CHECK_MAGIC + data[:16].ljust(16, b"\x00"), source, self.mesh.net.now
        )
        self.assertEqual(self.snapshot(), before)

    def test_reply_from_elsewhere_ignored(self) -> None:
        """Our own token from another host does not count (the token alone is not enough)."""
        check = self.policy.self_check._check
        assert check is not None
        before = self.snapshot()
        self.mesh.home.node.device.datagram_received(
            S.CHECK_MAGIC + check.token, ("192.0.2.7", 51820), self.mesh.net.now
        )
        self.assertEqual(self.snapshot(), before)
        self.assertEqual(self.policy.counters["check_reply_source_mismatch"], 1)

    def test_early_reply_proves_nothing(self) -> None:
        """A reply well before the asked delay (a helper that did not wait) is inconclusive."""
        check = self.policy.self_check._check
        assert check is not None
        self.mesh.home.node.device.datagram_received(
            S.CHECK_MAGIC + check.token, HUB, self.mesh.net.now
        )
        self.assertIsNone(self.policy.self_check._check)
        self.assertEqual(self.policy.self_check.checks.counts["inconclusive"], 1)
        self.assertEqual(self.policy.self_check.checks.counts["ok"], 1)  # the first check, earlier

    def test_refusal_is_inconclusive(self) -> None:
        check = self.policy.self_check._check
        assert check is not None
        body = encode_json({"t": check.token.hex(), "s": "refused", "why": "busy"})
        self.policy.control_received(
            self.hub_peer, kinds.NAT_SELF_CHECK_ACK, body, self.mesh.net.now
        )
        self.assertIsNone(self.policy.self_check._check)
        text, _ = self.policy.self_check.checks.last[self.hub_peer.public_key]
        self.assertEqual(text, "refused by the peer (busy)")


class StatusTests(SynchronousTestCase):
    def test_status_texts_and_counters(self) -> None:
        """Peer status: the latest result and its time, and a pending check; node status: the
        counts, what the check does now and when the next is due. The hub (not NATed) shows
        none of it, only its helper counters."""
        mesh = settled()
        policy = mesh.policy
        peer = mesh.home.peer(mesh.hubs[0])
        status = policy.peer_status(peer)
        self.assertEqual(status["keepalive_self_check"], f"ok: reply after {DELAY} s idle")
        self.assertLessEqual(status["keepalive_self_check_at"], mesh.net.now)
        node = policy.node_status()
        self.assertEqual(
            node["keepalive_self_checks"],
            {"ok": 1, "missed": 0, "void": 0, "inconclusive": 0, "halved": 0},
        )
        self.assertEqual(node["keepalive_self_check_state"], "scheduled")
        self.assertAlmostEqual(
            node["keepalive_self_check_next_at"],
            status["keepalive_self_check_at"] + S.CHECK_EVERY,
        )
        run_until(mesh, lambda: policy.self_check._check is not None, S.CHECK_EVERY + 60)
        self.assertEqual(
            policy.peer_status(peer)["keepalive_self_check_pending"],
            f"reply due after {DELAY} s idle",
        )
        node = policy.node_status()
        self.assertTrue(node["keepalive_self_check_state"].startswith("pending: reply due"))
        self.assertNotIn("keepalive_self_check_next_at", node)
        hub = mesh.hubs[0].policy
        self.assertNotIn("keepalive_self_checks", hub.node_status())
        self.assertNotIn("keepalive_self_check", hub.peer_status(mesh.hubs[0].peer(mesh.home)))
        self.assertEqual(hub.node_status()["nat_probe_counters"]["check_help_accepted"], 2)


class PortPreservingNATTests(SynchronousTestCase):
    def test_expired_mapping_comes_back_on_the_same_port(self) -> None:
        """``preserve_port``: the private port is the public one; after expiry, the same
        again; a port a live mapping of another host holds is not taken."""
        nat = MemoryNAT(PUBLIC, {"192.168.1.2", "192.168.1.3"}, 30.0, preserve_port=True)
        a = ("192.168.1.2", 51820)
        b = ("192.168.1.3", 51820)
        self.assertEqual(nat.outbound(a, HUB, 0.0), (PUBLIC, 51820))
        self.assertNotEqual(nat.outbound(b, HUB, 1.0), (PUBLIC, 51820))
        self.assertEqual(nat.outbound(a, HUB, 25.0), (PUBLIC, 51820))
        self.assertIsNone(nat.inbound(HUB, (PUBLIC, 51820), 60.0))
        self.assertEqual(nat.outbound(a, HUB, 100.0), (PUBLIC, 51820))
        plain = MemoryNAT(PUBLIC, {"192.168.1.2"}, 30.0)
        first = plain.outbound(a, HUB, 0.0)
        self.assertNotEqual(plain.outbound(a, HUB, 100.0), first)
