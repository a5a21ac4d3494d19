"""Tests for meshguard.core.ratelimiter: per-source token buckets on an injected clock."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.ratelimiter import COLLECT_INTERVAL, RateLimiter

RATE = 20.0
BURST = 5
COST = 1.0 / RATE


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# The sources wireguard-go's ratelimiter_test.go drives in step: IPv4 and IPv6 in distinct /64s.
SOURCES = [
    ip(text)
    for text in (
        "127.0.0.1",
        "192.168.1.1",
        "172.167.2.3",
        "97.231.252.215",
        "248.97.91.167",
        "188.208.233.47",
        "104.2.183.179",
        "72.129.46.120",
        "2001:0db8:0a0b:12f0:0000:0000:0000:0001",
        "f5c2:818f:c052:655a:9860:b136:6894:25f0",
        "b2d7:15ab:48a7:b07c:a541:f144:a9fe:54fc",
        "a47b:786e:1671:a22b:d6f9:4ab0:abc7:c918",
        "ea1e:d155:7f7a:98fb:2bf5:9483:80f6:5445",
        "3f0e:54a2:f5b4:cd19:a21d:58e1:3746:84c4",
    )
]


class RateLimiterTests(SynchronousTestCase):
    """Bursts, refill, grouping of sources, idle collection and the entry bound."""

    def test_wireguardGoSequence(self) -> None:
        """The steps of wireguard-go's test, for every source at once, on an exact clock."""
        limiter = RateLimiter()
        steps: list[tuple[float, bool, str]] = [(0.0, True, "initial burst")] * BURST
        steps += [
            (0.0, False, "after burst"),
            (COST, True, "filling tokens for a single packet"),
            (0.0, False, "not having refilled enough"),
            (2 * COST, True, "filling tokens for a two packet burst"),
            (0.0, True, "second packet in the two packet burst"),
            (0.0, False, "packet following the two packet burst"),
        ]
        # A start far from zero makes the time differences round, as real clocks do.
        now = 1_700_000_000.123
        for number, (wait, expected, text) in enumerate(steps):
            now += wait
            for source in SOURCES:
                self.assertEqual(
                    limiter.allow(source, now), expected, f"{number} {text} {source!r}"
                )

    def test_defaults(self) -> None:
        """20 packets a second with a burst of 5 is the default, as in the kernel and wg-go."""
        limiter = RateLimiter()
        source = ip("198.51.100.7")
        allowed = sum(limiter.allow(source, 50.0 + i / 1000) for i in range(1000))
        # One second of a 1 kHz flood: the burst plus twenty refills, give or take the edge.
        self.assertIn(allowed, (BURST + 19, BURST + 20))

    def test_burstCap(self) -> None:
        """A long quiet spell refills the bucket only up to the burst."""
        limiter = RateLimiter(rate=10.0, burst=3)
        source = ip("198.51.100.7")
        self.assertTrue(limiter.allow(source, 0.0))
        results = [limiter.allow(source, 0.9) for _ in range(5)]
        self.assertEqual(results, [True, True, True, False, False])

    def test_ipv6GroupedBySlash64(self) -> None:
        """Addresses in one IPv6 /64 share a bucket; the neighbouring /64 has its own."""
        limiter = RateLimiter()
        for host in range(BURST):
            self.assertTrue(limiter.allow(ip(f"2001:db8:1:2::{host + 1:x}"), 0.0))
        self.assertFalse(limiter.allow(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 0.0))
        self.assertTrue(limiter.allow(ip("2001:db8:1:3::1"), 0.0))
        self.assertEqual(len(limiter), 2)

    def test_ipv4NotGrouped(self) -> None:
        """Each IPv4 address has its own bucket, even within one /24."""
        limiter = RateLimiter()
        for _ in range(BURST):
            self.assertTrue(limiter.allow(ip("203.0.113.1"), 0.0))
        self.assertFalse(limiter.allow(ip("203.0.113.1"), 0.0))
        self.assertTrue(limiter.allow(ip("203.0.113.2"), 0.0))

    def test_v4MappedSharesIPv4Bucket(self) -> None:
        """An IPv4-mapped IPv6 source (from a dual-stack socket) counts as its IPv4 address."""
        limiter = RateLimiter()
        for _ in range(BURST):
            self.assertTrue(limiter.allow(ip("::ffff:203.0.113.1"), 0.0))
        self.assertFalse(limiter.allow(ip("203.0.113.1"), 0.0))
        self.assertTrue(limiter.allow(ip("::ffff:203.0.113.2"), 0.0))

    def test_collectForgetsIdle(self) -> None:
        """collect() drops sources idle for a second and keeps recent ones."""
        limiter = RateLimiter()
        limiter.allow(ip("192.0.2.1"), 0.0)
        limiter.allow(ip("192.0.2.2"), 0.5)
        limiter.collect(1.2)
        self.assertEqual(len(limiter), 1)
        limiter.collect(1.6)
        self.assertEqual(len(limiter), 0)

    def test_collectGrantsNothing(self) -> None:
        """A source forgotten by collect() gets no more than it would have been owed anyway."""
        remembered, collected = RateLimiter(), RateLimiter()
        source = ip("192.0.2.1")
        for limiter in (remembered, collected):
            for _ in range(BURST + 2):
                limiter.allow(source, 0.0)
        collected.collect(COLLECT_INTERVAL + 0.001)
        self.assertEqual(len(collected), 0)
        now = COLLECT_INTERVAL + 0.002
        self.assertEqual(
            [remembered.allow(source, now) for _ in range(BURST + 2)],
            [collected.allow(source, now) for _ in range(BURST + 2)],
        )

    def test_slowRefillKeepsEntry(self) -> None:
        """With a slow rate, an entry is kept until its bucket has refilled, not just a second."""
        limiter = RateLimiter(rate=1.0, burst=5)
        source = ip("192.0.2.1")
        for _ in range(5):
            limiter.allow(source, 0.0)
        limiter.collect(2.0)
        self.assertEqual(len(limiter), 1)
        limiter.collect(5.5)
        self.assertEqual(len(limiter), 0)

    def test_fullTableDeniesNewSources(self) -> None:
        """When the table is full, new sources are denied and known ones still served."""
        limiter = RateLimiter(max_entries=3)
        for host in (1, 2, 3):
            self.assertTrue(limiter.allow(ip(f"192.0.2.{host}"), 0.0))
        self.assertFalse(limiter.allow(ip("192.0.2.4"), 0.1))
        self.assertFalse(limiter.allow(ip("2001:db8::1"), 0.1))
        self.assertTrue(limiter.allow(ip("192.0.2.1"), 0.1))
        self.assertEqual(len(limiter), 3)

    def test_fullTableCollectsOncePerInterval(self) -> None:
        """A full table reclaims idle entries by itself, but sweeps at most once a second."""
        limiter = RateLimiter(max_entries=2)
        limiter.allow(ip("192.0.2.1"), 0.0)
        limiter.allow(ip("192.0.2.2"), 0.9)
        # The sweep at 0.95 frees nothing (both used within the last second) ...
        self.assertFalse(limiter.allow(ip("192.0.2.3"), 0.95))
        self.assertTrue(limiter.allow(ip("192.0.2.2"), 1.5))
        # ... and none runs again before 1.95, although 192.0.2.1 has gone idle by 1.6.
        self.assertFalse(limiter.allow(ip("192.0.2.3"), 1.6))
        self.assertEqual(len(limiter), 2)
        self.assertTrue(limiter.allow(ip("192.0.2.3"), 1.95))
        self.assertEqual(len(limiter), 2)
        self.assertFalse(limiter.allow(ip("192.0.2.1"), 1.96))

    def test_floodOfSourcesBounded(self) -> None:
        """A flood from a hundred thousand sources never grows the table past its bound."""
        limiter = RateLimiter(max_entries=1000)
        for i in range(100_000):
            limiter.allow(i.to_bytes(4, "big"), i / 10_000)
            self.assertLessEqual(len(limiter), 1000)

    def test_clockStepsBack(self) -> None:
        """A clock that steps back refills nothing, then or when it moves forward again."""
        limiter = RateLimiter()
        source = ip("192.0.2.1")
        for _ in range(BURST):
            limiter.allow(source, 100.0)
        self.assertFalse(limiter.allow(source, 50.0))
        self.assertFalse(limiter.allow(source, 100.0))
        self.assertTrue(limiter.allow(source, 100.0 + COST))

    def test_badSource(self) -> None:
        """A source of neither 4 nor 16 bytes is a caller's bug and raises."""
        limiter = RateLimiter()
        for bad in (b"", bytes(3), bytes(6), bytes(17)):
            self.assertRaises(ValueError, limiter.allow, bad, 0.0)

    def test_badParameters(self) -> None:
        """Nonsense limits are refused at construction."""
        self.assertRaises(ValueError, RateLimiter, 0.0)
        self.assertRaises(ValueError, RateLimiter, 20.0, 0)
        self.assertRaises(ValueError, RateLimiter, max_entries=0)


