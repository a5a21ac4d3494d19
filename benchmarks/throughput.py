"""meshguard against wireguard-go builds, side by side: TCP, UDP packet rate, RTT, CPU per GB.

Builds one pair of network namespaces joined by a veth per configuration (tests/netns.py): the
plain veth, each wireguard-go binary given with ``--wireguard-go`` (both ends the same build),
and meshguard on both ends. All tunnels are up at once and the measurements go round-robin
(repetition 1 of every configuration, then repetition 2, ...), so load from other users of the
machine falls on all of them alike. Per configuration and repetition:

- single-stream TCP (iperf3, ``--seconds``) and the CPU time the two tunnel processes used;
- 4-stream TCP (iperf3 -P 4);
- UDP packets per second received at no more than 1 % loss (iperf3 -u, ``--udp-size`` byte
  payloads; the offered rate starts at the tunnel's 4-stream TCP packet rate and steps down);
- ping round-trip time through the tunnel, idle and under a single-stream TCP transfer;
- over each TCP run and the UDP probe that gave the figure, the machine's idle CPU share
  (``/proc/stat``, all cores) and each tunnel process's share of one core (user + sys of its
  process tree from ``/proc/PID/stat``): whether a core was left idle (docs/datapath.md,
  "Both cores").

The report gives medians with min-max ranges and meshguard's ratio to each wireguard-go build.
Needs root.

    python3 benchmarks/throughput.py [--seconds 5] [--reps 3] \\
        [--wireguard-go wireguard-go] [--wireguard-go ../shared/bin/wireguard-go]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshguard.app.status_client import read_status  # noqa: E402
from tests.netns import (  # noqa: E402
    Namespace,
    Testbed,
    TwoHosts,
    WaitTimeoutError,
    meshguard_env,
    require_root_netns,
    two_hosts,
    wg_keypair,
    wireguard_go_pair,
)

DEFAULT_MESHGUARD_CMD = "twistd -n --pidfile= meshguard --config {config}"
TUNNEL_A, TUNNEL_B = "10.99.0.1", "10.99.0.2"
PORT = 51820
CLK_TCK = os.sysconf("SC_CLK_TCK")
METRICS = ("tcp1", "tcp4", "udp_pps", "rtt_idle", "rtt_loaded", "cpu_per_gb")
TITLES = {
    "tcp1": ("TCP 1 stream", "Mbit/s"),
    "tcp4": ("TCP 4 streams", "Mbit/s"),
    "udp_pps": ("UDP at <=1% loss", "kpps"),
    "rtt_idle": ("ping idle", "ms"),
    "rtt_loaded": ("ping loaded", "ms"),
    "cpu_per_gb": ("tunnel CPU", "s/GB"),
}
#: The phases whose CPU use is measured (``Usage``), with the metric each one's figure is.
PHASES = {"tcp1": "tcp1", "tcp4": "tcp4", "udp": "udp_pps"}
#: Metrics where less is better (their ratio reads "meshguard needs x times as much").
LOWER_IS_BETTER = {"rtt_idle", "rtt_loaded", "cpu_per_gb"}


class UnavailableError(Exception):
    """A configuration could not be brought up; the message says why."""


@dataclass
class Config:
    """One tunnel (or the plain veth) under test, up for the whole run."""

    name: str
    tb: Testbed
    hosts: TwoHosts
    dst: str  # B's address through the tunnel (or the veth)
    dst_a: str  # A's address through the tunnel
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ifnames: tuple[str, str] | None = None  # meshguard's, for its status counters
    values: dict[str, list[float]] = field(default_factory=dict)
    #: Per phase (tcp1, tcp4, udp), the CPU use measured over each round's iperf3 client run.
    usage: dict[str, list[Usage]] = field(default_factory=dict)

    def meter(self) -> Meter:
        return Meter([p.pid for p in self.procs])

    def add_usage(self, phase: str, usage: Usage | None) -> None:
        if usage is not None:
            self.usage.setdefault(phase, []).append(usage)

    def add(self, metric: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(metric, []).append(value)


def session_cpu_seconds(leader: int) -> float:
    """user + sys CPU seconds of every live process in ``leader``'s session (its tree)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): session is field 6, utime 14, stime 15.
        if int(entry) == leader or int(fields[3]) == leader:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def cpu(config: Config) -> float:
    return sum(session_cpu_seconds(p.pid) for p in config.procs)


