"""``meshguard-userspace [-f] IFACE``: a drop-in for the ``wireguard-go`` command.

wg-quick runs ``$WG_QUICK_USERSPACE_IMPLEMENTATION IFACE`` when the kernel has no WireGuard, then
configures the interface with ``wg setconf`` and ``ip``. Like wireguard-go, this creates the TUN
interface and its UAPI socket, goes to the background and exits 0 once both are ready (or stays
in the foreground with ``-f`` / ``WG_PROCESS_FOREGROUND=1``), and exits when the interface is
deleted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _run(interface: str, ready_fd: int | None, on_ready: Callable[[], None] | None = None) -> int:
    from meshguard.adapters.hot_reactor import install_if_free

    install_if_free()  # the data path's reactor, unless one is imported already
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from meshguard.app.service import NodeService

    level = os.environ.get("LOG_LEVEL", "error")
    if level in ("verbose", "debug"):
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    service = NodeService(interface, None, manage_link=False)
    try:
        service.privilegedStartService()
    except SystemExit as e:
        if ready_fd is not None:
            os.write(ready_fd, b"E")
            os.close(ready_fd)
        return int(e.code or 1)
    service.startService()
    if ready_fd is not None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)
    if on_ready is not None:
        on_ready()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshguard-userspace",
        description="Create a WireGuard interface served by meshguard (like wireguard-go).",
    )
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("interface", help="interface name (at most 15 characters)")
    args = parser.parse_args(argv)
    foreground = args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    if foreground:
        return _run(args.interface, None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        status = os.read(read_end, 1)
        os.close(read_end)
        if status == b"R":
            return 0
        if not status:
            sys.stderr.write("meshguard-userspace: the daemon exited before it was ready\n")
        return 1
    # The daemon: its own session, no controlling terminal, stdio to /dev/null once ready.
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    code = _run_daemon(args.interface, write_end, devnull)
    os._exit(code)


def _run_daemon(interface: str, ready_fd: int, devnull: int) -> int:
    # stderr stays open until ready so that a startup error reaches the user's terminal, and
    # is let go as soon as we are ready: a caller capturing our output (wg-quick under a
    # pipe) would otherwise wait for the daemon to exit.
    def release_stderr() -> None:
        os.dup2(devnull, 2)

    try:
        return _run(interface, ready_fd, release_stderr)
    finally:
        release_stderr()


if __name__ == "__main__":
    sys.exit(main())
