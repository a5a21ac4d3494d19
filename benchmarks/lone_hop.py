"""A whole cold hop through a real node: reactor, adapters, node and engine, in process.

``lone_path.py`` measures the engine's share of an idle ping's two cold hops; ``hops.py``
measures real hops but cannot resolve a change of 5-10 us on a shared machine. This runs two
real :class:`meshguard.app.node.Node` objects, each on its own fresh ``HotReactor``, in one
process without privileges, and measures each cold hop from the reactor's poll to the next:

- TUN: the node's ``TunDevice`` with the virtio-net header, as in production, on one end of
  an ``AF_UNIX`` ``SOCK_SEQPACKET`` pair in place of ``/dev/net/tun`` (``tun_system=``; the
  same ``readv``/``writev`` calls, one frame per record); the benchmark holds the other end.
- UDP: the nodes' real sockets. Node A's peer endpoint is a socket of the benchmark's on
  127.0.0.1 (the *wire*), which relays between the nodes while idle and holds a datagram in
  flight while a hop is measured; its receive timestamps say when a datagram left.
- Send hop: an 84-byte ICMP echo request (a virtio-net header of zeros, then the packet)
  written into A's TUN end; A's reactor iteration reads it, seals it and sends it.
  Receive hop: that datagram put on B's socket; B's iteration opens it and writes the
  packet to its TUN end. B's TUN end answers inside that write, as the kernel does (the
  echo reply queued for reading), so B's iteration goes on to read, seal and send the reply
  (``read_replies``), as in a real ping; ``--no-reply`` leaves that out.
  Back hop: the reply's datagram put on A's socket; A opens it and writes it to its TUN end.

Each hop is one call of the reactor's ``doIteration`` (the poll finds the descriptor ready at
once), then the rest of the loop up to the next poll (``HotReactor._turns`` with its poll
replaced by a stop, when the tree has it): the timer pass a hop's new timers cost.

- Work: Python calls, C calls (``sys.setprofile``) and bytecode instructions (``sys.settrace``
  opcode events) from the ``epoll`` return to the hop's system call (``sendto``/``sendmsg``
  for send, ``writev``/``write`` for receive and back; then the reply's ``sendto``), and to
  the next poll; deterministic, comparable across trees. ``--calls`` prints the call trees.
- Cold: thread CPU time of the whole iteration, and wall time from its start to the system
  call (the kernel's receive timestamp of the datagram on the wire socket, or of the packet
  on B's TUN end), after reading a 32 MiB buffer (which evicts the caches, as an idle moment
  does), or after a sleep of ``--idle-ms`` (idle); median and best of ``--rounds``. Warm:
  neither, with the nodes' idle gap set to 0 so that the same lone path runs. With the
  reply, also the wall time from B's TUN write to its reply's ``sendto``.
- ``--steps N``: ``cProfile`` over N cold and N warm rounds: each function's own time.

    python3 benchmarks/lone_hop.py [--tree PATH ...] [--rounds 200] [--calls] [--steps N]

With several ``--tree``, each tree runs in its own process and the rounds go round-robin in
chunks, so the load of the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType
from typing import Any, Protocol

HERE = os.path.dirname(os.path.abspath(__file__))

#: System calls that end a hop: the datagram leaves (send) or the packet is written (receive).
SEND_CALLS = frozenset({"sendto", "sendmsg"})
WRITE_CALLS = frozenset({"writev", "write"})
#: Every system call a hop makes (the poll's too), for the ``--steps`` summary.
SYSTEM_CALLS = ("poll", "readv", "writev", "recvmsg", "sendto", "sendmsg", "read", "write")
VNET_HEADER = bytes(10)
#: Longest wait, in seconds, for a datagram or packet in flight between the nodes.
WAIT = 0.2
#: More than the node's idle gap (2 ms): every measured batch is a lone one.
PAUSE = 0.003
_TIMESPEC = struct.Struct("=qq")
#: Linux's ``SO_TIMESTAMPNS`` (also the control message's type); Python does not name it.
SO_TIMESTAMPNS = 35


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(sequence: int) -> bytes:
    """An 84-byte IPv4 ICMP echo request 10.0.0.1 -> 10.0.0.2, as ``ping`` sends."""
    payload = bytes(range(56))
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4D47, sequence & 0xFFFF) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        sequence & 0xFFFF,
        0x4000,
        64,
        1,
        0,
        socket.inet_aton("10.0.0.1"),
        socket.inet_aton("10.0.0.2"),
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


def echo_reply(request: bytes) -> bytes:
    """The reply a kernel gives to ``request`` (addresses swapped, type 0, checksums redone)."""
    icmp = b"\x00\x00\x00\x00" + request[24:]
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = request[:10] + b"\x00\x00" + request[16:20] + request[12:16]
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


class PairTun:
    """A ``TunSystem`` whose device is one end of a ``SOCK_SEQPACKET`` pair (no privileges).

    ``readv``/``writev`` are ``os``'s own, so the node's calls are the ones it makes on a real
    TUN device; ``ioctl`` accepts the interface request and the first offload set.
    """

    O_RDWR = os.O_RDWR
    O_NONBLOCK = os.O_NONBLOCK
    O_CLOEXEC = os.O_CLOEXEC
    read = staticmethod(os.read)
    write = staticmethod(os.write)
    readv = staticmethod(os.readv)
    writev = staticmethod(os.writev)
    close = staticmethod(os.close)

    def __init__(self, answering: bool = False) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        theirs.setblocking(False)
        theirs.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        ours.setblocking(False)
        #: The benchmark's end: what the node writes arrives here, what it reads is sent here.
        self.far = theirs
        self._fd = ours.detach()
        #: A frame to queue for reading as soon as the node writes (``answering``).
        self.answer: bytes | None = None
        if answering:
            self.writev = self._writev_answering

    def _writev_answering(self, fd: int, buffers: Any) -> int:
        """``os.writev``, then the answer queued, as the kernel queues an echo reply inside
        the write to a real TUN device. The benchmark leaves this frame out of the work."""
        n = os.writev(fd, buffers)
        answer = self.answer
        if answer is not None:
            self.answer = None
            self.far.send(answer)
        return n

    def open(self, name: bytes, flags: int, mode: int = 0o777) -> int:
        return self._fd

    def ioctl(self, fd: int, request: int, arg: bytes | int) -> bytes:
        return arg if isinstance(arg, bytes) else b""


def _received(sock: socket.socket) -> Iterator[tuple[bytes, Any, int]]:
    """Everything queued on ``sock``: (data, source, kernel receive time in ns or 0)."""
    space = socket.CMSG_SPACE(_TIMESPEC.size)
    while True:
        try:
            data, anc, _flags, source = sock.recvmsg(65536, space)
        except BlockingIOError:
            return
        stamp = 0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                stamp = seconds * 1_000_000_000 + nanoseconds
        yield data, source, stamp


class Profiler(Protocol):
    """What watches a hop: :class:`Work`, or ``cProfile.Profile``."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...


