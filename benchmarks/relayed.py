"""Relayed against direct throughput in one run: a member relay, a TLS relay and a direct pair.

Builds an "internet" of network namespaces (tests/netns.py ``nat_homes``) with a public
introducer that also serves a TLS relay, and five homes with one meshguard member each:

- homes 1 and 2 behind plain masquerade: they punch and go **direct**;
- homes 3 and 4 behind ``masquerade random``: they cannot punch and go **via the member**
  (the introducer forwards, limited by its ``ForwardingRate``);
- home 5 behind a router that drops UDP, connected (like home 2) to the TLS relay: the pair
  (5, 2) goes **via the TLS relay**.

Then iperf3 (single TCP stream) runs for each pair in turn, ``--reps`` times for ``--seconds``
seconds, and the medians are reported with their ratio to the direct pair. Needs root.

    python3 benchmarks/relayed.py [--seconds 5] [--reps 3] [--forwarding-rate 64|unlimited]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshguard.app.status_client import read_status  # noqa: E402
from tests.netns import (  # noqa: E402
    Testbed,
    block_udp,
    nat_homes,
    require_root,
    start_meshguard,
    wg_keypair,
    write_meshguard_config,
)
from tests.relaycerts import TestCA  # noqa: E402

PORT = 51820
RELAY_PORT = 8443
RELAY_NAME = "relay.test"


def _kind_of(ifname: str, key: str) -> str:
    for peer in read_status(ifname)["peers"]:
        if peer["public_key"] == key:
            return str(peer.get("path_kind"))
    return "absent"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--forwarding-rate", default=None, help="ForwardingRate on the relay")
    args = parser.parse_args()
    require_root()
    with Testbed() as tb:
        net = nat_homes(tb, [(1, "easy"), (1, "easy"), (1, "hard"), (1, "hard"), (1, "easy")])
        block_udp(tb, net.homes[4].router)
        logdir = Path(tb.log_dir)
        ca = TestCA(logdir / "pki")
        issued = ca.issue(RELAY_NAME)
        hosts = [home.hosts[0][0] for home in net.homes]
        for ns in hosts:
            etc = Path("/etc/netns") / ns.name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{net.public_address} {RELAY_NAME}\n")
        try:
            return _run(tb, net, hosts, ca, issued, logdir, args)
        finally:
            for ns in hosts:
                shutil.rmtree(Path("/etc/netns") / ns.name, ignore_errors=True)


def _run(tb, net, hosts, ca, issued, logdir, args) -> int:  # type: ignore[no-untyped-def]
    intro = wg_keypair()
    keys = [wg_keypair() for _ in hosts]
    addresses = [f"10.97.0.{i + 2}" for i in range(len(hosts))]
    lines = [
        "[Interface]",
        f"PrivateKey = {intro.private}",
        f"ListenPort = {PORT}",
        "Address = 10.97.0.1/24",
        f"RelayListen = 0.0.0.0:{RELAY_PORT}",
        f"RelayCertificate = {issued.certificate}",
        f"RelayKey = {issued.key}",
    ]
    if args.forwarding_rate is not None:
        lines.append(f"ForwardingRate = {args.forwarding_rate}")
    for key, address in zip(keys, addresses, strict=True):
        lines += ["", "[Peer]", f"PublicKey = {key.public}", f"AllowedIPs = {address}/32"]
    intro_if = tb.ifname("in")
    intro_conf = write_meshguard_config(logdir / "in.conf", "\n".join(lines) + "\n")
    start_meshguard(tb, net.public, intro_conf, intro_if)
    ifnames = []
    for index, (ns, key, address) in enumerate(zip(hosts, keys, addresses, strict=True)):
        relay = index in (1, 4)
        text = "\n".join(
            [
                "[Interface]",
                f"PrivateKey = {key.private}",
                f"ListenPort = {PORT}",
                f"Address = {address}/24",
                *(
                    [f"Relay = tls://{RELAY_NAME}:{RELAY_PORT}", f"RelayCA = {ca.path}"]
                    if relay
                    else []
                ),
                "",
                "[Peer]",
                f"PublicKey = {intro.public}",
                "AllowedIPs = 10.97.0.1/32",
                f"Endpoint = {net.public_address}:{PORT}",
                "PersistentKeepalive = 25",
                "Introducer = yes",
            ]
        )
        ifname = tb.ifname(f"m{index}")
        start_meshguard(tb, ns, write_meshguard_config(logdir / f"m{index}.conf", text), ifname)
        ifnames.append(ifname)
    pairs = {"direct": (0, 1), "via member": (2, 3), "via TLS relay": (4, 1)}
    wanted = {"direct": "direct", "via member": "member", "via TLS relay": "tls-relay"}

    def settled() -> bool:
        ok = True
        for name, (x, y) in pairs.items():
            tb.ping(hosts[x], addresses[y], count=1, timeout=1)
            ok = ok and _kind_of(ifnames[x], keys[y].public) == wanted[name]
        return ok

    started = time.monotonic()
    tb.wait_for(settled, timeout=90, interval=1.0, what="direct, member and TLS relay pairs")
    print(f"paths settled after {time.monotonic() - started:.0f} s", flush=True)
    results: dict[str, list[float]] = {name: [] for name in pairs}
    for rep in range(args.reps):
        for name, (x, y) in pairs.items():
            mbits = tb.iperf3(hosts[y], hosts[x], addresses[y], args.seconds, port=5201 + rep)
            results[name].append(mbits)
            print(f"rep {rep + 1} {name}: {mbits:.0f} Mbit/s", flush=True)
    direct = statistics.median(results["direct"])
    rate = args.forwarding_rate or "64 (default)"
    print(f"\nForwardingRate {rate} MiB/s; {args.reps} x {args.seconds:g} s, single TCP stream")
    print(f"{'path':<15} {'median':>8} {'min':>8} {'max':>8}  ratio to direct")
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"{name:<15} {median:>8.0f} {min(values):>8.0f} {max(values):>8.0f}  "
            f"{median / direct:.2f}   (Mbit/s; {median / 8 * 1e6 / 2**20:.1f} MiB/s)"
        )
    kinds = {name: _kind_of(ifnames[x], keys[y].public) for name, (x, y) in pairs.items()}
    print(f"paths after the runs: {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
