"""Relay settings on reload (SIGHUP), at the relay-service level with a fake node and a memory
reactor: clients added, removed and re-verified; the server's certificate swapped or its port
moved; a failure keeps the running setup."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.relay.service import TlsRelay
from meshguard.codecs.config import InterfaceConfig
from meshguard.mesh.arbiter import PathArbiter
from tests.relaycerts import TestCA


class FakeAgent:
    def __init__(self, device: Any) -> None:
        self.device = device
        self.dirty = False
        self.features: list[Any] = []

    def add_feature(self, feature: Any) -> None:
        self.features.append(feature)


def fake_node() -> Any:
    device = SimpleNamespace(
        private_key=b"\x01" * 32,
        public_key=b"\x02" * 32,
        peers={},
        io=SimpleNamespace(send_datagram=lambda data, endpoint: None),
    )
    return SimpleNamespace(
        device=device,
        mesh_agent=FakeAgent(device),
        mesh_stack=SimpleNamespace(
            arbiter=PathArbiter(),
            membership=SimpleNamespace(is_relay_endpoint=None, learned=set()),
        ),
        reschedule=lambda: None,
        running=True,
    )


class RelayReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.ca = TestCA(self.directory / "ca")
        self.issued = self.ca.issue("relay.test")
        self.reactor = MemoryReactorClock()
        self.node = fake_node()
        self.errors: list[str] = []

    def start(self, config: InterfaceConfig) -> TlsRelay:
        relay = TlsRelay(config, self.reactor)
        relay.listen(self.node)
        relay.attach(self.node)
        self.addCleanup(relay.stop)
        return relay

    def server_config(self, **changes: Any) -> InterfaceConfig:
        base = InterfaceConfig(
            relay_listen=("127.0.0.1", 8443),
            relay_certificate=str(self.issued.certificate),
            relay_key=str(self.issued.key),
        )
        return dataclasses.replace(base, **changes)

    def test_clients_added_removed_and_reverified(self) -> None:
        """A new Relay line gets a client, a removed one loses its client, an unchanged one
        keeps its service; a changed RelayCA restarts the remaining clients on the same
        path-logic link."""
        a, b, c = ("a.test", 443), ("b.test", 443), ("c.test", 443)
        relay = self.start(InterfaceConfig(relays=[a, b]))
        assert relay.paths is not None
        kept = relay.services[a]
        self.assertTrue(relay.reload(InterfaceConfig(relays=[a, c])))
        self.assertEqual(set(relay.services), {a, c})
        self.assertIs(relay.services[a], kept)
        self.assertFalse(kept[1].parent is None)
        self.assertEqual([link.name for link in relay.links], ["a.test:443", "c.test:443"])
        self.assertEqual(len(relay.paths.links), 3)  # ids stay stable: b's slot is not reused
        self.assertEqual(len(list(relay.clients)), 2)

        ca = str(self.ca.path)
        self.assertTrue(relay.reload(InterfaceConfig(relays=[a, c], relay_ca=ca)))
        link, service, link_id = relay.services[a]
        self.assertIs(link, kept[0])
        self.assertEqual(link_id, kept[2])
        self.assertIsNot(service, kept[1])
        self.assertIsNone(kept[1].parent)
        self.assertTrue(service.running)
        self.assertEqual(len(list(relay.clients)), 2)

    def test_bad_ca_keeps_the_running_clients(self) -> None:
        """A RelayCA that does not load: nothing changes, and the reload says so."""
        a, b = ("a.test", 443), ("b.test", 443)
        relay = self.start(InterfaceConfig(relays=[a]))
        before = dict(relay.services)
        missing = str(self.directory / "missing.pem")
        self.assertFalse(relay.reload(InterfaceConfig(relays=[a, b], relay_ca=missing)))
        self.assertEqual(relay.services, before)
        self.assertIsNone(relay.config.relay_ca)
        self.assertEqual(len(list(relay.clients)), 1)

    def test_certificate_reloaded_for_new_connections(self) -> None:
        """New certificate files: the listening port keeps running and hands out a context
        made from the new certificate; a bad key leaves the old certificate in place."""
        relay = self.start(self.server_config())
        self.assertEqual(len(self.reactor.sslServers), 1)
        port = relay.port
        assert relay.certificate is not None
        context_factory = self.reactor.sslServers[0][2]
        self.assertIs(context_factory, relay.certificate)
        old_options = relay.certificate.options

        renewed = self.ca.issue("relay.test", stem="renewed")
        config = self.server_config(
            relay_certificate=str(renewed.certificate), relay_key=str(renewed.key)
        )
        self.assertTrue(relay.reload(config))
        self.assertIs(relay.port, port)
        self.assertEqual(len(self.reactor.sslServers), 1)
        self.assertIsNot(relay.certificate.options, old_options)
        self.assertIsNotNone(relay.certificate.getContext())  # what the next connection gets
        new_options = relay.certificate.options

        garbage = self.directory / "garbage.key"
        garbage.write_text("not a key\n")
        self.assertFalse(relay.reload(self.server_config(relay_key=str(garbage))))
        self.assertIs(relay.certificate.options, new_options)
        self.assertIs(relay.port, port)

    def test_listen_moved(self) -> None:
        """A changed RelayListen binds the new port, then closes the old one; the hub and its
        path-logic link are kept."""
        relay = self.start(self.server_config())
        old_port = relay.port
        hub, hub_link = relay.hub, relay.hub_link_id
        self.assertTrue(relay.reload(self.server_config(relay_listen=("127.0.0.1", 9443))))
        self.assertEqual([entry[0] for entry in self.reactor.sslServers], [8443, 9443])
        self.assertIsNot(relay.port, old_port)
        self.assertIs(relay.hub, hub)
        self.assertEqual(relay.hub_link_id, hub_link)

    def test_listen_added_later(self) -> None:
        """A client-only node that gains RelayListen on reload starts serving, and the hub joins
        the path logic as one more link."""
        relay = self.start(InterfaceConfig(relays=[("a.test", 443)]))
        self.assertIsNone(relay.hub_link_id)
        config = self.server_config(relays=[("a.test", 443)])
        self.assertTrue(relay.reload(config))
        self.assertEqual(len(self.reactor.sslServers), 1)
        assert relay.paths is not None
        self.assertEqual(relay.hub_link_id, 1)
        self.assertIs(relay.paths.links[1], relay.hub)

    def test_removed_relays_leave_status(self) -> None:
        """A Relay line removed on reload disappears from ``tls_relays`` at once (its id is not
        reused); a removed RelayListen takes this node's own relay out of the path logic, and
        adding it back gives it a fresh link."""
        a, b = ("a.test", 443), ("b.test", 443)
        relay = self.start(self.server_config(relays=[a, b]))
        assert relay.paths is not None
        self.assertEqual(
            set(relay.paths.node_status()["tls_relays"]), {"a.test:443", "b.test:443", "this node"}
        )
        self.assertTrue(relay.reload(self.server_config(relays=[a])))
        self.assertEqual(set(relay.paths.node_status()["tls_relays"]), {"a.test:443", "this node"})
        self.assertTrue(relay.reload(InterfaceConfig(relays=[a])))
        self.assertIsNone(relay.hub_link_id)
        status = relay.paths.node_status()
        self.assertEqual(set(status["tls_relays"]), {"a.test:443"})
        self.assertNotIn("relay_server", status)
        self.assertTrue(relay.reload(self.server_config(relays=[a, b])))
        self.assertEqual(
            set(relay.paths.node_status()["tls_relays"]), {"a.test:443", "b.test:443", "this node"}
        )
        self.assertEqual(len(relay.paths.links), 5)
