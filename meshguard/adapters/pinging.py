"""The ``ping`` request on the control socket: mesh pings to one peer, one JSON line per answer.

The client (``meshguard ping PEER``) names the peer by member name, public key (or a unique
prefix of it) or tunnel address. The node sends ``count`` operator pings
(:mod:`meshguard.mesh.ping`) one ``interval`` apart over the peer's current path and streams
``{"seq", "rtt_ms", "path_kind", "path_via", "endpoint"}`` per answer or ``{"seq", "timeout"}``,
then ``{"done": true, ...}``. A stock WireGuard peer never answers mesh pings, so the node says
so (``{"stock": true, "address": ...}``) and the client sends ICMP echoes through the tunnel.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IDelayedCall

from meshguard.adapters.path_view import Network, path_view
from meshguard.adapters.status_server import Reply
from meshguard.core.interfaces import Endpoint
from meshguard.core.keytext import key_text
from meshguard.core.peer import Peer
from meshguard.mesh.agent import is_discard_only
from meshguard.mesh.ping import PingAnswer, Pinger

MAX_COUNT = 1000
MIN_INTERVAL = 0.2


def _endpoint_text(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PingRequests:
    """Answers ``{"request": "ping", "peer": P, "count": N, "interval": S, "timeout": S,
    "until_direct": bool}`` for one node."""

    def __init__(
        self,
        node: Any,
        reactor: Any,
        *,
        tls_relay_name: Callable[[Endpoint], str | None] = lambda endpoint: None,
        local_networks: Callable[[], Iterable[Network]] = list,
        pinger: Pinger | None = None,
    ) -> None:
        self.node = node
        self.reactor = reactor
        self.pinger: Pinger = pinger if pinger is not None else node.pinger
        self.tls_relay_name = tls_relay_name
        self.local_networks = local_networks

    # ------------------------------------------------------------------ finding the peer

    def find(self, target: str) -> tuple[Peer | None, str | None]:
        """The peer ``target`` names, or None and why not."""
        peers: dict[bytes, Peer] = self.node.device.peers
        target = target.strip()
        try:
            address = ipaddress.ip_address(target)
        except ValueError:
            address = None
        if address is not None:
            peer = self.node.device.allowed_ips.lookup(address.packed)
            if peer is None:
                return None, f"no peer has {address} in its AllowedIPs"
            return peer, None
        by_name = [
            entry
            for entry in self.node.status_document().get("peers", [])
            if target
            in (
                entry.get("name"),
                entry.get("endpoint_name"),
                str(entry.get("endpoint_name") or "").rsplit(":", 1)[0],
            )
        ]
        if len(by_name) == 1:
            key = base64.b64decode(by_name[0]["public_key"])
            return peers.get(key), None
        matches = [p for k, p in peers.items() if key_text(k).startswith(target)]
        if len(matches) == 1 and (len(target) >= 4 or len(peers) == 1):
            return matches[0], None
        if len(matches) > 1 or len(by_name) > 1:
            return None, f"{target!r} names more than one peer; give more of the key"
        return None, f"no peer named {target!r} (a name, a public key or a tunnel address)"

    def _stock_address(self, peer: Peer) -> str | None:
        """An address inside the peer's AllowedIPs that its host likely answers ICMP on."""
        for network in self.node.device.allowed_ips.networks(peer):
            if network.prefixlen == network.max_prefixlen:
                return str(network.network_address)
        for network in self.node.device.allowed_ips.networks(peer):
            if network.num_addresses > 2:
                return str(next(network.hosts()))
        return None

    # ------------------------------------------------------------------ the request

    def __call__(self, request: dict[str, Any], reply: Reply) -> None:
        target = request.get("peer")
        count = request.get("count", 4)
        interval = request.get("interval", 1.0)
        timeout = request.get("timeout", 2.0)
        until_direct = bool(request.get("until_direct", False))
        if (
            not isinstance(target, str)
            or not isinstance(count, int)
            or isinstance(count, bool)
            or not 1 <= count <= MAX_COUNT
            or not isinstance(interval, int | float)
            or not isinstance(timeout, int | float)
            or not MIN_INTERVAL <= interval <= 60
            or not 0.1 <= timeout <= 60
        ):
            reply.write(
                {
                    "error": "usage",
                    "message": "ping needs a peer, count 1-1000, interval 0.2-60 s "
                    "and timeout 0.1-60 s",
                }
            )
            reply.finish()
            return
        peer, why = self.find(target)
        if peer is None:
            reply.write({"error": "unknown peer", "message": why})
            reply.finish()
            return
        key = key_text(peer.public_key)
        state = self.node.mesh_agent.peers.get(peer.public_key)
        features = state.features if state is not None else []
        if not peer.is_meshguard or (state is not None and features and "Pinger" not in features):
            reason = (
                "runs a meshguard without mesh pings"
                if peer.is_meshguard
                else "is not known as a meshguard node (a stock WireGuard peer, or no session yet)"
            )
            reply.write(
                {
                    "stock": True,
                    "public_key": key,
                    "address": self._stock_address(peer),
                    "message": f"peer {reason}: ICMP echo through the tunnel instead",
                }
            )
            reply.finish()
            return
        _Run(self, peer, reply, count, float(interval), float(timeout), until_direct).start()

    def describe(self, peer: Peer, answer: PingAnswer) -> dict[str, Any]:
        """The path an answer took, as :func:`path_view` names it."""
        entry: dict[str, Any]
        if answer.relay is not None:
            entry = {"path": f"relayed via {key_text(answer.relay)}"}
        elif answer.endpoint is not None and is_discard_only(answer.endpoint):
            entry = {"path": f"tls-relay via {self.tls_relay_name(answer.endpoint) or '?'}"}
        else:
            entry = {
                "path": "direct",
                "endpoint": list(answer.endpoint) if answer.endpoint is not None else None,
            }
        view = path_view(entry, self.local_networks())
        endpoint = answer.endpoint if view.direct else None
        return {
            "path_kind": view.kind,
            "path_via": view.via,
            "endpoint": _endpoint_text(endpoint) if endpoint else None,
        }