class Bench:
    """Two nodes, their reactors, the wire between them, and the hops' measures."""

    def __init__(
        self, plugins: bool, evict_bytes: int, idle: float = 0.02, reply: bool = False
    ) -> None:
        from meshguard.adapters.hot_reactor import HotReactor
        from meshguard.app.node import Node
        from meshguard.codecs.config import parse_config
        from meshguard.core.crypto import generate_private_key, public_key

        self.big = bytearray(evict_bytes)
        self.idle = idle
        #: Whether B's TUN end answers the echo request and A's receive of it is measured.
        self.reply = reply
        self.wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wire.bind(("127.0.0.1", 0))
        self.wire.setblocking(False)
        self.wire.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.wire.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        wire_port = self.wire.getsockname()[1]
        keys = [generate_private_key(os.urandom) for _ in range(2)]
        text = [base64.b64encode(k).decode() for k in keys]
        pub = [base64.b64encode(public_key(k)).decode() for k in keys]
        self.reactors: list[Any] = []
        self.tuns: list[PairTun] = []
        self.nodes: list[Any] = []
        for i, name in enumerate(("mghopa", "mghopb")):
            reactor = HotReactor()
            tun = PairTun(answering=reply and i == 1)
            try:
                node = Node(name, reactor, tun_system=tun, plugins=plugins)
            except TypeError:  # a tree without the plugins switch
                node = Node(name, reactor, tun_system=tun)
            # Production opens the device with the virtio-net header (offload); the node asks
            # for it only without an injected system, so ask here.
            if hasattr(node.tun, "offload"):
                node.tun.offload = True
            node.open()
            other = 1 - i
            peer = f"[Peer]\nPublicKey = {pub[other]}\nAllowedIPs = 10.0.0.{other + 1}/32\n" + (
                f"Endpoint = 127.0.0.1:{wire_port}\n" if i == 0 else ""
            )
            config = f"[Interface]\nPrivateKey = {text[i]}\n\n{peer}"
            node.apply_config(parse_config(config, f"{name}.conf"))
            node.start()
            self.reactors.append(reactor)
            self.tuns.append(tun)
            self.nodes.append(node)
        self.ports = [node.udp.local_port for node in self.nodes]
        # The reactors' own poll (one iteration), whatever the instance's attribute says.
        self.polls = [type(r).doIteration.__get__(r) for r in self.reactors]
        self.last_batch = time.monotonic()
        self.sequence = 0
        #: Datagrams a hop sent besides its own (a timer due in its tail).
        self.strays = 0
        #: Rounds whose datagram or packet did not come (measured again).
        self.spoiled = 0
        self.stop_code: Any = None
        self._handshake()

    # -- idle traffic -----------------------------------------------------------------------

    def relay(self) -> int:
        """Forward what waits on the wire to the other node; drain both TUN ends."""
        moved = 0
        for data, source, _stamp in list(_received(self.wire)):
            if source[1] in self.ports:
                other = self.ports[1 - self.ports.index(source[1])]
                self.wire.sendto(data, ("127.0.0.1", other))
                moved += 1
        for tun in self.tuns:
            moved += len(list(_received(tun.far)))
        return moved

    def settle(self) -> None:
        """Run both nodes' due timers and everything in flight until all is quiet."""
        quiet = 0
        for _ in range(200):
            for reactor, poll in zip(self.reactors, self.polls, strict=True):
                reactor.runUntilCurrent()
                poll(0)
            if self.relay():
                quiet = 0
                self.last_batch = time.monotonic()
            else:
                quiet += 1
                if quiet >= 3:
                    return

    def _handshake(self) -> None:
        """A's first packet starts the handshake; B confirms the session on the data."""
        for _ in range(5):
            self.settle()
            self.send_request()
            self.pause()
            self.polls[0](0)
            self.settle()
            if self.nodes[1].device.counters.as_dict().get("replayed", 0) == 0 and any(
                p.rx_bytes for p in self.nodes[1].device.peers.values()
            ):
                return
        raise RuntimeError("the nodes did not complete a handshake")

    def send_request(self) -> bytes:
        self.sequence += 1
        packet = echo_request(self.sequence)
        self.tuns[0].far.send(VNET_HEADER + packet)
        return packet

    def pause(self) -> None:
        """Wait until the next batch is lone (the nodes' idle gap since the last), spinning:
        only the eviction or the sleep before it is meant to cool the caches."""
        until = self.last_batch + PAUSE
        while time.monotonic() < until:
            pass

    def evict(self) -> None:
        bytes(self.big)

    @contextmanager
    def warm(self) -> Iterator[None]:
        """Every read batch lone at once (the nodes' idle gap 0), so the lone path runs warm.

        Waiting out the gap is no way to keep it warm: on this VM a hop after spinning in
        place for 3 ms took about five times its CPU time right after the last (0.3 ms: 1.5
        times), the caches decaying with time whatever the process does. A tree without
        ``IdleGap.gap`` waits instead."""
        gaps = [getattr(node, "idle", None) for node in self.nodes]
        saved = [getattr(g, "gap", None) for g in gaps]
        try:
            for g in gaps:
                if g is not None and hasattr(g, "gap"):
                    g.gap = 0.0
            yield
        finally:
            for g, gap in zip(gaps, saved, strict=True):
                if g is not None and gap is not None:
                    g.gap = gap

    # -- one hop ----------------------------------------------------------------------------

    def _turns(self, reactor: Any) -> Callable[[], None] | None:
        """The loop from after a hop's dispatch to its next poll (``_turns``, its poll replaced
        by a stop), or None on a tree whose reactor has no ``_turns``."""
        turns: Callable[[], None] | None = getattr(reactor, "_turns", None)
        if turns is None:
            return None

        def stop(timeout: Any) -> None:
            reactor._started = False

        reactor.doIteration = stop
        self.stop_code = stop.__code__
        return turns

    def hop(self, index: int, mode: str, hooks: Profiler | None = None) -> tuple[int, int, int]:
        """Node ``index``'s iteration: (thread CPU ns, wall ns, wall time when it began)."""
        reactor = self.reactors[index]
        poll = self.polls[index]
        turns = self._turns(reactor)
        if mode == "cold":
            self.evict()
        elif mode == "idle":
            time.sleep(self.idle)
        if mode != "warm":
            self.pause()
        thread, wall = time.thread_time_ns, time.time_ns
        c0 = thread()
        w0 = wall()
        if hooks is not None:
            hooks.enable()
        poll(0)
        if turns is not None:
            reactor._started = True
            turns()
        if hooks is not None:
            hooks.disable()
        w1 = wall()
        c1 = thread()
        self.last_batch = time.monotonic()
        try:
            del reactor.doIteration
        except AttributeError:
            pass
        return c1 - c0, w1 - w0, w0

    def _from_wire(self, index: int) -> tuple[bytes, int] | None:
        """The datagram node ``index`` sent in its hop, with its time (ns); anything else it
        sent (a timer's) goes on to the other node at once."""
        select.select([self.wire], [], [], WAIT)
        got: list[tuple[bytes, int]] = []
        for data, source, stamp in _received(self.wire):
            if source[1] == self.ports[index]:
                got.append((data, stamp))
            elif source[1] in self.ports:
                self.wire.sendto(data, ("127.0.0.1", self.ports[1 - index]))
        for data, _stamp in got[1:]:
            self.strays += 1
            self.wire.sendto(data, ("127.0.0.1", self.ports[1 - index]))
        return got[0] if got else None

    def _from_tun(self, index: int) -> tuple[bytes, int] | None:
        """The packet node ``index`` wrote to its TUN device in its hop, with its time (ns)."""
        far = self.tuns[index].far
        select.select([far], [], [], WAIT)
        got = [(d, s) for d, _source, s in _received(far)]
        self.strays += max(0, len(got) - 1)
        return got[0] if got else None

    def _ready(self, index: int) -> None:
        """Wait until node ``index``'s reactor has something to read (a datagram on loopback
        may reach its socket after ``sendto`` returns, from the kernel's softirq thread)."""
        poller = getattr(self.reactors[index], "_poller", None)
        if poller is not None:
            poller.poll(WAIT)
        else:
            time.sleep(0.001)

    def round(
        self, mode: str, hooks: dict[str, Profiler] | None = None
    ) -> dict[str, tuple[int, int, int]] | None:
        """One echo request through the hops: per hop (send, receive, and with ``reply`` back)
        its (CPU ns, wall ns, wall ns to its system call); with ``reply`` also "reply", the
        wall time from B's TUN write to its reply's ``sendto``. None when a hop's output did
        not come (counted in ``spoiled``), hooks: a :class:`Profiler` per hop to watch.

        ``mode``: "cold" (the caches evicted first), "idle" (a sleep of ``idle`` s first) or
        "warm" (none; call it inside :meth:`warm`, which makes every batch a lone one)."""
        hooks = hooks or {}
        found: dict[str, tuple[int, int, int]] = {}
        self.settle()
        packet = self.send_request()
        self._ready(0)
        cpu, wall, start = self.hop(0, mode, hooks.get("send"))
        datagram = self._from_wire(0)
        if datagram is None:
            self.spoiled += 1
            return None
        found["send"] = (cpu, wall, datagram[1] - start)
        reply = echo_reply(packet)
        if self.reply:
            self.tuns[1].answer = VNET_HEADER + reply
        self.wire.sendto(datagram[0], ("127.0.0.1", self.ports[1]))
        self._ready(1)
        cpu, wall, start = self.hop(1, mode, hooks.get("receive"))
        written = self._from_tun(1)
        if written is None or written[0] != VNET_HEADER + packet:
            self.spoiled += 1
            return None
        if self.reply and self.tuns[1].answer is not None:
            raise RuntimeError(
                "node B wrote to its TUN device without the system object's writev; run "
                "with --no-reply"
            )
        found["receive"] = (cpu, wall, written[1] - start)
        if not self.reply:
            return found
        answer = self._from_wire(1)
        if answer is None:
            self.spoiled += 1
            return None
        found["reply"] = (0, 0, answer[1] - written[1])
        self.wire.sendto(answer[0], ("127.0.0.1", self.ports[0]))
        self._ready(0)
        cpu, wall, start = self.hop(0, mode, hooks.get("back"))
        delivered = self._from_tun(0)
        if delivered is None or delivered[0] != VNET_HEADER + reply:
            self.spoiled += 1
            return None
        found["back"] = (cpu, wall, delivered[1] - start)
        return found

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for reactor in self.reactors:
            reactor.removeAll()
            waker = getattr(reactor, "waker", None)
            if waker is not None:
                os.close(waker.i)
                os.close(waker.o)
            reactor._poller.close()
        self.wire.close()
        for tun in self.tuns:
            tun.far.close()


