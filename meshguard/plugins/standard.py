"""meshguard's built-in plugins: the endpoint sources and the path logger every node uses."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from meshguard.mesh import sources
from meshguard.mesh.member_names import describe
from meshguard.mesh.members import Network
from meshguard.plugins import IEndpointSource, IPathObserver

log = Logger()


@implementer(IPlugin, IEndpointSource)
class LanAddresses(sources.LanAddresses):
    __doc__ = sources.LanAddresses.__doc__


@implementer(IPlugin, IEndpointSource)
class IntroducerObserved(sources.IntroducerObserved):
    __doc__ = sources.IntroducerObserved.__doc__


@implementer(IPlugin, IEndpointSource)
class PortMapped(sources.PortMapped):
    __doc__ = sources.PortMapped.__doc__


@implementer(IPlugin, IPathObserver)
class PathLog:
    """Logs every change of path to a learned member (one line per change, never per packet)."""

    def member_changed(self, public_key: bytes, allowed_ips: Sequence[Network] | None) -> None:
        pass

    def path_changed(self, public_key: bytes, old: str, new: str, detail: str | None) -> None:
        log.info(
            "path to member {member}: {old} -> {new}{detail}",
            member=describe(public_key),
            old=old,
            new=new,
            detail=f" ({detail})" if detail else "",
        )

    def rtt_measured(self, public_key: bytes, rtt: float) -> None:
        pass


# LAN first: a LAN candidate also reported as observed still counts as LAN.
lan = LanAddresses()
introducer = IntroducerObserved()
mapped = PortMapped()
path_log = PathLog()
