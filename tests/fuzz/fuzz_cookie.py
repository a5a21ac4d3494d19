"""Fuzz target: cookie replies and mac1/mac2 checks (meshguard/core/cookie.py)."""

from __future__ import annotations

import random

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.core.constants import COOKIE_REPLY_SIZE
    from meshguard.core.cookie import CookieChecker, CookieGenerator
    from meshguard.core.crypto import generate_private_key, public_key
    from meshguard.core.messages import mac_offsets

_rng = random.Random(14)
_KEY = public_key(generate_private_key(_rng.randbytes))
CHECKER = CookieChecker(_KEY, _rng.randbytes)
GENERATOR = CookieGenerator(_KEY)
INITIATION = b"\x01\0\0\0" + bytes(112) + bytes(32)
NOW = 1_700_000_000.0


def test_one_input(data: bytes) -> None:
    # The initiator side: any reply is refused or accepted, never raises.
    GENERATOR.add_macs(INITIATION, NOW)
    accepted = GENERATOR.consume_reply(data, NOW)
    assert not accepted or len(data) == COOKIE_REPLY_SIZE
    GENERATOR.add_macs(INITIATION, NOW)
    # The responder side: mac checks on anything, and a reply to whatever has mac offsets.
    CHECKER.check_mac1(data)
    CHECKER.check_mac2(data, b"\x7f\0\0\1\0\1", NOW)
    if mac_offsets(data) is not None:
        reply = CHECKER.create_reply(data, 1, b"\x7f\0\0\1\0\1", NOW)
        assert len(reply) == COOKIE_REPLY_SIZE


def seeds() -> list[bytes]:
    checker = CookieChecker(_KEY, random.Random(1).randbytes)
    message = GENERATOR.add_macs(INITIATION, NOW)
    return [message, checker.create_reply(message, 1, b"\x7f\0\0\1\0\1", NOW), bytes(64)]


if __name__ == "__main__":
    harness.main(test_one_input)
