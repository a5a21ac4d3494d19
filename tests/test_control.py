"""The mesh control channel inside the tunnel: framing, the handshake mark, and who gets it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core import control
from meshguard.core.crypto import tai64n
from tests.test_device import Pair


class FramingTests(SynchronousTestCase):
    @given(st.integers(0, 255), st.binary(max_size=2000), st.binary(max_size=15))
    def test_round_trip_with_padding(self, kind: int, body: bytes, padding: bytes) -> None:
        """A control message survives the transport's zero padding."""
        encoded = control.encode(kind, body)
        self.assertEqual(encoded[0] >> 4, 15)
        self.assertEqual(control.decode(encoded + bytes(len(padding))), (kind, body))

    @given(st.binary(max_size=300))
    def test_garbage_never_raises(self, data: bytes) -> None:
        result = control.decode(data)
        if result is not None:
            kind, body = result
            self.assertTrue(data.startswith(control.encode(kind, body)))

    def test_mark_keeps_order(self) -> None:
        """The mark does not change how timestamps compare, and is recognised."""
        earlier, later = tai64n(1_700_000_000.0), tai64n(1_700_000_000.5)
        self.assertFalse(control.is_marked(earlier))
        self.assertTrue(control.is_marked(control.mark_timestamp(earlier)))
        self.assertLess(control.mark_timestamp(earlier), control.mark_timestamp(later))
        self.assertLess(control.mark_timestamp(earlier), later)
        nanoseconds = int.from_bytes(control.mark_timestamp(tai64n(1.99999))[8:], "big")
        self.assertLess(nanoseconds, 1_000_000_000)


class ChannelTests(SynchronousTestCase):
    def mesh_pair(self, a_mesh: bool = True, b_mesh: bool = True) -> tuple[Pair, list[tuple]]:
        pair = Pair()
        received: list[tuple] = []
        for node, mesh in ((pair.a, a_mesh), (pair.b, b_mesh)):
            node.device.mesh = mesh
            name = "a" if node is pair.a else "b"
            node.device.set_control_handler(
                lambda peer, kind, body, now, name=name: received.append((name, kind, body))
            )
        return pair, received

    def test_mark_makes_responder_know_initiator(self) -> None:
        pair, received = self.mesh_pair()
        pair.a_to_b()
        self.assertTrue(pair.peer_of_b.is_meshguard)
        self.assertFalse(pair.peer_of_a.is_meshguard)
        self.assertTrue(pair.b.device.send_control(pair.peer_of_b, 7, b"hello", pair.net.now))
        pair.net.flush()
        self.assertEqual(received, [("a", 7, b"hello")])
        self.assertTrue(pair.peer_of_a.is_meshguard)
        self.assertTrue(pair.a.device.send_control(pair.peer_of_a, 8, b"back", pair.net.now))
        pair.net.flush()
        self.assertEqual(received[-1], ("b", 8, b"back"))

    def test_stock_peer_never_gets_control(self) -> None:
        """A meshguard node facing a stock WireGuard peer sends it no control message."""
        pair, _received = self.mesh_pair(a_mesh=True, b_mesh=False)
        pair.a_to_b()
        pair.b_to_a()
        self.assertFalse(pair.peer_of_a.is_meshguard)
        self.assertFalse(pair.a.device.send_control(pair.peer_of_a, 1, b"x", pair.net.now))
        pair2, _ = self.mesh_pair(a_mesh=False, b_mesh=True)
        pair2.a_to_b()
        self.assertFalse(pair2.peer_of_b.is_meshguard)
        self.assertFalse(pair2.b.device.send_control(pair2.peer_of_b, 1, b"x", pair2.net.now))

    def test_control_from_peer_is_not_written_to_tun(self) -> None:
        pair, _received = self.mesh_pair()
        pair.a_to_b()
        written = list(pair.a.written)
        pair.b.device.send_control(pair.peer_of_b, 3, b"z" * 100, pair.net.now)
        pair.net.flush()
        self.assertEqual(pair.a.written, written)

    def test_control_to_non_mesh_device_dropped(self) -> None:
        """A device without the mesh layer drops control plaintexts like any non-IP packet."""
        pair, received = self.mesh_pair()
        pair.a_to_b()
        pair.a.device.mesh = False
        pair.b.device.send_control(pair.peer_of_b, 3, b"z", pair.net.now)
        pair.net.flush()
        self.assertEqual(received, [])
        self.assertEqual(pair.a.device.counters.bad_inner_packet, 1)
