"""Operating a node, in memory: the path view, mesh pings, control socket requests, metrics,
netcheck's report and the ping command's output and exit status."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
from collections.abc import Iterator, Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from meshguard.adapters.metrics import MetricsPage, StatusCollector
from meshguard.adapters.path_view import KINDS, PathView, path_view
from meshguard.adapters.status_server import REQUEST_GRACE, Reply, StatusFactory
from meshguard.app import cli, ping_client
from meshguard.app.netcheck import format_netcheck, netcheck_report
from meshguard.app.status_client import format_table, not_direct_reason
from meshguard.codecs.config import ConfigError, parse_config
from meshguard.mesh import kinds
from meshguard.mesh.ping import PingAnswer, Pinger
from tests.meshsim import MeshSim, SimMember
from tests.test_mesh import home

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
LAN = [ipaddress.ip_network("192.168.1.0/24")]


class PathViewTests(SynchronousTestCase):
    def test_explicit_fields_win(self) -> None:
        """The path arbiter's ``path_kind``/``path_via``/``not_direct_reason`` are used as
        given, whatever the older ``path`` sentence says."""
        view = path_view(
            {
                "path": "direct",
                "path_kind": "tls-relay",
                "path_via": "relay1",
                "not_direct_reason": "UDP blocked",
            }
        )
        self.assertEqual(view, PathView("tls-relay", "relay1", "UDP blocked"))
        self.assertEqual(view.text(), "tls-relay via relay1")
        self.assertFalse(view.direct)

    def test_todays_path_sentences(self) -> None:
        """``relayed via KEY`` is a member relay, ``tls-relay via NAME`` a TLS relay, ``none``
        none; a direct endpoint on one of our private subnets is LAN, a public one direct, an
        IPv6 one direct-v6, and a private one we cannot place is direct."""
        cases: list[tuple[dict[str, Any], PathView]] = [
            ({"path": f"relayed via {KEY_A}"}, PathView("member", KEY_A)),
            ({"path": "tls-relay via r1:443", "endpoint": None}, PathView("tls-relay", "r1:443")),
            ({"path": "none", "endpoint": None}, PathView("none")),
            ({"path": "direct", "endpoint": ["192.168.1.7", 51820]}, PathView("lan")),
            ({"path": "direct", "endpoint": ["192.168.9.7", 51820]}, PathView("direct")),
            ({"path": "direct", "endpoint": ["203.0.113.4", 4]}, PathView("direct")),
            ({"path": "direct", "endpoint": ["2001:db8::1", 4]}, PathView("direct-v6")),
            ({"path": "lan", "endpoint": ["10.0.0.2", 4]}, PathView("lan")),
            ({"endpoint": ["203.0.113.4", 4]}, PathView("direct")),
            ({}, PathView("none")),
        ]
        for entry, want in cases:
            self.assertEqual(path_view(entry, LAN), want, entry)

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(
                ["path", "path_kind", "path_via", "endpoint", "not_direct_reason", "name"]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.text(max_size=30),
                st.lists(st.one_of(st.text(max_size=20), st.integers()), max_size=3),
            ),
        )
    )
    def test_any_entry_reads(self, entry: dict[str, Any]) -> None:
        """Whatever a (newer, older or broken) node sends, the view is one of the kinds and the
        table, the reason and the metrics read it without raising."""
        view = path_view(entry, LAN)
        self.assertIn(view.kind, KINDS)
        not_direct_reason(entry, LAN)
        format_table({"interface": "x", "peers": [entry]}, LAN, now=0)


class MeshPingTests(SynchronousTestCase):
    def sim(self, hard: bool) -> tuple[MeshSim, SimMember, SimMember, dict[bytes, Pinger]]:
        sim = MeshSim(seed=3 if hard else 2)
        a = sim.add_member(home(sim, 1, hard=hard), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=hard), "192.168.2.2")
        pingers = {}
        for member in sim.nodes:
            pinger = Pinger(member.agent)
            member.agent.add_feature(pinger)
            pingers[member.public_key] = pinger
        sim.start()
        sim.run(30)
        return sim, a, b, pingers

    def ping(self, sim: MeshSim, a: SimMember, b: SimMember, pinger: Pinger) -> list[PingAnswer]:
        answers: list[PingAnswer] = []
        peer = a.node.device.peers[b.public_key]
        nonce = pinger.ping(peer, sim.net.now, answers.append)
        self.assertIsNotNone(nonce)
        sim.run(1.0, tick=0.01)
        return answers

    def test_direct_pair_answers_over_the_direct_endpoint(self) -> None:
        """Between punched homes the answer comes straight from the other home's public
        mapping, with a round-trip time, and no relay forwards it."""
        sim, a, b, pingers = self.sim(hard=False)
        self.assertEqual(sim.path(a, b), "direct")
        forwarded = sim.introducer.stack.relaying.forwarded_bytes
        (answer,) = self.ping(sim, a, b, pingers[a.public_key])
        self.assertIsNone(answer.relay)
        assert answer.endpoint is not None
        self.assertEqual(answer.endpoint[0], "203.0.113.2")
        self.assertGreater(answer.rtt, 0)
        self.assertLess(answer.rtt, 0.1)
        self.assertEqual(sim.introducer.stack.relaying.forwarded_bytes, forwarded)
        self.assertEqual(pingers[b.public_key].answered, 1)
        self.assertEqual(pingers[a.public_key].pending, {})

    def test_hard_pair_answers_through_the_introducer(self) -> None:
        """Between hard NATs the ping and its answer go through the introducer, which the
        answer names."""
        sim, a, b, pingers = self.sim(hard=True)
        self.assertEqual(sim.path(a, b), "relayed")
        (answer,) = self.ping(sim, a, b, pingers[a.public_key])
        self.assertEqual(answer.relay, sim.introducer.public_key)
        self.assertIsNone(answer.endpoint)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=40), st.sampled_from([kinds.OPERATOR_PING, kinds.OPERATOR_PONG]))
    def test_hostile_bodies_change_nothing(self, body: bytes, kind: int) -> None:
        """A body that is not one 8-byte nonce is dropped and counted; a pong whose nonce we
        did not send (or sent to another peer) is dropped and answers nobody."""
        answers: list[PingAnswer] = []
        pinger = Pinger(_FakeAgent())  # type: ignore[arg-type]
        pinger.pending[b"\x01" * 8] = _pending(b"other", answers)
        peer = _FakePeer(b"peer")
        pinger.control_received(peer, kind, body, 1.0)  # type: ignore[arg-type]
        self.assertEqual(answers, [])
        if len(body) != 8:
            self.assertEqual(pinger.dropped, 1)
        self.assertIn(b"\x01" * 8, pinger.pending)


class _FakeDevice:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []

    def random(self, n: int) -> bytes:
        return b"\x02" * n

    def send_control(self, peer: Any, kind: int, body: bytes, now: float) -> bool:
        self.sent.append((kind, body))
        return True


class _FakeAgent:
    def __init__(self) -> None:
        self.device = _FakeDevice()


class _FakePeer:
    def __init__(self, key: bytes) -> None:
        self.public_key = key
        self.endpoint = ("203.0.113.9", 9)


def _pending(key: bytes, answers: list[PingAnswer]) -> Any:
    from meshguard.mesh.ping import _Pending

    return _Pending(key, 0.0, answers.append)


class ControlSocketTests(SynchronousTestCase):
    """The control socket's request/response: a request line, or nothing (old clients)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.handled: list[dict[str, Any]] = []
        self.replies: list[Reply] = []

        def stream(request: dict[str, Any], reply: Reply) -> None:
            self.handled.append(request)
            self.replies.append(reply)
            reply.write({"seq": 0})

        self.factory = StatusFactory(
            lambda: {"interface": "mg0"}, {"stream": stream}, clock=self.clock
        )

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def lines(self, transport: StringTransport) -> list[Any]:
        return [json.loads(x) for x in transport.value().splitlines()]

    def test_plain_connect_and_read_gets_the_status(self) -> None:
        """A client that sends nothing gets the status document after the grace period, then
        the connection closes (what clients before requests did)."""
        _, transport = self.connect()
        self.clock.advance(REQUEST_GRACE - 0.01)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.02)
        self.assertEqual(self.lines(transport), [{"interface": "mg0"}])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_status_request_answers_at_once(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b'{"request": "status"}\n')
        self.assertEqual(self.lines(transport), [{"interface": "mg0"}])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_streaming_request_and_the_client_going_away(self) -> None:
        """A handler writes lines as it likes; when the client goes away its reply is closed
        and told so (a ping stops its timers), and later writes are dropped."""
        protocol, transport = self.connect()
        protocol.dataReceived(b'{"request": "stream", "peer": "x"}\n')
        self.assertEqual(self.handled, [{"request": "stream", "peer": "x"}])
        closed: list[bool] = []
        self.replies[0].on_close.append(lambda: closed.append(True))
        protocol.connectionLost(None)
        self.assertEqual(closed, [True])
        self.replies[0].write({"seq": 1})
        self.assertEqual(self.lines(transport), [{"seq": 0}])

    def test_bad_requests(self) -> None:
        """Garbage, a non-request and an unknown request get one error line naming what to
        send; only the first line counts; an overlong line closes the connection."""
        for data, want in (
            (b"garbage\n", "not a request"),
            (b"[1, 2]\n", "not a request"),
            (b'{"request": "nope"}\n', "unknown request 'nope'"),
        ):
            protocol, transport = self.connect()
            protocol.dataReceived(data + b'{"request": "status"}\n')
            (line,) = self.lines(transport)
            self.assertIn(want, line["error"])
            self.assertTrue(transport.disconnecting)
        protocol, transport = self.connect()
        protocol.dataReceived(b"x" * 10000)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _document() -> dict[str, Any]:
    return {
        "interface": "mg0",
        "public_key": KEY_A,
        "listen_port": 51820,
        "node": {
            "nat": "yes",
            "nat_mapping": "endpoint-independent",
            "nat_lifetime": 30,
            "nat_filtering": "address-dependent (checked with hub)",
            "relay_forwarded_bytes": 1234,
            "relay_server": {"forwarded_bytes": 99},
            "tls_relays": {"relay.example:443": 2},
            "udp_offload": {
                "gso": "ipv4",
                "gro": "off",
                "gso_sends": 3,
                "gso_datagrams": 9,
                "gro_reads": 0,
                "gro_datagrams": 0,
            },
        },
        "drops": {"malformed": 4, "no_route": 2},
        "peers": [
            {
                "public_key": KEY_B,
                "name": "hub",
                "endpoint": ["198.51.100.2", 51820],
                "path": "direct",
                "last_handshake": 1000.0,
                "rx_bytes": 5000,
                "tx_bytes": 7000,
                "allowed_ips": ["10.99.0.1/32", "10.99.1.0/24"],
                "rtt_ms": 12.5,
                "path_mtu": 1420,
                "keepalive_interval": 25,
                "introducer": True,
                "observed_self": ["203.0.113.1", 51820],
            },
            {
                "public_key": KEY_A,
                "endpoint": None,
                "path": f"relayed via {KEY_B}",
                "last_handshake": None,
                "rx_bytes": 0,
                "tx_bytes": 0,
                "allowed_ips": ["10.99.0.3/32"],
                "candidates": ["203.0.113.3:4"],
                "not_direct_reason": "both sides are behind NATs that map per destination",
            },
        ],
    }


