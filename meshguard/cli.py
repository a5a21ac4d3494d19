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
from typing import BinaryIO, TextIO

from meshguard import keys
from meshguard.config import ConfigError, load_config

STATUS_MODULE = "meshguard.status_client"


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
    # Signed membership: mesh init, invite, join, members (docs/invitations.md).
    from meshguard import mesh_cli

    mesh_cli.add_commands(commands)
    return parser


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


def _status(name: str | None, as_json: bool, stderr: TextIO) -> int:
    try:
        module = importlib.import_module(STATUS_MODULE)
    except ModuleNotFoundError as e:
        if e.name != STATUS_MODULE:
            raise
        stderr.write("status: not available\n")
        return 1
    return int(module.main(name, as_json))


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
    from meshguard import mesh_cli

    if command in mesh_cli.COMMANDS:
        return mesh_cli.run(args, stdout, stderr, stdin)
    return _status(args.name, args.json, stderr)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`meshguard = meshguard.cli:main`)."""
    return run(sys.argv[1:] if argv is None else argv, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
