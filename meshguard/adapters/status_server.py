"""The mesh status socket: ``/var/run/meshguard/NAME.sock`` (0600), read by ``meshguard status``.

A client connects and receives one JSON document describing the node and every peer, then the
connection closes. JSON keeps the socket useful to scripts (``meshguard status --json``) and lets
the mesh features add fields without changing a wire format.

Requests: a client may instead send one JSON line ``{"request": NAME, ...}`` right after
connecting; the node answers with one or more JSON lines (``meshguard ping`` streams one per
answer) and closes. A client that sends nothing gets the status document after
:data:`REQUEST_GRACE` seconds, so plain connect-and-read keeps working.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from meshguard.adapters.peer_credentials import refuse_other_users

log = Logger()

DEFAULT_DIRECTORY = "/var/run/meshguard"
#: How long the node waits for a request line before sending the status document.
REQUEST_GRACE = 0.3
#: Longest request line accepted.
MAX_REQUEST = 4096


class Reply:
    """The answer channel of one request: JSON lines out, a close, and an ear for the client
    going away (a streaming request such as ``ping`` stops its timers then)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.closed = False
        self.on_close: list[Callable[[], None]] = []

    def write(self, document: Mapping[str, Any]) -> None:
        if not self.closed:
            self._transport.write(json.dumps(document, sort_keys=True).encode() + b"\n")

    def finish(self) -> None:
        if not self.closed:
            self._transport.loseConnection()
        self._gone()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        for callback in self.on_close:
            try:
                callback()
            except Exception:
                log.failure("control request cleanup failed")


#: ``handler(request, reply)``: answers a request; must eventually call ``reply.finish()``.
RequestHandler = Callable[[dict[str, Any], Reply], None]


class StatusProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        handlers: Mapping[str, RequestHandler] | None = None,
        clock: Any = None,
    ) -> None:
        self.snapshot = snapshot
        self.handlers = dict(handlers or {})
        self.clock = clock
        self._grace: IDelayedCall | None = None
        self._reply: Reply | None = None

    def connectionMade(self) -> None:
        if refuse_other_users(self.transport, "status socket"):
            return
        self._reply = Reply(self.transport)
        if self.clock is None:
            self._answer_status()
        else:
            self._grace = self.clock.callLater(REQUEST_GRACE, self._answer_status)

    def _answer_status(self) -> None:
        self._grace = None
        try:
            document = self.snapshot()
        except Exception:
            log.failure("status snapshot failed")
            document = {"error": "status snapshot failed; see the node's log"}
        assert self._reply is not None
        self._reply.write(document)
        self._reply.finish()

    def lineReceived(self, line: bytes) -> None:
        if self._grace is None:
            return  # one request per connection; anything after it is ignored
        self._grace.cancel()
        self._grace = None
        reply = self._reply
        assert reply is not None
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("request"), str):
            reply.write({"error": 'not a request: send one JSON line {"request": NAME}'})
            reply.finish()
            return
        name = request["request"]
        if name == "status":
            self._answer_status()
            return
        handler = self.handlers.get(name)
        if handler is None:
            known = ", ".join(sorted({"status", *self.handlers}))
            reply.write({"error": f"unknown request {name!r} (this node knows: {known})"})
            reply.finish()
            return
        try:
            handler(request, reply)
        except Exception:
            log.failure("control request {name} failed", name=name)
            reply.write({"error": f"request {name} failed; see the node's log"})
            reply.finish()

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        if self._reply is not None:
            self._reply._gone()


class StatusFactory(protocol.Factory):
    noisy = False

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        handlers: Mapping[str, RequestHandler] | None = None,
        clock: Any = None,
    ) -> None:
        self.snapshot = snapshot
        #: Requests besides ``status`` (``ping``...), added by the node's features.
        self.handlers: dict[str, RequestHandler] = dict(handlers or {})
        self.clock = clock

    def buildProtocol(self, addr: object) -> StatusProtocol:
        return StatusProtocol(self.snapshot, self.handlers, self.clock)


def socket_path(name: str, directory: str = DEFAULT_DIRECTORY) -> str:
    if not name or "/" in name or len(name.encode()) > 15:
        raise ValueError(f"invalid interface name {name!r}")
    return os.path.join(directory, f"{name}.sock")


def listen_status(
    reactor: Any,
    name: str,
    snapshot: Callable[[], dict[str, Any]],
    directory: str = DEFAULT_DIRECTORY,
    handlers: Mapping[str, RequestHandler] | None = None,
) -> IListeningPort:
    """Serve ``snapshot()`` (and the ``handlers``' requests) on NAME's status socket; a stale
    socket file is replaced. The factory is ``port.factory``: features add handlers there."""
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
        factory = StatusFactory(snapshot, handlers, clock=reactor)
        port: IListeningPort = reactor.listenUNIX(path, factory, mode=0o600)
    finally:
        os.umask(old_umask)
    return port