class MetricsTests(SynchronousTestCase):
    def samples(self, document: Mapping[str, Any]) -> dict[str, list[Any]]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(lambda: dict(document)))  # type: ignore[arg-type]
        text = generate_latest(registry).decode()
        found: dict[str, list[Any]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(sample)
        return found

    def test_wireguard_exporter_names_and_labels(self) -> None:
        """Bytes and handshake carry the WireGuard exporter's names and labels (interface,
        public_key, allowed_ips comma-joined, friendly_name = the member name or the key)."""
        found = self.samples(_document())
        (sent, _) = found["wireguard_sent_bytes_total"]
        self.assertEqual(
            sent.labels,
            {
                "interface": "mg0",
                "public_key": KEY_B,
                "allowed_ips": "10.99.0.1/32,10.99.1.0/24",
                "friendly_name": "hub",
            },
        )
        self.assertEqual(sent.value, 7000)
        self.assertEqual(found["wireguard_received_bytes_total"][0].value, 5000)
        self.assertEqual(found["wireguard_latest_handshake_seconds"][0].value, 1000)
        self.assertEqual(found["wireguard_latest_handshake_seconds"][1].value, 0)
        self.assertEqual(found["wireguard_sent_bytes_total"][1].labels["friendly_name"], KEY_A)

    def test_mesh_metrics(self) -> None:
        """Path kind (one sample per peer), direct, RTT in seconds, path MTU, keepalive, NAT,
        relay bytes by relay kind, drops by reason (the four named ones always present), and
        the UDP offloads."""
        found = self.samples(_document())

        def one(name: str, **labels: str) -> float:
            (value,) = [
                s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items())
            ]
            return float(value)

        self.assertEqual(one("meshguard_peer_path", peer="hub", kind="direct"), 1)
        self.assertEqual(one("meshguard_peer_path", peer=KEY_A, kind="member", via=KEY_B), 1)
        self.assertEqual(one("meshguard_peer_direct", peer=KEY_A), 0)
        self.assertEqual(one("meshguard_peer_rtt_seconds", peer="hub"), 0.0125)
        self.assertEqual(one("meshguard_peer_path_mtu_bytes", peer="hub"), 1420)
        self.assertEqual(one("meshguard_peer_keepalive_interval_seconds", peer="hub"), 25)
        self.assertEqual(one("meshguard_peers", kind="member"), 1)
        self.assertEqual(
            one(
                "meshguard_nat_info", mapping="endpoint-independent", filtering="address-dependent"
            ),
            1,
        )
        self.assertEqual(one("meshguard_nat_mapping_lifetime_seconds"), 30)
        self.assertEqual(one("meshguard_relay_forwarded_bytes_total", relay="member"), 1234)
        self.assertEqual(one("meshguard_relay_forwarded_bytes_total", relay="tls"), 99)
        self.assertEqual(one("meshguard_dropped_datagrams_total", reason="junk"), 4)
        self.assertEqual(one("meshguard_dropped_datagrams_total", reason="replay"), 0)
        self.assertEqual(one("meshguard_dropped_datagrams_total", reason="under_load_cookie"), 0)
        self.assertEqual(one("meshguard_dropped_datagrams_total", reason="no_route"), 2)
        self.assertEqual(one("meshguard_udp_offload_enabled", offload="gso", family="ipv4"), 1)
        self.assertEqual(one("meshguard_udp_offload_enabled", offload="gro", family="ipv4"), 0)
        self.assertEqual(one("meshguard_udp_gso_datagrams_total"), 9)

    def test_empty_and_error_documents(self) -> None:
        """The error document a failed snapshot gives still scrapes."""
        found = self.samples({"error": "boom"})
        self.assertIn("meshguard_dropped_datagrams_total", found)

    def test_page(self) -> None:
        """GET /metrics answers in Prometheus text format (OpenMetrics when asked for)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(_document))  # type: ignore[arg-type]
        page = MetricsPage(registry)
        request = DummyRequest([b""])
        body = page.render_GET(request)  # type: ignore[arg-type]
        self.assertIn(b"wireguard_sent_bytes_total{", body)
        self.assertTrue(
            request.responseHeaders.getRawHeaders("content-type")[0].startswith("text/plain")
        )
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders("accept", ["application/openmetrics-text"])
        self.assertTrue(page.render_GET(request).endswith(b"# EOF\n"))  # type: ignore[arg-type]

    def test_metrics_listen_key(self) -> None:
        """``MetricsListen = ADDRESS:PORT`` parses; a name or a missing port is an error that
        names the key and shows an example."""
        key = base64.b64encode(bytes(32)).decode()
        config = parse_config(
            f"[Interface]\nPrivateKey = {key}\nMetricsListen = 127.0.0.1:9586\n", "mg0.conf"
        )
        self.assertEqual(config.interface.metrics_listen, ("127.0.0.1", 9586))
        for bad in ("localhost:9586", "127.0.0.1"):
            with self.assertRaises(ConfigError) as caught:
                parse_config(f"[Interface]\nPrivateKey = {key}\nMetricsListen = {bad}\n", "m.conf")
            self.assertIn("MetricsListen", str(caught.exception))
            self.assertIn("m.conf:3", str(caught.exception))


class NetcheckReportTests(SynchronousTestCase):
    def test_report_from_a_document(self) -> None:
        """UDP works, the public endpoint, an easy NAT, filtering, lifetime, path MTU to the
        introducer and the TLS relay's reachability with its TCP connect time."""
        calls: list[tuple[str, int]] = []

        def connect(host: str, port: int, timeout: float) -> float:
            calls.append((host, port))
            return 0.0123

        report = netcheck_report(_document(), LAN, connect)
        self.assertEqual(report["udp"], "yes")
        self.assertEqual(report["public_ipv4"], ["203.0.113.1:51820"])
        self.assertEqual(report["mapping_varies_by_destination"], "no")
        self.assertIn("easy NAT", report["nat_kind"])
        self.assertEqual(report["nat_mapping_lifetime"], "30 s")
        self.assertEqual(report["path_mtu"], {"hub": 1420})
        self.assertEqual(calls, [("relay.example", 443)])
        self.assertEqual(
            report["tls_relays"]["relay.example:443"],
            {"members_present": 2, "reachable": True, "tcp_connect_ms": 12.3},
        )
        text = format_netcheck(report)
        self.assertTrue(all(len(line) <= 80 for line in text.splitlines()), text)
        self.assertIn("reachable, TCP connect 12.3 ms, 2 members present", text)

    def test_cases(self) -> None:
        """Hard NAT, no NAT, UDP blocked (endpoints known, nothing answers over UDP), and a
        relay that refuses connections."""
        hard = _document()
        hard["node"]["nat_mapping"] = "endpoint-dependent"
        self.assertIn("hard NAT", netcheck_report(hard, connect=None)["nat_kind"])
        open_ = _document()
        open_["node"]["nat"] = "no"
        open_["node"]["nat_mapping"] = "none"
        self.assertEqual(
            netcheck_report(open_, connect=None)["mapping_varies_by_destination"], "no"
        )
        blocked = _document()
        blocked["node"] = {"nat": "unknown", "nat_mapping": "unknown"}
        for peer in blocked["peers"]:
            peer["last_handshake"] = None
            peer.pop("observed_self", None)
        report = netcheck_report(blocked, connect=None)
        self.assertEqual(report["udp"], "no")
        self.assertIn("UDP blocked", report["nat_kind"])

        def refuse(host: str, port: int, timeout: float) -> float:
            raise ConnectionRefusedError(111, "Connection refused")

        relay = netcheck_report(_document(), connect=refuse)["tls_relays"]["relay.example:443"]
        self.assertFalse(relay["reachable"])
        self.assertIn("refused", relay["error"])


