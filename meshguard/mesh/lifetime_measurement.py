"""Measuring how long our NAT keeps an idle UDP mapping (the lifetime), with a helper peer.

In the spirit of RFC 5780's binding-lifetime discovery, but between two meshguard nodes: we open
a *secondary* UDP socket (so the measured mapping is not the one our tunnel uses, and the probe
does not refresh the tunnel's mapping), agree a random token with a helper peer over the
authenticated control channel (``NAT_PROBE_REQUEST``), send the token from the secondary socket
twice (the helper acks each, so the mapping looks like an established two-way flow, as the
tunnel's does: Linux conntrack gives such flows its longer "stream" timeout), then stay silent.
After ``delay`` seconds the helper echoes the token toward the source it saw and reports
``echoed`` over the tunnel (``NAT_PROBE_RESULT``). The echo arrives only if the mapping survived
``delay``. Probes at every delay of the ladder (:data:`meshguard.mesh.lifetime_probe.
LIFETIME_LADDER`) run in parallel, each on its own socket; the first failure cancels the longer
ones (and tells the helper, so it sends no late reports into the tunnel). Bisection between the
longest delay known alive and the shortest known dead follows only if the ladder's answers left a
wider gap.

:class:`LifetimeMeasurement` is that one machine. Whether a measurement is wanted, which peer
helps, and what a new lifetime means for the intervals stay with the keepalive policy
(``wanted``, ``pick_helper``, ``measured``). Only datagrams carrying our own token from our
helper's address count. Nothing here does I/O: secondary sockets come from an injected
:class:`ProbeSocketOpener`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.core.sent import PROBE
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent, encode_json
from meshguard.mesh.lifetime_probe import (
    ACK_MAGIC,
    CANCEL_BATCH,
    DATAGRAM_SIZE,
    ECHO_GRACE,
    ECHO_MAGIC,
    ECHO_WAIT,
    LIFETIME_LADDER,
    LIFETIME_MAX,
    MAX_PROBE_SENDS,
    PRECISION,
    PRIME_GAP,
    PRIMES,
    PROBE_MAGIC,
    REQUEST_TIMEOUT,
)

#: Probes per bisection round between known-alive and known-dead (needed only when the
#: ladder's answers were incomplete or inconsistent).
BISECT_POINTS: Final = 3
#: A request the session could not carry is sent again this much later (after the handshake
#: we start for it), at most RELAUNCH_TRIES times.
RELAUNCH_AFTER: Final = 6.0
RELAUNCH_TRIES: Final = 5
#: A failed measurement is retried after this; a good one is repeated after REMEASURE_AFTER.
RETRY_AFTER: Final = 60.0
REMEASURE_AFTER: Final = 6 * 3600.0


class ProbeSocket(Protocol):
    """A secondary UDP socket (its own NAT mapping)."""

    def send(self, data: bytes, endpoint: Endpoint) -> None: ...

    def close(self) -> None: ...


class ProbeSocketOpener(Protocol):
    """Opens secondary sockets; ``receive(data, source, now)`` gets what arrives on one."""

    def open(
        self, toward: Endpoint, receive: Callable[[bytes, Endpoint, float], None]
    ) -> ProbeSocket | None: ...


class LifetimeRecord(Protocol):
    """What the measurement keeps in the policy's ``NatState`` (shown by status)."""

    lifetime: float | None
    lifetime_at_least: bool
    measurement: str
    measured_at: float | None
    shrunk: int | None


def _precision(alive: float) -> float:
    """Stop bisecting when known-alive and known-dead are this close."""
    return max(1.0, PRECISION * alive)


@dataclass
class _Probe:
    """One lifetime probe of ours: a token, a delay and a secondary socket."""

    token: bytes
    delay: float
    helper: bytes
    deadline: float
    path: ProbeSocket | None = None
    target: Endpoint | None = None
    sends: int = 0
    next_send: float | None = None
    acked: bool = False
    echoed_at: float | None = None


