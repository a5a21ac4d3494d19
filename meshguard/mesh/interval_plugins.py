"""Keepalive plugins: what they are told and how their answers override auto's interval.

A keepalive policy plugin (:class:`meshguard.plugins.IKeepalivePolicy`, docs/plugins.md; the node
loads them) is asked about every ``auto`` peer each time auto chooses its interval, with that
choice and what auto knows (:class:`KeepaliveFacts`). The first answer that is not ``None`` wins,
within auto's bounds; 0 turns the peer's keepalive off. A plugin that raises or answers anything
else is counted and skipped: a plugin's bug never breaks the keepalive schedule.
:class:`IntervalPlugins` does the asking; the choice it starts from, and what is done with the
result, stay with the keepalive policy (:mod:`meshguard.mesh.keepalive`). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Decision:
    """An interval auto chose for a peer (0: off), with the reason status shows."""

    interval: int
    reason: str
    #: The plugin that overrode auto's choice, and that choice.
    plugin: str | None = None
    auto: Decision | None = None


@dataclass(frozen=True)
class KeepaliveFacts:
    """What auto knows when it chooses a peer's interval, for keepalive plugins to read."""

    #: Whether the path to this peer is translated (``None``: no meshguard peer said yet).
    natted: bool | None
    #: ``endpoint-independent``, ``endpoint-dependent``, ``none`` or ``unknown``.
    mapping: str
    #: Seconds an idle mapping is known to survive; ``None`` until measured.
    lifetime: float | None
    #: The NAT kept the longest probe: the lifetime may be longer still.
    lifetime_at_least: bool
    #: Why auto chose its interval (the text ``meshguard status`` shows).
    reason: str
    #: This peer carries the keepalive that keeps an endpoint-independent mapping for all.
    carrier: bool
    #: The interval in force for this peer before this decision (0: off).
    current: int
    #: Auto halved its interval after a mapping expired (until the lifetime is re-measured).
    expired: bool
    #: The peer runs meshguard (otherwise it is a stock WireGuard peer).
    meshguard: bool


class IntervalOverride(Protocol):
    """The shape :class:`meshguard.plugins.IKeepalivePolicy` gives inside the mesh core."""

    name: str

    def interval(self, public_key: bytes, chosen: int, facts: KeepaliveFacts) -> int | None: ...


def _describe(value: object) -> str:
    """``repr(value)`` for status, short, even when the plugin's object cannot give one."""
    try:
        return repr(value)[:100]
    except Exception:
        return f"a {type(value).__name__}"


def override_name(override: object) -> str:
    """A plugin's ``name`` for status, or its class's name when it has no usable one."""
    try:
        name = getattr(override, "name", None)
    except Exception:
        name = None
    return name if isinstance(name, str) and name else type(override).__name__


class IntervalPlugins:
    """Asks the keepalive plugins, in order, about auto's choice for one peer."""

    def __init__(self, overrides: list[IntervalOverride], bounds: tuple[int, int]) -> None:
        """``overrides`` is the policy's list (the node appends the plugins it loads to it);
        ``bounds`` are auto's (a number outside is clamped)."""
        self.overrides = overrides
        self.bounds = bounds
        #: Plugin calls that raised or answered garbage (ignored), and the latest such call.
        self.errors = 0
        self.error = ""

    def names(self) -> list[str]:
        return [override_name(o) for o in self.overrides]

    def consult(
        self, key: bytes, chosen: Decision, facts: Callable[[], KeepaliveFacts]
    ) -> Decision:
        """Auto's choice, or the first plugin answer that is not ``None``, within the bounds.

        0 (off) is taken as given: an operator may turn a peer's keepalive off in the config
        too. Any other number is clamped to auto's own bounds. A plugin that raises or answers
        anything but ``None`` or an ``int`` >= 0 is counted and skipped.
        """
        if not self.overrides:
            return chosen
        told = facts()
        low, high = self.bounds
        for override in self.overrides:
            name = override_name(override)
            try:
                answer = override.interval(key, chosen.interval, told)
            except Exception as e:
                self._failed(name, f"raised {_describe(e)}")
                continue
            if answer is None:
                continue
            if type(answer) is not int or answer < 0:  # not bool, nor a subclass's surprises
                self._failed(name, f"answered {_describe(answer)}")
                continue
            interval = 0 if answer == 0 else max(low, min(high, answer))
            source = f"plugin {name}"
            if interval != answer:
                source += f", {answer} clamped to {interval}"
            reason = f"{source}; auto: {chosen.interval or 'off'}, {chosen.reason}"
            return Decision(interval, reason, plugin=name, auto=chosen)
        return chosen

    def _failed(self, name: str, what: str) -> None:
        self.errors += 1
        self.error = f"{name} {what}"[:200]
