"""The helper side of NAT lifetime probes: answering other nodes' probes.

A meshguard peer measuring its NAT (:mod:`meshguard.mesh.keepalive`) asks us over the tunnel to
hold a token (``NAT_PROBE_REQUEST``); we acknowledge each token datagram that arrives from its
secondary socket and, ``delay`` after the last one, echo the token toward the source we saw and
report "echoed" over the tunnel. A measuring peer that is done tells us which tokens are
cancelled: no echo, no report.

We answer only tokens a peer told us about over the encrypted tunnel, only datagrams from that
peer's own address, at most MAX_PROBE_SENDS per token and MAX_ANSWERS_PER_SECOND in all (a
budget the self-check's late replies share, :meth:`ProbeHelper.answer_allowed`), and hold at
most MAX_HELP_PER_PEER tokens per peer and MAX_HELP_TOTAL in all, so nobody can use us to reflect
traffic at someone else. Anything else is dropped and counted. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.core.sent import PROBE
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent, encode_json, same_host
from meshguard.mesh.lifetime_probe import (
    ACK_MAGIC,
    CANCEL_BATCH,
    DATAGRAM_SIZE,
    ECHO_GRACE,
    ECHO_MAGIC,
    LIFETIME_LADDER,
    LIFETIME_MAX,
    MAX_PROBE_SENDS,
    PRIME_GAP,
    PROBE_MAGIC,
    REQUEST_TIMEOUT,
    TOKEN_SIZE,
)

#: Outstanding tokens per peer and in total, datagrams answered per second. (Room for two
#: campaigns: a cancelled probe's token stays until its delay when the cancel is lost.)
MAX_HELP_PER_PEER: Final = 2 * len(LIFETIME_LADDER)
MAX_HELP_TOTAL: Final = 512
MAX_ANSWERS_PER_SECOND: Final = 64


@dataclass
class _Help:
    """A probe we answer for a peer: where its token came from and when to echo."""

    peer: bytes
    delay: float
    expires: float
    observed: Endpoint | None = None
    datagrams: int = 0
    echo_at: float | None = None


class ProbeHelper:
    """Answers other nodes' lifetime probes (the keepalive policy hands it their messages)."""

    def __init__(self, device: Device, agent: MeshAgent, count: Callable[[str], None]) -> None:
        self.device = device
        self.agent = agent
        self._count = count
        #: Tokens we hold, by token.
        self._help: dict[bytes, _Help] = {}
        self._answer_window = 0.0
        self._answers = 0

    def answer_allowed(self, now: float) -> bool:
        """One more datagram within MAX_ANSWERS_PER_SECOND (probe answers, late replies)."""
        if now - self._answer_window >= 1.0:
            self._answer_window = now
            self._answers = 0
        self._answers += 1
        return self._answers <= MAX_ANSWERS_PER_SECOND

    def requested(self, peer: Peer, token: bytes, delay: object, now: float) -> None:
        """``NAT_PROBE_REQUEST``: hold ``token`` for ``delay`` seconds, or refuse (said why)."""

        def refuse(why: str) -> None:
            self._count(f"help_refused_{why}")
            body = encode_json({"t": token.hex(), "s": "refused", "why": why})
            self.device.send_control(peer, kinds.NAT_PROBE_RESULT, body, now)

        if not isinstance(delay, int | float) or isinstance(delay, bool):
            refuse("bad_delay")
            return
        if not 1.0 <= delay <= LIFETIME_MAX:
            refuse("bad_delay")
            return
        if token in self._help:
            refuse("duplicate")
            return
        mine = sum(1 for h in self._help.values() if h.peer == peer.public_key)
        if mine >= MAX_HELP_PER_PEER or len(self._help) >= MAX_HELP_TOTAL:
            refuse("busy")
            return
        window = PRIME_GAP * MAX_PROBE_SENDS + REQUEST_TIMEOUT
        self._help[token] = _Help(peer.public_key, float(delay), now + window)
        self.agent.dirty = True
        body = encode_json({"t": token.hex(), "s": "ready"})
        self.device.send_control(peer, kinds.NAT_PROBE_RESULT, body, now)

    def cancelled(self, peer: Peer, tokens: object) -> None:
        """The requester is done with these probes: no echo, no report (its own tokens only)."""
        if not isinstance(tokens, list) or len(tokens) > CANCEL_BATCH:
            self._count("bad_control")
            return
        for value in tokens:
            if not isinstance(value, str) or len(value) != 2 * TOKEN_SIZE:
                self._count("bad_control")
                return
            try:
                token = bytes.fromhex(value)
            except ValueError:
                self._count("bad_control")
                return
            help = self._help.get(token)
            if help is not None and help.peer == peer.public_key:
                del self._help[token]
                self._count("help_cancelled")

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> None:
        """A non-WireGuard datagram on our port that is not a late reply: a token a peer told
        us about (acknowledged, its echo scheduled), or garbage (counted)."""
        if len(data) != DATAGRAM_SIZE or data[:4] != PROBE_MAGIC:
            self.device.counters.malformed += 1
            self._count("not_a_probe")
            return
        token = data[4:]
        help = self._help.get(token)
        if help is None:
            self._count("unknown_token")
            return
        peer = self.device.peers.get(help.peer)
        if peer is None or peer.endpoint is None or not same_host(peer.endpoint, source):
            self._count("token_source_mismatch")
            return
        if help.datagrams >= MAX_PROBE_SENDS or not self.answer_allowed(now):
            self._count("probe_rate_limited")
            return
        help.datagrams += 1
        help.observed = source
        help.echo_at = now + help.delay
        help.expires = help.echo_at + ECHO_GRACE
        self.device.io.send_datagram(ACK_MAGIC + token, source)
        peer.sent.add(PROBE, peer.data_packets, now)
        self.agent.dirty = True

    def next_deadline(self) -> float | None:
        deadlines = [h.echo_at if h.echo_at is not None else h.expires for h in self._help.values()]
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for token, help in list(self._help.items()):
            if help.echo_at is not None and help.echo_at <= now:
                del self._help[token]
                peer = self.device.peers.get(help.peer)
                if peer is None or help.observed is None:
                    continue
                if self.answer_allowed(now):
                    self.device.io.send_datagram(ECHO_MAGIC + token, help.observed)
                    peer.sent.add(PROBE, peer.data_packets, now)
                body = encode_json({"t": token.hex(), "s": "echoed", "o": list(help.observed)})
                self.device.send_control(peer, kinds.NAT_PROBE_RESULT, body, now)
                self._count("echoes_sent")
            elif help.echo_at is None and help.expires <= now:
                del self._help[token]
                self._count("help_expired")
