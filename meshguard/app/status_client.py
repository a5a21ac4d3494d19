"""``meshguard status [NAME] [-v] [--watch] [--json]``: read and print a node's status socket.

The default is a table a person scans like ``wg show`` or ``tailscale status``: one line per
peer (name, address, path, round-trip time, last handshake, rx/tx) and, under a peer that is not
direct, why not. ``-v`` shows every field in words, ``--json`` the document itself (every field,
as the node sends it, for scripts).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

from meshguard.adapters.path_view import Network, PathView, host_networks, path_view, peer_label
from meshguard.adapters.status_server import DEFAULT_DIRECTORY, socket_path


def request_lines(
    name: str,
    request: Mapping[str, Any] | None,
    directory: str = DEFAULT_DIRECTORY,
    timeout: float = 5.0,
) -> Iterator[Any]:
    """Send one request line to NAME's control socket and yield each JSON line of the answer
    as it arrives (``request=None``: plain connect-and-read, the status document)."""
    path = socket_path(name, directory)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        if request is not None:
            try:
                sock.sendall(json.dumps(dict(request)).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # a node from before requests: it sent the status document and closed
        buffer = b""
        while chunk := sock.recv(65536):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
        if buffer.strip():
            yield json.loads(buffer)


def read_status(name: str, directory: str = DEFAULT_DIRECTORY, timeout: float = 5.0) -> Any:
    for document in request_lines(name, {"request": "status"}, directory, timeout):
        return document
    raise ValueError(f"the status socket of {name} closed without an answer")


def interface_names(directory: str = DEFAULT_DIRECTORY) -> list[str]:
    """The interfaces with a control socket in ``directory``: those of this network namespace
    when any is (nodes in other namespaces share the directory), else all."""
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(directory, "*.sock")))
    here = [n for n in names if os.path.exists(os.path.join("/sys/class/net", n))]
    return here or names


# ---------------------------------------------------------------------- words for values


def _ago(timestamp: object, now: float) -> str:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not timestamp:
        return "never"
    return _duration(max(0, int(now - timestamp))) + " ago"


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _bytes(count: object) -> str:
    value = float(count) if isinstance(count, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{count} B"


def _remaining(seconds: float) -> str:
    """A lease's time left, hours and minutes (``1h59m``)."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def port_mapping_line(value: dict[str, Any]) -> str:
    """``PCP 198.51.100.1:40001 (expires in 1h)``, ``none offered (PCP: ...)``, ``off``..."""
    state = value.get("state")
    if state == "mapped":
        text = f"{value.get('protocol')} {value.get('external')}"
        expires = value.get("expires_at")
        if isinstance(expires, (int, float)):
            text += f" (expires in {_remaining(expires - time.time())})"
        else:
            text += " (permanent)"
        if value.get("advertised") is False:
            text += ", behind another NAT: not advertised"
        return text
    if state == "seeking":
        return f"asking the gateway ({value.get('trying')})"
    failures = value.get("failures")
    if state == "none offered" and isinstance(failures, dict) and failures:
        return "none offered (" + "; ".join(f"{k}: {v}" for k, v in failures.items()) + ")"
    return str(state)


def _short_bytes(count: object) -> str:
    value = float(count) if isinstance(count, int | float) else 0.0
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1000 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return "?"


def _words(value: Any, now: float, key: str = "") -> str:
    """A value as a person reads it: no Python spellings (None, True, ['a'])."""
    timestamp = key.endswith(("_at", "_until"))
    if timestamp and isinstance(value, int | float) and not isinstance(value, bool):
        delta = int(value - now)
        return f"in {delta} s" if delta > 0 else f"{-delta} s ago"
    if value is None:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, list | tuple):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
            host = f"[{value[0]}]" if ":" in value[0] else value[0]
            return f"{host}:{value[1]}"  # an endpoint
        return ", ".join(_words(v, now) for v in value) if value else "none"
    if isinstance(value, dict):
        if not value:
            return "none"
        return ", ".join(f"{k.replace('_', ' ')} {_words(v, now)}" for k, v in value.items())
    return str(value)


def _keepalive(peer: Mapping[str, Any]) -> str | None:
    """``25 s (configured)`` or ``off (not configured)``: one statement, no doubled words."""
    interval = peer.get("keepalive_interval", peer.get("persistent_keepalive"))
    reason = peer.get("keepalive_reason")
    reason = str(reason) if reason else None
    if reason and peer.get("keepalive_auto"):
        reason = f"auto: {reason}"
    if interval:
        return f"every {interval} s" + (f" ({reason})" if reason else "")
    if reason is None:
        return "off" if "persistent_keepalive" in peer or "keepalive_interval" in peer else None
    return reason if reason.startswith("off") else f"off ({reason})"