class LifetimeMeasurement:
    """Our side of lifetime probes, driven by the keepalive policy that owns it."""

    def __init__(
        self,
        device: Device,
        agent: MeshAgent,
        nat: LifetimeRecord,
        paths: ProbeSocketOpener | None,
        *,
        new_token: Callable[[], bytes],
        wanted: Callable[[], bool],
        pick_helper: Callable[[float], Peer | None],
        measured: Callable[[float], None],
        count: Callable[[str], None],
        event: Callable[[str], None],
    ) -> None:
        """``wanted()`` says whether a measurement is needed at all; ``pick_helper(now)`` is a
        meshguard peer with a session to measure with (None: none now); ``measured(now)`` is
        told when a new lifetime is in ``nat``; ``count(name)`` bumps a counter and
        ``event(text)`` records a NAT event."""
        self.device = device
        self.agent = agent
        self.nat = nat
        self.paths = paths
        self._new_token = new_token
        self._wanted = wanted
        self._pick_helper = pick_helper
        self._measured_listener = measured
        self._count = count
        self._event = event
        #: The peer the latest measurement ran with.
        self.helper: bytes | None = None
        #: Completed probes as (delay, alive), newest last (for status and tests).
        self.results: list[tuple[float, bool]] = []
        self._probes: dict[bytes, _Probe] = {}
        self._alive = 0.0
        self._dead: float | None = None
        self._round_learned = 0
        self._next_campaign: float | None = None
        #: Delays whose request waits for a session, retried at ``_relaunch_at``.
        self._pending: list[float] = []
        self._relaunch_at: float | None = None
        self._relaunch_tries = 0
        #: Per probe token: until when the helper may still report on it over the tunnel (a
        #: token leaves once its report came, or once the helper was told it is cancelled).
        self._reports_due: dict[bytes, float] = {}

    def measure_soon(self, now: float) -> None:
        """Evidence of expiry: measure again as soon as possible (unless one runs)."""
        if not self.busy():
            self._next_campaign = now
            self.agent.dirty = True

    def restart(self, now: float, why: str) -> None:
        """Another NAT (a new public address): forget the lifetime, measure from scratch."""
        self._cancel_probes(now)
        nat = self.nat
        nat.lifetime = None
        nat.lifetime_at_least = False
        nat.shrunk = None
        nat.measurement = f"pending ({why})"
        self._next_campaign = now
        self.agent.dirty = True

    def busy(self) -> bool:
        """Whether probes are out (or wait for a session to be sent)."""
        return bool(self._probes or self._pending)

    def maybe_start(self, now: float) -> None:
        if self.busy() or not self._wanted():
            return
        due = self._next_campaign
        if due is None:
            if self.nat.lifetime is not None and self.nat.shrunk is None:
                return
        elif due > now:
            return
        helper = self._pick_helper(now)
        if helper is None:
            # No deadline: the next session or observation calls us again.
            self._next_campaign = None
            self.nat.measurement = "waiting for a meshguard peer with a session"
            return
        self.helper = helper.public_key
        self._alive = 0.0
        self._dead = None
        self._round_learned = 0
        self._next_campaign = None
        self.nat.measurement = f"measuring with {helper.short_name}"
        self._count("campaigns")
        for delay in LIFETIME_LADDER:
            self._launch(helper, delay, now)

    def _launch(self, helper: Peer, delay: float, now: float) -> None:
        token = self._new_token()
        body = encode_json({"t": token.hex(), "d": delay})
        if not self.device.send_control(helper, kinds.NAT_PROBE_REQUEST, body, now):
            # The session went stale while idle: start a handshake, send the request after it.
            self._count("request_not_sent")
            if not self._pending:
                self.device.send_keepalive(helper, now)
                self._relaunch_at = now + RELAUNCH_AFTER
            self._pending.append(delay)
            self.agent.dirty = True
            return
        self._probes[token] = _Probe(token, delay, helper.public_key, now + REQUEST_TIMEOUT)
        # The helper reports on this token over the tunnel even after we cancelled the probe.
        late = now + REQUEST_TIMEOUT + PRIME_GAP * MAX_PROBE_SENDS + delay + ECHO_GRACE
        self._reports_due[token] = late
        self.agent.dirty = True

    def _relaunch(self, now: float) -> None:
        delays, self._pending = self._pending, []
        self._relaunch_at = None
        helper = self.device.peers.get(self.helper) if self.helper is not None else None
        self._relaunch_tries += 1
        if helper is None or self._relaunch_tries > RELAUNCH_TRIES:
            self._relaunch_tries = 0
            self._schedule_retry(now, "helper session unavailable")
            return
        for delay in delays:
            self._launch(helper, delay, now)
        if not self._pending:
            self._relaunch_tries = 0

    def _schedule_retry(self, now: float, why: str) -> None:
        if not self.busy():
            self.nat.measurement = f"retrying in {RETRY_AFTER:g} s ({why})"
            self._next_campaign = now + RETRY_AFTER
            self.agent.dirty = True

    def _cancel_probes(self, now: float, at_least: float | None = None) -> None:
        if at_least is None:
            self._pending = []
            self._relaunch_at = None
        else:
            self._pending = [d for d in self._pending if d < at_least]
        cancelled: dict[bytes, list[bytes]] = {}
        for token, probe in list(self._probes.items()):
            if at_least is None or probe.delay >= at_least:
                if probe.path is not None:
                    probe.path.close()
                del self._probes[token]
                cancelled.setdefault(probe.helper, []).append(token)
        for key, tokens in cancelled.items():
            self._tell_cancelled(key, tokens, now)

    def _tell_cancelled(self, key: bytes, tokens: list[bytes], now: float) -> None:
        """Tell the helper once that these probes are over: otherwise it still echoes each one
        and reports it over the tunnel at its delay (up to 600 s after the start), a stream of
        control messages into the idle tunnel that the measurement was meant to leave quiet.
        A helper that does not know cancelling refuses it (we ignore the refusal); a lost
        message only lets those late reports come, as before."""
        helper = self.device.peers.get(key)
        if helper is None:
            return
        for start in range(0, len(tokens), CANCEL_BATCH):
            batch = tokens[start : start + CANCEL_BATCH]
            body = encode_json({"t": batch[0].hex(), "x": [t.hex() for t in batch]})
            if self.device.send_control(helper, kinds.NAT_PROBE_REQUEST, body, now):
                self._count("probes_cancel_sent")
                # No report will come for these (unless this message is lost: then a late
                # report may void a self-check, which is tried again).
                for token in batch:
                    self._reports_due.pop(token, None)

    def _ready(self, probe: _Probe, now: float) -> None:
        """The helper holds our token: open the secondary socket and prime the mapping."""
        helper = self.device.peers.get(probe.helper)
        if helper is None or helper.endpoint is None or self.paths is None:
            self._finish_probe(probe, None, now)
            return
        token = probe.token

        def receive(data: bytes, source: Endpoint, when: float) -> None:
            self.path_datagram_received(token, data, source, when)

        path = self.paths.open(helper.endpoint, receive)
        if path is None:
            self._count("no_secondary_socket")
            self._finish_probe(probe, None, now)
            return
        probe.path = path
        probe.target = helper.endpoint
        self._send_probe(probe, now)

    def _send_probe(self, probe: _Probe, now: float) -> None:
        assert probe.path is not None and probe.target is not None
        probe.path.send(PROBE_MAGIC + probe.token, probe.target)
        probe.sends += 1
        helper = self.device.peers.get(probe.helper)
        if helper is not None:
            helper.sent.add(PROBE, helper.data_packets, now)
        more = probe.sends < PRIMES or (not probe.acked and probe.sends < MAX_PROBE_SENDS)
        probe.next_send = now + PRIME_GAP if more else None
        probe.deadline = now + probe.delay + ECHO_WAIT
        if more:
            probe.deadline += PRIME_GAP * (MAX_PROBE_SENDS - probe.sends)
        self.agent.dirty = True

    def path_datagram_received(
        self, token: bytes, data: bytes, source: Endpoint, now: float
    ) -> None:
        """A datagram on a secondary socket: only our helper's ack or echo of its token counts."""
        probe = self._probes.get(token)
        if (
            probe is None
            or len(data) != DATAGRAM_SIZE
            or data[4:] != token
            or probe.target is None
            or source != probe.target
        ):
            self._count("path_garbage")
            return
        head = data[:4]
        if head == ACK_MAGIC:
            probe.acked = True
        elif head == ECHO_MAGIC:
            self._finish_probe(probe, True, now)
        else:
            self._count("path_garbage")

    def _finish_probe(self, probe: _Probe, alive: bool | None, now: float) -> None:
        if self._probes.pop(probe.token, None) is None:
            return
        if probe.path is not None:
            probe.path.close()
        if alive is None:
            self._count("probes_inconclusive")
        else:
            # Its report came (alive), or its echo was due and judged (dead): nothing follows.
            self._reports_due.pop(probe.token, None)
            self._count("probes_alive" if alive else "probes_dead")
            self.results.append((probe.delay, alive))
            self._round_learned += 1
            if alive:
                self._alive = max(self._alive, probe.delay)
                if self._dead is not None and self._alive >= self._dead:
                    self._dead = None  # inconsistent: the NAT kept a longer one; search upward
            else:
                self._dead = probe.delay if self._dead is None else min(self._dead, probe.delay)
                # Longer delays would die too: do not wait for them.
                self._cancel_probes(now, at_least=self._dead)
        if not self.busy():
            self._next_round(now)

    def _next_round(self, now: float) -> None:
        helper = self.device.peers.get(self.helper) if self.helper is not None else None
        if self._round_learned == 0 or helper is None:
            self._schedule_retry(now, "no probe answered")
            return
        self._round_learned = 0
        alive, dead = self._alive, self._dead
        if dead is None:
            if alive >= LIFETIME_MAX:
                self._measured(alive, now, at_least=True)
                return
            delays = [d for d in LIFETIME_LADDER if d > alive]
        elif dead - alive <= _precision(alive) + 0.05:  # + rounding of the rungs
            self._measured(alive, now)
            return
        else:
            step = (dead - alive) / (BISECT_POINTS + 1)
            delays = [round(alive + step * i, 1) for i in range(1, BISECT_POINTS + 1)]
        for delay in delays:
            self._launch(helper, delay, now)

    def _measured(self, lifetime: float, now: float, *, at_least: bool = False) -> None:
        nat = self.nat
        nat.lifetime = lifetime
        nat.lifetime_at_least = at_least
        nat.measured_at = now
        nat.measurement = "measured"
        nat.shrunk = None
        self._event(f"measured NAT lifetime {'>= ' if at_least else ''}{lifetime:g} s")
        self._next_campaign = now + REMEASURE_AFTER
        self.agent.dirty = True
        self._measured_listener(now)

    def result(self, peer: Peer, token: bytes, message: dict[str, Any], now: float) -> None:
        """``NAT_PROBE_RESULT`` from the helper: ready (open the socket), echoed, refused."""
        probe = self._probes.get(token)
        if probe is None or probe.helper != peer.public_key:
            self._count("stale_result")
            return
        state = message.get("s")
        if state == "ready" and probe.path is None:
            self._ready(probe, now)
        elif state == "echoed" and probe.path is not None:
            if not probe.acked or probe.next_send is not None:
                self._finish_probe(probe, None, now)
                return
            probe.echoed_at = now
            probe.deadline = min(probe.deadline, now + ECHO_GRACE)
            self.agent.dirty = True
        else:
            # "refused" (helper limits) or out of order.
            self._count("probe_refused")
            self._finish_probe(probe, None, now)

    def helper_busy_until(self, now: float) -> float:
        """Until when the helper may still report on a probe token of ours (0: it will not)."""
        for token, due in list(self._reports_due.items()):
            if due <= now:
                del self._reports_due[token]
        return max(self._reports_due.values(), default=0.0)

    def next_deadline(self) -> float | None:
        deadlines: list[float] = []
        if self._next_campaign is not None and self._wanted():
            deadlines.append(self._next_campaign)
        for probe in self._probes.values():
            deadlines.append(probe.deadline)
            if probe.next_send is not None:
                deadlines.append(probe.next_send)
        if self._relaunch_at is not None:
            deadlines.append(self._relaunch_at)
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for probe in list(self._probes.values()):
            if probe.token not in self._probes:
                continue  # cancelled by an earlier probe's result
            if probe.deadline <= now:
                # Acknowledged and primed, yet no echo by its time: the mapping expired.
                done = probe.acked and probe.next_send is None
                self._finish_probe(probe, False if done else None, now)
            elif probe.next_send is not None and probe.next_send <= now:
                self._send_probe(probe, now)
        if self._relaunch_at is not None and self._relaunch_at <= now:
            self._relaunch(now)
        if self._next_campaign is not None and self._next_campaign <= now:
            self.maybe_start(now)
