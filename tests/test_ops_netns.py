"""Operating a real mesh (network namespaces, nftables NATs): Prometheus metrics scraped over
HTTP match ``wg show`` and status, ``meshguard ping`` names the path each answer took, and
``meshguard netcheck`` tells the NAT kinds apart."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from tests.miniupnpd import start_miniupnpd
from tests.natmesh import start_mesh, start_stock_peer, status_peer, stock_peer_lines
from tests.netns import (
    DEFAULT_BINARIES,
    REPO_ROOT,
    Namespace,
    Testbed,
    block_udp,
    meshguard_env,
    nat_homes,
    require_root_netns,
    start_meshguard,
    wg_dump,
    wg_keypair,
    write_meshguard_config,
)

PORT = 51820
METRICS = 9586


def cli(
    tb: Testbed, ns: Namespace, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``meshguard ARGS`` in ``ns``, as a person runs it there (this tree's code)."""
    return tb.run(
        ns,
        [sys.executable, "-m", "meshguard.app.cli", *args],
        timeout=timeout,
        check=False,
        env={**meshguard_env(), "COLUMNS": "80"},
    )


class Terminal:
    """A tmux session 80 columns wide running one command in ``ns``: what a person sees."""

    def __init__(
        self, test: TestCase, tb: Testbed, ns: Namespace, command: list[str], name: str
    ) -> None:
        self.tb = tb
        # Short: a UNIX socket path has at most 107 bytes.
        self.socket = f"/tmp/{tb.prefix}-tmux-{name}"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in meshguard_env().items())
        shell = f"cd {shlex.quote(str(REPO_ROOT))} && {env} " + " ".join(map(shlex.quote, command))
        # The pane keeps the command's last screen after it exits (remain-on-exit).
        tb.run(
            None,
            [
                *ns.exec_argv(["tmux", "-S", self.socket, "-f", "/dev/null"]),
                "new-session", "-d", "-x", "80", "-y", "30", "-s", name,
                f"{shell}; sleep 60",
            ],
        )  # fmt: skip
        test.addCleanup(self.close)

    def screen(self) -> list[str]:
        text = self.tb.run(None, ["tmux", "-S", self.socket, "capture-pane", "-p"]).stdout
        return text.rstrip("\n").splitlines()

    def close(self) -> None:
        self.tb.run(None, ["tmux", "-S", self.socket, "kill-server"], check=False)
        Path(self.socket).unlink(missing_ok=True)


def scrape_text(tb: Testbed, ns: Namespace, port: int = METRICS) -> str:
    code = (
        "import sys, urllib.request\n"
        f"body = urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read()\n"
        "sys.stdout.write(body.decode())\n"
    )
    return tb.run(ns, [sys.executable, "-c", code], timeout=20).stdout


def scrape(tb: Testbed, ns: Namespace, port: int = METRICS) -> dict[str, list[Any]]:
    """GET /metrics over HTTP inside ``ns``: samples by metric name."""
    text = scrape_text(tb, ns, port)
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float | None:
    for sample in samples.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


