"""Fuzz target: TLS relay frames and their authentication payloads (meshguard/relay/frames.py,
auth.py) and member relay bodies (meshguard/mesh/forwarding.py)."""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.mesh.forwarding import parse_relay_body
    from meshguard.relay import frames
    from meshguard.relay.auth import Answer, Challenge


def test_one_input(data: bytes) -> None:
    decoder = frames.FrameDecoder(max_payload=4096)
    got: list[tuple[int, bytes]] = []
    try:
        # Fed in two pieces: a frame split across reads must come out the same.
        cut = data[0] % (len(data) + 1) if data else 0
        got += decoder.feed(data[:cut])
        got += decoder.feed(data[cut:])
    except frames.FrameError:
        pass
    for kind, payload in got:
        assert frames.encode(kind, payload)[4:] == payload
    Challenge.decode(data)
    Answer.decode(data)
    parse_relay_body(data)


def seeds() -> list[bytes]:
    out = []
    for kind in sorted(frames.KNOWN):
        out.append(b"\x05" + frames.encode(kind, b"payload") + frames.encode(kind))
    return out


if __name__ == "__main__":
    harness.main(test_one_input)
