"""Where a mesh's membership lives: signed records, revocations, invitations, introducers.

The store is a carrier, not a judge: everything read back is verified again against the
authority (:mod:`meshguard.mesh.roster`). What it must get right is durability and single use:
an invitation is redeemed inside one transaction that also writes the new record, so two
concurrent joins cannot both succeed and a join that was acknowledged survives a crash.

The methods block; the node calls them from a worker thread (:func:`in_thread`), the command
line calls them directly. SQLite (stdlib ``sqlite3``) is the default;
:mod:`meshguard.adapters.etcd_store` offers the same methods on an etcd cluster;
:mod:`meshguard.adapters.store_url` opens the one a URL names.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred

from meshguard.mesh.authority import b64u, unb64u

T = TypeVar("T")

DEFAULT_DIRECTORY = "/var/lib/meshguard"


class JoinRefusedError(Exception):
    """A join the store will not accept; the message is for the joiner's user."""


class StoreError(OSError):
    """The store cannot be opened or reached; the message names it and what to do."""


@dataclass(frozen=True)
class Snapshot:
    """The store's signed texts at one moment (still to be verified by the reader)."""

    records: list[str]
    revocations: list[str]
    version: str


class MembershipStore(Protocol):
    """What a mesh's store offers; every method may block."""

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def add_invitation(
        self, invite_key: bytes, name: str, grant: str, addresses: list[str], join_by: int
    ) -> None: ...

    def redeem(
        self, invite_key: bytes, wg_key: bytes, make_record: Callable[[str], str | None], now: int
    ) -> str: ...

    def put_record(self, key: bytes, name: str, addresses: list[str], text: str) -> None: ...

    def revoke(self, key: bytes, text: str) -> None: ...

    def snapshot(self) -> Snapshot: ...

    def version(self) -> str: ...

    def used_addresses(self, now: int) -> set[str]: ...

    def keys_named(self, name: str) -> list[bytes]: ...

    def names_taken(self, now: int) -> set[str]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, name TEXT NOT NULL, addresses TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (key TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invitations (
    invite TEXT PRIMARY KEY, name TEXT NOT NULL, grant_text TEXT NOT NULL,
    addresses TEXT NOT NULL, join_by INTEGER NOT NULL, used_by TEXT, used_at INTEGER);
CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT OR IGNORE INTO changes (id, n) VALUES (1, 0);
"""


class SqliteStore:
    """A mesh store in one SQLite file (WAL, synchronous=FULL: committed means on disk)."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(path)
        try:
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            with self._connect() as connection:
                connection.executescript(_SCHEMA)
            os.chmod(path, 0o600)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the mesh store {path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one immediate transaction (the write lock from the start), counting
        the change so readers notice it."""
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
                connection.execute("UPDATE changes SET n = n + 1 WHERE id = 1")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result
        finally:
            connection.close()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        connection = self._connect()
        try:
            return connection.execute(sql, args).fetchall()
        finally:
            connection.close()

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._write(
            lambda c: c.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        )

    def add_invitation(
        self, invite_key: bytes, name: str, grant: str, addresses: list[str], join_by: int
    ) -> None:
        self._write(
            lambda c: c.execute(
                "INSERT INTO invitations (invite, name, grant_text, addresses, join_by) "
                "VALUES (?, ?, ?, ?, ?)",
                (b64u(invite_key), name, grant, json.dumps(addresses), join_by),
            )
        )

    def redeem(
        self, invite_key: bytes, wg_key: bytes, make_record: Callable[[str], str | None], now: int
    ) -> str:
        """Use the invitation once: ``make_record(grant)`` gives the joiner's record (None if
        its proof does not fit the grant); the record is stored in the same transaction."""

        def work(connection: sqlite3.Connection) -> str:
            row = connection.execute(
                "SELECT name, grant_text, addresses, join_by, used_by FROM invitations "
                "WHERE invite = ?",
                (b64u(invite_key),),
            ).fetchone()
            if row is None:
                raise JoinRefusedError("this invitation is not known to the introducer")
            name, grant, addresses, join_by, used_by = row
            if used_by is not None:
                raise JoinRefusedError("this invitation was already used; ask for a new one")
            if join_by <= now:
                raise JoinRefusedError("this invitation expired; ask for a new one")
            record = make_record(grant)
            if record is None:
                raise JoinRefusedError("the proof does not match the invitation")
            key = b64u(wg_key)
            if connection.execute("SELECT 1 FROM revocations WHERE key = ?", (key,)).fetchone():
                raise JoinRefusedError("this key was removed from the mesh")
            connection.execute(
                "UPDATE invitations SET used_by = ?, used_at = ? WHERE invite = ?",
                (key, now, b64u(invite_key)),
            )
            connection.execute(
                "INSERT OR REPLACE INTO records (key, name, addresses, text) VALUES (?, ?, ?, ?)",
                (key, name, addresses, record),
            )
            return record

        return self._write(work)

    def put_record(self, key: bytes, name: str, addresses: list[str], text: str) -> None:
        self._write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO records (key, name, addresses, text) VALUES (?, ?, ?, ?)",
                (b64u(key), name, json.dumps(addresses), text),
            )
        )

    def revoke(self, key: bytes, text: str) -> None:
        def work(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM records WHERE key = ?", (b64u(key),))
            connection.execute(
                "INSERT OR REPLACE INTO revocations (key, text) VALUES (?, ?)", (b64u(key), text)
            )

        self._write(work)

    def version(self) -> str:
        """Changes whenever anything was written (cheap to poll)."""
        return str(self._read("SELECT n FROM changes WHERE id = 1")[0][0])

    def snapshot(self) -> Snapshot:
        connection = self._connect()
        try:
            connection.execute("BEGIN")
            records = [r[0] for r in connection.execute("SELECT text FROM records ORDER BY key")]
            revocations = [
                r[0] for r in connection.execute("SELECT text FROM revocations ORDER BY key")
            ]
            version = str(connection.execute("SELECT n FROM changes").fetchone()[0])
            connection.execute("COMMIT")
        finally:
            connection.close()
        return Snapshot(records, revocations, version)

    def used_addresses(self, now: int) -> set[str]:
        used: set[str] = set()
        for (addresses,) in self._read("SELECT addresses FROM records"):
            used.update(json.loads(addresses))
        for (addresses,) in self._read(
            "SELECT addresses FROM invitations WHERE used_by IS NULL AND join_by > ?", (now,)
        ):
            used.update(json.loads(addresses))
        return used

    def keys_named(self, name: str) -> list[bytes]:
        rows = self._read("SELECT key FROM records WHERE name = ?", (name,))
        return [k for (text,) in rows if (k := unb64u(text)) is not None]

    def names_taken(self, now: int) -> set[str]:
        names = {n for (n,) in self._read("SELECT name FROM records")}
        names.update(
            n
            for (n,) in self._read(
                "SELECT name FROM invitations WHERE used_by IS NULL AND join_by > ?", (now,)
            )
        )
        return names


def in_thread(reactor: Any, work: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run a blocking store call on the reactor's thread pool (never on the reactor thread)."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), work, *args)


class StoreRunner(Protocol):
    """How the node calls its store without blocking the reactor: ``run("snapshot")`` fires
    with what ``store.snapshot()`` returns (or fails with what it raises)."""

    def run(self, name: str, *args: Any) -> Deferred[Any]: ...


class ThreadRunner:
    """A blocking store (SQLite) called on the reactor's thread pool."""

    def __init__(self, reactor: Any, store: MembershipStore) -> None:
        self.reactor = reactor
        self.store = store

    def run(self, name: str, *args: Any) -> Deferred[Any]:
        return in_thread(self.reactor, getattr(self.store, name), *args)