class PingCommandTests(SynchronousTestCase):
    """``meshguard ping``: what it prints and its exit status, over canned node answers."""

    def run_ping(self, lines: list[dict[str, Any]], *args: str) -> tuple[int, str, str, list[Any]]:
        requests: list[Any] = []

        def fake(name: str, request: Any, directory: str, timeout: float) -> Iterator[Any]:
            requests.append((name, request))
            yield from lines

        self.patch(ping_client, "request_lines", fake)
        self.patch(ping_client, "interface_names", lambda directory: ["mg0"])
        ran: list[list[str]] = []

        def runner(argv: Any) -> int:
            ran.append(list(argv))
            return 0

        self.patch(ping_client, "_run_ping", runner)
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["ping", *args], io.BytesIO(), out, err)
        return code, out.getvalue(), err.getvalue(), [requests, ran]

    def test_direct_answers(self) -> None:
        lines = [
            {"public_key": KEY_B, "count": 2},
            {"seq": 0, "rtt_ms": 1.5, "path_kind": "direct", "endpoint": "203.0.113.2:51820"},
            {"seq": 1, "timeout": True},
            {"done": True, "sent": 2, "answered": 1, "direct": True,
             "rtt_ms": {"min": 1.5, "avg": 1.5, "max": 1.5}},
        ]  # fmt: skip
        code, out, _, (requests, _) = self.run_ping(lines, "hub", "-c", "2")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                f"PING hub ({KEY_B[:8]}) on mg0: mesh pings",
                "seq 0: 1.5 ms from hub over direct 203.0.113.2:51820",
                "seq 1: no answer within 2 s",
                "--- 2 sent, 1 answered, rtt min/avg/max 1.5/1.5/1.5 ms; direct path found",
            ],
        )
        self.assertEqual(requests[0][1]["count"], 2)
        self.assertFalse(requests[0][1]["until_direct"])

    def test_exit_status(self) -> None:
        """0 answered; 1 no answer, or no direct answer with --until-direct (which sends up to
        20 pings by default); 2 for an unknown peer."""
        relayed = [
            {"seq": 0, "rtt_ms": 9.0, "path_kind": "member", "path_via": KEY_B},
            {"done": True, "sent": 1, "answered": 1, "direct": False},
        ]
        code, out, _, (requests, _) = self.run_ping(relayed, "hub", "--until-direct")
        self.assertEqual(code, 1)
        self.assertIn(f"over member relay {KEY_B[:8]}", out)
        self.assertEqual(requests[0][1]["count"], 20)
        self.assertTrue(requests[0][1]["until_direct"])
        self.assertEqual(self.run_ping(relayed, "hub")[0], 0)
        silent = [{"seq": 0, "timeout": True}, {"done": True, "sent": 1, "answered": 0}]
        self.assertEqual(self.run_ping(silent, "hub")[0], 1)
        unknown = [{"error": "unknown peer", "message": "no peer named 'x'"}]
        code, _, err, _ = self.run_ping(unknown, "x")
        self.assertEqual((code, err), (2, "ping: no peer named 'x'\n"))
        self.assertEqual(self.run_ping([], "hub", "-c", "0")[0], 2)

    def test_stock_peer_gets_icmp(self) -> None:
        """A stock WireGuard peer: the command says so and sends ICMP echoes to its tunnel
        address with the same count and interval."""
        stock = [{"stock": True, "address": "10.99.0.100", "message": "peer is stock: ICMP"}]
        code, out, _, (_, ran) = self.run_ping(stock, "10.99.0.100", "-c", "3", "-i", "0.5")
        self.assertEqual(code, 0)
        self.assertIn("ICMP", out)
        self.assertEqual(ran, [["ping", "-c", "3", "-i", "0.5", "-W", "2", "10.99.0.100"]])


