"""The node as a Twisted service: set up in ``privilegedStartService``, torn down on stop.

What needs root (the TUN device, the sockets, addresses and routes, the UAPI socket) happens in
``privilegedStartService`` so that twistd may drop privileges afterwards. A failure at any step
undoes the steps before it and ends the process with one line that says what to do.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from meshguard.adapters.capabilities import keep_across_uid_change, retain_net_admin
from meshguard.adapters.default_route import DEFAULT_TABLE, DefaultRoute
from meshguard.adapters.endpoint_names import resolve_endpoint
from meshguard.adapters.link import LinkError, host_address_infos
from meshguard.adapters.portmap.service import PortMapping, listen_announcements, standard_methods
from meshguard.adapters.status_server import listen_status
from meshguard.adapters.tun import TunError
from meshguard.adapters.uapi_server import InterfaceInUseError, listen_uapi
from meshguard.adapters.udp import UDPBindError
from meshguard.app.node import Node
from meshguard.codecs.config import MAX_MTU, MIN_MTU, MIN_MTU_IPV6, Config, ConfigError, load_config
from meshguard.plugins import IPathObserver

if TYPE_CHECKING:
    from meshguard.adapters.relay.service import TlsRelay


class MembershipService(Protocol):
    """What the service asks of signed membership (``meshguard.app.enrollment.Enrollment``,
    imported only when ``MeshName`` is set): open its ports while privileged, then run."""

    def open(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Errors a user can act on: printed as one line, exit status 1.
STARTUP_ERRORS = (ConfigError, TunError, UDPBindError, LinkError, InterfaceInUseError, OSError)


def host_addresses(exclude: str) -> list[str]:
    """The host's global unicast addresses outside the tunnel (LAN candidates for the mesh)."""
    addresses: list[str] = []
    for info in host_address_infos(exclude):
        local = info.get("local")
        if info.get("scope") == "global" and isinstance(local, str):
            addresses.append(local)
    return addresses