class Work:
    """Counts of one hop from the poll's return: at each of ``marks`` in turn (the first C call
    named in it after the previous mark) and at the next poll (the tail's stop); and the call
    tree between, each Python call with its own opcodes. The answering TUN's ``writev``
    wrapper is left out (its ``os.writev`` counts as the node's call)."""

    def __init__(self, marks: list[frozenset[str]], bench: Bench) -> None:
        self.marks = marks
        self.bench = bench
        self.counting = False
        self.counts = [0, 0, 0]
        self.at_marks: list[tuple[int, int, int]] = []
        self.at_end: tuple[int, int, int] | None = None
        #: [depth, label, own opcodes] per Python call, [depth, label, -1] per C call.
        self.tree: list[list[Any]] = []
        self._frames: dict[int, list[Any]] = {}
        self._depth = 0
        self._skip = {PairTun._writev_answering.__code__}
        self._hooks = self.hooks()

    def enable(self) -> None:
        sys.setprofile(self._hooks[0])
        sys.settrace(self._hooks[1])

    def disable(self) -> None:
        sys.setprofile(None)
        sys.settrace(None)

    def hooks(self) -> tuple[Any, Any]:
        counts = self.counts
        tree = self.tree
        frames = self._frames
        skip = self._skip
        marks = self.marks
        at_marks = self.at_marks

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if not self.counting:
                if event == "c_return" and getattr(arg, "__name__", "") == "poll":
                    self.counting = True
                return
            if frame.f_code in skip and not (event == "c_call" and arg is os.writev):
                return
            if event == "call":
                code = frame.f_code
                if code is self.bench.stop_code:
                    self.at_end = (counts[0], counts[1], counts[2])
                    self.counting = False
                    return
                counts[0] += 1
                where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
                entry = [self._depth, f"{code.co_qualname} ({where})", 0]
                tree.append(entry)
                frames[id(frame)] = entry
                self._depth += 1
            elif event == "return":
                self._depth = max(0, self._depth - 1)
                frames.pop(id(frame), None)
            elif event == "c_call":
                name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")
                label = f"[{name}]"
                done = len(at_marks)
                if done < len(marks) and getattr(arg, "__name__", "") in marks[done]:
                    at_marks.append((counts[0], counts[1], counts[2]))
                    label += f"  <- system call {done + 1}"
                tree.append([self._depth, label, -1])
                counts[1] += 1

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if frame.f_code in skip:
                return None
            frame.f_trace_opcodes = True
            if event == "opcode" and self.counting:
                counts[2] += 1
                entry = frames.get(id(frame))
                if entry is None:
                    # A frame entered before the poll returned (the reactor's own).
                    code = frame.f_code
                    where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
                    entry = [0, f"{code.co_qualname} ({where}), after the poll", 0]
                    tree.append(entry)
                    frames[id(frame)] = entry
                entry[2] += 1
            return trace

        return profile, trace

    def result(self) -> list[tuple[int, int, int]]:
        """The counts at each mark (zeros for a mark not reached), then at the next poll."""
        end = self.at_end if self.at_end is not None else (self.counts[0], *self.counts[1:])
        marks = self.at_marks + [(0, 0, 0)] * (len(self.marks) - len(self.at_marks))
        return [*marks, (end[0], end[1], end[2])]

    def listing(self) -> list[str]:
        """The call tree, one line per call: Python calls with their own opcodes, [C calls]."""
        return [
            "  " * depth + (label if ops < 0 else f"{label} {ops}")
            for depth, label, ops in self.tree
        ]