class StatusTableTests(SynchronousTestCase):
    def test_table(self) -> None:
        """One line per peer (name or key prefix, address, path, RTT, handshake, rx, tx) in 80
        columns; a peer that is not direct carries the reason on the next line."""
        text = format_table(_document(), LAN, now=1010.0)
        lines = text.splitlines()
        self.assertEqual(
            lines[0], f"mg0  key {KEY_A[:8]}  port 51820  NAT endpoint-independent, lifetime 30 s"
        )
        self.assertEqual(lines[1].split(), ["PEER", "ADDRESS", "PATH", "RTT", "SEEN", "RX", "TX"])
        self.assertEqual(
            lines[2].split(), ["hub", "10.99.0.1+", "direct", "12ms", "10s", "4.9K", "6.8K"]
        )
        self.assertEqual(
            lines[3].split(),
            [KEY_A[:8], "10.99.0.3", "member", "via", KEY_B[:8], "-", "never", "0B", "0B"],
        )
        self.assertEqual(
            lines[4], "    not direct: both sides are behind NATs that map per destination"
        )
        self.assertTrue(all(len(line) <= 80 for line in lines))


class _RecordingPinger:
    """Stands in for the mesh pinger: records pings; the test answers them."""

    def __init__(self, can_send: bool = True) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.forgotten: list[bytes] = []
        self.can_send = can_send

    def ping(self, peer: Any, now: float, on_answer: Any) -> bytes | None:
        if not self.can_send:
            return None
        nonce = len(self.sent).to_bytes(8, "big")
        self.sent.append((nonce, on_answer))
        return nonce

    def forget(self, nonce: bytes) -> None:
        self.forgotten.append(nonce)


