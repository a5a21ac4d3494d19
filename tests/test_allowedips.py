"""Tests for meshguard.core.allowedips: kernel selftest cases, move semantics, a naive reference."""

import ipaddress
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.allowedips import AllowedIPs, Network


@dataclass
class Peer:
    """A stand-in peer: a non-frozen dataclass, so equal-looking and unhashable on purpose."""

    name: str


def net(text: str) -> Network:
    """A prefix from text, host bits allowed, as ``wg`` accepts them."""
    return ipaddress.ip_network(text, strict=False)


def v4net(a: int, b: int, c: int, d: int, length: int) -> Network:
    return ipaddress.ip_network((bytes((a, b, c, d)), length), strict=False)


def v4(a: int, b: int, c: int, d: int) -> bytes:
    return bytes((a, b, c, d))


def v6words(w0: int, w1: int, w2: int, w3: int) -> bytes:
    return b"".join(w.to_bytes(4, "big") for w in (w0, w1, w2, w3))


def v6net(w0: int, w1: int, w2: int, w3: int, length: int) -> Network:
    return ipaddress.ip_network((v6words(w0, w1, w2, w3), length), strict=False)


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


class NaiveTable:
    """The table's meaning, spelled out: a list of (prefix, owner) scanned in full."""

    def __init__(self) -> None:
        self.entries: list[tuple[Network, object]] = []

    def insert(self, network: Network, value: object) -> None:
        for i, (existing, owner) in enumerate(self.entries):
            if existing == network:
                if owner is value:
                    return
                del self.entries[i]
                break
        self.entries.append((network, value))

    def remove(self, network: Network, value: object) -> bool:
        for i, (existing, owner) in enumerate(self.entries):
            if existing == network and owner is value:
                del self.entries[i]
                return True
        return False

    def remove_value(self, value: object) -> None:
        self.entries = [(n, o) for n, o in self.entries if o is not value]

    def networks(self, value: object) -> list[Network]:
        return [n for n, o in self.entries if o is value]

    def lookup(self, address: bytes) -> object | None:
        ip = ipaddress.ip_address(address)
        best: tuple[int, object] | None = None
        for network, owner in self.entries:
            if network.version == ip.version and ip in network:
                if best is None or network.prefixlen > best[0]:
                    best = (network.prefixlen, owner)
        return None if best is None else best[1]


