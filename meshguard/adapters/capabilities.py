"""Keep ``CAP_NET_ADMIN`` (and only it) when the node runs as an unprivileged user.

The node changes its interface after start: reloads add addresses and routes, learned members
get routes, the MTU follows path MTU discovery, a moved interface is noticed. Each of those is an
``ip`` command or a socket option that needs ``CAP_NET_ADMIN``. Two ways to run without root keep
it:

- systemd (``examples/meshguard@.service``): ``User=`` with ``AmbientCapabilities=CAP_NET_ADMIN``
  starts the process as that user holding the capability, and ambient capabilities pass to the
  ``ip`` commands it runs. :func:`retain_net_admin` then only drops everything else.
- ``twistd --uid/--gid`` as root: twistd calls ``setuid`` between ``privilegedStartService`` and
  ``startService``, which would clear every capability. :func:`keep_across_uid_change` (before)
  asks the kernel to keep the permitted set (``PR_SET_KEEPCAPS``), and :func:`retain_net_admin`
  (after) makes ``CAP_NET_ADMIN`` effective again, inheritable and ambient for child processes,
  and drops the rest.

Both are no-ops for root and on systems without the calls (they report False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["CAP_NET_ADMIN", "has_effective", "keep_across_uid_change", "retain_net_admin"]

CAP_NET_ADMIN = 12
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_IS_SET = 1
_PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _get() -> tuple[ctypes.CDLL, _Header, ctypes.Array[_Data]] | None:
    libc = _libc()
    if libc is None:
        return None
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return None
    return libc, header, data


def has_effective(cap: int = CAP_NET_ADMIN) -> bool:
    """Whether this process holds ``cap`` in its effective set (root usually does)."""
    got = _get()
    if got is None:
        return os.geteuid() == 0
    _, _, data = got
    return bool(data[cap // 32].effective & (1 << (cap % 32)))


def keep_across_uid_change() -> bool:
    """Ask the kernel to keep the permitted capabilities across a coming ``setuid`` (root
    only; twistd's ``--uid`` then leaves us something to :func:`retain_net_admin` from)."""
    if os.geteuid() != 0:
        return False
    libc = _libc()
    return libc is not None and libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0


def retain_net_admin() -> bool:
    """As a non-root user: keep ``CAP_NET_ADMIN`` effective, inheritable and ambient (so the
    ``ip`` commands we run have it) and drop every other capability. True when we hold it."""
    if os.geteuid() == 0:
        return True
    got = _get()
    if got is None:
        return False
    libc, header, data = got
    word, bit = CAP_NET_ADMIN // 32, 1 << (CAP_NET_ADMIN % 32)
    if not data[word].permitted & bit:
        return False
    if (
        data[word].effective & bit
        and data[word].permitted == data[word].inheritable == bit
        and not data[1 - word].permitted
        and libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_IS_SET, CAP_NET_ADMIN, 0, 0) == 1
    ):
        return True  # already so (systemd's AmbientCapabilities=), and capset may be filtered
    wanted = (_Data * 2)()
    wanted[word].effective = wanted[word].permitted = wanted[word].inheritable = bit
    if libc.capset(ctypes.byref(header), wanted) != 0:
        return bool(data[word].effective & bit)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN, 0, 0)
    return True
