"""An established tunnel under a UDP flood: meshguard beside wireguard-go, in one run.

Three network namespaces: A (the peer), B (the node under test) and F (the flooder), with B
joined to A and to F by two veths. A and B run the same tunnel implementation. A sends B
``--mib`` MiB over one TCP connection through the tunnel: idle, then while F floods B's UDP port
with

- ``junk``: every message type with random bytes (bad mac1), transport data for unknown
  receivers, odd lengths and stray bytes (nothing in it authenticates);
- ``mac1``: handshake initiations with a valid mac1 (anyone who knows B's public key can make
  them) and random contents, which B must answer with cookie replies at most.

Each flood is bounded in datagrams (``--count``) and seconds (``--flood-seconds``) and stops as
soon as its measurements are done. During each flood, A also drops its session (the peer is
removed and re-added through ``wg set``) and we time how long until a ping gets through again:
the re-handshake a peer whose session expires under a flood must manage. Reported per
implementation: throughput idle and under each flood (MiB/s and the ratio to idle), the
re-handshake time, the flood rate reached, the replies the flooder saw by message type, and B's
RSS before and at most during the flood.

The flooder is a small C program compiled at run time with gcc into a temporary directory
(``sendmmsg`` of pre-built datagrams from a connected socket, replies counted by type); the
datagrams themselves are built here in Python. Traffic stays inside the run's namespaces. Needs
root.

    python3 benchmarks/flood.py [--mib 10] [--reps 3] [--only meshguard,wireguard-go]
        [--wireguard-go /work/shared/bin/wireguard-go]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshguard.core.crypto import LABEL_MAC1, blake2s, mac  # noqa: E402
from tests.netns import (  # noqa: E402
    Keypair,
    Namespace,
    Testbed,
    WaitTimeoutError,
    meshguard_env,
    require_root_netns,
    wg_keypair,
)

DEFAULT_MESHGUARD_CMD = "twistd -n --pidfile= meshguard --config {config}"
TUNNEL_A, TUNNEL_B = "10.99.0.1", "10.99.0.2"
A_ADDR, B_ADDR = "10.0.0.1", "10.0.0.2"
F_ADDR, B_FLOOD_ADDR = "10.0.1.1", "10.0.1.2"
PORT = 51820
TCP_PORT = 7009
FLOODS = ("junk", "mac1")

FLOODER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXPKT 65536

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long replies[6];
static unsigned char rbuf[BATCH][2048];

static void drain(int fd) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = rbuf[i];
            iov[i].iov_len = sizeof rbuf[i];
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        for (int i = 0; i < n; i++) {
            unsigned t = msgs[i].msg_len >= 1 ? rbuf[i][0] : 0;
            replies[(t >= 1 && t <= 4) ? t : 5]++;
        }
    }
}

/* flood HOST PORT FILE COUNT SECONDS RATE: send FILE's datagrams (u16 LE length + bytes each)
   round robin to HOST:PORT until COUNT are sent or SECONDS pass (RATE > 0: at most RATE/s);
   prints one JSON line with what was sent and the replies seen by type. SIGTERM stops it
   early, with the same report. */
static volatile int stop;
#include <signal.h>
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: flood HOST PORT FILE COUNT SECONDS RATE\n");
        return 2;
    }
    FILE *f = fopen(argv[3], "rb");
    if (!f) { perror(argv[3]); return 2; }
    size_t cap = 1024, npkt = 0;
    unsigned char **pkt = malloc(cap * sizeof *pkt);
    size_t *len = malloc(cap * sizeof *len);
    unsigned char hdr[2];
    while (fread(hdr, 1, 2, f) == 2) {
        size_t l = hdr[0] | (hdr[1] << 8);
        if (npkt == cap) {
            cap *= 2;
            pkt = realloc(pkt, cap * sizeof *pkt);
            len = realloc(len, cap * sizeof *len);
        }
        pkt[npkt] = malloc(l ? l : 1);
        if (l && fread(pkt[npkt], 1, l, f) != l) { fprintf(stderr, "short file\n"); return 2; }
        len[npkt++] = l;
    }
    fclose(f);
    if (!npkt) { fprintf(stderr, "no datagrams\n"); return 2; }
    unsigned long count = strtoul(argv[4], NULL, 10);
    double seconds = atof(argv[5]), rate = atof(argv[6]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("connect"); return 2; }
    int buf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    unsigned long sent = 0, errors = 0;
    size_t next = 0;
    double start = now(), end = start + seconds, t = start;
    while (!stop && sent < count && t < end) {
        int n = BATCH;
        if (count - sent < (unsigned long)n) n = (int)(count - sent);
        for (int i = 0; i < n; i++) {
            size_t k = (next + i) % npkt;
            iov[i].iov_base = pkt[k];
            iov[i].iov_len = len[k];
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r > 0) { sent += r; next = (next + r) % npkt; }
        else errors++;
        drain(fd);
        t = now();
        if (rate > 0) {
            double due = start + sent / rate;
            while (t < due && !stop) { usleep(50); t = now(); }
        }
    }
    double elapsed = now() - start;
    double until = now() + 0.3;
    while (now() < until) { drain(fd); usleep(1000); }
    printf("{\"sent\": %lu, \"seconds\": %.3f, \"send_errors\": %lu, \"replies\": "
           "{\"initiation\": %lu, \"response\": %lu, \"cookie\": %lu, \"transport\": %lu, "
           "\"other\": %lu}}\n", sent, elapsed, errors, replies[1], replies[2], replies[3],
           replies[4], replies[5]);
    return 0;
}
"""

