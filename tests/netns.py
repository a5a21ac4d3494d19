"""Real-network test harness: namespaces, veth, nftables and stock WireGuard tools.

Tests that need a real kernel network build it here, synchronously, from trial test cases. A
`Testbed` hands out names that are unique per run (interface names stay within 15 characters and
the UAPI sockets in the shared ``/var/run/wireguard`` never collide), tracks everything it creates
and removes exactly that on cleanup. Every wait is a bounded poll; no fixed sleeps.

This module is a library, not a test module: it holds no ``TestCase`` classes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

__all__ = [
    "CONNTRACK",
    "DEFAULT_BINARIES",
    "NAT_KINDS",
    "REPO_ROOT",
    "WIREGUARD_RUN_DIR",
    "Blackhole",
    "CommandError",
    "Keypair",
    "MeshHome",
    "MeshInternet",
    "MeshguardGoPair",
    "MeshguardPeer",
    "Namespace",
    "NatHome",
    "Testbed",
    "TwoHosts",
    "WaitTimeoutError",
    "WireGuardPair",
    "blackhole_drops",
    "block_udp",
    "conntrack_entries",
    "hairpin_ruleset",
    "ip",
    "meshguard_config_text",
    "meshguard_env",
    "meshguard_go_pair",
    "nat_home",
    "nat_homes",
    "pmtu_blackhole",
    "require_root",
    "require_root_netns",
    "start_meshguard",
    "start_meshguard_userspace",
    "twistd_argv",
    "two_hosts",
    "unblock_udp",
    "unique_name",
    "wait_for",
    "wg_dump",
    "wg_keypair",
    "wireguard_go_pair",
    "write_meshguard_config",
]

T = TypeVar("T")

WIREGUARD_RUN_DIR = Path("/var/run/wireguard")
#: Where meshguard nodes put their status sockets (``meshguard status``).
MESHGUARD_RUN_DIR = Path("/var/run/meshguard")
DEFAULT_BINARIES: tuple[str, ...] = ("ip", "nft", "wg", "wireguard-go", "ping", "sysctl", "ss")
MAX_IFNAME = 15

# One random tag per process plus a per-testbed counter: parallel trial workers and repeated runs
# get distinct prefixes, and a leftover from a crashed run is detected and stepped over.
_PROCESS_TAG = secrets.token_hex(2)
_counter = 0

_BLOCK_UDP_TABLE = "mg_block_udp"


class CommandError(RuntimeError):
    """A command run by the harness exited non-zero (or timed out); carries its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{' '.join(self.argv)} {status}: {stderr.strip() or stdout.strip()}")


class WaitTimeoutError(AssertionError):
    """A bounded wait ran out; the message says what was being waited for."""


def _fail_or_skip(testcase: unittest.TestCase | None, reason: str) -> None:
    if os.environ.get("CI") == "true":
        exc = AssertionError if testcase is None else testcase.failureException
        raise exc(f"real-network test cannot run with CI=true: {reason}")
    raise unittest.SkipTest(reason)


def require_root_netns(
    testcase: unittest.TestCase | None, binaries: Iterable[str] = DEFAULT_BINARIES
) -> None:
    """Skip the test when this machine cannot build real networks; on CI, fail instead.

    With ``CI=true`` in the environment a missing prerequisite is an error, so CI never passes
    by silently skipping the real-network tests.
    """
    if os.geteuid() != 0:
        _fail_or_skip(testcase, "needs root")
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        _fail_or_skip(testcase, f"missing binaries: {', '.join(missing)}")
    if not os.path.exists("/dev/net/tun"):
        _fail_or_skip(testcase, "no /dev/net/tun")
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        _fail_or_skip(testcase, f"`ip netns` unavailable: {e}")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds.

    Returns that value; raises `WaitTimeoutError` naming ``what`` when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Namespace:
    """A network namespace created by a `Testbed`."""

    name: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Keypair:
    private: str
    public: str