arrivals = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 400)),  # (source, milliseconds since previous)
    max_size=200,
)


class PropertyTests(SynchronousTestCase):
    """Properties that hold for any arrival pattern."""

    @settings(max_examples=300, deadline=None)
    @given(arrivals)
    def test_neverExceedsBucket(self, pattern: list[tuple[int, int]]) -> None:
        """In any interval, a source gets at most burst + rate x length packets through."""
        limiter = RateLimiter()
        now = 1000.0
        allowed: dict[int, list[float]] = {}
        for source, gap in pattern:
            now += gap / 1000
            if limiter.allow(SOURCES[source], now):
                allowed.setdefault(source, []).append(now)
        for times in allowed.values():
            for i, start in enumerate(times):
                for j in range(i, len(times)):
                    self.assertLessEqual(j - i + 1, BURST + RATE * (times[j] - start) + 1e-6)

    @settings(max_examples=300, deadline=None)
    @given(arrivals)
    def test_sourcesIndependent(self, pattern: list[tuple[int, int]]) -> None:
        """While the table has room, one source's traffic never changes another's answers."""
        shared = RateLimiter()
        alone = {source: RateLimiter() for source in range(4)}
        now = 1000.0
        for source, gap in pattern:
            now += gap / 1000
            if gap > 500:
                shared.collect(now)
            self.assertEqual(
                shared.allow(SOURCES[source], now), alone[source].allow(SOURCES[source], now)
            )

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(50, 2000), max_size=100), st.booleans())
    def test_politeSourceNeverDenied(self, gaps: list[int], collect: bool) -> None:
        """A source that waits at least 1/rate between packets is always let through."""
        limiter = RateLimiter()
        now = 1_700_000_000.0
        for gap in gaps:
            now += gap / 1000
            if collect:
                limiter.collect(now)
            self.assertTrue(limiter.allow(SOURCES[0], now))