# A TCP sink in B: accepts one connection, reads NBYTES, answers one byte, prints the seconds
# from accept to the last byte.
_SINK = r"""
import socket, sys, time
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(1); srv.settimeout(timeout)
conn, _ = srv.accept()
start = time.monotonic(); got = 0
try:
    while got < nbytes:
        conn.settimeout(max(0.01, start + timeout - time.monotonic()))
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
except OSError:
    pass
elapsed = time.monotonic() - start
if got >= nbytes:
    conn.sendall(b"k")
print(f"{got} {elapsed:.4f}", flush=True)
"""

# The sender in A: connects, sends NBYTES, waits for the sink's byte, prints the seconds.
_SOURCE = r"""
import socket, sys, time
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
block = bytes(range(256)) * 4096
deadline = time.monotonic() + timeout
for _ in range(100):
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.settimeout(timeout)
start = time.monotonic(); sent = 0
try:
    while sent < nbytes:
        sent += s.send(block[: min(len(block), nbytes - sent)])
    s.recv(1)
    ok = True
except OSError:
    ok = False
print(f"{sent} {time.monotonic() - start:.4f} {int(ok)}", flush=True)
"""


@dataclass
class FloodRun:
    """One flood against one implementation."""

    kind: str
    mibs: list[float] = field(default_factory=list)
    rehandshake: float | None = None
    flooder: dict[str, object] = field(default_factory=dict)
    rss_before: int = 0
    rss_max: int = 0


@dataclass
class ImplResult:
    name: str
    idle: list[float] = field(default_factory=list)
    floods: dict[str, FloodRun] = field(default_factory=dict)
    rss_idle: int = 0
    note: str = ""


class UnavailableError(Exception):
    """An implementation could not be brought up; the message says why."""


# -- the flood's datagrams --------------------------------------------------------------------


def junk_datagrams(rng: random.Random, n: int = 4096) -> list[bytes]:
    """Nothing here authenticates: well-formed headers with random bodies (bad mac1), data for
    receivers nobody allocated, odd lengths, stray bytes."""

    def rand(k: int) -> bytes:
        return rng.randbytes(k)

    out: list[bytes] = []
    for i in range(n):
        pick = i % 10
        if pick in (0, 1):
            out.append(b"\x01\0\0\0" + rand(144))  # initiation, bad mac1
        elif pick == 2:
            out.append(b"\x02\0\0\0" + rand(88))  # response, bad mac1
        elif pick == 3:
            out.append(b"\x03\0\0\0" + rand(60))  # cookie reply for nobody
        elif pick in (4, 5, 6):
            size = 32 + 16 * rng.randrange(0, 88)
            out.append(b"\x04\0\0\0" + rand(size - 4))  # transport, unknown receiver
        elif pick == 7:
            kind = rng.randrange(1, 5)
            out.append(bytes([kind, 0, 0, 0]) + rand(rng.randrange(0, 200)))  # odd length
        elif pick == 8:
            kind = rng.randrange(1, 5)
            size = {1: 148, 2: 92, 3: 64, 4: 64}[kind]
            out.append(bytes([kind]) + rand(size - 1))  # reserved bytes not zero
        else:
            out.append(rand(rng.randrange(1, 1400)))  # anything
    return out


