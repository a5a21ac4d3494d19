"""A node's part in a mesh with an authority: its roster, its store, its join service, its names.

Every node of such a mesh checks learned members against the authority (the roster) and answers
DNS for ``NAME.MESH`` on its tunnel addresses. An introducer (``MeshStore`` set) also enrolls
the members its store holds, follows the store for new members and revocations (a cheap version
check every :data:`POLL` seconds, in a worker thread), and with ``JoinListen`` serves joins.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from nacl.signing import VerifyKey
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshguard.adapters.dns_server import MeshZone, listen_names
from meshguard.adapters.store import MembershipStore, Snapshot, StoreRunner
from meshguard.adapters.store_url import node_runner, open_store
from meshguard.codecs.config import Config, ConfigError
from meshguard.mesh import member_names
from meshguard.mesh.members import Membership
from meshguard.mesh.roster import Roster

if TYPE_CHECKING:
    from meshguard.app.node import Node

log = Logger()

#: How often an introducer checks its store for changes (seconds): the revocation delay.
POLL = 1.0


class Enrollment:
    """Wires the roster into the node's membership and keeps it in step with the store."""

    def __init__(self, config: Config, node: Node, reactor: Any, dns_port: int = 53) -> None:
        interface = config.interface
        if interface.mesh_name is None or interface.mesh_authority is None:
            raise ConfigError(
                config.path, None, "MeshName and MeshAuthority go together (docs/invitations.md)"
            )
        if interface.join_listen is not None and (
            interface.mesh_store is None or interface.join_certificate is None
        ):
            raise ConfigError(config.path, None, "JoinListen needs MeshStore and JoinCertificate")
        self.config = config
        self.node = node
        self.reactor = reactor
        self.dns_port = dns_port
        self.mesh = interface.mesh_name
        self.authority = VerifyKey(interface.mesh_authority)
        self.roster = Roster(self.mesh, self.authority)
        self.store: MembershipStore | None = None
        self.runner: StoreRunner | None = None
        self.ports: list[IListeningPort] = []
        self._version: str | None = None
        self._poll: IDelayedCall | None = None
        self._polling = False
        self._store_ok = True
        self.prefix = ""
        #: Keys whose records and revocations the store holds (as of the last snapshot).
        self._stored: set[bytes] = set()
        self._stored_revoked: set[bytes] = set()

    @property
    def membership(self) -> Membership:
        return self.node.mesh_stack.membership

    def open(self) -> None:
        """Open the store and the listening ports (privileged: port 53, the join port)."""
        interface = self.config.interface
        member_names.register(self.roster.name_of)
        self.membership.set_authority(self.roster, interface.mesh_record, self.reactor.seconds())
        if interface.mesh_record is not None and self.membership.own_name is None:
            log.warn(
                "{path}: MeshRecord is not a valid record of mesh {mesh} (expired, or signed "
                "by another authority): this node has no name",
                path=self.config.path,
                mesh=self.mesh,
            )
        if interface.mesh_store is not None:
            # Read once, blocking, before the reactor runs: a store that cannot be read stops
            # the start with one clear line. From then on: worker threads (SQLite) or Agent
            # requests on the reactor (etcd).
            self.store = open_store(interface.mesh_store)
            self.prefix = self.store.get_meta("prefix") or ""
            self._apply(self.store.snapshot())
            self.runner = node_runner(self.reactor, interface.mesh_store, self.store)
        if interface.join_listen is not None and self.runner is not None:
            from meshguard.adapters.join import JoinService

            assert interface.join_certificate is not None
            service = JoinService(
                self.reactor,
                self.runner,
                self.mesh,
                self.authority,
                self.prefix,
                self._introducer_records,
                on_joined=self._check_now,
            )
            host, port = interface.join_listen
            self.ports.append(service.listen(host, port, interface.join_certificate))
        addresses = [str(a.ip) for a in interface.addresses]
        zone = MeshZone(self.mesh, self.roster.lookup)
        self.ports.extend(listen_names(self.reactor, zone, addresses, self.dns_port))

    def start(self) -> None:
        if self.store is not None:
            self._poll = self.reactor.callLater(POLL, self._check)

    def stop(self) -> None:
        member_names.unregister(self.roster.name_of)
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
        self.runner = None
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        for port in self.ports:
            port.stopListening()
        self.ports = []

    def _introducer_records(self) -> list[str]:
        return sorted(m.text for m in self.roster.members.values() if "introducer" in m.roles)

    def _check_now(self) -> None:
        if self._poll is not None and self._poll.active():
            self._poll.reset(0)

    def _check(self) -> None:
        """Poll the store's version without blocking the reactor; read everything when it
        moved. First write what we heard through the mesh and the store lacks."""
        self._poll = None
        if self._polling or self.runner is None:
            return
        self._polling = True
        runner = self.runner
        records, revocations = self._unstored()

        @defer.inlineCallbacks
        def read() -> Generator[Deferred[Any], Any, Snapshot | None]:
            for key, name, addresses, text in records:
                yield runner.run("put_record", key, name, addresses, text)
            for key, text in revocations:
                yield runner.run("revoke", key, text)
            version = yield runner.run("version")
            if version == self._version:
                return None
            snapshot: Snapshot = yield runner.run("snapshot")
            return snapshot

        def done(snapshot: Snapshot | None) -> None:
            if revocations:  # heard through the mesh: pass them on to our subscribers too
                self.membership.announce(self.reactor.seconds())
            if not self._store_ok:
                self._store_ok = True
                log.info("the mesh store answers again")
            if snapshot is not None:
                self._apply(snapshot)

        def failed(failure: Failure) -> None:
            if self._store_ok:  # once per outage, not once a second
                self._store_ok = False
                log.warn(
                    "cannot read the mesh store (joins and removals wait for it): {error}",
                    error=failure.getErrorMessage(),
                )

        def again(_: object) -> None:
            self._polling = False
            if self.runner is not None:
                self._poll = self.reactor.callLater(POLL, self._check)

        read().addCallbacks(done, failed).addBoth(again)

    def _apply(self, snapshot: Snapshot) -> None:
        now = self.reactor.seconds()
        revoked_before = set(self.roster.revoked)
        for text in snapshot.revocations:
            self.roster.revoke(text)
        members = [m for t in snapshot.records if (m := self.roster.accept(t, now)) is not None]
        membership = self.membership
        membership.enroll(members, now)
        revoked = set(self.roster.revoked) - revoked_before
        if revoked:
            for key in revoked:
                log.info(
                    "member {name} removed from mesh {mesh}",
                    name=self.roster.revoked[key].name,
                    mesh=self.mesh,
                )
            membership.forget_members(list(revoked), now)
            membership.announce(now)
        self._version = snapshot.version
        self._stored = {m.key for m in members}
        self._stored_revoked = {
            r.key for t in snapshot.revocations if (r := self.roster.revoke(t)) is not None
        }
        self.node.reschedule()

    def _unstored(self) -> tuple[list[tuple[bytes, str, list[str], str]], list[tuple[bytes, str]]]:
        """Verified records and revocations we heard through the mesh (from other introducers)
        that our store lacks: written to it, so several introducers of a home mesh, each with
        its own store, end up with the same signed membership."""
        records = [
            (m.key, m.name, [str(a) for a in m.addresses], m.text)
            for m in self.roster.members.values()
            if m.key not in self._stored and m.key != self.node.device.public_key
        ]
        revocations = [
            (key, r.text)
            for key, r in self.roster.revoked.items()
            if key not in self._stored_revoked
        ]
        return records, revocations
