"""Fuzz target: the WireGuard message parser (meshguard/core/messages.py)."""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.core.messages import mac_offsets, parse_message


def test_one_input(data: bytes) -> None:
    message = parse_message(data)
    if message is not None:
        # Whatever parses writes back to the same bytes.
        assert message.to_bytes() == data, (message, data)
    offsets = mac_offsets(data)
    if offsets is not None:
        assert 0 < offsets[0] < offsets[1] <= len(data)


def seeds() -> list[bytes]:
    import fuzz_cookie
    import fuzz_responder

    return [d[1:] for d in fuzz_responder.seeds()[::4]] + fuzz_cookie.seeds()


if __name__ == "__main__":
    harness.main(test_one_input)