MODES = ("cold", "idle", "warm")


def measure(bench: Bench, rounds: int, modes: tuple[str, ...] = MODES) -> dict[str, list[int]]:
    """``rounds`` rounds of each mode in turn (warm after one unmeasured: a round right after a
    cold one finds the node the eviction came before cold)."""
    samples: dict[str, list[int]] = {}
    for mode in modes:
        with bench.warm() if mode == "warm" else nullcontext():
            if mode == "warm":
                bench.round(mode)
            done = 0
            while done < rounds:
                got = bench.round(mode)
                if got is None:
                    if bench.spoiled > rounds // 4 + 10:
                        raise RuntimeError(f"{bench.spoiled} rounds lost their packet")
                    continue
                done += 1
                for hop, figures in got.items():
                    for what, value in zip(("cpu", "wall", "call"), figures, strict=True):
                        if hop != "reply" or what == "call":
                            samples.setdefault(f"{mode} {hop} {what}", []).append(value)
    return samples


def count(bench: Bench) -> dict[str, Any]:
    """The work of each hop (the lone path, warm), counted on three rounds, which agree
    unless a timer came due in one."""
    found: dict[str, Any] = {}
    with bench.warm():
        for _ in range(3):
            for _attempt in range(10):
                works = {hop: Work(marks, bench) for hop, marks in marks_of(bench).items()}
                if bench.round("warm", dict(works)) is not None:
                    break
            else:
                raise RuntimeError("ten rounds in a row lost their packet")
            for hop, work in works.items():
                found.setdefault(hop, []).append(work.result())
                found[f"{hop} calls"] = work.listing()
    return found


