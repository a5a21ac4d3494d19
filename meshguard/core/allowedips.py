"""Cryptokey routing: which peer owns an inner IP address, by longest prefix match.

The same table answers both directions of the data path: an outgoing packet's destination picks
the peer to encrypt for, and a decrypted packet's source must belong to the peer that sent it.
"""

import ipaddress
from typing import Final, Generic, TypeVar

T = TypeVar("T")

#: A prefix of either family, as ``wg`` and the config file give them.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Lookups remembered before the cache is dropped and refilled; the data path sends to few hosts.
DEFAULT_CACHE_SIZE: Final = 4096

# A prefix's place in the tables: (IP version, prefix length, address >> host bits).
_Slot = tuple[int, int, int]


class _Sentinel:
    """A marker for "no entry" that no caller's value can be."""


_MISSING: Final = _Sentinel()


class _Family(Generic[T]):
    """The prefixes of one address family: one dict per prefix length.

    A lookup walks the non-empty lengths, longest first, probing each dict with the address
    shifted right by that length's host bits. In CPython a handful of dict probes beats walking a
    bit trie node by node, and inserting is one dict store.
    """

    __slots__ = ("bits", "by_length", "walk")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, T]] = {}
        #: ``(host bits, table)`` for every non-empty length, longest prefix first.
        self.walk: list[tuple[int, dict[int, T]]] = []

    def table(self, length: int) -> dict[int, T]:
        table = self.by_length.get(length)
        if table is None:
            table = self.by_length[length] = {}
            self._rewalk()
        return table

    def drop_if_empty(self, length: int) -> None:
        if not self.by_length[length]:
            del self.by_length[length]
            self._rewalk()

    def _rewalk(self) -> None:
        bits = self.bits
        self.walk = [
            (bits - length, self.by_length[length])
            for length in sorted(self.by_length, reverse=True)
        ]


class _Owner(Generic[T]):
    """One value and its prefixes, in the order they were given to it."""

    __slots__ = ("prefixes", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.prefixes: dict[_Slot, Network] = {}


class AllowedIPs(Generic[T]):
    """A longest-prefix-match table from IPv4 and IPv6 prefixes to values (peers).

    Each prefix has exactly one owner; inserting a prefix another value owns moves it, as
    ``wg set ... allowed-ips`` does. Values are told apart by identity (``is``), like peer
    pointers in wireguard-go, so they need not be hashable.
    """

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """``cache_size`` bounds the per-address lookup cache; 0 disables it."""
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)
        self._owners: dict[int, _Owner[T]] = {}
        self._count = 0
        #: Recent lookups, address -> owner (or None: no route). Cleared in place on every
        #: change and never replaced, so a hot path may hold it and try it before
        #: :meth:`lookup` (one dict operation instead of a call, after an idle moment several
        #: microseconds of cold interpreter; docs/datapath.md, "Latency").
        self.cache: dict[bytes, T | None] = {}
        self._cache = self.cache
        self._cache_size = cache_size

    def __len__(self) -> int:
        """The number of prefixes in the table, both families."""
        return self._count

    def _family(self, version: int) -> _Family[T]:
        return self._v4 if version == 4 else self._v6

    def insert(self, network: Network, value: T) -> None:
        """Give ``network`` to ``value``, taking it from any other owner.

        Host bits are ignored; ``ip_network(..., strict=False)`` has already cleared them.
        """
        family = self._family(network.version)
        length = network.prefixlen
        key = int(network.network_address) >> (family.bits - length)
        table = family.table(length)
        slot = (network.version, length, key)
        previous = table.get(key, _MISSING)
        if previous is value:
            return
        if isinstance(previous, _Sentinel):
            self._count += 1
        else:
            self._disown(previous, slot)
        table[key] = value
        owner = self._owners.get(id(value))
        if owner is None:
            owner = self._owners[id(value)] = _Owner(value)
        owner.prefixes[slot] = network
        self._cache.clear()

    def remove(self, network: Network, value: T) -> bool:
        """Remove ``network`` if ``value`` owns it; say whether it did."""
        family = self._family(network.version)
        length = network.prefixlen
        table = family.by_length.get(length)
        if table is None:
            return False
        key = int(network.network_address) >> (family.bits - length)
        if table.get(key, _MISSING) is not value:
            return False
        del table[key]
        family.drop_if_empty(length)
        self._disown(value, (network.version, length, key))
        self._count -= 1
        self._cache.clear()
        return True

    def remove_value(self, value: T) -> None:
        """Remove every prefix ``value`` owns, in time proportional to their number."""
        owner = self._owners.pop(id(value), None)
        if owner is None:
            return
        emptied: set[tuple[int, int]] = set()
        for version, length, key in owner.prefixes:
            family = self._family(version)
            table = family.by_length[length]
            del table[key]
            if not table:
                emptied.add((version, length))
        for version, length in emptied:
            self._family(version).drop_if_empty(length)
        self._count -= len(owner.prefixes)
        self._cache.clear()

    def clear(self) -> None:
        """Remove every prefix of every value."""
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._owners.clear()
        self._count = 0
        self._cache.clear()

    def networks(self, value: T) -> list[Network]:
        """The prefixes ``value`` owns, in the order it was given them."""
        owner = self._owners.get(id(value))
        return [] if owner is None else list(owner.prefixes.values())

    def lookup(self, address: bytes) -> T | None:
        """The owner of the longest prefix holding ``address`` (4 or 16 raw bytes), or None."""
        cache = self._cache
        found = cache.get(address, _MISSING)
        if not isinstance(found, _Sentinel):
            return found
        size = len(address)
        if size == 4:
            walk = self._v4.walk
        elif size == 16:
            walk = self._v6.walk
        else:
            raise ValueError(f"an address is 4 or 16 bytes, not {size}")
        number = int.from_bytes(address, "big")
        result: T | None = None
        for host_bits, table in walk:
            key = number >> host_bits
            if key in table:
                result = table[key]
                break
        if len(cache) >= self._cache_size:
            if not self._cache_size:
                return result
            cache.clear()
        cache[address] = result
        return result

    def _disown(self, value: T, slot: _Slot) -> None:
        owner = self._owners[id(value)]
        del owner.prefixes[slot]
        if not owner.prefixes:
            # Dropping the owner also drops our reference, so its id cannot be reused under us.
            del self._owners[id(value)]