def machine_jiffies() -> tuple[int, int]:
    """(idle, total) CPU time of the whole machine, all cores, from ``/proc/stat``: idle
    counts idle and iowait; total the first eight fields (guest time is inside user)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    return fields[3] + fields[4], sum(fields)


@dataclass
class Usage:
    """Where the CPU went during one phase: the machine's idle share (of all its cores) and
    each tunnel process's share of one core (its process tree's user + sys time)."""

    seconds: float
    idle: float
    procs: list[float]

    def text(self) -> str:
        shares = " ".join(f"{side} {share:.2f}" for side, share in zip("AB", self.procs))
        return f"idle {100 * self.idle:.0f}%" + (f", cores {shares}" if shares else "")


class Meter:
    """Measures a :class:`Usage` between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start: tuple[float, tuple[int, int], list[float]] | None = None
        self.usage: Usage | None = None

    def start(self) -> None:
        cpu_s = [session_cpu_seconds(pid) for pid in self.pids]
        self._start = (time.monotonic(), machine_jiffies(), cpu_s)

    def stop(self) -> Usage:
        assert self._start is not None
        wall0, (idle0, total0), cpu0 = self._start
        idle1, total1 = machine_jiffies()
        cpu1 = [session_cpu_seconds(pid) for pid in self.pids]
        wall = max(time.monotonic() - wall0, 1e-9)
        total = max(total1 - total0, 1)
        shares = [(b - a) / wall for a, b in zip(cpu0, cpu1)]
        self.usage = Usage(wall, (idle1 - idle0) / total, shares)
        return self.usage


# -- measurements ------------------------------------------------------------------------------


def iperf3_json(
    tb: Testbed,
    server: Namespace,
    client: Namespace,
    addr: str,
    seconds: float,
    *extra: str,
    meter: Meter | None = None,
) -> dict[str, object]:
    """One iperf3 run client -> server; its JSON result. ``meter`` runs over the client's
    run only (not the server's start)."""
    proc = tb.spawn(server, ["iperf3", "-s", "-1", "-p", "5201"])
    try:
        tb.wait_for(lambda: tb.listening(server, 5201), timeout=10, what="iperf3 server")
        if meter is not None:
            meter.start()
        cp = tb.run(
            client,
            ["iperf3", "-c", addr, "-p", "5201", "-t", f"{seconds:g}", "-J", *extra],
            timeout=seconds + 30,
            check=False,
        )
        if meter is not None:
            meter.stop()
        result: dict[str, object] = json.loads(cp.stdout or "{}")
        return result
    finally:
        tb.stop(proc)


def tcp_mbits(c: Config, seconds: float, streams: int, phase: str) -> float | None:
    meter = c.meter()
    result = iperf3_json(
        c.tb, c.hosts.b, c.hosts.a, c.dst, seconds, "-P", str(streams), meter=meter
    )
    try:
        mbits = float(result["end"]["sum_received"]["bits_per_second"]) / 1e6  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    c.add_usage(phase, meter.usage)
    return mbits


