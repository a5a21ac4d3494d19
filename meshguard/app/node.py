"""A running WireGuard interface: the device engine wired to a TUN device, UDP sockets and a link.

The node owns the adapters, keeps one reactor timer for the engine's next deadline, and is the
backend the UAPI server (and so the stock ``wg`` tool) configures. Configuration from a file and
from ``wg`` go through the same operations (:mod:`meshguard.codecs.uapi`), so both behave alike.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from meshguard.adapters.birthday_sockets import BirthdaySockets
from meshguard.adapters.endpoint_names import EndpointNames, Resolver, is_name, resolve_endpoint
from meshguard.adapters.flood_guard import TICK as FLOOD_TICK
from meshguard.adapters.flood_guard import FloodGuard
from meshguard.adapters.idle_gap import IdleGap
from meshguard.adapters.link import Link
from meshguard.adapters.openssl_setup import setup as openssl_setup
from meshguard.adapters.primer import Primer
from meshguard.adapters.probe_sockets import ProbeSockets
from meshguard.adapters.tun import TunDevice
from meshguard.adapters.udp import UDPBindError, UDPTransport
from meshguard.codecs.config import KEEPALIVE_AUTO, Config, IPInterface
from meshguard.codecs.uapi import (
    UNSET,
    DeviceStatus,
    Operation,
    PeerStatus,
    PeerUpdate,
    ReplacePeers,
    SetFwmark,
    SetListenPort,
    SetPrivateKey,
    UAPIError,
)
from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint, RandomBytes
from meshguard.core.peer import Peer
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.arbiter import Path
from meshguard.mesh.keepalive import KeepalivePolicy
from meshguard.mesh.ping import Pinger
from meshguard.mesh.pmtu import PathMTUDiscovery
from meshguard.mesh.sources import DEFAULT_SOURCES, EndpointSource
from meshguard.mesh.stack import MeshStack
from meshguard.plugins import IEndpointSource, IKeepalivePolicy, IPathObserver
from meshguard.plugins import load as load_plugins

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _DataPath:
    """The device's outputs bound straight to the adapters' methods (no forwarding call)."""

    __slots__ = ("send_datagram", "send_datagrams", "send_probe", "write_packet", "write_packets")
    #: Set when the adapter can send path MTU probes with Don't-Fragment (optional).
    send_probe: Callable[[bytes, Endpoint], bool]
    #: Set when the adapter takes several datagrams to one endpoint at once (optional).
    send_datagrams: Callable[[list[bytes], Endpoint], None]
    #: Set when the adapter takes a batch's opened packets in one call (optional).
    write_packets: Callable[[list[bytes]], None]

    def __init__(
        self,
        send_datagram: Callable[[bytes, Endpoint], None],
        write_packet: Callable[[bytes], None],
    ) -> None:
        self.send_datagram = send_datagram
        self.write_packet = write_packet


def _discard_datagram(data: bytes, endpoint: Endpoint) -> None:
    pass


def _discard_packet(packet: bytes) -> None:
    pass


def config_operations(config: Config, *, existing: set[bytes] | None = None) -> list[Operation]:
    """The UAPI operations that make a device match ``config``'s WireGuard part.

    ``existing`` (a reload) removes the peers the file no longer lists, like ``wg syncconf``,
    instead of replacing every peer, so live sessions of unchanged peers survive.
    """
    interface = config.interface
    operations: list[Operation] = [SetPrivateKey(interface.private_key)]
    operations.append(SetFwmark(interface.fwmark))
    if existing is None:
        operations.append(ReplacePeers())
    wanted = {peer.public_key for peer in config.peers}
    for key in sorted(existing or set()):
        if key not in wanted:
            operations.append(PeerUpdate(public_key=key, remove=True))
    for peer in config.peers:
        endpoint: Endpoint | None = None
        if peer.endpoint is not None:
            endpoint = resolve_endpoint(peer.endpoint)
            if endpoint is None:
                log.warn(
                    "{path}:{line}: cannot resolve endpoint {host}; the peer waits for it to "
                    "reach us",
                    path=config.path,
                    line=peer.line,
                    host=peer.endpoint[0],
                )
        operations.append(
            PeerUpdate(
                public_key=peer.public_key,
                preshared_key=peer.preshared_key,
                endpoint=endpoint if endpoint is not None else UNSET,
                # auto: the keepalive policy sets the number (Node.apply_config).
                persistent_keepalive=None
                if peer.persistent_keepalive == KEEPALIVE_AUTO
                else peer.persistent_keepalive,
                replace_allowed_ips=True,
                allowed_ips=[(True, network) for network in peer.allowed_ips],
            )
        )
    return operations


class Node:
    """One interface: TUN + UDP + link + engine, configured by a file and by UAPI."""

    def __init__(
        self,
        interface: str,
        reactor: Any,
        *,
        mtu: int = 1420,
        listen_port: int = 0,
        random: RandomBytes = os.urandom,
        tun_system: Any = None,
        link: Link | None = None,
        on_gone: Callable[[], None] | None = None,
        resolver: Resolver | None = None,
        plugins: bool = True,
    ) -> None:
        self.interface = interface
        self.reactor = reactor
        self.mtu = mtu
        self.requested_port = listen_port
        self.device = Device(_DataPath(_discard_datagram, _discard_packet), random, mtu=mtu)
        #: When the node last read a batch, on the TUN device or the UDP port: a lone packet
        #: after an idle moment goes at once, batches under load stay whole.
        self.idle = IdleGap(reactor.seconds)
        # The read paths hand packets straight to the engine with their batch's time
        # (``IdleGap.now``): no call or clock read of the node's own in between.
        self.tun = TunDevice(
            interface,
            self.device.packet_from_tun,
            reactor,
            system=tun_system,
            on_gone=self._tun_gone,
            on_batch_end=self._batch_end,
            on_batch_start=self._tun_batch_start,
            offload=tun_system is None,
            batch_receiver=self.device.packets_from_tun,
            idle=self.idle,
        )
        self.udp = UDPTransport(
            self.device.datagram_received,
            reactor,
            listen_port,
            on_batch_end=self._udp_batch_end,
            wireguard_filter=True,
            on_batch_start=self.tun.hold,
            batch_receiver=self.device.transport_batch_received,
            idle=self.idle,
        )
        # The UDP port learns which local address to answer from (sticky sources).
        self.device.add_source_listener(self.udp.source_authenticated)
        #: Handshakes wait behind each read batch's transport data (Device.handshake_backlog).
        self.device.handshake_backlog = deque()
        self._backlog_call: IDelayedCall | None = None
        #: Sheds a flood in the kernel (meshguard/adapters/flood_guard.py), checked every FLOOD_TICK
        #: s.
        self.flood_guard = FloodGuard(self.device, self.udp)
        self._flood_tick = LoopingCall(lambda: self.flood_guard.tick(self._seconds()))
        self._flood_tick.clock = reactor
        self.link = link if link is not None else Link(interface)
        #: The mesh layer; it marks our handshakes and talks only to meshguard peers.
        self.mesh_agent = MeshAgent(
            self.device,
            local_endpoints=self.local_endpoints,
            mapped_endpoints=self.mapped_endpoints,
        )
        #: ``PersistentKeepalive = auto``: NAT detection, lifetime probes, interval choice.
        self.keepalive = KeepalivePolicy(
            self.device,
            self.mesh_agent,
            random,
            ProbeSockets(reactor, fwmark=lambda: self.fwmark, after_receive=self._batch_end),
        )
        self.mesh_agent.add_feature(self.keepalive)
        #: Membership through introducers, hole punching and relaying (docs/mesh.md).
        self.mesh_stack = MeshStack(self.mesh_agent)
        if plugins:
            # Endpoint sources and path observers are plugins, the built-in ones included.
            sources: list[EndpointSource] = list(load_plugins(IEndpointSource))
            self.mesh_stack.paths.sources = sources or list(DEFAULT_SOURCES)
            self.mesh_stack.paths.observers.extend(load_plugins(IPathObserver))
            self.keepalive.overrides.extend(load_plugins(IKeepalivePolicy))
        #: Hole punching's primers, with a hop limit traced to leave all our NATs
        #: (meshguard/adapters/primer.py).
        self.primer = Primer(reactor, self._send_primer, fwmark=lambda: self.fwmark)
        self.mesh_stack.paths.primer = self.primer
        # Idle pairs' path checks at the keepalive interval (issue 17; mesh/paths.py).
        self.mesh_stack.paths.idle_check_interval = self.keepalive.path_check_interval
        #: The birthday technique's extra sockets (mesh/birthday.py).
        self.birthday = BirthdaySockets(
            reactor,
            steer=self.udp.steer,
            deliver=self._birthday_deliver,
            on_hit=self._birthday_hit,
            fwmark=lambda: self.fwmark,
            ttl=lambda: self.primer.ttl,
        )
        self.mesh_stack.paths.birthday = self.birthday
        self.mesh_stack.arbiter.add_observer(self._path_moved)
        #: ``Endpoint = name:port``: re-resolved when the peer goes quiet or the TTL runs out.
        self.names = EndpointNames(
            self.device,
            reactor,
            resolver=resolver,
            on_change=self.reschedule,
            offer=self.mesh_stack.arbiter.configured,
        )
        #: Path MTU discovery per peer; with ``mtu_auto`` it also drives the interface MTU.
        self.pmtu = PathMTUDiscovery(
            self.device,
            route_mtu=self.udp.route_mtu,
            on_change=self._path_mtu_changed,
            mark_dirty=self._mesh_dirty,
            local_addresses=lambda: self.addresses,
        )
        self.mesh_agent.add_feature(self.pmtu)
        #: ``meshguard ping``: operator pings over the current path (docs/operations.md).
        self.pinger = Pinger(self.mesh_agent)
        self.mesh_agent.add_feature(self.pinger)
        #: ``MTU = auto``: the interface MTU follows discovery within these bounds.
        self.mtu_auto = False
        self.mtu_bounds = (1280, 1420)
        #: The interface's addresses (config ``Address``): sources of echo probes.
        self.addresses: list[IPInterface] = []
        self._local_endpoints: list[Endpoint] = []
        #: Public endpoints our gateway maps to our UDP port (``meshguard.portmap``).
        self._mapped_endpoints: list[Endpoint] = []
        #: The node-level ``port_mapping`` status, while port mapping runs (set by the service).
        self.port_mapping_status: Callable[[], dict[str, Any]] | None = None
        self.on_gone = on_gone
        self.fwmark = 0
        self._timer: IDelayedCall | None = None
        self._seconds: Callable[[], float] = reactor.seconds
        self.routes: list[Network] = []
        self.running = False

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the TUN device and bind the sockets (needs privileges; nothing else runs)."""
        self.interface = self.tun.open()
        try:
            self.udp.bind()
        except BaseException:
            self.tun.close()
            raise

    def start(self) -> None:
        """Start the data path: the engine's outputs go to the adapters and reading begins."""
        io = _DataPath(self.udp.send, self.tun.write)
        io.send_probe = self.udp.send_probe
        io.send_datagrams = self.udp.send_datagrams
        io.write_packets = self.tun.write_packets
        self.device.attach_io(io)
        self.tun.start_reading()
        self.udp.start_reading()
        self.running = True
        self.device.up(self._seconds())
        self.names.start()
        introducers = self.mesh_stack.membership.introducers
        self.primer.prepare(p.endpoint for k, p in self.device.peers.items() if k in introducers)
        self._flood_tick.start(FLOOD_TICK, now=False)
        self.reschedule()

    def stop(self) -> None:
        """Stop reading, forget sessions and close the sockets and the TUN device."""
        self.running = False
        self.names.stop()
        if self._flood_tick.running:
            self._flood_tick.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._backlog_call is not None and self._backlog_call.active():
            self._backlog_call.cancel()
        self._backlog_call = None
        if self.device.handshake_backlog:
            self.device.handshake_backlog.clear()
        self.device.down()
        self.device.attach_io(_DataPath(_discard_datagram, _discard_packet))
        self.birthday.close()
        self.udp.close()
        self.tun.close()

    def _path_moved(self, peer: Peer, old: Path, new: Path, reason: str) -> None:
        """Every move the path arbiter makes, logged once with its reason."""
        log.info(
            "path to {peer}: {old} -> {new} ({reason})",
            peer=peer.short_name,
            old=old.describe(),
            new=new.describe(),
            reason=reason,
        )

    def _send_primer(self, data: bytes, endpoint: Endpoint, ttl: int) -> None:
        """Hole punching's primer: an empty datagram that leaves our NATs and dies soon after."""
        if self.running:
            self.udp.send_primer(data, endpoint, ttl)

    def _birthday_deliver(self, data: bytes, source: Endpoint) -> bool:
        """A datagram on one of the birthday technique's sockets: as if it came on ours.
        True when it authenticated (only then may that socket win)."""
        if not self.running:
            return False
        authenticated: list[Endpoint] = []

        def listener(peer: Peer, source: Endpoint, now: float) -> None:
            authenticated.append(source)

        # Listening only while this datagram is handled keeps the source listeners of every
        # other received packet down to the UDP port's own.
        self.device.add_source_listener(listener)
        try:
            self.device.datagram_received(data, source, self._seconds())
        finally:
            self.device.remove_source_listener(listener)
        self._batch_end()
        return source in authenticated

    def _birthday_hit(self, toward: Endpoint) -> None:
        self.mesh_stack.paths.birthday_hit(toward, self._seconds())

    def _mesh_dirty(self) -> None:
        self.mesh_agent.dirty = True

    def _path_mtu_changed(self, peer: Any, mtu: int) -> None:
        """With ``MTU = auto``, the interface MTU is the smallest path MTU found among the
        peers (within ``mtu_bounds``), so applications that ignore ICMP still fit; peers with
        an even smaller path get the per-peer enforcement."""
        log.info("path MTU toward {peer}: tunnel MTU {mtu}", peer=peer.short_name, mtu=mtu)
        if not self.mtu_auto:
            return
        found = [p.inner_mtu for p in self.device.peers.values() if p.inner_mtu < 65535]
        if not found:
            return
        low, high = self.mtu_bounds
        wanted = max(low, min(high, min(found)))
        if wanted == self.mtu:
            return
        try:
            self.link.set_mtu(wanted)
        except Exception as e:
            log.warn(
                "cannot set the MTU of {name} to {mtu}: {error}",
                name=self.interface,
                mtu=wanted,
                error=str(e),
            )
            return
        self.mtu = self.device.mtu = wanted

    def _tun_gone(self, error: OSError) -> None:
        self.udp.flush()  # the batch ended without its end hook
        log.info("interface {name} is gone ({error}); stopping", name=self.interface, error=error)
        if self.on_gone is not None:
            self.on_gone()

    # ------------------------------------------------------------------ data path

    def _tun_batch_start(self) -> None:
        """Hold the datagrams one TUN batch seals, so each peer's leave in few GSO sends."""
        self.udp.hold()

    def _batch_end(self) -> None:
        """After a drained batch: send what was held, and move the reactor timer only if a
        deadline moved earlier."""
        if self.device.handshake_backlog and self.device.run_handshake_backlog(self._seconds()):
            # More handshakes wait: after the reactor's next look at the sockets.
            if self._backlog_call is None or not self._backlog_call.active():
                self._backlog_call = self.reactor.callLater(0, self._backlog_turn)
        self.udp.flush()
        self.tun.flush()
        if self.device.timers.dirty or self.mesh_agent.dirty:
            self.reschedule()

    def _udp_batch_end(self) -> None:
        """After a UDP read batch: read what the TUN writes provoked (an echo reply, TCP
        acknowledgements) at once instead of after a reactor turn, then end the batch as any.

        The held writes go first (the replies they provoke are what is read); the rest of the
        batch end (held sends, timers) waits until the reply has left, so an idle ping's reply
        does not wait for the timer bookkeeping (the TUN read runs it too when it reads).
        """
        self.tun.flush()
        if not self.tun.read_replies():
            # (A reply read ran the batch end as its own, after the reply left.)
            self._batch_end()

    def _backlog_turn(self) -> None:
        self._backlog_call = None
        self._batch_end()

    def local_endpoints(self) -> list[Endpoint]:
        """Our LAN candidates: the host's addresses outside the tunnel, with our UDP port."""
        return self._local_endpoints

    def mapped_endpoints(self) -> list[Endpoint]:
        """Our port-mapped public endpoints, advertised to the mesh as candidates."""
        return self._mapped_endpoints

    def set_mapped_endpoints(self, endpoints: list[Endpoint]) -> None:
        """The port mapping changed: advertise it to every meshguard peer at once."""
        if endpoints == self._mapped_endpoints:
            return
        self._mapped_endpoints = list(endpoints)
        self.mesh_agent.advertise(self._seconds())
        self.reschedule()

    def refresh_local_endpoints(self, addresses: list[str]) -> None:
        port = self.udp.local_port
        self._local_endpoints = [(address, port) for address in addresses]

    def reschedule(self) -> None:
        """Keep the one reactor timer at the engine's (and mesh layer's) next deadline."""
        if not self.running:
            return
        self.device.timers.dirty = False
        self.mesh_agent.dirty = False
        deadline = self.device.next_deadline()
        mesh_deadline = self.mesh_agent.next_deadline()
        if mesh_deadline is not None and (deadline is None or mesh_deadline < deadline):
            deadline = mesh_deadline
        timer = self._timer
        if deadline is None:
            return
        if timer is not None and timer.active():
            if timer.getTime() <= deadline:
                return
            timer.reset(max(0.0, deadline - self._seconds()))
            return
        self._timer = self.reactor.callLater(max(0.0, deadline - self._seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._seconds()
        try:
            self.device.run_timers(now)
            self.mesh_agent.run_timers(now)
        except Exception:
            log.failure("protocol timer failed")
        self.reschedule()

    # ------------------------------------------------------------------ mesh status

    def status_document(self) -> dict[str, Any]:
        """What ``meshguard status`` shows: the node, then every peer with its path."""
        from meshguard.core.keytext import key_text

        device = self.device
        peers = []
        for peer in device.peers.values():
            entry: dict[str, Any] = {
                "public_key": key_text(peer.public_key),
                "endpoint": list(peer.endpoint) if peer.endpoint is not None else None,
                "path": "direct" if peer.endpoint is not None else "none",
                "last_handshake": peer.last_handshake_time or None,
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "allowed_ips": [str(n) for n in device.allowed_ips.networks(peer)],
                "persistent_keepalive": peer.persistent_keepalive,
                "path_mtu": peer.inner_mtu if peer.inner_mtu < 65535 else None,
            }
            name = self.names.name_of(peer.public_key)
            if name is not None:
                entry["endpoint_name"] = name
            entry.update(self.mesh_agent.peer_status(peer))
            entry.update(self.mesh_stack.arbiter.status(peer))
            peers.append(entry)
        return {
            "interface": self.interface,
            "public_key": key_text(device.public_key) if device.public_key is not None else None,
            "listen_port": self.udp.local_port,
            "mtu": self.mtu,
            "node": {
                **self.mesh_agent.node_status(),
                "udp_offload": self.udp.offload_status(),
                **(
                    {"port_mapping": self.port_mapping_status()}
                    if self.port_mapping_status is not None
                    else {}
                ),
                "flood_guard": self.flood_guard.status(),
                "tun_offload": self.tun.offload_status(),
                "openssl_cpu": openssl_setup(),
                **self.primer.status(),
            },
            "drops": {k: v for k, v in device.counters.as_dict().items() if v},
            "peers": peers,
        }

    # ------------------------------------------------------------------ UAPI backend

    def status(self) -> DeviceStatus:
        device = self.device
        peers = [
            PeerStatus(
                public_key=peer.public_key,
                preshared_key=peer.preshared_key if any(peer.preshared_key) else None,
                endpoint=peer.endpoint,
                last_handshake_time=peer.last_handshake_time,
                rx_bytes=peer.rx_bytes,
                tx_bytes=peer.tx_bytes,
                persistent_keepalive=peer.persistent_keepalive,
                allowed_ips=device.allowed_ips.networks(peer),
            )
            for peer in device.peers.values()
        ]
        return DeviceStatus(
            private_key=device.private_key,
            listen_port=self.udp.local_port if self.running or self.udp.local_port else 0,
            fwmark=self.fwmark,
            peers=peers,
        )

    def apply(self, operations: list[Operation]) -> None:
        """Apply validated UAPI operations in order, as wireguard-go does."""
        now = self._seconds()
        device = self.device
        try:
            for op in operations:
                if isinstance(op, SetPrivateKey):
                    device.set_private_key(op.key, now)
                elif isinstance(op, SetListenPort):
                    if op.port != self.udp.local_port or op.port == 0:
                        try:
                            self.udp.rebind(op.port)
                        except UDPBindError as e:
                            raise UAPIError(errno.EADDRINUSE, str(e)) from e
                elif isinstance(op, SetFwmark):
                    try:
                        self.udp.set_fwmark(op.mark)
                    except OSError as e:
                        raise UAPIError(errno.EADDRINUSE, "cannot set fwmark") from e
                    self.fwmark = op.mark
                elif isinstance(op, ReplacePeers):
                    device.remove_all_peers()
                elif isinstance(op, PeerUpdate):
                    self._apply_peer(op, now)
        finally:
            self.reschedule()

    def _apply_peer(self, op: PeerUpdate, now: float) -> None:
        device = self.device
        if device.public_key is not None and op.public_key == device.public_key:
            return
        if op.remove:
            device.remove_peer(op.public_key)
            return
        if op.update_only and op.public_key not in device.peers:
            return
        self.mesh_stack.user_configured(op.public_key)
        peer = device.add_peer(op.public_key)
        if peer is None:
            return
        if op.preshared_key is not UNSET:
            device.set_preshared_key(peer, op.preshared_key)
        if op.endpoint is not UNSET:
            self.mesh_stack.arbiter.configured(peer, op.endpoint, "configured")
            # An endpoint set by hand (or by a config load, which re-adds the name) wins over DNS.
            self.names.forget(op.public_key)
        if op.replace_allowed_ips:
            device.allowed_ips.remove_value(peer)
        for add, network in op.allowed_ips:
            if add:
                device.allowed_ips.insert(network, peer)
            else:
                device.allowed_ips.remove(network, peer)
        if op.persistent_keepalive is not None:
            # A number from wg or a file takes the peer out of auto.
            self.keepalive.release(peer.public_key)
            device.set_persistent_keepalive(peer, op.persistent_keepalive, now)

    def apply_config(self, config: Config, *, reload: bool = False) -> None:
        # Peers learned from introducers are not the file's to remove on reload.
        learned = set(self.mesh_stack.membership.learned) | set(self.mesh_stack.membership.enrolled)
        self.addresses = list(config.interface.addresses)
        existing = set(self.device.peers) - learned if reload else None
        self.apply(config_operations(config, existing=existing))
        self.names.configure(
            {
                peer.public_key: peer.endpoint
                for peer in config.peers
                if peer.endpoint is not None and is_name(peer.endpoint[0])
            },
            self._seconds(),
        )
        auto = {p.public_key for p in config.peers if p.persistent_keepalive == KEEPALIVE_AUTO}
        self.keepalive.configure_auto(auto, self._seconds())
        self.mesh_stack.configure(
            {peer.public_key for peer in config.peers if peer.introducer},
            config.interface.forwarding,
            self._seconds(),
            config.interface.forwarding_rate,
        )
        self.reschedule()
