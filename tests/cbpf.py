"""A classic BPF interpreter, enough to run meshguard's socket filters over generated packets.

It models what a UDP socket filter sees: the datagram from its UDP header on (``packet``), the
IP header reachable through ``SKF_NET_OFF`` (``network``) and ``SKF_AD_RANDOM`` (``random``);
``SKF_AD_PROTOCOL`` (``protocol``, the EtherType) serves packet-socket filters.
Loads outside the packet end the program with 0 (drop), as the kernel does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshguard.adapters.socket_filter import Instruction

SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_RANDOM = 56
SKF_NET_OFF = -0x100000
_MASK = 0xFFFFFFFF


def _signed(k: int) -> int:
    return k - (1 << 32) if k & 0x80000000 else k


def run(
    program: Sequence[Instruction],
    packet: bytes,
    *,
    network: bytes = b"",
    random: Callable[[], int] = lambda: 0,
    protocol: int = 0,
) -> int:
    """The program's return value for ``packet`` (0: dropped)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        if pc >= len(program):
            raise ValueError("fell off the end of the program")
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0x00, 0x01):  # LD, LDX
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x00:
                value = k
            elif mode == 0x80:
                value = len(packet)
            elif mode == 0x60:
                value = mem[k & 15]
            elif mode in (0x20, 0x40):
                offset = _signed(k) + (x if mode == 0x40 else 0)
                width = {0x00: 4, 0x08: 2, 0x10: 1}[size]
                if offset == SKF_AD_OFF + SKF_AD_RANDOM:
                    value = random() & _MASK
                elif offset == SKF_AD_OFF + SKF_AD_PROTOCOL:
                    value = protocol
                elif offset <= SKF_NET_OFF + 0xFFFF and offset >= SKF_NET_OFF:
                    start = offset - SKF_NET_OFF
                    if start + width > len(network):
                        return 0
                    value = int.from_bytes(network[start : start + width], "big")
                elif offset < 0:
                    raise ValueError(f"unsupported ancillary load {offset}")
                else:
                    if offset + width > len(packet):
                        return 0
                    value = int.from_bytes(packet[offset : offset + width], "big")
            elif mode == 0xA0 and cls == 0x01:  # MSH
                if k >= len(packet):
                    return 0
                value = (packet[k] & 0x0F) * 4
            else:
                raise ValueError(f"unsupported load {code:#x}")
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:
            mem[k & 15] = a
        elif cls == 0x03:
            mem[k & 15] = x
        elif cls == 0x04:  # ALU
            op = code & 0xF0
            operand = x if code & 0x08 else k
            if op == 0x00:
                a = (a + operand) & _MASK
            elif op == 0x10:
                a = (a - operand) & _MASK
            elif op == 0x20:
                a = (a * operand) & _MASK
            elif op == 0x30:
                if operand == 0:
                    return 0
                a //= operand
            elif op == 0x40:
                a |= operand
            elif op == 0x50:
                a &= operand
            elif op == 0x60:
                a = (a << operand) & _MASK
            elif op == 0x70:
                a >>= operand
            elif op == 0x80:
                a = -a & _MASK
            elif op == 0x90:
                if operand == 0:
                    return 0
                a %= operand
            elif op == 0xA0:
                a ^= operand
            else:
                raise ValueError(f"unsupported ALU op {code:#x}")
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            operand = x if code & 0x08 else k
            if op == 0x10:
                taken = a == operand
            elif op == 0x20:
                taken = a > operand
            elif op == 0x30:
                taken = a >= operand
            elif op == 0x40:
                taken = bool(a & operand)
            else:
                raise ValueError(f"unsupported jump {code:#x}")
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:  # MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
