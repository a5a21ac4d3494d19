"""The TLS relay between two members, across real namespaces and real TLS.

Home A's router drops UDP; member B is a public host A only learns through the introducer,
which also runs the relay. A and B meet through the relay directly (not forwarded by the
introducer inside A's session with it), carry a 50 MB transfer, keep doing so while another
client floods the relay with junk, and move to UDP on their own once UDP passes. Clients that
cannot prove a member key are refused, and so is a relay whose certificate names another host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from meshguard.relay import frames
from tests.netns import (
    REPO_ROOT,
    Namespace,
    Testbed,
    block_udp,
    meshguard_env,
    nat_homes,
    require_root_netns,
    start_meshguard,
    unblock_udp,
    wg_keypair,
    write_meshguard_config,
)
from tests.relaycerts import TestCA

PORT = 51820
RELAY_PORT = 8443
RELAY_NAME = "relay.test"
#: Resolves to the relay too, but its certificate does not name it.
WRONG_NAME = "wrong.test"
RELAY = f"tls-relay via {RELAY_NAME}:{RELAY_PORT}"

log = Logger()


def _peer(status: dict[str, Any], key: str) -> dict[str, Any]:
    for peer in status["peers"]:
        if peer["public_key"] == key:
            return dict(peer)
    return {}


def _config(path: Path, interface: list[str], peers: list[list[str]]) -> Path:
    lines = ["[Interface]", *interface]
    for peer in peers:
        lines += ["", "[Peer]", *peer]
    return write_meshguard_config(path, "\n".join(lines) + "\n")


def _probe_argv(ca: Path, private: str, public: str, seconds: float, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.relayprobe",
        RELAY_NAME if "wrong" not in extra else WRONG_NAME,
        str(RELAY_PORT),
        str(ca),
        private,
        public,
        str(seconds),
        *[e for e in extra if e != "wrong"],
    ]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class TlsRelayMeshNetnsTests(TestCase):
    timeout = 240

    def _probe(
        self, tb: Testbed, ns: Namespace, ca: Path, private: str, public: str, *extra: str
    ) -> dict[str, Any]:
        cp = tb.run(
            ns, _probe_argv(ca, private, public, 4.0, *extra), timeout=20, env=meshguard_env()
        )
        result: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
        return result

    def test_blocked_home_and_learned_member_meet_through_the_relay(self) -> None:
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, False)], extra_public=1)
        home = net.homes[0]
        a_ns = home.hosts[0][0]
        b_ns = Namespace(f"{tb.prefix}-pub2")
        hub_ns, hub_addr = net.public, net.public_address
        logdir = Path(tb.log_dir)
        ca = TestCA(logdir / "pki")
        issued = ca.issue(RELAY_NAME)
        for ns in (a_ns, b_ns):
            etc = Path("/etc/netns") / ns.name
            etc.mkdir(parents=True, exist_ok=True)
            self.addCleanup(shutil.rmtree, etc, True)
            (etc / "hosts").write_text(
                f"127.0.0.1 localhost\n{hub_addr} {RELAY_NAME} {WRONG_NAME}\n"
            )

        hub_k, a_k, b_k, junk_k = wg_keypair(), wg_keypair(), wg_keypair(), wg_keypair()
        hub_conf = _config(
            logdir / "hub.conf",
            [
                f"PrivateKey = {hub_k.private}",
                f"ListenPort = {PORT}",
                "Address = 10.77.0.1/24",
                f"RelayListen = 0.0.0.0:{RELAY_PORT}",
                f"RelayCertificate = {issued.certificate}",
                f"RelayKey = {issued.key}",
            ],
            [
                [f"PublicKey = {a_k.public}", "AllowedIPs = 10.77.0.2/32"],
                [f"PublicKey = {b_k.public}", "AllowedIPs = 10.77.0.3/32"],
                # A member whose key the junk client below holds.
                [f"PublicKey = {junk_k.public}", "AllowedIPs = 10.77.0.9/32"],
            ],
        )
        introducer = [
            f"PublicKey = {hub_k.public}",
            "AllowedIPs = 10.77.0.1/32",
            f"Endpoint = {hub_addr}:{PORT}",
            "PersistentKeepalive = 5",
            "Introducer = yes",
        ]
        relay_lines = [f"Relay = tls://{RELAY_NAME}:{RELAY_PORT}", f"RelayCA = {ca.path}"]
        a_conf = _config(
            logdir / "a.conf",
            [
                f"PrivateKey = {a_k.private}",
                "Address = 10.77.0.2/24",
                *relay_lines,
                # A second relay entry whose name the certificate does not carry.
                f"Relay = tls://{WRONG_NAME}:{RELAY_PORT}",
            ],
            [introducer],
        )
        b_conf = _config(
            logdir / "b.conf",
            [
                f"PrivateKey = {b_k.private}",
                f"ListenPort = {PORT}",
                "Address = 10.77.0.3/24",
                *relay_lines,
            ],
            [introducer],
        )
        block_udp(tb, home.router)
        hub_if, a_if, b_if = tb.ifname("hub"), tb.ifname("ma"), tb.ifname("mb")
        start_meshguard(tb, hub_ns, hub_conf, hub_if)
        start_meshguard(tb, b_ns, b_conf, b_if)
        a_proc = start_meshguard(tb, a_ns, a_conf, a_if)

        def path(ifname: str, key: str) -> str:
            return str(_peer(read_status(ifname), key).get("path"))

        # A learns B through the introducer and reaches it through the TLS relay itself.
        tb.wait_for(lambda: tb.ping(a_ns, "10.77.0.3"), timeout=60, what="A -> B via relay")
        self.assertEqual(path(a_if, b_k.public), RELAY)
        self.assertEqual(path(b_if, a_k.public), RELAY)
        self.assertTrue(tb.ping(b_ns, "10.77.0.2", count=3))
        started = time.monotonic()
        self.assertTrue(tb.tcp_transfer(b_ns, a_ns, "10.77.0.3", 50 * 1024 * 1024, timeout=90))
        elapsed = time.monotonic() - started
        log.info("figure: 50 MB A->B via the TLS relay in {s:.1f} s", s=elapsed)
        hub_status = read_status(hub_if)["node"]["relay_server"]
        self.assertGreater(hub_status["forwarded_bytes"], 50 * 1024 * 1024)
        self.assertEqual(path(a_if, b_k.public), RELAY)
        # `wg show` never shows the stand-in relay address (it would land in a saved config).
        shown = tb.run(a_ns, ["wg", "show", a_if, "endpoints"], timeout=10).stdout
        self.assertIn(b_k.public, shown)
        self.assertNotIn("[100::", shown)

        # A member floods the relay with junk: A and B keep talking through it.
        flood = subprocess.Popen(
            a_ns.exec_argv(_probe_argv(ca.path, junk_k.private, junk_k.public, 15.0, "flood")),
            stdout=subprocess.PIPE,
            env={**os.environ, **meshguard_env()},
            cwd=REPO_ROOT,
        )
        self.addCleanup(_kill, flood)
        tb.wait_for(
            lambda: read_status(hub_if)["node"]["relay_server"]["members_connected"] == 3,
            timeout=10,
            what="junk client connected",
        )
        # Measure only once the flood is in full swing: the relay is already shedding it.
        tb.wait_for(
            lambda: read_status(hub_if)["node"]["relay_server"]["rate_limited"] > 1000,
            timeout=10,
            what="junk flood under way",
        )
        self.assertTrue(tb.ping(a_ns, "10.77.0.3", count=5))
        started = time.monotonic()
        self.assertTrue(tb.tcp_transfer(b_ns, a_ns, "10.77.0.3", 5 * 1024 * 1024, timeout=30))
        flood_elapsed = time.monotonic() - started
        self.assertTrue(tb.ping(b_ns, "10.77.0.2", count=3))
        out, _ = flood.communicate(timeout=30)
        flooded = json.loads(out.decode().strip().splitlines()[-1])
        self.assertTrue(flooded["accepted"], flooded)
        self.assertGreater(flooded["sent"], 10000)
        after = read_status(hub_if)["node"]["relay_server"]
        log.info(
            "figure: 5 MB A->B during the flood in {s:.1f} s; junk frames {n}; hub {hub}",
            s=flood_elapsed,
            n=flooded["sent"],
            hub=after,
        )

        # Refused: a key that is no member, and a member's key without its private key.
        stranger = wg_keypair()
        result = self._probe(tb, b_ns, ca.path, stranger.private, stranger.public)
        self.assertEqual((result["accepted"], result["error"]), (False, frames.E_NOT_MEMBER))
        result = self._probe(tb, b_ns, ca.path, stranger.private, a_k.public)
        self.assertEqual((result["accepted"], result["error"]), (False, frames.E_BAD_PROOF))
        # Refused by the client: the relay's certificate names another host.
        result = self._probe(tb, b_ns, ca.path, b_k.private, b_k.public, "wrong")
        self.assertEqual((result["tls_failed"], result["accepted"]), (True, False))
        # The node's own client says so, and sends nothing through that link.
        a_status = read_status(a_if)
        self.assertEqual(a_status["node"]["tls_relays"][f"{WRONG_NAME}:{RELAY_PORT}"], 0)
        a_log = tb.log_of(a_proc).read_text()
        self.assertIn(f"relay {WRONG_NAME}:{RELAY_PORT}: TLS verification failed", a_log)

        # UDP passes again: the A-B pair moves to UDP on its own.
        unblock_udp(tb, home.router)
        tb.wait_for(
            lambda: RELAY not in (path(a_if, b_k.public), path(b_if, a_k.public)),
            timeout=30,
            what="A-B on UDP",
        )
        self.assertTrue(tb.ping(a_ns, "10.77.0.3", count=3))
        # And stays there: nothing pulls it back onto the relay while UDP works.
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            paths = (path(a_if, b_k.public), path(b_if, a_k.public))
            self.assertNotIn(RELAY, paths, "A-B pair went back onto the relay")
            tb.ping(a_ns, "10.77.0.3", count=1)

        # UDP dies under the established session while A sends: the pair is back on the relay
        # within seconds, not WireGuard's ~20 s.
        block_udp(tb, home.router)
        started = time.monotonic()
        tb.wait_for(
            lambda: tb.ping(a_ns, "10.77.0.3", count=1) and path(a_if, b_k.public) == RELAY,
            timeout=15,
            what="A-B back on the relay",
        )
        moved = time.monotonic() - started
        log.info("figure: established A-B session back on the relay in {s:.1f} s", s=moved)
        self.assertLess(moved, 12.0)
        self.assertTrue(tb.ping(b_ns, "10.77.0.2", count=3))