class _Run:
    """One ``ping`` request in flight: its timers, answers and summary."""

    def __init__(
        self,
        owner: PingRequests,
        peer: Peer,
        reply: Reply,
        count: int,
        interval: float,
        timeout: float,
        until_direct: bool,
    ) -> None:
        self.owner = owner
        self.peer = peer
        self.reply = reply
        self.count = count
        self.interval = interval
        self.timeout = timeout
        self.until_direct = until_direct
        self.sent = 0
        self.answered = 0
        self.direct = False
        self.rtts: list[float] = []
        self.outstanding: dict[int, tuple[bytes | None, IDelayedCall]] = {}
        self.next_send: IDelayedCall | None = None
        self.done = False
        reply.on_close.append(self.cancel)

    def start(self) -> None:
        self.reply.write({"public_key": key_text(self.peer.public_key), "count": self.count})
        self._send()

    def _send(self) -> None:
        self.next_send = None
        if self.done:
            return
        seq = self.sent
        self.sent += 1
        reactor = self.owner.reactor
        nonce = self.owner.pinger.ping(
            self.peer, reactor.seconds(), lambda answer: self._answer(seq, answer)
        )
        self.owner.node.reschedule()
        timer = reactor.callLater(self.timeout, self._timeout, seq)
        self.outstanding[seq] = (nonce, timer)
        if self.sent < self.count:
            self.next_send = reactor.callLater(self.interval, self._send)

    def _answer(self, seq: int, answer: PingAnswer) -> None:
        entry = self.outstanding.pop(seq, None)
        if entry is None or self.done:
            return
        if entry[1].active():
            entry[1].cancel()
        self.answered += 1
        self.rtts.append(answer.rtt)
        line: dict[str, Any] = {"seq": seq, "rtt_ms": round(answer.rtt * 1000, 2)}
        line.update(self.owner.describe(self.peer, answer))
        direct = line["path_kind"] in ("lan", "direct", "direct-v6", "mapped")
        self.direct = self.direct or direct
        self.reply.write(line)
        if self.until_direct and direct:
            self._finish()
        else:
            self._maybe_finish()

    def _timeout(self, seq: int) -> None:
        entry = self.outstanding.pop(seq, None)
        if entry is None or self.done:
            return
        if entry[0] is not None:
            self.owner.pinger.forget(entry[0])
        line: dict[str, Any] = {"seq": seq, "timeout": True}
        if entry[0] is None:
            line["message"] = "no session to send on yet"
        self.reply.write(line)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.sent >= self.count and not self.outstanding:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        summary: dict[str, Any] = {
            "done": True,
            "sent": self.sent,
            "answered": self.answered,
            "direct": self.direct,
        }
        if self.rtts:
            summary["rtt_ms"] = {
                "min": round(min(self.rtts) * 1000, 2),
                "avg": round(sum(self.rtts) / len(self.rtts) * 1000, 2),
                "max": round(max(self.rtts) * 1000, 2),
            }
        self.reply.write(summary)
        self.cancel()
        self.reply.finish()

    def cancel(self) -> None:
        """Stop sending and forget what is outstanding (done, or the client went away)."""
        self.done = True
        if self.next_send is not None and self.next_send.active():
            self.next_send.cancel()
        self.next_send = None
        for nonce, timer in self.outstanding.values():
            if timer.active():
                timer.cancel()
            if nonce is not None:
                self.owner.pinger.forget(nonce)
        self.outstanding.clear()
