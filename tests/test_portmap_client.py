"""The port-mapping client on a task.Clock against an in-memory gateway: protocol order, renewal
before expiry, removal on stop, a new public address, and gateways that answer garbage or
nothing."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.portmap import client
from meshguard.adapters.portmap.announcements import GatewayAnnouncements
from meshguard.adapters.portmap.exchange import RETRANSMIT, GatewayExchange
from meshguard.adapters.portmap.methods import Grant, MappingRefusedError, NatPmpMethod, PcpMethod
from meshguard.adapters.portmap.service import PortMapping
from meshguard.adapters.portmap.upnp import UpnpMethod
from meshguard.app.status_client import port_mapping_line
from meshguard.portmap import natpmp
from tests.test_portmap_codec import (
    natpmp_address_response,
    natpmp_map_response,
    pcp_announce,
    pcp_map_response,
)

GATEWAY = "192.168.1.1"
LOCAL = "192.168.1.2"
PUBLIC = "203.0.113.7"
WG_PORT = 51820
#: Network delay of the in-memory gateway's answers.
RTT = 0.01


class Gateway:
    """An in-memory PCP + NAT-PMP server; ``mode`` says how it behaves."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        #: "both", "natpmp" (answers PCP with version 0), "garbage", "silent", "closed".
        self.mode = "both"
        self.public = PUBLIC
        self.epoch = 0
        #: (protocol, internal port, external port, lifetime) per request received.
        self.requests: list[tuple[str, int, int, int]] = []
        self.mappings: dict[int, int] = {}
        self.nonces: list[bytes] = []

    def handle(self, data: bytes) -> bytes | str | None:
        if self.mode == "silent":
            return None
        if self.mode == "closed":
            return "refused"
        if self.mode == "garbage":
            return b"\x02\x81" + b"\xff" * 10
        if data[0] == 2:
            if self.mode == "natpmp":
                return struct.pack("!BBHI", 0, 129, natpmp.UNSUPPORTED_VERSION, self.epoch)
            lifetime, client_ip = struct.unpack_from("!I16s", data, 4)
            nonce, _proto, internal, suggested, _ = struct.unpack_from("!12sB3xHH16s", data, 24)
            self.nonces.append(nonce)
            assert ipaddress.IPv6Address(client_ip).ipv4_mapped == ipaddress.IPv4Address(LOCAL)
            self.requests.append(("PCP", internal, suggested, lifetime))
            external = suggested or 40001
            self._record(internal, external, lifetime)
            return pcp_map_response(
                0, lifetime, self.epoch, nonce, internal, external if lifetime else 0,
                ipaddress.IPv4Address(self.public),
            )  # fmt: skip
        if data == natpmp.encode_external_address_request():
            return natpmp_address_response(0, self.epoch, ipaddress.IPv4Address(self.public))
        _v, _op, _r, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
        self.requests.append(("NAT-PMP", internal, suggested, lifetime))
        external = suggested or 40002
        self._record(internal, external, lifetime)
        return natpmp_map_response(0, self.epoch, internal, external if lifetime else 0, lifetime)

    def _record(self, internal: int, external: int, lifetime: int) -> None:
        if lifetime:
            self.mappings[internal] = external
        else:
            self.mappings.pop(internal, None)


class FakePort:
    """The part of a connected UDP port the exchange uses, delivering to a :class:`Gateway`."""

    def __init__(self, protocol: DatagramProtocol, gateway: Gateway, clock: Clock) -> None:
        self.protocol = protocol
        self.gateway = gateway
        self.clock = clock
        self.open = True
        self.peer: tuple[str, int] | None = None

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", LOCAL, 33333)

    def write(self, data: bytes, addr: Any = None) -> None:
        assert self.peer == (GATEWAY, natpmp.SERVER_PORT)
        answer = self.gateway.handle(data)
        if answer == "refused":
            self.clock.callLater(RTT, self._refused)
        elif isinstance(answer, bytes):
            self.clock.callLater(RTT, self._deliver, answer)

    def _deliver(self, data: bytes) -> None:
        if self.open:
            self.protocol.datagramReceived(data, (GATEWAY, natpmp.SERVER_PORT))

    def _refused(self) -> None:
        if self.open:
            self.protocol.connectionRefused()

    def stopListening(self) -> None:
        if self.open:
            self.open = False
            self.protocol.doStop()


