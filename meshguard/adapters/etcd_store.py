"""The mesh store on an etcd cluster (v3 API through its JSON gateway), for fleets.

Several introducers share one etcd: each reads and polls the same keys, so any introducer can
die and the others keep serving joins and lists. Single use of an invitation is an etcd
transaction that compares the invitation's ``mod_revision`` with the one read: of two concurrent
joins only one transaction succeeds. ``MeshStore = etcd:http://HOST:PORT[/PREFIX]`` (several
``http://`` URLs separated by ``,`` are tried in turn).

Every store operation is written once, without I/O, as a generator that yields gateway
requests ``(method, body)`` and receives their JSON answers (:class:`EtcdOperations`). Two drivers
run them: the node's, over ``twisted.web``'s ``Agent`` on the reactor (:class:`EtcdAgentStore`),
and the command line's, with stdlib ``urllib`` (:class:`EtcdStore`). Records are still verified
by whoever reads them, so etcd is a carrier like any other store.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred

from meshguard.adapters.store import JoinRefusedError, Snapshot, StoreError
from meshguard.mesh.authority import b64u, unb64u

T = TypeVar("T")
#: A request to the v3 JSON gateway: ``("kv/range", {...})``.
Request = tuple[str, dict[str, Any]]
Operation = Generator[Request, dict[str, Any], T]

TIMEOUT = 5.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(value: str) -> str:
    return base64.b64decode(value).decode()


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def _put(key: str, value: str) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value)}}


def parse_url(url: str) -> tuple[list[str], str]:
    """``http://H:P[/PREFIX][,http://...]`` -> the endpoints and the key prefix."""
    endpoints: list[str] = []
    prefix = "/meshguard"
    for part in url.split(","):
        parsed = urllib.parse.urlsplit(part.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StoreError(f"MeshStore etcd:{url}: {part!r} is not http://HOST:PORT")
        endpoints.append(f"{parsed.scheme}://{parsed.netloc}")
        if parsed.path.strip("/"):
            prefix = "/" + parsed.path.strip("/")
    return endpoints, prefix + "/"


class EtcdOperations:
    """The store's operations as request/answer generators (no I/O here)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _get(self, key: str) -> Operation[tuple[str, int] | None]:
        """The value and mod_revision of ``key``."""
        answer = yield ("kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs", [])
        if not kvs:
            return None
        return _text(kvs[0].get("value", "")), int(kvs[0].get("mod_revision", 0))

    def _list(self, prefix: str) -> Operation[tuple[list[tuple[str, str]], str]]:
        """``(key, value)`` pairs under ``prefix`` and the cluster's revision."""
        answer = yield ("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        pairs = [(_text(kv["key"]), _text(kv.get("value", ""))) for kv in answer.get("kvs", [])]
        return pairs, str(answer.get("header", {}).get("revision", "0"))

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> Operation[bool]:
        answer = yield ("kv/txn", {"compare": compare, "success": success})
        return bool(answer.get("succeeded", False))

    def get_meta(self, key: str) -> Operation[str | None]:
        found = yield from self._get(self._key("meta", key))
        return found[0] if found is not None else None

    def set_meta(self, key: str, value: str) -> Operation[None]:
        yield from self._txn([], [_put(self._key("meta", key), value)])

    def add_invitation(
        self, invite_key: bytes, name: str, grant: str, addresses: list[str], join_by: int
    ) -> Operation[None]:
        value = {"name": name, "grant": grant, "addresses": addresses, "join_by": join_by}
        key = self._key("invitations", b64u(invite_key))
        yield from self._txn([], [_put(key, json.dumps(value))])

    def redeem(
        self, invite_key: bytes, wg_key: bytes, make_record: Callable[[str], str | None], now: int
    ) -> Operation[str]:
        key = self._key("invitations", b64u(invite_key))
        found = yield from self._get(key)
        if found is None:
            raise JoinRefusedError("this invitation is not known to the introducer")
        text, revision = found
        invitation = json.loads(text)
        if invitation.get("used_by") is not None:
            raise JoinRefusedError("this invitation was already used; ask for a new one")
        if invitation["join_by"] <= now:
            raise JoinRefusedError("this invitation expired; ask for a new one")
        record = make_record(invitation["grant"])
        if record is None:
            raise JoinRefusedError("the proof does not match the invitation")
        revoked = yield from self._get(self._key("revocations", b64u(wg_key)))
        if revoked is not None:
            raise JoinRefusedError("this key was removed from the mesh")
        invitation["used_by"] = b64u(wg_key)
        invitation["used_at"] = now
        entry = {"name": invitation["name"], "addresses": invitation["addresses"], "text": record}
        unchanged = {
            "key": _b64(key),
            "target": "MOD",
            "result": "EQUAL",
            "mod_revision": str(revision),
        }
        succeeded = yield from self._txn(
            [unchanged],
            [
                _put(key, json.dumps(invitation)),
                _put(self._key("records", b64u(wg_key)), json.dumps(entry)),
            ],
        )
        if not succeeded:
            raise JoinRefusedError("this invitation was already used; ask for a new one")
        return record

    def put_record(self, key: bytes, name: str, addresses: list[str], text: str) -> Operation[None]:
        entry = {"name": name, "addresses": addresses, "text": text}
        yield from self._txn([], [_put(self._key("records", b64u(key)), json.dumps(entry))])

    def revoke(self, key: bytes, text: str) -> Operation[None]:
        record = self._key("records", b64u(key))
        yield from self._txn(
            [],
            [
                {"request_delete_range": {"key": _b64(record)}},
                _put(self._key("revocations", b64u(key)), text),
            ],
        )

    def version(self) -> Operation[str]:
        """etcd's revision (moves with any write, a harmless extra read now and then) and the
        number of revocations."""
        _, revision = yield from self._list(self._key("records") + "/")
        revocations, _ = yield from self._list(self._key("revocations") + "/")
        return f"{revision}/{len(revocations)}"

    def snapshot(self) -> Operation[Snapshot]:
        records, revision = yield from self._list(self._key("records") + "/")
        revocations, _ = yield from self._list(self._key("revocations") + "/")
        texts = [json.loads(value)["text"] for _, value in records]
        return Snapshot(
            texts, [value for _, value in revocations], f"{revision}/{len(revocations)}"
        )

    def _invitations(self) -> Operation[list[dict[str, Any]]]:
        pairs, _ = yield from self._list(self._key("invitations") + "/")
        return [json.loads(value) for _, value in pairs]

    def _records(self) -> Operation[list[tuple[str, dict[str, Any]]]]:
        pairs, _ = yield from self._list(self._key("records") + "/")
        return [(key.rsplit("/", 1)[-1], json.loads(value)) for key, value in pairs]

    def used_addresses(self, now: int) -> Operation[set[str]]:
        used: set[str] = set()
        for _, entry in (yield from self._records()):
            used.update(entry["addresses"])
        for invitation in (yield from self._invitations()):
            if invitation.get("used_by") is None and invitation["join_by"] > now:
                used.update(invitation["addresses"])
        return used

    def keys_named(self, name: str) -> Operation[list[bytes]]:
        records = yield from self._records()
        return [k for key, entry in records if entry["name"] == name and (k := unb64u(key))]

    def names_taken(self, now: int) -> Operation[set[str]]:
        names = {entry["name"] for _, entry in (yield from self._records())}
        for invitation in (yield from self._invitations()):
            if invitation.get("used_by") is None and invitation["join_by"] > now:
                names.add(invitation["name"])
        return names


def _answer(endpoint: str, data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"{endpoint}: not a JSON object")
    return value


class EtcdStore:
    """The :class:`meshguard.adapters.store.MembershipStore` methods on etcd, blocking (``urllib``):
    for the command line."""

    def __init__(self, url: str) -> None:
        self.endpoints, prefix = parse_url(url)
        self.url = url
        self.operations = EtcdOperations(prefix)

    def _call(self, request: Request) -> dict[str, Any]:
        method, body = request
        data = json.dumps(body).encode()
        problems = []
        for endpoint in self.endpoints:
            http = urllib.request.Request(
                f"{endpoint}/v3/{method}", data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(http, timeout=TIMEOUT) as response:
                    return _answer(endpoint, response.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                problems.append(f"{endpoint}: {e}")
        raise StoreError("cannot reach etcd (" + "; ".join(problems) + ")")

    def _run(self, operation: Operation[T]) -> T:
        try:
            request = next(operation)
            while True:
                request = operation.send(self._call(request))
        except StopIteration as done:
            result: T = done.value
            return result

    def get_meta(self, key: str) -> str | None:
        return self._run(self.operations.get_meta(key))

    def set_meta(self, key: str, value: str) -> None:
        self._run(self.operations.set_meta(key, value))

    def add_invitation(
        self, invite_key: bytes, name: str, grant: str, addresses: list[str], join_by: int
    ) -> None:
        self._run(self.operations.add_invitation(invite_key, name, grant, addresses, join_by))

    def redeem(
        self, invite_key: bytes, wg_key: bytes, make_record: Callable[[str], str | None], now: int
    ) -> str:
        return self._run(self.operations.redeem(invite_key, wg_key, make_record, now))

    def put_record(self, key: bytes, name: str, addresses: list[str], text: str) -> None:
        self._run(self.operations.put_record(key, name, addresses, text))

    def revoke(self, key: bytes, text: str) -> None:
        self._run(self.operations.revoke(key, text))

    def version(self) -> str:
        return self._run(self.operations.version())

    def snapshot(self) -> Snapshot:
        return self._run(self.operations.snapshot())

    def used_addresses(self, now: int) -> set[str]:
        return self._run(self.operations.used_addresses(now))

    def keys_named(self, name: str) -> list[bytes]:
        return self._run(self.operations.keys_named(name))

    def names_taken(self, now: int) -> set[str]:
        return self._run(self.operations.names_taken(now))


class EtcdAgentStore:
    """The same operations for the node, over ``twisted.web``'s ``Agent`` on the reactor
    (no thread): ``run(name, *args)`` fires with what the blocking method would return."""

    def __init__(self, reactor: Any, url: str) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool

        self.reactor = reactor
        self.endpoints, prefix = parse_url(url)
        self.operations = EtcdOperations(prefix)
        self.pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.pool.maxPersistentPerHost = 2
        self.agent = Agent(reactor, connectTimeout=TIMEOUT, pool=self.pool)  # type: ignore[no-untyped-call]

    @defer.inlineCallbacks
    def _call(self, request: Request) -> Generator[Deferred[Any], Any, dict[str, Any]]:
        from twisted.web.client import FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        method, body = request
        data = json.dumps(body).encode()
        problems = []
        for endpoint in self.endpoints:
            try:
                response = yield self.agent.request(
                    b"POST",
                    f"{endpoint}/v3/{method}".encode(),
                    Headers({b"Content-Type": [b"application/json"]}),
                    FileBodyProducer(io.BytesIO(data)),  # type: ignore[no-untyped-call]
                )
                payload = yield readBody(response)
                if response.code != 200:
                    raise ValueError(f"HTTP {response.code}")
                return _answer(endpoint, payload)
            except Exception as e:
                problems.append(f"{endpoint}: {e}")
        raise StoreError("cannot reach etcd (" + "; ".join(problems) + ")")

    @defer.inlineCallbacks
    def run(self, name: str, *args: Any) -> Generator[Deferred[Any], Any, Any]:
        operation: Operation[Any] = getattr(self.operations, name)(*args)
        try:
            request = next(operation)
            while True:
                answer = yield self._call(request)
                request = operation.send(answer)
        except StopIteration as done:
            return done.value

    def close(self) -> Deferred[Any]:
        closed: Deferred[Any] = self.pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed
