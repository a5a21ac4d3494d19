"""The WireGuard cross-platform userspace API (UAPI), without I/O.

The stock ``wg`` tool talks to userspace implementations over a UNIX stream socket with a small
``key=value`` text protocol (wireguard.com/xplatform). This module turns that text into typed
operations and a device snapshot back into text, so the socket server stays a thin adapter and the
device engine never sees the wire format.

One deliberate difference from wireguard-go: a ``set`` request is parsed and validated completely
before anything is applied, so a request with a bad line changes nothing. wireguard-go applies the
lines one by one and stops at the first bad one, leaving the device half configured.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Final, Literal, Protocol

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "ERRNO_UNKNOWN",
    "UNSET",
    "DeviceStatus",
    "GetRequest",
    "InvalidRequest",
    "Operation",
    "PeerStatus",
    "PeerUpdate",
    "ReplacePeers",
    "Request",
    "SetFwmark",
    "SetListenPort",
    "SetPrivateKey",
    "SetRequest",
    "UAPIBackend",
    "UAPIError",
    "UAPIRequestParser",
    "Unset",
    "format_endpoint",
    "format_error",
    "format_get",
    "format_set",
    "parse_endpoint",
    "parse_get",
    "parse_set",
]

Network = IPv4Network | IPv6Network
Endpoint = tuple[str, int]

#: wireguard-go's catch-all error code ("ENOANO"), used for failures that are not a UAPIError.
ERRNO_UNKNOWN: Final = 55

#: The largest request the stream parser buffers. ``wg setconf`` with 100,000 allowed IPs is about
#: 3 MB, so this leaves ample room while bounding what one client can make us hold.
DEFAULT_MAX_REQUEST_SIZE: Final = 64 * 1024 * 1024

_KEY_LEN: Final = 32
_ZERO_KEY: Final = bytes(_KEY_LEN)
_HEX_KEY = re.compile(rb"[0-9a-fA-F]{64}")
_DECIMAL = re.compile(rb"[0-9]{1,20}")
_PREFIX_LEN = re.compile(r"0|[1-9][0-9]{0,2}")
_ENDPOINT_V6 = re.compile(r"\[([0-9a-fA-F:.]+(?:%[^\[\]%/]+)?)\]:([0-9]{1,5})")
_ENDPOINT_V4 = re.compile(r"([0-9.]+):([0-9]{1,5})")


class Unset(enum.Enum):
    """The type of :data:`UNSET`: a field the request did not mention, distinct from ``None``."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: "This request leaves the value unchanged", where ``None`` already means "clear it".
UNSET: Final = Unset.UNSET