def not_direct_reason(peer: Mapping[str, Any], networks: Iterable[Network] = ()) -> str | None:
    """Why a peer is not on a direct path: the node's own sentence when it gives one, else
    what its status shows."""
    view = path_view(peer, networks)
    if view.direct:
        return None
    if view.reason:
        return view.reason
    candidates = peer.get("candidates")
    if view.kind == "tls-relay":
        return "UDP probes go unanswered; the TLS relay carries it"
    if view.kind == "none":
        if not peer.get("endpoint") and not peer.get("relay"):
            return "no endpoint known and no relay offers to forward"
        return "no session yet"
    if isinstance(candidates, list) and candidates:
        count = len(candidates)
        return f"no answer from its {count} candidate endpoint{'s' if count > 1 else ''} yet"
    if isinstance(candidates, list):
        return "no candidate endpoint known for it"
    return "no direct path found yet"


# ---------------------------------------------------------------------- the table


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _address(peer: Mapping[str, Any]) -> str:
    networks = [str(n) for n in peer.get("allowed_ips") or []]
    if not networks:
        return "-"
    first = networks[0]
    if first.endswith("/32") or first.endswith("/128"):
        first = first.rsplit("/", 1)[0]
    return first + ("+" if len(networks) > 1 else "")


def _path_cell(view: PathView) -> str:
    """``direct``, ``member via Q5YWoT8w`` (a key's first 8 characters), ``tls-relay r1:443``."""
    if not view.via:
        return view.kind
    via = view.via[:8] if len(view.via) == 44 else view.via
    return f"tls-relay {via}" if view.kind == "tls-relay" else f"{view.kind} via {via}"


def _label(peer: Mapping[str, Any]) -> str:
    label = peer_label(peer)
    return label if label != peer.get("public_key") else label[:8]


def _node_summary(document: Mapping[str, Any]) -> str:
    node = document.get("node") if isinstance(document.get("node"), dict) else {}
    assert isinstance(node, dict)
    key = str(document.get("public_key") or "?")
    parts = [f"{document.get('interface')}", f"key {key[:8]}"]
    if document.get("listen_port"):
        parts.append(f"port {document['listen_port']}")
    nat = node.get("nat")
    if nat == "yes":
        mapping = node.get("nat_mapping")
        kind = f"NAT {mapping}" if mapping and mapping != "unknown" else "behind NAT"
        if node.get("nat_lifetime") is not None:
            kind += f", lifetime {node['nat_lifetime']} s"
        parts.append(kind)
    elif nat == "no":
        parts.append("no NAT")
    return "  ".join(parts)


#: (heading, width) of the table's columns; with TX (6) and the gaps they fit 80 columns.
COLUMNS = (("PEER", 14), ("ADDRESS", 15), ("PATH", 19), ("RTT", 6), ("SEEN", 6), ("RX", 6))