class OperationsMeshTests(TestCase):
    timeout = 300

    def test_metrics_ping_and_status_table_on_a_mesh(self) -> None:
        """Home 1 and home 2 behind plain masquerade (punchable), homes 3 and 4 behind
        ``masquerade random`` (direct with the easy homes by the birthday technique, relayed by
        the introducer with each other), a stock wireguard-go peer of the introducer. Homes 1
        and 3 serve metrics; home 1's scrape matches ``wg show dump`` and status; ``meshguard
        ping`` answers direct from home 1 to home 2, via the introducer from home 3 to home 4,
        and by ICMP to the stock peer; the status table fits 80 columns and home 3's says why
        home 4 is not direct."""
        require_root_netns(self, binaries=(*DEFAULT_BINARIES, "tmux"))
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, False), (1, False), (1, True), (1, True)], extra_public=1)
        wgo_ns = Namespace(f"{tb.prefix}-pub2")
        logdir = Path(tb.log_dir)
        wgo = wg_keypair()
        mesh = start_mesh(
            tb,
            net,
            subnet="10.99.0",
            hosts=[home.hosts[0] for home in net.homes],
            member_extra_at=lambda i: (
                [f"MetricsListen = 127.0.0.1:{METRICS}"] if i in (0, 2) else []
            ),
            introducer_peers=stock_peer_lines(wgo.public, "10.99.0.100", f"198.51.101.2:{PORT}"),
        )
        start_stock_peer(
            tb,
            wgo_ns,
            wgo,
            introducer_key=mesh.introducer_key,
            introducer_endpoint=f"{net.public_address}:{PORT}",
            address="10.99.0.100/24",
            allowed_ips="10.99.0.0/24",
        )
        ifnames, addresses, intro_key = mesh.ifnames, mesh.addresses, mesh.introducer_key

        a, b, c, d = range(4)
        ns_of, key_of = mesh.namespaces, mesh.keys

        # The relayed example is the hard-vs-hard pair: an easy home against a hard one goes
        # direct by the birthday technique after ~10-25 s, so every such pair is awaited first
        # and nothing below races it.
        def settled() -> bool:
            status = [read_status(name) for name in ifnames]
            return (
                all(
                    status_peer(status[x], key_of[y]).get("path") == "direct"
                    for x in range(4)
                    for y in range(4)
                    if x != y and {x, y} != {c, d}
                )
                and str(status_peer(status[c], key_of[d]).get("path")).startswith("relayed via")
                and str(status_peer(status[d], key_of[c]).get("path")).startswith("relayed via")
                and tb.ping(ns_of[a], addresses[b], count=1, timeout=1)
                and tb.ping(ns_of[c], addresses[d], count=1, timeout=1)
            )

        tb.wait_for(settled, timeout=90, what="every pair direct but home 3 to home 4")

        # --- metrics: scraped over HTTP, checked against wg show dump and status.
        def metrics_match() -> bool:
            first = scrape(tb, ns_of[a])
            _, dump = wg_dump(tb, ns_of[a], ifnames[a])
            second = scrape(tb, ns_of[a])
            status = read_status(ifnames[a])
            for row in dump:
                key, rx, tx, handshake = row[0], int(row[5]), int(row[6]), int(row[4])
                labels = {"interface": ifnames[a], "public_key": key}
                rx1 = value(first, "wireguard_received_bytes_total", **labels)
                rx2 = value(second, "wireguard_received_bytes_total", **labels)
                tx1 = value(first, "wireguard_sent_bytes_total", **labels)
                tx2 = value(second, "wireguard_sent_bytes_total", **labels)
                hs = value(second, "wireguard_latest_handshake_seconds", **labels)
                if None in (rx1, rx2, tx1, tx2, hs):
                    return False
                assert rx1 is not None and rx2 is not None and tx1 is not None
                assert tx2 is not None
                if not (rx1 <= rx <= rx2 and tx1 <= tx <= tx2 and hs == handshake):
                    return False
                entry = status_peer(status, key)
                allowed = value(
                    second,
                    "wireguard_sent_bytes_total",
                    allowed_ips=",".join(entry["allowed_ips"]),
                    public_key=key,
                )
                if allowed is None:
                    return False
            return True

        tb.wait_for(metrics_match, timeout=30, what="metrics equal to wg show dump")

        def same_as_status() -> bool:
            samples = scrape(tb, ns_of[a])
            status = read_status(ifnames[a])
            for entry in status["peers"]:
                key = entry["public_key"]
                mtu = value(samples, "meshguard_peer_path_mtu_bytes", public_key=key)
                keepalive = value(
                    samples, "meshguard_peer_keepalive_interval_seconds", public_key=key
                )
                rtt = value(samples, "meshguard_peer_rtt_seconds", public_key=key)
                want_rtt = entry.get("rtt_ms")
                if (
                    mtu != entry.get("path_mtu")
                    or keepalive != (entry.get("keepalive_interval") or 0)
                    or (rtt is None) != (want_rtt is None)
                    or (rtt is not None and abs(rtt * 1000 - want_rtt) > 1e-6)
                ):
                    return False
            return True

        tb.wait_for(same_as_status, timeout=30, what="metrics equal to status")
        samples = scrape(tb, ns_of[a])
        status = read_status(ifnames[a])
        peer_b = status_peer(status, key_of[b])
        self.assertEqual(
            value(samples, "meshguard_peer_path", public_key=key_of[b], kind="direct"), 1.0
        )
        # Home 3's metrics: home 4 through the introducer.
        samples_c = scrape(tb, ns_of[c])
        self.assertEqual(
            value(
                samples_c,
                "meshguard_peer_path",
                public_key=key_of[d],
                kind="member",
                via=intro_key,
            ),
            1.0,
        )
        self.assertEqual(value(samples_c, "meshguard_peer_direct", public_key=key_of[d]), 0.0)
        self.assertEqual(value(samples_c, "meshguard_peers", kind="direct"), 3.0)  # hub, 1, 2
        self.assertEqual(value(samples_c, "meshguard_peers", kind="member"), 1.0)
        if peer_b.get("rtt_ms") is not None:
            rtt = value(samples, "meshguard_peer_rtt_seconds", public_key=key_of[b])
            self.assertIsNotNone(rtt)
        self.assertEqual(value(samples, "meshguard_peers", kind="direct"), 4.0)  # hub, 2, 3, 4
        self.assertEqual(
            value(samples, "meshguard_peer_keepalive_interval_seconds", public_key=intro_key),
            25.0,
        )
        self.assertIsNotNone(value(samples, "meshguard_dropped_datagrams_total", reason="junk"))
        self.assertEqual(value(samples, "meshguard_nat_info", nat=status["node"]["nat"]), 1.0)

        # --- ping: direct to home 2, home 3 through the introducer to home 4, ICMP to the
        # stock peer.
        direct = cli(tb, ns_of[a], "ping", addresses[b], "-c", "3", "-i", "0.3", "--json")
        self.assertEqual(direct.returncode, 0, direct.stderr)
        answers = [json.loads(line) for line in direct.stdout.splitlines()]
        replies = [x for x in answers if "rtt_ms" in x and "seq" in x]
        self.assertTrue(replies, direct.stdout)
        for reply in replies:
            self.assertEqual(reply["path_kind"], "direct")
            self.assertTrue(reply["endpoint"].startswith("203.0.2.2:"), reply)
            self.assertLess(reply["rtt_ms"], 200)
            self.assertGreater(reply["rtt_ms"], 0)
        self.assertTrue(answers[-1]["direct"])

        relayed = cli(tb, ns_of[c], "ping", key_of[d], "-c", "2", "-i", "0.3")
        self.assertEqual(relayed.returncode, 0, relayed.stderr)
        self.assertIn(f"over member relay {intro_key[:8]}", relayed.stdout)
        times = [float(t) for t in re.findall(r": ([0-9.]+) ms from ", relayed.stdout)]
        self.assertEqual(len(times), 2, relayed.stdout)
        self.assertTrue(all(0 < t < 500 for t in times), times)
        self.assertIn("no direct path", relayed.stdout)
        not_direct = cli(tb, ns_of[c], "ping", key_of[d], "-c", "2", "-i", "0.3", "--until-direct")
        self.assertEqual(not_direct.returncode, 1, not_direct.stdout)
        until = cli(tb, ns_of[a], "ping", key_of[b], "--until-direct")
        self.assertEqual(until.returncode, 0, until.stdout + until.stderr)
        self.assertEqual(until.stdout.count(" ms from "), 1, until.stdout)
        self.assertIn("over direct 203.0.2.2:", until.stdout)

        stock = cli(tb, net.public, "ping", "10.99.0.100", "-c", "2", "-i", "0.3")
        self.assertEqual(stock.returncode, 0, stock.stdout + stock.stderr)
        self.assertIn("ICMP echo through the tunnel instead", stock.stdout)
        unknown = cli(tb, ns_of[a], "ping", "10.200.0.1")
        self.assertEqual(unknown.returncode, 2)
        self.assertIn("no peer has 10.200.0.1", unknown.stderr)

        # --- the status table as printed: 80 columns; home 3's marks home 4 with why it is
        # relayed.
        table = cli(tb, ns_of[a], "status", ifnames[a])
        table_c = cli(tb, ns_of[c], "status", ifnames[c])
        verbose = cli(tb, ns_of[a], "status", ifnames[a], "-v")
        netcheck = cli(tb, ns_of[a], "netcheck")
        self.assertEqual((verbose.returncode, netcheck.returncode), (0, 0))
        self.assertNotIn("None", verbose.stdout)
        self.assertNotIn("True", verbose.stdout)
        self.assertNotIn("['", verbose.stdout)
        # What a person saw, kept with the test's logs.
        seen = [table, table_c, direct, relayed, until, stock, verbose, netcheck]
        (logdir / "outputs.txt").write_text(
            "\n\n".join([*(x.stdout for x in seen), scrape_text(tb, ns_of[a])])
        )
        self.assertEqual(table.returncode, 0, table.stderr)
        rows = table.stdout.splitlines()
        self.assertTrue(all(len(row) <= 80 for row in rows), table.stdout)
        (row_b,) = [r for r in rows if r.startswith(key_of[b][:8])]
        self.assertIn("direct", row_b)
        self.assertIn(addresses[b], row_b)
        (row_c,) = [r for r in rows if r.startswith(key_of[c][:8])]
        self.assertIn("direct", row_c)
        self.assertEqual(table_c.returncode, 0, table_c.stderr)
        rows_c = table_c.stdout.splitlines()
        self.assertTrue(all(len(row) <= 80 for row in rows_c), table_c.stdout)
        (index_d,) = [i for i, r in enumerate(rows_c) if r.startswith(key_of[d][:8])]
        self.assertIn(f"member via {intro_key[:8]}", rows_c[index_d])
        self.assertTrue(rows_c[index_d + 1].strip().startswith("not direct:"), table_c.stdout)

        # --- the same in a real terminal, 80 columns (tmux): the table, then --watch.
        once = Terminal(
            self, tb, ns_of[a], [sys.executable, "-m", "meshguard.app.cli", "status"], "once"
        )
        try:
            tb.wait_for(lambda: any("PEER" in r for r in once.screen()), timeout=20)
        except AssertionError:
            self.fail(f"no table in the terminal: {once.screen()}")
        screen = once.screen()
        self.assertTrue(screen[0].startswith(ifnames[a]), screen)
        self.assertTrue(all(len(r) <= 80 for r in screen), screen)
        self.assertEqual(screen[1].split(), ["PEER", "ADDRESS", "PATH", "RTT", "SEEN", "RX", "TX"])
        self.assertEqual(len([r for r in screen if r.startswith(key_of[c][:8])]), 1, screen)
        watch = Terminal(
            self,
            tb,
            ns_of[a],
            [sys.executable, "-m", "meshguard.app.cli", "status", "--watch", "1"],
            "w",
        )
        tb.wait_for(lambda: "PEER" in "".join(watch.screen()), timeout=20, what="watch")
        first = watch.screen()
        tb.wait_for(lambda: watch.screen()[0] != first[0], timeout=20, what="--watch to refresh")
        again = watch.screen()
        self.assertTrue(again[0].startswith("every 1 s, "), again)
        # Refreshed in place: one header, one table, nothing left over from the last frame.
        self.assertEqual(sum(1 for r in again if r.startswith("PEER")), 1, again)
        self.assertEqual(len(again), len(first), (first, again))