class UAPIError(Exception):
    """A request failed with a positive ``errno``; the wire carries it negated, as wg-go does.

    The message names the offending key and line but never the value, which may be a secret.
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


# --- get ---------------------------------------------------------------------------------------


@dataclass
class PeerStatus:
    """One peer as ``wg show`` reports it."""

    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: Endpoint | None = None
    #: Unix seconds with fraction of the last completed handshake; 0.0 = never.
    last_handshake_time: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    allowed_ips: list[Network] = field(default_factory=list)


@dataclass
class DeviceStatus:
    """A snapshot of the device for a ``get`` request."""

    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerStatus] = field(default_factory=list)


def format_endpoint(endpoint: Endpoint) -> str:
    """``1.2.3.4:51820`` or ``[2001:db8::1]:51820`` (a v6 zone stays inside the brackets)."""
    host, port = endpoint
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def format_get(status: DeviceStatus) -> bytes:
    """The reply to ``get=1``, byte for byte as wireguard-go writes it, ending in ``errno=0``."""
    out: list[str] = []
    if status.private_key is not None and status.private_key != _ZERO_KEY:
        out.append(f"private_key={status.private_key.hex()}\n")
    if status.listen_port:
        out.append(f"listen_port={status.listen_port}\n")
    if status.fwmark:
        out.append(f"fwmark={status.fwmark}\n")
    for peer in status.peers:
        psk = peer.preshared_key if peer.preshared_key is not None else _ZERO_KEY
        out.append(f"public_key={peer.public_key.hex()}\n")
        out.append(f"preshared_key={psk.hex()}\n")
        out.append("protocol_version=1\n")
        if peer.endpoint is not None:
            out.append(f"endpoint={format_endpoint(peer.endpoint)}\n")
        sec, nsec = _split_time(peer.last_handshake_time)
        out.append(f"last_handshake_time_sec={sec}\n")
        out.append(f"last_handshake_time_nsec={nsec}\n")
        out.append(f"tx_bytes={peer.tx_bytes}\n")
        out.append(f"rx_bytes={peer.rx_bytes}\n")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive}\n")
        out.extend(f"allowed_ip={net}\n" for net in peer.allowed_ips)
    out.append("errno=0\n\n")
    return "".join(out).encode("utf-8")


def format_error(code: int) -> bytes:
    """The reply to a failed request: the positive ``code`` written negated, as ``wg`` expects."""
    return f"errno={-abs(code)}\n\n".encode("ascii")


def _split_time(t: float) -> tuple[int, int]:
    if not t > 0.0:  # also catches NaN
        return 0, 0
    sec = int(t)
    nsec = min(round((t - sec) * 1e9), 999_999_999)
    return sec, nsec


# --- set ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetPrivateKey:
    """``private_key=``; ``None`` (all zeros on the wire) removes the identity."""

    key: bytes | None


@dataclass(frozen=True)
class SetListenPort:
    """``listen_port=``; 0 means a random port. A failed bind is EADDRINUSE."""

    port: int


@dataclass(frozen=True)
class SetFwmark:
    """``fwmark=``; 0 turns it off."""

    mark: int


@dataclass(frozen=True)
class ReplacePeers:
    """``replace_peers=true``: remove every peer before the following peer blocks."""


@dataclass
class PeerUpdate:
    """One ``public_key=`` block, reduced to its net effect.

    How a backend applies it, matching wireguard-go:

    - a block whose key equals the device's own public key (after any earlier ``SetPrivateKey`` in
      the same request) is ignored;
    - ``remove``: remove the peer; every other field is left at its default;
    - ``update_only``: if the peer does not exist, ignore the block;
    - otherwise create the peer if needed, then apply the fields that are not UNSET/None;
    - ``replace_allowed_ips``: drop all the peer's prefixes first, then apply ``allowed_ips`` in
      order (``True`` adds, ``False`` removes; the networks already have host bits masked).
    """

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    #: ``None`` removes the preshared key (all zeros on the wire).
    preshared_key: bytes | Literal[Unset.UNSET] | None = UNSET
    #: UAPI has no way to clear an endpoint, so this is an endpoint or UNSET.
    endpoint: Endpoint | Literal[Unset.UNSET] = UNSET
    #: ``None`` = unchanged; 0 turns persistent keepalive off.
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[tuple[bool, Network]] = field(default_factory=list)


Operation = SetPrivateKey | SetListenPort | SetFwmark | ReplacePeers | PeerUpdate


class UAPIBackend(Protocol):
    """What the UAPI server needs from the device engine."""

    def status(self) -> DeviceStatus:
        """A consistent snapshot of the device and its peers."""
        ...

    def apply(self, operations: list[Operation]) -> None:
        """Apply a validated request in order; raise UAPIError (e.g. EADDRINUSE) to fail it."""
        ...


def _einval(lineno: int, key: bytes, what: str = "invalid value") -> UAPIError:
    name = key.decode("ascii", "replace")[:40]
    return UAPIError(errno.EINVAL, f"line {lineno}: {what} for {name!r}")


def _parse_key(lineno: int, key: bytes, value: bytes) -> bytes:
    if _HEX_KEY.fullmatch(value) is None:
        raise _einval(lineno, key, "expected 64 hex digits")
    return bytes.fromhex(value.decode("ascii"))


def _parse_uint(lineno: int, key: bytes, value: bytes, maximum: int) -> int:
    if _DECIMAL.fullmatch(value) is None:
        raise _einval(lineno, key, "expected a decimal number")
    number = int(value)
    if number > maximum:
        raise _einval(lineno, key, "number out of range")
    return number


def _parse_true(lineno: int, key: bytes, value: bytes) -> None:
    if value != b"true":
        raise _einval(lineno, key, "only 'true' is valid")


def parse_endpoint(text: str) -> Endpoint:
    """A numeric ``ip:port`` or ``[ip6]:port`` (with optional ``%zone``); raises ValueError.

    ``wg`` resolves names before sending, so, like wireguard-go, only numeric forms are accepted.
    """
    match = _ENDPOINT_V6.fullmatch(text)
    if match is not None:
        host: str = str(ipaddress.IPv6Address(match.group(1)))
    else:
        match = _ENDPOINT_V4.fullmatch(text)
        if match is None:
            raise ValueError("not a numeric endpoint")
        host = str(ipaddress.IPv4Address(match.group(1)))
    port = int(match.group(2))
    if port > 65535:
        raise ValueError("port out of range")
    return host, port


def _parse_network(text: str) -> Network:
    """``ip/len`` with host bits masked, as wireguard-go's trie stores it; raises ValueError."""
    address, slash, length = text.partition("/")
    if not slash or _PREFIX_LEN.fullmatch(length) is None or "%" in address:
        raise ValueError("not a prefix")
    # The constructors also take netmasks and bare addresses; the checks above exclude them.
    if ":" in address:
        return IPv6Network(text, strict=False)
    return IPv4Network(text, strict=False)


