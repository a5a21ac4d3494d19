"""The TLS relay wired into a node: the server's listening port, one client service per relay,
and the path logic on the node's mesh agent.

:class:`TlsRelay` follows the node's lifecycle: :meth:`listen` in ``privilegedStartService``
(the port may be privileged), :meth:`attach` once the node's data path runs, :meth:`stop` at
shutdown. Without relay settings it does nothing and the data path is untouched.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from meshguard.config import InterfaceConfig
from meshguard.core.peer import Peer
from meshguard.relay.client import RelayClientLink, relay_client_service, tls_creator
from meshguard.relay.paths import TlsPaths
from meshguard.relay.server import RelayHub, RelayServerFactory

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
        device = node.device
        self.hub = RelayHub(
            self.reactor,
            private_key=lambda: device.private_key,
            public_key=lambda: device.public_key,
            is_member=self._is_member,
            deliver_local=self._deliver_from_hub,
        )
        host, port = listen
        try:
            self.port = self.reactor.listenSSL(
                port, RelayServerFactory(self.hub), options, interface=host
            )
        except Exception as e:
            raise RelayConfigError(f"cannot listen for the relay on {host}:{port}: {e}") from e
        log.info("TLS relay listening on {host}:{port}", host=host, port=port)

    def attach(self, node: Any) -> None:
        """Start the path logic and the client connections (the node's data path is running)."""
        if not self.enabled:
            return
        self.node = node
        now = self.reactor.seconds()
        paths = TlsPaths(node.mesh, on_change=self._path_changed)
        self.paths = paths
        node.mesh.add_feature(paths)
        node.members.paths.tls_relay_reaches = paths.reaches
        node.members.membership.is_relay_endpoint = paths.is_relay_endpoint
        io = node.device.io
        io.send_datagram = paths.wrap(io.send_datagram)
        send_probe = getattr(io, "send_probe", None)
        if send_probe is not None:
            io.send_probe = paths.wrap_probe(send_probe)
        if self.hub is not None:
            paths.add_link(self.hub, now)
        device = node.device
        for host, port in self.config.relays:
            link = RelayClientLink(
                host,
                port,
                private_key=lambda: device.private_key,
                public_key=lambda: device.public_key,
                deliver=lambda source, datagram: None,
                clock=self.reactor,
            )
            link_id = paths.add_link(link, now)
            link.deliver = self._deliverer(link_id)
            creator = tls_creator(host, ca_path=self.config.relay_ca, pins=self.config.relay_pins)
            relay_client_service(self.reactor, link, creator).setServiceParent(  # type: ignore[no-untyped-call]
                self.clients
            )
            self.links.append(link)
        self.clients.startService()  # type: ignore[no-untyped-call]
        node.reschedule()

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
        return key not in node.members.membership.learned

    def _deliver(self, link_id: int, source: bytes, datagram: bytes) -> None:
        node = self.node
        if node is None or self.paths is None or not node.running:
            return
        self.paths.delivered(link_id, source, datagram, self.reactor.seconds())
        if node.device.timers.dirty or node.mesh.dirty:
            node.reschedule()

    def _deliverer(self, link_id: int) -> Any:
        def deliver(source: bytes, datagram: bytes) -> None:
            self._deliver(link_id, source, datagram)

        return deliver

    def _deliver_from_hub(self, source: bytes, datagram: bytes) -> None:
        self._deliver(0, source, datagram)

    def _path_changed(self, peer: Peer, description: str) -> None:
        log.info("path to {peer}: {path}", peer=peer.short_name, path=description)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        if self.hub is not None:
            status["relay_server"] = self.hub.status()
        return status
