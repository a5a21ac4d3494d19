"""The `meshguard` command: key tools that behave like `wg genkey` and friends, and config checks.

Output formats and exit codes follow `wg` so scripts written for it work unchanged; `run` takes
its streams as arguments so tests need no real terminal or subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import stat
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

from meshguard.codecs import keys
from meshguard.codecs.config import ConfigError, load_config

STATUS_MODULE = "meshguard.app.status_client"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshguard", description="Keys, config checks and status for meshguard nodes."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("genkey", help="print a new private key (base64), like 'wg genkey'")
    commands.add_parser(
        "pubkey", help="read a private key on stdin and print its public key, like 'wg pubkey'"
    )
    commands.add_parser("genpsk", help="print a new preshared key (base64), like 'wg genpsk'")
    check = commands.add_parser("check-config", help="parse a config file and report problems")
    check.add_argument("path", metavar="PATH")
    status = commands.add_parser("status", help="show the mesh status of a running node")
    status.add_argument("name", metavar="NAME", nargs="?", default=None)
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_operations(commands, status)
    # Signed membership: mesh init, invite, join, members (docs/invitations.md).
    from meshguard.app import mesh_cli

    mesh_cli.add_commands(commands)
    return parser


def _add_operations(commands: Any, status: argparse.ArgumentParser) -> None:
    """``status -v/--watch``, ``ping`` and ``netcheck`` (docs/operations.md)."""
    status.add_argument("-v", "--verbose", action="store_true", help="every field, in words")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    ping = commands.add_parser(
        "ping", help="mesh-ping a peer: round-trip time and the path each answer took"
    )
    ping.add_argument("peer", metavar="PEER", help="member name, public key or tunnel address")
    ping.add_argument("-c", "--count", type=int, default=None, help="pings to send (default 4)")
    ping.add_argument(
        "--until-direct",
        action="store_true",
        help="stop at the first answer over a direct path (up to -c, default 20 pings); "
        "exit 1 if none came direct",
    )
    ping.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between pings")
    ping.add_argument("-W", "--timeout", type=float, default=2.0, help="seconds to wait per ping")
    ping.add_argument("--interface", metavar="NAME", default=None)
    ping.add_argument("--json", action="store_true", help="print each answer as a JSON line")
    netcheck = commands.add_parser(
        "netcheck", help="NAT kind, public endpoints, UDP, path MTU and relays, from the node"
    )
    netcheck.add_argument("name", metavar="NAME", nargs="?", default=None)
    netcheck.add_argument("--json", action="store_true", help="print JSON")
    netcheck.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="with no node running, probe through this config's introducers",
    )


def _warn_if_world_accessible(stdout: TextIO, stderr: TextIO) -> None:
    """Warn, as `wg genkey` does, when a secret is about to land in a file others can read."""
    try:
        mode = os.fstat(stdout.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return
    if stat.S_ISREG(mode) and mode & 0o007:
        stderr.write(
            "Warning: writing to world accessible file.\n"
            "Consider setting the umask to 077 and trying again.\n"
        )


def _genkey(stdout: TextIO, stderr: TextIO, urandom: Callable[[int], bytes]) -> int:
    _warn_if_world_accessible(stdout, stderr)
    stdout.write(keys.key_to_base64(keys.genkey(urandom)) + "\n")
    return 0


def _genpsk(stdout: TextIO, stderr: TextIO, urandom: Callable[[int], bytes]) -> int:
    _warn_if_world_accessible(stdout, stderr)
    stdout.write(keys.key_to_base64(keys.genpsk(urandom)) + "\n")
    return 0


def _pubkey(stdin: BinaryIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read exactly like `wg pubkey`: 44 characters, then only whitespace or NULs."""
    data = stdin.read()
    head, tail = data[: keys.KEY_LEN_BASE64], data[keys.KEY_LEN_BASE64 :]
    if len(head) != keys.KEY_LEN_BASE64:
        stderr.write("meshguard pubkey: Key is not the correct length or format\n")
        return 1
    if tail.strip(b" \t\n\v\f\r\0"):
        stderr.write("meshguard pubkey: Trailing characters found after key\n")
        return 1
    try:
        private = keys.key_from_base64(head.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        stderr.write("meshguard pubkey: Key is not the correct length or format\n")
        return 1
    stdout.write(keys.key_to_base64(keys.pubkey(private)) + "\n")
    return 0


def _check_config(path: str, stdout: TextIO, stderr: TextIO) -> int:
    try:
        config = load_config(path)
    except ConfigError as e:
        stderr.write(f"{e}\n")
        return 1
    for warning in config.warnings:
        stderr.write(f"warning: {warning}\n")
    count = len(config.peers)
    stdout.write(f"{path}: OK, {count} peer{'' if count == 1 else 's'}\n")
    return 0


def _status(
    name: str | None,
    as_json: bool,
    stderr: TextIO,
    verbose: bool = False,
    watch: float | None = None,
) -> int:
    try:
        module = importlib.import_module(STATUS_MODULE)
    except ModuleNotFoundError as e:
        if e.name != STATUS_MODULE:
            raise
        stderr.write("status: not available\n")
        return 1
    if watch is not None and not 0.2 <= watch <= 3600:
        stderr.write("status: --watch takes 0.2 to 3600 seconds\n")
        return 2
    if verbose or watch is not None:
        return int(module.main(name, as_json, verbose=verbose, watch=watch))
    return int(module.main(name, as_json))


def _ping(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from meshguard.app import ping_client

    count = args.count if args.count is not None else (20 if args.until_direct else 4)
    return ping_client.main(
        args.peer,
        interface=args.interface,
        count=count,
        until_direct=args.until_direct,
        interval=args.interval,
        timeout=args.timeout,
        as_json=args.json,
        stdout=stdout,
        stderr=stderr,
    )


def _netcheck(
    name: str | None, as_json: bool, config_path: str | None, stdout: TextIO, stderr: TextIO
) -> int:
    """Ask the running node; with none, probe through ``--config``'s introducers."""
    import json

    from meshguard.adapters.path_view import host_networks
    from meshguard.app.netcheck import format_netcheck, netcheck_report
    from meshguard.app.status_client import interface_names, read_status

    if name is None and config_path is not None:
        name = os.path.splitext(os.path.basename(config_path))[0]
    if name is None:
        names = interface_names()
        name = names[0] if len(names) == 1 else None
    document = None
    problem = "no meshguard interface is running"
    if name is not None:
        try:
            document = read_status(name)
        except (OSError, ValueError) as e:
            problem = f"cannot read the status of {name}: {e}"
    if document is None:
        if config_path is None:
            stderr.write(
                f"netcheck: {problem}; start the node, or give --config FILE to probe "
                "through its introducers without it\n"
            )
            return 1
        from meshguard.app.netcheck_probe import probe

        try:
            document = probe(load_config(config_path))
        except (ConfigError, ValueError, OSError) as e:
            stderr.write(f"netcheck: {e}\n")
            return 1
    from meshguard.adapters.portmap_probe import probe_port_mapping

    report = netcheck_report(
        document, host_networks(exclude=name), port_mapping=probe_port_mapping()
    )
    if as_json:
        stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        stdout.write(format_netcheck(report) + "\n")
    return 0


def run(
    argv: list[str],
    stdin: BinaryIO,
    stdout: TextIO,
    stderr: TextIO,
    urandom: Callable[[int], bytes] = os.urandom,
) -> int:
    """Run one command with explicit streams and random source; return the exit code."""
    parser = _parser()
    try:
        # argparse prints usage and help to sys.stdout/sys.stderr; send them to our streams.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    command: str = args.command
    if command == "genkey":
        return _genkey(stdout, stderr, urandom)
    if command == "genpsk":
        return _genpsk(stdout, stderr, urandom)
    if command == "pubkey":
        return _pubkey(stdin, stdout, stderr)
    if command == "check-config":
        return _check_config(args.path, stdout, stderr)
    from meshguard.app import mesh_cli

    if command in mesh_cli.COMMANDS:
        return mesh_cli.run(args, stdout, stderr, stdin)
    if command == "ping":
        return _ping(args, stdout, stderr)
    if command == "netcheck":
        return _netcheck(args.name, args.json, args.config, stdout, stderr)
    return _status(args.name, args.json, stderr, args.verbose, args.watch)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`meshguard = meshguard.app.cli:main`)."""
    return run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
