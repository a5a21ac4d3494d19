"""UDPTransport on real loopback sockets (no root needed), driven without a reactor."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from meshguard.adapters import udp
from meshguard.adapters.idle_gap import IdleGap
from meshguard.adapters.udp import SO_MARK, UDPBindError, UDPError, UDPTransport


class FakeReactor:
    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


class QueueSocket:
    """A UDP socket whose ``recvmsg`` hands out ``queue``'s entries, then would block."""

    def __init__(self, queue: list[Any]) -> None:
        self.queue = queue

    def fileno(self) -> int:
        return 99

    def recvmsg(self, size: int, ancsize: int) -> Any:
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "again")
        item = self.queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def recvmsg_into(self, buffers: list[bytearray], ancsize: int) -> Any:
        """As the kernel does: the next entry's data copied into the one buffer given."""
        data, anc, flags, address = self.recvmsg(len(buffers[0]), ancsize)
        buffers[0][: len(data)] = data
        return len(data), anc, flags, address


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class UDPTransportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.batches = 0
        self.transport = UDPTransport(
            self.received_datagram,
            self.reactor,
            0,
            on_batch_end=self.batch_end,
            idle=IdleGap(Clock().seconds),
        )
        self.port = self.transport.bind()
        self.addCleanup(self.transport.close)
        self.transport.start_reading()

    def received_datagram(self, data: bytes, source: tuple[str, int], now: float) -> None:
        self.received.append((data, source))
        if not data.startswith(b"spoofed"):
            self.transport.confirm_source(source)  # as the device does when it authenticates

    def batch_end(self) -> None:
        self.batches += 1

    def client(self, family: socket.AddressFamily, host: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.settimeout(5)
        return sock

    def pump(self, count: int, timeout: float = 5.0) -> None:
        """Run the registered readers until ``count`` datagrams arrived (bounded)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"only {len(self.received)} of {count} datagrams arrived")
            ready, _, _ = select.select(self.reactor.readers, [], [], remaining)
            for reader in ready:
                reader.doRead()

    def test_binds_v4_and_v6_on_one_port(self) -> None:
        """Port 0 picks one random port shared by the IPv4 and the IPv6-only socket."""
        self.assertNotEqual(self.port, 0)
        self.assertEqual(self.transport.local_port, self.port)
        sock4, sock6 = self.transport._sock4, self.transport._sock6
        assert sock4 is not None
        self.assertEqual(sock4.getsockname()[1], self.port)
        if sock6 is not None:
            self.assertEqual(sock6.getsockname()[1], self.port)
            self.assertEqual(sock6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)
        self.assertEqual(len(self.reactor.readers), 2 if sock6 is not None else 1)

    def test_socket_buffers_enlarged(self) -> None:
        """Receive buffers are raised well past the usual 208 KiB default."""
        sock4 = self.transport._sock4
        assert sock4 is not None
        size = sock4.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if os.geteuid() == 0:
            self.assertGreaterEqual(size, udp.SOCKET_BUFFER)

    def test_receive_and_reply_v4(self) -> None:
        """A datagram's source comes out as (host, port) and send() answers it."""
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"ping", ("127.0.0.1", self.port))
        self.pump(1)
        data, source = self.received[0]
        self.assertEqual((data, source), (b"ping", client.getsockname()))
        self.assertEqual(self.batches, 1)
        self.transport.send(b"pong", source)
        self.assertEqual(client.recvfrom(100), (b"pong", ("127.0.0.1", self.port)))

    def test_receive_and_reply_v6(self) -> None:
        """IPv6 sources are plain (host, port) pairs that send() accepts."""
        if not _has_ipv6() or self.transport._sock6 is None:
            raise SkipTest("no IPv6 loopback")
        client = self.client(socket.AF_INET6, "::1")
        client.sendto(b"ping6", ("::1", self.port))
        self.pump(1)
        _data, source = self.received[0]
        self.assertEqual(source, ("::1", client.getsockname()[1]))
        self.transport.send(b"pong6", source)
        reply, address = client.recvfrom(100)
        self.assertEqual((reply, address[:2]), (b"pong6", ("::1", self.port)))

    def test_sticky_source(self) -> None:
        """A reply leaves from the local address the peer reached (127.0.0.2 here), not the
        route's default source (127.0.0.1)."""
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"to .2", ("127.0.0.2", self.port))
        self.pump(1)
        self.transport.send(b"reply", self.received[0][1])
        self.assertEqual(client.recvfrom(100), (b"reply", ("127.0.0.2", self.port)))
        # Then the peer moves to .1: replies follow.
        client.sendto(b"to .1", ("127.0.0.1", self.port))
        self.pump(2)
        self.transport.send(b"reply", self.received[1][1])
        self.assertEqual(client.recvfrom(100), (b"reply", ("127.0.0.1", self.port)))

    def test_unauthenticated_datagram_does_not_move_the_source(self) -> None:
        """A datagram that does not authenticate (a spoofed one, say) leaves the learned local
        address alone: replies keep leaving from where the real peer reached us."""
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"to .2", ("127.0.0.2", self.port))
        self.pump(1)
        client.sendto(b"spoofed, to .1", ("127.0.0.1", self.port))
        self.pump(2)
        self.transport.send(b"reply", self.received[0][1])
        self.assertEqual(client.recvfrom(100), (b"reply", ("127.0.0.2", self.port)))
        self.assertIsNone(self.transport._pending_source)

    def test_unauthenticated_datagrams_learn_nothing(self) -> None:
        """New endpoints that never authenticate take no memory at all."""
        clients = [self.client(socket.AF_INET, "127.0.0.1") for _ in range(3)]
        for n, client in enumerate(clients, 1):
            client.sendto(b"spoofed", ("127.0.0.2", self.port))
            self.pump(n)
        self.assertEqual(self.transport._sources, {})

    def test_default_source_uses_plain_sendto(self) -> None:
        """When the learned source is what routing picks anyway, no ancillary data is kept,
        so sends stay on the cheaper sendto."""
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"x", ("127.0.0.1", self.port))
        self.pump(1)
        source = self.received[0][1]
        self.transport.send(b"y", source)
        self.assertIsNone(self.transport._sources[source][1])
        self.assertEqual(client.recvfrom(100)[0], b"y")

    def test_vanished_sticky_source_falls_back(self) -> None:
        """A learned source address that no longer exists is forgotten and the datagram is sent
        from the default source instead."""
        client = self.client(socket.AF_INET, "127.0.0.1")
        source = client.getsockname()
        gone = socket.inet_aton("192.0.2.77")  # TEST-NET-1: not configured on this host
        self.transport._sources[source] = (udp._IN_PKTINFO.pack(1, gone, gone), udp._UNDECIDED)
        self.transport.send(b"still", source)
        self.assertEqual(client.recvfrom(100), (b"still", ("127.0.0.1", self.port)))
        self.assertIsNone(self.transport._sources[source][1])
        self.assertEqual((self.transport.send_errors, self.transport.send_drops), (0, 0))

    def test_source_cache_bounded(self) -> None:
        """The table of learned sources has a hard bound."""
        self.patch(udp, "MAX_SOURCES", 3)
        clients = [self.client(socket.AF_INET, "127.0.0.1") for _ in range(5)]
        for n, client in enumerate(clients, 1):
            client.sendto(b"x", ("127.0.0.1", self.port))
            self.pump(n)
        self.assertLessEqual(len(self.transport._sources), 3)

    def test_send_errors_are_counted_not_raised(self) -> None:
        """A datagram the kernel refuses (too big here) is counted and dropped."""
        self.transport.send(b"x" * 70000, ("127.0.0.1", 9))
        self.transport.send(b"x", ("::1", 0))
        self.assertEqual(self.transport.send_errors + self.transport.send_drops, 2)

    def test_send_without_socket_family(self) -> None:
        """With no IPv6 socket, sending to an IPv6 endpoint is a counted error."""
        self.transport.close()
        self.transport.send(b"x", ("::1", 9))
        self.transport.send(b"x", ("127.0.0.1", 9))
        self.assertEqual(self.transport.send_errors, 2)

    def test_port_in_use(self) -> None:
        """A taken port is one clear line."""
        other = UDPTransport(self.received_datagram, self.reactor, self.port)
        with self.assertRaises(UDPBindError) as cm:
            other.bind()
        self.assertEqual(str(cm.exception), f"UDP port {self.port} is already in use")

    def test_rebind(self) -> None:
        """rebind() moves to a new port, keeps reading, and closes the old sockets."""
        old = self.port
        old_readers = list(self.reactor.readers)
        new = self.transport.rebind(0)
        self.assertNotEqual(new, old)
        self.assertEqual(self.transport.local_port, new)
        self.assertEqual(len(self.reactor.readers), len(old_readers))
        for reader in old_readers:
            self.assertNotIn(reader, self.reactor.readers)
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"new port", ("127.0.0.1", new))
        self.pump(1)
        self.assertEqual(self.received[0][0], b"new port")
        # The old port is free again.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", old))
        self.assertEqual(self.transport.rebind(new), new)

    def test_failed_rebind_keeps_old_sockets(self) -> None:
        """If the new port is taken, the old sockets stay in service."""
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(blocker.close)
        blocker.bind(("0.0.0.0", 0))
        taken = blocker.getsockname()[1]
        readers = list(self.reactor.readers)
        self.assertRaises(UDPBindError, self.transport.rebind, taken)
        self.assertEqual(self.transport.local_port, self.port)
        self.assertEqual(self.reactor.readers, readers)
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"old port", ("127.0.0.1", self.port))
        self.pump(1)

    def test_receiver_exception_logged(self) -> None:
        """A failing handler is logged and counted; the next datagram still arrives."""
        calls: list[bytes] = []

        def receiver(data: bytes, source: tuple[str, int], now: float) -> None:
            calls.append(data)
            if data == b"bad":
                raise ValueError("boom")
            self.received.append((data, source))

        self.transport.receiver = receiver
        client = self.client(socket.AF_INET, "127.0.0.1")
        client.sendto(b"bad", ("127.0.0.1", self.port))
        client.sendto(b"good", ("127.0.0.1", self.port))
        self.pump(1)
        self.assertEqual(calls, [b"bad", b"good"])
        self.assertEqual(self.transport.receiver_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_batch_budget(self) -> None:
        """One event reads at most batch_packets datagrams, then ends the batch."""
        self.transport.batch_packets = 2
        client = self.client(socket.AF_INET, "127.0.0.1")
        for i in range(3):
            client.sendto(bytes([i]), ("127.0.0.1", self.port))
        # Loopback delivery completes inside sendto, so all three are queued now.
        self.reactor.readers[0].doRead()
        self.assertEqual(len(self.received), 2)
        self.assertEqual(self.batches, 1)
        self.pump(3)

    def test_fwmark(self) -> None:
        """set_fwmark marks both sockets (root) or says clearly why it cannot."""
        if os.geteuid() != 0:
            self.assertRaises(UDPError, self.transport.set_fwmark, 0x51820)
            return
        self.transport.set_fwmark(0x51820)
        for sock in (self.transport._sock4, self.transport._sock6):
            if sock is not None:
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, SO_MARK), 0x51820)
        self.assertEqual(self.transport.rebind(0), self.transport.local_port)
        sock4 = self.transport._sock4
        assert sock4 is not None
        self.assertEqual(sock4.getsockopt(socket.SOL_SOCKET, SO_MARK), 0x51820)


