"""Does the router offer port mapping? One question per protocol, asked of the default gateway.

netcheck reports which port mapping protocols the gateway answers: UPnP-IGD (an SSDP search for
an InternetGatewayDevice), NAT-PMP (an external address request, RFC 6886) and PCP (an ANNOUNCE,
RFC 6887). Each is one datagram out and at most one answer read; nothing is mapped. The parsers
take the router's answers as hostile input: anything malformed is "no answer".
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from typing import Any

NATPMP_PORT = 5351
SSDP = ("239.255.255.250", 1900)
SSDP_SEARCH = (
    b"M-SEARCH * HTTP/1.1\r\n"
    b"HOST: 239.255.255.250:1900\r\n"
    b'MAN: "ssdp:discover"\r\n'
    b"MX: 1\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
)

_NATPMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


def natpmp_request() -> bytes:
    """NAT-PMP version 0, opcode 0: "what is your external address?"."""
    return b"\x00\x00"


def parse_natpmp(data: bytes) -> dict[str, Any] | None:
    """A NAT-PMP external address answer: its result and the address; None if not one."""
    if len(data) < 12 or data[0] != 0 or data[1] != 128:
        return None
    (result,) = struct.unpack("!H", data[2:4])
    answer: dict[str, Any] = {"result": _NATPMP_RESULTS.get(result, f"error {result}")}
    if result == 0:
        answer["external_address"] = str(ipaddress.IPv4Address(data[8:12]))
    return answer


def pcp_request(client: str) -> bytes:
    """A PCP ANNOUNCE from ``client`` (the address we reach the gateway from)."""
    address = ipaddress.ip_address(client)
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(f"::ffff:{address}")
    return struct.pack("!BBHI16s", 2, 0, 0, 0, address.packed)


def parse_pcp(data: bytes) -> dict[str, Any] | None:
    """A PCP answer to ANNOUNCE: its result code; None if not one."""
    if len(data) < 24 or data[0] != 2 or data[1] != 0x80:
        return None
    return {"result": "success" if data[3] == 0 else f"error {data[3]}"}


def parse_ssdp(data: bytes) -> dict[str, Any] | None:
    """An SSDP answer from an InternetGatewayDevice: its description URL; None if not one."""
    lines = data.decode("utf-8", "replace").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/1.1 200"):
        return None
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    if "InternetGatewayDevice" not in headers.get("st", "") + headers.get("usn", ""):
        return None
    return {"location": headers.get("location", "")[:200]}


def default_gateway() -> str | None:
    """The IPv4 default route's gateway (``ip -j route``), or None."""
    try:
        output = subprocess.run(
            ["ip", "-j", "-4", "route", "show", "default"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        routes = json.loads(output)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    for route in routes if isinstance(routes, list) else []:
        gateway = route.get("gateway") if isinstance(route, dict) else None
        if isinstance(gateway, str):
            return gateway
    return None


def probe_port_mapping(
    gateway: str | None = None,
    timeout: float = 1.2,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Ask the gateway over each protocol at once; wait up to ``timeout`` for the answers."""
    gateway = gateway if gateway is not None else default_gateway()
    if gateway is None:
        return {"gateway": None, "offered": []}
    found: dict[str, Any] = {}
    pmp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ssdp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pmp.setblocking(False)
        ssdp.setblocking(False)
        try:
            pmp.connect((gateway, NATPMP_PORT))
            client = pmp.getsockname()[0]
            pmp.send(natpmp_request())
            pmp.send(pcp_request(client))
        except OSError:
            pass
        try:
            ssdp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            ssdp.sendto(SSDP_SEARCH, SSDP)
        except OSError:
            pass
        end = clock() + timeout
        while len(found) < 3 and (left := end - clock()) > 0:
            readable, _, _ = select.select([pmp, ssdp], [], [], left)
            for sock in readable:
                try:
                    data, source = sock.recvfrom(2048)
                except OSError:
                    continue
                if sock is pmp:
                    if (answer := parse_natpmp(data)) is not None:
                        found["NAT-PMP"] = answer
                    elif (answer := parse_pcp(data)) is not None:
                        found["PCP"] = answer
                elif source[0] == gateway and (answer := parse_ssdp(data)) is not None:
                    found["UPnP-IGD"] = answer
    finally:
        pmp.close()
        ssdp.close()
    offered = [name for name in ("UPnP-IGD", "NAT-PMP", "PCP") if name in found]
    return {"gateway": gateway, "offered": offered, "answers": found}
