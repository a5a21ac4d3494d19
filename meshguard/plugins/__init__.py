"""Extension points of a meshguard node, found with ``twisted.plugin.getPlugins``.

A plugin is a module in a ``meshguard/plugins/`` directory anywhere on ``sys.path`` (without an
``__init__.py`` of its own: this package extends its ``__path__`` with every such directory, as
``twisted.plugins`` does) holding module-level objects that provide ``twisted.plugin.IPlugin``
and one of the interfaces below. meshguard's own endpoint sources and path logger are plugins of
this package too (:mod:`meshguard.plugins.standard`), so built-in and third-party code go
through the same seams. docs/plugins.md has complete third-party examples.

Plugins are called on the reactor thread from inside the mesh layer: they must return at once
(no blocking I/O) and should not raise; a call that raises is counted and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from twisted.logger import Logger
from twisted.plugin import getPlugins, pluginPackagePaths
from zope.interface import Attribute, Interface

from meshguard.mesh.keepalive import KeepaliveFacts
from meshguard.mesh.members import MemberInfo, Network
from meshguard.mesh.sources import Candidate

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined,no-untyped-call]

__all__ = [
    "Candidate",
    "IEndpointSource",
    "IKeepalivePolicy",
    "IPathObserver",
    "KeepaliveFacts",
    "MemberInfo",
    "load",
]

log = Logger()

#: The module holding the built-in plugins: they come first, in a fixed order.
STANDARD = __name__ + ".standard"


class IEndpointSource(Interface):
    """Names candidate endpoints of a learned member, for hole punching to try.

    meshguard pings every candidate over the member's WireGuard session and moves to the best
    one that answers (LAN > direct > relayed), so a wrong candidate costs a few pings, never
    security. Built in: ``lan`` (the member's own LAN addresses) and ``introducer`` (its
    endpoint as the introducers observe it).
    """

    name = Attribute("A short name for ``meshguard status`` and logs, e.g. ``lan``.")

    def candidates(key: bytes, reports: Mapping[bytes, MemberInfo]) -> Iterable[Candidate]:  # noqa: N805
        """Candidate endpoints (numeric address and port) of the member whose public key is
        ``key``; ``reports`` maps each introducer's key to what it says about the member.

        Asked whenever an introducer's member list arrives (every change, and at least every
        minute). Return at once from what is already known: refresh slow data (files, DNS)
        elsewhere, e.g. with a ``LoopingCall``.
        """


class IPathObserver(Interface):
    """Told about learned members and the paths to them (for metrics, logs or routes).

    Built in: a logger of path changes; the node's route keeper (``Table = auto``) uses the same
    interface.
    """

    def member_changed(public_key: bytes, allowed_ips: Sequence[Network] | None) -> None:  # noqa: N805
        """A learned member was added or its introducers' list was re-read (``allowed_ips``:
        its AllowedIPs as installed), or it is gone (``None``)."""

    def path_changed(public_key: bytes, old: str, new: str, detail: str | None) -> None:  # noqa: N805
        """The path to a learned member changed: kinds are ``lan``, ``direct``, ``relayed`` and
        ``none``; ``detail`` is ``host:port`` for a direct path, the relay's key for a relay."""

    def rtt_measured(public_key: bytes, rtt: float) -> None:  # noqa: N805
        """A path check on the chosen direct path measured this round-trip time (seconds)."""


class IKeepalivePolicy(Interface):
    """Overrides the interval ``PersistentKeepalive = auto`` chooses for a peer.

    Asked about every ``auto`` peer each time auto decides: at config load and reload, on each
    new session with a meshguard peer (each rekey, about every 2 minutes while packets flow), on
    each report of our public endpoint, and when a lifetime measurement ends or a mapping is seen
    to expire. An answer that depends on outside state takes effect at the next decision.
    Peers with a number in the config or set with ``wg`` are never asked about. No built-in
    plugin provides this: auto's own choice is the default.
    """

    name = Attribute("A short name, shown in the reason ``meshguard status`` gives.")

    def interval(public_key: bytes, chosen: int, facts: KeepaliveFacts) -> int | None:  # noqa: N805
        """The interval to use for the peer whose public key is ``public_key`` instead of
        ``chosen`` (auto's choice, in seconds, 0: off), or ``None`` to leave it to the next
        plugin and finally to auto.

        The first plugin (built-in first, then by module name) to answer a number wins; later
        ones are not asked. 0 turns the peer's keepalive off (if that peer was carrying the
        keepalive for an endpoint-independent NAT, another peer takes over); other numbers are
        clamped to auto's bounds, 2..300 s. ``facts`` (:class:`KeepaliveFacts`) is what auto
        knows: NAT, mapping, measured lifetime, its reason, whether this peer is the carrier.
        Anything else (an exception, a negative number, a non-integer) is counted in
        ``meshguard status`` as ``keepalive plugin errors`` and ignored.
        """


T = TypeVar("T", bound=Interface)


def load(interface: type[T]) -> list[T]:
    """Every plugin providing ``interface``: the built-in ones first, then the others by module.

    Directories added to ``sys.path`` since this package was imported are searched too.
    """
    package = sys.modules[__name__]
    for path in pluginPackagePaths(__name__):  # type: ignore[no-untyped-call]
        if path not in package.__path__:
            package.__path__.append(path)
    found: list[T] = []
    try:
        found = list(getPlugins(interface, package))
    except Exception:
        log.failure("cannot load meshguard plugins")
    return sorted(found, key=lambda p: (type(p).__module__ != STANDARD, type(p).__module__))
