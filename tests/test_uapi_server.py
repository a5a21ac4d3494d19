"""Tests for meshguard.adapters.uapi_server: the UNIX socket adapter, and the real ``wg`` tool
against it."""

from __future__ import annotations

import base64
import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Generator
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from nacl.public import PrivateKey
from twisted.internet import reactor, utils
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from meshguard.adapters.uapi_server import (
    DEFAULT_DIRECTORY,
    InterfaceInUseError,
    UAPIFactory,
    UAPIProtocol,
    listen_uapi,
    socket_path,
)
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
    format_get,
)

Network = IPv4Network | IPv6Network


def public_key(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


class FakeDevice:
    """An in-memory backend with wireguard-go's set semantics; records every applied request."""

    def __init__(self) -> None:
        self.private_key: bytes | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.peers: dict[bytes, PeerStatus] = {}
        self.owner: dict[Network, bytes] = {}  # which peer holds each allowed IP
        self.applied: list[list[Operation]] = []
        self.busy_ports: set[int] = set()
        self.fail_with: Exception | None = None

    def status(self) -> DeviceStatus:
        if self.fail_with is not None:
            raise self.fail_with
        return DeviceStatus(
            self.private_key, self.listen_port, self.fwmark, list(self.peers.values())
        )

    def apply(self, operations: list[Operation]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.applied.append(operations)
        for op in operations:
            match op:
                case SetPrivateKey(key=key):
                    self.private_key = key
                    if key is not None:
                        self._remove(public_key(key))
                case SetListenPort(port=port):
                    if port in self.busy_ports:
                        raise UAPIError(errno.EADDRINUSE)
                    self.listen_port = port
                case SetFwmark(mark=mark):
                    self.fwmark = mark
                case ReplacePeers():
                    self.peers.clear()
                    self.owner.clear()
                case PeerUpdate():
                    self._update_peer(op)

    def add_peer(self, peer: PeerStatus) -> None:
        self.peers[peer.public_key] = peer
        self.owner.update(dict.fromkeys(peer.allowed_ips, peer.public_key))

    def _remove(self, key: bytes) -> None:
        peer = self.peers.pop(key, None)
        if peer is not None:
            for network in peer.allowed_ips:
                del self.owner[network]

    def _update_peer(self, op: PeerUpdate) -> None:
        if self.private_key is not None and op.public_key == public_key(self.private_key):
            return
        if op.remove:
            self._remove(op.public_key)
            return
        if op.update_only and op.public_key not in self.peers:
            return
        peer = self.peers.setdefault(op.public_key, PeerStatus(public_key=op.public_key))
        if op.preshared_key is not UNSET:
            peer.preshared_key = op.preshared_key
        if op.endpoint is not UNSET:
            peer.endpoint = op.endpoint
        if op.persistent_keepalive is not None:
            peer.persistent_keepalive = op.persistent_keepalive
        if op.replace_allowed_ips:
            for network in peer.allowed_ips:
                del self.owner[network]
            peer.allowed_ips.clear()
        for add, network in op.allowed_ips:
            owner = self.owner.get(network)
            if add and owner != op.public_key:
                if owner is not None:  # a prefix belongs to one peer, as in wg-go's trie
                    self.peers[owner].allowed_ips.remove(network)
                self.owner[network] = op.public_key
                peer.allowed_ips.append(network)
            elif not add and owner == op.public_key:
                del self.owner[network]
                peer.allowed_ips.remove(network)


KEY_A = bytes(range(1, 33))
KEY_B = bytes(range(33, 65))
PEER_1 = public_key(KEY_A)
PEER_2 = public_key(KEY_B)
PEER_3 = public_key(bytes(range(65, 97)))


class ProtocolTests(SynchronousTestCase):
    """The protocol on a StringTransport: replies, errors, and what reaches the backend."""

    def setUp(self) -> None:
        self.device = FakeDevice()
        self.proto = UAPIFactory(self.device).buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_get(self) -> None:
        """get replies with format_get of the backend's status."""
        self.device.listen_port = 51820
        self.proto.dataReceived(b"get=1\n\n")
        self.assertEqual(self.transport.value(), format_get(self.device.status()))
        self.assertFalse(self.transport.disconnecting)

    def test_set(self) -> None:
        """A valid set is applied as one list of operations and acknowledged with errno=0."""
        self.proto.dataReceived(b"set=1\nlisten_port=7\nfwmark=3\n\n")
        self.assertEqual(self.transport.value(), b"errno=0\n\n")
        self.assertEqual(self.device.applied, [[SetListenPort(7), SetFwmark(3)]])

    def test_bad_set_changes_nothing(self) -> None:
        """A bad line fails the whole request before the backend sees any of it."""
        self.proto.dataReceived(b"set=1\nlisten_port=7\nfwmark=nope\n\n")
        self.assertEqual(self.transport.value(), b"errno=-22\n\n")
        self.assertEqual(self.device.applied, [])
        self.assertEqual(self.device.listen_port, 0)
        self.assertFalse(self.transport.disconnecting)

    def test_backend_uapi_error(self) -> None:
        """A UAPIError from the backend is sent negated."""
        self.device.busy_ports.add(7)
        self.proto.dataReceived(b"set=1\nlisten_port=7\n\n")
        self.assertEqual(self.transport.value(), b"errno=-98\n\n")

    def test_backend_crash_is_contained(self) -> None:
        """Any other exception becomes errno=-55 and a log line, never a reactor error."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.device.fail_with = RuntimeError("boom")
        self.proto.dataReceived(b"set=1\nprivate_key=" + KEY_A.hex().encode() + b"\n\nget=1\n\n")
        self.assertEqual(self.transport.value(), b"errno=-55\n\nerrno=-55\n\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        for event in events:
            self.assertNotIn(KEY_A.hex(), repr(event))

    def test_several_requests(self) -> None:
        """Requests pipelined on one connection are answered in order."""
        self.proto.dataReceived(b"set=1\nlisten_port=9\n\nget=1\n\nset=1\nbad\n\n")
        self.assertEqual(
            self.transport.value(),
            b"errno=0\n\nlisten_port=9\nerrno=0\n\nerrno=-71\n\n",
        )

    def test_protocol_error_closes(self) -> None:
        """An unknown operation gets an error reply and the connection is closed."""
        self.proto.dataReceived(b"hello\n")
        self.assertEqual(self.transport.value(), b"errno=-71\n\n")
        self.assertTrue(self.transport.disconnecting)

    def test_partial_set_dropped_on_hangup(self) -> None:
        """A set cut off by a hang-up is never applied."""
        self.proto.dataReceived(b"set=1\nlisten_port=7\n")
        self.proto.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(self.device.applied, [])

    def test_incremental_allowed_ip_removal(self) -> None:
        """allowed_ip=-x/y (newer wg's `allowed-ips -x/y`) removes just that prefix."""
        pk = b"public_key=" + PEER_2.hex().encode() + b"\n"
        self.proto.dataReceived(
            b"set=1\n" + pk + b"allowed_ip=10.0.0.0/24\nallowed_ip=10.1.0.0/16\n\n"
        )
        self.proto.dataReceived(b"set=1\n" + pk + b"allowed_ip=-10.0.0.5/24\n\n")
        self.assertEqual(self.transport.value(), b"errno=0\n\n" * 2)
        self.assertEqual(self.device.peers[PEER_2].allowed_ips, [ip_network("10.1.0.0/16")])

    def test_protocol_type(self) -> None:
        """The factory builds UAPIProtocol instances."""
        self.assertIsInstance(self.proto, UAPIProtocol)


class ListenTests(TestCase):
    """listen_uapi on a temporary directory with the real reactor."""

    def setUp(self) -> None:
        self.dir = os.path.join(tempfile.mkdtemp(), "wireguard")
        self.addCleanup(shutil.rmtree, os.path.dirname(self.dir))
        self.device = FakeDevice()

    def listen(self, name: str = "mg0") -> IListeningPort:
        port = listen_uapi(IReactorUNIX(reactor), name, self.device, directory=self.dir)
        self.addCleanup(port.stopListening)
        return port

    def test_creates_directory_and_socket(self) -> None:
        """The directory is 0755 and the socket 0600, whatever the umask."""
        old = os.umask(0)
        try:
            self.listen()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o755)
        mode = os.stat(socket_path("mg0", self.dir)).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    @inlineCallbacks
    def test_socket_removed_on_stop(self) -> Generator[Deferred[Any], Any, None]:
        """stopListening removes the socket file, so wg stops listing the interface."""
        port = self.listen()
        yield maybeDeferred(port.stopListening)
        self.assertFalse(os.path.exists(socket_path("mg0", self.dir)))

    def test_stale_socket_replaced(self) -> None:
        """A socket left by a dead process (connect refused) is unlinked and rebound."""
        os.makedirs(self.dir)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(socket_path("mg0", self.dir))
        stale.close()
        self.listen()
        self.assertTrue(stat.S_ISSOCK(os.stat(socket_path("mg0", self.dir)).st_mode))

    def test_live_socket_refused(self) -> None:
        """If another process answers on NAME.sock, we refuse to start and leave it alone."""
        os.makedirs(self.dir)
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(socket_path("mg0", self.dir))
        live.listen(1)
        with self.assertRaises(InterfaceInUseError) as ctx:
            self.listen()
        self.assertIn("interface mg0 is already served by another process", str(ctx.exception))
        self.assertTrue(os.path.exists(socket_path("mg0", self.dir)))

    def test_not_a_socket_refused(self) -> None:
        """A regular file in the way is not deleted."""
        os.makedirs(self.dir)
        with open(socket_path("mg0", self.dir), "w"):
            pass
        self.assertRaises(OSError, self.listen)

    def test_bad_names(self) -> None:
        """Names wg would reject (empty, too long, with a slash) are refused."""
        for name in ["", "a" * 16, "a/b", ".."]:
            with self.subTest(name=name):
                self.assertRaises(ValueError, socket_path, name)


# --- the real wg tool ----------------------------------------------------------------------------

WG = shutil.which("wg")


WgResult = tuple[str, str, int]


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class RealWgTests(TestCase):
    """The stock ``wg`` binary against our server, which serves an in-memory FakeDevice.

    ``wg`` only looks in /var/run/wireguard, so each test serves a fresh random interface name
    there and removes its socket afterwards.
    """

    def setUp(self) -> None:
        if WG is None:
            raise SkipTest("wg (wireguard-tools) is not installed")
        if os.geteuid() != 0:
            raise SkipTest(f"needs root to serve sockets in {DEFAULT_DIRECTORY}")
        self.name = "mgt" + os.urandom(4).hex()
        self.device = FakeDevice()
        port = listen_uapi(IReactorUNIX(reactor), self.name, self.device)
        self.addCleanup(self._remove_socket)
        self.addCleanup(port.stopListening)
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def _remove_socket(self) -> None:
        try:
            os.unlink(socket_path(self.name))
        except FileNotFoundError:
            pass

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    @inlineCallbacks
    def wg(
        self, *args: str, ok: bool = True
    ) -> Generator[Deferred[Any], Any, tuple[str, str, int]]:
        assert WG is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        out, err, code = yield utils.getProcessOutputAndValue(WG, args, env=env)
        if ok:
            self.assertEqual((code, err), (0, b""), f"wg {' '.join(args)}")
        return out.decode(), err.decode(), code

    def seed(self) -> None:
        """A device with a key, a port and one peer that has seen a handshake."""
        self.device.private_key = KEY_A
        self.device.listen_port = 51820
        self.device.fwmark = 0x1234
        self.device.add_peer(
            PeerStatus(
                public_key=PEER_2,
                preshared_key=bytes([7] * 32),
                endpoint=("2001:db8::1", 51820),
                last_handshake_time=1_700_000_000.5,
                rx_bytes=1024,
                tx_bytes=2048,
                persistent_keepalive=25,
                allowed_ips=[ip_network("10.0.0.0/24"), ip_network("fd00::/64")],
            )
        )

    @inlineCallbacks
    def test_show_dump(self) -> Generator[Deferred[Any], Any, None]:
        """`wg show NAME dump` prints exactly what the backend reports."""
        self.seed()
        out, _, _ = yield self.wg("show", self.name, "dump")
        self.assertEqual(
            out.splitlines(),
            [
                f"{b64(KEY_A)}\t{b64(PEER_1)}\t51820\t0x1234",
                f"{b64(PEER_2)}\t{b64(bytes([7] * 32))}\t[2001:db8::1]:51820\t"
                "10.0.0.0/24,fd00::/64\t1700000000\t1024\t2048\t25",
            ],
        )

    @inlineCallbacks
    def test_show(self) -> Generator[Deferred[Any], Any, None]:
        """`wg show NAME` reads the interface over our socket, keys hidden."""
        self.seed()
        out, _, _ = yield self.wg("show", self.name)
        self.assertIn(f"interface: {self.name}", out)
        self.assertIn(f"public key: {b64(PEER_1)}", out)
        self.assertIn("private key: (hidden)", out)
        self.assertIn("listening port: 51820", out)
        self.assertIn(f"peer: {b64(PEER_2)}", out)
        self.assertIn("allowed ips: 10.0.0.0/24, fd00::/64", out)
        self.assertIn("transfer: 1.00 KiB received, 2.00 KiB sent", out)
        self.assertIn("persistent keepalive: every 25 seconds", out)

    @inlineCallbacks
    def test_showconf(self) -> Generator[Deferred[Any], Any, None]:
        """`wg showconf NAME` gives a config that setconf would accept."""
        self.seed()
        out, _, _ = yield self.wg("showconf", self.name)
        self.assertIn(f"PrivateKey = {b64(KEY_A)}", out)
        self.assertIn("FwMark = 0x1234", out)
        self.assertIn(f"PresharedKey = {b64(bytes([7] * 32))}", out)
        self.assertIn("Endpoint = [2001:db8::1]:51820", out)
        self.assertIn("PersistentKeepalive = 25", out)

    @inlineCallbacks
    def test_set_peer(self) -> Generator[Deferred[Any], Any, None]:
        """`wg set` with a key file, port and a full peer arrives as one operation list."""
        keyfile = self.write("key", b64(KEY_A) + "\n")
        yield self.wg(
            "set", self.name, "private-key", keyfile, "listen-port", "4000",
            "peer", b64(PEER_2), "allowed-ips", "10.0.0.0/24,fd00::/64",
            "endpoint", "127.0.0.1:51820", "persistent-keepalive", "25",
        )  # fmt: skip
        self.assertEqual(
            self.device.applied,
            [
                [
                    SetPrivateKey(KEY_A),
                    SetListenPort(4000),
                    PeerUpdate(
                        public_key=PEER_2,
                        endpoint=("127.0.0.1", 51820),
                        persistent_keepalive=25,
                        replace_allowed_ips=True,
                        allowed_ips=[
                            (True, ip_network("10.0.0.0/24")),
                            (True, ip_network("fd00::/64")),
                        ],
                    ),
                ]
            ],
        )
        out, _, _ = yield self.wg("show", self.name, "dump")
        self.assertEqual(
            out.splitlines()[1],
            f"{b64(PEER_2)}\t(none)\t127.0.0.1:51820\t10.0.0.0/24,fd00::/64\t0\t0\t0\t25",
        )

    @inlineCallbacks
    def test_remove_peer(self) -> Generator[Deferred[Any], Any, None]:
        """`wg set NAME peer PUB remove` removes the peer."""
        self.seed()
        yield self.wg("set", self.name, "peer", b64(PEER_2), "remove")
        self.assertEqual(self.device.applied, [[PeerUpdate(public_key=PEER_2, remove=True)]])
        self.assertEqual(self.device.peers, {})

    @inlineCallbacks
    def test_incremental_allowed_ips(self) -> Generator[Deferred[Any], Any, None]:
        """`allowed-ips +a,-b` sends allowed_ip=-b with newer wg; older wg rejects the syntax."""
        self.seed()
        _, err, code = yield self.wg(
            "set", self.name, "peer", b64(PEER_2), "allowed-ips", "+10.1.0.0/16,-10.0.0.0/24",
            ok=False,
        )  # fmt: skip
        if code != 0 and "Unable to parse IP address" in err:
            self.assertEqual(self.device.applied, [])
            raise SkipTest("this wg predates incremental allowed-ips (wireguard-tools < 2025)")
        self.assertEqual(code, 0, err)
        self.assertEqual(
            self.device.applied,
            [
                [
                    PeerUpdate(
                        public_key=PEER_2,
                        allowed_ips=[
                            (True, ip_network("10.1.0.0/16")),
                            (False, ip_network("10.0.0.0/24")),
                        ],
                    )
                ]
            ],
        )

    @inlineCallbacks
    def test_listen_port_in_use(self) -> Generator[Deferred[Any], Any, None]:
        """A backend EADDRINUSE reaches wg as the right error text."""
        self.device.busy_ports.add(4000)
        _, err, code = yield self.wg("set", self.name, "listen-port", "4000", ok=False)
        self.assertNotEqual(code, 0)
        self.assertIn("Address already in use", err)

    def conf(self) -> str:
        return self.write(
            "wg.conf",
            f"[Interface]\nPrivateKey = {b64(KEY_B)}\nListenPort = 5555\n\n"
            f"[Peer]\nPublicKey = {b64(PEER_1)}\nAllowedIPs = 10.9.0.0/16, fd00::/64\n"
            "Endpoint = 127.0.0.1:1\n",
        )

    def conf_ops(self) -> list[Operation]:
        return [
            PeerUpdate(
                public_key=PEER_1,
                endpoint=("127.0.0.1", 1),
                replace_allowed_ips=True,
                allowed_ips=[(True, ip_network("10.9.0.0/16")), (True, ip_network("fd00::/64"))],
            )
        ]

    @inlineCallbacks
    def test_setconf(self) -> Generator[Deferred[Any], Any, None]:
        """setconf replaces everything: key, port, fwmark 0, replace_peers, then the peers."""
        self.seed()
        yield self.wg("setconf", self.name, self.conf())
        self.assertEqual(
            self.device.applied,
            [[SetPrivateKey(KEY_B), SetListenPort(5555), SetFwmark(0), ReplacePeers(),
              *self.conf_ops()]],
        )  # fmt: skip
        self.assertEqual(list(self.device.peers), [PEER_1])

    @inlineCallbacks
    def test_addconf(self) -> Generator[Deferred[Any], Any, None]:
        """addconf sends only what the file has and keeps other peers."""
        self.seed()
        self.device.add_peer(PeerStatus(public_key=PEER_3))
        yield self.wg("addconf", self.name, self.conf())
        self.assertEqual(
            self.device.applied,
            [[SetPrivateKey(KEY_B), SetListenPort(5555), *self.conf_ops()]],
        )
        # PEER_2 goes too: it is KEY_B's own public key, which wg-go drops as a peer.
        self.assertEqual(set(self.device.peers), {PEER_1, PEER_3})

    @inlineCallbacks
    def test_syncconf(self) -> Generator[Deferred[Any], Any, None]:
        """syncconf reads the device first, then removes the peers the file lacks."""
        self.seed()
        yield self.wg("syncconf", self.name, self.conf())
        self.assertEqual(
            self.device.applied,
            [[SetPrivateKey(KEY_B), SetListenPort(5555), SetFwmark(0),
              PeerUpdate(public_key=PEER_2, remove=True), *self.conf_ops()]],
        )  # fmt: skip
        self.assertEqual(list(self.device.peers), [PEER_1])
        out, _, _ = yield self.wg("show", self.name, "dump")
        self.assertEqual(
            out.splitlines(),
            [
                f"{b64(KEY_B)}\t{b64(PEER_2)}\t5555\toff",
                f"{b64(PEER_1)}\t(none)\t127.0.0.1:1\t10.9.0.0/16,fd00::/64\t0\t0\t0\toff",
            ],
        )

    @inlineCallbacks
    def test_large_setconf(self) -> Generator[Deferred[Any], Any, None]:
        """`wg setconf` with 100,000 allowed IPs (about 3 MB) goes through in one request."""
        nets = [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32" for i in range(100_000)]
        conf = self.write(
            "big.conf",
            f"[Peer]\nPublicKey = {b64(PEER_1)}\n" + "".join(f"AllowedIPs = {n}\n" for n in nets),
        )
        yield self.wg("setconf", self.name, conf)
        (request,) = self.device.applied
        peer = request[-1]
        assert isinstance(peer, PeerUpdate)
        self.assertEqual(len(peer.allowed_ips), 100_000)
        self.assertEqual(peer.allowed_ips[-1], (True, ip_network(nets[-1])))
        out, _, _ = yield self.wg("show", self.name, "allowed-ips")
        self.assertEqual(len(out.split()), 100_001)

    @inlineCallbacks
    def test_backend_crash(self) -> Generator[Deferred[Any], Any, None]:
        """A crashing backend gives wg an error (errno 55), and the server keeps serving."""
        self.device.fail_with = RuntimeError("boom")
        _, err, code = yield self.wg("show", self.name, ok=False)
        self.assertNotEqual(code, 0)
        self.assertIn("Unable to access interface", err)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.device.fail_with = None
        yield self.wg("show", self.name)