class PingRequestTests(SynchronousTestCase):
    """The node's side of ``ping``: finding the peer, pacing, timeouts, the path of answers."""

    def setUp(self) -> None:
        from meshguard.adapters.pinging import PingRequests
        from meshguard.app.node import Node
        from meshguard.core.crypto import generate_private_key, public_key

        self.clock = Clock()
        self.clock.advance(1000)
        self.node = Node("mgop0", self.clock)
        keys = [public_key(generate_private_key(lambda n, i=i: bytes([i]) * n)) for i in (1, 2, 3)]
        own = generate_private_key(lambda n: bytes([9]) * n)
        text = f"[Interface]\nPrivateKey = {base64.b64encode(own).decode()}\n"
        for index, key in enumerate(keys):
            text += (
                f"\n[Peer]\nPublicKey = {base64.b64encode(key).decode()}\n"
                f"AllowedIPs = 10.99.0.{index + 2}/32\n"
            )
        self.node.apply_config(parse_config(text, "mg0.conf"))
        self.keys = keys
        self.meshguard, self.old, self.stock = (self.node.device.peers[k] for k in keys)
        self.meshguard.is_meshguard = True
        self.node.mesh_agent.state(self.meshguard).features = ["PathMTUDiscovery", "Pinger"]
        self.old.is_meshguard = True
        self.node.mesh_agent.state(self.old).features = ["PathMTUDiscovery"]
        self.pinger = _RecordingPinger()
        self.requests = PingRequests(
            self.node,
            self.clock,
            pinger=self.pinger,
            local_networks=lambda: LAN,  # type: ignore[arg-type]
        )

    def ask(self, **request: Any) -> tuple[list[Any], Reply, StringTransport]:
        transport = StringTransport()
        reply = Reply(transport)
        self.requests({"request": "ping", **request}, reply)
        return [json.loads(x) for x in transport.value().splitlines()], reply, transport

    def lines(self, transport: StringTransport) -> list[Any]:
        return [json.loads(x) for x in transport.value().splitlines()]

    def test_finding_the_peer(self) -> None:
        """By tunnel address, by whole key or a unique prefix of 4+ characters; anything else
        is an error line that says what to give."""
        b64 = base64.b64encode(self.keys[0]).decode()
        for target in ("10.99.0.2", b64, b64[:6]):
            peer, why = self.requests.find(target)
            self.assertIs(peer, self.meshguard, (target, why))
        self.assertIn("AllowedIPs", str(self.requests.find("10.1.1.1")[1]))
        self.assertIsNone(self.requests.find(b64[:2])[0])
        lines, _, transport = self.ask(peer="nobody")
        self.assertEqual(lines[0]["error"], "unknown peer")
        self.assertTrue(transport.disconnecting)
        lines, _, _ = self.ask(peer=b64, count=0)
        self.assertEqual(lines[0]["error"], "usage")

    def test_stock_and_old_peers_get_icmp(self) -> None:
        """A peer that never sent a mesh message, or runs a meshguard without mesh pings, is
        handed to ICMP with its tunnel address."""
        for peer, why in ((self.stock, "not known as a meshguard node"), (self.old, "without")):
            lines, _, _ = self.ask(peer=base64.b64encode(peer.public_key).decode())
            (line,) = lines
            self.assertTrue(line["stock"])
            self.assertIn(why, line["message"])
            self.assertEqual(line["address"], str(next(iter(
                self.node.device.allowed_ips.networks(peer)
            )).network_address))  # fmt: skip

    def test_pacing_answers_timeouts_and_summary(self) -> None:
        """One ping per interval; each answer is one line with its RTT and path (the member
        relay it came through, or the endpoint); a missing answer times out; then a summary;
        no timer is left behind."""
        _, _, transport = self.ask(peer="10.99.0.2", count=3, interval=1.0, timeout=2.0)
        self.assertEqual(len(self.pinger.sent), 1)
        self.pinger.sent[0][1](PingAnswer(0.004, self.keys[2], None))
        self.clock.advance(1.0)
        self.assertEqual(len(self.pinger.sent), 2)
        self.pinger.sent[1][1](PingAnswer(0.002, None, ("192.168.1.3", 51820)))
        self.clock.advance(1.0)
        self.clock.advance(2.0)  # the third is never answered
        lines = self.lines(transport)
        self.assertEqual(lines[0]["count"], 3)
        self.assertEqual(lines[1]["path_kind"], "member")
        self.assertEqual(lines[1]["path_via"], base64.b64encode(self.keys[2]).decode())
        self.assertEqual(lines[1]["rtt_ms"], 4.0)
        self.assertEqual(
            (lines[2]["path_kind"], lines[2]["endpoint"]), ("lan", "192.168.1.3:51820")
        )
        self.assertEqual(lines[3], {"seq": 2, "timeout": True})
        self.assertEqual(
            lines[4],
            {"done": True, "sent": 3, "answered": 2, "direct": True,
             "rtt_ms": {"min": 2.0, "avg": 3.0, "max": 4.0}},
        )  # fmt: skip
        self.assertEqual(self.pinger.forgotten, [(2).to_bytes(8, "big")])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_until_direct_and_client_gone(self) -> None:
        """``until_direct`` stops at the first direct answer; a client that goes away stops
        the pings and forgets what is outstanding."""
        _, _, transport = self.ask(peer="10.99.0.2", count=10, until_direct=True)
        self.pinger.sent[0][1](PingAnswer(0.01, None, ("203.0.113.7", 4)))
        self.assertTrue(self.lines(transport)[-1]["direct"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        _, reply, _ = self.ask(peer="10.99.0.2", count=10)
        reply._gone()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn(self.pinger.sent[-1][0], self.pinger.forgotten)

    def test_no_session(self) -> None:
        """Without a session to carry a ping, each one says so when it times out."""
        self.pinger.can_send = False
        _, _, transport = self.ask(peer="10.99.0.2", count=1)
        self.clock.advance(2.0)
        lines = self.lines(transport)
        self.assertEqual(lines[1]["message"], "no session to send on yet")
        self.assertEqual(lines[2]["answered"], 0)


class DashboardTests(SynchronousTestCase):
    def test_dashboard_uses_only_metrics_the_node_serves(self) -> None:
        """examples/grafana-dashboard.json is valid JSON, and every metric its queries name is
        one a node serves (so a rename here cannot leave the dashboard blank)."""
        import re
        from pathlib import Path

        path = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"
        dashboard = json.loads(path.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        named = {m for e in exprs for m in re.findall(r"\b(?:wireguard|meshguard)_[a-z_]+", e)}
        served = set(MetricsTests().samples(_document()))
        self.assertTrue(named)
        self.assertEqual(named - served, set())


class ControlRequestFuzzTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        """Whatever a local client sends, the socket answers with at most JSON lines and never
        raises; nothing is left scheduled once the connection is gone."""
        clock = Clock()
        factory = StatusFactory(lambda: {"interface": "mg0"}, {}, clock=clock)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        clock.advance(REQUEST_GRACE)
        protocol.connectionLost(None)
        for line in transport.value().splitlines():
            self.assertIsInstance(json.loads(line), dict)
        self.assertEqual(clock.getDelayedCalls(), [])


class MetricsListenTests(TestCase):
    def test_taken_port_is_one_clear_error(self) -> None:
        """A MetricsListen port another program holds fails the start with a line that names
        the key and what to do."""
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        from meshguard.adapters.metrics import listen_metrics

        holder = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(holder.stopListening)
        port = holder.getHost().port
        with self.assertRaises(OSError) as caught:
            listen_metrics(reactor, ("127.0.0.1", port), _document)
        self.assertIn(f"MetricsListen 127.0.0.1:{port}: cannot listen", str(caught.exception))
        self.assertIn("pick a free address and port", str(caught.exception))

    def test_served_over_http(self) -> None:
        """The page is served over HTTP on the reactor: a real GET gets the text format."""
        from twisted.internet import reactor
        from twisted.web.client import Agent, readBody

        from meshguard.adapters.metrics import listen_metrics

        port = listen_metrics(reactor, ("127.0.0.1", 0), _document)
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()  # type: ignore[attr-defined]
        pool_agent = Agent(reactor)
        d = pool_agent.request(b"GET", url)
        d.addCallback(readBody)
        d.addCallback(lambda body: self.assertIn(b'friendly_name="hub"', body))
        return d


class NetcheckCommandTests(SynchronousTestCase):
    def test_no_node_and_no_config(self) -> None:
        """With no node to ask and no config to probe with, netcheck says what to do."""
        import meshguard.app.status_client

        self.patch(meshguard.app.status_client, "interface_names", lambda directory="": [])
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["netcheck"], io.BytesIO(), out, err)
        self.assertEqual(code, 1)
        self.assertIn("no meshguard interface is running", err.getvalue())
        self.assertIn("--config FILE", err.getvalue())

    def test_probe_document_reads_as_a_report(self) -> None:
        """A probe's document (no path MTU, relays not yet reached) reads as a report whose
        text says it was probed."""
        document = {
            "interface": "mg0.conf (probed, no node running)",
            "probed": True,
            "node": {"nat": "yes", "nat_mapping": "endpoint-dependent", "tls_relays": {}},
            "peers": [
                {"public_key": KEY_B, "endpoint": ["198.51.100.2", 51820], "path": "direct",
                 "last_handshake": 5.0, "observed_self": ["203.0.113.1", 40000],
                 "introducer": True},
            ],
        }  # fmt: skip
        report = netcheck_report(document, connect=None)
        self.assertEqual(
            (report["source"], report["udp"], report["path_mtu"]), ("probe", "yes", {})
        )
        text = format_netcheck(report)
        self.assertIn("path MTU:", text)
        self.assertIn("measured by a running node only", text)
        self.assertNotIn("answers from the running node", text)


class LongReasonTests(SynchronousTestCase):
    def test_long_reason_wraps_within_80_columns(self) -> None:
        """A long reason from the node wraps under itself instead of running past 80 columns."""
        peer = {"public_key": KEY_A, "path": "none", "not_direct_reason": "word " * 40}
        lines = format_table({"interface": "x", "peers": [peer]}, now=0).splitlines()
        reason = lines[3:]
        self.assertGreater(len(reason), 1)
        self.assertTrue(all(len(line) <= 80 for line in lines))
        self.assertTrue(all(line.startswith(" " * 16) for line in reason[1:]))


class PortMappingParserTests(SynchronousTestCase):
    def test_answers_miniupnpd_gives(self) -> None:
        """The answers Debian's miniupnpd 2.3.1 sent in a namespace (NAT-PMP, PCP, SSDP)."""
        from meshguard.adapters.portmap_probe import (
            parse_natpmp,
            parse_pcp,
            parse_ssdp,
            pcp_request,
        )

        self.assertEqual(
            parse_natpmp(bytes.fromhex("008000000000095ccb000102")),
            {"result": "success", "external_address": "203.0.1.2"},
        )
        self.assertEqual(
            parse_pcp(bytes.fromhex("02800000000000000000095c" + "00" * 12)),
            {"result": "success"},
        )
        ssdp = (
            b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            b"LOCATION: http://192.168.1.1:5000/rootDesc.xml\r\n\r\n"
        )
        self.assertEqual(parse_ssdp(ssdp), {"location": "http://192.168.1.1:5000/rootDesc.xml"})
        self.assertEqual(len(pcp_request("192.168.1.2")), 24)
        self.assertEqual(
            pcp_request("192.168.1.2")[8:], bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])
        )

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_hostile_answers(self, data: bytes) -> None:
        """Whatever the network sends back, the parsers answer None or a small dict."""
        from meshguard.adapters.portmap_probe import parse_natpmp, parse_pcp, parse_ssdp

        for parse in (parse_natpmp, parse_pcp, parse_ssdp):
            result = parse(data)
            self.assertTrue(result is None or isinstance(result, dict))

    def test_report_text(self) -> None:
        offered = {"gateway": "192.168.1.1", "offered": ["UPnP-IGD", "NAT-PMP", "PCP"]}
        report = netcheck_report(_document(), connect=None, port_mapping=offered)
        self.assertEqual(report["port_mapping_offered"], ["UPnP-IGD", "NAT-PMP", "PCP"])
        self.assertIn("UPnP-IGD, NAT-PMP, PCP offered by 192.168.1.1", report["port_mapping"])
        none = netcheck_report(_document(), connect=None, port_mapping={"gateway": "10.0.0.1"})
        self.assertEqual(none["port_mapping"], "none offered by 10.0.0.1")


