"""Invitation lines and the join exchange, as data (the TLS transport is in
meshguard.adapters.join).

An invitation line carries what a fresh machine needs and nothing it could not be trusted
with: the mesh name and the authority's public key (to check every record it will receive), the
introducers to reach (host, WireGuard port, join port, the SHA-256 pin of the join service's
certificate, the introducer's WireGuard key) and the invitation's private key. That key never
crosses the network: the joiner proves it holds it by signing its new WireGuard key
(:func:`meshguard.mesh.authority.bind`), and the signature becomes part of its member record.

The join exchange is one request and one answer, each a JSON object on one line.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from meshguard.mesh.authority import b64u, canonical, unb64u, valid_name

PREFIX = "meshguard-invite-1:"
MAX_LINE = 4096
MAX_INTRODUCERS = 8
#: Longest join request or answer line.
MAX_MESSAGE = 65536


@dataclass(frozen=True)
class IntroducerAddress:
    """How a joiner reaches one introducer."""

    host: str
    wg_port: int
    join_port: int
    pin: bytes
    wg_key: bytes

    def to_json(self) -> list[Any]:
        return [self.host, self.wg_port, self.join_port, b64u(self.pin), b64u(self.wg_key)]


@dataclass(frozen=True)
class Invitation:
    mesh: str
    authority: bytes
    introducers: tuple[IntroducerAddress, ...]
    secret: bytes = b""

    def line(self) -> str:
        value = {
            "mesh": self.mesh,
            "authority": b64u(self.authority),
            "introducers": [i.to_json() for i in self.introducers],
            "secret": b64u(self.secret),
        }
        return PREFIX + b64u(canonical(value))

    def __repr__(self) -> str:  # never show the secret
        return f"Invitation(mesh={self.mesh!r}, introducers={len(self.introducers)})"


def _port(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    return None


def _host(value: object) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 253:
        return None
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    ok = all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )
    return value if ok else None


def _introducer(value: object) -> IntroducerAddress | None:
    if not isinstance(value, list) or len(value) != 5:
        return None
    host, wg_port, join_port = _host(value[0]), _port(value[1]), _port(value[2])
    pin = unb64u(value[3]) if isinstance(value[3], str) else None
    wg_key = unb64u(value[4]) if isinstance(value[4], str) else None
    if host is None or wg_port is None or join_port is None:
        return None
    if pin is None or len(pin) != 32 or wg_key is None or len(wg_key) != 32:
        return None
    return IntroducerAddress(host, wg_port, join_port, pin, wg_key)


def parse_invitation(text: str) -> Invitation | None:
    """The invitation a line carries, or None if it is not one (a typo, a cut line)."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text.startswith(PREFIX) or len(text) > MAX_LINE:
        return None
    raw = unb64u(text[len(PREFIX) :])
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    mesh, introducers = value.get("mesh"), value.get("introducers")
    authority_text, secret_text = value.get("authority"), value.get("secret")
    authority = unb64u(authority_text) if isinstance(authority_text, str) else None
    secret = unb64u(secret_text) if isinstance(secret_text, str) else None
    if not valid_name(mesh) or authority is None or len(authority) != 32:
        return None
    if secret is None or len(secret) != 32:
        return None
    if not isinstance(introducers, list) or not 0 < len(introducers) <= MAX_INTRODUCERS:
        return None
    parsed = [_introducer(i) for i in introducers]
    if any(i is None for i in parsed):
        return None
    assert isinstance(mesh, str)
    return Invitation(mesh, authority, tuple(i for i in parsed if i is not None), secret)


# ---- the join exchange ---------------------------------------------------------------------


@dataclass(frozen=True)
class JoinRequest:
    invite_key: bytes
    wg_key: bytes
    binding: bytes

    def encode(self) -> bytes:
        value = {
            "op": "join",
            "invite": b64u(self.invite_key),
            "key": b64u(self.wg_key),
            "binding": b64u(self.binding),
        }
        return canonical(value)


def parse_join_request(data: bytes) -> JoinRequest | None:
    value = _object(data)
    if value is None or value.get("op") != "join":
        return None
    fields = [value.get(k) for k in ("invite", "key", "binding")]
    if not all(isinstance(f, str) for f in fields):
        return None
    invite, key, binding = (unb64u(str(f)) for f in fields)
    if invite is None or key is None or binding is None:
        return None
    if len(invite) != 32 or len(key) != 32 or len(binding) != 64:
        return None
    return JoinRequest(invite, key, binding)


@dataclass(frozen=True)
class JoinAnswer:
    """What an introducer answers: the joiner's record and the mesh prefix, or an error."""

    record: str | None = None
    prefix: str | None = None
    #: Records of the introducers (their names and addresses, checked by the joiner).
    introducers: tuple[str, ...] = ()
    error: str | None = None

    def encode(self) -> bytes:
        if self.error is not None:
            return canonical({"error": self.error})
        return canonical(
            {"record": self.record, "prefix": self.prefix, "introducers": list(self.introducers)}
        )


def parse_join_answer(data: bytes) -> JoinAnswer | None:
    value = _object(data)
    if value is None:
        return None
    error = value.get("error")
    if error is not None:
        return JoinAnswer(error=error[:200]) if isinstance(error, str) else None
    record, prefix, introducers = value.get("record"), value.get("prefix"), value.get("introducers")
    if not isinstance(record, str) or not isinstance(prefix, str):
        return None
    try:
        ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return None
    if not isinstance(introducers, list) or not all(isinstance(i, str) for i in introducers):
        return None
    return JoinAnswer(record, prefix, tuple(introducers[:MAX_INTRODUCERS]))


def _object(data: bytes) -> dict[str, Any] | None:
    if len(data) > MAX_MESSAGE:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_wg_key_text(text: str) -> bytes | None:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None
