"""The self-check of the tunnel's own NAT mapping: is the keepalive interval still short enough?

:mod:`meshguard.mesh.keepalive` measures how long the NAT keeps an idle mapping and chooses the
interval from that. A NAT may start forgetting sooner than it did when measured (under load, a
new router, a changed conntrack timeout). When it re-creates an expired mapping on the same
public port (Linux masquerade does when the port is free) no peer sees a change, yet inbound
packets are dropped in every gap. So once after each new interval, then every 30 minutes, the
node checks the tunnel's own mapping: it asks the peer its keepalive goes to (a meshguard peer
with a session) for a late reply (``NAT_SELF_CHECK``), "interval minus a margin" after the
request arrives, i.e. just before our next keepalive would refresh the mapping. The peer
acknowledges at once and later sends a token datagram to our tunnel endpoint. We send that peer
nothing meanwhile (both sides hold back their HELLO refresh), so the reply arrives only if the
mapping outlived that idle. Anything we did send makes the check void (traffic refreshed the
mapping); two misses in a row, not one (a datagram may be lost), are evidence of expiry.

:class:`SelfCheck` is both sides of that exchange: the requester (when to ask, and how to judge
the answer) and the peer answering (which requests to accept and when to send the late reply).
The keepalive policy owns it and tells it which peer to check with, whether a measurement is in
the way, and what to do with evidence of expiry; it hands it the self-check's control messages
and late replies. The keepalive policy's filtering check reuses the same request and late reply,
so :func:`send_request` and :class:`LateReplyJudge` (one verdict logic, with each check's own
void rule and wording) serve both; what a verdict then decides stays with its owner. Nothing
here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from meshguard.core.constants import REJECT_AFTER_TIME
from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.core.sent import PROBE
from meshguard.mesh import kinds
from meshguard.mesh.agent import (
    MeshAgent,
    encode_json,
    keepalive_slot,
    same_host,
)

#: The late reply: sent by the helper from its tunnel port to ours, so it crosses our tunnel's
#: mapping. Never a WireGuard message type.
CHECK_MAGIC: Final = b"MGn\x04"
#: Delays a helper accepts for a late reply (those of intervals 3 s to 300 s fit).
CHECK_DELAY_MIN: Final = 2.0
CHECK_DELAY_MAX: Final = 300.0
#: The reply is asked for this long before our next keepalive: at least a second, a tenth of
#: the interval, or four round trips (timer jitter and the reply's way back). The check is
#: judged half a margin (or two round trips) after the reply is due, so before the keepalive.
CHECK_MARGIN_MIN: Final = 1.0
CHECK_MARGIN_FRACTION: Final = 0.1
CHECK_MARGIN_RTTS: Final = 4.0
#: Misses in a row that count as evidence of expiry (one lost datagram must not halve).
CHECK_MISSES: Final = 2
#: The first check after a new interval (or a new keepalive peer), and the rhythm after that.
CHECK_AFTER_CHANGE: Final = 10.0
CHECK_EVERY: Final = 1800.0
#: After a miss, confirm soon; after a void check (traffic), an unanswered or refused one,
#: wait (unanswered: doubling up to CHECK_AFTER_UNANSWERED_MAX: the peer may not know
#: self-checks).
CHECK_AFTER_MISS: Final = 10.0
CHECK_AFTER_VOID: Final = 600.0
#: As long as between two lifetime measurements (``keepalive.REMEASURE_AFTER``).
CHECK_AFTER_UNANSWERED_MAX: Final = 6 * 3600.0
#: A request goes out only after the tunnel to the peer was quiet (nothing either way) this
#: long, so it starts the idle period itself; while not quiet, or without a session, look again
#: every CHECK_RETRY.
CHECK_QUIET: Final = 2.0
CHECK_RETRY: Final = 30.0
#: A quiet tunnel sends the request at the keepalive slot (``agent.keepalive_slot``); one this
#: close counts as now.
CHECK_SLOT_SLACK: Final = 0.25
#: The helper holds its HELLO refresh this long after the reply (at least): past the
#: requester's grace (half the margin, or two round trips), which it does not know.
CHECK_HOLD_MIN: Final = 5.0
CHECK_HOLD_FRACTION: Final = 0.1
#: A request goes out only on a session that can still send this long (the ack comes back on
#: it); without one, the next session brings the check forward.
CHECK_SESSION_SLACK: Final = 10.0
#: Helper side: requests from one peer closer than this are ignored (not answered); at most
#: CHECK_HELP_PER_HOUR accepted per peer in an hour, one pending per peer, CHECK_HELP_TOTAL in all.
CHECK_HELP_MIN_GAP: Final = 5.0
CHECK_HELP_PER_HOUR: Final = 12
CHECK_HELP_TOTAL: Final = 256
#: The round trip an acknowledgement is taken to show at most (for the margin).
CHECK_RTT_MAX: Final = 1.0
#: A reply this much earlier than asked proves nothing (the helper did not wait).
CHECK_EARLY: Final = 0.5
NO_CHECK_PEER: Final = "idle: no meshguard peer to check the mapping with"
#: Why a helper refused, as a requester shows it (anything else a peer says is "unknown").
CHECK_REFUSALS: Final = frozenset({"bad_delay", "busy", "duplicate"})


#: Why a late-reply check proves nothing when we sent to the peer while waiting.
VOID_SENT: Final = "void: we sent to the peer meanwhile"


def send_request(device: Device, peer: Peer, token: bytes, delay: float, now: float) -> bool:
    """Ask ``peer`` for the token back after ``delay`` s (both checks); False if not sent."""
    body = encode_json({"t": token.hex(), "d": delay})
    return device.send_control(peer, kinds.NAT_SELF_CHECK, body, now)


class LateCheck(Protocol):
    """A late reply in flight, as the judge sees it (self-check or filtering check)."""

    peer: bytes
    delay: float
    sent_at: float
    acked_at: float | None

    def void(self, peer: Peer) -> bool:
        """Whether traffic since the request may have kept the mapping alive anyway."""
        ...


class LateReplyJudge:
    """Judges late replies: one verdict logic for the self-check and the filtering check.

    Both ask a peer for a token datagram after a delay of silence; they differ only in what
    voids a check (:meth:`LateCheck.void`), in wording and in what the verdict then decides,
    which stays with the owner. Verdicts are ``(result, text)``.
    """

    def __init__(
        self, device: Device, count: Callable[[str], None], prefix: str, void_text: str, ok: str
    ) -> None:
        self.device = device
        self._count = count
        self._mismatch = f"{prefix}_reply_source_mismatch"
        self._void_text = void_text
        self._ok = ok

    def reply(self, check: LateCheck, source: Endpoint, now: float) -> tuple[str, str] | None:
        """The token came back from ``source``; None (counted) if not from the peer's host."""
        peer = self.device.peers.get(check.peer)
        if peer is None or peer.endpoint is None or not same_host(peer.endpoint, source):
            self._count(self._mismatch)
            return None
        idle = now - check.sent_at
        if check.void(peer):
            return "void", self._void_text
        if idle < check.delay - CHECK_EARLY:
            # The peer did not wait: it proves nothing about the idle we asked for.
            return "inconclusive", f"reply came early ({idle:.1f} s)"
        return "ok", f"{self._ok}reply after {idle:.1f} s idle"

    def deadline(self, check: LateCheck) -> tuple[str, str]:
        """No reply by the deadline."""
        peer = self.device.peers.get(check.peer)
        if peer is None:
            return "inconclusive", "the peer was removed"
        if check.acked_at is None:
            # Lost request, lost ack, or a peer that does not know self-checks (whose HELLO
            # then voids it too): no evidence, and the next request waits longer.
            return "inconclusive", "not acknowledged"
        if check.void(peer):
            return "void", self._void_text
        return "missed", f"no reply after {check.delay:g} s idle"


