"""Prometheus metrics (``MetricsListen = HOST:PORT``): the status document in text format.

A scrape reads the same status document ``meshguard status`` shows, on the reactor thread (the
node's state is never read from another thread), and turns it into metric families through
``prometheus_client``. Where the widely used WireGuard exporter (prometheus_wireguard_exporter)
has a metric, the name and labels are its own, so dashboards built for it work unchanged; the
mesh's own facts are ``meshguard_*``. docs/operations.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from meshguard.adapters.path_view import KINDS, Network, path_view, peer_label

log = Logger()

Snapshot = Callable[[], dict[str, Any]]

#: Drop reasons with an operator's name; the device's other counters keep their own names.
DROP_REASONS: Mapping[str, str] = {
    "malformed": "junk",
    "replayed": "replay",
    "unknown_index": "unknown_receiver",
    "cookie_sent": "under_load_cookie",
}

_WG_LABELS = ["interface", "public_key", "allowed_ips", "friendly_name"]
_PEER_LABELS = ["interface", "peer", "public_key"]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class StatusCollector:
    """A ``prometheus_client`` collector over a node's status document."""

    def __init__(
        self, snapshot: Snapshot, local_networks: Callable[[], Iterable[Network]] = list
    ) -> None:
        self.snapshot = snapshot
        self.local_networks = local_networks

    def describe(self) -> list[Metric]:
        return []  # families depend on the document; never collect at registration

    def collect(self) -> Iterator[Metric]:
        document = self.snapshot()
        interface = str(document.get("interface") or "")
        peers = [p for p in document.get("peers", []) if isinstance(p, dict)]
        networks = list(self.local_networks())
        yield from self._wireguard(interface, peers)
        yield from self._peers(interface, peers, networks)
        yield from self._node(interface, document, peers, networks)

    def _wireguard(self, interface: str, peers: list[dict[str, Any]]) -> Iterator[Metric]:
        """The exporter's three families, labelled as it labels them (friendly_name is the
        member name when the mesh knows one, else the key)."""
        sent = CounterMetricFamily(
            "wireguard_sent_bytes_total", "Bytes sent to the peer", labels=_WG_LABELS
        )
        received = CounterMetricFamily(
            "wireguard_received_bytes_total", "Bytes received from the peer", labels=_WG_LABELS
        )
        handshake = GaugeMetricFamily(
            "wireguard_latest_handshake_seconds",
            "UNIX time of the latest handshake with the peer (0: never)",
            labels=_WG_LABELS,
        )
        for peer in peers:
            labels = [
                interface,
                str(peer.get("public_key", "")),
                ",".join(str(n) for n in peer.get("allowed_ips") or []),
                peer_label(peer),
            ]
            sent.add_metric(labels, _number(peer.get("tx_bytes")) or 0.0)
            received.add_metric(labels, _number(peer.get("rx_bytes")) or 0.0)
            handshake.add_metric(labels, float(int(_number(peer.get("last_handshake")) or 0)))
        yield from (sent, received, handshake)

    def _peers(
        self, interface: str, peers: list[dict[str, Any]], networks: list[Network]
    ) -> Iterator[Metric]:
        path = GaugeMetricFamily(
            "meshguard_peer_path",
            "1 for the kind of path the peer is reached by now (via: the relay)",
            labels=[*_PEER_LABELS, "kind", "via"],
        )
        direct = GaugeMetricFamily(
            "meshguard_peer_direct",
            "1 when the peer is reached on a direct UDP path",
            labels=_PEER_LABELS,
        )
        rtt = GaugeMetricFamily(
            "meshguard_peer_rtt_seconds", "Round-trip time last measured", labels=_PEER_LABELS
        )
        mtu = GaugeMetricFamily(
            "meshguard_peer_path_mtu_bytes",
            "Tunnel MTU path MTU discovery found toward the peer",
            labels=_PEER_LABELS,
        )
        keepalive = GaugeMetricFamily(
            "meshguard_peer_keepalive_interval_seconds",
            "Persistent keepalive interval in force (0: off)",
            labels=_PEER_LABELS,
        )
        for peer in peers:
            labels = [interface, peer_label(peer), str(peer.get("public_key", ""))]
            view = path_view(peer, networks)
            path.add_metric([*labels, view.kind, view.via or ""], 1.0)
            direct.add_metric(labels, 1.0 if view.direct else 0.0)
            rtt_ms = _number(peer.get("rtt_ms"))
            if rtt_ms is not None:
                rtt.add_metric(labels, rtt_ms / 1000.0)
            path_mtu = _number(peer.get("path_mtu"))
            if path_mtu is not None:
                mtu.add_metric(labels, path_mtu)
            interval = peer.get("keepalive_interval", peer.get("persistent_keepalive"))
            keepalive.add_metric(labels, _number(interval) or 0.0)
        yield from (path, direct, rtt, mtu, keepalive)

    def _node(
        self,
        interface: str,
        document: dict[str, Any],
        peers: list[dict[str, Any]],
        networks: list[Network],
    ) -> Iterator[Metric]:
        node = document.get("node") if isinstance(document.get("node"), dict) else {}
        assert isinstance(node, dict)
        counts = GaugeMetricFamily(
            "meshguard_peers",
            "Peers by the kind of path they are reached by",
            labels=["interface", "kind"],
        )
        by_kind = {kind: 0 for kind in KINDS}
        for peer in peers:
            by_kind[path_view(peer, networks).kind] += 1
        for kind, count in by_kind.items():
            counts.add_metric([interface, kind], float(count))
        yield counts

        nat = GaugeMetricFamily(
            "meshguard_nat_info",
            "What the node knows of its NAT: behind one (yes/no/unknown), mapping and filtering",
            labels=["interface", "nat", "mapping", "filtering"],
        )
        nat.add_metric(
            [
                interface,
                str(node.get("nat", "unknown")),
                str(node.get("nat_mapping", "unknown")),
                str(node.get("nat_filtering", "unknown")).split(" (", 1)[0],
            ],
            1.0,
        )
        yield nat
        lifetime = _number(node.get("nat_lifetime"))
        if lifetime is not None:
            measured = GaugeMetricFamily(
                "meshguard_nat_mapping_lifetime_seconds",
                "How long the NAT keeps an idle UDP mapping, as measured",
                labels=["interface"],
            )
            measured.add_metric([interface], lifetime)
            yield measured

        forwarded = CounterMetricFamily(
            "meshguard_relay_forwarded_bytes_total",
            "Bytes this node forwarded for other members (member: UDP relaying, tls: TLS relay)",
            labels=["interface", "relay"],
        )
        forwarded.add_metric(
            [interface, "member"], _number(node.get("relay_forwarded_bytes")) or 0.0
        )
        server = node.get("relay_server")
        if isinstance(server, dict):
            forwarded.add_metric([interface, "tls"], _number(server.get("forwarded_bytes")) or 0.0)
        yield forwarded

        drops = CounterMetricFamily(
            "meshguard_dropped_datagrams_total",
            "Datagrams and packets dropped, by reason",
            labels=["interface", "reason"],
        )
        seen = document.get("drops") if isinstance(document.get("drops"), dict) else {}
        assert isinstance(seen, dict)
        for field, reason in DROP_REASONS.items():
            drops.add_metric([interface, reason], _number(seen.get(field)) or 0.0)
        for field, value in sorted(seen.items()):
            if field not in DROP_REASONS:
                drops.add_metric([interface, field], _number(value) or 0.0)
        yield drops

        offload = node.get("udp_offload")
        if isinstance(offload, dict):
            enabled = GaugeMetricFamily(
                "meshguard_udp_offload_enabled",
                "1 when the UDP socket uses the offload (gso: send, gro: receive) for the family",
                labels=["interface", "offload", "family"],
            )
            for name in ("gso", "gro"):
                on = str(offload.get(name, "off")).split()
                for family in ("ipv4", "ipv6"):
                    enabled.add_metric([interface, name, family], 1.0 if family in on else 0.0)
            yield enabled
            for field, help_text in (
                ("gso_sends", "sendmsg calls that carried several datagrams (UDP GSO)"),
                ("gso_datagrams", "Datagrams sent inside GSO sends"),
                ("gro_reads", "Reads that returned coalesced datagrams (UDP GRO)"),
                ("gro_datagrams", "Datagrams received inside GRO reads"),
            ):
                value = _number(offload.get(field))
                if value is not None:
                    counter = CounterMetricFamily(
                        f"meshguard_udp_{field}_total", help_text, labels=["interface"]
                    )
                    counter.add_metric([interface], value)
                    yield counter