class ControlSocketIntegrationTests(TestCase):
    """The control socket for real (a UNIX socket on the reactor, clients in a thread)."""

    def setUp(self) -> None:
        import shutil
        import tempfile

        from twisted.internet import reactor

        from meshguard.adapters.status_server import listen_status

        self.directory = tempfile.mkdtemp(prefix="mgops")
        self.addCleanup(shutil.rmtree, self.directory, True)

        def stream(request: dict[str, Any], reply: Reply) -> None:
            for seq in range(3):
                reply.write({"seq": seq})
            reply.write({"done": True})
            reply.finish()

        self.port = listen_status(
            reactor, "mgops0", _document, self.directory, handlers={"stream": stream}
        )
        self.addCleanup(self.port.stopListening)

    def test_socket_is_private(self) -> None:
        import os
        import stat

        mode = os.stat(os.path.join(self.directory, "mgops0.sock")).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_clients(self) -> Any:
        """``meshguard status`` (a request) and a plain connect-and-read both get the
        document; a streaming request's lines arrive in order; the table is printed."""
        import socket as socketlib

        from twisted.internet import threads

        from meshguard.app import status_client

        def clients() -> tuple[Any, Any, list[Any], str]:
            requested = status_client.read_status("mgops0", self.directory)
            with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(f"{self.directory}/mgops0.sock")
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            lines = list(
                status_client.request_lines("mgops0", {"request": "stream"}, self.directory)
            )
            out = io.StringIO()
            status_client.main("mgops0", False, self.directory, stdout=out, networks=lambda: LAN)
            return requested, json.loads(raw), lines, out.getvalue()

        def check(result: tuple[Any, Any, list[Any], str]) -> None:
            requested, raw, lines, table = result
            self.assertEqual(requested["interface"], "mg0")
            self.assertEqual(raw, requested)
            self.assertEqual(lines, [{"seq": 0}, {"seq": 1}, {"seq": 2}, {"done": True}])
            self.assertIn("PEER", table)
            self.assertIn("hub", table)

        return threads.deferToThread(clients).addCallback(check)
