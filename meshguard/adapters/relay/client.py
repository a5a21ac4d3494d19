"""The relay client: one reconnecting TLS connection per ``Relay = tls://host:port``.

TLS is verified before any byte of ours is sent: against the relay's host name with
``service_identity`` (trusting the system store, or only the CAs in ``RelayCA``), or against a
pinned certificate (``RelayPin = sha256:...``). A failed verification is logged as such and the
connection is dropped; the reconnecting ``ClientService`` tries again with backoff, and nothing
ever falls back to an unverified connection. The backoff counts every attempt since the last
successful member authentication, so a relay that accepts TCP but fails TLS or refuses us is
retried ever more slowly, up to the cap.
"""

from __future__ import annotations

import hashlib
import os
import random as random_module
from collections.abc import Callable, Collection
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshguard.adapters.relay.connection import FramedConnection, channel_binding
from meshguard.core.keytext import short_key
from meshguard.relay import auth, frames

log = Logger()

#: Reconnect backoff: first retry after about INITIAL s, doubling up to CAP s, each jittered.
INITIAL_DELAY = 1.0
FACTOR = 2.0
CAP = 30.0


def relay_backoff(
    initial: float = INITIAL_DELAY,
    factor: float = FACTOR,
    cap: float = CAP,
    random: Callable[[], float] = random_module.random,
) -> Callable[[int], float]:
    """A ``ClientService`` retry policy: ``min(cap, initial * factor**n)`` scaled by a random
    factor in [0.5, 1): relays restarted under many clients are not hit all at once."""

    def policy(attempt: int) -> float:
        base = min(cap, initial * factor ** min(attempt, 64))
        return base * (0.5 + random() / 2)

    return policy


def parse_pin(text: str) -> bytes:
    """``sha256:HEX`` (colons allowed) -> the 32-byte digest; ValueError otherwise."""
    scheme, _, value = text.partition(":")
    if scheme.lower() != "sha256":
        raise ValueError("a pin is sha256:HEX (the SHA-256 of the certificate's DER form)")
    digest = bytes.fromhex(value.replace(":", ""))
    if len(digest) != 32:
        raise ValueError("a sha256 pin has 64 hex digits")
    return digest