@dataclass
class _Check:
    """One self-check of ours in flight: the late reply we asked ``peer`` for."""

    token: bytes
    peer: bytes
    #: The keepalive interval checked and the idle (``delay``) the reply must survive.
    interval: int
    delay: float
    sent_at: float
    deadline: float
    #: ``peer.tx_bytes`` right after the request: anything sent since voids the check.
    tx_mark: int
    acked_at: float | None = None

    def void(self, peer: Peer) -> bool:
        """We sent to the peer since the request."""
        return peer.tx_bytes != self.tx_mark


@dataclass
class _LateReply:
    """A self-check we answer for a peer: the token datagram goes out at ``due``."""

    peer: bytes
    due: float


@dataclass
class SelfCheckState:
    """The self-check's outcome so far (shown by ``meshguard status``)."""

    #: Results: ok, missed, void, inconclusive; and how often two misses halved the interval.
    counts: dict[str, int] = field(
        default_factory=lambda: {"ok": 0, "missed": 0, "void": 0, "inconclusive": 0}
    )
    expiries: int = 0
    #: Misses in a row for the current peer and interval.
    misses: int = 0
    #: Unanswered (or refused) requests in a row: they space the next ones out.
    unanswered: int = 0
    #: Per peer: the latest result (text) and when it came.
    last: dict[bytes, tuple[str, float]] = field(default_factory=dict)
    #: The round trip the latest acknowledgement took (widens the margin).
    rtt: float = 0.0
    #: What the check is doing now ("scheduled", "waiting for ...", "pending: ...").
    state: str = "idle"