class NetcheckTests(TestCase):
    timeout = 300

    def test_nat_kinds(self) -> None:
        """Two public meshguard hubs; nodes behind plain masquerade, behind ``masquerade
        random``, behind a router that drops UDP, and one with no NAT. netcheck on each node
        names its case; ``netcheck --config`` beside each home's node, with no node of its
        own running, probes through the hubs and names the same case."""
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(2, False), (2, True), (2, False)], extra_public=2)
        hub2_ns = Namespace(f"{tb.prefix}-pub2")
        open_ns = Namespace(f"{tb.prefix}-pub3")
        block_udp(tb, net.homes[2].router)
        logdir = Path(tb.log_dir)
        hubs = [(net.public, "198.51.100.2", wg_keypair()), (hub2_ns, "198.51.101.2", wg_keypair())]
        nodes = [
            ("easy", net.homes[0].hosts[0][0]),
            ("hard", net.homes[1].hosts[0][0]),
            ("blocked", net.homes[2].hosts[0][0]),
            ("open", open_ns),
        ]
        probes = [(f"probe-{name}", home.hosts[1][0]) for name, home in zip(
            ("easy", "hard", "blocked"), net.homes, strict=True
        )]  # fmt: skip
        node_keys = {name: wg_keypair() for name, _ in nodes + probes}
        for index, (ns, _, k) in enumerate(hubs):
            lines = [
                "[Interface]",
                f"PrivateKey = {k.private}",
                f"ListenPort = {PORT}",
                f"Address = 10.98.{index}.1/24",
            ]
            for n, (name, _) in enumerate(nodes + probes):
                lines += [
                    "",
                    "[Peer]",
                    f"PublicKey = {node_keys[name].public}",
                    f"AllowedIPs = 10.98.{index}.{n + 2}/32",
                ]
            ifname = tb.ifname(f"hub{index}")
            config = write_meshguard_config(logdir / f"hub{index}.conf", "\n".join(lines) + "\n")
            start_meshguard(tb, ns, config, ifname)
        ifnames: dict[str, str] = {}
        for n, (name, ns) in enumerate(nodes):
            text = (
                f"[Interface]\nPrivateKey = {node_keys[name].private}\nListenPort = {PORT}\n"
                f"Address = 10.98.0.{n + 2}/24, 10.98.1.{n + 2}/24\n"
            )
            for index, (_, address, k) in enumerate(hubs):
                text += (
                    f"\n[Peer]\nPublicKey = {k.public}\nAllowedIPs = 10.98.{index}.1/32\n"
                    f"Endpoint = {address}:{PORT}\nPersistentKeepalive = 10\n"
                )
            ifname = tb.ifname(name)
            config = write_meshguard_config(logdir / f"{name}.conf", text)
            start_meshguard(tb, ns, config, ifname)
            ifnames[name] = ifname

        def report(name: str) -> dict[str, Any]:
            ns = dict(nodes)[name]
            done = cli(tb, ns, "netcheck", ifnames[name], "--json")
            if done.returncode != 0:
                raise AssertionError(done.stderr)
            return dict(json.loads(done.stdout))

        def classified() -> bool:
            return all(
                report(name)["mapping_varies_by_destination"] != "unknown"
                for name in ("easy", "hard", "open")
            )

        tb.wait_for(classified, timeout=60, what="every node's NAT classified")
        easy, hard, blocked, open_ = (report(n) for n in ("easy", "hard", "blocked", "open"))
        self.assertEqual(easy["udp"], "yes")
        self.assertEqual(easy["nat"], "yes")
        self.assertEqual(easy["mapping_varies_by_destination"], "no")
        self.assertEqual(easy["public_ipv4"], ["203.0.1.2:51820"])
        self.assertIn("easy", easy["nat_kind"])
        self.assertEqual(hard["udp"], "yes")
        self.assertEqual(hard["mapping_varies_by_destination"], "yes")
        self.assertEqual(len(hard["public_ipv4"]), 2)
        self.assertIn("hard", hard["nat_kind"])
        self.assertEqual(open_["nat"], "no")
        self.assertEqual(open_["public_ipv4"], ["198.51.102.2:51820"])
        self.assertIn("no NAT", open_["nat_kind"])
        self.assertEqual(blocked["udp"], "no")
        self.assertIn("UDP blocked", blocked["nat_kind"])
        self.assertEqual(blocked["public_ipv4"], [])
        # No node running beside the probes: netcheck --config probes through the hubs.
        for name, _ns in probes:
            text = f"[Interface]\nPrivateKey = {node_keys[name].private}\nListenPort = {PORT + 1}\n"
            for _, address, k in hubs:
                text += (
                    f"\n[Peer]\nPublicKey = {k.public}\nAllowedIPs = 10.98.9.1/32\n"
                    f"Endpoint = {address}:{PORT}\nIntroducer = yes\n"
                )
            write_meshguard_config(logdir / f"{name}.conf", text)
        probed = {}
        for name, ns in probes:
            done = cli(tb, ns, "netcheck", "--config", str(logdir / f"{name}.conf"), "--json")
            self.assertEqual(done.returncode, 0, done.stderr)
            probed[name] = json.loads(done.stdout)
        self.assertEqual(probed["probe-easy"]["source"], "probe")
        self.assertEqual(probed["probe-easy"]["udp"], "yes")
        self.assertEqual(probed["probe-easy"]["public_ipv4"], [f"203.0.1.2:{PORT + 1}"])
        self.assertEqual(probed["probe-easy"]["mapping_varies_by_destination"], "no")
        self.assertEqual(probed["probe-hard"]["mapping_varies_by_destination"], "yes")
        self.assertEqual(len(probed["probe-hard"]["public_ipv4"]), 2)
        self.assertEqual(probed["probe-blocked"]["udp"], "no")
        self.assertIn("UDP blocked", probed["probe-blocked"]["nat_kind"])
        # The text form, as a person reads it.
        text = cli(tb, dict(nodes)["hard"], "netcheck", ifnames["hard"]).stdout
        self.assertIn("mapping varies by dest.:  yes", text)
        self.assertTrue(all(len(line) <= 80 for line in text.splitlines()), text)


