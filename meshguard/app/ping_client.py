"""``meshguard ping PEER``: ask the node for mesh pings and print each answer with its path.

Exit status for scripts: 0 when an answer came (with ``--until-direct``: over a direct path),
1 when none did (or none direct), 2 for a usage error, an unknown peer or no running node.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from meshguard.adapters.status_server import DEFAULT_DIRECTORY
from meshguard.app.status_client import interface_names, request_lines

EXIT_ANSWERED, EXIT_NO_ANSWER, EXIT_USAGE = 0, 1, 2

#: ``run(argv) -> exit status``: the ICMP fallback's ``ping`` (tests give a fake).
Runner = Callable[[Sequence[str]], int]


def _run_ping(argv: Sequence[str]) -> int:
    return subprocess.run(list(argv), check=False).returncode


def pick_interface(name: str | None, directory: str, stderr: TextIO) -> str | None:
    if name:
        return name
    names = interface_names(directory)
    if len(names) == 1:
        return names[0]
    if not names:
        stderr.write(f"no meshguard interface is running (no socket in {directory})\n")
    else:
        stderr.write(f"several interfaces run ({', '.join(names)}): give --interface NAME\n")
    return None


def _path_text(line: dict[str, Any]) -> str:
    """``direct 203.0.113.4:51820``, ``LAN 192.168.1.2:51820``, ``member relay Q5YWoT8w``."""
    kind = str(line.get("path_kind", "?"))
    via = line.get("path_via")
    endpoint = line.get("endpoint")
    words = {"lan": "LAN", "member": "member relay", "tls-relay": "TLS relay"}.get(kind, kind)
    if via:
        return f"{words} {str(via)[:8] if len(str(via)) == 44 else via}"
    return f"{words} {endpoint}" if endpoint else words


def _short(peer: str) -> str:
    return peer[:8] if len(peer) == 44 else peer


def main(
    peer: str,
    *,
    interface: str | None = None,
    count: int = 4,
    until_direct: bool = False,
    interval: float = 1.0,
    timeout: float = 2.0,
    as_json: bool = False,
    stdout: TextIO,
    stderr: TextIO,
    directory: str = DEFAULT_DIRECTORY,
    run: Runner | None = None,
) -> int:
    if count < 1 or interval < 0.2 or timeout <= 0:
        stderr.write("ping: -c needs 1 or more, --interval 0.2 s or more, --timeout above 0\n")
        return EXIT_USAGE
    name = pick_interface(interface, directory, stderr)
    if name is None:
        return EXIT_USAGE
    request = {
        "request": "ping",
        "peer": peer,
        "count": count,
        "interval": interval,
        "timeout": timeout,
        "until_direct": until_direct,
    }
    summary: dict[str, Any] | None = None
    label = _short(peer)
    try:
        for line in request_lines(name, request, directory, timeout=timeout + interval + 5):
            if not isinstance(line, dict):
                continue
            if as_json:
                stdout.write(json.dumps(line, sort_keys=True) + "\n")
                stdout.flush()
            if "error" in line:
                stderr.write(f"ping: {line.get('message') or line['error']}\n")
                return EXIT_USAGE
            if line.get("stock"):
                runner = run if run is not None else _run_ping
                return _icmp(line, label, count, interval, timeout, as_json, stdout, stderr, runner)
            if "count" in line and "seq" not in line:
                if not as_json:
                    key = str(line.get("public_key", ""))
                    shown = label if label == key[:8] else f"{label} ({key[:8]})"
                    stdout.write(f"PING {shown} on {name}: mesh pings\n")
            elif "seq" in line and not as_json:
                if line.get("timeout"):
                    why = f" ({line['message']})" if line.get("message") else ""
                    stdout.write(f"seq {line['seq']}: no answer within {timeout:g} s{why}\n")
                else:
                    stdout.write(
                        f"seq {line['seq']}: {line['rtt_ms']} ms from {label} "
                        f"over {_path_text(line)}\n"
                    )
                stdout.flush()
            elif line.get("done"):
                summary = line
    except (OSError, ValueError) as e:
        stderr.write(f"ping: cannot ask {name}: {e}\n")
        return EXIT_USAGE
    if summary is None:
        stderr.write(f"ping: {name} ended the answer early\n")
        return EXIT_NO_ANSWER
    answered = int(summary.get("answered", 0))
    direct = bool(summary.get("direct"))
    if not as_json:
        rtt = summary.get("rtt_ms")
        text = f"--- {summary.get('sent')} sent, {answered} answered"
        if rtt:
            text += f", rtt min/avg/max {rtt['min']}/{rtt['avg']}/{rtt['max']} ms"
        text += "; direct path found" if direct else "; no direct path"
        stdout.write(text + "\n")
    if answered == 0 or (until_direct and not direct):
        return EXIT_NO_ANSWER
    return EXIT_ANSWERED


def _icmp(
    line: dict[str, Any],
    label: str,
    count: int,
    interval: float,
    timeout: float,
    as_json: bool,
    stdout: TextIO,
    stderr: TextIO,
    run: Runner,
) -> int:
    """A stock WireGuard peer: ICMP echo to its tunnel address, said so."""
    address = line.get("address")
    message = str(line.get("message", "not a meshguard node"))
    if not address:
        stderr.write(f"ping: {label}: {message}, but it has no single tunnel address to ping\n")
        return EXIT_USAGE
    if not as_json:
        stdout.write(f"{label}: {message} ({address})\n")
        stdout.flush()
    argv = ["ping", "-c", str(count), "-i", f"{interval:g}", "-W", f"{max(1, round(timeout))}"]
    argv.append(str(address))
    status = run(argv)
    return EXIT_ANSWERED if status == 0 else EXIT_NO_ANSWER