def marks_of(bench: Bench) -> dict[str, list[frozenset[str]]]:
    """Each hop's system calls, in order: the datagram's send, or the packet's write (then,
    when B's TUN answers, the reply's send)."""
    if not bench.reply:
        return {"send": [SEND_CALLS], "receive": [WRITE_CALLS]}
    return {"send": [SEND_CALLS], "receive": [WRITE_CALLS, SEND_CALLS], "back": [WRITE_CALLS]}


def _label(function: tuple[str, int, str]) -> str:
    path, line, name = function
    return f"{name} ({os.path.basename(path)}:{line})" if line else name


def steps(bench: Bench, rounds: int) -> dict[str, Any]:
    """Where each hop's time goes: ``cProfile`` (a C hook, about 0.1 us an event) over
    ``rounds`` cold and as many warm rounds; per function its calls per hop and its own time
    per hop (system calls included: ``{method 'sendto' ...}`` is the call's whole time), in
    ns. The hook's cost is in every figure, warm and cold alike."""
    found: dict[str, Any] = {}
    for mode in ("cold", "warm"):
        profiles = {hop: cProfile.Profile() for hop in marks_of(bench)}
        with bench.warm() if mode == "warm" else nullcontext():
            if mode == "warm":
                bench.round(mode)
            for _ in range(rounds):
                bench.round(mode, dict(profiles))
        for hop, profile in profiles.items():
            profile.create_stats()
            table = found.setdefault(hop, {})
            for function, (_cc, calls, own, _cumulative, _callers) in profile.stats.items():
                entry = table.setdefault(_label(function), [0.0, 0, 0])
                entry[0] = calls / rounds
                entry[1 if mode == "cold" else 2] = round(own / rounds * 1e9)
    return found


