"""Signed membership: the mesh authority's records, invitations' grants and revocations.

A mesh with an authority trusts members only through Ed25519 signatures (pynacl), so the
introducers, relays and stores that carry records need no trust of their own. Three signed kinds:

- a **member record** signed by the authority: mesh, name, WireGuard key, addresses, roles, expiry
  (``mesh init`` makes one for the first introducer);
- a **grant** signed by the authority at ``meshguard invite`` time: everything of a member record
  but the WireGuard key, plus the public half of a one-time *invitation key* and a join deadline.
  The joiner, who alone holds the invitation's private half (it travels only in the invitation
  line), signs its freshly made WireGuard key with it: grant + binding is the member's record.
  An introducer that stores grants can therefore hand out a grant once but never bind a key of its
  own choosing to it;
- a **revocation** signed by the authority: this WireGuard key is no longer a member.

Each signature covers a domain tag and the exact bytes carried (base64url in a dot-separated
text), so verification never re-encodes anything. Bodies are canonical JSON (sorted keys, no
spaces) when made, and parsed strictly when read: anything malformed is refused, never raised.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RECORD_DOMAIN = b"meshguard member record v1\x00"
GRANT_DOMAIN = b"meshguard invitation grant v1\x00"
BIND_DOMAIN = b"meshguard invitation binding v1\x00"
REVOKE_DOMAIN = b"meshguard revocation v1\x00"

#: Longest signed text accepted (a record with many addresses stays far below it).
MAX_TEXT = 4096
MAX_ADDRESSES = 16
MAX_ROLES = 8
#: Roles a record may carry; unknown roles are refused so a typo never silently grants nothing.
ROLES = frozenset({"introducer", "relay"})

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class AuthorityError(ValueError):
    """Local misuse (a bad name, address or role given to a signing function)."""


def valid_name(name: object) -> bool:
    """Member and mesh names are DNS labels (lower case), so ``NAME.MESH`` resolves."""
    return isinstance(name, str) and _LABEL.match(name) is not None


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text: str) -> bytes | None:
    """Strict unpadded base64url, or None."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def authority_key_text(key: VerifyKey | bytes) -> str:
    """How an authority's public key is written in configs and invitations (standard base64)."""
    raw = bytes(key) if isinstance(key, VerifyKey) else key
    return base64.b64encode(raw).decode()


def parse_authority_key(text: str) -> VerifyKey | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return VerifyKey(raw) if len(raw) == 32 else None


@dataclass(frozen=True)
class Member:
    """A verified member: who it is, its WireGuard key, its addresses and roles, until when."""

    mesh: str
    name: str
    key: bytes
    addresses: tuple[Network, ...]
    roles: frozenset[str]
    expires: int
    #: The signed text this member was read from (what introducers pass on unchanged).
    text: str


@dataclass(frozen=True)
class Grant:
    """A verified invitation grant (a member record still waiting for its key)."""

    mesh: str
    name: str
    addresses: tuple[Network, ...]
    roles: frozenset[str]
    expires: int
    invite_key: bytes
    join_by: int
    text: str


@dataclass(frozen=True)
class Revocation:
    mesh: str
    key: bytes
    name: str
    issued: int
    text: str


# ---- signing (the admin's side) ----------------------------------------------------------------


def _check_fields(
    mesh: str, name: str, addresses: tuple[Network, ...], roles: frozenset[str]
) -> None:
    if not valid_name(mesh):
        raise AuthorityError(f"mesh name {mesh!r} is not a DNS label (a-z, 0-9, -)")
    if not valid_name(name):
        raise AuthorityError(f"member name {name!r} is not a DNS label (a-z, 0-9, -)")
    if not 0 < len(addresses) <= MAX_ADDRESSES:
        raise AuthorityError(f"a member needs 1 to {MAX_ADDRESSES} addresses")
    if not roles <= ROLES:
        raise AuthorityError(f"unknown roles {sorted(roles - ROLES)}; known: {sorted(ROLES)}")


def _body(
    kind: str,
    mesh: str,
    name: str,
    addresses: tuple[Network, ...],
    roles: frozenset[str],
    expires: int,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "mesh": mesh,
        "name": name,
        "addresses": [str(a) for a in addresses],
        "roles": sorted(roles),
        "expires": expires,
    }


def _seal(signing_key: SigningKey, domain: bytes, body: bytes) -> str:
    signature = signing_key.sign(domain + body).signature
    return f"{b64u(body)}.{b64u(signature)}"


def sign_member(
    authority: SigningKey,
    mesh: str,
    name: str,
    key: bytes,
    addresses: tuple[Network, ...],
    roles: frozenset[str],
    expires: int,
) -> str:
    """A member record for a known WireGuard key (the first introducer, ``members add``)."""
    _check_fields(mesh, name, addresses, roles)
    if len(key) != 32:
        raise AuthorityError("a WireGuard public key is 32 bytes")
    body = _body("member", mesh, name, addresses, roles, expires)
    body["key"] = b64u(key)
    return _seal(authority, RECORD_DOMAIN, canonical(body))