class KernelSelftestTests(SynchronousTestCase):
    """The cases wireguard-go ported from the kernel's selftest/allowedips.h."""

    def test_ipv4(self) -> None:
        """Nested and adjacent IPv4 prefixes resolve to the longest match."""
        a, b, c, d, e, g, h = (Peer(n) for n in "abcdegh")
        table: AllowedIPs[Peer] = AllowedIPs()
        table.insert(v4net(192, 168, 4, 0, 24), a)
        table.insert(v4net(192, 168, 4, 4, 32), b)
        table.insert(v4net(192, 168, 0, 0, 16), c)
        table.insert(v4net(192, 95, 5, 64, 27), d)
        table.insert(v4net(192, 95, 5, 65, 27), c)
        table.insert(v4net(0, 0, 0, 0, 0), e)
        table.insert(v4net(64, 15, 112, 0, 20), g)
        table.insert(v4net(64, 15, 123, 211, 25), h)
        table.insert(v4net(10, 0, 0, 0, 25), a)
        table.insert(v4net(10, 0, 0, 128, 25), b)
        table.insert(v4net(10, 1, 0, 0, 30), a)
        table.insert(v4net(10, 1, 0, 4, 30), b)
        table.insert(v4net(10, 1, 0, 8, 29), c)
        table.insert(v4net(10, 1, 0, 16, 29), d)

        self.assertIs(table.lookup(v4(192, 168, 4, 20)), a)
        self.assertIs(table.lookup(v4(192, 168, 4, 0)), a)
        self.assertIs(table.lookup(v4(192, 168, 4, 4)), b)
        self.assertIs(table.lookup(v4(192, 168, 200, 182)), c)
        self.assertIs(table.lookup(v4(192, 95, 5, 68)), c)
        self.assertIs(table.lookup(v4(192, 95, 5, 96)), e)
        self.assertIs(table.lookup(v4(64, 15, 116, 26)), g)
        self.assertIs(table.lookup(v4(64, 15, 127, 3)), g)

        for first in (1, 64, 128, 192, 255):
            table.insert(v4net(first, 0, 0, 0, 32), a)
        for first in (1, 64, 128, 192, 255):
            self.assertIs(table.lookup(v4(first, 0, 0, 0)), a)

        table.remove_value(a)
        for first in (1, 64, 128, 192, 255):
            self.assertIsNot(table.lookup(v4(first, 0, 0, 0)), a)

        for peer in (a, b, c, d, e, g, h):
            table.remove_value(peer)
        self.assertEqual(len(table), 0)
        # As the kernel test checks its trie is empty: no empty per-length tables linger.
        self.assertEqual((table._v4.walk, table._v6.walk), ([], []))
        self.assertIsNone(table.lookup(v4(192, 168, 4, 4)))

        table.insert(v4net(192, 168, 0, 0, 16), a)
        table.insert(v4net(192, 168, 0, 0, 24), a)
        table.remove_value(a)
        self.assertIsNone(table.lookup(v4(192, 168, 0, 1)))

    def test_ipv6(self) -> None:
        """Nested IPv6 prefixes, a moved default route and a /98 with host bits."""
        a, b, c, d, e, f, g, h = (Peer(n) for n in "abcdefgh")
        table: AllowedIPs[Peer] = AllowedIPs()
        table.insert(v6net(0x26075300, 0x60006B00, 0, 0xC05F0543, 128), d)
        table.insert(v6net(0x26075300, 0x60006B00, 0, 0, 64), c)
        table.insert(v6net(0, 0, 0, 0, 0), e)
        table.insert(v6net(0, 0, 0, 0, 0), f)
        table.insert(v6net(0x24046800, 0, 0, 0, 32), g)
        table.insert(v6net(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 64), h)
        table.insert(v6net(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 128), a)
        table.insert(v6net(0x24446800, 0x40E40800, 0xDEAEBEEF, 0x0DEFBEEF, 128), c)
        table.insert(v6net(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98), b)

        self.assertIs(table.lookup(v6words(0x26075300, 0x60006B00, 0, 0xC05F0543)), d)
        self.assertIs(table.lookup(v6words(0x26075300, 0x60006B00, 0, 0xC02E01EE)), c)
        self.assertIs(table.lookup(v6words(0x26075300, 0x60006B01, 0, 0)), f)
        self.assertIs(table.lookup(v6words(0x24046800, 0x40040806, 0, 0x1006)), g)
        self.assertIs(table.lookup(v6words(0x24046800, 0x40040806, 0x1234, 0x5678)), g)
        self.assertIs(table.lookup(v6words(0x240467FF, 0x40040806, 0x1234, 0x5678)), f)
        self.assertIs(table.lookup(v6words(0x24046801, 0x40040806, 0x1234, 0x5678)), f)
        self.assertIs(table.lookup(v6words(0x24046800, 0x40040800, 0x1234, 0x5678)), h)
        self.assertIs(table.lookup(v6words(0x24046800, 0x40040800, 0, 0)), h)
        self.assertIs(table.lookup(v6words(0x24046800, 0x40040800, 0x10101010, 0x10101010)), h)
        self.assertIs(table.lookup(v6words(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF)), a)
        self.assertIs(table.lookup(v6words(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0x1234)), b)
        self.assertEqual(table.networks(e), [])


