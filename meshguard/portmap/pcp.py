"""PCP (RFC 6887) MAP messages: encode requests, parse the gateway's answers.

Sans-I/O: no sockets, no clock, no randomness (the caller passes the nonce). Only the MAP opcode
without options is spoken: it is all a node needs to open one inbound UDP port. A gateway's
answer is untrusted input; :func:`parse_response` returns None for anything that is not a
well-formed PCP MAP response, or :class:`OtherVersion` when a NAT-PMP-only gateway answered
(RFC 6887 section 9: then the client falls back to NAT-PMP), and never raises.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

VERSION: Final = 2
OP_ANNOUNCE: Final = 0
OP_MAP: Final = 1
PROTOCOL_UDP: Final = 17
PROTOCOL_TCP: Final = 6
NONCE_SIZE: Final = 12
#: Result codes (RFC 6887 section 7.4).
SUCCESS: Final = 0
UNSUPP_VERSION: Final = 1
NOT_AUTHORIZED: Final = 2
MALFORMED_REQUEST: Final = 3
UNSUPP_OPCODE: Final = 4
UNSUPP_OPTION: Final = 5
MALFORMED_OPTION: Final = 6
NETWORK_FAILURE: Final = 7
NO_RESOURCES: Final = 8
UNSUPP_PROTOCOL: Final = 9
USER_EX_QUOTA: Final = 10
CANNOT_PROVIDE_EXTERNAL: Final = 11
ADDRESS_MISMATCH: Final = 12
EXCESSIVE_REMOTE_PEERS: Final = 13

RESULT_NAMES: Final = {
    SUCCESS: "success",
    UNSUPP_VERSION: "unsupported version",
    NOT_AUTHORIZED: "not authorized",
    MALFORMED_REQUEST: "malformed request",
    UNSUPP_OPCODE: "unsupported opcode",
    UNSUPP_OPTION: "unsupported option",
    MALFORMED_OPTION: "malformed option",
    NETWORK_FAILURE: "network failure",
    NO_RESOURCES: "no resources",
    UNSUPP_PROTOCOL: "unsupported protocol",
    USER_EX_QUOTA: "user exceeded quota",
    CANNOT_PROVIDE_EXTERNAL: "cannot provide the suggested external address",
    ADDRESS_MISMATCH: "address mismatch (a NAT between us and the gateway)",
    EXCESSIVE_REMOTE_PEERS: "excessive remote peers",
}

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_MAP_BODY = struct.Struct("!12sB3xHH16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12x")
#: A MAP response without options.
RESPONSE_SIZE: Final = _RESPONSE_HEADER.size + _MAP_BODY.size
#: Largest PCP message (RFC 6887 section 7).
MAX_MESSAGE: Final = 1100

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class MapResponse:
    """The gateway's answer to a MAP request (a removal too: lifetime 0)."""

    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: Address


@dataclass(frozen=True)
class OtherVersion:
    """The gateway answered in another version (a NAT-PMP gateway answers version 0)."""

    version: int


def _wire(address: Address) -> bytes:
    """A 16-byte PCP address: IPv4 as IPv4-mapped IPv6 (RFC 6887 section 5)."""
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _unwire(data: bytes) -> Address:
    address = ipaddress.IPv6Address(data)
    return address.ipv4_mapped or address


def encode_map_request(
    *,
    client: Address,
    nonce: bytes,
    internal_port: int,
    lifetime: int,
    suggested_port: int = 0,
    suggested_address: Address | None = None,
    protocol: int = PROTOCOL_UDP,
) -> bytes:
    """A MAP request for ``client:internal_port``; lifetime 0 deletes the mapping. ``client``
    must be the request's source address, or the gateway answers ADDRESS_MISMATCH."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("the nonce is 12 bytes")
    if not 0 < internal_port < 65536 or not 0 <= suggested_port < 65536:
        raise ValueError("ports must be 1..65535 (the suggested port may be 0)")
    if not 0 <= lifetime < 2**32 or not 0 <= protocol < 256:
        raise ValueError("lifetime or protocol out of range")
    if suggested_address is None:
        suggested_address = (
            ipaddress.IPv4Address(0)
            if isinstance(client, ipaddress.IPv4Address)
            else ipaddress.IPv6Address(0)
        )
    header = _REQUEST_HEADER.pack(VERSION, OP_MAP, 0, lifetime, _wire(client))
    body = _MAP_BODY.pack(nonce, protocol, internal_port, suggested_port, _wire(suggested_address))
    return header + body


def parse_announce(data: bytes) -> int | None:
    """The epoch of an unsolicited ANNOUNCE (RFC 6887 section 14.1.3: a gateway that restarted
    or lost its state multicasts one to 224.0.0.1:5350), or None."""
    if len(data) < _RESPONSE_HEADER.size or len(data) > MAX_MESSAGE or len(data) % 4:
        return None
    version, op, _reserved, result, _lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if version != VERSION or op != 0x80 | OP_ANNOUNCE or result != SUCCESS:
        return None
    return int(epoch)


def parse_response(data: bytes) -> MapResponse | OtherVersion | None:
    """A well-formed MAP response (options after it are ignored), :class:`OtherVersion`, or
    None. A successful response must grant a real port and a lifetime."""
    if len(data) < 4 or len(data) > MAX_MESSAGE:
        return None
    if data[0] != VERSION:
        # RFC 6887 section 9: a NAT-PMP server answers a PCP request with its own version 0
        # and "unsupported version"; anything else claiming another version is noise.
        if data[0] == 0 and len(data) >= 4 and data[1] >= 128 and data[3] == 1:
            return OtherVersion(0)
        return None
    if len(data) < RESPONSE_SIZE or len(data) % 4:
        return None
    _version, op, _reserved, result, lifetime, epoch = _RESPONSE_HEADER.unpack_from(data)
    if op != 0x80 | OP_MAP:
        return None
    nonce, protocol, internal, external, address = _MAP_BODY.unpack_from(
        data, _RESPONSE_HEADER.size
    )
    if result == SUCCESS and (internal == 0 or (lifetime != 0 and external == 0)):
        # A grant names both ports; a successful deletion (lifetime 0) names ours.
        return None
    return MapResponse(
        result, lifetime, epoch, nonce, protocol, internal, external, _unwire(address)
    )