def udp_run(c: Config, seconds: float, pps: float, size: int) -> tuple[float, float, Usage] | None:
    """(received packets per second, loss %, CPU use) at an offered ``pps``."""
    rate = int(pps * size * 8)
    meter = c.meter()
    result = iperf3_json(
        c.tb,
        c.hosts.b,
        c.hosts.a,
        c.dst,
        seconds,
        *("-u", "-l", str(size), "-b", str(rate), "-w", "4M"),
        meter=meter,
    )
    usage = meter.usage
    try:
        total = result["end"]["sum"]  # type: ignore[index]
        packets, lost = int(total["packets"]), int(total["lost_packets"])  # type: ignore[index]
        elapsed = float(total["seconds"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    if packets <= 0 or elapsed <= 0 or usage is None:
        return None
    return (packets - lost) / elapsed, 100.0 * lost / packets, usage


def udp_pps(c: Config, seconds: float, size: int, start_pps: float) -> float | None:
    """The highest received packet rate seen with at most 1 % loss: a first probe at
    ``start_pps``, then a bisection between the best offered rate that kept loss within 1 %
    and the lowest that did not (six probes at most). The CPU use of the probe that gave
    the figure is kept as the ``udp`` phase's."""
    got = udp_run(c, seconds, start_pps, size)
    if got is None:
        return None
    received, loss, usage = got
    if loss <= 1.0:
        c.add_usage("udp", usage)
        return received
    good, bad = 0.0, start_pps
    best = None
    best_usage = None
    offered = received * 0.95
    for _ in range(5):
        got = udp_run(c, seconds, offered, size)
        if got is None:
            break
        received, loss, usage = got
        if loss <= 1.0:
            if best is None or received > best:
                best, best_usage = received, usage
            good = offered
        else:
            bad = offered
        offered = (good + bad) / 2 if good else min(offered * 0.7, received * 0.9)
    c.add_usage("udp", best_usage)
    return best


def ping_ms(tb: Testbed, ns: Namespace, addr: str, count: int) -> float | None:
    """Average RTT of ``count`` pings 20 ms apart."""
    cp = tb.run(
        ns,
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.02", "-W", "2", addr],
        timeout=count * 0.02 + 10,
        check=False,
    )
    match = re.search(r"= [\d.]+/([\d.]+)/", cp.stdout)
    return float(match.group(1)) if match else None


def loaded_ping_ms(c: Config, seconds: float, count: int) -> float | None:
    """RTT A -> B while a single TCP stream runs A -> B."""
    tb = c.tb
    server = tb.spawn(c.hosts.b, ["iperf3", "-s", "-1", "-p", "5202"])
    client = None
    try:
        tb.wait_for(lambda: tb.listening(c.hosts.b, 5202), timeout=10, what="iperf3 server")
        client = tb.spawn(
            c.hosts.a, ["iperf3", "-c", c.dst, "-p", "5202", "-t", f"{seconds + 2:g}"]
        )
        time.sleep(1.0)  # let the stream fill the pipe
        return ping_ms(tb, c.hosts.a, c.dst, count)
    finally:
        if client is not None:
            tb.stop(client)
        tb.stop(server)


def measure_round(c: Config, args: argparse.Namespace, rep: int) -> None:
    measured = {phase: len(c.usage.get(phase, [])) for phase in PHASES}
    before = cpu(c)
    tcp1 = tcp_mbits(c, args.seconds, 1, "tcp1")
    spent = cpu(c) - before
    c.add("tcp1", tcp1)
    if c.procs and tcp1:
        c.add("cpu_per_gb", spent / (tcp1 * args.seconds / 8 / 1000))
    tcp4 = tcp_mbits(c, args.seconds, 4, "tcp4")
    c.add("tcp4", tcp4)
    udp = idle = loaded = None
    if tcp4 and not args.tcp_only:
        start = tcp4 * 1e6 / 8 / max(args.udp_size, 1000) * 1.2
        udp = udp_pps(c, args.udp_seconds, args.udp_size, start)
        c.add("udp_pps", None if udp is None else udp / 1000)
    if not args.tcp_only:
        idle = ping_ms(c.tb, c.hosts.a, c.dst, args.pings)
        c.add("rtt_idle", idle)
        loaded = loaded_ping_ms(c, args.pings * 0.02 + 1, args.pings)
        c.add("rtt_loaded", loaded)

    def show(value: float | None, unit: str, phase: str = "") -> str:
        text = "-" if value is None else f"{number(value)} {unit}"
        usage = c.usage.get(phase, [])
        if phase and len(usage) > measured[phase]:
            text += f" [{usage[-1].text()}]"
        return text

    print(
        f"  {c.name} rep {rep}: tcp1 {show(tcp1, 'Mbit/s', 'tcp1')} (CPU {spent:.2f} s), "
        f"tcp4 {show(tcp4, 'Mbit/s', 'tcp4')}, udp {show(udp and udp / 1000, 'kpps', 'udp')}, "
        f"rtt idle {show(idle, 'ms')} loaded {show(loaded, 'ms')}, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


# -- configurations ----------------------------------------------------------------------------


def tunnel_up(tb: Testbed, hosts: TwoHosts, timeout: float, what: str) -> None:
    tb.wait_for(
        lambda: tb.ping(hosts.a, TUNNEL_B, timeout=1) and tb.ping(hosts.b, TUNNEL_A, timeout=1),
        timeout=timeout,
        what=what,
    )


def check_mtu(tb: Testbed, ns: Namespace, ifname: str, want: int) -> None:
    """Both tunnels must run at the same MTU, or the comparison says little."""
    out = tb.ip(ns, "-o", "link", "show", "dev", ifname)
    match = re.search(r"\bmtu (\d+)", out)
    got = int(match.group(1)) if match else None
    if got != want:
        raise UnavailableError(f"{ifname} has MTU {got}, not {want}")


def wireguard_go_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=5
        ).stdout
    except OSError as e:
        raise UnavailableError(f"cannot run {binary}: {e}") from None
    match = re.search(r"v\d[\w.]*", out)
    return match.group(0) if match else "unknown"


def bring_up_plain(tb: Testbed, args: argparse.Namespace) -> Config:
    hosts = two_hosts(tb)
    return Config("plain veth", tb, hosts, hosts.b_addr, hosts.a_addr)


def bring_up_wireguard_go(binary: str) -> Callable[[Testbed, argparse.Namespace], Config]:
    def bring_up(tb: Testbed, args: argparse.Namespace) -> Config:
        name = f"wg-go {wireguard_go_version(binary)}"
        hosts = two_hosts(tb)
        pair = wireguard_go_pair(tb, hosts, port=PORT, mtu=args.mtu, wireguard_go=binary)
        tunnel_up(tb, hosts, 15, f"{name} tunnel")
        check_mtu(tb, hosts.a, pair.a_if, args.mtu)
        return Config(name, tb, hosts, pair.b_tun, pair.a_tun, [pair.a_proc, pair.b_proc])

    return bring_up


def write_config(
    path: Path, private: str, own: str, peer_public: str, peer: str, end: str, mtu: int
) -> None:
    path.write_text(
        "[Interface]\n"
        f"PrivateKey = {private}\n"
        f"ListenPort = {PORT}\n"
        f"Address = {own}/24\n"
        f"MTU = {mtu}\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {peer_public}\n"
        f"AllowedIPs = {peer}/32\n"
        f"Endpoint = {end}:{PORT}\n"
    )
    path.chmod(0o600)


def bring_up_meshguard_tree(
    label: str, tree: str
) -> Callable[[Testbed, argparse.Namespace], Config]:
    """meshguard from another source tree (an older commit, for before/after figures)."""

    def bring_up(tb: Testbed, args: argparse.Namespace) -> Config:
        return bring_up_meshguard(tb, args, name=f"meshguard {label}", tree=tree)

    return bring_up


def bring_up_meshguard(
    tb: Testbed, args: argparse.Namespace, name: str = "meshguard", tree: str | None = None
) -> Config:
    hosts = two_hosts(tb)
    a_key, b_key = wg_keypair(), wg_keypair()
    a_if, b_if = tb.ifname("mga"), tb.ifname("mgb")
    a_conf, b_conf = tb.log_dir / f"{a_if}.conf", tb.log_dir / f"{b_if}.conf"
    write_config(a_conf, a_key.private, TUNNEL_A, b_key.public, TUNNEL_B, hosts.b_addr, args.mtu)
    write_config(b_conf, b_key.private, TUNNEL_B, a_key.public, TUNNEL_A, hosts.a_addr, args.mtu)
    procs: list[subprocess.Popen[bytes]] = []
    for ns, conf, ifname in ((hosts.a, a_conf, a_if), (hosts.b, b_conf, b_if)):
        argv = shlex.split(args.meshguard_cmd.format(config=conf, ifname=ifname))
        try:
            # PYTHONPATH=REPO: twistd finds twisted/plugins/meshguard_plugin.py and this
            # tree's code (twistd does not look in the working directory).
            env = meshguard_env({"PYTHONPATH": tree} if tree else None)
            procs.append(tb.spawn(ns, argv, env=env, cwd=tree or REPO))
        except OSError as e:
            raise UnavailableError(f"cannot start {argv[0]}: {e}") from None
    try:
        tunnel_up(tb, hosts, args.meshguard_timeout, "meshguard tunnel")
    except WaitTimeoutError:
        tails = "\n".join(
            f"--- {tb.log_of(p)} (exit {p.poll()}):\n{tb.log_tail(p, 1500)}" for p in procs
        )
        raise UnavailableError(
            f"meshguard did not come up within {args.meshguard_timeout:g} s "
            f"(command: {args.meshguard_cmd!r})\n{tails}"
        ) from None
    check_mtu(tb, hosts.a, a_if, args.mtu)
    return Config(name, tb, hosts, TUNNEL_B, TUNNEL_A, procs, (a_if, b_if))


def offload_summary(ifname: str) -> str:
    """How much the UDP and TUN offloads batched on one node, from its ``meshguard status``
    document (the status socket is a path, reachable from outside the node's namespace)."""
    try:
        node = read_status(ifname)["node"]
        udp = node["udp_offload"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no offload counters ({e.__class__.__name__}: {e})"

    def per(count: int, calls: int) -> str:
        return f"{count / calls:.1f}" if calls else "-"

    text = (
        f"UDP GSO {udp['gso']}: {udp['gso_sends']} sends x "
        f"{per(udp['gso_datagrams'], udp['gso_sends'])}; "
        f"GRO {udp['gro']}: {udp['gro_reads']} of {udp['reads']} reads x "
        f"{per(udp['gro_datagrams'], udp['gro_reads'])}"
    )
    tun = node.get("tun_offload")
    if isinstance(tun, dict):
        text += (
            f"; TUN {tun['offloads']}: {tun['gso_reads']} super-packet reads x "
            f"{per(tun['gso_segments'], tun['gso_reads'])} segments, "
            f"{tun['gro_writes']} coalesced writes x {per(tun['gro_packets'], tun['gro_writes'])}"
        )
        if "gro_udp_writes" in tun:
            text += (
                f", {tun['gro_udp_writes']} joined UDP writes x "
                f"{per(tun['gro_udp_packets'], tun['gro_udp_writes'])}"
            )
    return text


# -- report ------------------------------------------------------------------------------------


def number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def summary(values: list[float] | None) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return number(med)
    return f"{number(med)} ({number(min(values))}-{number(max(values))})"


def report(configs: list[Config], skipped: dict[str, str], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.seconds:g} s iperf3 runs x {args.reps} rounds, tunnel MTU {args.mtu}, "
        f"UDP payload {args.udp_size} B, {args.pings} pings per RTT figure, "
        f"{os.cpu_count()} CPUs, load average now {os.getloadavg()[0]:.2f}; "
        "median (min-max)"
    )
    width = max([len(c.name) for c in configs] + [10]) + 14
    print(f"{'':<{width}}" + "".join(f"{TITLES[m][0]:>24}" for m in METRICS))
    print(f"{'':<{width}}" + "".join(f"{TITLES[m][1]:>24}" for m in METRICS))
    for c in configs:
        print(f"{c.name:<{width}}" + "".join(f"{summary(c.values.get(m)):>24}" for m in METRICS))
    for name, why in skipped.items():
        print(f"{name:<{width}}  skipped: {why.splitlines()[0]}")
    mg = next((c for c in configs if c.name == "meshguard"), None)
    if mg is None:
        return
    for other in configs:
        if other is mg or not other.procs:
            continue
        cells = []
        for m in METRICS:
            a, b = mg.values.get(m), other.values.get(m)
            if a and b and statistics.median(b):
                cells.append(f"{statistics.median(a) / statistics.median(b):.2f}")
            else:
                cells.append("-")
        label = f"meshguard / {other.name}"
        print(f"{label:<{width}}" + "".join(f"{cell:>24}" for cell in cells))
    print("(ratios of medians; for ping and CPU lower is better)")


def usage_report(configs: list[Config]) -> None:
    """Per tunnel and phase, medians over the rounds: the machine's idle share (of all its
    cores) and each tunnel process's share of one core, beside the phase's figure."""
    print()
    print(
        f"CPU use over each iperf3 client run, median (min-max) over rounds: machine idle "
        f"(share of all {os.cpu_count()} cores), tunnel processes A (sender) and B (receiver) "
        "in cores"
    )
    for c in configs:
        for phase, metric in PHASES.items():
            usage = c.usage.get(phase)
            if not usage:
                continue
            idle = summary([100 * u.idle for u in usage])
            text = f"  {c.name:<24} {phase:<5} {summary(c.values.get(metric)):>20} "
            text += f"{TITLES[metric][1]:<7} idle {idle} %"
            for index, side in enumerate("AB"):
                shares = [u.procs[index] for u in usage if len(u.procs) > index]
                if shares:
                    text += f", {side} {summary(shares)}"
            print(text)


def write_json(path: str, configs: list[Config], args: argparse.Namespace) -> None:
    """The figures and CPU use of every round, for tables made elsewhere."""
    document = {
        "args": vars(args),
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "configs": {
            c.name: {
                "values": c.values,
                "usage": {
                    phase: [{"seconds": u.seconds, "idle": u.idle, "procs": u.procs} for u in usage]
                    for phase, usage in c.usage.items()
                },
            }
            for c in configs
        },
    }
    Path(path).write_text(json.dumps(document, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 TCP duration")
    parser.add_argument("--reps", type=int, default=3, help="rounds over all configurations")
    parser.add_argument(
        "--wireguard-go",
        action="append",
        metavar="PATH",
        help="a wireguard-go binary to compare with (repeatable; default: wireguard-go on PATH)",
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the plain veth")
    parser.add_argument("--no-meshguard", action="store_true", help="skip meshguard")
    parser.add_argument(
        "--tcp-only",
        action="store_true",
        help="TCP (1 and 4 streams) and CPU per GB only: more rounds in the same time when "
        "comparing trees on a change to the bulk path",
    )
    parser.add_argument("--udp-size", type=int, default=1000, help="UDP payload bytes")
    parser.add_argument("--udp-seconds", type=float, default=3.0)
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument(
        "--meshguard-cmd",
        default=DEFAULT_MESHGUARD_CMD,
        help="command run in each namespace; {config} is the wg-quick style config file "
        "(named IFNAME.conf), {ifname} the interface name (default: %(default)s)",
    )
    parser.add_argument(
        "--meshguard-tree",
        action="append",
        metavar="LABEL=PATH",
        help="also run meshguard from another source tree (repeatable), e.g. "
        "before=/tmp/old (make one with: git archive COMMIT | tar -x -C /tmp/old)",
    )
    parser.add_argument("--meshguard-timeout", type=float, default=15.0)
    parser.add_argument("--mtu", type=int, default=1420, help="tunnel MTU on all tunnels")
    parser.add_argument("--json", metavar="PATH", help="also write every round's figures here")
    args = parser.parse_args(argv)
    try:
        require_root_netns(None, binaries=("ip", "wg", "iperf3", "ping", "ss"))
    except Exception as e:
        print(f"cannot build the testbed: {e}", file=sys.stderr)
        return 2

    wanted: list[tuple[str, Callable[[Testbed, argparse.Namespace], Config]]] = []
    if not args.no_plain:
        wanted.append(("plain", bring_up_plain))
    for binary in args.wireguard_go or ["wireguard-go"]:
        wanted.append((binary, bring_up_wireguard_go(binary)))
    if not args.no_meshguard:
        wanted.append(("meshguard", bring_up_meshguard))
    for item in args.meshguard_tree or []:
        label, _, tree = item.partition("=")
        wanted.append((f"meshguard {label}", bring_up_meshguard_tree(label, tree)))

    configs: list[Config] = []
    skipped: dict[str, str] = {}
    testbeds: list[Testbed] = []
    try:
        for label, bring_up in wanted:
            tb = Testbed()
            testbeds.append(tb)
            try:
                config = bring_up(tb, args)
            except (UnavailableError, WaitTimeoutError) as e:
                skipped[label] = str(e)
                print(f"== {label}: skipped: {e}")
                continue
            configs.append(config)
            print(f"== {config.name} up (logs: {tb.log_dir})")
        for rep in range(1, args.reps + 1):
            # Every other round runs the configurations in reverse: on a 2-core machine a run
            # measured right after another one's cool-down came out consistently different
            # (TCP medians followed the running order in 7 of 8 side-by-side rounds).
            for config in configs if rep % 2 else reversed(configs):
                measure_round(config, args, rep)
        for config in configs:
            if config.ifnames is not None:
                for side, ifname in zip(("A (sender)", "B (receiver)"), config.ifnames):
                    print(f"  {config.name} {side}: {offload_summary(ifname)}")
    finally:
        for tb in testbeds:
            tb.cleanup()
    report(configs, skipped, args)
    usage_report(configs)
    if args.json:
        write_json(args.json, configs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