class FakeIgd:
    """miniupnpc.UPnP's calls, recorded; ``present`` false: discovery finds nothing."""

    def __init__(self) -> None:
        self.present = True
        self.permanent_only = False
        self.discoverdelay = 0
        self.lanaddr = LOCAL
        self.calls: list[tuple[Any, ...]] = []

    def discover(self) -> int:
        if not self.present:
            raise Exception("Success")  # what the binding does when nothing answers
        return 1

    def selectigd(self) -> str:
        return "http://192.168.1.1:5000/ctl/IPConn"

    def externalipaddress(self) -> str:
        return PUBLIC

    def addportmapping(self, *args: Any) -> bool:
        self.calls.append(("add", *args))
        if self.permanent_only and args[-1] != 0:
            raise Exception("725 OnlyPermanentLeasesSupported")
        return True

    def deleteportmapping(self, port: int, proto: str) -> bool:
        self.calls.append(("delete", port, proto))
        return True


def run_now(call: Callable[[], Any]) -> Deferred[Any]:
    """The thread pool, in memory: run the call at once."""
    try:
        return succeed(call())
    except Exception:
        return fail()


class Harness:
    def __init__(self, *, upnp: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.gateway = Gateway(self.clock)
        self.igd = FakeIgd()
        self.igd.present = upnp
        self.ports: list[FakePort] = []
        self.advertised: list[list[tuple[str, int]]] = []
        counter = iter(range(10**6))

        def listen(protocol: DatagramProtocol) -> FakePort:
            port = FakePort(protocol, self.gateway, self.clock)
            self.ports.append(port)
            protocol.makeConnection(port)  # type: ignore[arg-type]
            return port

        def random(n: int) -> bytes:
            return bytes([next(counter) % 256]) * n

        methods = [
            PcpMethod(self.clock, listen, lambda: GATEWAY, random),
            NatPmpMethod(self.clock, listen, lambda: GATEWAY),
            UpnpMethod(run_now, factory=lambda: self.igd),
        ]
        self.mapping = PortMapping(
            self.clock, methods, lambda: WG_PORT, self.advertised.append, random
        )

    def settle(self, seconds: float = 1.0, step: float = 0.005) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def status(self) -> dict[str, Any]:
        return self.mapping.status()


class PortMapperTests(SynchronousTestCase):
    def test_pcp_first_and_advertised(self) -> None:
        """At start the client asks PCP first; the granted endpoint is advertised once and
        status shows it with its expiry; NAT-PMP and UPnP are not asked."""
        h = Harness()
        h.mapping.start()
        h.settle(0.1)
        self.assertEqual(h.gateway.requests, [("PCP", WG_PORT, WG_PORT, client.LIFETIME)])
        self.assertEqual(h.advertised, [[(PUBLIC, WG_PORT)]])
        status = h.status()
        self.assertEqual(status["state"], "mapped")
        self.assertEqual(status["protocol"], "PCP")
        self.assertEqual(status["external"], f"{PUBLIC}:{WG_PORT}")
        self.assertEqual(status["expires_at"], 1000 + RTT + client.LIFETIME)
        self.assertEqual(h.igd.calls, [])
        self.assertTrue(all(not p.open for p in h.ports))

    def test_renewed_before_expiry_and_removed_on_stop(self) -> None:
        """The mapping is renewed between 1/2 and 5/8 of its lifetime with the same nonce and
        external port, again and again; stop sends a deletion (lifetime 0), withdraws the
        advertised endpoint and leaves no timer behind."""
        h = Harness()
        h.mapping.start()
        h.settle(0.1)
        for round_ in range(1, 4):
            h.clock.advance(client.LIFETIME * 0.5 - 1)
            self.assertEqual(len(h.gateway.requests), round_)
            h.clock.advance(client.LIFETIME * 0.125 + 2)
            h.settle(0.1)
            self.assertEqual(len(h.gateway.requests), round_ + 1)
            self.assertEqual(h.gateway.requests[-1], ("PCP", WG_PORT, WG_PORT, client.LIFETIME))
            self.assertEqual(h.status()["state"], "mapped")
        self.assertEqual(h.advertised, [[(PUBLIC, WG_PORT)]])
        self.assertEqual(len(set(h.gateway.nonces)), 1)
        done = h.mapping.stop()
        h.settle(0.1)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(h.gateway.requests[-1], ("PCP", WG_PORT, 0, 0))
        self.assertEqual(h.gateway.mappings, {})
        self.assertEqual(h.advertised[-1], [])
        self.assertEqual(h.status(), {"state": "stopped"})
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_new_public_address_asks_again(self) -> None:
        """When peers see us at a new public address, the client renews at once and advertises
        the gateway's new external address; the first report and repeats change nothing."""
        h = Harness()
        h.mapping.start()
        h.settle(0.1)
        h.mapping.observed(None, (PUBLIC, 1111), h.clock.seconds())
        h.mapping.observed(None, ("192.168.1.9", 1111), h.clock.seconds())
        h.settle(0.1)
        self.assertEqual(len(h.gateway.requests), 1)
        h.gateway.public = "198.18.0.99"
        h.mapping.observed(None, ("198.18.0.99", 2222), h.clock.seconds())
        h.settle(0.1)
        self.assertEqual(len(h.gateway.requests), 2)
        self.assertEqual(h.advertised, [[(PUBLIC, WG_PORT)], [("198.18.0.99", WG_PORT)]])
        h.mapping.observed(None, ("198.18.0.99", 3333), h.clock.seconds())
        h.settle(0.1)
        self.assertEqual(len(h.gateway.requests), 2)
        h.mapping.stop()
        h.settle(0.1)

    def test_natpmp_when_pcp_unsupported(self) -> None:
        """A NAT-PMP-only gateway answers PCP with version 0: the client falls back to NAT-PMP
        at once (external address, then the map) and renews with NAT-PMP."""
        h = Harness()
        h.gateway.mode = "natpmp"
        h.mapping.start()
        h.settle(0.1)
        self.assertEqual(h.gateway.requests, [("NAT-PMP", WG_PORT, WG_PORT, client.LIFETIME)])
        self.assertEqual(h.status()["protocol"], "NAT-PMP")
        self.assertIn("version 0", h.status()["failures"]["PCP"])
        h.clock.advance(client.LIFETIME * 0.625 + 1)
        h.settle(0.1)
        self.assertEqual(h.gateway.requests[-1][0], "NAT-PMP")
        self.assertEqual(len(h.gateway.requests), 2)
        h.mapping.stop()
        h.settle(0.1)
        self.assertEqual(h.gateway.requests[-1], ("NAT-PMP", WG_PORT, 0, 0))

    def test_garbage_and_silence_fall_through_to_upnp(self) -> None:
        """A gateway that answers only garbage is the same as one that says nothing: PCP and
        NAT-PMP each give up after their retransmissions (garbage counted, never taken), and
        UPnP maps."""
        for mode in ("garbage", "silent"):
            h = Harness()
            h.gateway.mode = mode
            h.mapping.start()
            h.settle(sum(RETRANSMIT) - 0.1)
            self.assertEqual(h.status(), {"state": "seeking", "trying": "PCP"})
            h.settle(2 * sum(RETRANSMIT))  # NAT-PMP's address request times out as well
            self.assertEqual(h.status()["protocol"], "UPnP", mode)
            self.assertEqual(h.status()["failures"], {"PCP": "no answer", "NAT-PMP": "no answer"})
            if mode == "garbage":
                exchanges = [p.protocol for p in h.ports]
                assert all(isinstance(e, GatewayExchange) for e in exchanges)
                self.assertEqual([e.sent for e in exchanges], [4, 4])  # type: ignore[attr-defined]
                self.assertEqual([e.garbage for e in exchanges], [4, 4])  # type: ignore[attr-defined]
            self.assertEqual(
                h.igd.calls,
                [("add", WG_PORT, "UDP", LOCAL, WG_PORT, "meshguard", "", client.LIFETIME)],
            )
            h.mapping.stop()
            self.assertEqual(h.igd.calls[-1], ("delete", WG_PORT, "UDP"))
            self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_none_offered_backs_off_and_recovers(self) -> None:
        """With nothing offered, status says so with each protocol's reason, the client retries
        after about a minute (then longer), and maps once the gateway starts answering; a new
        public address makes it retry at once."""
        h = Harness(upnp=False)
        h.gateway.mode = "closed"
        h.mapping.start()
        h.settle(0.1)
        status = h.status()
        self.assertEqual(status["state"], "none offered")
        self.assertEqual(
            status["failures"],
            {"PCP": "port closed", "NAT-PMP": "port closed", "UPnP": "no UPnP gateway answered"},
        )
        self.assertTrue(53 <= status["next_try_at"] - h.clock.seconds() <= 67)
        self.assertTrue(port_mapping_line(status).startswith("none offered (PCP: port closed"))
        h.clock.advance(67)
        h.settle(0.1)
        second = h.status()["next_try_at"] - h.clock.seconds()
        self.assertTrue(107 <= second <= 133, second)
        h.mapping.observed(None, (PUBLIC, 1), h.clock.seconds())
        h.gateway.mode = "both"
        h.mapping.observed(None, ("198.18.0.1", 1), h.clock.seconds())
        h.settle(0.1)
        self.assertEqual(h.status()["protocol"], "PCP")
        self.assertEqual(h.advertised, [[(PUBLIC, WG_PORT)]])
        h.mapping.stop()
        h.settle(0.1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_renewal_failure_loses_the_mapping_at_expiry(self) -> None:
        """If the gateway stops answering, renewals are retried while the mapping lives; when
        it would lapse first, the endpoint is withdrawn and the client looks again."""
        h = Harness(upnp=False)
        h.mapping = PortMapping(
            h.clock, h.mapping.mapper.methods[:1], lambda: WG_PORT, h.advertised.append
        )
        h.mapping.mapper.lifetime = 120
        h.mapping.start()
        h.settle(0.1)
        self.assertEqual(h.advertised, [[(PUBLIC, WG_PORT)]])
        h.gateway.mode = "silent"
        for _ in range(30):
            h.clock.advance(5)
            h.settle(0.05)
        self.assertEqual(h.advertised, [[(PUBLIC, WG_PORT)], []])
        self.assertIn(h.status()["state"], ("seeking", "none offered"))
        h.mapping.stop()
        h.settle(0.1)

    def test_upnp_permanent_lease_fallback(self) -> None:
        """An IGD that allows only permanent leases (UPnP error 725) gets a permanent mapping,
        re-asserted every half hour, shown as permanent."""
        h = Harness()
        h.gateway.mode = "closed"
        h.igd.permanent_only = True
        h.mapping.start()
        h.settle(0.1)
        status = h.status()
        self.assertEqual(status["protocol"], "UPnP")
        self.assertNotIn("expires_at", status)
        self.assertEqual(port_mapping_line(status), f"UPnP {PUBLIC}:{WG_PORT} (permanent)")
        adds = len([c for c in h.igd.calls if c[0] == "add"])
        h.clock.advance(client.PERMANENT_REFRESH + 1)
        self.assertEqual(len([c for c in h.igd.calls if c[0] == "add"]), adds + 2)
        h.mapping.stop()

    def test_private_external_address_is_not_advertised(self) -> None:
        """A gateway that is itself behind a NAT (external address 10.x or 100.64/10) maps, but
        the endpoint reaches no one outside: status shows it, the mesh is not told."""
        h = Harness()
        h.gateway.public = "100.64.3.4"
        h.mapping.start()
        h.settle(0.1)
        self.assertEqual(h.advertised, [])
        self.assertIs(h.status()["advertised"], False)
        self.assertIn("not advertised", port_mapping_line(h.status()))
        h.mapping.stop()

    def test_upnp_mapping_made_after_stop_is_removed(self) -> None:
        """Stop while UPnP's thread is still mapping: the thread cannot be stopped, so the
        mapping it makes anyway is removed, not left on the gateway."""
        h = Harness()
        h.gateway.mode = "closed"
        threads: list[tuple[Callable[[], Any], Deferred[Any]]] = []

        def later(call: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            threads.append((call, d))
            return d

        method = UpnpMethod(later, factory=lambda: h.igd)
        mapper = client.PortMapper(h.clock, [method], lambda: WG_PORT, lambda m: None, lambda: 0.5)
        mapper.start()
        self.assertEqual(len(threads), 1)
        self.assertIsNone(self.successResultOf(mapper.stop()))
        call, d = threads.pop()
        d.callback(call())  # the thread finishes its AddPortMapping after all
        self.assertEqual(len(threads), 1)
        call, d = threads.pop()
        d.callback(call())
        self.assertEqual([c[0] for c in h.igd.calls], ["add", "delete"])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_refusal_is_shown(self) -> None:
        """A gateway that refuses names its reason in status."""
        h = Harness(upnp=False)

        class Refusing:
            name = "PCP"

            def request(self, internal: int, external: int, lifetime: int) -> Deferred[Grant]:
                return fail(MappingRefusedError("refused: not authorized"))

            def release(self, internal: int, external: int) -> Deferred[None]:
                return succeed(None)

        mapper = client.PortMapper(
            h.clock, [Refusing()], lambda: WG_PORT, lambda m: None, lambda: 0.5
        )
        mapper.start()
        self.assertEqual(mapper.status()["failures"], {"PCP": "refused: not authorized"})
        mapper.stop()
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AnnouncementTests(SynchronousTestCase):
    def test_gateway_announcement_asks_again_soon(self) -> None:
        """A PCP ANNOUNCE or a NAT-PMP public-address notice from the gateway makes a mapped
        client renew within 5 s (not at the next renewal, an hour away) and a client with
        nothing offered look again; datagrams from other hosts, garbage, and a flood of
        announcements (at most one reaction in 30 s) do not."""
        h = Harness()
        h.mapping.start()
        h.settle(0.1)
        listener = GatewayAnnouncements(lambda: GATEWAY, h.mapping.mapper.gateway_announced)
        listener.datagramReceived(pcp_announce(5), ("192.168.1.66", 5351))
        listener.datagramReceived(b"\x02\x80garbage", (GATEWAY, 5351))
        h.settle(6)
        self.assertEqual(len(h.gateway.requests), 1)
        self.assertEqual(listener.ignored, 2)
        for _ in range(10):
            listener.datagramReceived(pcp_announce(5), (GATEWAY, 5351))
        h.settle(6)
        self.assertEqual(len(h.gateway.requests), 2)
        self.assertEqual(listener.heard, 10)
        h.clock.advance(client.ANNOUNCE_HOLDOFF)
        h.gateway.public = "198.18.0.5"
        listener.datagramReceived(
            natpmp_address_response(0, 9, ipaddress.IPv4Address("198.18.0.5")), (GATEWAY, 5351)
        )
        h.settle(6)
        self.assertEqual(len(h.gateway.requests), 3)
        self.assertEqual(h.advertised[-1], [("198.18.0.5", WG_PORT)])
        h.mapping.stop()
        h.settle(0.1)

    def test_announcement_while_nothing_offered(self) -> None:
        """With nothing offered, an announcement makes the client look again at once."""
        h = Harness(upnp=False)
        h.gateway.mode = "closed"
        h.mapping.start()
        h.settle(0.1)
        self.assertEqual(h.status()["state"], "none offered")
        h.gateway.mode = "both"
        h.mapping.mapper.gateway_announced()
        h.settle(6)
        self.assertEqual(h.status()["state"], "mapped")
        h.mapping.stop()
        h.settle(0.1)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class StatusLineTests(SynchronousTestCase):
    def test_mapped_line(self) -> None:
        """``meshguard status`` shows protocol, endpoint and time left."""
        import time

        line = port_mapping_line(
            {
                "state": "mapped",
                "protocol": "PCP",
                "external": "198.51.100.1:40001",
                "expires_at": time.time() + 3600.5,
            }
        )
        self.assertEqual(line, "PCP 198.51.100.1:40001 (expires in 1h)")
        self.assertEqual(port_mapping_line({"state": "none offered"}), "none offered")
