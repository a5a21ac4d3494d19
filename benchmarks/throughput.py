"""Single-stream TCP throughput through plain veth, wireguard-go and meshguard.

Builds two network namespaces joined by a veth (tests/netns.py), runs iperf3 A -> B for
``--seconds`` seconds ``--reps`` times per configuration and reports the median, plus the CPU time
(user + sys, from /proc/PID/stat) the two tunnel processes used. Needs root.

    python3 benchmarks/throughput.py [--seconds 10] [--reps 3] [--only wireguard-go,meshguard]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshguard.status_client import read_status  # noqa: E402
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
CONFIGS = ("plain", "wireguard-go", "meshguard")
TUNNEL_A, TUNNEL_B = "10.99.0.1", "10.99.0.2"
PORT = 51820
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    mbits: list[float]
    cpu_seconds: list[float]  # per repetition, both tunnel processes together (0 for plain)
    seconds: float

    @property
    def median(self) -> float:
        return statistics.median(self.mbits)

    @property
    def cpu_per_gb(self) -> float | None:
        """Tunnel CPU seconds per gigabyte carried (lower is better)."""
        if not any(self.cpu_seconds):
            return None
        gigabytes = sum(m * self.seconds / 8 / 1000 for m in self.mbits)
        return sum(self.cpu_seconds) / gigabytes


class UnavailableError(Exception):
    """A configuration could not be brought up; the message says why."""


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


def measure(
    tb: Testbed,
    hosts: TwoHosts,
    dst: str,
    name: str,
    procs: Sequence[subprocess.Popen[bytes]],
    seconds: float,
    reps: int,
) -> Result:
    result = Result(name, [], [], seconds)
    for i in range(reps):
        before = sum(session_cpu_seconds(p.pid) for p in procs)
        mbits = tb.iperf3(hosts.b, hosts.a, dst, seconds)
        after = sum(session_cpu_seconds(p.pid) for p in procs)
        result.mbits.append(mbits)
        result.cpu_seconds.append(after - before)
        print(
            f"  {name} rep {i + 1}/{reps}: {mbits:9.1f} Mbit/s, tunnel CPU {after - before:.2f} s"
        )
    return result


def tunnel_up(tb: Testbed, hosts: TwoHosts, timeout: float, what: str) -> None:
    tb.wait_for(
        lambda: tb.ping(hosts.a, TUNNEL_B, timeout=1) and tb.ping(hosts.b, TUNNEL_A, timeout=1),
        timeout=timeout,
        what=what,
    )


def check_mtu(tb: Testbed, hosts: TwoHosts, ifname: str, want: int) -> None:
    """Both tunnels must run at the same MTU, or the comparison says little."""
    out = tb.ip(hosts.a, "-o", "link", "show", "dev", ifname)
    match = re.search(r"\bmtu (\d+)", out)
    got = int(match.group(1)) if match else None
    print(f"  {ifname} mtu {got}")
    if got != want:
        raise UnavailableError(f"{ifname} has MTU {got}, not {want}")


def run_plain(tb: Testbed, hosts: TwoHosts, args: argparse.Namespace) -> Result:
    return measure(tb, hosts, hosts.b_addr, "plain", [], args.seconds, args.reps)


def run_wireguard_go(tb: Testbed, hosts: TwoHosts, args: argparse.Namespace) -> Result:
    pair = wireguard_go_pair(tb, hosts, port=PORT, mtu=args.mtu)
    tunnel_up(tb, hosts, 15, "wireguard-go tunnel")
    check_mtu(tb, hosts, pair.a_if, args.mtu)
    return measure(
        tb, hosts, pair.b_tun, "wireguard-go", [pair.a_proc, pair.b_proc], args.seconds, args.reps
    )


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


def run_meshguard(tb: Testbed, hosts: TwoHosts, args: argparse.Namespace) -> Result:
    a_key, b_key = wg_keypair(), wg_keypair()
    a_if, b_if = tb.ifname("mga"), tb.ifname("mgb")
    a_conf, b_conf = tb.log_dir / f"{a_if}.conf", tb.log_dir / f"{b_if}.conf"
    write_config(a_conf, a_key.private, TUNNEL_A, b_key.public, TUNNEL_B, hosts.b_addr, args.mtu)
    write_config(b_conf, b_key.private, TUNNEL_B, a_key.public, TUNNEL_A, hosts.a_addr, args.mtu)
    procs: list[subprocess.Popen[bytes]] = []
    for ns, conf, ifname in ((hosts.a, a_conf, a_if), (hosts.b, b_conf, b_if)):
        argv = shlex.split(args.meshguard_cmd.format(config=conf, ifname=ifname))
        procs.append(start(tb, ns, argv))
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
    check_mtu(tb, hosts, a_if, args.mtu)
    result = measure(tb, hosts, TUNNEL_B, "meshguard", procs, args.seconds, args.reps)
    for side, ifname in (("A (sender)", a_if), ("B (receiver)", b_if)):
        print(f"  {side}: {offload_summary(ifname)}")
    return result


def offload_summary(ifname: str) -> str:
    """How much the UDP offloads batched on one node, from its ``meshguard status`` document
    (the status socket is a path, so it is reachable from outside the node's namespace)."""
    try:
        offload = read_status(ifname)["node"]["udp_offload"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no UDP offload counters ({e.__class__.__name__}: {e})"

    def per(count: int, calls: int) -> str:
        return f"{count / calls:.1f}" if calls else "-"

    received = offload["reads"] - offload["gro_reads"] + offload["gro_datagrams"]
    return (
        f"GSO {offload['gso']}: {offload['gso_sends']} sends, "
        f"{per(offload['gso_datagrams'], offload['gso_sends'])} datagrams each, "
        f"{per(100 * offload['gso_datagrams'], offload['held_datagrams'])} % of "
        f"{offload['held_datagrams']} held; "
        f"GRO {offload['gro']}: {offload['gro_reads']} of {offload['reads']} reads coalesced, "
        f"{per(offload['gro_datagrams'], offload['gro_reads'])} datagrams each, "
        f"{per(received, offload['reads'])} per read overall"
    )


def start(tb: Testbed, ns: Namespace, argv: Sequence[str]) -> subprocess.Popen[bytes]:
    try:
        # PYTHONPATH=REPO: twistd finds twisted/plugins/meshguard_plugin.py and this tree's code
        # (twistd does not look in the working directory).
        return tb.spawn(ns, argv, env=meshguard_env(), cwd=REPO)
    except OSError as e:
        raise UnavailableError(f"cannot start {argv[0]}: {e}") from None


RUNNERS: dict[str, Callable[[Testbed, TwoHosts, argparse.Namespace], Result]] = {
    "plain": run_plain,
    "wireguard-go": run_wireguard_go,
    "meshguard": run_meshguard,
}


def report(results: list[Result], skipped: dict[str, str], args: argparse.Namespace) -> None:
    print()
    print(
        f"iperf3 single-stream TCP A -> B, {args.seconds:g} s x {args.reps} reps, "
        f"tunnel MTU {args.mtu}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    header = ("median Mbit/s", 15), ("min", 10), ("max", 10), ("CPU s/rep", 11), ("CPU s/GB", 10)
    print(f"{'config':<14}" + "".join(f"{title:>{width}}" for title, width in header))
    for r in results:
        cpu = statistics.median(r.cpu_seconds)
        per_gb = r.cpu_per_gb
        print(
            f"{r.name:<14}{r.median:>15.1f}{min(r.mbits):>10.1f}{max(r.mbits):>10.1f}"
            f"{cpu:>11.2f}{'-' if per_gb is None else f'{per_gb:.2f}':>10}"
        )
    for name, why in skipped.items():
        print(f"{name:<14}  skipped: {why.splitlines()[0]}")
    by_name = {r.name: r for r in results}
    mg, wg = by_name.get("meshguard"), by_name.get("wireguard-go")
    if mg is not None and wg is not None:
        print(f"meshguard / wireguard-go throughput: {mg.median / wg.median:.2f}")
        if mg.cpu_per_gb is not None and wg.cpu_per_gb is not None:
            print(f"meshguard / wireguard-go CPU per GB: {mg.cpu_per_gb / wg.cpu_per_gb:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration per rep")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per configuration")
    parser.add_argument(
        "--only", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}"
    )
    parser.add_argument(
        "--meshguard-cmd",
        default=DEFAULT_MESHGUARD_CMD,
        help="command run in each namespace; {config} is the wg-quick style config file "
        "(named IFNAME.conf), {ifname} the interface name (default: %(default)s)",
    )
    parser.add_argument("--meshguard-timeout", type=float, default=15.0)
    parser.add_argument("--mtu", type=int, default=1420, help="tunnel MTU on both tunnels")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(chosen) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    try:
        require_root_netns(None, binaries=("ip", "wg", "wireguard-go", "iperf3", "ping", "ss"))
    except Exception as e:
        print(f"cannot build the testbed: {e}", file=sys.stderr)
        return 2

    results: list[Result] = []
    skipped: dict[str, str] = {}
    for name in chosen:
        print(f"== {name}")
        with Testbed() as tb:
            hosts = two_hosts(tb)
            try:
                results.append(RUNNERS[name](tb, hosts, args))
            except UnavailableError as e:
                skipped[name] = str(e)
                print(f"  skipped: {e}")
            print(f"  logs: {tb.log_dir}")
    report(results, skipped, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
