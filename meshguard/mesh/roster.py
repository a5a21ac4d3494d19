"""The members a node believes in: verified records, revocations, and names.

One roster per node of a mesh with an authority. Everything in it passed a signature check;
whoever carried a record (introducer, store, relay) is not trusted for anything. Revocations are
kept for good: a revoked key is refused even with an otherwise valid record.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from nacl.signing import VerifyKey

from meshguard.mesh.authority import (
    Member,
    Revocation,
    verify_member,
    verify_revocation,
)

#: Most verified texts remembered (cleared when full: a cache, not a list of members).
MAX_CHECKED = 8192


class Roster:
    """Verified members by WireGuard key and by name, and the keys revoked."""

    def __init__(self, mesh: str, authority: VerifyKey) -> None:
        self.mesh = mesh
        self.authority = authority
        self.members: dict[bytes, Member] = {}
        self.revoked: dict[bytes, Revocation] = {}
        #: Records refused (bad signature, wrong mesh, expired, revoked): counted, never logged.
        self.refused = 0
        #: Texts already verified: introducers repeat their lists, signatures need checking once.
        self._checked: dict[str, Member] = {}

    def accept(self, text: object, now: float) -> Member | None:
        """The member ``text`` describes if it verifies, is current and not revoked; it is
        remembered (a later record for the same key replaces an earlier one)."""
        member = self._checked.get(text) if isinstance(text, str) else None
        if member is None or member.expires <= now:
            member = verify_member(self.authority, self.mesh, text, now)
            if member is not None:
                if len(self._checked) >= MAX_CHECKED:
                    self._checked.clear()
                self._checked[member.text] = member
        if member is None or member.key in self.revoked:
            self.refused += 1
            return None
        known = self.members.get(member.key)
        if known is None or known.expires <= member.expires:
            self.members[member.key] = member
        return member

    def revoke(self, text: object) -> Revocation | None:
        """Record a revocation if the authority signed it; the revoked key's record goes."""
        revocation = verify_revocation(self.authority, self.mesh, text)
        if revocation is None:
            self.refused += 1
            return None
        self.revoked[revocation.key] = revocation
        self.members.pop(revocation.key, None)
        return revocation

    def forget(self, key: bytes) -> None:
        self.members.pop(key, None)

    def expire(self, now: float) -> list[bytes]:
        """Drop records that expired by ``now``; return their keys."""
        gone = [key for key, member in self.members.items() if member.expires <= now]
        for key in gone:
            del self.members[key]
        return gone

    def next_expiry(self) -> float | None:
        return min((m.expires for m in self.members.values()), default=None)

    def name_of(self, key: bytes) -> str | None:
        member = self.members.get(key)
        return member.name if member is not None else None

    def lookup(self, name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The host addresses of the member called ``name`` (first address of each network)."""
        for member in self.members.values():
            if member.name == name:
                return [a.network_address for a in member.addresses]
        return []

    def revocation_texts(self) -> list[str]:
        return sorted(r.text for r in self.revoked.values())

    def load(self, records: Iterable[str], revocations: Iterable[str], now: float) -> None:
        """Take a store's contents (still verified one by one: a store is only a carrier)."""
        for text in revocations:
            self.revoke(text)
        for text in records:
            self.accept(text, now)