class ScopedAddressTests(SynchronousTestCase):
    def test_normalised_sources(self) -> None:
        """IPv4-mapped sources from the IPv6 socket come out as plain IPv4."""
        received: list[tuple[bytes, tuple[str, int]]] = []

        queue: list[Any] = [
            (b"a", [], 0, ("::ffff:192.0.2.1", 5, 0, 0)),
            (b"b", [], 0, ("fe80::1%lo", 6, 0, 1)),
        ]

        transport = UDPTransport(
            lambda d, s, now: received.append((d, s)),
            FakeReactor(),
            0,
            idle=IdleGap(Clock().seconds),
        )
        reader = udp._Reader(transport, QueueSocket(queue), True)  # type: ignore[arg-type]
        reader.doRead()
        self.assertEqual(received, [(b"a", ("192.0.2.1", 5)), (b"b", ("fe80::1%lo", 6))])


# -- UDP GSO and GRO ----------------------------------------------------------------------------

V4_PEER = ("192.0.2.1", 51820)


V4_OTHER = ("192.0.2.2", 51820)
V6_PEER = ("2001:db8::1", 51820)


class FakeSocket:
    """A UDP socket that records what would be sent (as ``("sendto"|"gso", address, parts)``)
    and can be told to fail GSO sends or to lack the offloads."""

    def __init__(self, log: list[tuple[str, Any, list[bytes], Any]], fd: int) -> None:
        self.log = log
        self.fd = fd
        self.gso_supported = True
        self.gso_error: int | None = None
        #: Every plain ``sendto`` fails with this errno when set.
        self.send_error: int | None = None
        self.options: dict[tuple[int, int], int] = {}

    def fileno(self) -> int:
        return self.fd

    def getsockopt(self, level: int, option: int) -> int:
        if (level, option) == (udp.SOL_UDP, udp.UDP_SEGMENT) and not self.gso_supported:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return self.options.get((level, option), 0)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if level == udp.SOL_UDP and not self.gso_supported:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        self.options[(level, option)] = value

    def sendto(self, data: bytes, address: Any) -> int:
        if self.send_error is not None:
            raise OSError(self.send_error, os.strerror(self.send_error))
        self.log.append(("sendto", address, [data], None))
        return len(data)

    def sendmsg(self, buffers: list[bytes], anc: Any, flags: int, address: Any) -> int:
        gso = [c for c in anc if c[:2] == (udp.SOL_UDP, udp.UDP_SEGMENT)]
        if gso and self.gso_error is not None:
            raise OSError(self.gso_error, os.strerror(self.gso_error))
        kind = "gso" if gso else "sendmsg"
        self.log.append((kind, address, list(buffers), list(anc)))
        return sum(map(len, buffers))

    def close(self) -> None:
        pass


def _segment(anc: Any) -> int:
    (value,) = [c[2] for c in anc if c[:2] == (udp.SOL_UDP, udp.UDP_SEGMENT)]
    size: int = udp._SEGMENT_SIZE.unpack(value)[0]
    return size


