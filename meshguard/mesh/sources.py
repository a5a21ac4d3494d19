"""Endpoint sources: where the candidate endpoints of a learned member come from.

:class:`~meshguard.mesh.paths.Paths` punches toward every candidate a source names, LAN ones
first. The built-in sources read what introducers report (the endpoint each introducer observes
for the member, the member's own LAN addresses, and the public endpoints its gateway maps to it);
third-party sources are Twisted plugins providing :class:`meshguard.plugins.IEndpointSource`
(docs/plugins.md). A source is asked whenever an introducer's member list arrives (on every
change, and at least every ``RESUBSCRIBE`` seconds), so it must answer at once from what it
already knows: no blocking I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshguard.core.interfaces import Endpoint
from meshguard.mesh.agent import parse_endpoint
from meshguard.mesh.members import MAX_LOCAL, MemberInfo

#: Direct candidates kept per member from all sources together (LAN ones: ``MAX_LOCAL``), so a
#: source cannot make us ping an unbounded list.
MAX_CANDIDATES = 16


@dataclass(frozen=True)
class Candidate:
    """An endpoint worth a PATH_PING; ``lan`` ranks a path found through it above a direct one.

    ``kind`` names what kind of path it gives (``"mapped"``: the member's gateway maps it by
    PCP, NAT-PMP or UPnP): a path proven to it is reported to the path arbiter as that kind, so
    status says ``mapped`` rather than ``direct``. None: the arbiter's plain kind (``direct``,
    ``direct-v6`` or, with ``lan``, ``lan``). :class:`~meshguard.mesh.paths.Paths` pings every
    non-LAN candidate alike."""

    endpoint: Endpoint
    lan: bool = False
    kind: str | None = None


class EndpointSource(Protocol):
    """The shape :class:`meshguard.plugins.IEndpointSource` gives inside the mesh core."""

    name: str

    def candidates(
        self, key: bytes, reports: Mapping[bytes, MemberInfo]
    ) -> Iterable[Candidate]: ...


class IntroducerObserved:
    """The member's endpoint as each of its introducers sees it (its public NAT mapping)."""

    name = "introducer"

    def candidates(self, key: bytes, reports: Mapping[bytes, MemberInfo]) -> Iterable[Candidate]:
        for introducer in sorted(reports):
            observed = reports[introducer].observed
            if observed is not None:
                yield Candidate(observed)


class LanAddresses:
    """The member's own LAN addresses with its port, as it reported them to its introducers."""

    name = "lan"

    def candidates(self, key: bytes, reports: Mapping[bytes, MemberInfo]) -> Iterable[Candidate]:
        for introducer in sorted(reports):
            for endpoint in reports[introducer].local[:MAX_LOCAL]:
                yield Candidate(endpoint, lan=True)


class PortMapped:
    """The public endpoints the member's gateway maps to its port (it asked by PCP, NAT-PMP or
    UPnP-IGD and reported the result in its HELLO): reachable even behind a NAT that maps
    per destination."""

    name = "mapped"

    def candidates(self, key: bytes, reports: Mapping[bytes, MemberInfo]) -> Iterable[Candidate]:
        for introducer in sorted(reports):
            for endpoint in reports[introducer].mapped:
                yield Candidate(endpoint, kind="mapped")


#: What :class:`~meshguard.mesh.paths.Paths` uses when nobody passes sources (the node passes
#: the plugins it finds, which include these same three).
DEFAULT_SOURCES: tuple[EndpointSource, ...] = (LanAddresses(), IntroducerObserved(), PortMapped())


def gather(
    sources: Sequence[EndpointSource], key: bytes, reports: Mapping[bytes, MemberInfo]
) -> tuple[list[Endpoint], list[Endpoint], int]:
    """``(lan, direct, failures)``: every source's candidates, deduplicated in source order."""
    lan, direct, _kinds, failures = gather_kinds(sources, key, reports)
    return lan, direct, failures


def gather_kinds(
    sources: Sequence[EndpointSource], key: bytes, reports: Mapping[bytes, MemberInfo]
) -> tuple[list[Endpoint], list[Endpoint], dict[Endpoint, str], int]:
    """``(lan, direct, kinds, failures)``: every source's candidates, deduplicated in source
    order, and the kind a source named for each endpoint (the first source to name one wins;
    an endpoint one source observes and another maps is ``mapped``, since the mapping is what
    lets anyone reach it).

    A source that raises or answers garbage is skipped and counted: a plugin's bug never stops
    the path logic.
    """
    lan: list[Endpoint] = []
    direct: list[Endpoint] = []
    kinds: dict[Endpoint, str] = {}
    failures = 0
    for source in sources:
        try:
            found = list(source.candidates(key, reports))
        except Exception:
            failures += 1
            continue
        for candidate in found:
            if not isinstance(candidate, Candidate) or not _is_endpoint(candidate.endpoint):
                failures += 1
                continue
            endpoint = candidate.endpoint
            bucket, limit = (lan, MAX_LOCAL) if candidate.lan else (direct, MAX_CANDIDATES)
            if endpoint not in lan and endpoint not in direct:
                if len(bucket) >= limit:
                    continue
                bucket.append(endpoint)
            if isinstance(candidate.kind, str) and endpoint not in kinds:
                kinds[endpoint] = candidate.kind
    return lan, direct, kinds, failures


def _is_endpoint(value: object) -> bool:
    """A numeric ``(address, port)``: names are for adapters to resolve, never for the core."""
    if not isinstance(value, tuple) or len(value) != 2:
        return False
    return parse_endpoint(list(value)) is not None
