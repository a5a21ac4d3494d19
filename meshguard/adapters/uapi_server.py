"""Serve the WireGuard UAPI on ``/var/run/wireguard/NAME.sock`` so the stock ``wg`` tool works.

This is the thin Twisted adapter around :mod:`meshguard.codecs.uapi`: it splits the stream into
requests, asks the backend, and writes the replies. Backend failures become error replies and log
lines; they never reach the reactor.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Final, Protocol, cast

from twisted.internet import protocol
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.logger import Logger

from meshguard.adapters.peer_credentials import refuse_other_users
from meshguard.codecs.uapi import (
    DEFAULT_MAX_REQUEST_SIZE,
    ERRNO_UNKNOWN,
    GetRequest,
    InvalidRequest,
    SetRequest,
    UAPIBackend,
    UAPIError,
    UAPIRequestParser,
    format_error,
    format_get,
    parse_set,
)

__all__ = [
    "DEFAULT_DIRECTORY",
    "InterfaceInUseError",
    "UAPIFactory",
    "UAPIProtocol",
    "listen_uapi",
    "socket_path",
]

#: Where ``wg`` looks for userspace interfaces (RUNSTATEDIR "/wireguard/" in wireguard-tools).
DEFAULT_DIRECTORY: Final = "/var/run/wireguard"

_IFNAMSIZ: Final = 16

log = Logger()


# Without a zope-aware mypy plugin, calls through interface methods do not type-check, so the two
# seams this module calls are also spelled out structurally.
class _UNIXReactor(Protocol):
    def listenUNIX(
        self,
        address: str,
        factory: protocol.Factory,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> IListeningPort: ...


class _StreamTransport(Protocol):
    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...


class InterfaceInUseError(Exception):
    """Another live process already answers on this interface's UAPI socket."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(f"interface {name} is already served by another process ({path})")
        self.name = name
        self.path = path


class UAPIProtocol(protocol.Protocol):
    """One ``wg`` connection; several requests may follow each other on it."""

    def __init__(self, backend: UAPIBackend, max_request_size: int) -> None:
        self._backend = backend
        self._parser = UAPIRequestParser(max_request_size)
        self._refused = False

    def connectionMade(self) -> None:
        self._refused = refuse_other_users(self.transport, "UAPI socket")

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        out = cast(_StreamTransport, self.transport)
        for request in self._parser.feed(data):
            match request:
                case GetRequest():
                    out.write(self._get())
                case SetRequest(body=body):
                    out.write(self._set(body))
                case InvalidRequest(error=error):
                    # The stream cannot be resynchronised: answer, then hang up (wg-go just closes).
                    log.warn("UAPI protocol error, closing: {error}", error=str(error))
                    out.write(format_error(error.errno))
                    out.loseConnection()

    def _get(self) -> bytes:
        try:
            return format_get(self._backend.status())
        except UAPIError as e:
            log.warn("UAPI get failed: {error}", error=str(e))
            return format_error(e.errno)
        except Exception:
            log.failure("UAPI get failed in the backend")
            return format_error(ERRNO_UNKNOWN)

    def _set(self, body: bytes) -> bytes:
        # Request bodies carry private and preshared keys: they are never logged.
        try:
            operations = parse_set(body)
            self._backend.apply(operations)
        except UAPIError as e:
            log.warn("UAPI set rejected: {error}", error=str(e))
            return format_error(e.errno)
        except Exception:
            log.failure("UAPI set failed in the backend")
            return format_error(ERRNO_UNKNOWN)
        return format_error(0)


class UAPIFactory(protocol.Factory):
    """Builds a :class:`UAPIProtocol` per connection, all sharing one backend."""

    noisy = False

    def __init__(
        self, backend: UAPIBackend, max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    ) -> None:
        self.backend = backend
        self.max_request_size = max_request_size

    def buildProtocol(self, addr: object) -> UAPIProtocol:
        proto = UAPIProtocol(self.backend, self.max_request_size)
        proto.factory = self
        return proto


def socket_path(name: str, directory: str = DEFAULT_DIRECTORY) -> str:
    """The UAPI socket path for interface ``name``; raises ValueError for a name ``wg`` rejects."""
    if not name or len(name) >= _IFNAMSIZ or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r}")
    return os.path.join(directory, f"{name}.sock")


def _clear_stale_socket(name: str, path: str) -> None:
    """Unlink a socket nobody answers on; refuse if someone does, as wireguard-go does.

    The probe is a blocking connect on a local socket, which returns at once; it runs at startup.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise InterfaceInUseError(name, path)


def listen_uapi(
    reactor: IReactorUNIX,
    name: str,
    backend: UAPIBackend,
    directory: str = DEFAULT_DIRECTORY,
) -> IListeningPort:
    """Listen on ``directory/NAME.sock`` (mode 0600); the file is removed on ``stopListening``.

    Raises InterfaceInUseError if another process serves NAME, ValueError for a bad name, and
    CannotListenError/OSError if the socket cannot be created. Call it while still root
    (``privilegedStartService``): the directory is usually root-owned. Pass the global reactor
    as ``IReactorUNIX(reactor)``: its static type does not include IReactorUNIX.
    """
    path = socket_path(name, directory)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _clear_stale_socket(name, path)
    # Twisted chmods after bind; umask 077 closes the window in which the socket would be open.
    old_umask = os.umask(0o077)
    try:
        unix = cast(_UNIXReactor, reactor)
        port = unix.listenUNIX(path, UAPIFactory(backend), mode=0o600)
    finally:
        os.umask(old_umask)
    log.info("UAPI for {name} listening on {path}", name=name, path=path)
    return port
