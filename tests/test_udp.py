"""UDPTransport on real loopback sockets (no root needed), driven without a reactor."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from meshguard import udp
from meshguard.udp import SO_MARK, UDPBindError, UDPError, UDPTransport


class FakeReactor:
    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


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
            self.received_datagram, self.reactor, 0, on_batch_end=self.batch_end
        )
        self.port = self.transport.bind()
        self.addCleanup(self.transport.close)
        self.transport.start_reading()

    def received_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        self.received.append((data, source))

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
        """Sources are learned before authentication, so the table has a hard bound."""
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

        def receiver(data: bytes, source: tuple[str, int]) -> None:
            calls.append(data)
            if data == b"bad":
                raise ValueError("boom")
            self.received.append((data, source))

        self.transport._receiver = receiver
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

        class Sock:
            def fileno(self) -> int:
                return 99

            def __init__(self) -> None:
                self.queue = [
                    (b"a", [], 0, ("::ffff:192.0.2.1", 5, 0, 0)),
                    (b"b", [], 0, ("fe80::1%lo", 6, 0, 1)),
                ]

            def recvmsg(self, size: int, ancsize: int) -> Any:
                if not self.queue:
                    raise BlockingIOError(errno.EAGAIN, "again")
                return self.queue.pop(0)

        transport = UDPTransport(lambda d, s: received.append((d, s)), FakeReactor(), 0)
        reader = udp._Reader(transport, Sock(), True)  # type: ignore[arg-type]
        reader.doRead()
        self.assertEqual(received, [(b"a", ("192.0.2.1", 5)), (b"b", ("fe80::1%lo", 6))])