class SelfCheck:
    """Both sides of the self-check, driven by the keepalive policy that owns it."""

    def __init__(
        self,
        device: Device,
        agent: MeshAgent,
        *,
        new_token: Callable[[], bytes],
        keepalive_peer: Callable[[], Peer | None],
        measurement_blocks: Callable[[Peer, float], tuple[str, float] | None],
        evidence_of_expiry: Callable[[float, str], None],
        answer_allowed: Callable[[float], bool],
        count: Callable[[str], None],
    ) -> None:
        """``keepalive_peer()`` is the peer to check with (None: none can);
        ``measurement_blocks(peer, now)`` says why a lifetime measurement keeps a check from
        starting now and when to look again (None: it does not); ``evidence_of_expiry(now,
        why)`` is told when checks missed CHECK_MISSES times in a row; ``answer_allowed(now)``
        is the datagram budget shared with lifetime probes; ``count(name)`` bumps a counter."""
        self.device = device
        self.agent = agent
        self._new_token = new_token
        self._keepalive_peer = keepalive_peer
        self._measurement_blocks = measurement_blocks
        self._evidence_of_expiry = evidence_of_expiry
        self._answer_allowed = answer_allowed
        self._count = count
        self._verdicts = LateReplyJudge(device, count, "check", VOID_SENT, "ok: ")
        #: Whether to self-check the tunnel's mapping (on by default; a test comparing costs
        #: may switch it off). The helper side answers either way.
        self.enabled = True
        self.checks = SelfCheckState()
        self._check: _Check | None = None
        self._check_due: float | None = None
        #: The (peer, interval) the checks are about; a change resets the misses in a row.
        self._check_for: tuple[bytes, int] | None = None
        #: The peer a due check waits for a session with.
        self._check_session_wait: bytes | None = None
        #: (peer, tx_bytes, rx_bytes) when we last looked for a quiet moment.
        self._quiet: tuple[bytes, int, int] | None = None
        #: Helper side: late replies we owe, and per peer when requests were accepted.
        self._late: dict[bytes, _LateReply] = {}
        self._late_accepted: dict[bytes, list[float]] = {}
        self._late_last_request: dict[bytes, float] = {}

    # ------------------------------------------------------------------ our side

    def _target(self) -> Peer | None:
        return self._keepalive_peer() if self.enabled else None

    def _margin(self, interval: int) -> float:
        """How long before the next keepalive the late reply is due (see CHECK_MARGIN_MIN)."""
        return max(
            CHECK_MARGIN_MIN,
            CHECK_MARGIN_FRACTION * interval,
            CHECK_MARGIN_RTTS * self.checks.rtt,
        )

    def schedule(self, now: float) -> None:
        """Auto decided again: a new keepalive peer or interval is checked soon."""
        target = self._target()
        if target is None:
            self._check_for = None
            self._check_due = None
            self._quiet = None
            self.checks.state = NO_CHECK_PEER
            return
        wanted = (target.public_key, target.persistent_keepalive)
        if wanted != self._check_for:
            self._check_for = wanted
            self.checks.misses = 0
            self.checks.state = "scheduled"
            self._check_due = now + CHECK_AFTER_CHANGE
            self.agent.dirty = True

    def _blocked(self, peer: Peer, now: float) -> tuple[str, float] | None:
        """Why a due check cannot start now, and when to look again (None: it can start)."""
        blocked = self._measurement_blocks(peer, now)
        if blocked is not None:
            return blocked
        keypair = peer.keypairs.current
        if keypair is None or not keypair.can_send(now + CHECK_SESSION_SLACK):
            # The next session brings the check forward (``session_started``); no polling.
            self._check_session_wait = peer.public_key
            return f"waiting for a session with {peer.short_name}", now + CHECK_EVERY
        state = self.agent.peers.get(peer.public_key)
        if state is None or not state.hello_acked:
            return f"waiting for the HELLO exchange with {peer.short_name}", now + CHECK_RETRY
        return None

    def _try(self, now: float) -> None:
        """A check is due: send the request at a quiet moment, when nothing else forbids it."""
        self._check_due = None
        target = self._target()
        if target is None:
            self._check_for = None
            self.checks.state = NO_CHECK_PEER
            return
        key, interval = target.public_key, target.persistent_keepalive
        if (key, interval) != self._check_for:
            self._check_for = (key, interval)
            self.checks.misses = 0
        delay = round(interval - self._margin(interval), 1)
        if delay < CHECK_DELAY_MIN:
            # Until the interval changes: a mapping this short-lived is not worth a late reply.
            self.checks.state = f"off: a {interval} s interval is too short to check"
            return
        blocked = self._blocked(target, now)
        if blocked is not None:
            self.checks.state, self._check_due = blocked
            return
        marks = (key, target.tx_bytes, target.rx_bytes)
        # The request goes where the next keepalive would (it re-arms the keepalive timer):
        # the check then costs no datagram of ours beyond the keepalive schedule.
        slot = keepalive_slot(target)
        keypair = target.keypairs.current
        if slot is not None and (
            keypair is None or not keypair.can_send(slot + CHECK_SESSION_SLACK)
        ):
            if interval + CHECK_SESSION_SLACK < REJECT_AFTER_TIME:
                # The slot will carry a handshake; the one after it a keepalive on the new
                # session: ask then, in its place, rather than beside this one.
                self.checks.state = "waiting for the keepalive after the next handshake"
                self._check_due = slot + CHECK_QUIET + CHECK_SLOT_SLACK
                return
            # Every slot carries a handshake (the interval outlasts a session): ask now, on
            # the session we have, at the cost of one datagram.
            slot = None
        if marks != self._quiet:
            # Something crossed the tunnel since we last looked (or we never looked): look
            # again at the next keepalive slot if a quiet spell fits before it, else after a
            # quiet spell, then less often while the tunnel stays busy.
            first = self._quiet is None or self._quiet[0] != key
            self._quiet = marks
            self.checks.state = "waiting for a quiet moment"
            if slot is not None and slot >= now + CHECK_QUIET:
                self._check_due = slot
            else:
                self._check_due = now + (CHECK_QUIET if first else CHECK_RETRY)
            return
        if slot is not None and slot > now + CHECK_SLOT_SLACK:
            self.checks.state = "waiting for the next keepalive"
            self._check_due = slot
            return
        self._quiet = None
        self._start(target, interval, delay, now)

    def _start(self, peer: Peer, interval: int, delay: float, now: float) -> None:
        token = self._new_token()
        if not send_request(self.device, peer, token, delay, now):
            self._count("check_request_not_sent")
            self._check_due = now + CHECK_RETRY
            return
        self._count("check_requests")
        # It went in the keepalive's place: a lost one is resent as a keepalive request would
        # be (its acknowledgement answers it).
        self.agent.sent_in_slot(peer, now)
        deadline = now + delay + self._margin(interval) / 2
        # Our HELLO refresh would refresh the mapping in the middle of the idle: hold it back.
        self.agent.hold_hello(peer, deadline + CHECK_QUIET)
        self._check = _Check(token, peer.public_key, interval, delay, now, deadline, peer.tx_bytes)
        self.checks.state = f"pending: reply due after {delay:g} s idle ({peer.short_name})"
        self.agent.dirty = True

    def ack_received(self, peer: Peer, token: bytes, message: dict[str, Any], now: float) -> None:
        """A ``NAT_SELF_CHECK_ACK``: the peer will send the late reply, or refuses to."""
        check = self._check
        if check is None or check.token != token or check.peer != peer.public_key:
            self._count("check_stale_ack")
            return
        state = message.get("s")
        if state == "ok" and check.acked_at is None:
            check.acked_at = now
            rtt = now - check.sent_at
            # Capped: one slow answer must not push the next request below the minimum delay.
            self.checks.rtt = min(rtt, CHECK_RTT_MAX)
            check.deadline = max(check.deadline, check.sent_at + check.delay + 2 * rtt)
            self.agent.hold_hello(peer, check.deadline + CHECK_QUIET)
        elif state == "refused":
            why = message.get("why")
            why = why if isinstance(why, str) and why in CHECK_REFUSALS else "unknown"
            self._finish(check, "inconclusive", f"refused by the peer ({why})", now)
        else:
            self._count("check_stale_ack")

    def reply_received(self, token: bytes, source: Endpoint, now: float) -> None:
        """The token datagram came through our tunnel's mapping: it lived as long as asked."""
        check = self._check
        if check is None or token != check.token:
            self._count("check_reply_unknown")
            return
        verdict = self._verdicts.reply(check, source, now)
        if verdict is not None:
            self._finish(check, *verdict, now)

    def _judge(self, check: _Check, now: float) -> None:
        """No reply by the deadline (which comes before our next keepalive)."""
        self._finish(check, *self._verdicts.deadline(check), now)

    def _finish(self, check: _Check, result: str, text: str, now: float) -> None:
        self._check = None
        self._quiet = None
        checks = self.checks
        checks.counts[result] += 1
        # A check of an interval no longer in force is shown but not counted for evidence.
        current = self._check_for == (check.peer, check.interval)
        checks.unanswered = checks.unanswered + 1 if result == "inconclusive" else 0
        expired = False
        if result == "ok" and current:
            checks.misses = 0
        elif result == "missed" and current:
            checks.misses += 1
            text = f"missed {checks.misses}: {text}"
            expired = checks.misses >= CHECK_MISSES
        elif result == "missed":
            text = f"missed: {text}"
        if not current:
            after = CHECK_AFTER_CHANGE
        elif result == "ok":
            after = CHECK_EVERY
        elif result == "missed":
            after = CHECK_AFTER_MISS
        elif result == "void":
            after = CHECK_AFTER_VOID
        else:
            after = min(
                CHECK_AFTER_UNANSWERED_MAX,
                CHECK_AFTER_VOID * 2 ** min(checks.unanswered - 1, 8),
            )
        self._check_due = now + after if self._check_for is not None else None
        checks.state = "scheduled" if self._check_due is not None else NO_CHECK_PEER
        self.agent.dirty = True
        if expired:
            checks.misses = 0
            checks.expiries += 1
            checks.last[check.peer] = (f"{text}: interval halved", now)
            self._evidence_of_expiry(
                now,
                f"self-check: reply after {check.delay:g} s idle did not arrive"
                f" {CHECK_MISSES} times in a row",
            )
        else:
            checks.last[check.peer] = (text, now)

    # ------------------------------------------------------------------ helping a peer

    def request_received(self, peer: Peer, token: bytes, delay: object, now: float) -> None:
        """A peer asks for a late reply: accepted within the limits, else refused or ignored."""
        key = peer.public_key
        last = self._late_last_request.get(key)
        if last is not None and now - last < CHECK_HELP_MIN_GAP:
            # Faster than any honest requester asks: not even a refusal.
            self._count("check_help_ignored_too_soon")
            return
        self._late_last_request[key] = now

        def refuse(why: str) -> None:
            self._count(f"check_help_refused_{why}")
            body = encode_json({"t": token.hex(), "s": "refused", "why": why})
            self.device.send_control(peer, kinds.NAT_SELF_CHECK_ACK, body, now)

        if not isinstance(delay, int | float) or isinstance(delay, bool):
            refuse("bad_delay")
            return
        if not CHECK_DELAY_MIN <= delay <= CHECK_DELAY_MAX:
            refuse("bad_delay")
            return
        if token in self._late:
            refuse("duplicate")
            return
        pending = any(late.peer == key for late in self._late.values())
        if pending or len(self._late) >= CHECK_HELP_TOTAL:
            refuse("busy")
            return
        accepted = [t for t in self._late_accepted.get(key, ()) if now - t < 3600.0]
        if len(accepted) >= CHECK_HELP_PER_HOUR:
            self._late_accepted[key] = accepted
            self._count("check_help_ignored_hourly")
            return
        for gone in [k for k in self._late_accepted if k not in self.device.peers]:
            del self._late_accepted[gone]
        for gone in [k for k in self._late_last_request if k not in self.device.peers]:
            del self._late_last_request[gone]
        self._late_accepted[key] = [*accepted, now]
        due = now + float(delay)
        self._late[token] = _LateReply(key, due)
        # Our HELLO refresh would make the requester answer (and refresh its mapping) before
        # it judged the check: hold it until the requester's grace is over too.
        self.agent.hold_hello(peer, due + max(CHECK_HOLD_MIN, CHECK_HOLD_FRACTION * float(delay)))
        self._count("check_help_accepted")
        self.agent.dirty = True
        body = encode_json({"t": token.hex(), "s": "ok"})
        self.device.send_control(peer, kinds.NAT_SELF_CHECK_ACK, body, now)

    def _send_late_reply(self, token: bytes, late: _LateReply, now: float) -> None:
        """Send the token to the requester's tunnel endpoint, from ours: through its mapping."""
        peer = self.device.peers.get(late.peer)
        if peer is None or peer.endpoint is None or not peer.sends_over_udp:
            self._count("check_help_no_endpoint")
            return
        if not self._answer_allowed(now):
            self._count("check_help_rate_limited")
            return
        self.device.io.send_datagram(CHECK_MAGIC + token, peer.endpoint)
        peer.sent.add(PROBE, peer.data_packets, now)
        self._count("check_replies_sent")

    # ------------------------------------------------------------------ timers and hooks

    def next_deadline(self) -> float | None:
        deadlines = [late.due for late in self._late.values()]
        if self._check is not None:
            deadlines.append(self._check.deadline)
        elif self._check_due is not None:
            deadlines.append(self._check_due)
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for token, late in list(self._late.items()):
            if late.due <= now:
                del self._late[token]
                self._send_late_reply(token, late, now)
        if self._check is not None and self._check.deadline <= now:
            self._judge(self._check, now)
        if self._check is None and self._check_due is not None and self._check_due <= now:
            self._try(now)

    def session_started(self, peer: Peer, now: float) -> None:
        """A check waiting for a session with ``peer`` goes ahead soon."""
        if self._check_session_wait == peer.public_key:
            self._check_session_wait = None
            if self._check is None and self._check_due is not None:
                self._check_due = min(self._check_due, now + CHECK_QUIET)
                self.agent.dirty = True

    def peer_status(self, key: bytes) -> dict[str, Any]:
        """The latest self-check with this peer: its result text and when (the node's clock)."""
        status: dict[str, Any] = {}
        last = self.checks.last.get(key)
        if last is not None:
            status["keepalive_self_check"], status["keepalive_self_check_at"] = last
        check = self._check
        if check is not None and check.peer == key:
            status["keepalive_self_check_pending"] = f"reply due after {check.delay:g} s idle"
        return status

    def node_status(self) -> dict[str, Any]:
        """The counts and what the check does now, once it has a peer or a result."""
        status: dict[str, Any] = {}
        checks = self.checks
        if self._check_for is not None or any(checks.counts.values()):
            status["keepalive_self_checks"] = {**checks.counts, "halved": checks.expiries}
            status["keepalive_self_check_state"] = checks.state
            if self._check is None and self._check_due is not None:
                status["keepalive_self_check_next_at"] = self._check_due
        return status