class GSOSendTests(SynchronousTestCase):
    """Batching on fake sockets: which datagrams leave together, in which order, and the
    fallbacks when the kernel refuses."""

    def setUp(self) -> None:
        self.log: list[tuple[str, Any, list[bytes], Any]] = []
        self.sock4 = FakeSocket(self.log, 100)
        self.sock6 = FakeSocket(self.log, 101)
        self.transport = self.install()

    def install(self) -> UDPTransport:
        transport = UDPTransport(lambda d, s, now: None, FakeReactor(), 0)
        transport._install(self.sock4, self.sock6, 4242)  # type: ignore[arg-type]
        return transport

    def sent(self) -> list[tuple[str, Any, list[bytes]]]:
        return [(kind, address, parts) for kind, address, parts, _anc in self.log]

    def test_offloads_probed_and_reported(self) -> None:
        """Installing a socket turns GRO on and finds GSO usable; status says so."""
        self.assertEqual(self.sock4.options[(udp.SOL_UDP, udp.UDP_GRO)], 1)
        status = self.transport.offload_status()
        self.assertEqual((status["gso"], status["gro"]), ("ipv4 ipv6", "ipv4 ipv6"))

    def test_not_held_sends_at_once(self) -> None:
        """Outside a hold (timers, handshakes) every datagram is a plain sendto at once."""
        self.transport.send(b"a" * 10, V4_PEER)
        self.transport.send(b"b" * 10, V4_PEER)
        self.assertEqual(
            self.sent(), [("sendto", V4_PEER, [b"a" * 10]), ("sendto", V4_PEER, [b"b" * 10])]
        )

    def test_held_run_leaves_as_one_gso_send(self) -> None:
        """Same-size datagrams held for one endpoint leave as one sendmsg whose UDP_SEGMENT is
        their size, at flush and not before."""
        self.transport.hold()
        parts = [bytes([i]) * 100 for i in range(5)]
        for part in parts:
            self.transport.send(part, V4_PEER)
        self.assertEqual(self.log, [])
        self.transport.flush()
        ((kind, address, buffers, anc),) = self.log
        self.assertEqual((kind, address, buffers), ("gso", V4_PEER, parts))
        self.assertEqual(_segment(anc), 100)
        self.assertEqual((self.transport.gso_sends, self.transport.gso_datagrams), (1, 5))
        self.assertEqual(self.transport.held_datagrams, 5)

    def test_shorter_datagram_ends_the_run(self) -> None:
        """Only the last segment may be shorter: a short datagram joins the run and sends it."""
        self.transport.hold()
        for size in (100, 100, 40):
            self.transport.send(b"x" * size, V4_PEER)
        self.assertEqual(self.sent(), [("gso", V4_PEER, [b"x" * 100, b"x" * 100, b"x" * 40])])
        self.transport.send(b"y" * 100, V4_PEER)
        self.transport.flush()
        self.assertEqual(self.sent()[1:], [("sendto", V4_PEER, [b"y" * 100])])

    def test_larger_datagram_flushes_first(self) -> None:
        """A larger datagram cannot join: the run leaves first, then it starts the next one."""
        self.transport.hold()
        for data in (b"a" * 50, b"b" * 50, b"c" * 60, b"d" * 60):
            self.transport.send(data, V4_PEER)
        self.transport.flush()
        self.assertEqual(
            self.sent(),
            [("gso", V4_PEER, [b"a" * 50, b"b" * 50]), ("gso", V4_PEER, [b"c" * 60, b"d" * 60])],
        )

    def test_run_of_one_is_a_plain_send(self) -> None:
        """A lone held datagram needs no GSO: it leaves with sendto."""
        self.transport.hold()
        self.transport.send(b"alone", V4_PEER)
        self.transport.flush()
        self.assertEqual(self.sent(), [("sendto", V4_PEER, [b"alone"])])
        self.assertEqual(self.transport.gso_sends, 0)

    def test_run_limits(self) -> None:
        """Runs are cut at GSO_MAX_SEGMENTS datagrams and at GSO_MAX_BYTES."""
        self.patch(udp, "GSO_MAX_SEGMENTS", 4)
        self.transport.hold()
        for i in range(10):
            self.transport.send(bytes([i]) * 10, V4_PEER)
        self.transport.flush()
        self.assertEqual([len(parts) for _k, _a, parts in self.sent()], [4, 4, 2])
        del self.log[:]
        self.patch(udp, "GSO_MAX_BYTES", 25)
        self.transport.hold()
        for i in range(5):
            self.transport.send(bytes([i]) * 10, V4_PEER)
        self.transport.flush()
        self.assertEqual([len(parts) for _k, _a, parts in self.sent()], [2, 2, 1])

    def test_endpoints_have_separate_runs(self) -> None:
        """Interleaved datagrams to two peers leave as one run per peer, IPv4 and IPv6."""
        self.transport.hold()
        for _ in range(3):
            self.transport.send(b"4" * 30, V4_PEER)
            self.transport.send(b"6" * 30, V6_PEER)
        self.transport.flush()
        self.assertEqual(
            sorted(self.sent()),
            [("gso", V4_PEER, [b"4" * 30] * 3), ("gso", V6_PEER, [b"6" * 30] * 3)],
        )

    def test_unheld_send_is_send_now(self) -> None:
        """``send`` carries ``_send_now``'s body inline (one call on a lone packet's way):
        side by side, both send the same way to a plain, a sticky-source and an IPv6
        endpoint, and count the same errors."""
        control = (socket.IPPROTO_IP, udp.IP_PKTINFO, b"\0" * 12)
        results = []
        for inline in (True, False):
            self.log.clear()
            self.transport = self.install()
            self.transport._sources[("192.0.2.7", 5)] = (b"\0" * 12, [control])
            send = self.transport.send if inline else self.transport._send_now
            for endpoint in (V4_PEER, ("192.0.2.7", 5), V6_PEER):
                send(b"x" * 20, endpoint)
            for error in (errno.ENOBUFS, errno.EPERM):
                self.sock4.send_error = error
                send(b"y", V4_PEER)
            self.sock4.send_error = None
            results.append((list(self.log), self.transport.send_drops, self.transport.send_errors))
        self.assertEqual(results[0], results[1])
        self.assertEqual([kind for kind, *_rest in results[0][0]], ["sendto", "sendmsg", "sendto"])
        self.assertEqual(results[0][1:], (1, 1))

    def test_sticky_source_combined_with_gso(self) -> None:
        """A run toward a peer answered from a non-default address carries both the packet
        info and the segment size."""
        control = (socket.IPPROTO_IP, udp.IP_PKTINFO, b"\0" * 12)
        self.transport._sources[V4_PEER] = (b"\0" * 12, [control])
        self.transport.hold()
        self.transport.send(b"x" * 20, V4_PEER)
        self.transport.send(b"x" * 20, V4_PEER)
        self.transport.flush()
        ((kind, _address, _parts, anc),) = self.log
        self.assertEqual(kind, "gso")
        self.assertEqual(anc[0], control)
        self.assertEqual(_segment(anc), 20)

    def test_probe_is_never_held(self) -> None:
        """A path MTU probe leaves at once, after what was held for its peer."""
        self.transport.hold()
        self.transport.send(b"d" * 10, V4_PEER)
        self.transport.send(b"d" * 10, V4_PEER)
        self.assertTrue(self.transport.send_probe(b"probe", V4_PEER))
        self.assertEqual(
            self.sent(), [("gso", V4_PEER, [b"d" * 10] * 2), ("sendto", V4_PEER, [b"probe"])]
        )

    def test_close_sends_what_was_held(self) -> None:
        """Closing (or rebinding) sends held datagrams on the old socket first."""
        self.transport.hold()
        self.transport.send(b"last", V4_PEER)
        self.transport.close()
        self.assertEqual(self.sent(), [("sendto", V4_PEER, [b"last"])])
        self.transport.send(b"x", V4_PEER)  # closed: counted, not held
        self.assertEqual(self.transport.send_errors, 1)

    def test_unsupported_device_turns_gso_off_for_the_socket(self) -> None:
        """EIO (no checksum offload) resends the run one by one and turns GSO off for that
        socket for good; the other family keeps it."""
        self.sock4.gso_error = errno.EIO
        self.transport.hold()
        for _ in range(3):
            self.transport.send(b"x" * 10, V4_PEER)
            self.transport.send(b"y" * 10, V6_PEER)
        self.transport.flush()
        self.assertEqual(sorted(k for k, _a, _p in self.sent()), ["gso"] + ["sendto"] * 3)
        self.assertEqual(self.transport.gso_disabled, 1)
        self.assertEqual(self.transport.offload_status()["gso"], "ipv6")
        self.flushLoggedErrors()
        del self.log[:]
        self.transport.hold()
        self.transport.send(b"x" * 10, V4_PEER)
        self.assertEqual(self.sent(), [("sendto", V4_PEER, [b"x" * 10])])
        self.transport.flush()

    def test_refused_run_resent_and_endpoint_remembered(self) -> None:
        """EINVAL/EMSGSIZE (e.g. a learned path MTU below the segment size) resends that run
        one by one and keeps that endpoint on separate datagrams; others still use GSO."""
        for code, endpoint in ((errno.EINVAL, V4_PEER), (errno.EMSGSIZE, V4_OTHER)):
            self.sock4.gso_error = code
            self.transport.hold()
            self.transport.send(b"x" * 10, endpoint)
            self.transport.send(b"x" * 10, endpoint)
            self.transport.flush()
            self.assertEqual(self.sent(), [("sendto", endpoint, [b"x" * 10])] * 2)
            del self.log[:]
        self.assertEqual(self.transport.gso_refused, 2)
        self.sock4.gso_error = None
        third = ("192.0.2.3", 51820)
        self.transport.hold()
        for endpoint in (V4_PEER, V4_OTHER, third, V4_PEER, V4_OTHER, third):
            self.transport.send(b"z" * 10, endpoint)
        self.transport.flush()
        self.assertEqual(
            self.sent(),
            [("sendto", endpoint, [b"z" * 10]) for endpoint in (V4_PEER, V4_OTHER)] * 2
            + [("gso", third, [b"z" * 10] * 2)],
        )
        # Forgetting sources (addresses or routes changed) gives GSO another chance.
        self.transport.forget_sources()
        self.assertEqual(self.transport._gso_refused, set())

    def test_back_pressure_drops_the_run(self) -> None:
        """A full send queue drops the whole run, counted per datagram, without retrying."""
        self.sock4.gso_error = errno.ENOBUFS
        self.transport.hold()
        for _ in range(4):
            self.transport.send(b"x" * 10, V4_PEER)
        self.transport.flush()
        self.assertEqual((self.log, self.transport.send_drops), ([], 4))

    def test_other_errors_counted(self) -> None:
        """Other errors (a firewall's EPERM) count every datagram of the run as not sent."""
        self.sock4.gso_error = errno.EPERM
        self.transport.hold()
        for _ in range(3):
            self.transport.send(b"x" * 10, V4_PEER)
        self.transport.flush()
        self.assertEqual((self.log, self.transport.send_errors), ([], 3))

    def test_no_gso_in_kernel(self) -> None:
        """Without UDP_SEGMENT (old kernel) nothing is held: sends go out at once."""
        self.sock4.gso_supported = self.sock6.gso_supported = False
        transport = self.install()
        self.assertEqual(transport.offload_status()["gso"], "off")
        self.assertEqual(transport.offload_status()["gro"], "off")
        transport.hold()
        transport.send(b"x", V4_PEER)
        self.assertEqual(self.sent(), [("sendto", V4_PEER, [b"x"])])

    def test_switched_off(self) -> None:
        """USE_GSO = False keeps one datagram per call even where the kernel could batch."""
        self.patch(udp, "USE_GSO", False)
        transport = self.install()
        transport.hold()
        transport.send(b"x", V4_PEER)
        transport.send(b"x", V4_PEER)
        self.assertEqual(len(self.log), 2)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([V4_PEER, V4_OTHER, V6_PEER]),
                st.integers(min_value=1, max_value=120),
                st.booleans(),  # flush after this datagram
            ),
            max_size=60,
        )
    )
    def test_order_and_gso_rule_hold(self, plan: list[tuple[Any, int, bool]]) -> None:
        """For any sequence, each endpoint receives exactly its datagrams in order, and every
        GSO send obeys the kernel's rule and the limits."""
        self.patch(udp, "GSO_MAX_SEGMENTS", 5)
        self.patch(udp, "GSO_MAX_BYTES", 300)
        del self.log[:]
        expected: dict[Any, list[bytes]] = {}
        self.transport.hold()
        for n, (endpoint, size, flush) in enumerate(plan):
            data = n.to_bytes(2, "big") + b"." * size
            expected.setdefault(endpoint, []).append(data)
            self.transport.send(data, endpoint)
            if flush:
                self.transport.flush()
                self.transport.hold()
        self.transport.flush()
        got: dict[Any, list[bytes]] = {}
        for kind, address, parts, anc in self.log:
            got.setdefault(address, []).extend(parts)
            if kind == "gso":
                segment = _segment(anc)
                self.assertGreaterEqual(len(parts), 2)
                self.assertLessEqual(len(parts), 5)
                self.assertLessEqual(sum(map(len, parts)), 300)
                self.assertTrue(all(len(p) == segment for p in parts[:-1]))
                self.assertLessEqual(len(parts[-1]), segment)
        self.assertEqual(got, expected)