class AllowedIPsTests(SynchronousTestCase):
    """Ownership, moves, masking, families, ordering and the lookup cache."""

    def setUp(self) -> None:
        self.table: AllowedIPs[Peer] = AllowedIPs()
        self.a, self.b = Peer("a"), Peer("b")

    def test_empty(self) -> None:
        """An empty table routes nothing and has no prefixes."""
        self.assertEqual(len(self.table), 0)
        self.assertIsNone(self.table.lookup(packed("10.0.0.1")))
        self.assertIsNone(self.table.lookup(packed("fd00::1")))
        self.assertEqual(self.table.networks(self.a), [])

    def test_insertMovesPrefix(self) -> None:
        """A prefix owned by one value and inserted for another changes hands, keeping one entry."""
        self.table.insert(net("10.0.0.0/24"), self.a)
        self.table.insert(net("10.0.1.0/24"), self.a)
        self.table.insert(net("10.0.0.0/24"), self.b)
        self.assertEqual(len(self.table), 2)
        self.assertIs(self.table.lookup(packed("10.0.0.9")), self.b)
        self.assertEqual(self.table.networks(self.a), [net("10.0.1.0/24")])
        self.assertEqual(self.table.networks(self.b), [net("10.0.0.0/24")])
        self.assertFalse(self.table.remove(net("10.0.0.0/24"), self.a))
        self.assertIs(self.table.lookup(packed("10.0.0.9")), self.b)

    def test_moveLastPrefixForgetsOwner(self) -> None:
        """A value whose only prefix moved away owns nothing and removing it is harmless."""
        self.table.insert(net("10.0.0.0/24"), self.a)
        self.table.insert(net("10.0.0.0/24"), self.b)
        self.assertEqual(self.table.networks(self.a), [])
        self.table.remove_value(self.a)
        self.assertIs(self.table.lookup(packed("10.0.0.1")), self.b)

    def test_hostBitsMasked(self) -> None:
        """A prefix given with host bits set is stored and matched as its network."""
        self.table.insert(net("192.168.1.77/24"), self.a)
        self.assertIs(self.table.lookup(packed("192.168.1.200")), self.a)
        self.assertEqual(self.table.networks(self.a), [net("192.168.1.0/24")])
        self.assertTrue(self.table.remove(net("192.168.1.5/24"), self.a))
        self.assertEqual(len(self.table), 0)

    def test_reinsertSameOwner(self) -> None:
        """Inserting a prefix its owner already has changes neither count nor order."""
        first, second = net("10.0.0.0/8"), net("fd00::/8")
        self.table.insert(first, self.a)
        self.table.insert(second, self.a)
        self.table.insert(first, self.a)
        self.assertEqual(len(self.table), 2)
        self.assertEqual(self.table.networks(self.a), [first, second])

    def test_networksInInsertionOrder(self) -> None:
        """networks() lists a value's prefixes in the order given, moved-in ones last."""
        order = [net(t) for t in ("10.9.0.0/16", "fd00::/64", "10.1.0.0/16", "0.0.0.0/0")]
        for network in order:
            self.table.insert(network, self.a)
        self.table.insert(net("10.5.0.0/16"), self.b)
        self.table.insert(net("10.5.0.0/16"), self.a)
        self.assertEqual(self.table.networks(self.a), [*order, net("10.5.0.0/16")])

    def test_remove(self) -> None:
        """remove() takes out only a prefix the value owns, and says whether it did."""
        self.table.insert(net("10.0.0.0/8"), self.a)
        self.table.insert(net("10.1.0.0/16"), self.a)
        self.assertFalse(self.table.remove(net("10.0.0.0/8"), self.b))
        self.assertFalse(self.table.remove(net("10.2.0.0/16"), self.a))
        self.assertFalse(self.table.remove(net("10.0.0.0/9"), self.a))
        self.assertFalse(self.table.remove(net("::/0"), self.a))
        self.assertTrue(self.table.remove(net("10.1.0.0/16"), self.a))
        self.assertFalse(self.table.remove(net("10.1.0.0/16"), self.a))
        self.assertEqual(len(self.table), 1)
        self.assertIs(self.table.lookup(packed("10.1.2.3")), self.a)
        self.assertTrue(self.table.remove(net("10.0.0.0/8"), self.a))
        self.assertIsNone(self.table.lookup(packed("10.1.2.3")))
        self.assertEqual(self.table.networks(self.a), [])

    def test_removeValueLeavesOthers(self) -> None:
        """remove_value() removes every prefix of one value and none of another's."""
        self.table.insert(net("10.0.0.0/8"), self.a)
        self.table.insert(net("fd00::/8"), self.a)
        self.table.insert(net("10.1.0.0/16"), self.b)
        self.table.remove_value(self.a)
        self.assertEqual(len(self.table), 1)
        self.assertIsNone(self.table.lookup(packed("10.2.0.1")))
        self.assertIsNone(self.table.lookup(packed("fd00::1")))
        self.assertIs(self.table.lookup(packed("10.1.0.1")), self.b)
        self.table.remove_value(self.a)
        self.assertEqual(len(self.table), 1)

    def test_familiesSeparate(self) -> None:
        """A default route of one family matches no address of the other."""
        self.table.insert(net("0.0.0.0/0"), self.a)
        self.assertIs(self.table.lookup(packed("203.0.113.1")), self.a)
        self.assertIsNone(self.table.lookup(packed("::")))
        self.assertIsNone(self.table.lookup(packed("::ffff:203.0.113.1")))
        self.table.insert(net("::/0"), self.b)
        self.assertIs(self.table.lookup(packed("2001:db8::1")), self.b)
        self.assertIs(self.table.lookup(packed("0.0.0.0")), self.a)

    def test_identityNotEquality(self) -> None:
        """Values that compare equal are still different owners."""
        twin = Peer("a")
        self.assertEqual(twin, self.a)
        self.table.insert(net("10.0.0.0/8"), self.a)
        self.assertFalse(self.table.remove(net("10.0.0.0/8"), twin))
        self.table.insert(net("10.0.0.0/8"), twin)
        self.assertIs(self.table.lookup(packed("10.0.0.1")), twin)
        self.assertEqual(self.table.networks(self.a), [])

    def test_badAddressLength(self) -> None:
        """An address of neither 4 nor 16 bytes is a caller's mistake and raises."""
        for bad in (b"", b"\x0a\x00\x00", bytes(5), bytes(17)):
            self.assertRaises(ValueError, self.table.lookup, bad)

    def test_cacheSeesChanges(self) -> None:
        """Every change is visible to the next lookup of an address looked up before."""
        address = packed("10.1.2.3")
        self.assertIsNone(self.table.lookup(address))
        self.table.insert(net("10.0.0.0/8"), self.a)
        self.assertIs(self.table.lookup(address), self.a)
        self.table.insert(net("10.1.2.0/24"), self.b)
        self.assertIs(self.table.lookup(address), self.b)
        self.table.insert(net("10.1.2.0/24"), self.a)
        self.assertIs(self.table.lookup(address), self.a)
        self.assertTrue(self.table.remove(net("10.1.2.0/24"), self.a))
        self.assertIs(self.table.lookup(address), self.a)
        self.table.remove_value(self.a)
        self.assertIsNone(self.table.lookup(address))
        self.table.insert(net("10.0.0.0/8"), self.b)
        self.table.clear()
        self.assertIsNone(self.table.lookup(address))
        self.assertEqual(len(self.table), 0)

    def test_cacheBounded(self) -> None:
        """The lookup cache never holds more than its size, however many addresses pass."""
        table: AllowedIPs[Peer] = AllowedIPs(cache_size=16)
        table.insert(net("10.0.0.0/8"), self.a)
        for host in range(1000):
            self.assertIs(table.lookup(bytes((10, 0, host >> 8, host & 0xFF))), self.a)
            self.assertLessEqual(len(table._cache), 16)

    def test_manyPrefixes(self) -> None:
        """Twenty thousand random prefixes of both families route as a brute-force search says."""
        rng = random.Random(100_000)
        peers = [Peer(str(i)) for i in range(50)]
        table: AllowedIPs[Peer] = AllowedIPs()
        expected: dict[Network, Peer] = {}
        for _ in range(20_000):
            network = random_prefix(rng)
            peer = peers[rng.randrange(len(peers))]
            table.insert(network, peer)
            if expected.get(network) is not peer:
                # A move puts the prefix last in its new owner's list, as a fresh insert would.
                expected.pop(network, None)
                expected[network] = peer
        self.assertEqual(len(table), len(expected))
        inserted = list(expected)
        probes = [rng.choice(inserted).network_address.packed for _ in range(300)]
        probes += [rng.choice(inserted).broadcast_address.packed for _ in range(300)]
        probes += [rng.getrandbits(32).to_bytes(4, "big") for _ in range(200)]
        probes += [rng.getrandbits(128).to_bytes(16, "big") for _ in range(200)]
        for address in probes:
            self.assertIs(table.lookup(address), brute_force_lookup(expected, address))
        for peer in peers[:25]:
            table.remove_value(peer)
            self.assertEqual(table.networks(peer), [])
        for peer in peers[25:]:
            self.assertEqual(
                table.networks(peer), [n for n, owner in expected.items() if owner is peer]
            )
        self.assertEqual(len(table), sum(owner in peers[25:] for owner in expected.values()))