def _start(args: argparse.Namespace) -> Bench:
    bench = Bench(args.plugins, args.evict_mib << 20, args.idle_ms / 1e3, args.reply)
    with bench.warm():
        for _ in range(5):
            bench.round("warm")
    return bench


def run(args: argparse.Namespace, chunks: Iterator[int]) -> Iterator[dict[str, Any]]:
    """One tree in this process: its work counts, then the samples of each chunk of rounds."""
    bench = _start(args)
    try:
        yield {"work": count(bench), "steps": steps(bench, args.steps) if args.steps else {}}
        for rounds in chunks:
            samples = measure(bench, rounds)
            yield {"samples": samples, "strays": bench.strays, "spoiled": bench.spoiled}
    finally:
        bench.close()


def _us(values: list[int]) -> str:
    return f"{statistics.median(values) / 1e3:.1f} / {min(values) / 1e3:.1f}"


#: What each hop's system calls are, for the report.
_MARK_NAMES = {
    "send": ["the sendto"],
    "receive": ["the TUN write", "the reply's sendto"],
    "back": ["the TUN write"],
}


def hops_in(result: dict[str, Any]) -> list[str]:
    return [hop for hop in ("send", "receive", "back") if hop in result["work"]]


def report(label: str, result: dict[str, Any], out: Any = sys.stdout) -> None:
    """The tree's work counts and, per mode and hop, medians and bests in microseconds."""
    samples = result["samples"]
    hops = hops_in(result)
    print(f"tree {label}", file=out)
    for hop in hops:
        runs = result["work"][hop]
        # The round with the least work: one that armed a timer more is the exception.
        *marks, end = min(runs, key=lambda r: r[-1])
        ends = sorted({tuple(r[-1]) for r in runs})
        same = "" if len(ends) == 1 else f" (this varied between rounds: {ends})"
        at = ", ".join(
            f"to {name} {'/'.join(map(str, mark))}"
            for name, mark in zip(_MARK_NAMES[hop], marks, strict=False)
        )
        print(
            f"  {hop} work, Python calls / C calls / opcodes from the epoll return: {at}, to "
            f"the next poll {'/'.join(map(str, end))}{same}",
            file=out,
        )
    n = len(samples.get("cold send cpu", []))
    print(
        f"  us, median / best of {n}: CPU of the iteration, wall to the system call, wall of "
        "the iteration",
        file=out,
    )
    for mode in MODES:
        parts = [
            f"{hop} {_us(samples[f'{mode} {hop} cpu'])}, {_us(samples[f'{mode} {hop} call'])}, "
            f"{_us(samples[f'{mode} {hop} wall'])}"
            for hop in hops
        ]
        print(f"  {mode:5} " + "; ".join(parts), file=out)
    if "back" in hops:
        line = ", ".join(f"{mode} {_us(samples[f'{mode} reply call'])}" for mode in MODES)
        print(f"  B's TUN write to its reply's sendto, wall, us: {line}", file=out)
    if result.get("strays"):
        print(f"  ({result['strays']} hops also sent a timer's datagram)", file=out)
    if result.get("spoiled"):
        print(f"  ({result['spoiled']} rounds lost their packet and were run again)", file=out)


