"""Classic BPF socket filters for the WireGuard UDP port: drop in the kernel what cannot be ours.

A flood costs the node most where Python touches each datagram (a ``recvmsg``, a dispatch, often
a MAC). Every datagram the kernel drops at the socket instead never reaches the queue, so it can
neither use Python's time nor crowd the tunnel's own datagrams out of the receive buffer. Classic
BPF (``SO_ATTACH_FILTER``) is available to any process that owns the socket, needs no privilege
and runs before the datagram is queued.

The programs are built by pure functions (:func:`port_filter`) as lists of instructions, so
tests can run them in an interpreter over generated packets; :func:`attach` installs one.

What may pass, for a datagram whose payload starts with a little-endian type and three zero
bytes:

- type 1 (initiation, 148 bytes), 2 (response, 92), 3 (cookie reply, 64): exactly that size, or
  at least that size plus 20. The second form is a GRO bundle: a socket with ``UDP_GRO`` may be
  handed several datagrams of one flow coalesced into one buffer (all segments the size of the
  first, the last no larger), and the filter sees only the first header and the total length;
  the smallest datagram that can follow is a 20-byte mesh probe.
- type 4 (transport): at least 32 bytes, any length beyond. The plaintext is padded to a
  multiple of 16 only as far as the interface MTU allows: with the usual MTU of 1420 a
  full-size packet is 1420 + 32 = 1452 bytes, 12 more than a multiple of 16, and a GRO bundle
  of them can have any remainder. (A rule "length % 16 == 0" drops full-size packets; the
  first version of this filter did, and cut an idle tunnel's throughput by two thirds.)
- the mesh layer's probes (``MGn`` and a kind byte, a fixed size each, see
  :data:`MESH_DATAGRAMS`), or a GRO bundle of them (a multiple of that size).

Everything else is dropped: unknown types, nonzero reserved bytes, sizes no message or bundle of
ours can have.

Under a flood (:class:`Shedding`, decided by the flood guard from the device's drop counters)
the filter also:

- passes transport data only for receiver indices that are live on this node (the index table's
  keys, little-endian in the datagram), so junk data for unknown receivers stops in the kernel;
- passes handshake messages (types 1-3) from the addresses of known peers, and from any other
  source only a random sample (``SKF_AD_RANDOM & mask == 0``), so a handshake flood reaches
  Python at a bounded rate while known peers still re-handshake.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from meshguard.mesh.keepalive import ACK_MAGIC, DATAGRAM_SIZE, ECHO_MAGIC, PROBE_MAGIC
from meshguard.mesh.selfcheck import CHECK_MAGIC

__all__ = [
    "MAX_INSTRUCTIONS",
    "MESH_DATAGRAMS",
    "Instruction",
    "Shedding",
    "attach",
    "detach",
    "port_filter",
]

#: One classic BPF instruction: (code, jump-if-true, jump-if-false, k), as ``struct sock_filter``.
Instruction = tuple[int, int, int, int]

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
#: The kernel's limit on a classic BPF program (``BPF_MAXINSNS``).
MAX_INSTRUCTIONS = 4096

# Opcodes (linux/filter.h, linux/bpf_common.h).
LD, LDX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN = 0x00, 0x20, 0x40, 0x60, 0x80
ADD, SUB, AND, MOD = 0x00, 0x10, 0x50, 0x90
JA, JEQ, JGT, JGE = 0x00, 0x10, 0x20, 0x30
K, X, A_SRC = 0x00, 0x08, 0x10

#: Ancillary loads: a random u32, and the network (IP) header.
SKF_AD_OFF = -0x1000
SKF_AD_RANDOM = 56
SKF_NET_OFF = -0x100000

ACCEPT = 0xFFFFFFFF
DROP = 0

#: A socket filter on a UDP socket sees the datagram from its UDP header on.
UDP_HEADER = 8

_TYPE_INITIATION = 0x01000000  # first word, big-endian: type byte then three zero bytes
_TYPE_RESPONSE = 0x02000000
_TYPE_COOKIE = 0x03000000
_TYPE_TRANSPORT = 0x04000000
_HANDSHAKE_SIZES = {_TYPE_INITIATION: 148, _TYPE_RESPONSE: 92, _TYPE_COOKIE: 64}
_SMALLEST_MESSAGE = 32  # a keepalive: the shortest transport message

#: Datagrams of the mesh layer that share the port: (first four bytes, exact size).
MESH_DATAGRAMS: tuple[tuple[bytes, int], ...] = tuple(
    (magic, DATAGRAM_SIZE) for magic in (PROBE_MAGIC, ACK_MAGIC, ECHO_MAGIC, CHECK_MAGIC)
)

#: The shortest datagram that can follow another in a GRO bundle (a mesh probe, else a keepalive).
_SMALLEST_FOLLOWER = min([_SMALLEST_MESSAGE, *(size for _, size in MESH_DATAGRAMS)])

#: Compares per run between two local ``ret`` instructions, so every jump stays under 256.
_CHUNK = 200


@dataclass(frozen=True)
class Shedding:
    """What the filter lets through while the node is flooded.

    ``known_sources``: raw addresses (4 bytes for the IPv4 socket, 16 for IPv6) of peers whose
    handshakes always pass. ``receiver_indices``: the live local indices transport data may be
    addressed to (None: do not check them). ``sample_mask``: a handshake from any other source
    passes when ``random & sample_mask == 0`` (0 passes them all, 63 about one in 64).
    """

    known_sources: tuple[bytes, ...] = ()
    receiver_indices: tuple[int, ...] | None = None
    sample_mask: int = 0


class _Assembler:
    """Instructions with symbolic forward jumps, resolved to the 8-bit relative offsets."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}
        self._far: list[tuple[int, str]] = []
        self._fresh = 0

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def fresh(self, hint: str) -> str:
        self._fresh += 1
        return f"{hint}.{self._fresh}"

    def op(self, code: int, k: int = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def jump(self, target: str) -> None:
        """An unconditional jump (32-bit offset), for targets beyond a conditional's reach."""
        self._far.append((len(self.code), target))
        self.code.append((JMP | JA, 0, 0, 0))

    def build(self) -> list[Instruction]:
        for at, target in self._far:
            self.code[at] = (JMP | JA, 0, 0, self.labels[target] - at - 1)
        out: list[Instruction] = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            out.append((code, self._offset(i, jt), self._offset(i, jf), k))
        if len(out) > MAX_INSTRUCTIONS:
            raise ValueError(f"BPF program of {len(out)} instructions exceeds {MAX_INSTRUCTIONS}")
        return out

    def _offset(self, at: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - at - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target} out of range ({offset})")
        return offset


def port_filter(
    *,
    v6: bool = False,
    shedding: Shedding | None = None,
    mesh_datagrams: Sequence[tuple[bytes, int]] = MESH_DATAGRAMS,
) -> list[Instruction]:
    """The classic BPF program for the node's UDP socket of one family (see the module doc)."""
    asm = _Assembler()
    hdr = UDP_HEADER
    # Shortest datagram we take: a type word (the mesh probes and all messages are longer).
    asm.op(LD | W | LEN)
    asm.op(JMP | JGE | K, hdr + 4, 0, "drop")
    asm.op(LD | W | ABS, hdr)
    asm.op(JMP | JEQ | K, _TYPE_TRANSPORT, "transport", 0)
    for word, size in _HANDSHAKE_SIZES.items():
        asm.op(JMP | JEQ | K, word, f"size{size}", 0)
    for i, (magic, _) in enumerate(mesh_datagrams):
        asm.op(JMP | JEQ | K, int.from_bytes(magic, "big"), f"mesh{i}", 0)
    asm.label("drop")
    asm.op(RET | K, DROP)

    for i, (_, size) in enumerate(mesh_datagrams):
        asm.label(f"mesh{i}")
        # One probe, or a GRO bundle of them (nothing shorter can follow): a multiple of its size.
        asm.op(LD | W | LEN)
        asm.op(JMP | JGE | K, hdr + size, 0, "mdrop")
        asm.op(ALU | SUB | K, hdr)
        asm.op(ALU | MOD | K, size)
        asm.op(JMP | JEQ | K, 0, 0, "mdrop")
        asm.op(RET | K, ACCEPT)
    asm.label("mdrop")
    asm.op(RET | K, DROP)

    # Handshake messages: the exact size, or a GRO bundle led by one.
    for size in _HANDSHAKE_SIZES.values():
        asm.label(f"size{size}")
        asm.op(LD | W | LEN)
        asm.op(JMP | JEQ | K, hdr + size, "handshake", 0)
        asm.op(JMP | JGE | K, hdr + size + _SMALLEST_FOLLOWER, "handshake", "hdrop")
    asm.label("hdrop")
    asm.op(RET | K, DROP)

    # Transport: >= 32 bytes, any length beyond (see the module doc).
    asm.label("transport")
    asm.op(LD | W | LEN)
    asm.op(JMP | JGE | K, hdr + _SMALLEST_MESSAGE, "tshape", 0)
    asm.op(RET | K, DROP)
    asm.label("tshape")
    indices = None if shedding is None else shedding.receiver_indices
    if indices is not None:
        asm.jump("indices")
    else:
        asm.op(RET | K, ACCEPT)

    asm.label("handshake")
    if shedding is not None:
        sources = [s for s in shedding.known_sources if len(s) == (16 if v6 else 4)]
        if v6:
            for source in sources:
                # Four words each; a match ends in its own accept so no jump grows long.
                miss = asm.fresh("miss")
                for n in range(4):
                    asm.op(LD | W | ABS, SKF_NET_OFF + 8 + 4 * n)
                    asm.op(JMP | JEQ | K, int.from_bytes(source[4 * n : 4 * n + 4], "big"), 0, miss)
                asm.op(RET | K, ACCEPT)
                asm.label(miss)
        elif sources:
            asm.op(LD | W | ABS, SKF_NET_OFF + 12)
            _one_of(asm, [int.from_bytes(s, "big") for s in sources])
        if shedding.sample_mask:
            asm.op(LD | W | ABS, SKF_AD_OFF + SKF_AD_RANDOM)
            asm.op(ALU | AND | K, shedding.sample_mask)
            asm.op(JMP | JEQ | K, 0, 0, 1)
            asm.op(RET | K, ACCEPT)
            asm.op(RET | K, DROP)
    asm.op(RET | K, ACCEPT)

    if indices is not None:
        asm.label("indices")
        asm.op(LD | W | ABS, hdr + 4)
        # The receiver index is little-endian in the datagram; LD W reads big-endian.
        _one_of(asm, [int.from_bytes(i.to_bytes(4, "little"), "big") for i in indices])
        asm.op(RET | K, DROP)
    return asm.build()


def _one_of(asm: _Assembler, values: Sequence[int]) -> None:
    """Accept when A equals one of ``values``; fall through otherwise. Compares come in runs,
    each followed by its own ``ret ACCEPT``, so no jump is longer than 8 bits allow."""
    for start in range(0, len(values), _CHUNK):
        hit = asm.fresh("hit")
        for value in values[start : start + _CHUNK]:
            asm.op(JMP | JEQ | K, value, hit, 0)
        asm.op(JMP | JA, 1)  # no match in this run: skip its accept
        asm.label(hit)
        asm.op(RET | K, ACCEPT)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """Install ``program`` on ``sock`` (replacing any filter it had); raises ``OSError``."""
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def detach(sock: socket.socket) -> None:
    """Remove the socket's filter, if any."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass
