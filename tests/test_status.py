"""``meshguard status``: the node's status document with its mesh fields, and the text layout."""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import meshguard.app.node
import meshguard.app.status_client
from meshguard.app.node import Node
from meshguard.app.status_client import format_status
from meshguard.codecs.config import parse_config
from meshguard.core.crypto import generate_private_key, public_key
from meshguard.mesh import kinds
from meshguard.mesh.agent import encode_json
from meshguard.mesh.arbiter import MEMBER, Path, udp_kind
from meshguard.mesh.members import MemberInfo
from meshguard.mesh.paths import DIRECT, RELAYED


def private(n: int) -> bytes:
    return generate_private_key(lambda size: bytes([n]) * size)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


INTRODUCER = public_key(private(2))
DNS_PEER = public_key(private(3))
DIRECT_MEMBER = public_key(private(4))
RELAYED_MEMBER = public_key(private(5))


class StatusDocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.patch(
            meshguard.app.node,
            "resolve_endpoint",
            lambda e: ("192.0.2.9", e[1]) if e[0] == "home.example" else e,
        )
        self.node = Node("mgst0", self.clock)
        config = parse_config(
            f"[Interface]\nPrivateKey = {b64(private(1))}\n\n"
            f"[Peer]\nPublicKey = {b64(INTRODUCER)}\nIntroducer = yes\n"
            "AllowedIPs = 10.99.0.1/32\nEndpoint = 198.51.100.1:51820\n\n"
            f"[Peer]\nPublicKey = {b64(DNS_PEER)}\nAllowedIPs = 10.1.0.0/16\n"
            "Endpoint = home.example:51820\nPersistentKeepalive = 25\n",
            "mg0.conf",
        )
        self.node.apply_config(config)
        introducer = self.node.device.peers[INTRODUCER]
        introducer.is_meshguard = True
        members = [
            MemberInfo(DIRECT_MEMBER, (ipaddress.ip_network("10.99.0.4/32"),), ("203.0.113.4", 4)),
            MemberInfo(RELAYED_MEMBER, (ipaddress.ip_network("10.99.0.5/32"),), None),
        ]
        body = encode_json(
            {
                "op": "list",
                "gen": 1,
                "page": 0,
                "pages": 1,
                "relay": True,
                "members": [m.to_json() for m in members],
            }
        )
        self.node.mesh_stack.membership.control_received(
            introducer, kinds.MEMBERS, body, self.clock.seconds()
        )
        # Paths as punching and relaying would leave them.
        paths = self.node.mesh_stack.paths
        direct = paths.states[DIRECT_MEMBER]
        direct.kind, direct.direct, direct.rtt = DIRECT, ("203.0.113.4", 4), 0.0123
        relayed = paths.states[RELAYED_MEMBER]
        relayed.kind = RELAYED
        # The path arbiter alone writes how a peer is reached.
        arbiter = self.node.mesh_stack.arbiter
        now = self.clock.seconds()
        arbiter.proven(
            direct.peer, Path(udp_kind(("203.0.113.4", 4), False), ("203.0.113.4", 4)), 0.0123, now
        )
        # No session with the introducer here, so the relay path is recorded as the arbiter
        # leaves it once a member relay carries the peer.
        arbiter.track(relayed.peer).current = Path(MEMBER, via=introducer)
        relayed.peer.relay = introducer

    def document(self) -> dict[str, Any]:
        document = self.node.status_document()
        # What the socket sends: it must survive JSON as is.
        return dict(json.loads(json.dumps(document, sort_keys=True)))

    def peer(self, document: dict[str, Any], key: bytes) -> dict[str, Any]:
        (entry,) = [p for p in document["peers"] if p["public_key"] == b64(key)]
        return dict(entry)

    def test_node_fields(self) -> None:
        """The node part names the interface and key and carries the mesh's node facts:
        learned members, path counts, endpoint sources, forwarding, and the UDP offloads."""
        document = self.document()
        self.assertEqual(document["interface"], "mgst0")
        self.assertEqual(document["public_key"], b64(public_key(private(1))))
        node = document["node"]
        self.assertEqual(node["members_learned"], 2)
        self.assertEqual(node["paths"], {"direct": 1, "relayed": 1})
        self.assertEqual(node["endpoint_sources"][:2], ["lan", "introducer"])
        self.assertIs(node["forwarding"], True)
        self.assertEqual(node["udp_offload"]["gso_sends"], 0)
        self.assertIn("gro_datagrams", node["udp_offload"])
        self.assertEqual(len(document["peers"]), 4)

    def test_configured_peers(self) -> None:
        """Configured peers say so; the introducer is marked; a DNS-named endpoint shows the
        name beside the address it resolved to."""
        document = self.document()
        introducer = self.peer(document, INTRODUCER)
        self.assertEqual(introducer["member"], "configured")
        self.assertIs(introducer["introducer"], True)
        self.assertEqual(introducer["endpoint"], ["198.51.100.1", 51820])
        self.assertEqual(introducer["path"], "direct")
        dns = self.peer(document, DNS_PEER)
        self.assertEqual(dns["endpoint"], ["192.0.2.9", 51820])
        self.assertEqual(dns["endpoint_name"], "home.example:51820")
        self.assertEqual(dns["allowed_ips"], ["10.1.0.0/16"])
        self.assertEqual(dns["persistent_keepalive"], 25)
        self.assertIsNone(dns["last_handshake"])
        self.assertNotIn("learned_from", dns)

    def test_learned_members_show_their_paths(self) -> None:
        """Learned members show who told us of them, their path (direct with its round-trip
        time, or relayed via whom) and their candidates."""
        document = self.document()
        direct = self.peer(document, DIRECT_MEMBER)
        self.assertEqual(direct["member"], "learned")
        self.assertEqual(direct["learned_from"], [b64(INTRODUCER)])
        self.assertEqual(direct["path"], "direct")
        self.assertEqual(direct["rtt_ms"], 12.3)
        self.assertEqual(direct["candidates"], ["203.0.113.4:4"])
        self.assertEqual(direct["allowed_ips"], ["10.99.0.4/32"])
        relayed = self.peer(document, RELAYED_MEMBER)
        self.assertEqual(relayed["path"], f"relayed via {b64(INTRODUCER)}")
        self.assertEqual(relayed["relay"], b64(INTRODUCER))
        self.assertIsNone(relayed["rtt_ms"])

    def test_text_form_of_a_real_document(self) -> None:
        """The full text form (``-v``) of a real document has one block per peer with its path
        in the operator's words."""
        text = format_status(self.document())
        self.assertTrue(text.startswith("interface: mgst0\n"))
        self.assertEqual(text.count("\npeer: "), 4)
        self.assertIn(f"  path: member via {b64(INTRODUCER)}\n", text)
        self.assertIn("  endpoint name: home.example:51820\n", text)


class FormatStatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(meshguard.app.status_client.time, "time", lambda: 1000.0)

    def test_layout(self) -> None:
        """The full view keeps wg show's layout: the interface block (fixed keys, then node facts
        sorted, a group of facts on one line), then per peer path, endpoint, latest handshake
        and transfer first, then the rest sorted; keys are spelled with spaces and values in
        words (yes, an endpoint as host:port, lists joined, no Python spellings)."""
        document = {
            "interface": "mg0",
            "public_key": "PUB=",
            "listen_port": 51820,
            "mtu": 1420,
            "node": {
                "members_learned": 1,
                "forwarding": True,
                "udp_offload": {"gso": "ipv4", "gso_sends": 2},
            },
            "peers": [
                {
                    "public_key": "PEER=",
                    "path": "relayed via INTRO=",
                    "endpoint": ["203.0.113.4", 4],
                    "last_handshake": 990.0,
                    "rx_bytes": 2048,
                    "tx_bytes": 100,
                    "rtt_ms": 12.3,
                    "allowed_ips": ["10.99.0.4/32"],
                },
                {"public_key": "IDLE=", "endpoint": None, "last_handshake": None},
            ],
        }
        self.assertEqual(
            format_status(document),
            "\n".join(
                [
                    "interface: mg0",
                    "  public key: PUB=",
                    "  listen port: 51820",
                    "  mtu: 1420",
                    "  forwarding: yes",
                    "  members learned: 1",
                    "  udp offload: gso ipv4, gso sends 2",
                    "",
                    "peer: PEER=",
                    "  path: member via INTRO=",
                    "  not direct: no direct path found yet",
                    "  endpoint: 203.0.113.4:4",
                    "  latest handshake: 10 s ago",
                    "  transfer: 2.00 KiB received, 100 B sent",
                    "  allowed ips: 10.99.0.4/32",
                    "  rtt ms: 12.3",
                    "",
                    "peer: IDLE=",
                    "  path: none",
                    "  not direct: no endpoint known and no relay offers to forward",
                    "  endpoint: -",
                    "  latest handshake: never",
                    "  transfer: 0 B received, 0 B sent",
                ]
            ),
        )

    def test_sent_while_idle_per_peer(self) -> None:
        """What a peer cost while idle reads as one line per group of counts (issue 17)."""
        peer = {
            "public_key": "HUB=",
            "sent": {"keepalive": 70, "control": 40, "handshake": 20, "probe": 90},
            "sent_while_idle": {"keepalive": 5, "control": 0, "handshake": 1, "probe": 0},
            "sent_while_idle_since_at": 700.0,
        }
        text = format_status({"interface": "mg0", "peers": [peer]})
        self.assertIn("\n  sent: keepalive 70, control 40, handshake 20, probe 90\n", text)
        self.assertIn("\n  sent while idle: keepalive 5, control 0, handshake 1, probe 0\n", text)
        self.assertIn("\n  sent while idle since at: 300 s ago", text)

    def test_minimal_and_error_documents(self) -> None:
        """A document with nothing but an interface, or the error document the socket sends
        when the snapshot failed, still prints."""
        self.assertEqual(format_status({"interface": "mg1"}), "interface: mg1")
        self.assertEqual(format_status({"error": "boom"}), "interface: -")

    def test_byte_units(self) -> None:
        """Transfer counts step through B, KiB, MiB and GiB, and stop at GiB."""
        text = format_status(
            {"interface": "x", "peers": [{"rx_bytes": 5 * 1024**2, "tx_bytes": 3 * 1024**4}]}
        )
        self.assertIn("transfer: 5.00 MiB received, 3072.00 GiB sent", text)

    def test_timestamps_read_relative(self) -> None:
        """Keys ending in ``_at`` (the node's wall clock) read as "N s ago" / "in N s"."""
        text = format_status(
            {
                "interface": "x",
                "node": {"keepalive_self_check_next_at": 1600.0, "mtu_at": "n/a"},
                "peers": [{"keepalive_self_check_at": 880.0, "flag_at": True}],
            }
        )
        self.assertIn("keepalive self check next at: in 600 s", text)
        self.assertIn("keepalive self check at: 120 s ago", text)
        self.assertIn("mtu at: n/a", text)
        self.assertIn("flag at: yes", text)