def sign_grant(
    authority: SigningKey,
    mesh: str,
    name: str,
    addresses: tuple[Network, ...],
    roles: frozenset[str],
    expires: int,
    invite_key: bytes,
    join_by: int,
) -> str:
    """A grant for an invitation whose verify key is ``invite_key``."""
    _check_fields(mesh, name, addresses, roles)
    if len(invite_key) != 32:
        raise AuthorityError("an invitation key is 32 bytes")
    body = _body("grant", mesh, name, addresses, roles, expires)
    body["invite"] = b64u(invite_key)
    body["join_by"] = join_by
    return _seal(authority, GRANT_DOMAIN, canonical(body))


def bind(invitation: SigningKey, wireguard_key: bytes) -> bytes:
    """The joiner's proof that it holds the invitation: its WireGuard key, signed."""
    message = BIND_DOMAIN + bytes(invitation.verify_key) + wireguard_key
    return bytes(invitation.sign(message).signature)


def bound_record(grant_text: str, wireguard_key: bytes, binding: bytes) -> str:
    """A grant plus the joiner's key and binding: the text of an invited member's record."""
    return f"{grant_text}.{b64u(wireguard_key)}.{b64u(binding)}"


def sign_revocation(authority: SigningKey, mesh: str, key: bytes, name: str, issued: int) -> str:
    if not valid_name(mesh) or len(key) != 32:
        raise AuthorityError("a revocation needs a mesh name and a 32-byte key")
    body = {"kind": "revoke", "mesh": mesh, "key": b64u(key), "name": name, "issued": issued}
    return _seal(authority, REVOKE_DOMAIN, canonical(body))


# ---- verifying (everyone's side; input is hostile) ---------------------------------------------


def _verified_body(authority: VerifyKey, domain: bytes, body_b64: str, sig_b64: str) -> Any:
    body, signature = unb64u(body_b64), unb64u(sig_b64)
    if body is None or signature is None or len(signature) != 64:
        return None
    try:
        authority.verify(domain + body, signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _common(
    value: dict[str, Any], kind: str, mesh: str
) -> tuple[str, tuple[Network, ...], frozenset[str], int] | None:
    """The fields records and grants share, checked; None if any is wrong."""
    if value.get("kind") != kind or value.get("mesh") != mesh:
        return None
    name, raw_addresses, raw_roles = value.get("name"), value.get("addresses"), value.get("roles")
    expires = _int(value.get("expires"))
    if not valid_name(name) or expires is None:
        return None
    if not isinstance(raw_addresses, list) or not 0 < len(raw_addresses) <= MAX_ADDRESSES:
        return None
    if not isinstance(raw_roles, list) or len(raw_roles) > MAX_ROLES:
        return None
    addresses: list[Network] = []
    for text in raw_addresses:
        if not isinstance(text, str):
            return None
        try:
            addresses.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            return None
    roles = frozenset(r for r in raw_roles if isinstance(r, str))
    if len(roles) != len(raw_roles) or not roles <= ROLES:
        return None
    assert isinstance(name, str)
    return name, tuple(addresses), roles, expires


def verify_grant(authority: VerifyKey, mesh: str, text: str) -> Grant | None:
    """A grant signed by ``authority`` for ``mesh`` (expiry is the caller's to check)."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        return None
    parts = text.split(".")
    if len(parts) != 2:
        return None
    value = _verified_body(authority, GRANT_DOMAIN, parts[0], parts[1])
    if value is None:
        return None
    common = _common(value, "grant", mesh)
    invite = unb64u(value.get("invite", ""))
    join_by = _int(value.get("join_by"))
    if common is None or invite is None or len(invite) != 32 or join_by is None:
        return None
    name, addresses, roles, expires = common
    return Grant(mesh, name, addresses, roles, expires, invite, join_by, text)


def verify_member(authority: VerifyKey, mesh: str, text: object, now: float) -> Member | None:
    """The member a record describes, if ``authority`` signed it for ``mesh`` and it has not
    expired at ``now`` (seconds since the epoch); None for anything else."""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        return None
    parts = text.split(".")
    if len(parts) == 2:
        value = _verified_body(authority, RECORD_DOMAIN, parts[0], parts[1])
        if value is None:
            return None
        common = _common(value, "member", mesh)
        key = unb64u(value.get("key", ""))
        if common is None or key is None or len(key) != 32:
            return None
        name, addresses, roles, expires = common
    elif len(parts) == 4:
        grant = verify_grant(authority, mesh, f"{parts[0]}.{parts[1]}")
        key, binding = unb64u(parts[2]), unb64u(parts[3])
        if grant is None or key is None or len(key) != 32 or binding is None:
            return None
        try:
            VerifyKey(grant.invite_key).verify(BIND_DOMAIN + grant.invite_key + key, binding)
        except (BadSignatureError, CryptoError, ValueError, TypeError):
            return None
        name, addresses, roles, expires = grant.name, grant.addresses, grant.roles, grant.expires
    else:
        return None
    if expires <= now:
        return None
    return Member(mesh, name, key, addresses, roles, expires, text)


def verify_revocation(authority: VerifyKey, mesh: str, text: object) -> Revocation | None:
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        return None
    parts = text.split(".")
    if len(parts) != 2:
        return None
    value = _verified_body(authority, REVOKE_DOMAIN, parts[0], parts[1])
    if value is None or value.get("kind") != "revoke" or value.get("mesh") != mesh:
        return None
    key = unb64u(value.get("key", ""))
    name, issued = value.get("name"), _int(value.get("issued"))
    if key is None or len(key) != 32 or not isinstance(name, str) or issued is None:
        return None
    return Revocation(mesh, key, name, issued, text)
