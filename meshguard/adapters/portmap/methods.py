"""The three ways to ask a gateway for a port mapping, behind one small interface.

Each method turns "map UDP port P, suggest external port E, for L seconds" into a
:class:`Grant` (or a failure whose text a user can read in ``meshguard status``), and removes it
again. PCP and NAT-PMP talk to the default gateway's port 5351 through
:func:`meshguard.adapters.portmap.exchange.exchange`; UPnP-IGD goes through
:mod:`meshguard.adapters.portmap.upnp`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from meshguard.adapters.portmap.exchange import RETRANSMIT, ListenUDP, exchange
from meshguard.portmap import natpmp, pcp


@dataclass(frozen=True)
class Grant:
    """A mapping as the gateway granted it. ``lifetime`` 0: until removed (UPnP's permanent)."""

    external_address: str
    external_port: int
    lifetime: int


class MappingRefusedError(Exception):
    """The gateway answered but would not map (the text names its reason)."""


class NoGatewayError(Exception):
    """There is no default gateway to ask."""

    def __str__(self) -> str:
        return "no default gateway"


class Method(Protocol):
    """One port-mapping protocol."""

    name: str

    def request(self, internal_port: int, external_port: int, lifetime: int) -> Deferred[Grant]:
        """Create or renew the mapping; fails with an exception whose text says why."""

    def release(self, internal_port: int, external_port: int) -> Deferred[None]:
        """Remove the mapping (best effort)."""


class PcpMethod:
    """PCP MAP (RFC 6887) for UDP, to the default gateway."""

    name = "PCP"

    def __init__(
        self,
        clock: IReactorTime,
        listen_udp: ListenUDP,
        gateway: Callable[[], str | None],
        random: Callable[[int], bytes],
        schedule: tuple[float, ...] = RETRANSMIT,
    ) -> None:
        self.clock = clock
        self.listen_udp = listen_udp
        self.gateway = gateway
        self.random = random
        self.schedule = schedule
        #: The nonce of our mapping: RFC 6887 wants the same one for renewals and deletion.
        self.nonce = random(pcp.NONCE_SIZE)

    def _map(self, internal_port: int, external_port: int, lifetime: int) -> Deferred[Grant]:
        gateway = self.gateway()
        if gateway is None:
            return fail(NoGatewayError())
        nonce = self.nonce

        def request(local: str) -> bytes:
            return pcp.encode_map_request(
                client=ipaddress.ip_address(local),
                nonce=nonce,
                internal_port=internal_port,
                lifetime=lifetime,
                suggested_port=external_port,
            )

        def accept(data: bytes) -> pcp.MapResponse | pcp.OtherVersion | None:
            answer = pcp.parse_response(data)
            if isinstance(answer, pcp.MapResponse) and (
                answer.nonce != nonce
                or answer.protocol != pcp.PROTOCOL_UDP
                or answer.internal_port != internal_port
            ):
                return None  # not the answer to our request
            return answer

        def granted(answer: object) -> Grant:
            if isinstance(answer, pcp.OtherVersion):
                raise MappingRefusedError(f"gateway speaks only version {answer.version}")
            assert isinstance(answer, pcp.MapResponse)
            if answer.result != pcp.SUCCESS:
                reason = pcp.RESULT_NAMES.get(answer.result, f"result {answer.result}")
                raise MappingRefusedError(f"refused: {reason}")
            return Grant(str(answer.external_address), answer.external_port, answer.lifetime)

        d: Deferred[object] = exchange(
            self.listen_udp, self.clock, gateway, request, accept, self.schedule
        )
        result: Deferred[Grant] = d.addCallback(granted)
        return result

    def request(self, internal_port: int, external_port: int, lifetime: int) -> Deferred[Grant]:
        return self._map(internal_port, external_port, lifetime)

    def release(self, internal_port: int, external_port: int) -> Deferred[None]:
        result: Deferred[None] = self._map(internal_port, 0, 0).addCallback(lambda grant: None)
        return result


class NatPmpMethod:
    """NAT-PMP (RFC 6886) for UDP, to the default gateway: its external address, then a map."""

    name = "NAT-PMP"

    def __init__(
        self,
        clock: IReactorTime,
        listen_udp: ListenUDP,
        gateway: Callable[[], str | None],
        schedule: tuple[float, ...] = RETRANSMIT,
    ) -> None:
        self.clock = clock
        self.listen_udp = listen_udp
        self.gateway = gateway
        self.schedule = schedule

    def _ask(self, gateway: str, payload: bytes, opcode: int) -> Deferred[object]:
        def accept(data: bytes) -> object | None:
            answer = natpmp.parse_response(data)
            if isinstance(answer, natpmp.ExternalAddressResponse):
                return answer if opcode == natpmp.OP_EXTERNAL_ADDRESS else None
            if isinstance(answer, natpmp.MapResponse):
                return answer if answer.opcode == opcode else None
            return None

        return exchange(
            self.listen_udp, self.clock, gateway, lambda local: payload, accept, self.schedule
        )

    @inlineCallbacks
    def request(
        self, internal_port: int, external_port: int, lifetime: int
    ) -> Generator[Deferred[object], object, Grant]:
        gateway = self.gateway()
        if gateway is None:
            raise NoGatewayError()
        address = yield self._ask(
            gateway, natpmp.encode_external_address_request(), natpmp.OP_EXTERNAL_ADDRESS
        )
        assert isinstance(address, natpmp.ExternalAddressResponse)
        _check(address.result)
        payload = natpmp.encode_map_request(internal_port, external_port, lifetime)
        answer = yield self._ask(gateway, payload, natpmp.OP_MAP_UDP)
        assert isinstance(answer, natpmp.MapResponse)
        _check(answer.result)
        if answer.internal_port != internal_port:
            raise MappingRefusedError("the gateway mapped another internal port")
        return Grant(str(address.address), answer.external_port, answer.lifetime)

    def release(self, internal_port: int, external_port: int) -> Deferred[None]:
        gateway = self.gateway()
        if gateway is None:
            return fail(NoGatewayError())
        payload = natpmp.encode_map_request(internal_port, 0, 0)
        result: Deferred[None] = self._ask(gateway, payload, natpmp.OP_MAP_UDP).addCallback(
            lambda answer: None
        )
        return result


def _check(result: int) -> None:
    if result != natpmp.SUCCESS:
        reason = natpmp.RESULT_NAMES.get(result, f"result {result}")
        raise MappingRefusedError(f"refused: {reason}")