_DEVICE_KEYS: Final = frozenset({b"private_key", b"listen_port", b"fwmark", b"replace_peers"})


def parse_set(body: bytes) -> list[Operation]:
    """Parse the lines of a ``set=1`` request (without ``set=1`` and the final blank line).

    Raises UAPIError: EPROTO for a line without ``=``, EINVAL for an unknown key, a bad value, or a
    device key after the first ``public_key``. Nothing is applied here; see the module docstring.
    """
    if body.endswith(b"\n"):
        body = body[:-1]
    operations: list[Operation] = []
    if not body:
        return operations
    peer: PeerUpdate | None = None
    removed = False  # the current block said remove=true: validate the rest, record nothing
    for lineno, line in enumerate(body.split(b"\n"), start=1):
        key, eq, value = line.partition(b"=")
        if not eq:
            raise UAPIError(errno.EPROTO, f"line {lineno}: no '=' in line")
        if key == b"public_key":
            peer = PeerUpdate(public_key=_parse_key(lineno, key, value))
            removed = False
            operations.append(peer)
        elif peer is None:
            if key == b"private_key":
                private = _parse_key(lineno, key, value)
                operations.append(SetPrivateKey(None if private == _ZERO_KEY else private))
            elif key == b"listen_port":
                operations.append(SetListenPort(_parse_uint(lineno, key, value, 0xFFFF)))
            elif key == b"fwmark":
                operations.append(SetFwmark(_parse_uint(lineno, key, value, 0xFFFFFFFF)))
            elif key == b"replace_peers":
                _parse_true(lineno, key, value)
                operations.append(ReplacePeers())
            else:
                raise _einval(lineno, key, "unknown device key")
        elif key == b"allowed_ip":
            add = not value.startswith(b"-")
            try:
                network = _parse_network((value if add else value[1:]).decode("ascii"))
            except ValueError:  # UnicodeDecodeError is a ValueError
                raise _einval(lineno, key) from None
            if not removed:
                peer.allowed_ips.append((add, network))
        elif key == b"endpoint":
            try:
                endpoint = parse_endpoint(value.decode("ascii"))
            except ValueError:
                raise _einval(lineno, key) from None
            if not removed:
                peer.endpoint = endpoint
        elif key == b"persistent_keepalive_interval":
            interval = _parse_uint(lineno, key, value, 0xFFFF)
            if not removed:
                peer.persistent_keepalive = interval
        elif key == b"preshared_key":
            psk = _parse_key(lineno, key, value)
            if not removed:
                peer.preshared_key = None if psk == _ZERO_KEY else psk
        elif key == b"replace_allowed_ips":
            _parse_true(lineno, key, value)
            if not removed:
                peer.replace_allowed_ips = True
                peer.allowed_ips.clear()
        elif key == b"remove":
            _parse_true(lineno, key, value)
            if not removed:
                # wg-go ignores the rest of the block, so the block's net effect is the removal.
                removed = True
                operations[-1] = peer = PeerUpdate(public_key=peer.public_key, remove=True)
        elif key == b"update_only":
            _parse_true(lineno, key, value)
            if not removed:
                peer.update_only = True
        elif key == b"protocol_version":
            if value != b"1":
                raise _einval(lineno, key, "unsupported protocol version")
        elif key in _DEVICE_KEYS:
            raise _einval(lineno, key, "device key after a peer")
        else:
            raise _einval(lineno, key, "unknown peer key")
    return operations