def certificate_pin(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificate:
    """TLS client connections that accept exactly the pinned leaf certificate(s)."""

    def __init__(self, hostname: str, pins: Collection[bytes]) -> None:
        self.hostname = hostname
        self.pins = frozenset(pins)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        self.context = context

    def _verify(self, connection: Any, x509: Any, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True  # the chain does not matter: the leaf must be the pinned one
        der = x509.to_cryptography().public_bytes(_DER)
        return hashlib.sha256(der).digest() in self.pins

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        connection.set_tlsext_host_name(self.hostname.encode("idna"))
        return connection


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


_DER = _der()


def load_pem_certificates(path: str) -> list[ssl.Certificate]:
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + part for part in data.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def tls_creator(hostname: str, *, ca_path: str | None = None, pins: Collection[bytes] = ()) -> Any:
    """How to verify the relay: pinned certificate, else the CA file, else the system store."""
    if pins:
        return PinnedCertificate(hostname, pins)
    trust: Any
    if ca_path is not None:
        trust = ssl.trustRootFromCertificates(load_pem_certificates(ca_path))  # type: ignore[no-untyped-call]
    else:
        trust = ssl.platformTrust()  # type: ignore[no-untyped-call]
    return ssl.optionsForClientTLS(hostname, trustRoot=trust)


class RelayClientLink:
    """One configured relay as a path-logic link, and the state of its current connection."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        private_key: Callable[[], bytes | None],
        public_key: Callable[[], bytes | None],
        deliver: Callable[[bytes, bytes], None],
        random: Callable[[int], bytes] = os.urandom,
        clock: Any = None,
    ) -> None:
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.private_key = private_key
        self.public_key = public_key
        self.deliver = deliver
        self.random = random
        self.clock = clock
        self.connection: RelayClientProtocol | None = None
        self.members: set[bytes] = set()
        self.relay_key: bytes | None = None
        self.received = 0
        self.dropped = 0
        #: Attempts in a row that ended without AUTH_OK (TCP, TLS or member auth): what the
        #: reconnect backoff counts.
        self.failures = 0

    # ------------------------------------------------------------------ RelayLink

    def present(self) -> Collection[bytes]:
        return self.members if self.connection is not None else ()

    def send(self, destination: bytes, datagram: bytes) -> bool:
        connection = self.connection
        if connection is None or destination not in self.members:
            return False
        return connection.write_frame(frames.SEND, destination + datagram)

    # ------------------------------------------------------------------ connection events

    def up(self, connection: RelayClientProtocol, relay_key: bytes) -> None:
        self.connection = connection
        self.relay_key = relay_key
        self.failures = 0
        log.info(
            "relay {name}: connected as a member (relay key {key})",
            name=self.name,
            key=short_key(relay_key),
        )

    def down(self, connection: RelayClientProtocol) -> None:
        if self.connection is connection:
            self.connection = None
            self.members = set()
            log.info("relay {name}: connection lost", name=self.name)


class RelayClientProtocol(FramedConnection):
    def __init__(self, link: RelayClientLink, clock: Any) -> None:
        self.link = link
        self.clock = clock
        super().__init__()
        self.expected_proof: bytes | None = None
        self.relay_key: bytes | None = None
        self.authenticated = False

    def frame_received(self, kind: int, payload: bytes) -> None:
        link = self.link
        if kind == frames.RECV:
            if self.authenticated and len(payload) > frames.KEY_SIZE:
                link.received += 1
                link.deliver(payload[: frames.KEY_SIZE], payload[frames.KEY_SIZE :])
            else:
                link.dropped += 1
        elif kind == frames.CHALLENGE:
            self._answer(payload)
        elif kind == frames.AUTH_OK:
            if self.expected_proof is None or payload != self.expected_proof:
                log.error(
                    "relay {name}: the relay could not prove its key; disconnecting",
                    name=link.name,
                )
                self.abort()
                return
            self.authenticated = True
            assert self.relay_key is not None
            link.members = {self.relay_key}
            link.up(self, self.relay_key)
        elif kind in (frames.PRESENT, frames.JOIN, frames.LEAVE) and self.authenticated:
            keys = {
                payload[i : i + frames.KEY_SIZE]
                for i in range(0, len(payload) - frames.KEY_SIZE + 1, frames.KEY_SIZE)
            }
            if kind == frames.LEAVE:
                link.members -= keys - {self.relay_key}
            else:
                link.members |= keys
        elif kind == frames.ERROR:
            code = payload[0] if payload else 0
            text = payload[1:].decode("ascii", "replace")
            log.error(
                "relay {name} refused us (code {code}): {text}",
                name=link.name,
                code=code,
                text=text,
            )
            self.abort()
        else:
            self.fail(frames.E_PROTOCOL, f"unexpected frame {kind}")

    def _answer(self, payload: bytes) -> None:
        challenge = auth.Challenge.decode(payload)
        private = self.link.private_key()
        public = self.link.public_key()
        if challenge is None or challenge.version != auth.VERSION or self.relay_key is not None:
            self.fail(frames.E_PROTOCOL, "bad CHALLENGE")
            return
        if private is None or public is None:
            self.abort()
            return
        result = auth.answer(
            challenge,
            private,
            public,
            self.link.random(auth.NONCE_SIZE),
            channel_binding(self.transport),
        )
        if result is None:
            self.fail(frames.E_PROTOCOL, "bad relay key")
            return
        answer, self.expected_proof = result
        self.relay_key = challenge.relay_key
        self.write_frame(frames.AUTH, answer.encode(), control=True)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if not self.authenticated and _is_tls_failure(reason):
            log.error(
                "relay {name}: TLS verification failed, no traffic goes to it: {error}",
                name=self.link.name,
                error=_describe(reason),
            )
        self.link.down(self)


def _is_tls_failure(reason: Failure | None) -> bool:
    from service_identity import VerificationError

    return reason is not None and reason.check(SSL.Error, VerificationError) is not None  # type: ignore[no-untyped-call]


def _describe(reason: Failure | None) -> str:
    if reason is None:
        return "connection lost"
    text = str(reason.value)
    return text[:300] if text else reason.type.__name__  # type: ignore[union-attr]


class RelayClientFactory(Factory):
    def __init__(self, link: RelayClientLink, clock: Any) -> None:
        self.link = link
        self.clock = clock

    def buildProtocol(self, addr: Any) -> RelayClientProtocol:
        return RelayClientProtocol(self.link, self.clock)


def relay_client_service(
    reactor: Any,
    link: RelayClientLink,
    creator: Any,
    *,
    retry_policy: Callable[[int], float] | None = None,
) -> ClientService:
    """The reconnecting service for one relay."""
    endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, link.host, link.port, timeout=10))
    return ClientService(
        endpoint,
        RelayClientFactory(link, reactor),
        retryPolicy=member_backoff(link, retry_policy or relay_backoff()),
        clock=reactor,
    )


def member_backoff(link: RelayClientLink, policy: Callable[[int], float]) -> Callable[[int], float]:
    """``policy`` counted in attempts since the link last authenticated.

    ``ClientService`` counts failures since the last TCP connection, but TLS verification and
    member authentication fail after TCP connects: counted its way, a relay with the wrong
    certificate would be retried every second or two forever. ``ClientService`` asks the policy
    once per failed attempt or lost connection, so each call is one more failure; AUTH_OK resets
    the count. (Its ``prepareConnection`` hook cannot reject a connection here: the rejected
    connection's close then reaches its state machine in a state that has no transition for it.)
    """

    def retry(attempt: int) -> float:
        link.failures += 1
        return policy(link.failures)

    return retry