def wg_keypair() -> Keypair:
    """A fresh Curve25519 key pair from the stock ``wg genkey``/``wg pubkey``."""
    private = subprocess.run(
        ["wg", "genkey"], check=True, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, check=True, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return Keypair(private, public)


@dataclass
class _Spawned:
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


@dataclass
class Testbed:
    """Creates and tracks namespaces, links, processes and UAPI sockets for one test.

    Construct with the running test case (``Testbed(self)``): its cleanup is registered with
    ``addCleanup`` and process logs go under the test's temporary directory. Without a test
    case, use it as a context manager.
    """

    testcase: unittest.TestCase | None = None
    logdir: Path | None = None
    prefix: str = field(init=False)
    _namespaces: list[Namespace] = field(init=False, default_factory=list)
    _processes: list[_Spawned] = field(init=False, default_factory=list)
    _ifnames: list[str] = field(init=False, default_factory=list)
    _cleaned: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.prefix = _fresh_prefix()
        if self.logdir is None:
            mktemp = getattr(self.testcase, "mktemp", None)
            if callable(mktemp):
                self.logdir = Path(str(mktemp())).absolute()
            else:
                self.logdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.logdir.mkdir(parents=True, exist_ok=True)
        if self.testcase is not None:
            self.testcase.addCleanup(self.cleanup)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def log_dir(self) -> Path:
        assert self.logdir is not None
        return self.logdir

    # -- names -----------------------------------------------------------------------------

    def ifname(self, hint: str) -> str:
        """An interface name unique across all namespaces and runs (for TUN/WireGuard devices).

        Its UAPI socket ``/var/run/wireguard/NAME.sock`` is removed on cleanup.
        """
        name = self.prefix + hint
        if len(name) > MAX_IFNAME:
            raise ValueError(f"interface name {name!r} longer than {MAX_IFNAME} characters")
        if name in self._ifnames:
            raise ValueError(f"interface name {name!r} already handed out")
        self._ifnames.append(name)
        return name

    def uapi_socket(self, ifname: str) -> Path:
        return WIREGUARD_RUN_DIR / f"{ifname}.sock"

    # -- namespaces and links ----------------------------------------------------------------

    def netns(self, name: str) -> Namespace:
        """Create namespace ``PREFIX-name`` with its loopback up."""
        ns = Namespace(f"{self.prefix}-{name}")
        self._host(["ip", "netns", "add", ns.name])
        self._namespaces.append(ns)
        self.ip(ns, "link", "set", "dev", "lo", "up")
        return ns

    def veth(
        self,
        ns_a: Namespace,
        name_a: str,
        ns_b: Namespace,
        name_b: str,
        mtu: int | None = None,
    ) -> None:
        """A veth pair created directly in its two namespaces, both ends up."""
        for n in (name_a, name_b):
            if len(n) > MAX_IFNAME:
                raise ValueError(f"interface name {n!r} longer than {MAX_IFNAME} characters")
        argv = ["ip", "link", "add", name_a, "netns", ns_a.name]
        argv += ["type", "veth", "peer", "name", name_b, "netns", ns_b.name]
        self._host(argv)
        for ns, dev in ((ns_a, name_a), (ns_b, name_b)):
            if mtu is not None:
                self.ip(ns, "link", "set", "dev", dev, "mtu", str(mtu))
            self.up(ns, dev)

    def ip(self, ns: Namespace, *args: str) -> str:
        return self.run(ns, ["ip", *args]).stdout

    def addr(self, ns: Namespace, dev: str, cidr: str) -> None:
        """Add an address; IPv6 addresses skip duplicate address detection so they work at once."""
        extra = ["nodad"] if ":" in cidr else []
        self.ip(ns, "addr", "add", cidr, "dev", dev, *extra)

    def up(self, ns: Namespace, dev: str) -> None:
        self.ip(ns, "link", "set", "dev", dev, "up")

    def route(
        self, ns: Namespace, dest: str, *, via: str | None = None, dev: str | None = None
    ) -> None:
        """``ip route add DEST [via GW] [dev DEV]``; the family follows ``dest``/``via``."""
        argv = ["route", "add", dest]
        if via is not None:
            argv += ["via", via]
        if dev is not None:
            argv += ["dev", dev]
        family = ["-6"] if ":" in dest or (via is not None and ":" in via) else []
        self.ip(ns, *family, *argv)

    def nft(self, ns: Namespace, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) in the namespace."""
        self.run(ns, ["nft", "-f", "-"], input=ruleset)

    def sysctl(self, ns: Namespace, key: str, value: str | int) -> None:
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def read_sysctl(self, ns: Namespace, key: str) -> str:
        return self.run(ns, ["sysctl", "-n", key]).stdout.strip()

    # -- processes -----------------------------------------------------------------------------

    def run(
        self,
        ns: Namespace | None,
        argv: Sequence[str],
        timeout: float = 10.0,
        *,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in ``ns`` (None: the root namespace), bounded by timeout.

        Raises `CommandError` with its stderr on a non-zero exit or timeout unless ``check``
        is false (a timeout then gives returncode -9).
        """
        full = list(argv) if ns is None else ns.exec_argv(argv)
        try:
            cp = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=None if env is None else {**os.environ, **env},
            )
        except subprocess.TimeoutExpired as e:
            if check:
                raise CommandError(full, None, _text(e.stdout), _text(e.stderr)) from None
            return subprocess.CompletedProcess(full, -9, _text(e.stdout), _text(e.stderr))
        if check and cp.returncode != 0:
            raise CommandError(full, cp.returncode, cp.stdout, cp.stderr)
        return cp

    def _host(self, argv: Sequence[str], timeout: float = 10.0) -> None:
        self.run(None, argv, timeout)

    def spawn(
        self,
        ns: Namespace,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in ``ns``; it is killed on cleanup.

        Its stdout and stderr go to a log file under the test's temp dir (see `log_of`). The
        process is the leader of its own session, so cleanup also reaches its children.
        """
        seq = len(self._processes)
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(argv[0]))
        log_path = self.log_dir / f"{seq:02d}-{ns.name}-{base}.log"
        log_file = log_path.open("wb")
        log_file.write(("$ " + " ".join(argv) + "\n").encode())
        log_file.flush()
        proc = subprocess.Popen(
            ns.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        self._processes.append(_Spawned(proc, log_path, log_file))
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path:
        for s in self._processes:
            if s.proc is proc:
                return s.log_path
        raise KeyError(proc)

    def log_tail(self, proc: subprocess.Popen[bytes], nbytes: int = 4000) -> str:
        data = self.log_of(proc).read_bytes()
        return data[-nbytes:].decode(errors="replace")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
        """SIGTERM the process (and its session), SIGKILL after ``timeout``; returns its status."""
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout)
        for s in self._processes:
            if s.proc is proc and not s.log_file.closed:
                s.log_file.close()
        return proc.returncode

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        interval: float = 0.05,
        what: str = "condition",
    ) -> T:
        return wait_for(predicate, timeout, interval, what)

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove every process, namespace and UAPI socket this testbed created, only those.

        Idempotent. Attempts everything, then raises the first error it met, so a leak shows.
        """
        if self._cleaned:
            return
        self._cleaned = True
        errors: list[BaseException] = []
        for s in reversed(self._processes):
            try:
                self.stop(s.proc)
            except BaseException as e:
                errors.append(e)
            finally:
                if not s.log_file.closed:
                    s.log_file.close()
        for ns in reversed(self._namespaces):
            try:
                self._host(["ip", "netns", "del", ns.name])
            except BaseException as e:
                errors.append(e)
        for name in self._ifnames:
            try:
                self.uapi_socket(name).unlink(missing_ok=True)
                (MESHGUARD_RUN_DIR / f"{name}.sock").unlink(missing_ok=True)
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # -- traffic -------------------------------------------------------------------------------

    def ping(
        self,
        ns: Namespace,
        addr: str,
        count: int = 1,
        timeout: float = 2.0,
        *,
        size: int | None = None,
        dont_fragment: bool = False,
    ) -> bool:
        """True when at least one of ``count`` echo requests (v4 or v6) is answered in time.

        ``size`` is the ICMP payload size; ``dont_fragment`` forbids fragmentation (``-M do``).
        """
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{timeout:g}"]
        if size is not None:
            argv += ["-s", str(size)]
        if dont_fragment:
            argv += ["-M", "do"]
        argv.append(addr)
        cp = self.run(ns, argv, timeout=timeout + 0.2 * count + 5, check=False)
        return cp.returncode == 0

    def listening(self, ns: Namespace, port: int, proto: str = "tcp") -> bool:
        """Whether something listens on ``port`` (tcp) or is bound to it (udp) in ``ns``."""
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        out = self.run(ns, ["ss", flag, f"sport = :{port}"]).stdout
        return bool(out.strip())

    def tcp_transfer(
        self,
        ns_server: Namespace,
        ns_client: Namespace,
        server_addr: str,
        nbytes: int,
        *,
        port: int = 7007,
        timeout: float = 30.0,
        seed: int = 1,
    ) -> bool:
        """Send ``nbytes`` of seeded pseudo-random data client -> server over one TCP connection.

        True only when the server received exactly those bytes (length and SHA-256 match) within
        ``timeout``; a stall, reset or corruption gives False, with details in the log dir.
        """
        server = self.spawn(
            ns_server,
            [sys.executable, "-c", _TCP_SERVER, server_addr, str(port), str(int(timeout) + 1)],
        )
        deadline = time.monotonic() + timeout
        try:
            try:
                self.wait_for(
                    lambda: server.poll() is not None or self.listening(ns_server, port),
                    timeout=min(timeout, 10.0),
                    what=f"TCP server on port {port} in {ns_server}",
                )
            except WaitTimeoutError:
                return False
            if server.poll() is not None:
                return False
            client = self.run(
                ns_client,
                [sys.executable, "-c", _TCP_CLIENT, server_addr, str(port), str(nbytes), str(seed)],
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
            try:
                server.wait(max(0.5, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
            received = self.log_tail(server, 200).strip().splitlines()
            ok = client.returncode == 0 and bool(received) and received[-1] == client.stdout.strip()
            with (self.log_dir / "tcp_transfer.log").open("a") as f:
                f.write(
                    f"{ns_client}->{ns_server} {server_addr}:{port} {nbytes} B ok={ok}\n"
                    f"  client rc={client.returncode} out={client.stdout.strip()!r} "
                    f"err={client.stderr.strip()[-500:]!r}\n"
                    f"  server: {received[-1:]!r}\n"
                )
            return ok
        finally:
            self.stop(server)

    def iperf3(
        self,
        ns_server: Namespace,
        ns_client: Namespace,
        addr: str,
        seconds: float,
        *,
        port: int = 5201,
        extra: Sequence[str] = (),
    ) -> float:
        """Single-stream iperf3 TCP client -> server; returns received Mbit/s."""
        server = self.spawn(ns_server, ["iperf3", "-s", "-1", "-p", str(port)])
        try:
            self.wait_for(
                lambda: self.listening(ns_server, port),
                timeout=10,
                what=f"iperf3 server in {ns_server}",
            )
            cp = self.run(
                ns_client,
                ["iperf3", "-c", addr, "-p", str(port), "-t", f"{seconds:g}", "-J", *extra],
                timeout=seconds + 30,
            )
            result = json.loads(cp.stdout)
            bps = float(result["end"]["sum_received"]["bits_per_second"])
            return bps / 1e6
        finally:
            self.stop(server)

    def udp_reachable(
        self,
        ns_server: Namespace,
        ns_client: Namespace,
        server_addr: str,
        *,
        port: int = 7008,
        timeout: float = 3.0,
    ) -> bool:
        """Whether one UDP datagram client -> server gets its echo back within ``timeout``."""
        server = self.spawn(
            ns_server, [sys.executable, "-c", _UDP_ECHO, server_addr, str(port), f"{timeout + 5}"]
        )
        try:
            self.wait_for(
                lambda: self.listening(ns_server, port, "udp"),
                timeout=10,
                what=f"UDP echo server in {ns_server}",
            )
            cp = self.run(
                ns_client,
                [sys.executable, "-c", _UDP_PROBE, server_addr, str(port), str(timeout)],
                timeout=timeout + 5,
                check=False,
            )
            return cp.returncode == 0
        finally:
            self.stop(server)

    # -- stock WireGuard ---------------------------------------------------------------------

    def start_wireguard_go(
        self, ns: Namespace, ifname: str, timeout: float = 10.0, binary: str = "wireguard-go"
    ) -> subprocess.Popen[bytes]:
        """Run ``wireguard-go IFNAME`` in the foreground in ``ns``; return once its UAPI is up.

        ``ifname`` should come from `ifname` so that its socket is unique and cleaned up;
        ``binary`` picks another build (a path) than the one on PATH.
        """
        if ifname not in self._ifnames:
            self._ifnames.append(ifname)
        proc = self.spawn(ns, [binary, ifname], env={"WG_PROCESS_FOREGROUND": "1"})
        sock = self.uapi_socket(ifname)
        self.wait_for(
            lambda: proc.poll() is not None or sock.exists(),
            timeout=timeout,
            what=f"UAPI socket {sock}",
        )
        if proc.poll() is not None:
            raise CommandError([binary, ifname], proc.returncode, self.log_tail(proc), "")
        return proc

    def wg(self, ns: Namespace, *args: str, input: str | None = None) -> str:
        return self.run(ns, ["wg", *args], input=input).stdout

    def wg_set_interface(
        self, ns: Namespace, ifname: str, private_key: str, listen_port: int | None = None
    ) -> None:
        args = ["set", ifname, "private-key", "/dev/stdin"]
        if listen_port is not None:
            args += ["listen-port", str(listen_port)]
        self.wg(ns, *args, input=private_key + "\n")

    def wg_set_peer(
        self,
        ns: Namespace,
        ifname: str,
        public_key: str,
        *,
        allowed_ips: Sequence[str] = (),
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: str | None = None,
    ) -> None:
        """``wg set IF peer KEY ...``; ``endpoint`` is ``host:port`` or ``[v6]:port``."""
        args = ["set", ifname, "peer", public_key]
        if allowed_ips:
            args += ["allowed-ips", ",".join(allowed_ips)]
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(persistent_keepalive)]
        if preshared_key is not None:
            args += ["preshared-key", "/dev/stdin"]
        self.wg(ns, *args, input=None if preshared_key is None else preshared_key + "\n")

    def latest_handshake(self, ns: Namespace, ifname: str, public_key: str) -> int:
        """Unix time of the last handshake with a peer (0: none yet)."""
        for line in self.wg(ns, "show", ifname, "latest-handshakes").splitlines():
            key, _, stamp = line.partition("\t")
            if key == public_key:
                return int(stamp)
        return 0


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _fresh_prefix() -> str:
    """``mg`` + process tag (4 hex) + 2-char counter: 8 characters, 7 left for an ifname hint."""
    global _counter
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    for _ in range(len(digits) ** 2):
        n = _counter % len(digits) ** 2
        _counter += 1
        prefix = f"mg{_PROCESS_TAG}{digits[n // len(digits)]}{digits[n % len(digits)]}"
        taken = any(p.name.startswith(prefix) for p in _listdir(Path("/run/netns")))
        taken = taken or any(p.name.startswith(prefix) for p in _listdir(WIREGUARD_RUN_DIR))
        if not taken:
            return prefix
    raise RuntimeError("no free testbed prefix")


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except FileNotFoundError:
        return []


# -- helper programs run inside namespaces (python3 -c) ------------------------------------------

_TCP_SERVER = """
import hashlib, socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(1)
s.settimeout(timeout)
c, _ = s.accept()
c.settimeout(timeout)
h = hashlib.sha256()
n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

_TCP_CLIENT = """
import hashlib, random, socket, sys
addr, port, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
h = hashlib.sha256()
c = socket.create_connection((addr, port), timeout=10)
c.settimeout(None)
left = n
while left:
    b = rng.randbytes(min(left, 1 << 16))
    h.update(b)
    c.sendall(b)
    left -= len(b)
c.shutdown(socket.SHUT_WR)
while c.recv(1 << 16):
    pass
print(n, h.hexdigest(), flush=True)
"""

_UDP_ECHO = """
import socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((addr, port))
s.settimeout(timeout)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

_UDP_PROBE = """
import os, socket, sys, time
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
token = os.urandom(16)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    s.sendto(token, (addr, port))
    s.settimeout(min(0.3, max(0.01, deadline - time.monotonic())))
    try:
        if s.recv(2048) == token:
            sys.exit(0)
    except (socket.timeout, ConnectionRefusedError):
        pass
sys.exit(1)
"""


# -- topologies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoHosts:
    """A and B joined by one veth (``a_dev`` <-> ``b_dev``)."""

    a: Namespace
    b: Namespace
    a_dev: str
    b_dev: str
    a_addr: str
    b_addr: str
    a_addr6: str | None = None
    b_addr6: str | None = None


def two_hosts(testbed: Testbed, v6: bool = False, mtu: int | None = None) -> TwoHosts:
    """A (10.0.0.1) and B (10.0.0.2) on one veth; with ``v6`` also fd00:0:0:1::1 and ::2."""
    a, b = testbed.netns("a"), testbed.netns("b")
    testbed.veth(a, "eth0", b, "eth0", mtu=mtu)
    testbed.addr(a, "eth0", "10.0.0.1/24")
    testbed.addr(b, "eth0", "10.0.0.2/24")
    if v6:
        testbed.addr(a, "eth0", "fd00:0:0:1::1/64")
        testbed.addr(b, "eth0", "fd00:0:0:1::2/64")
        return TwoHosts(
            a, b, "eth0", "eth0", "10.0.0.1", "10.0.0.2", "fd00:0:0:1::1", "fd00:0:0:1::2"
        )
    return TwoHosts(a, b, "eth0", "eth0", "10.0.0.1", "10.0.0.2")


def masquerade_ruleset(hard: bool) -> str:
    """nftables NAT for a router whose uplink is ``wan0``: ``masquerade`` (mapping independent of
    the destination) or, ``hard``, ``masquerade random`` (a new port per destination)."""
    action = "masquerade random" if hard else "masquerade"
    return (
        "table ip nat {\n"
        "  chain post {\n"
        "    type nat hook postrouting priority 100\n"
        f'    oifname "wan0" counter {action}\n'
        "  }\n"
        "}\n"
    )


@dataclass(frozen=True)
class NatHome:
    """``home`` - ``router`` (NAT on ``wan_dev``) - ``internet`` - ``hub``, all IPv4.

    home 192.168.1.2/24 (default via router 192.168.1.1); router wan 203.0.113.2/24 (default via
    internet 203.0.113.1); hub 198.51.100.2/24 (default via internet 198.51.100.1).
    """

    home: Namespace
    router: Namespace
    internet: Namespace
    hub: Namespace
    home_addr: str
    router_lan_addr: str
    router_wan_addr: str
    hub_addr: str
    lan_dev: str = "lan0"
    wan_dev: str = "wan0"


def nat_home(testbed: Testbed, conntrack_timeout: int | None = None, hard: bool = False) -> NatHome:
    """A home host behind a masquerading router, reaching a hub across an "internet" router.

    ``hard`` uses ``masquerade random`` (mapping depends on the destination).
    ``conntrack_timeout`` sets the router's conntrack UDP timeouts (plain and stream), in
    seconds, so tests can make the NAT forget an idle mapping quickly.
    """
    home = testbed.netns("home")
    router = testbed.netns("router")
    internet = testbed.netns("inet")
    hub = testbed.netns("hub")
    testbed.veth(home, "eth0", router, "lan0")
    testbed.veth(router, "wan0", internet, "r0")
    testbed.veth(internet, "h0", hub, "eth0")
    testbed.addr(home, "eth0", "192.168.1.2/24")
    testbed.addr(router, "lan0", "192.168.1.1/24")
    testbed.addr(router, "wan0", "203.0.113.2/24")
    testbed.addr(internet, "r0", "203.0.113.1/24")
    testbed.addr(internet, "h0", "198.51.100.1/24")
    testbed.addr(hub, "eth0", "198.51.100.2/24")
    testbed.route(home, "default", via="192.168.1.1")
    testbed.route(router, "default", via="203.0.113.1")
    testbed.route(hub, "default", via="198.51.100.1")
    for ns in (router, internet):
        testbed.sysctl(ns, "net.ipv4.ip_forward", 1)
    testbed.nft(router, masquerade_ruleset(hard))
    if conntrack_timeout is not None:
        testbed.sysctl(router, "net.netfilter.nf_conntrack_udp_timeout", conntrack_timeout)
        testbed.sysctl(router, "net.netfilter.nf_conntrack_udp_timeout_stream", conntrack_timeout)
    return NatHome(
        home, router, internet, hub, "192.168.1.2", "192.168.1.1", "203.0.113.2", "198.51.100.2"
    )


@dataclass(frozen=True)
class Blackhole:
    """A - mid - B; mid's link toward B has a small MTU and mid drops the ICMP errors that
    would tell A so (IPv4 "destination unreachable", IPv6 "packet too big")."""

    a: Namespace
    mid: Namespace
    b: Namespace
    a_addr: str
    b_addr: str
    a_addr6: str
    b_addr6: str
    mtu: int


def pmtu_blackhole(testbed: Testbed, mtu: int = 1280) -> Blackhole:
    """A (10.1.0.2, fd00:1::2) - mid - B (10.2.0.2, fd00:2::2); mid->B link MTU ``mtu``."""
    a, mid, b = testbed.netns("a"), testbed.netns("mid"), testbed.netns("b")
    testbed.veth(a, "eth0", mid, "a0")
    testbed.veth(mid, "b0", b, "eth0", mtu=mtu)
    testbed.addr(a, "eth0", "10.1.0.2/24")
    testbed.addr(a, "eth0", "fd00:1::2/64")
    testbed.addr(mid, "a0", "10.1.0.1/24")
    testbed.addr(mid, "a0", "fd00:1::1/64")
    testbed.addr(mid, "b0", "10.2.0.1/24")
    testbed.addr(mid, "b0", "fd00:2::1/64")
    testbed.addr(b, "eth0", "10.2.0.2/24")
    testbed.addr(b, "eth0", "fd00:2::2/64")
    for ns, v4, v6 in ((a, "10.1.0.1", "fd00:1::1"), (b, "10.2.0.1", "fd00:2::1")):
        testbed.route(ns, "default", via=v4)
        testbed.route(ns, "::/0", via=v6)
    testbed.sysctl(mid, "net.ipv4.ip_forward", 1)
    testbed.sysctl(mid, "net.ipv6.conf.all.forwarding", 1)
    chains = "".join(
        f"  chain {hook} {{\n"
        f"    type filter hook {hook} priority 0\n"
        "    icmp type destination-unreachable counter drop\n"
        "    icmpv6 type packet-too-big counter drop\n"
        "  }\n"
        for hook in ("forward", "output")
    )
    testbed.nft(mid, "table inet pmtu_blackhole {\n" + chains + "}\n")
    return Blackhole(a, mid, b, "10.1.0.2", "10.2.0.2", "fd00:1::2", "fd00:2::2", mtu)


def blackhole_drops(testbed: Testbed, bh: Blackhole) -> int:
    """How many ICMP "too big" errors mid has dropped so far (proof the black hole was hit)."""
    listing = testbed.run(bh.mid, ["nft", "list", "table", "inet", "pmtu_blackhole"]).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))


def block_udp(testbed: Testbed, router_ns: Namespace) -> None:
    """Drop all UDP forwarded by ``router_ns`` (undo with `unblock_udp`)."""
    testbed.nft(
        router_ns,
        f"table inet {_BLOCK_UDP_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0\n"
        "    meta l4proto udp counter drop\n"
        "  }\n"
        "}\n",
    )


def unblock_udp(testbed: Testbed, router_ns: Namespace) -> None:
    testbed.run(router_ns, ["nft", "delete", "table", "inet", _BLOCK_UDP_TABLE])


# -- a stock WireGuard pair ------------------------------------------------------------------


@dataclass(frozen=True)
class WireGuardPair:
    """wireguard-go on both sides of a `TwoHosts`, peered, with tunnel addresses assigned."""

    a_if: str
    b_if: str
    a_proc: subprocess.Popen[bytes]
    b_proc: subprocess.Popen[bytes]
    a_key: Keypair
    b_key: Keypair
    a_tun: str
    b_tun: str
    a_tun6: str
    b_tun6: str
    port: int


def wireguard_go_pair(
    testbed: Testbed,
    hosts: TwoHosts,
    *,
    port: int = 51820,
    outer_v6: bool = False,
    mtu: int | None = None,
    wireguard_go: str = "wireguard-go",
) -> WireGuardPair:
    """Stock wireguard-go in A and B, peered over the veth; tunnel 10.99.0.1/2, fd99::1/2.

    Both sides get their keys and peers before either interface comes up, so no initiation is
    lost to a peer that does not know its key yet.
    """
    if outer_v6 and (hosts.a_addr6 is None or hosts.b_addr6 is None):
        raise ValueError("outer_v6 needs two_hosts(v6=True)")
    a_if, b_if = testbed.ifname("wga"), testbed.ifname("wgb")
    a_proc = testbed.start_wireguard_go(hosts.a, a_if, binary=wireguard_go)
    b_proc = testbed.start_wireguard_go(hosts.b, b_if, binary=wireguard_go)
    a_key, b_key = wg_keypair(), wg_keypair()
    a_end = f"[{hosts.a_addr6}]:{port}" if outer_v6 else f"{hosts.a_addr}:{port}"
    b_end = f"[{hosts.b_addr6}]:{port}" if outer_v6 else f"{hosts.b_addr}:{port}"
    sides = (
        (hosts.a, a_if, a_key, b_key, b_end, "10.99.0.1", "fd99::1", "10.99.0.2", "fd99::2"),
        (hosts.b, b_if, b_key, a_key, a_end, "10.99.0.2", "fd99::2", "10.99.0.1", "fd99::1"),
    )
    for ns, ifname, own, peer, endpoint, _, _, peer4, peer6 in sides:
        testbed.wg_set_interface(ns, ifname, own.private, port)
        testbed.wg_set_peer(
            ns, ifname, peer.public, allowed_ips=(f"{peer4}/32", f"{peer6}/128"), endpoint=endpoint
        )
    for ns, ifname, _, _, _, own4, own6, _, _ in sides:
        testbed.addr(ns, ifname, f"{own4}/24")
        testbed.addr(ns, ifname, f"{own6}/64")
        if mtu is not None:
            testbed.ip(ns, "link", "set", "dev", ifname, "mtu", str(mtu))
        testbed.up(ns, ifname)
    return WireGuardPair(
        a_if,
        b_if,
        a_proc,
        b_proc,
        a_key,
        b_key,
        "10.99.0.1",
        "10.99.0.2",
        "fd99::1",
        "fd99::2",
        port,
    )


# -- simple helpers for tests that manage their own devices ---------------------------------
# (kept for tests written against the first, smaller version of this module)

_unique = itertools.count()


def require_root() -> None:
    """Skip unless root with ``ip`` and ``/dev/net/tun``; with ``CI=true``, fail instead."""
    require_root_netns(None, binaries=("ip",))


def unique_name(prefix: str) -> str:
    """A name unique across parallel test processes, at most 15 bytes (IFNAMSIZ - 1)."""
    name = f"{prefix}{os.getpid() % 100000}x{next(_unique)}"
    if len(name) > MAX_IFNAME:
        raise ValueError(f"interface name {name!r} longer than {MAX_IFNAME} characters")
    return name


def ip(*args: str) -> str:
    """``ip ARGS`` in the root namespace; raises AssertionError with its stderr on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


# -- meshguard nodes -------------------------------------------------------------------------

#: The repository root: on PYTHONPATH, twistd finds ``twisted/plugins/meshguard_plugin.py`` and
#: every spawned node runs this tree's code without a reinstall.
REPO_ROOT = Path(__file__).resolve().parent.parent


def meshguard_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment additions for a spawned meshguard process (``PYTHONPATH`` = repo root)."""
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}
    env.update(extra or {})
    return env