def print_steps(title: str, table: dict[str, list[float]], rounds: int) -> None:
    """The functions by cold own time, with their warm own time and the difference."""
    print(f"{title}: own time per hop, us, {rounds} rounds each (cProfile's cost included)")
    print(f"  {'cold':>7} {'warm':>7} {'cold-warm':>9} {'calls':>5}  function")
    totals: dict[str, list[int]] = {}
    for name, (calls, cold, warm) in sorted(table.items(), key=lambda item: -item[1][1]):
        if name.startswith(
            ("stop (lone_hop.py", "_writev_answering (", "<method 'disable' of '_lsprof")
        ):
            continue  # the benchmark's own
        if any(f"{call}'" in name or f".{call}>" in name for call in SYSTEM_CALLS):
            kind = "system calls"
        elif name.startswith("<"):
            kind = "other C calls"
        else:
            kind = "Python functions"
        for key in (kind, "all"):
            total = totals.setdefault(key, [0, 0])
            total[0] += int(cold)
            total[1] += int(warm)
        print(
            f"  {cold / 1e3:7.1f} {warm / 1e3:7.1f} {(cold - warm) / 1e3:9.1f} {calls:5.1f}  {name}"
        )
    for kind in ("Python functions", "other C calls", "system calls", "all"):
        cold, warm = totals.get(kind, [0, 0])
        print(f"  {cold / 1e3:7.1f} {warm / 1e3:7.1f} {(cold - warm) / 1e3:9.1f}        {kind}")