class TlsRelayOperationsTests(TestCase):
    timeout = 240

    def test_ping_netcheck_and_status_through_a_tls_relay(self) -> None:
        """A home whose router drops UDP reaches its hub through the hub's TLS relay: ping's
        answers name the TLS relay, netcheck says UDP is blocked and the relay reachable (with
        its TCP connect time), and the status table gives the reason it is not direct."""
        from tests.netns import nat_home
        from tests.relaycerts import TestCA

        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_home(tb)
        logdir = Path(tb.log_dir)
        ca = TestCA(logdir / "pki")
        issued = ca.issue("relay.test")
        etc = Path("/etc/netns") / net.home.name
        etc.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, etc, True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{net.hub_addr} relay.test\n")
        hub, home = wg_keypair(), wg_keypair()
        hub_conf = write_meshguard_config(
            logdir / "hub.conf",
            f"[Interface]\nPrivateKey = {hub.private}\nListenPort = {PORT}\n"
            "Address = 10.77.0.1/24\nRelayListen = 0.0.0.0:8443\n"
            f"RelayCertificate = {issued.certificate}\nRelayKey = {issued.key}\n\n"
            f"[Peer]\nPublicKey = {home.public}\nAllowedIPs = 10.77.0.2/32\n",
        )
        home_conf = write_meshguard_config(
            logdir / "home.conf",
            f"[Interface]\nPrivateKey = {home.private}\nAddress = 10.77.0.2/24\n"
            f"Relay = tls://relay.test:8443\nRelayCA = {ca.path}\n\n"
            f"[Peer]\nPublicKey = {hub.public}\nAllowedIPs = 10.77.0.1/32\n"
            f"Endpoint = {net.hub_addr}:{PORT}\nPersistentKeepalive = 5\n",
        )
        block_udp(tb, net.router)
        hub_if, home_if = tb.ifname("hub"), tb.ifname("home")
        start_meshguard(tb, net.hub, hub_conf, hub_if)
        start_meshguard(tb, net.home, home_conf, home_if)
        tb.wait_for(lambda: tb.ping(net.home, "10.77.0.1"), timeout=40, what="ping via relay")

        pinged = cli(tb, net.home, "ping", "10.77.0.1", "-c", "3", "-i", "0.3", "--json")
        self.assertEqual(pinged.returncode, 0, pinged.stdout + pinged.stderr)
        answers = [json.loads(x) for x in pinged.stdout.splitlines()]
        replies = [x for x in answers if "rtt_ms" in x and "seq" in x]
        self.assertTrue(replies, pinged.stdout)
        for reply in replies:
            self.assertEqual(
                (reply["path_kind"], reply["path_via"]), ("tls-relay", "relay.test:8443")
            )
            self.assertGreater(reply["rtt_ms"], 0)
            self.assertLess(reply["rtt_ms"], 500)
        self.assertFalse(answers[-1]["direct"])
        self.assertEqual(
            cli(
                tb, net.home, "ping", "10.77.0.1", "-c", "2", "-i", "0.3", "--until-direct"
            ).returncode,
            1,
        )

        checked = cli(tb, net.home, "netcheck", "--json")
        self.assertEqual(checked.returncode, 0, checked.stderr)
        report = json.loads(checked.stdout)
        self.assertEqual(report["udp"], "no")
        relay = report["tls_relays"]["relay.test:8443"]
        self.assertTrue(relay["reachable"], relay)
        self.assertGreater(relay["tcp_connect_ms"], 0)

        table = cli(tb, net.home, "status")
        text = cli(tb, net.home, "netcheck").stdout
        (logdir / "outputs.txt").write_text("\n\n".join([pinged.stdout, text, table.stdout]))
        rows = table.stdout.splitlines()
        (index,) = [i for i, r in enumerate(rows) if r.startswith(hub.public[:8])]
        self.assertIn("tls-relay relay.te", rows[index])
        # The path arbiter says why in its own words.
        self.assertIn("not direct: UDP to its endpoint failed", rows[index + 1])
        self.assertTrue(all(len(r) <= 80 for r in rows), table.stdout)