def random_prefix(rng: random.Random) -> Network:
    if rng.random() < 0.5:
        length = rng.choice((8, 16, 20, 24, 28, 32, 32))
        host_bits = 32 - length
        return ipaddress.IPv4Network((rng.getrandbits(32) >> host_bits << host_bits, length))
    length = rng.choice((16, 32, 48, 64, 96, 128, 128))
    host_bits = 128 - length
    return ipaddress.IPv6Network((rng.getrandbits(128) >> host_bits << host_bits, length))


def brute_force_lookup(owners: dict[Network, Peer], address: bytes) -> Peer | None:
    """Try every prefix length of ``address``, longest first, against a dict of prefixes."""
    bits = len(address) * 8
    for length in range(bits, -1, -1):
        owner = owners.get(ipaddress.ip_network((address, length), strict=False))
        if owner is not None:
            return owner
    return None


# Hypothesis: prefixes drawn from a small space so that they nest, collide and move often.
PEERS = 4


def _address(version: int, high: int, low: int) -> int:
    bits = 32 if version == 4 else 128
    return (high << (bits - 4)) | low


@st.composite
def prefixes(draw: st.DrawFn) -> Network:
    version = draw(st.sampled_from((4, 6)))
    bits = 32 if version == 4 else 128
    length = draw(
        st.sampled_from((0, 1, 2, 3, 4, 5, bits // 2, bits - 4, bits - 2, bits - 1, bits))
    )
    address = _address(version, draw(st.integers(0, 15)), draw(st.integers(0, 15)))
    return ipaddress.ip_network((address, length), strict=False)


@st.composite
def addresses(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from((4, 6)))
    address = _address(version, draw(st.integers(0, 15)), draw(st.integers(0, 15)))
    return address.to_bytes(4 if version == 4 else 16, "big")


operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), prefixes(), st.integers(0, PEERS - 1)),
        st.tuples(st.just("insert"), prefixes(), st.integers(0, PEERS - 1)),
        st.tuples(st.just("remove"), prefixes(), st.integers(0, PEERS - 1)),
        st.tuples(st.just("remove_value"), st.just(None), st.integers(0, PEERS - 1)),
        st.tuples(st.just("lookup"), addresses(), st.just(0)),
    ),
    max_size=60,
)


