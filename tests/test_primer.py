"""Primers' hop limit (meshguard/adapters/primer.py): read from a trace of our own NAT routers."""

from __future__ import annotations

import socket
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.primer import (
    IP_RECVERR,
    RETRACE,
    SO_EE_ORIGIN_ICMP,
    Primer,
    parse_time_exceeded,
    primer_ttl,
)
from meshguard.core.interfaces import Endpoint
from meshguard.mesh.paths import PRIME_TTL


def _record(origin: int, icmp_type: int, offender: str) -> bytes:
    err = struct.pack("=IBBBBII", 113, origin, icmp_type, 0, 0, 0, 0)
    addr = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(offender))
    return err + addr


class TtlTests(SynchronousTestCase):
    def test_first_public_router_gives_the_hop_limit(self) -> None:
        """One NAT: its LAN side, then the first public router: 2. A carrier-grade NAT
        behind it: 3. A host with a public router: 1."""
        self.assertEqual(primer_ttl(["192.168.1.1", "203.0.1.1"]), 2)
        self.assertEqual(primer_ttl(["192.168.1.1", "100.64.1.1", "203.0.1.1"]), 3)
        self.assertEqual(primer_ttl(["198.51.100.1"]), 1)

    def test_a_silent_hop_or_no_public_router_keeps_the_default(self) -> None:
        self.assertIsNone(primer_ttl(["192.168.1.1", None, "203.0.1.1"]))
        self.assertIsNone(primer_ttl(["192.168.1.1", "10.0.0.1"]))
        self.assertIsNone(primer_ttl([]))

    def test_time_exceeded_is_read_from_the_error_queue_record(self) -> None:
        record = _record(SO_EE_ORIGIN_ICMP, 11, "100.64.1.1")
        self.assertEqual(
            parse_time_exceeded([(socket.IPPROTO_IP, IP_RECVERR, record)]), "100.64.1.1"
        )
        # Port unreachable, a local error, another level, a short record: nothing.
        for level, kind, data in (
            (socket.IPPROTO_IP, IP_RECVERR, _record(SO_EE_ORIGIN_ICMP, 3, "203.0.1.1")),
            (socket.IPPROTO_IP, IP_RECVERR, _record(1, 11, "203.0.1.1")),
            (socket.SOL_SOCKET, IP_RECVERR, record),
            (socket.IPPROTO_IP, IP_RECVERR, record[:20]),
        ):
            self.assertIsNone(parse_time_exceeded([(level, kind, data)]))

    @given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 30), st.binary(max_size=64))))
    def test_any_ancillary_data_parses_without_raising(
        self, ancillary: list[tuple[int, int, bytes]]
    ) -> None:
        parse_time_exceeded(ancillary)


class PrimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[Endpoint, int]] = []
        self.traces: list[Endpoint] = []
        self.answer: list[str | None] = ["192.168.6.1", "100.64.6.1", "203.0.6.1"]

        def tracer(toward: Endpoint, **kwargs: Any) -> list[str | None]:
            self.traces.append(toward)
            return self.answer

        self.primer = Primer(
            self.clock,
            lambda data, endpoint, ttl: self.sent.append((endpoint, ttl)),
            tracer=tracer,
            in_thread=lambda f, *a, **kw: defer.succeed(f(*a, **kw)),
        )

    def test_prepared_trace_sets_the_hop_limit_of_v4_primers_only(self) -> None:
        """A trace toward the first public endpoint (private ones are skipped) sets the
        IPv4 hop limit; IPv6 primers keep the default (no NAT to leave)."""
        self.primer.prepare([None, ("192.168.1.5", 51820), ("198.51.100.2", 51820)])
        self.assertEqual(self.traces, [("198.51.100.2", 51820)])
        self.primer(("203.0.7.2", 4000))
        self.primer(("2001:db8:7::2", 51820))
        self.assertEqual(self.sent, [(("203.0.7.2", 4000), 3), (("2001:db8:7::2", 51820), 2)])
        self.assertEqual(self.primer.status()["primer_ttl"], 3)

    def test_traced_again_only_after_retrace(self) -> None:
        """Priming traces at most once per RETRACE; a failed or silent trace keeps the
        default."""
        self.answer = ["192.168.6.1", None]
        self.primer(("203.0.7.2", 4000))
        self.primer(("203.0.8.2", 4000))
        self.assertEqual(len(self.traces), 1)
        self.assertEqual(self.primer.ttl, PRIME_TTL)
        self.clock.advance(RETRACE)
        self.answer = ["192.168.6.1", "203.0.6.1"]
        self.primer(("203.0.8.2", 4000))
        self.assertEqual(len(self.traces), 2)
        self.assertEqual(self.primer.ttl, 2)
