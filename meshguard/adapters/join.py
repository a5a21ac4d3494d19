"""Joining a mesh: the introducer's join service and the joiner's client, over pinned TLS.

Why TLS with a pinned certificate rather than a WireGuard session keyed from the invitation:
the joiner has no WireGuard peer yet and the introducer cannot know the joiner's key in advance,
so a session "keyed from the invitation" would need a second, temporary WireGuard identity on
the introducer and a device in the joiner's command-line process. TLS gives the same two
properties with stock code: the joiner reaches exactly the introducer named in the invitation
(the certificate's SHA-256 is in the line, checked before a byte is sent) and nobody on the path
reads the exchange. The invitation's secret itself never crosses the network either way: the
joiner sends only a signature made with it (:func:`meshguard.mesh.authority.bind`), and every
record it receives is checked against the authority key from the line. The cost is one TCP port
on the introducer (``JoinListen``); a home user forwards it next to the WireGuard port.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

from nacl.signing import SigningKey, VerifyKey
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from meshguard.adapters.store import JoinRefusedError, StoreRunner
from meshguard.codecs import keys
from meshguard.core.keytext import key_text
from meshguard.mesh.authority import Member, bind, bound_record, verify_member
from meshguard.mesh.invitation import (
    MAX_MESSAGE,
    IntroducerAddress,
    Invitation,
    JoinAnswer,
    JoinRequest,
    parse_join_answer,
    parse_join_request,
)

log = Logger()

#: A join connection that has not finished within this many seconds is closed.
JOIN_TIMEOUT = 15.0


class JoinError(Exception):
    """A join that did not work; the message says why and what to do."""


# ---- the introducer's side ------------------------------------------------------------------


class _JoinServerProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, service: JoinService) -> None:
        self.service = service
        self.timeout: IDelayedCall | None = None
        self.busy = False

    def connectionMade(self) -> None:
        abort = cast(Any, self.transport).abortConnection
        self.timeout = self.service.reactor.callLater(JOIN_TIMEOUT, abort)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        self.timeout = None

    def lineLengthExceeded(self, line: bytes) -> None:
        cast(Any, self.transport).abortConnection()

    def lineReceived(self, line: bytes) -> None:
        if self.busy:
            return
        self.busy = True
        request = parse_join_request(line)
        if request is None:
            self._answer(JoinAnswer(error="not a join request"))
            return
        self.service.redeem(request).addCallback(self._answer)

    def _answer(self, answer: JoinAnswer) -> None:
        self.sendLine(answer.encode())  # type: ignore[no-untyped-call]
        cast(Any, self.transport).loseConnection()


class JoinService:
    """Serves joins for an introducer: checks the proof, uses the invitation once (in the
    store's transaction) and answers with the joiner's signed record."""

    def __init__(
        self,
        reactor: Any,
        store: StoreRunner,
        mesh: str,
        authority: VerifyKey,
        prefix: str,
        introducer_records: Callable[[], list[str]],
        on_joined: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.mesh = mesh
        self.authority = authority
        self.prefix = prefix
        self.introducer_records = introducer_records
        self.on_joined = on_joined
        self.clock = clock
        self.joined = 0
        self.refused = 0

    def listen(self, host: str, port: int, certificate: str) -> IListeningPort:
        from meshguard.adapters.relay.service import server_tls_options

        options = server_tls_options(certificate, certificate)
        factory = Factory.forProtocol(lambda: _JoinServerProtocol(self))
        listening: IListeningPort = self.reactor.listenSSL(port, factory, options, interface=host)
        return listening

    def _make_record(self, request: JoinRequest, now: int) -> Callable[[str], str | None]:
        def make(grant: str) -> str | None:
            text = bound_record(grant, request.wg_key, request.binding)
            member = verify_member(self.authority, self.mesh, text, now)
            if member is None or member.key != request.wg_key:
                return None
            return text

        return make

    def redeem(self, request: JoinRequest) -> Deferred[JoinAnswer]:
        now = int(self.clock())

        def done(record: str) -> JoinAnswer:
            self.joined += 1
            member = verify_member(self.authority, self.mesh, record, now)
            log.info(
                "member {name} joined mesh {mesh}",
                name=member.name if member is not None else "?",
                mesh=self.mesh,
            )
            self.on_joined()
            return JoinAnswer(record, self.prefix, tuple(self.introducer_records()))

        def refused(failure: Failure) -> JoinAnswer:
            self.refused += 1
            if isinstance(failure.value, JoinRefusedError):
                log.info("join refused: {why}", why=str(failure.value))
                return JoinAnswer(error=str(failure.value))
            log.failure("join failed", failure)
            return JoinAnswer(error="the introducer could not store the join; try again")

        d: Deferred[str] = self.store.run(
            "redeem", request.invite_key, request.wg_key, self._make_record(request, now), now
        )
        return d.addCallbacks(done, refused)


# ---- the joiner's side ----------------------------------------------------------------------


class _JoinClientProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, request: JoinRequest) -> None:
        self.request = request
        self.answer: Deferred[JoinAnswer] = Deferred()

    def connectionMade(self) -> None:
        # Sent once the TLS handshake has checked the pinned certificate (TLS buffers it).
        self.sendLine(self.request.encode())  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        answer = parse_join_answer(line)
        if not self.answer.called:
            if answer is None:
                self.answer.errback(JoinError("the introducer's answer is not a join answer"))
            else:
                self.answer.callback(answer)
        cast(Any, self.transport).loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if not self.answer.called:
            self.answer.errback(
                JoinError(
                    "the introducer closed the connection: "
                    + (reason.getErrorMessage() if reason is not None else "")
                )
            )


@defer.inlineCallbacks
def _ask(reactor: Any, introducer: IntroducerAddress, request: JoinRequest) -> Any:
    from meshguard.adapters.relay.client import PinnedCertificate

    tcp = endpoints.HostnameEndpoint(
        reactor, introducer.host, introducer.join_port, timeout=JOIN_TIMEOUT
    )
    tls = endpoints.wrapClientTLS(PinnedCertificate(introducer.host, [introducer.pin]), tcp)
    protocol = _JoinClientProtocol(request)
    yield endpoints.connectProtocol(tls, protocol)  # type: ignore[no-untyped-call]
    timer = reactor.callLater(JOIN_TIMEOUT, protocol.answer.cancel)
    try:
        answer = yield protocol.answer
    finally:
        if timer.active():
            timer.cancel()
    return answer


@defer.inlineCallbacks
def join_mesh(
    reactor: Any, invitation: Invitation, wg_private: bytes, clock: Callable[[], float] = time.time
) -> Any:
    """Ask the invitation's introducers in turn; fire with ``(member, introducers, answer)``
    where ``introducers`` pairs each reachable introducer address with its checked record."""
    wg_key = keys.pubkey(wg_private)
    secret = SigningKey(invitation.secret)
    request = JoinRequest(bytes(secret.verify_key), wg_key, bind(secret, wg_key))
    authority = VerifyKey(invitation.authority)
    problems: list[str] = []
    for introducer in invitation.introducers:
        try:
            answer = yield _ask(reactor, introducer, request)
        except Exception as e:  # one unreachable introducer: try the next
            problems.append(f"{introducer.host}:{introducer.join_port}: {_why(e)}")
            continue
        if answer.error is not None:
            where = f"{introducer.host}:{introducer.join_port}"
            if "not known" in answer.error:
                # Home meshes: only the introducer whose store made the invitation knows it.
                problems.append(f"{where}: {answer.error}")
                continue
            raise JoinError(f"{where} refused: {answer.error}")
        now = clock()
        member = verify_member(authority, invitation.mesh, answer.record, now)
        if member is None or member.key != wg_key:
            raise JoinError("the introducer's answer does not carry a valid record for us")
        records: dict[bytes, Member] = {}
        for text in answer.introducers:
            checked = verify_member(authority, invitation.mesh, text, now)
            if checked is not None:
                records[checked.key] = checked
        return member, records, answer
    raise JoinError("no introducer could take the join: " + "; ".join(problems))


def _why(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if "certificate verify failed" in text or "SSL" in type(error).__name__:
        return "its TLS certificate is not the one pinned in the invitation"
    return text


def member_config(
    invitation: Invitation,
    wg_private: bytes,
    member: Member,
    introducers: dict[bytes, Member],
    prefix: str,
    listen_port: int,
) -> str:
    """The joiner's ready config: itself, and every introducer of the invitation."""
    network = ipaddress.ip_network(prefix, strict=False)
    addresses = [
        f"{a.network_address}/{network.prefixlen}"
        if a.version == network.version and a.subnet_of(network)  # type: ignore[arg-type]
        else str(a)
        for a in member.addresses
    ]
    lines = [
        f"# Member {member.name!r} of the mesh {invitation.mesh!r}, written by `meshguard join`.",
        "[Interface]",
        f"PrivateKey = {keys.key_to_base64(wg_private)}",
        f"ListenPort = {listen_port}",
        f"Address = {', '.join(addresses)}",
        f"MeshName = {invitation.mesh}",
        f"MeshAuthority = {key_text(invitation.authority)}",
        f"MeshRecord = {member.text}",
    ]
    for introducer in invitation.introducers:
        record = introducers.get(introducer.wg_key)
        allowed = (
            ", ".join(str(a) for a in record.addresses)
            if record is not None
            else f"{network.network_address + 1}/{network.max_prefixlen}"
        )
        host = f"[{introducer.host}]" if ":" in introducer.host else introducer.host
        lines += [
            "",
            "[Peer]",
            f"# introducer {record.name if record is not None else introducer.host}",
            f"PublicKey = {key_text(introducer.wg_key)}",
            f"AllowedIPs = {allowed}",
            f"Endpoint = {host}:{introducer.wg_port}",
            "PersistentKeepalive = 25",
            "Introducer = yes",
        ]
    return "\n".join(lines) + "\n"


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` so that it is either all there or not at all (temporary file
    in the same directory, fsync, rename, fsync of the directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".meshguard-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
