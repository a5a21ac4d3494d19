"""A store URL (``MeshStore``, ``--store``) opened as the backend it names.

``sqlite:PATH`` (or a plain path) is the default store, ``etcd:http://HOST:PORT[,...]`` the
store for fleets. Choosing lives here, apart from both backends, so that neither imports the
other and etcd's code loads only for a mesh that uses it.
"""

from __future__ import annotations

from typing import Any

from meshguard.adapters.store import MembershipStore, SqliteStore, StoreRunner, ThreadRunner


def open_store(url: str) -> MembershipStore:
    """``sqlite:PATH`` (or a plain path) or ``etcd:http://HOST:PORT[,...]``."""
    if url.startswith("etcd:"):
        from meshguard.adapters.etcd_store import EtcdStore  # only for a mesh on etcd

        return EtcdStore(url[len("etcd:") :])
    path = url[len("sqlite:") :] if url.startswith("sqlite:") else url
    return SqliteStore(path)


def node_runner(reactor: Any, url: str, store: MembershipStore) -> StoreRunner:
    """etcd through ``twisted.web``'s Agent on the reactor; anything else in worker threads."""
    if url.startswith("etcd:"):
        from meshguard.adapters.etcd_store import EtcdAgentStore

        return EtcdAgentStore(reactor, url[len("etcd:") :])
    return ThreadRunner(reactor, store)
