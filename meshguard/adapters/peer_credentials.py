"""Who is on the other end of a control socket, and whether they may talk to the node.

The UAPI and status sockets are created 0600, so the kernel already keeps other users out. Modes
get loosened by hand, and a directory may be shared; the kernel's word on the connecting process
(``SO_PEERCRED``) is a second lock that does not depend on file modes: only root and the node's
own user get an answer.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.logger import Logger

__all__ = ["may_connect", "peer_uid", "refuse_other_users"]

log = Logger()

_UCRED = struct.Struct("=iII")  # pid, uid, gid


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket transport (None: unknown)."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        sock = get_handle()
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError, TypeError):
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


def may_connect(uid: int | None) -> bool:
    """Root, and the user the node runs as; an unknown peer (not a UNIX socket) passes."""
    return uid is None or uid == 0 or uid == os.geteuid()


def refuse_other_users(transport: Any, what: str) -> bool:
    """Close ``transport`` if its peer is another user; True when it was refused."""
    uid = peer_uid(transport)
    if may_connect(uid):
        return False
    log.warn("{what}: refused a connection from uid {uid}", what=what, uid=uid)
    transport.abortConnection()
    return True