class ReferenceTests(SynchronousTestCase):
    """Random operation sequences give the same answers as the naive table."""

    @settings(max_examples=300, deadline=None)
    @given(operations, st.sampled_from((0, 1, 3, 4096)), st.lists(addresses(), max_size=20))
    def test_matchesReference(
        self,
        ops: list[tuple[str, object, int]],
        cache_size: int,
        probes: list[bytes],
    ) -> None:
        """Lookups, removals, networks() and len() agree after every operation."""
        peers = [Peer(str(i)) for i in range(PEERS)]
        table: AllowedIPs[Peer] = AllowedIPs(cache_size=cache_size)
        naive = NaiveTable()
        for name, argument, index in ops:
            peer = peers[index]
            if name == "insert":
                assert isinstance(argument, ipaddress.IPv4Network | ipaddress.IPv6Network)
                table.insert(argument, peer)
                naive.insert(argument, peer)
            elif name == "remove":
                assert isinstance(argument, ipaddress.IPv4Network | ipaddress.IPv6Network)
                self.assertEqual(table.remove(argument, peer), naive.remove(argument, peer))
            elif name == "remove_value":
                table.remove_value(peer)
                naive.remove_value(peer)
            else:
                assert isinstance(argument, bytes)
                self.assertIs(table.lookup(argument), naive.lookup(argument))
            for probe in probes:
                self.assertIs(table.lookup(probe), naive.lookup(probe))
            self.assertEqual(len(table), len(naive.entries))
        for peer in peers:
            self.assertEqual(table.networks(peer), naive.networks(peer))