class LoneReadTests(SynchronousTestCase):
    """The lone batch's own read (in ``_Reader.doRead``): what it hands on, with which time,
    and everything unusual handed to the batch loop as before."""

    def run_reads(
        self, queue: list[Any], idle: bool = True, v6: bool = False
    ) -> tuple[list[object], UDPTransport, Clock]:
        events: list[object] = []
        self.pending: list[object] = []
        clock = Clock()

        def receiver(data: bytes, source: Any, now: float) -> None:
            events.append((data, source, now))
            self.pending.append(transport._pending_source)
            clock.advance(0.001)  # the clock moves on while the batch runs

        transport = UDPTransport(
            receiver,
            FakeReactor(),
            0,
            on_batch_start=lambda: events.append("start"),
            on_batch_end=lambda: events.append("end"),
            batch_receiver=lambda parts, source, now: events.append((parts, source, now)),
            idle=IdleGap(clock.seconds),
        )
        if idle:
            clock.advance(transport.idle.gap)
        reader = udp._Reader(transport, QueueSocket(queue), v6)  # type: ignore[arg-type]
        reader.doRead()
        return events, transport, clock

    def test_lone_datagram_with_the_batch_time(self) -> None:
        """A lone plain datagram goes on with the time read at the batch's start, alone, and
        the batch ends; its packet info is pending for the receiver (learned only if it
        authenticates) and cleared after."""
        info = udp._IN_PKTINFO.pack(1, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.1"))
        queue: list[Any] = [
            (b"one", [(socket.IPPROTO_IP, udp.IP_PKTINFO, info)], 0, V4_PEER),
            (b"two", [], 0, V4_PEER),
        ]
        events, transport, _clock = self.run_reads(queue)
        self.assertEqual(events, [(b"one", V4_PEER, transport.idle.gap), "end"])
        self.assertEqual(transport.reads, 1)
        self.assertEqual(self.pending, [(V4_PEER, info)])
        self.assertIsNone(transport._pending_source)
        self.assertEqual(len(queue), 1)

    def test_busy_batch_hands_on_one_time(self) -> None:
        """Every datagram of a busy batch (and each GRO buffer) carries the time of the
        batch's start, however long the batch takes."""
        gro = (udp.SOL_UDP, udp.UDP_GRO, udp._GRO_SIZE.pack(2))
        queue: list[Any] = [(b"a", [], 0, V4_PEER), (b"bbcc", [gro], 0, V4_PEER)]
        events, _transport, _clock = self.run_reads(queue, idle=False)
        self.assertEqual(
            events,
            ["start", (b"a", V4_PEER, 0.0), ([b"bb", b"cc"], V4_PEER, 0.0), "end"],
        )

    def test_lone_read_of_a_gro_buffer_is_a_batch(self) -> None:
        """A GRO buffer read first by a lone batch is held as a whole (the start hook before
        it) and the batch goes on reading."""
        gro = (udp.SOL_UDP, udp.UDP_GRO, udp._GRO_SIZE.pack(2))
        queue: list[Any] = [(b"aabb", [gro], 0, V4_PEER), (b"c", [], 0, V4_PEER)]
        events, transport, _clock = self.run_reads(queue)
        now = transport.idle.gap
        self.assertEqual(
            events, ["start", ([b"aa", b"bb"], V4_PEER, now), (b"c", V4_PEER, now), "end"]
        )
        self.assertEqual((transport.reads, transport.gro_reads), (2, 1))

    def test_lone_read_errors(self) -> None:
        """Nothing queued ends the lone batch; a failed read is counted and ends it; an
        interrupted one is read again."""
        events, transport, _clock = self.run_reads([])
        self.assertEqual((events, transport.reads), (["end"], 0))
        events, transport, _clock = self.run_reads(
            [OSError(errno.ECONNREFUSED, "refused"), (b"x", [], 0, V4_PEER)]
        )
        self.assertEqual((events, transport.receive_errors, transport.reads), (["end"], 1, 0))
        events, transport, _clock = self.run_reads(
            [InterruptedError(errno.EINTR, "intr"), (b"x", [], 0, V4_PEER), (b"y", [], 0, V4_PEER)]
        )
        now = transport.idle.gap
        self.assertEqual(events, [(b"x", V4_PEER, now), "end"])

    def test_lone_v6_mapped_source(self) -> None:
        """On the IPv6 socket a lone datagram's IPv4-mapped source comes out as plain IPv4."""
        events, _t, _c = self.run_reads([(b"m", [], 0, ("::ffff:192.0.2.1", 5, 0, 0))], v6=True)
        self.assertEqual(events[0][:2], (b"m", ("192.0.2.1", 5)))  # type: ignore[index]


class GRODeliveryTests(SynchronousTestCase):
    """Cutting coalesced reads back into datagrams, on a fake socket."""

    def read(self, queue: list[Any], v6: bool = False) -> tuple[list[Any], UDPTransport]:
        received: list[tuple[bytes, tuple[str, int]]] = []

        def receive(data: bytes, source: Any, now: float) -> None:
            received.append((data, source))
            transport.confirm_source(source)

        transport = UDPTransport(receive, FakeReactor(), 0, idle=IdleGap(Clock().seconds))
        udp._Reader(transport, QueueSocket(queue), v6).doRead()  # type: ignore[arg-type]
        return received, transport

    def test_coalesced_buffer_is_split(self) -> None:
        """A buffer with a UDP_GRO segment size becomes its datagrams, each from the same
        source, and the local address it reached is learned (in either control order)."""
        info = udp._IN_PKTINFO.pack(1, socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.1"))
        gro = (udp.SOL_UDP, udp.UDP_GRO, udp._GRO_SIZE.pack(4))
        pktinfo = (socket.IPPROTO_IP, udp.IP_PKTINFO, info)
        source = ("192.0.2.9", 7)
        received, transport = self.read(
            [
                (b"aaaabbbbcc", [gro, pktinfo], 0, source),
                (b"ddddeeee", [pktinfo, gro], 0, source),
                (b"single", [pktinfo], 0, source),
                (b"abcd", [gro, pktinfo], 0, source),  # one segment: nothing to split
            ]
        )
        self.assertEqual(
            [d for d, _s in received],
            [b"aaaa", b"bbbb", b"cc", b"dddd", b"eeee", b"single", b"abcd"],
        )
        self.assertEqual({s for _d, s in received}, {source})
        self.assertEqual(transport._sources[source][0], info)
        self.assertEqual((transport.reads, transport.gro_reads, transport.gro_datagrams), (4, 2, 5))

    def test_batch_receiver_gets_views_of_one_buffer(self) -> None:
        """A busy batch reads into one buffer per socket: the batch receiver gets each GRO
        read's datagrams as views of it (read before the next read overwrites it), and a
        plain datagram, which the receiver may keep, comes as ``bytes``."""
        gro = (udp.SOL_UDP, udp.UDP_GRO, udp._GRO_SIZE.pack(4))
        seen: list[tuple[list[bytes], set[type], set[int]]] = []
        plain: list[object] = []

        def batch(parts: list[Any], source: Any, now: float) -> None:
            seen.append(
                ([bytes(p) for p in parts], {type(p) for p in parts}, {id(p.obj) for p in parts})
            )

        transport = UDPTransport(
            lambda data, source, now: plain.append(data),
            FakeReactor(),
            0,
            batch_receiver=batch,
            idle=IdleGap(Clock().seconds),
        )
        queue: list[Any] = [
            (b"plain", [], 0, V4_PEER),
            (b"aaaabbbbcc", [gro], 0, V4_PEER),
            (b"ddddeeee", [gro], 0, V4_PEER),
            (b"single", [], 0, V4_PEER),
        ]
        reader = udp._Reader(transport, QueueSocket(queue), False)  # type: ignore[arg-type]
        transport.idle.batch_begins(reader)  # a busy batch: every read goes through the buffer
        reader.doRead()
        self.assertEqual([s[0] for s in seen], [[b"aaaa", b"bbbb", b"cc"], [b"dddd", b"eeee"]])
        self.assertEqual([s[1] for s in seen], [{memoryview}, {memoryview}])
        self.assertEqual(seen[0][2], seen[1][2], "one buffer, reused")
        self.assertEqual(len(seen[0][2]), 1)
        self.assertEqual(plain, [b"plain", b"single"])
        self.assertEqual({type(d) for d in plain}, {bytes})

    def test_receiver_error_in_a_coalesced_buffer(self) -> None:
        """A handler that raises on one datagram of a buffer still gets the rest."""
        calls: list[bytes] = []

        def receiver(data: bytes, source: Any, now: float) -> None:
            calls.append(data)
            if data == b"bb":
                raise ValueError("boom")

        transport = UDPTransport(receiver, FakeReactor(), 0, idle=IdleGap(Clock().seconds))
        queue = [(b"aabbcc", [(udp.SOL_UDP, udp.UDP_GRO, udp._GRO_SIZE.pack(2))], 0, V4_PEER)]

        udp._Reader(transport, QueueSocket(queue), False).doRead()  # type: ignore[arg-type]
        self.assertEqual(calls, [b"aa", b"bb", b"cc"])
        self.assertEqual(transport.receiver_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def hook_order(self, first: Any, idle: bool = False) -> list[object]:
        """What a read batch of ``first`` and one plain datagram hands out, hooks included;
        ``idle``: the batch follows an idle gap."""
        events: list[object] = []
        queue: list[Any] = [first, (b"two", [], 0, V4_PEER)]

        clock = Clock()
        transport = UDPTransport(
            lambda data, source, now: events.append(data),
            FakeReactor(),
            0,
            on_batch_start=lambda: events.append("start"),
            on_batch_end=lambda: events.append("end"),
            idle=IdleGap(clock.seconds),
        )
        if idle:
            clock.advance(transport.idle.gap)
        udp._Reader(transport, QueueSocket(queue), False).doRead()  # type: ignore[arg-type]
        return events

    def test_batch_hook_after_a_lone_datagram(self) -> None:
        """After an idle gap the first datagram of a read batch is handled alone, without the
        start hook (the node holds TUN writes), so it is written out unheld, and the batch ends
        there (no read that finds the queue empty); a GRO buffer read first is held as a whole
        (the hook runs before it) and the batch goes on; a busy batch runs the hook first. The
        end hook runs once."""
        self.assertEqual(self.hook_order((b"one", [], 0, V4_PEER), idle=True), [b"one", "end"])
        gro = (udp.SOL_UDP, udp.UDP_GRO, udp._GRO_SIZE.pack(2))
        self.assertEqual(
            self.hook_order((b"aabb", [gro], 0, V4_PEER), idle=True),
            ["start", b"aa", b"bb", b"two", "end"],
        )
        self.assertEqual(
            self.hook_order((b"one", [], 0, V4_PEER)), ["start", b"one", b"two", "end"]
        )

    def test_end_hook_that_raises_after_a_lone_datagram(self) -> None:
        """The read loop runs the end hook itself (no ``_hook`` call): a hook that raises is
        counted and logged like a receiver's bug, never raised, and the batch still ends (a
        read at once after it is a busy batch)."""
        events: list[object] = []
        queue: list[Any] = [(b"one", [], 0, V4_PEER)]
        clock = Clock()

        def end() -> None:
            events.append("end")
            raise ZeroDivisionError("end hook")

        transport = UDPTransport(
            lambda data, source, now: events.append(data),
            FakeReactor(),
            0,
            on_batch_start=lambda: events.append("start"),
            on_batch_end=end,
            idle=IdleGap(clock.seconds),
        )
        clock.advance(transport.idle.gap)
        reader = udp._Reader(transport, QueueSocket(queue), False)  # type: ignore[arg-type]
        reader.doRead()
        self.assertEqual(events, [b"one", "end"])
        self.assertEqual(transport.receiver_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        reader.doRead()
        self.assertEqual(events, [b"one", "end", "start", "end"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_busy_batch_stays_whole(self) -> None:
        """A read batch that starts less than ``IdleGap.gap`` after the previous one ended (on
        either socket) runs the start hook before its first datagram, so its TUN writes are
        all held for coalescing; after a gap of ``IdleGap.gap`` the first datagram goes alone
        and unheld again."""
        events: list[object] = []
        queue: list[Any] = []

        clock = Clock()
        transport = UDPTransport(
            lambda data, source, now: events.append(data),
            FakeReactor(),
            0,
            on_batch_start=lambda: events.append("start"),
            on_batch_end=lambda: events.append("end"),
            idle=IdleGap(clock.seconds),
        )
        v4 = udp._Reader(transport, QueueSocket(queue), False)  # type: ignore[arg-type]
        v6 = udp._Reader(transport, QueueSocket(queue), True)  # type: ignore[arg-type]

        def batch(reader: udp._Reader) -> list[object]:
            queue.extend([(b"one", [], 0, V4_PEER), (b"two", [], 0, V4_PEER)])
            reader.doRead()
            done = events[:]
            events.clear()
            return done

        clock.advance(transport.idle.gap)
        self.assertEqual(batch(v4), [b"one", "end"])
        v4.doRead()  # the rest, as the reactor reports it next
        self.assertEqual(events, ["start", b"two", "end"])
        events.clear()
        clock.advance(transport.idle.gap / 2)
        self.assertEqual(batch(v4), ["start", b"one", b"two", "end"])
        clock.advance(transport.idle.gap / 2)
        self.assertEqual(batch(v6), ["start", b"one", b"two", "end"])
        clock.advance(transport.idle.gap)
        self.assertEqual(batch(v6), [b"one", "end"])
        queue.clear()

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=3000), st.integers(min_value=-5, max_value=4000))
    def test_split_never_raises_or_loses_bytes(self, data: bytes, segment: int) -> None:
        """Any buffer and segment size: the pieces join back to the buffer, all but the last
        are exactly one segment and the last is not longer."""
        parts = udp.split_datagrams(data, segment)
        self.assertEqual(b"".join(parts), data)
        self.assertGreaterEqual(len(parts), 1)
        if segment > 0:
            self.assertTrue(all(len(p) == segment for p in parts[:-1]))
            self.assertLessEqual(len(parts[-1]), segment)
            self.assertEqual(len(parts), max(1, -(-len(data) // segment)))
        else:
            self.assertEqual(parts, [data])

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([socket.IPPROTO_IP, udp.SOL_UDP, socket.IPPROTO_IPV6]),
                st.integers(min_value=0, max_value=200),
                st.binary(max_size=24),
            ),
            max_size=4,
        ),
        st.binary(max_size=200),
    )
    def test_garbage_control_messages(self, anc: list[Any], data: bytes) -> None:
        """Whatever control messages come with a read, no byte is lost and nothing raises."""
        received, _transport = self.read([(data, anc, 0, V4_PEER)])
        self.assertEqual(b"".join(d for d, _s in received), data)


class OffloadLoopbackTests(SynchronousTestCase):
    """The real kernel on loopback: one GSO send is many datagrams, and GRO reads come back
    as those datagrams."""

    def setUp(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.reactor = FakeReactor()
        self.transport = UDPTransport(
            lambda d, s, now: self.received.append((d, s)),
            self.reactor,
            0,
            idle=IdleGap(Clock().seconds),
        )
        self.port = self.transport.bind()
        self.addCleanup(self.transport.close)
        if self.transport.offload_status()["gso"] == "off":
            raise SkipTest("this kernel has no UDP GSO")
        self.transport.start_reading()

    def pump(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"only {len(self.received)} of {count} datagrams arrived")
            ready, _, _ = select.select(self.reactor.readers, [], [], remaining)
            for reader in ready:
                reader.doRead()

    def datagrams(self) -> list[bytes]:
        return [bytes([i]) * 1000 for i in range(5)] + [b"L" * 300]

    def test_gso_send_arrives_as_datagrams(self) -> None:
        """One held run leaves in one sendmsg and a plain socket reads each datagram alone."""
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        self.transport.hold()
        for data in self.datagrams():
            self.transport.send(data, client.getsockname())
        self.transport.flush()
        self.assertEqual((self.transport.gso_sends, self.transport.gso_datagrams), (1, 6))
        got = [client.recvfrom(2000) for _ in self.datagrams()]
        self.assertEqual([d for d, _a in got], self.datagrams())
        self.assertEqual({a for _d, a in got}, {("127.0.0.1", self.port)})

    def test_gro_read_is_split(self) -> None:
        """A GSO buffer sent to our GRO socket is read in one call and delivered as its
        datagrams, in order, each from the sender."""
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        client.bind(("127.0.0.1", 0))
        control = [(udp.SOL_UDP, udp.UDP_SEGMENT, udp._SEGMENT_SIZE.pack(1000))]
        client.sendmsg(self.datagrams(), control, 0, ("127.0.0.1", self.port))
        self.pump(6)
        self.assertEqual([d for d, _s in self.received], self.datagrams())
        self.assertEqual({s for _d, s in self.received}, {client.getsockname()})
        self.assertEqual((self.transport.gro_reads, self.transport.gro_datagrams), (1, 6))
        # The local address was learned from the same read: replies still work.
        self.transport.send(b"reply", client.getsockname())
        client.settimeout(5)
        self.assertEqual(client.recvfrom(100)[0], b"reply")

    def test_transport_to_transport_v6(self) -> None:
        """Two transports over IPv6 loopback: a held run arrives as one GRO read."""
        if not _has_ipv6() or self.transport._sock6 is None:
            raise SkipTest("no IPv6 loopback")
        other_received: list[bytes] = []
        other = UDPTransport(
            lambda d, s, now: other_received.append(d),
            FakeReactor(),
            0,
            idle=IdleGap(Clock().seconds),
        )
        other.bind()
        self.addCleanup(other.close)
        other.hold()
        for data in self.datagrams():
            other.send(data, ("::1", self.port))
        other.flush()
        self.pump(6)
        self.assertEqual([d for d, _s in self.received], self.datagrams())
        self.assertEqual(self.transport.gro_reads, 1)


def _memory_node(name: str) -> tuple[Any, Any, Any]:
    """A ``task.Clock``, an in-memory I/O system, and a plugin-less node on both."""
    from twisted.internet.task import Clock
    from twisted.pair.testing import MemoryIOSystem, Tunnel

    from meshguard.app.node import Node

    system = MemoryIOSystem()
    system.registerSpecialDevice(Tunnel._DEVICE_NAME, Tunnel)
    clock = Clock()
    return clock, system, Node(name, clock, tun_system=system, plugins=False)


class NodeBatchTests(SynchronousTestCase):
    """The node holds UDP sends for the length of one TUN read batch."""

    def test_tun_batch_leaves_in_one_gso_send(self) -> None:
        """Packets drained from the TUN in one busy read event, sealed toward one peer through
        the device's (possibly wrapped) send_datagram, leave in one GSO send at the batch end.
        After an idle gap the first leaves at once and alone (a lone packet must not wait for
        the read that ends its batch), the rest as the next batch, in one GSO send; a send
        from a timer afterwards is not held."""
        clock, system, node = _memory_node("mgb0")
        log: list[tuple[str, Any, list[bytes], Any]] = []
        node.udp._install(FakeSocket(log, 100), FakeSocket(log, 101), 4242)  # type: ignore[arg-type]
        self.addCleanup(node.udp.close)
        send = node.udp.send

        def wrapped(data: bytes, endpoint: Any) -> None:  # as relay paths wrap it
            send(data, endpoint)

        node.tun.receiver = lambda packet, now: wrapped(packet, V4_PEER)
        node.tun.open()
        self.addCleanup(node.tun.close)
        tunnel = system._openFiles[node.tun.fileno()]
        packets = [bytes([0x45, i]) * 50 for i in range(4)]
        for packet in packets:
            tunnel.addToReadBuffer(packet)
        node.tun.doRead()
        self.assertEqual([(k, a, p) for k, a, p, _c in log], [("gso", V4_PEER, packets)])
        log.clear()
        clock.advance(node.idle.gap)
        for packet in packets:
            tunnel.addToReadBuffer(packet)
        node.tun.doRead()
        node.tun.doRead()
        self.assertEqual(
            [(k, a, p) for k, a, p, _c in log],
            [("sendto", V4_PEER, packets[:1]), ("gso", V4_PEER, packets[1:])],
        )
        wrapped(b"keepalive", V4_PEER)
        self.assertEqual(log[-1][:3], ("sendto", V4_PEER, [b"keepalive"]))

    def test_idle_is_the_nodes_not_a_descriptors(self) -> None:
        """The TUN device and the UDP port share one ``IdleGap``: a TUN batch right after a
        UDP batch is busy even when the TUN device itself read nothing for long (under a bulk
        transfer the receiver's acknowledgements must leave in one GSO send, not one by
        one)."""
        clock, system, node = _memory_node("mgb1")
        self.assertIs(node.tun.idle, node.udp.idle)
        log: list[tuple[str, Any, list[bytes], Any]] = []
        node.udp._install(FakeSocket(log, 100), FakeSocket(log, 101), 4242)  # type: ignore[arg-type]
        self.addCleanup(node.udp.close)
        node.tun.receiver = lambda packet, now: node.udp.send(packet, V4_PEER)
        node.tun.open()
        self.addCleanup(node.tun.close)
        tunnel = system._openFiles[node.tun.fileno()]
        packets = [bytes([0x45, i]) * 50 for i in range(3)]
        clock.advance(10 * node.idle.gap)
        node.idle.batch_ended()  # a UDP batch (say) just ended
        for packet in packets:
            tunnel.addToReadBuffer(packet)
        node.tun.doRead()
        self.assertEqual([(k, p) for k, _a, p, _c in log], [("gso", packets)])

    def test_reply_to_a_slow_lone_tun_batch_goes_at_once(self) -> None:
        """An idle ping's request read alone from TUN, in a lone batch that took long (cold
        code): its reply reaching the UDP port soon after that batch ended, but a
        ``reply_gap`` after it began, is handled alone too (its TUN write not held, no read
        that finds the socket empty); what is queued behind the reply is a busy batch."""
        clock, system, node = _memory_node("mgb2")
        log: list[tuple[str, Any, list[bytes], Any]] = []
        node.udp._install(FakeSocket(log, 100), FakeSocket(log, 101), 4242)  # type: ignore[arg-type]
        self.addCleanup(node.udp.close)
        reply_gap = node.idle.reply_gap

        def slow_send(packet: bytes, now: float) -> None:
            clock.advance(0.75 * reply_gap)
            node.udp.send(packet, V4_PEER)

        events: list[object] = []
        node.tun.receiver = slow_send
        node.udp.receiver = lambda data, source, now: events.append(data)
        node.udp.on_batch_start = lambda: events.append("hold")
        node.tun.open()
        self.addCleanup(node.tun.close)
        tunnel = system._openFiles[node.tun.fileno()]
        queue: list[Any] = []
        reader = udp._Reader(node.udp, QueueSocket(queue), False)  # type: ignore[arg-type]

        clock.advance(10 * node.idle.gap)
        tunnel.addToReadBuffer(bytes([0x45, 1]) * 50)
        node.tun.doRead()
        self.assertEqual([(k, a) for k, a, _p, _c in log], [("sendto", V4_PEER)])
        clock.advance(0.3 * reply_gap)
        queue.extend([(b"reply", [], 0, V4_PEER), (b"behind", [], 0, V4_PEER)])
        reader.doRead()
        self.assertEqual(events, [b"reply"])
        reader.doRead()
        self.assertEqual(events, [b"reply", "hold", b"behind"])

    def test_reply_leaves_before_the_udp_batch_end(self) -> None:
        """After a lone UDP batch whose TUN write provoked a reply (the kernel queued an echo
        reply inside the write), the reply is read and sealed before the node's batch-end
        bookkeeping (held sends, timers), which follows it."""
        clock, system, node = _memory_node("mgb3")
        node.tun.open()
        self.addCleanup(node.tun.close)
        node.tun._reading = True  # registered with a reactor (a Clock has no addReader)
        self.addCleanup(setattr, node.tun, "_reading", False)
        tunnel = system._openFiles[node.tun.fileno()]
        request, reply = bytes([0x45, 1]) * 50, bytes([0x45, 2]) * 50
        events: list[object] = []

        def received(data: bytes, source: Any, now: float) -> None:
            node.tun.write(request)
            tunnel.addToReadBuffer(reply)  # what the kernel answers inside the write

        node.udp.receiver = received
        node.tun.receiver = lambda packet, now: events.append(packet)
        batch_end = node._batch_end

        def recorded_batch_end() -> None:
            events.append("batch end")
            batch_end()

        node._batch_end = recorded_batch_end  # type: ignore[method-assign]
        node.tun.on_batch_end = recorded_batch_end
        queue: list[Any] = [(b"request", [], 0, V4_PEER)]
        reader = udp._Reader(node.udp, QueueSocket(queue), False)  # type: ignore[arg-type]
        clock.advance(10 * node.idle.gap)
        reader.doRead()
        # Once: the reply's read ends the batch; the UDP batch end does not run it again.
        self.assertEqual(events, [reply, "batch end"])
        # A lone datagram whose write provoked nothing still ends its batch.
        node.udp.receiver = lambda data, source, now: None
        queue.append((b"nothing to write", [], 0, V4_PEER))
        clock.advance(10 * node.idle.gap)
        reader.doRead()
        self.assertEqual(events, [reply, "batch end", "batch end"])


class SendDatagramsTests(SynchronousTestCase):
    """``send_datagrams`` (the sealed segments of one super-packet) sends exactly what as many
    ``send`` calls would, in bulk."""

    def run_both(self, before: list[int], sizes: list[int], held: bool) -> None:
        logs: list[list[tuple[str, Any, list[bytes], Any]]] = []
        for bulk in (False, True):
            log: list[tuple[str, Any, list[bytes], Any]] = []
            transport = UDPTransport(lambda d, s, now: None, FakeReactor(), 0)
            transport._install(FakeSocket(log, 100), FakeSocket(log, 101), 4242)  # type: ignore[arg-type]
            if held:
                transport.hold()
            for i, size in enumerate(before):
                transport.send(bytes([i]) * size, V4_PEER)
            datagrams = [bytes([100 + i]) * size for i, size in enumerate(sizes)]
            if bulk:
                transport.send_datagrams(datagrams, V4_PEER)
            else:
                for data in datagrams:
                    transport.send(data, V4_PEER)
            transport.send(b"z" * 1000, V4_PEER)
            transport.flush()
            logs.append(log)
        self.assertEqual(logs[1], logs[0])

    @given(
        before=st.lists(st.sampled_from([500, 1000, 1440, 1500]), max_size=70),
        count=st.integers(1, 150),
        size=st.sampled_from([500, 1000, 1440, 1500]),
        last=st.integers(1, 1500),
        held=st.booleans(),
    )
    def test_same_sends_as_one_by_one(
        self, before: list[int], count: int, size: int, last: int, held: bool
    ) -> None:
        self.run_both(before, [size] * (count - 1) + [min(last, size)], held)


class NodeSourceListenerTests(SynchronousTestCase):
    """The device's source listeners on a node: the UDP port's own, registered directly (one
    call per received packet), and the birthday sockets' question answered by a listener that
    is there only while their datagram is handled."""

    def test_udp_port_listens_directly(self) -> None:
        _clock, _system, node = _memory_node("mgs0")
        self.assertEqual(node.device._source_listeners, [node.udp.source_authenticated])

    def test_birthday_datagram_that_does_not_authenticate(self) -> None:
        """A datagram on a birthday socket that does not authenticate does not win that
        socket; the temporary listener is gone afterwards, also when handling raises."""
        _clock, _system, node = _memory_node("mgs1")
        node.running = True
        self.addCleanup(setattr, node, "running", False)
        listeners = list(node.device._source_listeners)
        self.assertFalse(node._birthday_deliver(b"\x04\x00\x00\x00" + bytes(40), V4_PEER))
        self.assertEqual(node.device._source_listeners, listeners)

        def broken(data: bytes, source: Any, now: float) -> None:
            raise ZeroDivisionError("device bug")

        node.device.datagram_received = broken  # type: ignore[method-assign]
        self.assertRaises(ZeroDivisionError, node._birthday_deliver, b"x", V4_PEER)
        self.assertEqual(node.device._source_listeners, listeners)

    def test_confirm_source_is_the_listener(self) -> None:
        """``confirm_source`` and the listener form learn the same pending source."""
        transport = UDPTransport(lambda d, s, now: None, FakeReactor(), 0)
        info = b"\1" * 12
        transport._pending_source = (V4_PEER, info)
        transport.source_authenticated(None, ("192.0.2.2", 1), 0.0)  # another endpoint
        self.assertEqual(transport._sources, {})
        transport.source_authenticated(None, V4_PEER, 0.0)
        self.assertEqual(transport._sources[V4_PEER][0], info)
        self.assertIsNone(transport._pending_source)
        transport._pending_source = (V6_PEER, info)
        transport.confirm_source(V6_PEER)
        self.assertEqual(transport._sources[V6_PEER][0], info)
