"""The mesh store on an etcd cluster (v3 API through its JSON gateway), for fleets.

Several introducers share one etcd: each reads and polls the same keys, so any introducer can
die and the others keep serving joins and lists. Single use of an invitation is an etcd
transaction that compares the invitation's ``mod_revision`` with the one read: of two concurrent
joins only one transaction succeeds. ``MeshStore = etcd:http://HOST:PORT[/PREFIX]`` (several
``http://`` URLs separated by ``,`` are tried in turn).

The calls block (stdlib ``urllib``) and the node runs them in a worker thread, like SQLite's;
records are still verified by whoever reads them, so etcd is a carrier like any other.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from meshguard.mesh.authority import b64u, unb64u
from meshguard.store import JoinRefusedError, Snapshot, StoreError

TIMEOUT = 5.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(value: str) -> str:
    return base64.b64decode(value).decode()


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class EtcdStore:
    """The :class:`meshguard.store.MembershipStore` methods on etcd keys under a prefix."""

    def __init__(self, url: str) -> None:
        self.endpoints: list[str] = []
        prefix = "/meshguard"
        for part in url.split(","):
            parsed = urllib.parse.urlsplit(part.strip())
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StoreError(f"MeshStore etcd:{url}: {part!r} is not http://HOST:PORT")
            self.endpoints.append(f"{parsed.scheme}://{parsed.netloc}")
            if parsed.path.strip("/"):
                prefix = "/" + parsed.path.strip("/")
        self.prefix = prefix + "/"

    # ---- the v3 JSON gateway ----------------------------------------------------------------

    def _call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        problems = []
        for endpoint in self.endpoints:
            request = urllib.request.Request(
                f"{endpoint}/v3/{method}",
                data=data,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    value = json.loads(response.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                problems.append(f"{endpoint}: {e}")
                continue
            if not isinstance(value, dict):
                problems.append(f"{endpoint}: not a JSON object")
                continue
            return value
        raise StoreError("cannot reach etcd (" + "; ".join(problems) + ")")

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _get(self, key: str) -> tuple[str, int] | None:
        """The value and mod_revision of ``key``."""
        kvs = self._call("kv/range", {"key": _b64(key)}).get("kvs", [])
        if not kvs:
            return None
        return _text(kvs[0].get("value", "")), int(kvs[0].get("mod_revision", 0))

    def _list(self, prefix: str) -> tuple[list[tuple[str, str]], str]:
        """``(key, value)`` pairs under ``prefix`` and the store's revision."""
        response = self._call("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        pairs = [(_text(kv["key"]), _text(kv.get("value", ""))) for kv in response.get("kvs", [])]
        return pairs, str(response.get("header", {}).get("revision", "0"))

    def _put(self, key: str, value: str) -> dict[str, Any]:
        return {"request_put": {"key": _b64(key), "value": _b64(value)}}

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        response = self._call("kv/txn", {"compare": compare, "success": success})
        return bool(response.get("succeeded", False))

    # ---- the store ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        found = self._get(self._key("meta", key))
        return found[0] if found is not None else None

    def set_meta(self, key: str, value: str) -> None:
        self._txn([], [self._put(self._key("meta", key), value)])

    def add_invitation(
        self, invite_key: bytes, name: str, grant: str, addresses: list[str], join_by: int
    ) -> None:
        value = {"name": name, "grant": grant, "addresses": addresses, "join_by": join_by}
        self._txn([], [self._put(self._key("invitations", b64u(invite_key)), json.dumps(value))])

    def redeem(
        self, invite_key: bytes, wg_key: bytes, make_record: Callable[[str], str | None], now: int
    ) -> str:
        key = self._key("invitations", b64u(invite_key))
        found = self._get(key)
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
        if self._get(self._key("revocations", b64u(wg_key))) is not None:
            raise JoinRefusedError("this key was removed from the mesh")
        invitation["used_by"] = b64u(wg_key)
        invitation["used_at"] = now
        entry = {"name": invitation["name"], "addresses": invitation["addresses"], "text": record}
        succeeded = self._txn(
            [
                {
                    "key": _b64(key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": str(revision),
                }
            ],
            [
                self._put(key, json.dumps(invitation)),
                self._put(self._key("records", b64u(wg_key)), json.dumps(entry)),
            ],
        )
        if not succeeded:
            raise JoinRefusedError("this invitation was already used; ask for a new one")
        return record

    def put_record(self, key: bytes, name: str, addresses: list[str], text: str) -> None:
        entry = {"name": name, "addresses": addresses, "text": text}
        self._txn([], [self._put(self._key("records", b64u(key)), json.dumps(entry))])

    def revoke(self, key: bytes, text: str) -> None:
        record = self._key("records", b64u(key))
        self._txn(
            [],
            [
                {"request_delete_range": {"key": _b64(record)}},
                self._put(self._key("revocations", b64u(key)), text),
            ],
        )

    def version(self) -> str:
        return self._list(self._key("records") + "/")[1] + "/" + self._revocation_count()

    def _revocation_count(self) -> str:
        return str(len(self._list(self._key("revocations") + "/")[0]))

    def snapshot(self) -> Snapshot:
        records, revision = self._list(self._key("records") + "/")
        revocations, _ = self._list(self._key("revocations") + "/")
        texts = [json.loads(value)["text"] for _, value in records]
        return Snapshot(
            texts, [value for _, value in revocations], revision + "/" + str(len(revocations))
        )

    def _invitations(self) -> list[dict[str, Any]]:
        pairs, _ = self._list(self._key("invitations") + "/")
        return [json.loads(value) for _, value in pairs]

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        pairs, _ = self._list(self._key("records") + "/")
        return [(key.rsplit("/", 1)[-1], json.loads(value)) for key, value in pairs]

    def used_addresses(self, now: int) -> set[str]:
        used: set[str] = set()
        for _, entry in self._records():
            used.update(entry["addresses"])
        for invitation in self._invitations():
            if invitation.get("used_by") is None and invitation["join_by"] > now:
                used.update(invitation["addresses"])
        return used

    def keys_named(self, name: str) -> list[bytes]:
        return [k for key, entry in self._records() if entry["name"] == name and (k := unb64u(key))]

    def names_taken(self, now: int) -> set[str]:
        names = {entry["name"] for _, entry in self._records()}
        names.update(
            i["name"]
            for i in self._invitations()
            if i.get("used_by") is None and i["join_by"] > now
        )
        return names
