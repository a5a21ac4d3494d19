"""The stock ``wg`` tool against a running meshguard node, as it is used against wireguard-go.

meshguard (``twistd``) runs in namespace A and wireguard-go in B; every ``wg`` command runs
unchanged against meshguard's UAPI socket, and its effect is checked both in what ``wg`` reads
back and in the traffic that follows.
"""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.netns import (
    MeshguardGoPair,
    Namespace,
    Testbed,
    meshguard_config_text,
    meshguard_go_pair,
    require_root_netns,
    start_meshguard,
    two_hosts,
    wg_dump,
    wg_keypair,
    write_meshguard_config,
)


def hex_key(key: str) -> str:
    return base64.b64decode(key).hex()


def uapi_request(path: Path, request: str) -> str:
    """One raw UAPI exchange, as `wg` performs it; returns the reply text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(request.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


class WgToolTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def pair(self) -> MeshguardGoPair:
        """A meshguard/wireguard-go pair with a completed handshake."""
        hosts = two_hosts(self.tb, v6=True)
        pair = meshguard_go_pair(self.tb, hosts, initiator="both")
        self.assert_pings(hosts.a, pair.go_tun)
        return pair

    def assert_pings(self, ns: Namespace, addr: str, timeout: float = 15.0) -> None:
        self.tb.wait_for(
            lambda: self.tb.ping(ns, addr, timeout=1), timeout=timeout, what=f"ping {addr} in {ns}"
        )

    def peer_line(self, pair: MeshguardGoPair) -> list[str]:
        _, peers = wg_dump(self.tb, pair.hosts.a, pair.mg_if)
        self.assertEqual(len(peers), 1, peers)
        return peers[0]

    def test_show_dump_showconf(self) -> None:
        """`wg show`, `wg show NAME dump` and `wg showconf` report keys, port, peer, endpoint,
        allowed IPs, a recent handshake and growing counters, as they do for wireguard-go."""
        tb, pair = self.tb, self.pair()
        a = pair.hosts.a
        show = tb.wg(a, "show", pair.mg_if)
        self.assertIn(f"interface: {pair.mg_if}", show)
        self.assertIn(f"public key: {pair.mg_key.public}", show)
        self.assertIn("private key: (hidden)", show)
        self.assertIn(f"listening port: {pair.mg_port}", show)
        self.assertIn(f"peer: {pair.go_key.public}", show)
        self.assertIn(f"endpoint: {pair.hosts.b_addr}:{pair.go_port}", show)
        self.assertIn("allowed ips: 10.99.0.2/32, fd99::2/128", show)
        self.assertRegex(show, r"latest handshake: \d+ seconds? ago|latest handshake: Now")
        self.assertRegex(show, r"transfer: [\d.]+ \w*B received, [\d.]+ \w*B sent")

        iface, peers = wg_dump(tb, a, pair.mg_if)
        self.assertEqual(iface, [pair.mg_key.private, pair.mg_key.public, "51820", "off"])
        peer = peers[0]
        self.assertEqual(
            peer[:4],
            [
                pair.go_key.public,
                "(none)",
                f"{pair.hosts.b_addr}:{pair.go_port}",
                "10.99.0.2/32,fd99::2/128",
            ],
        )
        self.assertLessEqual(abs(int(peer[4]) - time.time()), 30)
        rx, tx = int(peer[5]), int(peer[6])
        self.assertEqual(peer[7], "off")
        self.assert_pings(a, pair.go_tun6)
        later = self.peer_line(pair)
        self.assertGreater(int(later[5]), rx)
        self.assertGreater(int(later[6]), tx)
        # The counters agree with the other side's view of the same session.
        _, go_peers = wg_dump(tb, pair.hosts.b, pair.go_if)
        self.assertEqual(go_peers[0][4], later[4], "both sides record the same handshake second")

        conf = tb.wg(a, "showconf", pair.mg_if)
        self.assertIn(f"PrivateKey = {pair.mg_key.private}", conf)
        self.assertIn(f"ListenPort = {pair.mg_port}", conf)
        self.assertIn(f"PublicKey = {pair.go_key.public}", conf)
        self.assertIn("AllowedIPs = 10.99.0.2/32, fd99::2/128", conf)
        self.assertIn(f"Endpoint = {pair.hosts.b_addr}:{pair.go_port}", conf)

    def test_set(self) -> None:
        """`wg set`: fwmark, persistent-keepalive, preshared-key, endpoint, allowed-ips
        (replace, +, -), listen-port with live rebinding, peer remove, private-key; each takes
        effect in what `wg` reads back and in traffic."""
        tb, pair = self.tb, self.pair()
        a, b, mg, go = pair.hosts.a, pair.hosts.b, pair.mg_if, pair.go_if
        key = pair.go_key.public

        tb.wg(a, "set", mg, "fwmark", "0x1234")
        self.assertEqual(wg_dump(tb, a, mg)[0][3], "0x1234")
        self.assert_pings(a, pair.go_tun)
        tb.wg(a, "set", mg, "fwmark", "0")
        self.assertEqual(wg_dump(tb, a, mg)[0][3], "off")

        tb.wg(a, "set", mg, "peer", key, "persistent-keepalive", "7")
        self.assertEqual(self.peer_line(pair)[7], "7")
        tb.wg(a, "set", mg, "peer", key, "persistent-keepalive", "off")
        self.assertEqual(self.peer_line(pair)[7], "off")

        # A preshared key on both sides: the next handshake must use it to succeed.
        psk = tb.wg(a, "genpsk").strip()
        tb.wg(a, "set", mg, "peer", key, "preshared-key", "/dev/stdin", input=psk + "\n")
        tb.wg(
            b,
            "set",
            go,
            "peer",
            pair.mg_key.public,
            "preshared-key",
            "/dev/stdin",
            input=psk + "\n",
        )
        self.assertEqual(self.peer_line(pair)[1], psk)

        # Endpoint: move meshguard's view of wireguard-go to its IPv6 address.
        tb.wg(a, "set", mg, "peer", key, "endpoint", f"[{pair.hosts.b_addr6}]:{pair.go_port}")
        self.assertEqual(self.peer_line(pair)[2], f"[{pair.hosts.b_addr6}]:{pair.go_port}")

        # Allowed IPs: replace, then add one and remove one. Newer wg spells this
        # `allowed-ips +NET,-NET` and sends `allowed_ip=NET` / `allowed_ip=-NET` without
        # `replace_allowed_ips`; the wg installed here (1.0.20210914) predates that syntax (and
        # its `addconf` replaces a peer's list), so then the request is sent as newer wg sends it.
        tb.wg(a, "set", mg, "peer", key, "allowed-ips", "10.99.0.2/32,fd99::2/128,10.50.0.0/16")
        self.assertEqual(self.peer_line(pair)[3], "10.99.0.2/32,fd99::2/128,10.50.0.0/16")
        if (
            "Unable to parse"
            in tb.run(
                a,
                ["wg", "set", mg, "peer", key, "allowed-ips", "+10.60.0.0/16,-10.50.0.0/16"],
                check=False,
            ).stderr
        ):
            reply = uapi_request(
                tb.uapi_socket(mg),
                f"set=1\npublic_key={hex_key(key)}\n"
                "allowed_ip=10.60.0.0/16\nallowed_ip=-10.50.0.0/16\n\n",
            )
            self.assertEqual(reply, "errno=0\n\n")
        self.assertEqual(self.peer_line(pair)[3], "10.99.0.2/32,fd99::2/128,10.60.0.0/16")

        # Listen port: the node rebinds live; wireguard-go follows the new port.
        tb.wg(a, "set", mg, "listen-port", "51830")
        self.assertEqual(wg_dump(tb, a, mg)[0][2], "51830")
        self.assertTrue(tb.listening(a, 51830, "udp"))
        self.assertFalse(tb.listening(a, 51820, "udp"))
        tb.wg(b, "set", go, "peer", pair.mg_key.public, "endpoint", f"{pair.hosts.a_addr}:51830")
        # A fresh handshake with the preshared key, over the new port and IPv6 outer endpoint.
        before = int(self.peer_line(pair)[4])
        tb.wg(a, "set", mg, "peer", key, "remove")
        self.assertEqual(wg_dump(tb, a, mg)[1], [])
        self.assertFalse(tb.ping(a, pair.go_tun, timeout=1))
        tb.wg(
            a,
            "set",
            mg,
            "peer",
            key,
            "allowed-ips",
            "10.99.0.2/32,fd99::2/128",
            "endpoint",
            f"[{pair.hosts.b_addr6}]:{pair.go_port}",
            "preshared-key",
            "/dev/stdin",
            input=psk + "\n",
        )
        self.assert_pings(a, pair.go_tun)
        self.assert_pings(b, pair.mg_tun6)
        peer = self.peer_line(pair)
        self.assertGreaterEqual(int(peer[4]), before)
        self.assertNotEqual(peer[4], "0")
        _, go_peers = wg_dump(tb, b, go)
        self.assertEqual(go_peers[0][2], f"[{pair.hosts.a_addr6}]:51830")

        # A new private key: the public key follows; the old peer no longer knows us.
        new = wg_keypair()
        tb.wg(a, "set", mg, "private-key", "/dev/stdin", input=new.private + "\n")
        iface, _ = wg_dump(tb, a, mg)
        self.assertEqual(iface[:2], [new.private, new.public])
        self.assertEqual(tb.wg(a, "show", mg, "public-key").strip(), new.public)

    def test_setconf_addconf_syncconf(self) -> None:
        """`wg syncconf` with the running config keeps the session (same handshake time,
        counters keep growing); syncconf adds and removes peers; `wg addconf` appends;
        `wg setconf` replaces everything, as with wireguard-go."""
        tb, pair = self.tb, self.pair()
        a, mg = pair.hosts.a, pair.mg_if
        conf = tb.log_dir / "running.conf"
        conf.write_text(tb.wg(a, "showconf", mg))
        before = self.peer_line(pair)
        tb.wg(a, "syncconf", mg, str(conf))
        after = self.peer_line(pair)
        self.assertEqual(after[4], before[4], "syncconf must not drop the session")
        self.assertGreaterEqual(int(after[5]), int(before[5]))
        self.assertTrue(tb.ping(a, pair.go_tun, timeout=2))
        self.assertEqual(self.peer_line(pair)[4], before[4])
        self.assertGreater(int(self.peer_line(pair)[6]), int(before[6]))

        extra1, extra2 = wg_keypair(), wg_keypair()
        conf.write_text(
            tb.wg(a, "showconf", mg)
            + f"\n[Peer]\nPublicKey = {extra1.public}\nAllowedIPs = 10.70.0.0/16\n"
        )
        tb.wg(a, "syncconf", mg, str(conf))
        _, peers = wg_dump(tb, a, mg)
        self.assertEqual({p[0] for p in peers}, {pair.go_key.public, extra1.public})
        self.assertEqual(self.handshake_of(a, mg, pair.go_key.public), before[4])

        add = tb.log_dir / "add.conf"
        add.write_text(f"[Peer]\nPublicKey = {extra2.public}\nAllowedIPs = 10.71.0.0/16\n")
        tb.wg(a, "addconf", mg, str(add))
        _, peers = wg_dump(tb, a, mg)
        self.assertEqual(len(peers), 3)
        self.assertEqual(self.handshake_of(a, mg, pair.go_key.public), before[4])

        # syncconf back to the original: the two extras go, the live session stays.
        original = tb.log_dir / "original.conf"
        original.write_text(self.showconf_without(a, mg, {extra1.public, extra2.public}))
        tb.wg(a, "syncconf", mg, str(original))
        _, peers = wg_dump(tb, a, mg)
        self.assertEqual([p[0] for p in peers], [pair.go_key.public])
        self.assertEqual(peers[0][4], before[4])

        # setconf replaces all peers: the session starts over, as with wireguard-go.
        tb.wg(a, "setconf", mg, str(original))
        self.assertEqual(self.peer_line(pair)[4], "0")
        self.assert_pings(a, pair.go_tun)
        self.assertNotEqual(self.peer_line(pair)[4], "0")

    def handshake_of(self, ns: Namespace, ifname: str, public: str) -> str:
        _, peers = wg_dump(self.tb, ns, ifname)
        return next(p[4] for p in peers if p[0] == public)

    def showconf_without(self, ns: Namespace, ifname: str, drop: set[str]) -> str:
        """`wg showconf` minus the [Peer] sections of the keys in ``drop``."""
        sections = self.tb.wg(ns, "showconf", ifname).split("\n[Peer]\n")
        kept = [sections[0]]
        for section in sections[1:]:
            if not any(f"PublicKey = {key}" in section for key in drop):
                kept.append(section)
        return "\n[Peer]\n".join(kept)

    def test_peer_added_live_carries_traffic(self) -> None:
        """A node started with no peers gets one with `wg set`; ping and 10 MB flow through."""
        tb = self.tb
        hosts = two_hosts(tb)
        mg_key, go_key = wg_keypair(), wg_keypair()
        mg_if, go_if = tb.ifname("mg"), tb.ifname("go")
        text = meshguard_config_text(mg_key.private, listen_port=51820, addresses=("10.99.0.1/24",))
        start_meshguard(
            tb, hosts.a, write_meshguard_config(tb.log_dir / f"{mg_if}.conf", text), mg_if
        )
        self.assertEqual(wg_dump(tb, hosts.a, mg_if)[1], [])
        tb.start_wireguard_go(hosts.b, go_if)
        tb.wg_set_interface(hosts.b, go_if, go_key.private, 51821)
        tb.wg_set_peer(hosts.b, go_if, mg_key.public, allowed_ips=("10.99.0.1/32",))
        tb.addr(hosts.b, go_if, "10.99.0.2/24")
        tb.up(hosts.b, go_if)
        tb.wg_set_peer(
            hosts.a,
            mg_if,
            go_key.public,
            allowed_ips=("10.99.0.2/32",),
            endpoint=f"{hosts.b_addr}:51821",
        )
        self.assert_pings(hosts.a, "10.99.0.2")
        self.assertTrue(tb.tcp_transfer(hosts.b, hosts.a, "10.99.0.2", 10_000_000, timeout=30))
        self.assertTrue(tb.tcp_transfer(hosts.a, hosts.b, "10.99.0.1", 10_000_000, timeout=30))

    def test_setconf_100k_allowed_ips(self) -> None:
        """`wg setconf` with 100,000+ allowed IPs over 4 peers is applied, and listed back
        by `wg show allowed-ips`, within seconds (the measured times are printed)."""
        tb = self.tb
        ns = tb.netns("big")
        mg_key = wg_keypair()
        mg_if = tb.ifname("big")
        text = meshguard_config_text(mg_key.private, listen_port=51820)
        start_meshguard(tb, ns, write_meshguard_config(tb.log_dir / f"{mg_if}.conf", text), mg_if)
        peers = [wg_keypair().public for _ in range(4)]
        lines = [f"[Interface]\nPrivateKey = {mg_key.private}\nListenPort = 51820\n"]
        expected: dict[str, int] = {}
        for i, key in enumerate(peers):
            v4 = [f"10.{i}.{n >> 8}.{n & 255}/32" for n in range(24_000)]
            v6 = [f"fd00:{i}::{n:x}/128" for n in range(1_500)]
            lines.append(f"[Peer]\nPublicKey = {key}\nAllowedIPs = {', '.join(v4 + v6)}\n")
            expected[key] = len(v4) + len(v6)
        big = tb.log_dir / "big.conf"
        big.write_text("\n".join(lines))
        self.assertGreaterEqual(sum(expected.values()), 100_000)

        started = time.monotonic()
        tb.run(ns, ["wg", "setconf", mg_if, str(big)], timeout=120)
        applied = time.monotonic() - started
        started = time.monotonic()
        listing = tb.run(ns, ["wg", "show", mg_if, "allowed-ips"], timeout=120).stdout
        listed = time.monotonic() - started
        counts = {
            line.split("\t")[0]: len(line.split("\t")[1].split()) for line in listing.splitlines()
        }
        self.assertEqual(counts, expected)
        Path(tb.log_dir / "timing.txt").write_text(
            f"setconf {applied:.2f} s, show {listed:.2f} s\n"
        )
        print(
            f"\n  setconf of {sum(expected.values())} allowed IPs: {applied:.2f} s, "
            f"listed back in {listed:.2f} s"
        )
        self.assertLess(applied, 20.0)
        self.assertLess(listed, 20.0)