def mac1_initiations(rng: random.Random, public_key: bytes, n: int = 1024) -> list[bytes]:
    """Initiations whose mac1 is right for ``public_key`` and whose contents are random: each
    gets past mac1 and, under load, costs the responder a cookie reply."""
    key = blake2s(LABEL_MAC1, public_key)
    out = []
    for _ in range(n):
        body = b"\x01\0\0\0" + rng.randbytes(112)
        out.append(body + mac(key, body) + bytes(16))
    return out


def write_datagrams(path: Path, datagrams: Sequence[bytes]) -> None:
    with path.open("wb") as f:
        for d in datagrams:
            f.write(len(d).to_bytes(2, "little") + d)


def build_flooder(workdir: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("flood.py needs gcc (or cc) to build its flooder")
    source = workdir / "flood.c"
    source.write_text(FLOODER_C)
    binary = workdir / "flood"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


# -- the testbed ------------------------------------------------------------------------------


@dataclass
class Hosts:
    a: Namespace
    b: Namespace
    f: Namespace


def three_hosts(tb: Testbed) -> Hosts:
    a, b, f = tb.netns("a"), tb.netns("b"), tb.netns("f")
    tb.veth(a, "eth0", b, "eth0")
    tb.veth(f, "eth0", b, "eth1")
    tb.addr(a, "eth0", f"{A_ADDR}/24")
    tb.addr(b, "eth0", f"{B_ADDR}/24")
    tb.addr(f, "eth0", f"{F_ADDR}/24")
    tb.addr(b, "eth1", f"{B_FLOOD_ADDR}/24")
    return Hosts(a, b, f)


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its children (wireguard-go runs as one process; twistd too)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry) != pid and int(fields[3]) != pid:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class RssSampler:
    """Samples a process tree's RSS every 50 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self._stop.wait(0.05)


@dataclass
class Tunnel:
    name: str
    a_if: str
    b_if: str
    a_key: Keypair
    b_key: Keypair
    b_proc: subprocess.Popen[bytes]


def write_config(path: Path, private: str, own: str, peer_public: str, peer: str, end: str) -> None:
    path.write_text(
        "[Interface]\n"
        f"PrivateKey = {private}\n"
        f"ListenPort = {PORT}\n"
        f"Address = {own}/24\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {peer_public}\n"
        f"AllowedIPs = {peer}/32\n"
        f"Endpoint = {end}:{PORT}\n"
    )
    path.chmod(0o600)


#: meshguard with parts of its flood defence switched off, to measure what each step is worth
#: (module switches set before twistd runs).
VARIANTS = {
    "meshguard": "",
    "meshguard-nobacklog": "import meshguard.app.node as n; n.deque = lambda: None; ",
    "meshguard-noshed": "import meshguard.adapters.flood_guard as g; g.ON_RATE = float('inf'); ",
    "meshguard-nofilter": "import meshguard.adapters.flood_guard as g; g.ON_RATE = float('inf'); "
    "import meshguard.adapters.udp as u; u.USE_SOCKET_FILTER = False; ",
}


def start_meshguard(
    tb: Testbed, hosts: Hosts, args: argparse.Namespace, variant: str = "meshguard"
) -> Tunnel:
    a_key, b_key = wg_keypair(), wg_keypair()
    a_if, b_if = tb.ifname("mga"), tb.ifname("mgb")
    a_conf, b_conf = tb.log_dir / f"{a_if}.conf", tb.log_dir / f"{b_if}.conf"
    write_config(a_conf, a_key.private, TUNNEL_A, b_key.public, TUNNEL_B, B_ADDR)
    write_config(b_conf, b_key.private, TUNNEL_B, a_key.public, TUNNEL_A, A_ADDR)
    procs = []
    for ns, conf, ifname in ((hosts.a, a_conf, a_if), (hosts.b, b_conf, b_if)):
        argv = shlex.split(args.meshguard_cmd.format(config=conf, ifname=ifname))
        if VARIANTS[variant] and argv[0] == "twistd":
            code = VARIANTS[variant] + "from twisted.scripts.twistd import run; run()"
            argv = [sys.executable, "-c", code, *argv[1:]]
        procs.append(tb.spawn(ns, argv, env=meshguard_env(), cwd=REPO))
    return Tunnel(variant, a_if, b_if, a_key, b_key, procs[1])


def start_wireguard_go(tb: Testbed, hosts: Hosts, name: str, binary: str) -> Tunnel:
    a_key, b_key = wg_keypair(), wg_keypair()
    a_if, b_if = tb.ifname("wga"), tb.ifname("wgb")
    procs = []
    for ns, ifname in ((hosts.a, a_if), (hosts.b, b_if)):
        proc = tb.spawn(ns, [binary, ifname], env={"WG_PROCESS_FOREGROUND": "1"})
        sock = tb.uapi_socket(ifname)
        tb.wait_for(
            lambda p=proc, s=sock: p.poll() is not None or s.exists(),  # type: ignore[misc]
            10,
            what=str(sock),
        )
        if proc.poll() is not None:
            raise UnavailableError(f"{binary} exited: {tb.log_tail(proc, 500)}")
        procs.append(proc)
    sides = (
        (hosts.a, a_if, a_key, b_key, B_ADDR, TUNNEL_A, TUNNEL_B),
        (hosts.b, b_if, b_key, a_key, A_ADDR, TUNNEL_B, TUNNEL_A),
    )
    for ns, ifname, own, peer, end, own4, peer4 in sides:
        tb.wg_set_interface(ns, ifname, own.private, PORT)
        tb.wg_set_peer(
            ns, ifname, peer.public, allowed_ips=(f"{peer4}/32",), endpoint=f"{end}:{PORT}"
        )
        tb.addr(ns, ifname, f"{own4}/24")
        tb.up(ns, ifname)
    return Tunnel(name, a_if, b_if, a_key, b_key, procs[1])


def tunnel_up(tb: Testbed, hosts: Hosts, timeout: float) -> None:
    tb.wait_for(
        lambda: tb.ping(hosts.a, TUNNEL_B, timeout=1) and tb.ping(hosts.b, TUNNEL_A, timeout=1),
        timeout=timeout,
        what="tunnel up",
    )


def transfer(tb: Testbed, hosts: Hosts, nbytes: int, timeout: float) -> float:
    """MiB/s of one ``nbytes`` TCP transfer A -> B through the tunnel (partial transfers count
    what arrived within ``timeout``)."""
    sink = tb.spawn(
        hosts.b, [sys.executable, "-c", _SINK, TUNNEL_B, str(TCP_PORT), str(nbytes), str(timeout)]
    )
    try:
        tb.wait_for(
            lambda: sink.poll() is not None or tb.listening(hosts.b, TCP_PORT), 10, what="sink"
        )
        tb.run(
            hosts.a,
            [sys.executable, "-c", _SOURCE, TUNNEL_B, str(TCP_PORT), str(nbytes), str(timeout)],
            timeout=timeout + 15,
            check=False,
        )
        try:
            sink.wait(15)
        except subprocess.TimeoutExpired:
            return 0.0
        fields = (tb.log_tail(sink, 200).strip().splitlines() or [""])[-1].split()
        if len(fields) != 2:
            return 0.0
        got, seconds = fields
        return int(got) / (1 << 20) / max(float(seconds), 1e-6)
    finally:
        tb.stop(sink)


def rehandshake(tb: Testbed, hosts: Hosts, tunnel: Tunnel, timeout: float) -> float | None:
    """Drop A's session with B (remove and re-add the peer) and time until a ping gets through:
    a fresh handshake, which B must let in while flooded."""
    tb.wg(hosts.a, "set", tunnel.a_if, "peer", tunnel.b_key.public, "remove")
    tb.wg_set_peer(
        hosts.a,
        tunnel.a_if,
        tunnel.b_key.public,
        allowed_ips=(f"{TUNNEL_B}/32",),
        endpoint=f"{B_ADDR}:{PORT}",
    )
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if tb.ping(hosts.a, TUNNEL_B, timeout=1):
            return time.monotonic() - start
    return None


def run_flood(
    tb: Testbed,
    hosts: Hosts,
    tunnel: Tunnel,
    kind: str,
    flooder: Path,
    workdir: Path,
    args: argparse.Namespace,
) -> FloodRun:
    rng = random.Random(args.seed)
    if kind == "junk":
        datagrams = junk_datagrams(rng)
    else:
        datagrams = mac1_initiations(rng, base64.b64decode(tunnel.b_key.public))
    path = workdir / f"{kind}.bin"
    write_datagrams(path, datagrams)
    run = FloodRun(kind)
    run.rss_before = rss_kib(tunnel.b_proc.pid)
    argv = [str(flooder), B_FLOOD_ADDR, str(PORT), str(path), str(args.count)]
    argv += [f"{args.flood_seconds:g}", f"{args.rate:g}"]
    if args.flood_cpu is not None:
        argv = ["taskset", "-c", str(args.flood_cpu), *argv]
    with RssSampler(tunnel.b_proc.pid) as sampler:
        proc = tb.spawn(hosts.f, argv)
        try:
            time.sleep(0.5)  # the flood reaches full rate before the transfer starts
            for _ in range(args.reps):
                if proc.poll() is not None:
                    break
                run.mibs.append(transfer(tb, hosts, args.mib << 20, args.transfer_timeout))
            if proc.poll() is None:
                run.rehandshake = rehandshake(tb, hosts, tunnel, args.rehandshake_timeout)
        finally:
            ended_early = proc.poll() is not None
            tb.stop(proc)
        run.rss_max = sampler.peak
    try:
        run.flooder = json.loads(tb.log_tail(proc, 2000).strip().splitlines()[-1])
    except (ValueError, IndexError):
        run.flooder = {"error": tb.log_tail(proc, 300)}
    run.flooder["ended_before_measurements"] = ended_early
    if run.rehandshake is None:
        # Recover the tunnel for the next flood (the peer was re-added; wait for it).
        try:
            tunnel_up(tb, hosts, 30)
        except WaitTimeoutError:
            pass
    return run


def bench(name: str, args: argparse.Namespace, flooder: Path, workdir: Path) -> ImplResult:
    result = ImplResult(name)
    with Testbed(logdir=Path(tempfile.mkdtemp(prefix=f"flood-{name.replace('/', '_')}-"))) as tb:
        print(f"{name}: logs in {tb.log_dir}", flush=True)
        hosts = three_hosts(tb)
        if name in VARIANTS:
            tunnel = start_meshguard(tb, hosts, args, name)
        else:
            binary = (
                args.wireguard_go if name == "wireguard-go(shared)" else "/usr/bin/wireguard-go"
            )
            tunnel = start_wireguard_go(tb, hosts, name, binary)
        try:
            tunnel_up(tb, hosts, 20)
        except WaitTimeoutError:
            raise UnavailableError(
                f"{name} tunnel did not come up; B's log: {tb.log_tail(tunnel.b_proc, 800)}"
            ) from None
        result.rss_idle = rss_kib(tunnel.b_proc.pid)
        for _ in range(args.reps):
            result.idle.append(transfer(tb, hosts, args.mib << 20, args.transfer_timeout))
        print(f"  idle: {fmt(result.idle)} MiB/s", flush=True)
        for kind in args.floods:
            run = run_flood(tb, hosts, tunnel, kind, flooder, workdir, args)
            result.floods[kind] = run
            print(
                f"  {kind}: {fmt(run.mibs)} MiB/s, re-handshake {fmt_s(run.rehandshake)}, "
                f"flooder {run.flooder}, RSS {run.rss_before} -> max {run.rss_max} KiB",
                flush=True,
            )
        if name in VARIANTS:
            result.note = meshguard_counters(tunnel.b_if)
    return result


def meshguard_counters(ifname: str) -> str:
    """B's drop counters and UDP read count from ``meshguard status`` (what the flood cost)."""
    try:
        from meshguard.app.status_client import read_status

        doc = read_status(ifname)
    except Exception as e:  # the status document is a nice-to-have here
        return f"no status ({e.__class__.__name__})"
    node = doc.get("node", {})
    drops = node.get("drops") or doc.get("drops") or {}
    shed = node.get("flood_guard") or {}
    nonzero = {k: v for k, v in drops.items() if v} if isinstance(drops, dict) else drops
    return f"drops {nonzero} flood {shed}"


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def fmt_s(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} s"