def twistd_argv(config: str | Path, ifname: str | None = None) -> list[str]:
    """``twistd -n --pidfile= meshguard --config CONFIG [--interface IFNAME]`` (this Python's)."""
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        argv = [str(twistd)]
    else:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    argv += ["-n", "--pidfile=", "meshguard", "--config", str(config)]
    if ifname is not None:
        argv += ["--interface", ifname]
    return argv


@dataclass(frozen=True)
class MeshguardPeer:
    """One ``[Peer]`` section of a meshguard (wg-quick format) config."""

    public_key: str
    allowed_ips: Sequence[str] = ()
    endpoint: str | None = None
    preshared_key: str | None = None
    persistent_keepalive: int | None = None


def meshguard_config_text(
    private_key: str,
    *,
    listen_port: int | None = None,
    addresses: Sequence[str] = (),
    mtu: int | None = None,
    table: str | None = None,
    peers: Sequence[MeshguardPeer] = (),
) -> str:
    """The text of a wg-quick style config for meshguard."""
    lines = ["[Interface]", f"PrivateKey = {private_key}"]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    if addresses:
        lines.append(f"Address = {', '.join(addresses)}")
    if mtu is not None:
        lines.append(f"MTU = {mtu}")
    if table is not None:
        lines.append(f"Table = {table}")
    for peer in peers:
        lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
        if peer.preshared_key is not None:
            lines.append(f"PresharedKey = {peer.preshared_key}")
        if peer.allowed_ips:
            lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
        if peer.endpoint is not None:
            lines.append(f"Endpoint = {peer.endpoint}")
        if peer.persistent_keepalive is not None:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def write_meshguard_config(path: Path, text: str) -> Path:
    """Write a config (e.g. from `meshguard_config_text`) to ``path``, mode 0600 as wg wants."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


def start_meshguard(
    testbed: Testbed,
    ns: Namespace,
    config: Path,
    ifname: str,
    *,
    timeout: float = 20.0,
) -> subprocess.Popen[bytes]:
    """Run ``twistd -n --pidfile= meshguard --config CONFIG --interface IFNAME`` in ``ns``.

    Returns once the node answers on its UAPI socket (so ``wg`` works); raises `CommandError`
    with the log's tail if it exits first. ``ifname`` should come from ``testbed.ifname`` so
    that its socket is unique and cleaned up.
    """
    if ifname not in testbed._ifnames:
        testbed._ifnames.append(ifname)
    argv = twistd_argv(config, ifname)
    proc = testbed.spawn(ns, argv, env=meshguard_env(), cwd=REPO_ROOT)
    _wait_uapi(testbed, ns, proc, argv, ifname, timeout)
    return proc


def start_meshguard_userspace(
    testbed: Testbed, ns: Namespace, ifname: str, *, timeout: float = 20.0
) -> subprocess.Popen[bytes]:
    """Run ``meshguard-userspace -f IFNAME`` (this tree's code) in ``ns``; return once ready."""
    if ifname not in testbed._ifnames:
        testbed._ifnames.append(ifname)
    argv = [sys.executable, "-m", "meshguard.app.userspace", "-f", ifname]
    proc = testbed.spawn(ns, argv, env=meshguard_env(), cwd=REPO_ROOT)
    _wait_uapi(testbed, ns, proc, argv, ifname, timeout)
    return proc


def _wait_uapi(
    testbed: Testbed,
    ns: Namespace,
    proc: subprocess.Popen[bytes],
    argv: Sequence[str],
    ifname: str,
    timeout: float,
) -> None:
    def answers() -> bool:
        if proc.poll() is not None:
            return True
        if not testbed.uapi_socket(ifname).exists():
            return False
        return testbed.run(ns, ["wg", "show", ifname], check=False).returncode == 0

    testbed.wait_for(answers, timeout=timeout, what=f"meshguard UAPI for {ifname} in {ns}")
    if proc.poll() is not None:
        raise CommandError(argv, proc.returncode, testbed.log_tail(proc), "")


def wg_dump(testbed: Testbed, ns: Namespace, ifname: str) -> tuple[list[str], list[list[str]]]:
    """``wg show IFNAME dump`` split: the interface line's fields, then one list per peer."""
    lines = testbed.wg(ns, "show", ifname, "dump").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


@dataclass(frozen=True)
class MeshguardGoPair:
    """meshguard (twistd, in A) peered with wireguard-go (in B) over a `TwoHosts` veth.

    Tunnel addresses: meshguard 10.99.0.1 / fd99::1, wireguard-go 10.99.0.2 / fd99::2.
    """

    hosts: TwoHosts
    mg_if: str
    go_if: str
    mg_proc: subprocess.Popen[bytes]
    go_proc: subprocess.Popen[bytes]
    mg_key: Keypair
    go_key: Keypair
    mg_config: Path
    mg_port: int
    go_port: int
    psk: str | None
    mg_tun: str = "10.99.0.1"
    go_tun: str = "10.99.0.2"
    mg_tun6: str = "fd99::1"
    go_tun6: str = "fd99::2"


def meshguard_go_pair(
    testbed: Testbed,
    hosts: TwoHosts,
    *,
    outer_v6: bool = False,
    initiator: str = "both",
    psk: bool = False,
    mtu: int | None = None,
    mg_port: int = 51820,
    go_port: int = 51821,
    wireguard_go: str = "wireguard-go",
) -> MeshguardGoPair:
    """meshguard in A (``twistd``, from a config file) and wireguard-go in B, peered.

    ``initiator`` picks who knows the other's endpoint: ``"meshguard"`` (only meshguard can
    start the handshake), ``"wireguard-go"`` (meshguard can only respond) or ``"both"``.
    wireguard-go is configured before meshguard starts, so no first initiation is lost.
    """
    if initiator not in ("meshguard", "wireguard-go", "both"):
        raise ValueError(f"unknown initiator {initiator!r}")
    if outer_v6 and (hosts.a_addr6 is None or hosts.b_addr6 is None):
        raise ValueError("outer_v6 needs two_hosts(v6=True)")
    a_host = f"[{hosts.a_addr6}]" if outer_v6 else hosts.a_addr
    b_host = f"[{hosts.b_addr6}]" if outer_v6 else hosts.b_addr
    mg_if, go_if = testbed.ifname("mg"), testbed.ifname("go")
    mg_key, go_key = wg_keypair(), wg_keypair()
    key = testbed.wg(hosts.b, "genpsk").strip() if psk else None
    go_proc = testbed.start_wireguard_go(hosts.b, go_if, binary=wireguard_go)
    testbed.wg_set_interface(hosts.b, go_if, go_key.private, go_port)
    testbed.wg_set_peer(
        hosts.b,
        go_if,
        mg_key.public,
        allowed_ips=("10.99.0.1/32", "fd99::1/128"),
        endpoint=f"{a_host}:{mg_port}" if initiator != "meshguard" else None,
        preshared_key=key,
    )
    testbed.addr(hosts.b, go_if, "10.99.0.2/24")
    testbed.addr(hosts.b, go_if, "fd99::2/64")
    if mtu is not None:
        testbed.ip(hosts.b, "link", "set", "dev", go_if, "mtu", str(mtu))
    testbed.up(hosts.b, go_if)
    text = meshguard_config_text(
        mg_key.private,
        listen_port=mg_port,
        addresses=("10.99.0.1/24", "fd99::1/64"),
        mtu=mtu,
        peers=[
            MeshguardPeer(
                go_key.public,
                allowed_ips=("10.99.0.2/32", "fd99::2/128"),
                endpoint=f"{b_host}:{go_port}" if initiator != "wireguard-go" else None,
                preshared_key=key,
            )
        ],
    )
    config = write_meshguard_config(testbed.log_dir / f"{mg_if}.conf", text)
    mg_proc = start_meshguard(testbed, hosts.a, config, mg_if)
    return MeshguardGoPair(
        hosts, mg_if, go_if, mg_proc, go_proc, mg_key, go_key, config, mg_port, go_port, key
    )


#: NAT kinds of :func:`nat_homes`, modelled on Tailscale's natlab (see docs/nat-matrix.md):
#:
#: - ``one-to-one``: the home's host owns the router's public address (DNAT + SNAT, ports kept):
#:   anything may reach it.
#: - ``easy``: ``masquerade`` (endpoint-independent mapping, address-and-port-dependent
#:   filtering); whether unsolicited WAN input to the router itself is dropped is the separate
#:   ``wan_filter`` flavour.
#: - ``easy-addr``: endpoint-independent mapping with address-dependent filtering: once the home
#:   sent to an address, that address may reach the home's port from any port.
#: - ``hard``: ``masquerade random`` (a new port per destination: endpoint-dependent mapping).
#: - ``cgnat``: two layers, a home ``masquerade`` behind a carrier ``masquerade`` (both easy).
#: - ``no-hairpin``: ``easy``, stated explicitly: a packet from the LAN to the router's own
#:   public address is not looped back to the LAN (Linux masquerade never hairpins).
#: - ``hairpin``: ``easy`` plus a port forward of the member port to the first host that also
#:   applies from the LAN (:func:`hairpin_ruleset`): the first host's public endpoint answers
#:   from inside the home too. Linux cannot loop back masquerade's dynamic mappings, so the
#:   other hosts' public endpoints stay unreachable from the LAN.
NAT_KINDS: tuple[str, ...] = (
    "one-to-one", "easy", "easy-addr", "hard", "cgnat", "no-hairpin", "hairpin",
)  # fmt: skip


@dataclass(frozen=True)
class MeshHome:
    """One home of `nat_homes`: its router and its hosts (namespace, LAN address)."""

    router: Namespace
    public: str
    hosts: list[tuple[Namespace, str]]
    hard: bool
    kind: str = "easy"
    wan_filter: bool = True
    #: The carrier router of a ``cgnat`` home (the outer NAT), else None.
    carrier: Namespace | None = None
    #: With ``ipv6``: the hosts' global IPv6 addresses (2001:db8:i::2, ...), in host order.
    v6: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeshInternet:
    internet: Namespace
    #: The public node (an introducer) and its address.
    public: Namespace
    public_address: str
    homes: list[MeshHome]


def wan_filter_ruleset() -> str:
    """As many home routers do: unsolicited packets from the WAN to the router itself are
    dropped. It also hides a hole-punching hazard: without it, a peer's punch that reaches the
    router before our own first packet left becomes a conntrack entry that clashes with our
    mapping, and masquerade picks another port (docs/nat-matrix.md)."""
    return (
        "table ip filter {\n"
        "  chain input {\n"
        "    type filter hook input priority 0\n"
        '    iifname "wan0" ct state new counter drop\n'
        "  }\n"
        "}\n"
    )


def one_to_one_ruleset(public: str, host: str) -> str:
    """The host behind the router owns ``public``: ports and addresses map one to one."""
    return (
        "table ip nat {\n"
        "  chain pre {\n"
        "    type nat hook prerouting priority -100\n"
        f'    iifname "wan0" ip daddr {public} counter dnat to {host}\n'
        "  }\n"
        "  chain post {\n"
        "    type nat hook postrouting priority 100\n"
        f'    oifname "wan0" ip saddr {host} counter snat to {public}\n'
        "  }\n"
        "}\n"
    )


def address_filtered_ruleset(host: str, port: int) -> str:
    """``masquerade`` plus address-dependent filtering toward ``host:port``: addresses the home
    sent to (a dynamic set) may reach that port from any of their ports."""
    return masquerade_ruleset(False) + (
        "table ip addrfilter {\n"
        "  set contacted {\n"
        "    type ipv4_addr\n"
        "    flags dynamic,timeout\n"
        "    timeout 30s\n"
        "  }\n"
        "  chain post {\n"
        "    type filter hook postrouting priority 0\n"
        f'    oifname "wan0" ip saddr {host} udp sport {port} '
        "update @contacted { ip daddr }\n"
        "  }\n"
        "  chain pre {\n"
        "    type nat hook prerouting priority -100\n"
        f'    iifname "wan0" ct state new udp dport {port} ip saddr @contacted '
        f"counter dnat to {host}:{port}\n"
        "  }\n"
        "}\n"
    )


def hairpin_ruleset(public: str, host: str, port: int, lan: str) -> str:
    """A port forward with hairpinning (NAT loopback): ``public:port`` goes to ``host:port``
    whether it comes from the WAN or from the LAN ``lan``, and a LAN host's packets looped back
    this way are masqueraded to the router's LAN address, so the answers come back through the
    router (else ``host`` would answer the LAN host straight, from the wrong address)."""
    return (
        "table ip hairpin {\n"
        "  chain pre {\n"
        "    type nat hook prerouting priority -100\n"
        f"    ip daddr {public} udp dport {port} counter dnat to {host}:{port}\n"
        "  }\n"
        "  chain post {\n"
        "    type nat hook postrouting priority 100\n"
        f'    oifname "br0" ip saddr {lan} ct status dnat counter masquerade\n'
        "  }\n"
        "}\n"
    )


def v6_firewall_ruleset() -> str:
    """A home router's stateful IPv6 firewall: nothing new comes in from the WAN, answers to
    what the home sent do."""
    return (
        "table ip6 v6fw {\n"
        "  chain forward6 {\n"
        "    type filter hook forward priority 0\n"
        '    iifname "wan0" ct state established,related accept\n'
        '    iifname "wan0" counter drop\n'
        "  }\n"
        "}\n"
    )


def nat_homes(
    testbed: Testbed,
    layout: Sequence[tuple[int, bool] | tuple[int, str] | tuple[int, str, bool]],
    *,
    extra_public: int = 0,
    wan_filter: bool = True,
    port: int = 51820,
    ipv6: bool = False,
    v4_only: Iterable[int] = (),
) -> MeshInternet:
    """Several homes, each behind its own nftables NAT router, on a shared "internet" segment
    with a public node at 198.51.100.2 (``extra_public`` more public hosts get 198.51.101.2,
    198.51.102.2, ...).

    ``layout`` gives, per home, its number of hosts and its NAT: ``True`` for ``masquerade
    random`` (a destination-dependent "hard" NAT), ``False`` for plain masquerade, or one of
    :data:`NAT_KINDS`. Home ``i`` (from 1) has the LAN 192.168.i.0/24 on a bridge in its router
    (hosts .2, .3, ...) and the public address 203.0.i.2 (on the link 203.0.i.0/24 to the
    internet router); a third element per home overrides ``wan_filter`` for it; a ``cgnat``
    home's router has 100.64.i.2 behind a carrier router that owns
    203.0.i.2. ``wan_filter`` chooses the router flavour: drop unsolicited WAN input to the
    router itself (as many home routers do) or not (a Linux box or cloud NAT instance). The
    ``one-to-one`` kind forwards everything, so the flavour does not apply to it; ``port`` is
    the UDP port the ``easy-addr`` filter admits. ``ipv6`` also gives every home (not
    ``cgnat``) global IPv6: LAN 2001:db8:i::/64 routed, not NATed, behind the router's stateful
    firewall (:func:`v6_firewall_ruleset`), and the router 2001:db8:ff0i::2 on its WAN link;
    the homes numbered in ``v4_only`` (from 1) keep IPv4 only, as a ``cgnat`` home does.
    """
    no_v6 = set(v4_only)
    internet = testbed.netns("inet")
    testbed.sysctl(internet, "net.ipv4.ip_forward", 1)
    if ipv6:
        testbed.sysctl(internet, "net.ipv6.conf.all.forwarding", 1)
    public = testbed.netns("pub")
    testbed.veth(internet, "p0", public, "eth0")
    testbed.addr(internet, "p0", "198.51.100.1/24")
    testbed.addr(public, "eth0", "198.51.100.2/24")
    testbed.route(public, "default", via="198.51.100.1")
    for extra in range(extra_public):
        ns = testbed.netns(f"pub{extra + 2}")
        testbed.veth(internet, f"p{extra + 1}", ns, "eth0")
        testbed.addr(internet, f"p{extra + 1}", f"198.51.{101 + extra}.1/24")
        testbed.addr(ns, "eth0", f"198.51.{101 + extra}.2/24")
        testbed.route(ns, "default", via=f"198.51.{101 + extra}.1")
    homes: list[MeshHome] = []
    for index, entry in enumerate(layout, start=1):
        count, nat = entry[0], entry[1]
        filtered = bool(entry[2]) if len(entry) > 2 else wan_filter  # type: ignore[misc]
        kind = nat if isinstance(nat, str) else ("hard" if nat else "easy")
        if kind not in NAT_KINDS:
            raise ValueError(f"unknown NAT kind {kind!r}")
        router = testbed.netns(f"r{index}")
        testbed.sysctl(router, "net.ipv4.ip_forward", 1)
        public_address = f"203.0.{index}.2"
        carrier: Namespace | None = None
        if kind == "cgnat":
            carrier = testbed.netns(f"c{index}")
            testbed.sysctl(carrier, "net.ipv4.ip_forward", 1)
            testbed.veth(carrier, "wan0", internet, f"h{index}")
            testbed.addr(internet, f"h{index}", f"203.0.{index}.1/24")
            testbed.addr(carrier, "wan0", f"{public_address}/24")
            testbed.route(carrier, "default", via=f"203.0.{index}.1")
            testbed.veth(router, "wan0", carrier, "cg0")
            testbed.addr(carrier, "cg0", f"100.64.{index}.1/24")
            testbed.addr(router, "wan0", f"100.64.{index}.2/24")
            testbed.route(router, "default", via=f"100.64.{index}.1")
            carrier_rules = masquerade_ruleset(False)
            testbed.nft(carrier, carrier_rules + (wan_filter_ruleset() if filtered else ""))
        else:
            testbed.veth(router, "wan0", internet, f"h{index}")
            testbed.addr(internet, f"h{index}", f"203.0.{index}.1/24")
            testbed.addr(router, "wan0", f"{public_address}/24")
            testbed.route(router, "default", via=f"203.0.{index}.1")
        testbed.ip(router, "link", "add", "br0", "type", "bridge")
        testbed.up(router, "br0")
        testbed.addr(router, "br0", f"192.168.{index}.1/24")
        hosts: list[tuple[Namespace, str]] = []
        for host in range(count):
            ns = testbed.netns(f"h{index}{host}")
            testbed.veth(ns, "eth0", router, f"l{host}")
            testbed.ip(router, "link", "set", "dev", f"l{host}", "master", "br0")
            address = f"192.168.{index}.{host + 2}"
            testbed.addr(ns, "eth0", f"{address}/24")
            testbed.route(ns, "default", via=f"192.168.{index}.1")
            hosts.append((ns, address))
        v6: tuple[str, ...] = ()
        if ipv6 and kind != "cgnat" and index not in no_v6:
            testbed.sysctl(router, "net.ipv6.conf.all.forwarding", 1)
            testbed.addr(internet, f"h{index}", f"2001:db8:ff{index:02x}::1/64")
            testbed.addr(router, "wan0", f"2001:db8:ff{index:02x}::2/64")
            testbed.route(router, "default", via=f"2001:db8:ff{index:02x}::1")
            testbed.route(internet, f"2001:db8:{index}::/64", via=f"2001:db8:ff{index:02x}::2")
            testbed.addr(router, "br0", f"2001:db8:{index}::1/64")
            v6 = tuple(f"2001:db8:{index}::{host + 2}" for host in range(count))
            for (ns, _), address in zip(hosts, v6, strict=True):
                testbed.addr(ns, "eth0", f"{address}/64")
                testbed.route(ns, "default", via=f"2001:db8:{index}::1")
        first_host = f"192.168.{index}.2"
        if kind == "one-to-one":
            ruleset = one_to_one_ruleset(public_address, first_host)
        elif kind == "easy-addr":
            ruleset = address_filtered_ruleset(first_host, port)
        elif kind == "hairpin":
            ruleset = masquerade_ruleset(False) + hairpin_ruleset(
                public_address, first_host, port, f"192.168.{index}.0/24"
            )
        else:
            ruleset = masquerade_ruleset(kind == "hard")
        if filtered and kind != "one-to-one":
            ruleset += wan_filter_ruleset()
        if v6:
            ruleset += v6_firewall_ruleset()
        testbed.nft(router, ruleset)
        homes.append(
            MeshHome(router, public_address, hosts, kind == "hard", kind, filtered, carrier, v6)
        )
    return MeshInternet(internet, public, "198.51.100.2", homes)


def conntrack_entries(testbed: Testbed, ns: Namespace, proto: str = "udp") -> list[str]:
    """The namespace's conntrack table (``/proc/net/nf_conntrack``), ``proto`` lines only:
    what a NAT has mapped, and which inbound packets it keeps entries for."""
    text = testbed.run(ns, ["cat", "/proc/net/nf_conntrack"]).stdout
    return [line for line in text.splitlines() if f" {proto} " in f" {line} "]


#: The binary :func:`reboot_router` empties a router's conntrack table with (Debian's
#: ``conntrack``); tests that reboot routers require it beside :data:`DEFAULT_BINARIES`.
CONNTRACK = "conntrack"


def reboot_router(testbed: Testbed, home: MeshHome, new_public: str) -> None:
    """A home router "reboots" with a new public address, as a real one does: the old address
    goes, its whole conntrack table is emptied (``conntrack -F``: every mapping, every DNAT/SNAT
    entry, every entry a peer's unanswered packets left), its nftables state that lives only
    in memory is reset, and it comes back on the new address, so every mapping is new.

    For a ``cgnat`` home it is the carrier that owns the public address and reboots (the home's
    inner NAT keeps its mappings). A ``one-to-one`` router's rules name its public address, so
    they are loaded again for the new one; an ``easy-addr`` router forgets the addresses its
    home contacted (its dynamic set). A router running miniupnpd keeps its daemon and its
    rules (miniupnpd's DNAT rules match the WAN interface, not the address, and it reads the
    address from the interface per request); what a home had mapped is renewed by the home.
    The WAN link is down from the address flush until the new address is up, so nothing
    crosses it in between and the table stays empty until the first packet after."""
    router = home.carrier if home.carrier is not None else home.router
    testbed.ip(router, "addr", "flush", "dev", "wan0")
    # After the flush: no route out, no local address on the WAN, so no packet can leave an
    # entry between emptying the table and the new address coming up.
    testbed.run(router, [CONNTRACK, "-F"])
    if home.kind == "one-to-one":
        testbed.run(router, ["nft", "delete", "table", "ip", "nat"])
        testbed.nft(router, one_to_one_ruleset(new_public, home.hosts[0][1]))
    elif home.kind == "easy-addr":
        testbed.run(router, ["nft", "flush", "set", "ip", "addrfilter", "contacted"])
    prefix = new_public.rsplit(".", 1)[0]
    testbed.addr(router, "wan0", f"{new_public}/24")
    testbed.route(router, "default", via=f"{prefix}.1")
