"""The filtering check: does our NAT let in a peer we have not sent to for a while?

With an endpoint-independent mapping one keepalive stream (to the *carrier*) keeps the node's
public port for every destination, but many NATs still admit inbound packets only from a remote
the node itself sent to lately (address- or port-dependent filtering: a per-destination flow).
The keepalive policy lets its other meshguard peers go without a keepalive of their own only
after this check proved the filtering admits them. The check asks such a peer for a late reply
(the self-check's request, :func:`meshguard.mesh.selfcheck.send_request`) after a delay longer
than the measured lifetime; the reply arrives only if the NAT admits a remote we have not talked
to since. Two misses in a row prove address/port-dependent filtering.

:class:`FilteringCheck` is that one machine: when to check, the request, the judgement of the
reply (:class:`meshguard.mesh.selfcheck.LateReplyJudge`) and the verdict, kept in the policy's
:class:`NatState` fields. Whom to check with, and what the verdict means for the intervals, stay
with the keepalive policy (``candidate``, ``wanted``, ``changed``). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh.agent import MeshAgent, keepalive_slot
from meshguard.mesh.lifetime_probe import ECHO_GRACE, ECHO_WAIT
from meshguard.mesh.selfcheck import (
    CHECK_DELAY_MAX,
    CHECK_QUIET,
    CHECK_RETRY,
    CHECK_RTT_MAX,
    CHECK_SESSION_SLACK,
    CHECK_SLOT_SLACK,
    LateReplyJudge,
    send_request,
)

#: Why a filtering check proves nothing: traffic either way may have refreshed our flow.
FILTER_VOID_TEXT: Final = "void: traffic with the peer meanwhile"
#: The late reply comes this long after the request (longer than the lifetime, so our own flow
#: to the checked peer has expired): lifetime * FILTER_FACTOR + FILTER_MARGIN, within the
#: helper's CHECK_DELAY_MAX. A lifetime above FILTER_LIFETIME_MAX (or unknown) is not checked:
#: every peer keeps its own keepalive.
FILTER_FACTOR: Final = 1.2
FILTER_MARGIN: Final = 5.0
FILTER_LIFETIME_MAX: Final = 250.0
#: Misses in a row that prove address/port-dependent filtering (one lost reply must not).
FILTER_MISSES: Final = 2
#: The next check after a verdict (either way; with the lifetime re-measurement's rhythm of
#: six hours), after a miss, and after a void, unanswered or blocked attempt.
FILTER_RECHECK: Final = 6 * 3600.0
FILTER_AFTER_MISS: Final = 10.0
FILTER_AFTER_VOID: Final = 600.0
FILTER_FIRST: Final = 10.0
FILTER_UNKNOWN: Final = "unknown"
FILTER_OPEN: Final = "endpoint-independent"
FILTER_CLOSED: Final = "address-or-port-dependent"


class FilteringRecord(Protocol):
    """The NAT facts the check reads and the verdict it keeps (the policy's ``NatState``)."""

    lifetime: float | None
    filtering: str
    filtering_peer: str | None
    filtering_at: float | None
    filtering_misses: int
    filtering_state: str


@dataclass
class _Check:
    """The filtering check in flight: a late reply asked of a peer that is not the carrier."""

    token: bytes
    peer: bytes
    delay: float
    sent_at: float
    deadline: float
    #: ``peer.tx_bytes`` after the request; ``peer.rx_bytes`` once acknowledged: anything we
    #: sent since (or got from the peer after its ack) may have refreshed our flow to it.
    tx_mark: int
    rx_mark: int | None = None
    acked_at: float | None = None

    def void(self, peer: Peer) -> bool:
        """We sent to the peer, or it sent to us after its ack: our flow may be fresh."""
        return peer.tx_bytes != self.tx_mark or (
            self.rx_mark is not None and peer.rx_bytes != self.rx_mark
        )


class FilteringCheck:
    """The filtering check, driven by the keepalive policy that owns it."""

    def __init__(
        self,
        device: Device,
        agent: MeshAgent,
        nat: FilteringRecord,
        *,
        new_token: Callable[[], bytes],
        candidate: Callable[[], Peer | None],
        wanted: Callable[[], bool],
        measurement_blocks: Callable[[Peer, float], tuple[str, float] | None],
        changed: Callable[[float], None],
        count: Callable[[str], None],
        event: Callable[[str], None],
    ) -> None:
        """``candidate()`` is the peer to check with; ``wanted()`` whether a carrier question
        needs the check at all; ``measurement_blocks(peer, now)`` why a lifetime measurement
        keeps the check from starting now (and when to look again); ``changed(now)`` is told
        when a check starts or ends (the checked peer's keepalive is suspended meanwhile);
        ``count(name)`` bumps a counter and ``event(text)`` records a NAT event."""
        self.device = device
        self.agent = agent
        self.nat = nat
        self._new_token = new_token
        self._candidate = candidate
        self._wanted = wanted
        self._measurement_blocks = measurement_blocks
        self._changed = changed
        self._count = count
        self._event = event
        self._judge = LateReplyJudge(device, count, "filter", FILTER_VOID_TEXT, "")
        #: The check in flight, and when to try the next one.
        self._check: _Check | None = None
        self._due: float | None = None

    def checking(self, key: bytes) -> bool:
        """Whether a check with this peer is in flight (its keepalive is suspended)."""
        return self._check is not None and self._check.peer == key

    def owns(self, token: bytes) -> bool:
        """Whether ``token`` is the check in flight's (its ack or late reply)."""
        return self._check is not None and token == self._check.token

    def measured(self) -> None:
        """The lifetime was (re)measured: with the verdict unknown, check soon."""
        if self._check is None and self.nat.filtering == FILTER_UNKNOWN:
            self._due = None

    def delay(self) -> float | None:
        """How long the late reply waits: past the lifetime, so our flow to the peer is gone."""
        lifetime = self.nat.lifetime
        if lifetime is None or lifetime > FILTER_LIFETIME_MAX:
            return None
        return round(min(CHECK_DELAY_MAX, max(0.0, lifetime) * FILTER_FACTOR + FILTER_MARGIN), 1)

    def forget(self, state: str) -> None:
        """Another NAT (new public address): its filtering is unknown until checked again."""
        nat = self.nat
        self._check = None
        self._due = None
        nat.filtering = FILTER_UNKNOWN
        nat.filtering_peer = None
        nat.filtering_at = None
        nat.filtering_misses = 0
        nat.filtering_state = state

    def schedule(self, now: float) -> None:
        """Auto decided again: when wanted and not yet planned, plan the next check."""
        if self._check is not None:
            return
        if not self._wanted():
            self._due = None
            self.nat.filtering_state = "not needed: no carrier question"
            return
        if self._due is None:
            unknown = self.nat.filtering == FILTER_UNKNOWN
            self._due = now + (FILTER_FIRST if unknown else FILTER_RECHECK)
            self.nat.filtering_state = "scheduled"
            self.agent.dirty = True

    def _try(self, now: float) -> None:
        """The filtering check: does the NAT let in a peer we have not sent to for a while?

        We ask a non-carrier meshguard peer P2 (``NAT_SELF_CHECK``, the self-check's request,
        which P2 answers as it answers any self-check) for a late reply after ``delay``, longer
        than the measured lifetime: by then our own flow to P2 has expired in the NAT, while
        the carrier's keepalives keep the public port. The reply arrives only if the filtering
        admits a remote we have not talked to lately; then the carrier alone may keep the node
        reachable. Anything we send P2 in between (or get from it after its ack) may refresh our
        flow to it and voids the check, so P2's keepalive is suspended while the check is in
        flight. That is safe and bounded: the suspension lasts one ``delay`` (at most
        CHECK_DELAY_MAX) and the carrier keeps the port meanwhile. If the filtering admits P2
        (what the check hopes to show) P2 reaches us through that port all along; if it does
        not, P2 loses at most that one window of inbound reachability (the same it would lose
        under carrier-only mode for good), and its keepalive resumes as soon as the check ends.
        Our own traffic to P2 still flows (it only voids the check). Two misses in a row prove
        address/port-dependent filtering; a lifetime unknown or too long to outwait within the
        helper's cap is not checked, and every peer keeps its own keepalive.
        """
        self._due = None
        nat = self.nat
        if not self._wanted():
            nat.filtering_state = "not needed: no carrier question"
            return
        peer = self._candidate()
        assert peer is not None
        delay = self.delay()
        if delay is None:
            nat.filtering_state = (
                f"not checked: NAT lifetime unknown or above {FILTER_LIFETIME_MAX:g} s"
            )
            self._due = now + FILTER_AFTER_VOID
            return
        blocked = self._measurement_blocks(peer, now)
        if blocked is not None:
            nat.filtering_state, self._due = blocked
            return
        keypair = peer.keypairs.current
        state = self.agent.peers.get(peer.public_key)
        if keypair is None or not keypair.can_send(now + CHECK_SESSION_SLACK):
            nat.filtering_state = f"waiting for a session with {peer.short_name}"
            self._due = now + CHECK_RETRY
            return
        if state is None or not state.hello_acked:
            nat.filtering_state = f"waiting for the HELLO exchange with {peer.short_name}"
            self._due = now + CHECK_RETRY
            return
        slot = keepalive_slot(peer)
        if (
            slot is not None
            and slot > now + CHECK_SLOT_SLACK
            and keypair.can_send(slot + CHECK_SESSION_SLACK)
        ):
            # The request goes in the place of P2's next keepalive, not beside it.
            nat.filtering_state = f"waiting for the next keepalive to {peer.short_name}"
            self._due = slot
            return
        token = self._new_token()
        if not send_request(self.device, peer, token, delay, now):
            self._count("filter_request_not_sent")
            self._due = now + CHECK_RETRY
            return
        self._count("filter_requests")
        deadline = now + delay + ECHO_WAIT
        self.agent.hold_hello(peer, deadline + CHECK_QUIET)
        self._check = _Check(token, peer.public_key, delay, now, deadline, peer.tx_bytes)
        nat.filtering_state = f"pending: reply due after {delay:g} s idle ({peer.short_name})"
        self.agent.dirty = True
        self._changed(now)  # suspends P2's keepalive (see ``KeepalivePolicy._decide``)

    def ack(self, peer: Peer, message: dict[str, Any], now: float) -> None:
        """The peer's acknowledgement of our request (routed here when :meth:`owns` it)."""
        check = self._check
        assert check is not None
        if check.peer != peer.public_key:
            self._count("filter_stale_ack")
            return
        state = message.get("s")
        if state == "ok" and check.acked_at is None:
            check.acked_at = now
            check.rx_mark = peer.rx_bytes
            rtt = min(now - check.sent_at, CHECK_RTT_MAX)
            check.deadline = max(check.deadline, check.sent_at + check.delay + 2 * rtt + ECHO_GRACE)
            self.agent.hold_hello(peer, check.deadline + CHECK_QUIET)
        elif state == "refused":
            self._finish(check, "inconclusive", "refused by the peer", now)
        else:
            self._count("filter_stale_ack")

    def reply(self, source: Endpoint, now: float) -> None:
        """The check's token came back (the policy routes it here when :meth:`owns` it)."""
        check = self._check
        assert check is not None
        verdict = self._judge.reply(check, source, now)
        if verdict is not None:
            self._finish(check, *verdict, now)

    def _finish(self, check: _Check, result: str, text: str, now: float) -> None:
        self._check = None
        nat = self.nat
        peer = self.device.peers.get(check.peer)
        short = peer.short_name if peer is not None else "a removed peer"
        self._count(f"filter_{result}")
        verdict: str | None = None
        if result == "ok":
            verdict = FILTER_OPEN
        elif result == "missed":
            nat.filtering_misses += 1
            text = f"missed {nat.filtering_misses}: {text}"
            if nat.filtering_misses >= FILTER_MISSES:
                verdict = FILTER_CLOSED
        if verdict is not None:
            if verdict != nat.filtering:
                self._event(f"filtering {verdict} (checked with {short})")
            nat.filtering = verdict
            nat.filtering_peer = short
            nat.filtering_at = now
            nat.filtering_misses = 0
            self._due = now + FILTER_RECHECK
        elif result == "missed":
            self._due = now + FILTER_AFTER_MISS
        else:
            self._due = now + FILTER_AFTER_VOID
        nat.filtering_state = f"{text} ({short})"
        self.agent.dirty = True
        self._changed(now)  # resumes P2's keepalive unless the check passed

    def text(self) -> str:
        nat = self.nat
        if nat.filtering == FILTER_UNKNOWN or nat.filtering_at is None:
            return FILTER_UNKNOWN
        return f"{nat.filtering} (checked with {nat.filtering_peer})"

    def next_deadline(self) -> float | None:
        return self._check.deadline if self._check is not None else self._due

    def run_timers(self, now: float) -> None:
        if self._check is not None and self._check.deadline <= now:
            # No late reply by the deadline.
            self._finish(self._check, *self._judge.deadline(self._check), now)
        elif self._check is None and self._due is not None and self._due <= now:
            self._try(now)
