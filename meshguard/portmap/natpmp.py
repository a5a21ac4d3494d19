"""NAT-PMP (RFC 6886) messages: encode requests, parse the gateway's answers.

Sans-I/O: no sockets, no clock. A gateway's answer is untrusted input; :func:`parse_response`
returns None for anything that is not a well-formed NAT-PMP response and never raises.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

#: The gateway's NAT-PMP (and PCP) port.
SERVER_PORT: Final = 5351
#: Where gateways multicast announcements (to 224.0.0.1): a new public address (NAT-PMP), a
#: restart (PCP ANNOUNCE).
CLIENT_PORT: Final = 5350
ALL_HOSTS: Final = "224.0.0.1"
VERSION: Final = 0
OP_EXTERNAL_ADDRESS: Final = 0
OP_MAP_UDP: Final = 1
OP_MAP_TCP: Final = 2
#: Result codes (RFC 6886 section 3.5).
SUCCESS: Final = 0
UNSUPPORTED_VERSION: Final = 1
NOT_AUTHORIZED: Final = 2
NETWORK_FAILURE: Final = 3
OUT_OF_RESOURCES: Final = 4
UNSUPPORTED_OPCODE: Final = 5

RESULT_NAMES: Final = {
    SUCCESS: "success",
    UNSUPPORTED_VERSION: "unsupported version",
    NOT_AUTHORIZED: "not authorized or refused",
    NETWORK_FAILURE: "network failure",
    OUT_OF_RESOURCES: "out of resources",
    UNSUPPORTED_OPCODE: "unsupported opcode",
}

_MAP_REQUEST = struct.Struct("!BBHHHI")
_HEADER = struct.Struct("!BBHI")
_MAP_TAIL = struct.Struct("!HHI")


@dataclass(frozen=True)
class ExternalAddressResponse:
    """The gateway's answer to "what is your public address?"."""

    result: int
    epoch: int
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class MapResponse:
    """The gateway's answer to a mapping request (or its removal, lifetime 0)."""

    opcode: int
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


def encode_external_address_request() -> bytes:
    return bytes((VERSION, OP_EXTERNAL_ADDRESS))


def encode_map_request(
    internal_port: int, external_port: int, lifetime: int, *, udp: bool = True
) -> bytes:
    """A MAP request; ``lifetime`` 0 with ``external_port`` 0 removes the mapping (RFC 6886
    section 3.4). Out-of-range arguments are local misuse and raise."""
    if not 0 < internal_port < 65536 or not 0 <= external_port < 65536:
        raise ValueError("ports must be 1..65535 (external may be 0)")
    if not 0 <= lifetime < 2**32:
        raise ValueError("lifetime out of range")
    opcode = OP_MAP_UDP if udp else OP_MAP_TCP
    return _MAP_REQUEST.pack(VERSION, opcode, 0, internal_port, external_port, lifetime)


def parse_response(data: bytes) -> ExternalAddressResponse | MapResponse | None:
    """A well-formed NAT-PMP response, or None.

    Error answers may be cut short (some gateways send only the 8-byte header with a non-zero
    result); success must be complete, and a successful mapping must name real ports.
    """
    if len(data) < _HEADER.size:
        return None
    version, op, result, epoch = _HEADER.unpack_from(data)
    if version != VERSION or op < 128:
        return None
    opcode = op - 128
    if opcode == OP_EXTERNAL_ADDRESS:
        if len(data) < 12:
            if result == SUCCESS:
                return None
            return ExternalAddressResponse(result, epoch, ipaddress.IPv4Address(0))
        return ExternalAddressResponse(result, epoch, ipaddress.IPv4Address(data[8:12]))
    if opcode in (OP_MAP_UDP, OP_MAP_TCP):
        if len(data) < 16:
            if result == SUCCESS:
                return None
            return MapResponse(opcode, result, epoch, 0, 0, 0)
        internal, external, lifetime = _MAP_TAIL.unpack_from(data, 8)
        if result == SUCCESS and (internal == 0 or (external == 0 and lifetime != 0)):
            return None
        return MapResponse(opcode, result, epoch, internal, external, lifetime)
    return None