class PortMappingNetnsTests(TestCase):
    timeout = 120

    def test_netcheck_names_the_protocols_a_router_offers(self) -> None:
        """Home 1's router runs Debian's miniupnpd (UPnP-IGD, NAT-PMP and PCP); home 2's runs
        nothing. netcheck (here probing with no node running) names the three protocols in
        home 1 and none in home 2."""
        require_root_netns(self, binaries=(*DEFAULT_BINARIES, "miniupnpd"))
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, False), (1, False)])
        logdir = Path(tb.log_dir)
        start_miniupnpd(tb, net.homes[0].router, "192.168.1.0/24")
        reports = {}
        for index, home in enumerate(net.homes):
            config = write_meshguard_config(
                logdir / f"probe{index}.conf",
                f"[Interface]\nPrivateKey = {wg_keypair().private}\n",
            )
            done = cli(tb, home.hosts[0][0], "netcheck", "--config", str(config), "--json")
            self.assertEqual(done.returncode, 0, done.stderr)
            reports[index] = json.loads(done.stdout)
        self.assertEqual(reports[0]["port_mapping_offered"], ["UPnP-IGD", "NAT-PMP", "PCP"])
        self.assertIn("offered by 192.168.1.1", reports[0]["port_mapping"])
        self.assertEqual(reports[1]["port_mapping_offered"], [])
        self.assertEqual(reports[1]["port_mapping"], "none offered by 192.168.2.1")
