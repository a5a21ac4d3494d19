"""``meshguard status [NAME] [--json]``: read and print a node's status socket."""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time
from typing import Any

from meshguard.status import DEFAULT_DIRECTORY, socket_path


def read_status(name: str, directory: str = DEFAULT_DIRECTORY, timeout: float = 5.0) -> Any:
    path = socket_path(name, directory)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def _ago(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, int(time.time() - timestamp))
    return f"{seconds} s ago"


def _value(key: str, value: Any) -> Any:
    """Timestamps (keys ending in ``_at``, on the node's wall clock) read as "N s ago" or
    "in N s"; everything else as it is."""
    if key.endswith("_at") and isinstance(value, (int, float)) and not isinstance(value, bool):
        delta = int(value - time.time())
        return f"in {delta} s" if delta > 0 else f"{-delta} s ago"
    return value


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{count} B"


def format_status(document: dict[str, Any]) -> str:
    """The human form: one block per node, then one per peer (wg show's layout, plus mesh)."""
    lines = [f"interface: {document.get('interface')}"]
    for key in ("public_key", "listen_port"):
        if document.get(key) is not None:
            lines.append(f"  {key.replace('_', ' ')}: {document[key]}")
    for key, value in sorted(document.get("node", {}).items()):
        if isinstance(value, dict):  # a group of facts (udp_offload): one line, in its order
            value = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
        lines.append(f"  {key.replace('_', ' ')}: {_value(key, value)}")
    for peer in document.get("peers", []):
        lines.append("")
        lines.append(f"peer: {peer.get('public_key')}")
        lines.append(f"  path: {peer.get('path', 'direct')}")
        lines.append(f"  endpoint: {peer.get('endpoint') or '(none)'}")
        lines.append(f"  latest handshake: {_ago(peer.get('last_handshake'))}")
        lines.append(
            f"  transfer: {_bytes(peer.get('rx_bytes', 0))} received, "
            f"{_bytes(peer.get('tx_bytes', 0))} sent"
        )
        skip = {"public_key", "path", "endpoint", "last_handshake", "rx_bytes", "tx_bytes"}
        for key, value in sorted(peer.items()):
            if isinstance(value, dict):  # a group of counts (sent by kind): one line
                value = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
            if key not in skip:
                lines.append(f"  {key.replace('_', ' ')}: {_value(key, value)}")
    return "\n".join(lines)


def main(name: str | None, as_json: bool, directory: str = DEFAULT_DIRECTORY) -> int:
    names = (
        [name]
        if name
        else sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(directory, "*.sock")))
    )
    if not names:
        sys.stderr.write(f"status: no meshguard interface is running (no socket in {directory})\n")
        return 1
    documents = []
    for each in names:
        try:
            documents.append(read_status(each, directory))
        except (OSError, ValueError) as e:
            sys.stderr.write(f"status: cannot read the status of {each}: {e}\n")
            return 1
    if as_json:
        print(json.dumps(documents[0] if name else documents, indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_status(d) for d in documents))
    return 0