class MetricsPage(Resource):
    """``GET /metrics``: the registry in the format the scraper asks for, made on the reactor
    thread (prometheus_client's own Twisted resource runs collectors in a thread pool)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, content_type = choose_encoder(accept or "")
        try:
            body: bytes = encoder(self.registry)
        except Exception:
            log.failure("metrics scrape failed")
            request.setResponseCode(500)
            return b"metrics scrape failed; see the node's log\n"
        request.setHeader("content-type", content_type)  # type: ignore[no-untyped-call]
        return body


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return self

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"meshguard: metrics at /metrics\n"


def metrics_site(
    snapshot: Snapshot, local_networks: Callable[[], Iterable[Network]] = list
) -> Site:
    """The web site: ``/metrics`` and a one-line pointer to it elsewhere."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(snapshot, local_networks))  # type: ignore[arg-type]
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsPage(registry))
    site = Site(root)  # type: ignore[no-untyped-call]
    site.noisy = False
    site.displayTracebacks = False
    return site


def listen_metrics(
    reactor: Any,
    address: tuple[str, int],
    snapshot: Snapshot,
    local_networks: Callable[[], Iterable[Network]] = list,
) -> IListeningPort:
    """Serve the metrics on ``address`` (``MetricsListen``); raises OSError when it cannot."""
    from twisted.internet.error import CannotListenError

    host, port = address
    try:
        listening: IListeningPort = reactor.listenTCP(
            port, metrics_site(snapshot, local_networks), interface=host
        )
    except CannotListenError as e:
        raise OSError(
            f"MetricsListen {host}:{port}: cannot listen ({e.socketError}); "
            "pick a free address and port, or remove MetricsListen"
        ) from e
    return listening
