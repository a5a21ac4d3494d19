"""Fuzz target: mesh control messages as an authenticated meshguard peer sends them (every
feature of the mesh layer: members, paths, relays, keepalive, path MTU). Inside the tunnel
they are authenticated, but a member can still send anything: nothing may raise."""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.core import control
    from tests.meshsim import MeshSim

_SIM = MeshSim(seed=14)
_MEMBER = _SIM.add_member(None, "203.0.113.7")
_SIM.start()
_SIM.run(5)
_PEER = _SIM.introducer.node.device.peers[_MEMBER.public_key]
_BACK = _MEMBER.node.device.peers[_SIM.introducer.public_key]
assert _PEER.is_meshguard, "the simulated member did not handshake"


def test_one_input(data: bytes) -> None:
    """``data[0]``: the control kind; the rest its body. Delivered to the introducer as from
    the member, then to the member as from the introducer, then time moves on."""
    if not data:
        return
    kind, body = data[0], data[1:]
    now = _SIM.net.now
    _SIM.introducer.agent.control_received(_PEER, kind, body, now)
    _MEMBER.agent.control_received(_BACK, kind, body, now)
    _SIM.net.queue.clear()
    _SIM.run(0.05)
    decoded = control.decode(control.encode(kind & 0x0F, body))
    assert decoded is None or decoded[1] == body


def seeds() -> list[bytes]:
    """The control messages the simulated pair exchanged (captured from a second simulation)."""
    sim = MeshSim(seed=14)
    member = sim.add_member(None, "203.0.113.7")
    captured: list[bytes] = []
    for node in (sim.introducer, member):
        original = node.agent.control_received

        def record(peer: object, kind: int, body: bytes, now: float, original=original) -> None:  # type: ignore[no-untyped-def]
            captured.append(bytes([kind]) + body)
            original(peer, kind, body, now)

        node.node.device._control_handler = None  # replace the agent's dispatch with a recorder
        node.node.device.set_control_handler(record)
    sim.start()
    sim.run(30)
    return sorted(set(captured))[:40]


if __name__ == "__main__":
    harness.main(test_one_input)