def _child(args: argparse.Namespace) -> None:
    """Run one tree's rounds on request: a line with a number in, a JSON line out."""
    chunks = (int(line) for line in sys.stdin)
    for answer in run(args, chunks):
        print(json.dumps(answer), flush=True)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", help="a meshguard tree (repeatable)")
    parser.add_argument("--rounds", type=int, default=200, help="rounds of each mode")
    parser.add_argument("--chunk", type=int, default=20, help="rounds per turn of each tree")
    parser.add_argument("--evict-mib", type=int, default=32, help="bytes read to evict caches")
    parser.add_argument("--idle-ms", type=float, default=20.0, help="the idle mode's sleep")
    parser.add_argument("--plugins", action="store_true", help="load the plugins, as a service")
    parser.add_argument(
        "--calls", action="store_true", help="print each hop's call tree (own opcodes per call)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        metavar="N",
        help="profile N cold and N warm rounds (cProfile): each function's own time per hop",
    )
    parser.add_argument(
        "--no-reply",
        dest="reply",
        action="store_false",
        help="B's TUN end does not answer the echo request (by default it does, inside the "
        "write, as a kernel does: B's iteration sends the reply, and A's receive of it is a "
        "third hop, back)",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=-1,
        help="pin every tree's process to this CPU (default: the last one; -2: no pinning)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    trees = [os.path.abspath(t) for t in (args.tree or [os.path.join(HERE, "..")])]
    if args.child:
        sys.path.insert(0, trees[0])
        _child(args)
        return
    if args.cpu != -2:
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[-1] if args.cpu == -1 else args.cpu
        # Inherited by the trees' processes: all on one CPU, whose load they then share.
        os.sched_setaffinity(0, {cpu})
    print(f"load average {_load()}", flush=True)
    children = []
    for tree in trees:
        command = [sys.executable, os.path.abspath(__file__), "--child", "--tree", tree]
        command += ["--evict-mib", str(args.evict_mib), "--idle-ms", str(args.idle_ms)]
        command += ["--plugins"] if args.plugins else []
        command += ["--steps", str(args.steps)] + ([] if args.reply else ["--no-reply"])
        env = dict(os.environ, PYTHONPATH=tree)
        children.append(
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
        )
    results: list[dict[str, Any]] = []
    for tree, child in zip(trees, children, strict=True):
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"the benchmark failed on {tree} (its error is above)")
        first = json.loads(line)
        results.append({"work": first["work"], "steps": first["steps"], "samples": {}, "strays": 0})
    left = args.rounds
    turn = 0
    while left > 0:
        chunk = min(args.chunk, left)
        left -= chunk
        # Every second turn in reverse order: no tree always runs right after another.
        order = list(zip(trees, children, results, strict=True))
        turn += 1
        for tree, child, result in order if turn % 2 else order[::-1]:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(f"{chunk}\n")
            child.stdin.flush()
            line = child.stdout.readline()
            if not line:
                raise SystemExit(f"the benchmark failed on {tree} (its error is above)")
            answer = json.loads(line)
            result["strays"] = answer["strays"]
            result["spoiled"] = answer["spoiled"]
            for key, values in answer["samples"].items():
                result["samples"].setdefault(key, []).extend(values)
    for child in children:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    for tree, result in zip(trees, results, strict=True):
        if args.calls:
            for hop in hops_in(result):
                print(f"{hop} hop's calls, {tree} (from the epoll return to the next poll):")
                print("\n".join("  " + line for line in result["work"][f"{hop} calls"]))
        if args.steps:
            for hop in hops_in(result):
                print_steps(f"{hop} hop, {tree}", result["steps"][hop], args.steps)
        report(tree, result)
    print(f"load average {_load()}")


if __name__ == "__main__":
    main()