def report(results: list[ImplResult], skipped: dict[str, str], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.mib} MiB TCP A -> B through the tunnel, {args.reps} reps (median, range); flood "
        f"from a third namespace, <= {args.count} datagrams and <= {args.flood_seconds:g} s, "
        f"rate {'max' if not args.rate else args.rate}; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    for r in results:
        base = statistics.median(r.idle) if r.idle else 0.0
        print(f"{r.name}: idle {fmt(r.idle)} MiB/s, RSS {r.rss_idle} KiB")
        for kind, run in r.floods.items():
            med = statistics.median(run.mibs) if run.mibs else 0.0
            ratio = med / base if base else 0.0
            fl = run.flooder
            sent, secs = fl.get("sent"), fl.get("seconds")
            rate = (
                f"{float(sent) / float(secs) / 1000:.0f}k/s"  # type: ignore[arg-type]
                if sent and secs
                else "?"
            )
            print(
                f"  {kind:5}: {fmt(run.mibs)} MiB/s = {ratio:.2f} of idle; re-handshake "
                f"{fmt_s(run.rehandshake)}; flood {sent} in {secs} s ({rate}); replies "
                f"{fl.get('replies')}; RSS {run.rss_before} -> max {run.rss_max} KiB"
            )
        if r.note:
            print(f"  {r.note}")
    for name, why in skipped.items():
        print(f"{name}: skipped: {why.splitlines()[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=10, help="MiB per transfer")
    parser.add_argument("--reps", type=int, default=3, help="transfers per condition")
    parser.add_argument("--count", type=int, default=20_000_000, help="datagrams per flood at most")
    parser.add_argument(
        "--flood-seconds", type=float, default=60.0, help="seconds per flood at most"
    )
    parser.add_argument("--rate", type=float, default=0, help="datagrams/s (0: as fast as it goes)")
    parser.add_argument("--flood-cpu", type=int, default=None, help="pin the flooder to this CPU")
    parser.add_argument("--floods", default=",".join(FLOODS), help="comma-separated floods")
    parser.add_argument("--transfer-timeout", type=float, default=20.0)
    parser.add_argument("--rehandshake-timeout", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--only",
        default="meshguard,wireguard-go",
        help="comma-separated: meshguard, wireguard-go (Debian's), and with --wireguard-go also "
        "wireguard-go(shared); meshguard-nobacklog (no handshake backlog), meshguard-noshed "
        "(socket filter, no flood guard) and meshguard-nofilter (neither) measure the steps",
    )
    parser.add_argument(
        "--wireguard-go", default=None, help="another wireguard-go binary to run beside Debian's"
    )
    parser.add_argument("--meshguard-cmd", default=DEFAULT_MESHGUARD_CMD)
    args = parser.parse_args(argv)
    args.floods = [f for f in args.floods.split(",") if f]
    require_root_netns(None)
    names = [n for n in args.only.split(",") if n]
    if args.wireguard_go and "wireguard-go(shared)" not in names:
        names.append("wireguard-go(shared)")
    results: list[ImplResult] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="meshguard-flood-") as tmp:
        workdir = Path(tmp)
        flooder = build_flooder(workdir)
        for name in names:
            try:
                results.append(bench(name, args, flooder, workdir))
            except UnavailableError as e:
                skipped[name] = str(e)
    report(results, skipped, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