@implementer(IPathObserver)
class LearnedRoutes:
    """The route keeper's ear on the mesh: learned members' comings and goings."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.changed = changed

    def member_changed(self, public_key: bytes, allowed_ips: Sequence[Network] | None) -> None:
        self.changed()

    def path_changed(self, public_key: bytes, old: str, new: str, detail: str | None) -> None:
        pass

    def rtt_measured(self, public_key: bytes, rtt: float) -> None:
        pass


class StartupError(SystemExit):
    """Ends the process with status 1 after printing one clear line."""

    def __init__(self, message: str) -> None:
        line = f"meshguard: {message}\n"
        # twistd has replaced sys.stderr with a log file by the time services start, so the
        # line goes to the process's real stderr (the terminal with -n), and to the log too.
        real = sys.__stderr__
        for stream in {id(s): s for s in (real, sys.stderr) if s is not None}.values():
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass
        super().__init__(1)


class DaemonStartupError(Exception):
    """A start-up failure under a daemonizing twistd, which reports it to the waiting parent."""


class NodeService(service.Service):
    """One interface, from a config file (or none: ``meshguard-userspace``)."""

    def __init__(
        self,
        interface: str,
        config: Config | None,
        *,
        config_path: str | None = None,
        reactor: Any = None,
        uapi_directory: str = "/var/run/wireguard",
        status_directory: str = "/var/run/meshguard",
        manage_link: bool = True,
        daemon: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.interface = interface
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.uapi_directory = uapi_directory
        self.status_directory = status_directory
        self.status_port: IListeningPort | None = None
        #: ``MetricsListen``: the Prometheus endpoint (meshguard.adapters.metrics), if configured.
        self.metrics_port: IListeningPort | None = None
        self._networks_cache: tuple[float, list[Any]] | None = None
        self.manage_link = manage_link
        #: Started by a daemonizing twistd (no ``-n``): see ``privilegedStartService``.
        self.daemon = daemon
        self.node: Node | None = None
        self.uapi: IListeningPort | None = None
        #: The TLS relay server and clients (``meshguard.adapters.relay.service.TlsRelay``), if
        #: configured.
        self.tls_relay: TlsRelay | None = None
        self.routes: list[Network] = []
        self._learned_sync: IDelayedCall | None = None
        self._previous_hup: Any = None
        #: Set once our TUN device exists: only then is the interface ours to delete.
        self._own_link = False
        #: Policy routing for a peer that takes all traffic (AllowedIPs 0.0.0.0/0 or ::/0).
        self.default_route: DefaultRoute | None = None
        #: ``PortMapping = auto``: our gateway's mapping of our UDP port (docs/portmapping.md).
        self.port_mapping: PortMapping | None = None
        self._mapped_port = 0
        #: Signed membership, store, joins and names (``MeshName``; docs/invitations.md).
        self.enrollment: MembershipService | None = None

    # ------------------------------------------------------------------ start

    def privilegedStartService(self) -> None:
        # twistd --uid switches users next: keep CAP_NET_ADMIN across it (startService).
        keep_across_uid_change()
        try:
            self._set_up()
        except STARTUP_ERRORS as e:
            self._tear_down()
            if self.daemon:
                # A daemonizing twistd's waiting parent only hears of an Exception (it then
                # prints it and exits 1); a SystemExit here would leave it waiting forever.
                log.error("meshguard: {error}", error=str(e))
                raise DaemonStartupError(f"meshguard: {e}") from e
            raise StartupError(str(e)) from e
        service.Service.privilegedStartService(self)  # type: ignore[no-untyped-call]

    def _set_up(self) -> None:
        interface = self.config.interface if self.config is not None else None
        mtu = interface.mtu if interface is not None and interface.mtu is not None else 1420
        port = interface.listen_port if interface is not None and interface.listen_port else 0
        node = Node(self.interface, self.reactor, mtu=mtu, listen_port=port, on_gone=self._gone)
        self.node = node
        if interface is not None and interface.mtu_auto:
            # MTU = auto: start from the routes toward the endpoints (as wg-quick), then let
            # path MTU discovery move it (see docs/pmtu.md).
            mtu = self._route_mtu_guess(node)
            node.mtu = node.device.mtu = mtu
            node.mtu_auto = True
            floor = MIN_MTU_IPV6 if any(a.version == 6 for a in interface.addresses) else MIN_MTU
            node.mtu_bounds = (floor, MAX_MTU)
        node.open()
        self._own_link = True
        self.interface = node.interface
        node.refresh_local_endpoints(host_addresses(exclude=self.interface))
        if self.manage_link:
            node.link.set_mtu(mtu)
        if self.config is not None:
            node.apply_config(self.config)
            if self.manage_link:
                for address in self.config.interface.addresses:
                    node.link.add_address(address)
                node.link.set_up()
                self._sync_routes()
                node.mesh_stack.paths.observers.append(LearnedRoutes(self._learned_members_changed))
        if self.config is not None and (
            self.config.interface.relay_listen is not None or self.config.interface.relays
        ):
            from meshguard.adapters.relay.service import TlsRelay

            self.tls_relay = TlsRelay(self.config.interface, self.reactor)
            self.tls_relay.listen(node)
        if self.config is not None and self.config.interface.mesh_name is not None:
            from meshguard.app.enrollment import Enrollment

            self.enrollment = Enrollment(self.config, node, self.reactor)
            self.enrollment.open()
        self.uapi = listen_uapi(self.reactor, self.interface, node, self.uapi_directory)
        self.status_port = listen_status(
            self.reactor, self.interface, node.status_document, self.status_directory
        )
        # Requests besides the status document (``meshguard ping``): docs/operations.md.
        factory = getattr(self.status_port, "factory", None)
        if factory is not None:
            factory.handlers.update(self._control_requests(node))
        if self.config is not None and self.config.interface.metrics_listen is not None:
            from meshguard.adapters.metrics import listen_metrics

            self.metrics_port = listen_metrics(
                self.reactor,
                self.config.interface.metrics_listen,
                node.status_document,
                self._host_networks,
            )

    def _host_networks(self) -> list[Any]:
        """This host's subnets (LAN or not), asked of ``ip`` at most every 30 s: a scrape or
        a ping runs on the reactor and must not wait on a subprocess each time."""
        from meshguard.adapters.path_view import host_networks

        now = self.reactor.seconds()
        cached = self._networks_cache
        if cached is None or now - cached[0] > 30:
            cached = self._networks_cache = (now, host_networks(exclude=self.interface))
        return list(cached[1])

    def _control_requests(self, node: Node) -> dict[str, Any]:
        """Requests on the control socket besides ``status`` (docs/operations.md)."""
        from meshguard.adapters.pinging import PingRequests

        ping = PingRequests(node, self.reactor, local_networks=self._host_networks)
        return {"ping": ping}

    def _route_mtu_guess(self, node: Node) -> int:
        """wg-quick's choice: the largest route MTU toward a peer's endpoint minus 80 (IPv6 +
        UDP + WireGuard headers), 1420 when no endpoint has a route."""
        assert self.config is not None
        best = 0
        for peer in self.config.peers:
            if peer.endpoint is None:
                continue
            endpoint = resolve_endpoint(peer.endpoint)
            if endpoint is None:
                continue
            try:
                address = ipaddress.ip_address(endpoint[0].split("%", 1)[0])
            except ValueError:
                continue
            route = node.link.route_mtu_toward(address, self.config.interface.fwmark)
            if route is not None:
                best = max(best, route - 80)
        return max(MIN_MTU_IPV6, best) if best else 1420

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        if self.node is None:
            self.privilegedStartService()
        assert self.node is not None
        if not retain_net_admin():
            log.warn(
                "running as uid {uid} without CAP_NET_ADMIN: reloads, routes and MTU changes "
                "will fail; run as root or with AmbientCapabilities=CAP_NET_ADMIN "
                "(examples/meshguard@.service)",
                uid=os.geteuid(),
            )
        self.node.start()
        if self.tls_relay is not None:
            self.tls_relay.attach(self.node)
        self._sync_port_mapping()
        if self.enrollment is not None:
            self.enrollment.start()
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        except ValueError:
            self._previous_hup = None  # not the main thread (tests)
        log.info(
            "meshguard {name} up: UDP port {port}, {peers} peers",
            name=self.interface,
            port=self.node.udp.local_port,
            peers=len(self.node.device.peers),
        )

    def _sync_port_mapping(self) -> Deferred[None] | None:
        """Start or stop port mapping as ``PortMapping`` says (default ``auto``); a reload
        that moved our UDP port replaces the mapping of the old one."""
        node = self.node
        wanted = (
            node is not None
            and node.running
            and self.config is not None
            and self.config.interface.port_mapping == "auto"
        )
        if (
            wanted
            and self.port_mapping is not None
            and node is not None
            and self.port_mapping.mapper.internal_port() != self._mapped_port
        ):
            self.port_mapping.stop()
            self.port_mapping.start()
        self._mapped_port = node.udp.local_port if node is not None else 0
        if wanted and self.port_mapping is None:
            assert node is not None
            mapping = PortMapping(
                self.reactor,
                standard_methods(self.reactor),
                lambda: node.udp.local_port,
                node.set_mapped_endpoints,
                listen_announcements=listen_announcements(self.reactor),
            )
            node.mesh_agent.observed_listeners.append(mapping.observed)
            node.port_mapping_status = mapping.status
            self.port_mapping = mapping
            mapping.start()
        elif not wanted and self.port_mapping is not None:
            mapping, self.port_mapping = self.port_mapping, None
            if node is not None:
                node.port_mapping_status = None
                if mapping.observed in node.mesh_agent.observed_listeners:
                    node.mesh_agent.observed_listeners.remove(mapping.observed)
            stopped: Deferred[None] = mapping.stop()
            return stopped
        return None

    # ------------------------------------------------------------------ routes

    def _wanted_routes(self) -> list[Network]:
        if self.config is None or self.node is None:
            return []
        table = self.config.interface.table
        if table == "off":
            return []
        on_link: list[Network] = [a.network for a in self.config.interface.addresses]
        networks = [network for peer in self.config.peers for network in peer.allowed_ips]
        # Members learned from introducers (docs/mesh.md) get routes like configured peers.
        device = self.node.device
        for key in sorted(self.node.mesh_stack.membership.learned):
            learned = device.peers.get(key)
            if learned is not None:
                networks.extend(device.allowed_ips.networks(learned))
        wanted: list[Network] = []
        for network in networks:
            if network in wanted:
                continue
            if any(
                network.version == link.version and network.subnet_of(link)  # type: ignore[arg-type]
                for link in on_link
            ):
                continue
            wanted.append(network)
        return wanted

    def _sync_routes(self) -> None:
        """Routes for every peer's AllowedIPs (``Table = auto`` or a table number), as wg-quick
        installs them; the connected subnets of the interface addresses need none."""
        assert self.config is not None and self.node is not None
        table = self.config.interface.table
        table_arg = None if table == "auto" else table
        wanted = self._wanted_routes()
        for network in list(self.routes):
            if network not in wanted:
                try:
                    if network.prefixlen == 0 and self.default_route is not None:
                        self.default_route.remove((network.version,))
                    else:
                        self.node.link.remove_route(network, table_arg)
                except LinkError as e:
                    log.warn("{error}", error=str(e))
                self.routes.remove(network)
        for network in wanted:
            if network not in self.routes:
                if network.prefixlen == 0 and table == "auto":
                    self._install_default(network.version)
                else:
                    self.node.link.add_route(network, table_arg)
                self.routes.append(network)

    def _install_default(self, version: int) -> None:
        """A peer takes all traffic: wg-quick's fwmark + policy-rule scheme (no loop)."""
        assert self.node is not None
        node = self.node
        if self.default_route is None:
            mark = node.fwmark or DEFAULT_TABLE
            self.default_route = DefaultRoute(self.interface, mark)

        def set_fwmark(mark: int) -> None:
            node.udp.set_fwmark(mark)
            node.fwmark = mark

        self.default_route.install(version, set_fwmark)

    def _learned_members_changed(self) -> None:
        """A learned member came, changed or went: sync the routes once the burst (a whole
        member list arrives at once) is handled."""
        if self._learned_sync is None or not self._learned_sync.active():
            self._learned_sync = self.reactor.callLater(0, self._sync_learned_routes)

    def _sync_learned_routes(self) -> None:
        self._learned_sync = None
        if self.node is None or self.config is None:
            return
        try:
            self._sync_routes()
        except LinkError as e:
            log.warn("cannot route a learned member's AllowedIPs: {error}", error=str(e))

    # ------------------------------------------------------------------ reload

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Re-read the config and apply the difference; a bad file leaves the running one."""
        if self.config_path is None or self.node is None:
            return
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: {error}", error=str(e))
            return
        for warning in config.warnings:
            log.warn("{warning}", warning=warning)
        old = self.config
        self.config = config
        if old is not None and config.interface.metrics_listen != old.interface.metrics_listen:
            log.warn(
                "MetricsListen changed in {path}: restart the node to apply it",
                path=self.config_path,
            )
        node = self.node
        try:
            node.apply_config(config, reload=True)
            new_port = config.interface.listen_port or 0
            if new_port and new_port != node.udp.local_port:
                node.udp.rebind(new_port)
            if self.manage_link:
                old_addresses = set(old.interface.addresses) if old is not None else set()
                for address in config.interface.addresses:
                    if address not in old_addresses:
                        node.link.add_address(address)
                for address in old_addresses - set(config.interface.addresses):
                    node.link.remove_address(address)
                if config.interface.mtu and config.interface.mtu != node.mtu:
                    node.link.set_mtu(config.interface.mtu)
                    node.mtu = node.device.mtu = config.interface.mtu
                self._sync_routes()
        except Exception as e:
            log.error("reload partly applied: {error}", error=str(e))
            return
        self._reload_relay(config)
        self._sync_port_mapping()
        log.info("reloaded {path}: {peers} peers", path=self.config_path, peers=len(config.peers))

    def _reload_relay(self, config: Config) -> None:
        """Relay settings changed by a reload (docs/relay.md); a failure keeps the old ones."""
        assert self.node is not None
        if self.tls_relay is not None:
            self.tls_relay.reload(config.interface)
            return
        interface = config.interface
        if interface.relay_listen is None and not interface.relays:
            return
        from meshguard.adapters.relay.service import TlsRelay

        relay = TlsRelay(interface, self.reactor)
        try:
            relay.listen(self.node)
            relay.attach(self.node)
        except Exception as e:
            relay.stop()
            log.error("relay settings not applied: {error}", error=str(e))
            return
        self.tls_relay = relay

    # ------------------------------------------------------------------ stop

    def _gone(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[Any] | None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._previous_hup is not None:
            try:
                signal.signal(signal.SIGHUP, self._previous_hup)
            except ValueError:
                pass
        return self._tear_down()

    def _tear_down(self) -> Deferred[Any] | None:
        """Undo the set-up; the Deferred fires once the UNIX sockets are closed and unlinked
        (the reactor waits for it at shutdown, or the socket files would stay behind)."""
        closing: list[Deferred[Any]] = []
        for port in (self.status_port, self.uapi):
            if port is None:
                continue
            done = port.stopListening()
            if done is not None:
                closing.append(done)
            if not self.reactor.running:
                # A failed start: the reactor never runs the close, so unlink the file here.
                path = getattr(port.getHost(), "name", None)
                if isinstance(path, str | bytes):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        self.status_port = None
        self.uapi = None
        if self.port_mapping is not None:
            # Remove the gateway's mapping (bounded wait) while the node still stands.
            mapping, self.port_mapping = self.port_mapping, None
            closing.append(mapping.stop())
        if self.metrics_port is not None:
            done = self.metrics_port.stopListening()
            if done is not None:
                closing.append(done)
            self.metrics_port = None
        if self.tls_relay is not None:
            self.tls_relay.stop()
            self.tls_relay = None
        if self.enrollment is not None:
            self.enrollment.stop()
            self.enrollment = None
        result = gatherResults(closing) if closing else None
        node = self.node
        self.node = None
        if node is None:
            return result
        if node.running:
            node.stop()
        else:
            node.udp.close()
            node.tun.close()
        # Closing the TUN fd removes a non-persistent interface with its addresses and routes;
        # delete it explicitly in case another process still holds it open.
        if self.default_route is not None:
            self.default_route.remove()
            self.default_route = None
        if self.manage_link and self._own_link:
            self._own_link = False
            try:
                node.link.delete()
            except LinkError:
                pass
        return result
