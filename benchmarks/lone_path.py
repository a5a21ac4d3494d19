"""The cold lone packet's engine path, in work done and in CPU time.

An idle ping's hop is mostly cold interpreter code (docs/datapath.md, "Latency"), and
``hops.py`` cannot resolve a change of a few microseconds on a shared machine. This measures
the engine's share of the two cold hops in process, with the ``engine.py`` I/O stub: node A
sealing an 84-byte echo request (``Device.packet_from_tun``) and node B opening and delivering
it (``Device.datagram_received``).

- Work: Python calls, C calls (``sys.setprofile``) and bytecode instructions
  (``sys.settrace`` opcode events) of one call each; deterministic, comparable across trees.
- Cold CPU: thread CPU time of each call after reading a 32 MiB buffer (which evicts the
  caches, as an idle moment does), median and best of ``--rounds``.

    python3 benchmarks/lone_path.py [--tree PATH] [--rounds 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--tree", default=os.path.join(os.path.dirname(__file__), ".."))
parser.add_argument("--rounds", type=int, default=300)
args = parser.parse_args()
sys.path.insert(0, os.path.join(args.tree, "benchmarks"))
sys.path.insert(0, args.tree)

from engine import handshake, pair  # noqa: E402

from tests.packets import ipv4  # noqa: E402

SOURCE = ("192.0.2.1", 51820)


def work(run: Callable[[], None], again: Callable[[], None]) -> tuple[int, int, int]:
    """(Python calls, C calls, opcodes): ``run`` under the profiler, ``again`` traced."""
    counts = {"call": 0, "c_call": 0, "opcode": 0}

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event in counts:
            counts[event] += 1

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts["opcode"] += 1
        return trace

    sys.setprofile(profile)
    run()
    sys.setprofile(None)
    sys.settrace(trace)
    again()
    sys.settrace(None)
    return counts["call"], counts["c_call"], counts["opcode"]


def main() -> None:
    a, sa, b, sb = pair()
    now = 1000.0
    handshake(a, sa, b, sb, now)
    sa.keep = sb.keep = False
    request = ipv4("10.0.0.1", "10.0.0.2", b"\x08\x00" + bytes(62), protocol=1)
    for _ in range(3):
        a.packet_from_tun(request, now)
        b.datagram_received(sa.last, SOURCE, now)
    now += 1
    send = work(lambda: a.packet_from_tun(request, now), lambda: a.packet_from_tun(request, now))
    first = sa.last
    a.packet_from_tun(request, now)
    second = sa.last
    receive = work(
        lambda: b.datagram_received(first, SOURCE, now),
        lambda: b.datagram_received(second, SOURCE, now),
    )
    assert b.counters.replayed == 0
    print(f"tree {os.path.abspath(args.tree)}")
    print(f"work (Python calls / C calls / opcodes): send {send}, receive {receive}")
    big = bytearray(32 << 20)
    clock = time.thread_time_ns
    sends: list[int] = []
    receives: list[int] = []
    for i in range(args.rounds):
        at = now + 1 + i * 0.02
        bytes(big)
        t0 = clock()
        a.packet_from_tun(request, at)
        t1 = clock()
        message = sa.last
        bytes(big)
        t2 = clock()
        b.datagram_received(message, SOURCE, at)
        t3 = clock()
        sends.append(t1 - t0)
        receives.append(t3 - t2)
    print(
        f"cold CPU, us (median / best of {args.rounds}): send "
        f"{statistics.median(sends) / 1e3:.1f} / {min(sends) / 1e3:.1f}, receive "
        f"{statistics.median(receives) / 1e3:.1f} / {min(receives) / 1e3:.1f}"
    )


if __name__ == "__main__":
    main()
