"""Member names for logs and path observers, which hear only WireGuard keys.

A node of a mesh with an authority registers its roster's ``name_of`` here while it runs
(:mod:`meshguard.app.enrollment`); :func:`describe` then shows ``alice (AbCdEf12...)`` instead of a
bare key prefix. Without a registered roster it shows the key prefix, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from meshguard.core.keytext import short_key

NameOf = Callable[[bytes], "str | None"]

_lookups: list[NameOf] = []


def register(name_of: NameOf) -> None:
    _lookups.append(name_of)


def unregister(name_of: NameOf) -> None:
    if name_of in _lookups:
        _lookups.remove(name_of)


def name_of(key: bytes) -> str | None:
    for lookup in _lookups:
        name = lookup(key)
        if name is not None:
            return name
    return None


def describe(key: bytes) -> str:
    """A member as logs show it: its name and key prefix, or the key prefix alone."""
    short = short_key(key)
    name = name_of(key)
    return f"{name} ({short})" if name is not None else short
