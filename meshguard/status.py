"""The mesh status socket: ``/var/run/meshguard/NAME.sock`` (0600), read by ``meshguard status``.

A client connects and receives one JSON document describing the node and every peer, then the
connection closes. JSON keeps the socket useful to scripts (``meshguard status --json``) and lets
the mesh features add fields without changing a wire format.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from meshguard.peer_credentials import refuse_other_users

log = Logger()

DEFAULT_DIRECTORY = "/var/run/meshguard"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class StatusProtocol(protocol.Protocol):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def connectionMade(self) -> None:
        if refuse_other_users(self.transport, "status socket"):
            return
        try:
            document = self.snapshot()
        except Exception:
            log.failure("status snapshot failed")
            document = {"error": "status snapshot failed; see the node's log"}
        assert self.transport is not None
        self.transport.write(json.dumps(document, sort_keys=True).encode() + b"\n")
        self.transport.loseConnection()


class StatusFactory(protocol.Factory):
    noisy = False

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def buildProtocol(self, addr: object) -> StatusProtocol:
        return StatusProtocol(self.snapshot)


def socket_path(name: str, directory: str = DEFAULT_DIRECTORY) -> str:
    if not name or "/" in name or len(name.encode()) > 15:
        raise ValueError(f"invalid interface name {name!r}")
    return os.path.join(directory, f"{name}.sock")


def listen_status(
    reactor: Any,
    name: str,
    snapshot: Callable[[], dict[str, Any]],
    directory: str = DEFAULT_DIRECTORY,
) -> IListeningPort:
    """Serve ``snapshot()`` on NAME's status socket; a stale socket file is replaced."""
    path = socket_path(name, directory)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise OSError(f"interface {name} already has a status socket at {path}")
        finally:
            probe.close()
    old_umask = os.umask(0o077)
    try:
        port: IListeningPort = reactor.listenUNIX(path, StatusFactory(snapshot), mode=0o600)
    finally:
        os.umask(old_umask)
    return port
