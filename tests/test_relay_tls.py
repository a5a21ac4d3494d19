"""The relay over real TLS on the loopback: verification by name (CA file), by pin, and refusal
of a certificate for another name or a wrong pin, before any member frame is sent."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from meshguard.adapters.relay.client import RelayClientLink, relay_client_service, tls_creator
from meshguard.adapters.relay.server import RelayHub, RelayServerFactory
from meshguard.adapters.relay.service import server_tls_options
from tests.relaycerts import TestCA
from tests.test_relay import ALICE, RELAY

reactor: Any = global_reactor


class LoopbackTLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mg-relay-tls-"))
        self.ca = TestCA(self.dir)
        self.hub = RelayHub(
            reactor,
            private_key=lambda: RELAY[0],
            public_key=lambda: RELAY[1],
            is_member={ALICE[1]}.__contains__,
        )

    def listen(self, name: str) -> int:
        issued = self.ca.issue(name)
        self.der = issued.der
        options = server_tls_options(str(issued.certificate), str(issued.key))
        port = reactor.listenSSL(0, RelayServerFactory(self.hub), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def client(self, port: int, creator: Any) -> RelayClientLink:
        link = RelayClientLink(
            "127.0.0.1",
            port,
            private_key=lambda: ALICE[0],
            public_key=lambda: ALICE[1],
            deliver=lambda s, d: None,
            clock=reactor,
        )
        service = relay_client_service(reactor, link, creator)
        service.startService()

        def stop() -> Deferred[None]:
            done: Deferred[None] = service.stopService()
            for client in list(self.hub.clients.values()):
                client.abort()
            return done

        self.addCleanup(stop)
        return link

    @inlineCallbacks
    def wait(self, condition: Any, seconds: float = 10.0) -> Any:
        for _ in range(int(seconds / 0.05)):
            if condition():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("condition not reached")

    @inlineCallbacks
    def test_verified_by_ca_file(self) -> Any:
        """A certificate for the relay's name from the configured CA: the member connects."""
        port = self.listen("127.0.0.1")
        link = self.client(port, tls_creator("127.0.0.1", ca_path=str(self.ca.path)))
        yield self.wait(lambda: link.connection is not None)
        self.assertIn(RELAY[1], link.present())
        self.assertIn(ALICE[1], self.hub.present())

    @inlineCallbacks
    def test_wrong_name_refused(self) -> Any:
        """A certificate from the trusted CA but for another name: no member frame, no link."""
        port = self.listen("127.0.0.2")
        logged: list[str] = []
        from twisted.logger import globalLogPublisher

        def observer(event: dict[str, Any]) -> None:
            if "TLS verification failed" in str(event.get("log_format", "")):
                logged.append(str(event.get("error")))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        link = self.client(port, tls_creator("127.0.0.1", ca_path=str(self.ca.path)))
        yield self.wait(lambda: bool(logged))
        self.assertIsNone(link.connection)
        self.assertEqual(list(self.hub.present()), [])

    @inlineCallbacks
    def test_pinned_certificate(self) -> Any:
        """A pinned certificate is accepted whatever its issuer; another pin is refused."""
        import hashlib

        port = self.listen("relay.example.net")
        good = self.client(
            port, tls_creator("relay.example.net", pins=[hashlib.sha256(self.der).digest()])
        )
        yield self.wait(lambda: good.connection is not None)
        bad = self.client(port, tls_creator("relay.example.net", pins=[bytes(32)]))
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertIsNone(bad.connection)

    @inlineCallbacks
    def test_system_store(self) -> Any:
        """Without RelayCA or RelayPin the system's trust store decides: a certificate from a CA
        in it is accepted, one from a CA outside it is refused (the store is pointed at by
        SSL_CERT_FILE, which OpenSSL's default verify paths honour)."""
        import os

        port = self.listen("127.0.0.1")
        saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}

        def restore() -> None:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        self.addCleanup(restore)
        os.environ["SSL_CERT_FILE"] = str(self.ca.path)
        os.environ["SSL_CERT_DIR"] = str(self.dir / "no-such-dir")
        trusted = self.client(port, tls_creator("127.0.0.1"))
        yield self.wait(lambda: trusted.connection is not None)
        other = TestCA(self.dir / "other", name="not in the store")
        os.environ["SSL_CERT_FILE"] = str(other.path)
        refused = self.client(port, tls_creator("127.0.0.1"))
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertIsNone(refused.connection)
