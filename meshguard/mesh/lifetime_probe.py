"""The NAT lifetime probe's wire format and timing: what the measuring node and its helper agree on.

A measuring node agrees a random token with a helper over the tunnel (``NAT_PROBE_REQUEST``),
sends the token from a secondary socket (``PROBE_MAGIC``), the helper acknowledges each such
datagram (``ACK_MAGIC``) and, ``delay`` seconds after the last one, echoes it back
(``ECHO_MAGIC``) and reports over the tunnel (``NAT_PROBE_RESULT``). The measuring side is
:mod:`meshguard.mesh.keepalive`, the helper side :mod:`meshguard.mesh.probe_helper`; both read
these numbers from here. docs/keepalive.md has the figures.
"""

from __future__ import annotations

import math
from typing import Final

#: Datagram magics: never a WireGuard message type (1..4 then three zero bytes).
PROBE_MAGIC: Final = b"MGn\x01"
ACK_MAGIC: Final = b"MGn\x02"
ECHO_MAGIC: Final = b"MGn\x03"
TOKEN_SIZE: Final = 16
DATAGRAM_SIZE: Final = 4 + TOKEN_SIZE

#: Stop when known-alive and known-dead are within this fraction of known-alive (or 1 s).
PRECISION: Final = 0.15
LIFETIME_MIN: Final = 4.0
#: The longest lifetime we measure (and the longest delay a helper accepts).
LIFETIME_MAX: Final = 600.0


def _ladder() -> tuple[float, ...]:
    """LIFETIME_MIN to LIFETIME_MAX, each rung at most the precision above the previous one.

    All rungs are probed at once, so one round usually ends the measurement as soon as the
    first rung above the lifetime fails, instead of a doubling ladder followed by a bisection
    round of another full lifetime.
    """
    rungs = [LIFETIME_MIN]
    while rungs[-1] < LIFETIME_MAX:
        step = max(1.0, PRECISION * rungs[-1])
        rungs.append(min(LIFETIME_MAX, math.floor((rungs[-1] + step) * 10) / 10))
    return tuple(rungs)


#: Probe delays tried first, all in parallel, each on its own socket.
LIFETIME_LADDER: Final = _ladder()
#: Priming: token datagrams sent from the secondary socket, this far apart.
PRIMES: Final = 2
PRIME_GAP: Final = 2.5
#: At most this many token datagrams per probe (priming plus resends while unacknowledged).
MAX_PROBE_SENDS: Final = 4
#: How long the measuring side waits for the helper's answer to a request.
REQUEST_TIMEOUT: Final = 10.0
#: The echo is due ``delay`` after the last token datagram; it is called lost (the mapping
#: expired) this much later. The helper's "echoed" report over the tunnel, when it gets
#: through, shortens the wait to ECHO_GRACE.
ECHO_WAIT: Final = 3.0
ECHO_GRACE: Final = 2.0
#: Tokens per cancel message (a finished measurement tells its helper which probes are over).
CANCEL_BATCH: Final = 24
