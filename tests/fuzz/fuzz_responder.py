"""Fuzz target: a device receiving arbitrary datagrams (the handshake responder, cookie replies
under load, transport for live and dead indices). Nothing may raise, and nothing that does not
authenticate may change a peer's state."""

from __future__ import annotations

import ipaddress
import random

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.core.crypto import generate_private_key, public_key
    from meshguard.testing.memory import MemoryNetwork
    from tests.packets import ipv4

A_EP = ("192.0.2.1", 51820)
B_EP = ("192.0.2.2", 51820)
FLOODER = ("192.0.2.9", 4444)


def _pair(under_load_threshold: int) -> tuple[MemoryNetwork, object, object]:
    rng = random.Random(14)
    net = MemoryNetwork()
    a = net.add(A_EP, rng.randbytes, under_load_threshold=under_load_threshold)
    b = net.add(B_EP, rng.randbytes, under_load_threshold=under_load_threshold)
    a_key, b_key = generate_private_key(rng.randbytes), generate_private_key(rng.randbytes)
    a.device.set_private_key(a_key, net.now)
    b.device.set_private_key(b_key, net.now)
    pa = a.device.add_peer(public_key(b_key))
    pb = b.device.add_peer(public_key(a_key))
    assert pa is not None and pb is not None
    a.device.set_endpoint(pa, B_EP)
    a.device.replace_allowed_ips(pa, [ipaddress.ip_network("10.0.0.2/32")])
    b.device.replace_allowed_ips(pb, [ipaddress.ip_network("10.0.0.1/32")])
    a.device.up(net.now)
    b.device.up(net.now)
    a.device.packet_from_tun(ipv4("10.0.0.1", "10.0.0.2", b"hello"), net.now)
    a.sent.append((ipv4("10.0.0.1", "10.0.0.2", b"x"), B_EP))  # an odd one for the corpus
    net.flush()  # a session A -> B
    return net, a, b


NETS = [_pair(128), _pair(0)]  # normal, and always under load (cookies demanded)


def test_one_input(data: bytes) -> None:
    """``data[0]``: bit 0 picks the device (normal or always under load), bit 1 the source (a
    stranger or the peer's endpoint), bits 2-7 how far time moves (0-6.3 s); the rest is the
    datagram."""
    if not data:
        return
    control, payload = data[0], data[1:]
    net, _a, b = NETS[control & 1]
    device = b.device  # type: ignore[attr-defined]
    net.now += (control >> 2) / 10
    source = A_EP if control & 2 else FLOODER
    peer = next(iter(device.peers.values()))
    before = (peer.endpoint, peer.rx_bytes, peer.last_handshake_time, peer.latest_timestamp)
    device.datagram_received(payload, source, net.now)
    after = (peer.endpoint, peer.rx_bytes, peer.last_handshake_time, peer.latest_timestamp)
    if source == FLOODER:
        # Only an authenticated datagram moves the peer; the fuzzer cannot forge one.
        assert before == after, (before, after)
    device.run_timers(net.now)
    b.sent.clear()  # type: ignore[attr-defined]
    net.queue.clear()


def seeds() -> list[bytes]:
    """What A sends B in a fresh pair: its initiation and a transport message, valid inputs the
    fuzzer mutates from (with every control byte's bits 0-1)."""
    _net, a, _b = _pair(128)
    sent = [d for d, _ in a.sent]  # type: ignore[attr-defined]
    return [bytes([c]) + d for d in sent for c in (0, 1, 2, 3)]


if __name__ == "__main__":
    harness.main(test_one_input)