# --- the client side: used by tests, tools and two-node setups driven through UAPI text ----------


def format_set(operations: list[Operation]) -> bytes:
    """A complete ``set=1`` request; :func:`parse_set` reads its body back unchanged."""
    out = ["set=1\n"]
    for op in operations:
        match op:
            case SetPrivateKey(key=key):
                out.append(f"private_key={(key or _ZERO_KEY).hex()}\n")
            case SetListenPort(port=port):
                out.append(f"listen_port={port}\n")
            case SetFwmark(mark=mark):
                out.append(f"fwmark={mark}\n")
            case ReplacePeers():
                out.append("replace_peers=true\n")
            case PeerUpdate():
                out.append(f"public_key={op.public_key.hex()}\n")
                if op.remove:
                    out.append("remove=true\n")
                    continue
                if op.update_only:
                    out.append("update_only=true\n")
                if op.preshared_key is not UNSET:
                    out.append(f"preshared_key={(op.preshared_key or _ZERO_KEY).hex()}\n")
                if op.endpoint is not UNSET:
                    out.append(f"endpoint={format_endpoint(op.endpoint)}\n")
                if op.persistent_keepalive is not None:
                    out.append(f"persistent_keepalive_interval={op.persistent_keepalive}\n")
                if op.replace_allowed_ips:
                    out.append("replace_allowed_ips=true\n")
                out.extend(f"allowed_ip={'' if add else '-'}{net}\n" for add, net in op.allowed_ips)
    out.append("\n")
    return "".join(out).encode("utf-8")


def parse_get(reply: bytes) -> DeviceStatus:
    """Read a ``get`` reply as ``wg`` does: unknown keys are ignored; a non-zero errno raises.

    Raises UAPIError: EPROTO for a malformed or truncated reply, the reply's errno otherwise.
    """
    text, blank, _ = reply.partition(b"\n\n")
    if not blank:
        raise UAPIError(errno.EPROTO, "reply does not end with a blank line")
    status = DeviceStatus()
    peer: PeerStatus | None = None
    sec = nsec = 0
    code: int | None = None
    for line in text.split(b"\n"):
        key, eq, raw = line.partition(b"=")
        if not eq:
            raise UAPIError(errno.EPROTO, "line without '=' in reply")
        try:
            value = raw.decode("ascii")
            if key == b"errno":
                code = int(value)
            elif key == b"public_key":
                peer = PeerStatus(public_key=bytes.fromhex(value))
                sec = nsec = 0
                status.peers.append(peer)
            elif peer is None:
                if key == b"private_key":
                    private = bytes.fromhex(value)
                    status.private_key = None if private == _ZERO_KEY else private
                elif key == b"listen_port":
                    status.listen_port = int(value)
                elif key == b"fwmark":
                    status.fwmark = int(value)
            elif key == b"preshared_key":
                psk = bytes.fromhex(value)
                peer.preshared_key = None if psk == _ZERO_KEY else psk
            elif key == b"endpoint":
                peer.endpoint = parse_endpoint(value)
            elif key in (b"last_handshake_time_sec", b"last_handshake_time_nsec"):
                if key == b"last_handshake_time_sec":
                    sec = int(value)
                else:
                    nsec = int(value)
                peer.last_handshake_time = sec + nsec / 1e9
            elif key == b"tx_bytes":
                peer.tx_bytes = int(value)
            elif key == b"rx_bytes":
                peer.rx_bytes = int(value)
            elif key == b"persistent_keepalive_interval":
                peer.persistent_keepalive = int(value)
            elif key == b"allowed_ip":
                peer.allowed_ips.append(_parse_network(value))
        except ValueError:
            raise UAPIError(errno.EPROTO, f"bad value in reply for {key[:40]!r}") from None
    if code is None:
        raise UAPIError(errno.EPROTO, "reply has no errno")
    if code != 0:
        raise UAPIError(abs(code), "request failed")
    return status


