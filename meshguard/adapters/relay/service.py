"""The TLS relay wired into a node: the server's listening port, one client service per relay,
and the path logic on the node's mesh agent.

:class:`TlsRelay` follows the node's lifecycle: :meth:`listen` in ``privilegedStartService``
(the port may be privileged), :meth:`attach` once the node's data path runs, :meth:`stop` at
shutdown. Without relay settings it does nothing and the data path is untouched. :meth:`reload`
applies changed relay settings (SIGHUP): everything that can fail is prepared first, so a failure
keeps the running relay setup whole.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from meshguard.adapters.relay.client import RelayClientLink, relay_client_service, tls_creator
from meshguard.adapters.relay.server import RelayHub, RelayServerFactory
from meshguard.codecs.config import InterfaceConfig
from meshguard.relay.paths import TlsPaths

log = Logger()


class RelayConfigError(OSError):
    """The relay's certificate or key cannot be used (a startup error with one clear line)."""


def server_tls_options(certificate_path: str, key_path: str) -> ssl.CertificateOptions:
    """TLS options from PEM files: the certificate file may hold the chain after the leaf."""
    from OpenSSL import crypto

    try:
        with open(certificate_path, "rb") as f:
            chain_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise RelayConfigError(f"cannot read {e.filename}: {e.strerror}") from None
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in chain_pem.split(marker)[1:]]
    try:
        certificates = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise RelayConfigError(
            f"{certificate_path} / {key_path}: not a PEM certificate and private key"
        ) from None
    if not certificates:
        raise RelayConfigError(f"{certificate_path} holds no PEM certificate")
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certificates[0],
        extraCertChain=certificates[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


class ServerCertificate:
    """The relay server's TLS options, replaceable on reload: the listening port asks for a
    context per accepted connection, so new connections get the new certificate and the
    connections already up keep theirs."""

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> Any:
        return self.options.getContext()


class TlsRelay:
    """Relay server and clients of one node."""

    def __init__(self, config: InterfaceConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.node: Any = None
        self.paths: TlsPaths | None = None
        self.hub: RelayHub | None = None
        self.port: IListeningPort | None = None
        self.clients = MultiService()  # type: ignore[no-untyped-call]
        self.links: list[RelayClientLink] = []
        #: Each client link's reconnecting service and path-logic link id, by ``(host, port)``.
        self.services: dict[tuple[str, int], tuple[RelayClientLink, ClientService, int]] = {}
        self.certificate: ServerCertificate | None = None
        self.hub_link_id: int | None = None

    @property
    def enabled(self) -> bool:
        return self.config.relay_listen is not None or bool(self.config.relays)

    # ------------------------------------------------------------------ lifecycle

    def listen(self, node: Any) -> None:
        """Bind the relay's TLS port (privileged start)."""
        self.node = node
        listen = self.config.relay_listen
        if listen is None:
            return
        assert self.config.relay_certificate is not None and self.config.relay_key is not None
        options = server_tls_options(self.config.relay_certificate, self.config.relay_key)
        self.certificate = ServerCertificate(options)
        self.port = self._bind(listen)

    def _hub(self) -> RelayHub:
        if self.hub is None:
            device = self.node.device
            self.hub = RelayHub(
                self.reactor,
                private_key=lambda: device.private_key,
                public_key=lambda: device.public_key,
                is_member=self._is_member,
                deliver_local=self._deliver_from_hub,
            )
        return self.hub

    def _bind(self, listen: tuple[str, int]) -> IListeningPort:
        host, port = listen
        try:
            listening: IListeningPort = self.reactor.listenSSL(
                port, RelayServerFactory(self._hub()), self.certificate, interface=host
            )
        except Exception as e:
            raise RelayConfigError(f"cannot listen for the relay on {host}:{port}: {e}") from e
        log.info("TLS relay listening on {host}:{port}", host=host, port=port)
        return listening

    def attach(self, node: Any) -> None:
        """Start the path logic and the client connections (the node's data path is running)."""
        if not self.enabled:
            return
        self.node = node
        now = self.reactor.seconds()
        # Moves onto and off the relay go through the node's path arbiter, which logs them.
        paths = TlsPaths(node.mesh_agent, arbiter=node.mesh_stack.arbiter)
        self.paths = paths
        node.mesh_agent.add_feature(paths)
        # The path arbiter asks the TLS logic what it holds, and tells it of proven UDP paths.
        arbiter = node.mesh_stack.arbiter
        arbiter.tls = paths
        arbiter.udp_proven_listeners.append(paths.direct_confirmed)
        node.endpoint_view = paths.shown_endpoint
        node.mesh_stack.membership.is_relay_endpoint = paths.is_relay_endpoint
        io = node.device.io
        io.send_datagram = paths.wrap(io.send_datagram)
        send_probe = getattr(io, "send_probe", None)
        if send_probe is not None:
            io.send_probe = paths.wrap_probe(send_probe)
        if self.hub is not None:
            self.hub_link_id = paths.add_link(self.hub, now)
        for relay in self.config.relays:
            self._add_client(relay, self._creator(relay[0], self.config))
        self.clients.startService()  # type: ignore[no-untyped-call]
        node.reschedule()

    def _creator(self, host: str, config: InterfaceConfig) -> Any:
        return tls_creator(host, ca_path=config.relay_ca, pins=config.relay_pins)

    def _add_client(self, relay: tuple[str, int], creator: Any) -> None:
        assert self.paths is not None
        device = self.node.device
        link = RelayClientLink(
            relay[0],
            relay[1],
            private_key=lambda: device.private_key,
            public_key=lambda: device.public_key,
            deliver=lambda source, datagram: None,
            clock=self.reactor,
        )
        link_id = self.paths.add_link(link, self.reactor.seconds())
        link.deliver = self._deliverer(link_id)
        self._start_client(link, link_id, creator)
        self.links.append(link)

    def _start_client(self, link: RelayClientLink, link_id: int, creator: Any) -> None:
        client = relay_client_service(self.reactor, link, creator)
        client.setServiceParent(self.clients)  # type: ignore[no-untyped-call]
        self.services[(link.host, link.port)] = (link, client, link_id)

    def _stop_client(self, relay: tuple[str, int]) -> tuple[RelayClientLink, int]:
        """Stop one relay's service (its connection closes, the link goes down)."""
        link, client, link_id = self.services.pop(relay)
        client.disownServiceParent()  # type: ignore[no-untyped-call]
        return link, link_id

    # ------------------------------------------------------------------ reload

    def reload(self, config: InterfaceConfig) -> bool:
        """Apply changed relay settings; on any failure log one line, keep the running setup
        and return False. Connections already up through an unchanged relay stay up."""
        old = self.config
        try:
            self._reload(old, config)
        except Exception as e:  # a CA, certificate or key file that does not load, a busy port
            log.error("relay settings not reloaded, keeping the running ones: {error}", error=e)
            return False
        return True

    def _reload(self, old: InterfaceConfig, new: InterfaceConfig) -> None:
        # 1. Everything that can fail, before anything changes.
        trust_changed = (old.relay_ca, old.relay_pins) != (new.relay_ca, new.relay_pins)
        restart = [r for r in new.relays if r in self.services and trust_changed]
        added = [r for r in dict.fromkeys(new.relays) if r not in self.services]
        creators = {r: self._creator(r[0], new) for r in restart + added}
        options = None
        if new.relay_listen is not None:
            assert new.relay_certificate is not None and new.relay_key is not None
            options = server_tls_options(new.relay_certificate, new.relay_key)
        port = None
        if new.relay_listen is not None and new.relay_listen != old.relay_listen:
            previous = self.certificate
            assert options is not None
            self.certificate = ServerCertificate(options)
            try:
                port = self._bind(new.relay_listen)
            except RelayConfigError:
                self.certificate = previous
                raise
        # 2. Apply (nothing below fails on bad input).
        self.config = new
        if options is not None and self.certificate is not None:
            self.certificate.options = options
        if new.relay_listen != old.relay_listen:
            if self.port is not None:
                self.port.stopListening()
                self.port = None
                assert old.relay_listen is not None
                host, number = old.relay_listen
                log.info("TLS relay stopped listening on {host}:{port}", host=host, port=number)
            if new.relay_listen is None and self.hub is not None:
                for client in list(self.hub.clients.values()):
                    client.abort()
                if self.paths is not None and self.hub_link_id is not None:
                    self.paths.remove_link(self.hub_link_id, self.reactor.seconds())
                    self.hub_link_id = None
            self.port = port
            if port is not None and self.paths is not None and self.hub_link_id is None:
                assert self.hub is not None
                self.hub_link_id = self.paths.add_link(self.hub, self.reactor.seconds())
        for relay in list(self.services):
            if relay not in new.relays:
                link, link_id = self._stop_client(relay)
                self.links.remove(link)
                if self.paths is not None:
                    self.paths.remove_link(link_id, self.reactor.seconds())
                log.info("relay {name}: removed", name=link.name)
        for relay in restart:
            link, link_id = self._stop_client(relay)
            self._start_client(link, link_id, creators[relay])
            log.info("relay {name}: reconnecting with the new RelayCA/RelayPin", name=link.name)
        if self.paths is not None:
            for relay in added:
                self._add_client(relay, creators[relay])
                log.info("relay {host}:{port}: added", host=relay[0], port=relay[1])
        if self.node is not None and self.paths is not None:
            self.node.reschedule()

    def stop(self) -> Any:
        result = None
        if self.clients.running:
            result = self.clients.stopService()  # type: ignore[no-untyped-call]
        if self.hub is not None:
            for client in list(self.hub.clients.values()):
                client.abort()
        if self.port is not None:
            self.port.stopListening()
            self.port = None
        return result

    # ------------------------------------------------------------------ glue

    def _is_member(self, key: bytes) -> bool:
        """Members are the peers this node's user configured (as an introducer's are)."""
        node = self.node
        if node is None or key not in node.device.peers:
            return False
        return key not in node.mesh_stack.membership.learned

    def _deliver(self, link_id: int, source: bytes, datagram: bytes) -> None:
        node = self.node
        if node is None or self.paths is None or not node.running:
            return
        self.paths.delivered(link_id, source, datagram, self.reactor.seconds())
        if node.device.timers.dirty or node.mesh_agent.dirty:
            node.reschedule()

    def _deliverer(self, link_id: int) -> Any:
        def deliver(source: bytes, datagram: bytes) -> None:
            self._deliver(link_id, source, datagram)

        return deliver

    def _deliver_from_hub(self, source: bytes, datagram: bytes) -> None:
        if self.hub_link_id is not None:
            self._deliver(self.hub_link_id, source, datagram)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        if self.hub is not None:
            status["relay_server"] = self.hub.status()
        return status
