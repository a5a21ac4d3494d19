"""How a key is written for people: standard base64 as ``wg`` prints it, or its prefix.

One helper for every status field, log line and generated config line, so the same key reads the
same everywhere. Only public keys go through here: private keys are written by
:func:`meshguard.codecs.keys.key_to_base64` (which also checks the length) and never logged.
"""

from __future__ import annotations

import base64


def key_text(key: bytes) -> str:
    """Standard base64, as ``wg show`` and config files write a key."""
    return base64.b64encode(key).decode("ascii")


def short_key(key: bytes) -> str:
    """The first 8 base64 characters and "...": enough to tell peers apart in a log line."""
    return key_text(key)[:8] + "..."