def format_table(
    document: Mapping[str, Any], networks: Iterable[Network] = (), now: float | None = None
) -> str:
    """The default view: a summary line, then one line per peer, 80 columns."""
    now = time.time() if now is None else now
    networks = list(networks)
    lines = [_node_summary(document)]
    peers = [p for p in document.get("peers", []) if isinstance(p, dict)]
    if not peers:
        lines.append("no peers")
        return "\n".join(lines)
    heading = [_cell(h, w).ljust(w) for h, w in COLUMNS] + ["TX"]
    lines.append(" ".join(heading))
    for peer in peers:
        view = path_view(peer, networks)
        rtt = peer.get("rtt_ms")
        seen = _ago(peer.get("last_handshake"), now)
        cells = [
            _label(peer),
            _address(peer),
            _path_cell(view),
            f"{rtt:.0f}ms"
            if isinstance(rtt, int | float) and rtt >= 10
            else (f"{rtt:.1f}ms" if isinstance(rtt, int | float) else "-"),
            seen.replace(" ago", "").replace(" ", ""),
            _short_bytes(peer.get("rx_bytes", 0)),
        ]
        row = [_cell(c, w).ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)]
        row.append(_short_bytes(peer.get("tx_bytes", 0)))
        lines.append(" ".join(row).rstrip())
        reason = not_direct_reason(peer, networks)
        if reason is not None:
            lines.extend(
                textwrap.wrap(
                    f"    not direct: {reason}",
                    width=80,
                    subsequent_indent=" " * 16,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------- the full view

_PEER_FIRST = ("path", "endpoint", "last_handshake", "rx_bytes", "tx_bytes")
_KEEPALIVE_KEYS = {
    "keepalive",
    "keepalive_interval",
    "keepalive_reason",
    "keepalive_auto",
    "persistent_keepalive",
}


def format_status(
    document: Mapping[str, Any], networks: Iterable[Network] = (), now: float | None = None
) -> str:
    """The full view (``-v``): one block for the node, then one per peer, every field in
    words (wg show's layout, plus the mesh)."""
    now = time.time() if now is None else now
    networks = list(networks)
    lines = [f"interface: {_words(document.get('interface'), now)}"]
    for key in ("public_key", "listen_port", "mtu"):
        if document.get(key) is not None:
            lines.append(f"  {key.replace('_', ' ')}: {document[key]}")
    for key, value in sorted((document.get("node") or {}).items()):
        if key == "port_mapping" and isinstance(value, dict):
            lines.append(f"  port mapping: {port_mapping_line(value)}")
            continue
        lines.append(f"  {key.replace('_', ' ')}: {_words(value, now, key)}")
    drops = document.get("drops")
    if isinstance(drops, dict) and drops:
        lines.append(f"  dropped: {_words(drops, now)}")
    for peer in document.get("peers", []):
        if not isinstance(peer, dict):
            continue
        view = path_view(peer, networks)
        lines.append("")
        name = peer.get("name")
        lines.append(f"peer: {peer.get('public_key')}" + (f" ({name})" if name else ""))
        lines.append(f"  path: {view.text()}")
        reason = not_direct_reason(peer, networks)
        if reason is not None:
            lines.append(f"  not direct: {reason}")
        lines.append(f"  endpoint: {_words(peer.get('endpoint'), now)}")
        lines.append(f"  latest handshake: {_ago(peer.get('last_handshake'), now)}")
        lines.append(
            f"  transfer: {_bytes(peer.get('rx_bytes', 0))} received, "
            f"{_bytes(peer.get('tx_bytes', 0))} sent"
        )
        keepalive = _keepalive(peer)
        if keepalive is not None:
            lines.append(f"  keepalive: {keepalive}")
        skip = {
            "public_key",
            "name",
            "path_kind",
            "path_via",
            "not_direct_reason",
            *_PEER_FIRST,
            *_KEEPALIVE_KEYS,
        }
        for key, value in sorted(peer.items()):
            if key not in skip:
                lines.append(f"  {key.replace('_', ' ')}: {_words(value, now, key)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command


def _documents(name: str | None, directory: str, stderr: TextIO) -> list[dict[str, Any]] | None:
    names = [name] if name else interface_names(directory)
    if not names:
        stderr.write(f"status: no meshguard interface is running (no socket in {directory})\n")
        return None
    documents = []
    for each in names:
        try:
            document = read_status(each, directory)
        except (OSError, ValueError) as e:
            stderr.write(f"status: cannot read the status of {each}: {e}\n")
            return None
        if not isinstance(document, dict) or "error" in document:
            error = document.get("error") if isinstance(document, dict) else document
            stderr.write(f"status: {each} answered with an error: {error}\n")
            return None
        documents.append(document)
    return documents


def main(
    name: str | None,
    as_json: bool,
    directory: str = DEFAULT_DIRECTORY,
    *,
    verbose: bool = False,
    watch: float | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    networks: Callable[[], list[Network]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    local = networks if networks is not None else (lambda: host_networks())
    try:
        return _loop(name, as_json, directory, verbose, watch, out, err, local, sleep)
    except KeyboardInterrupt:
        return 0


def _loop(
    name: str | None,
    as_json: bool,
    directory: str,
    verbose: bool,
    watch: float | None,
    out: TextIO,
    err: TextIO,
    local: Callable[[], list[Network]],
    sleep: Callable[[float], None],
) -> int:
    first = True
    while True:
        documents = _documents(name, directory, err)
        if documents is None:
            return 1
        if as_json:
            text = json.dumps(documents[0] if name else documents, indent=2, sort_keys=True)
        else:
            render = format_status if verbose else format_table
            nets = local()
            text = "\n\n".join(render(d, nets) for d in documents)
        if watch is None:
            out.write(text + "\n")
            out.flush()
            return 0
        # Refresh in place: home, each line cleared to its end, then the rest of the screen.
        stamp = time.strftime("%H:%M:%S")
        prefix = "\x1b[H" if not first else "\x1b[H\x1b[2J"
        body = "\n".join(line + "\x1b[K" for line in text.splitlines())
        out.write(f"{prefix}every {watch:g} s, {stamp} (Ctrl-C ends)\x1b[K\n{body}\n\x1b[J")
        out.flush()
        first = False
        sleep(watch)