# --- the request stream --------------------------------------------------------------------------


@dataclass(frozen=True)
class GetRequest:
    """``get=1`` followed by a blank line."""


@dataclass(frozen=True)
class SetRequest:
    """``set=1``, its lines (``body``, each ending in a newline), then a blank line."""

    body: bytes


@dataclass(frozen=True)
class InvalidRequest:
    """The stream is broken: reply with ``error`` and close, as there is no way to resync."""

    error: UAPIError


Request = GetRequest | SetRequest | InvalidRequest


class UAPIRequestParser:
    """Split a connection's byte stream into requests.

    A connection may carry several requests (``wg`` sends one, wireguard-go accepts many). After an
    :class:`InvalidRequest` the parser yields nothing more. Scanning resumes where it stopped, so a
    large ``setconf`` arriving in many chunks is scanned once, not once per chunk.
    """

    def __init__(self, max_request_size: int = DEFAULT_MAX_REQUEST_SIZE) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # no request terminator starts before this offset
        self._max = max_request_size
        self._broken = False

    @property
    def pending(self) -> bool:
        """Whether a partial request is buffered; it is dropped, not applied, on hang-up."""
        return bool(self._buffer) and not self._broken

    def feed(self, data: bytes) -> list[Request]:
        """Add bytes from the socket; return the requests they complete, in order."""
        if self._broken:
            return []
        self._buffer += data
        requests: list[Request] = []
        while self._buffer:
            request = self._next()
            if request is None:
                break
            requests.append(request)
            if isinstance(request, InvalidRequest):
                self._broken = True
                self._buffer.clear()
                break
        return requests

    def _next(self) -> Request | None:
        buf = self._buffer
        newline = buf.find(b"\n", 0, 6)
        if newline == -1:
            if len(buf) >= 6 or not (b"get=1".startswith(buf) or b"set=1".startswith(buf)):
                return InvalidRequest(UAPIError(errno.EPROTO, "unknown operation"))
            return None
        operation = bytes(buf[:newline])
        if operation == b"get=1":
            if len(buf) < 7:
                return None
            if buf[6] != 0x0A:
                return InvalidRequest(UAPIError(errno.EINVAL, "trailing data after get=1"))
            del buf[:7]
            self._scanned = 0
            return GetRequest()
        if operation != b"set=1":
            return InvalidRequest(UAPIError(errno.EPROTO, "unknown operation"))
        if len(buf) > 6 and buf[6] == 0x0A:  # "set=1\n\n": an empty set
            del buf[:7]
            self._scanned = 0
            return SetRequest(b"")
        end = buf.find(b"\n\n", max(self._scanned, 5))
        if end == -1:
            if len(buf) > self._max:
                return InvalidRequest(UAPIError(errno.EMSGSIZE, "request too large"))
            self._scanned = max(len(buf) - 1, 5)
            return None
        body = bytes(buf[6 : end + 1])
        del buf[: end + 2]
        self._scanned = 0
        return SetRequest(body)
