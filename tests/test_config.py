"""Tests for meshguard.codecs.config: the wg-quick superset parser, its errors and its UAPI
rendering."""

from __future__ import annotations

import base64
import ipaddress
import os
import tempfile
from ipaddress import IPv4Network, IPv6Network

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.codecs import keys
from meshguard.codecs.config import (
    INTERFACE_KEYS,
    PEER_KEYS,
    Config,
    ConfigError,
    InterfaceConfig,
    PeerConfig,
    load_config,
    parse_config,
    to_uapi_set,
)

PRIVATE = keys.clamp(bytes(range(32)))
PRIVATE_B64 = keys.key_to_base64(PRIVATE)
PUBLIC_B64 = keys.key_to_base64(keys.pubkey(PRIVATE))
PEER1 = keys.pubkey(keys.clamp(bytes(range(1, 33))))
PEER1_B64 = keys.key_to_base64(PEER1)
PEER2 = keys.pubkey(keys.clamp(bytes(range(2, 34))))
PEER2_B64 = keys.key_to_base64(PEER2)
PSK = bytes(range(100, 132))
PSK_B64 = keys.key_to_base64(PSK)

WG_QUICK_FILE = f"""\
# A wg-quick file as people write them.
[Interface]
PrivateKey = {PRIVATE_B64}
ListenPort = 51820
Address = 10.0.0.1/24, fd00::1/64
DNS = 1.1.1.1, example.lan
MTU = 1420
Table = off
FwMark = 0x1234
SaveConfig = false
PostUp = iptables -A FORWARD -i %i -j ACCEPT; echo up  # a comment
PostDown = iptables -D FORWARD -i %i -j ACCEPT

[Peer]
PublicKey = {PEER1_B64}
PresharedKey = {PSK_B64}
AllowedIPs = 10.0.0.2/32, fd00::2/128
AllowedIPs = 192.168.10.0/24
Endpoint = [2001:db8::1]:51820
PersistentKeepalive = 25

[Peer]
PublicKey = {PEER2_B64}
AllowedIPs = 10.0.0.3
Endpoint = vpn.example.com:4500
"""


def interface(*lines: str, peers: str = "") -> str:
    """A file with a valid [Interface] holding the given extra lines, then `peers`."""
    body = "\n".join(lines)
    return f"[Interface]\nPrivateKey = {PRIVATE_B64}\n{body}\n{peers}"


def peer(*lines: str, key: str = PEER1_B64) -> str:
    body = "\n".join(lines)
    return f"[Peer]\nPublicKey = {key}\n{body}\n"


class ParseWgQuickTests(SynchronousTestCase):
    """An existing wg-quick file parses unchanged into every field."""

    def setUp(self) -> None:
        self.config = parse_config(WG_QUICK_FILE, "mg0.conf")

    def test_interface(self) -> None:
        """Every [Interface] key lands in its field, DNS and SaveConfig are dropped."""
        self.assertEqual(
            self.config.interface,
            InterfaceConfig(
                private_key=PRIVATE,
                listen_port=51820,
                addresses=[
                    ipaddress.IPv4Interface("10.0.0.1/24"),
                    ipaddress.IPv6Interface("fd00::1/64"),
                ],
                mtu=1420,
                mtu_auto=False,
                table="off",
                fwmark=0x1234,
                forwarding=True,
                post_up=["iptables -A FORWARD -i %i -j ACCEPT; echo up"],
                post_down=["iptables -D FORWARD -i %i -j ACCEPT"],
            ),
        )

    def test_peers(self) -> None:
        """Peers keep file order, repeated AllowedIPs append, bare IPs become host routes."""
        self.assertEqual(
            self.config.peers,
            [
                PeerConfig(
                    public_key=PEER1,
                    preshared_key=PSK,
                    allowed_ips=[
                        IPv4Network("10.0.0.2/32"),
                        IPv6Network("fd00::2/128"),
                        IPv4Network("192.168.10.0/24"),
                    ],
                    endpoint=("2001:db8::1", 51820),
                    persistent_keepalive=25,
                    line=14,
                ),
                PeerConfig(
                    public_key=PEER2,
                    allowed_ips=[IPv4Network("10.0.0.3/32")],
                    endpoint=("vpn.example.com", 4500),
                    line=22,
                ),
            ],
        )

    def test_warnings(self) -> None:
        """DNS and SaveConfig are accepted with a warning naming their line."""
        self.assertEqual(len(self.config.warnings), 2)
        self.assertTrue(self.config.warnings[0].startswith("mg0.conf:6: DNS is ignored"))
        self.assertTrue(self.config.warnings[1].startswith("mg0.conf:10: SaveConfig is ignored"))

    def test_repr_hides_secrets(self) -> None:
        """Printing or logging a Config never shows the private or preshared key."""
        text = repr(self.config)
        for secret in (PRIVATE, PSK):
            self.assertNotIn(repr(secret), text)
            self.assertNotIn(keys.key_to_base64(secret), text)


class SyntaxTests(SynchronousTestCase):
    """The wg(8) line syntax."""

    def test_whitespace_everywhere(self) -> None:
        """All whitespace inside a line is removed, as wg does."""
        text = f"  [ Inter face ]\n Private Key = {PRIVATE_B64[:10]} {PRIVATE_B64[10:]}\n"
        text += f"[Peer]\nPublicKey={PEER1_B64}\nAllowed IPs = 10.0.0.0 / 8 ,\tfd00:: / 8\r\n"
        config = parse_config(text)
        self.assertEqual(config.interface.private_key, PRIVATE)
        self.assertEqual(
            config.peers[0].allowed_ips, [IPv4Network("10.0.0.0/8"), IPv6Network("fd00::/8")]
        )

    def test_case_insensitive_names(self) -> None:
        """Section and key names match in any case."""
        config = parse_config(
            f"[INTERFACE]\nprivatekey={PRIVATE_B64}\nLISTENPORT=1\n[peer]\npublickey={PEER1_B64}\n"
        )
        self.assertEqual(config.interface.listen_port, 1)
        self.assertEqual(len(config.peers), 1)

    def test_comments(self) -> None:
        """`#` starts a comment anywhere on a line; blank and comment-only lines are skipped."""
        config = parse_config(
            interface("# ListenPort = 1", "ListenPort = 2 # = 3", "", "   # x", "#[Peer]")
        )
        self.assertEqual(config.interface.listen_port, 2)
        self.assertEqual(config.peers, [])

    def test_shell_hooks_keep_inner_whitespace(self) -> None:
        """PreUp and friends are shell snippets: trimmed, inner spaces kept, repeats appended."""
        config = parse_config(
            interface(
                "PreUp =   ip link set %i  up  ",
                "PreUp = true",
                "PreDown = a",
                "PostDown=b",
                "PostUp=",
            )
        )
        self.assertEqual(config.interface.pre_up, ["ip link set %i  up", "true"])
        self.assertEqual(config.interface.pre_down, ["a"])
        self.assertEqual(config.interface.post_down, ["b"])
        self.assertEqual(config.interface.post_up, [""])

    def test_no_interface_section(self) -> None:
        """A file with only peers is valid (like `wg setconf`) but warns about the identity."""
        config = parse_config(peer(), "x.conf")
        self.assertEqual(config.interface, InterfaceConfig())
        self.assertEqual(len(config.peers), 1)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("x.conf: no PrivateKey in [Interface]", config.warnings[0])

    def test_missing_private_key_warns(self) -> None:
        """No PrivateKey is allowed (the node runs without identity) with a warning."""
        config = parse_config("\n[Interface]\nListenPort=1\n", "x.conf")
        self.assertIsNone(config.interface.private_key)
        self.assertEqual(len(config.warnings), 1)
        self.assertTrue(config.warnings[0].startswith("x.conf:2: no PrivateKey"))

    def test_second_interface_section_merges(self) -> None:
        """A second [Interface] adds to the first, with a warning."""
        config = parse_config(interface(peers="[Interface]\nListenPort = 7\n"), "x.conf")
        self.assertEqual(config.interface.listen_port, 7)
        self.assertEqual(config.interface.private_key, PRIVATE)
        self.assertTrue(any("second [Interface]" in w for w in config.warnings))

    def test_repeated_key_replaces_with_warning(self) -> None:
        """A single-valued key given twice keeps the last value, as wg does, and warns."""
        config = parse_config(interface("ListenPort = 1", "ListenPort = 2"), "x.conf")
        self.assertEqual(config.interface.listen_port, 2)
        self.assertIn("x.conf:4: ListenPort is set again; this replaces line 3", config.warnings)

    def test_key_tables_are_lowercase_registries(self) -> None:
        """The key registries map lowercase names; mesh keys are present."""
        for table in (INTERFACE_KEYS, PEER_KEYS):
            for name in table:
                self.assertEqual(name, name.lower())
        self.assertIn("forwarding", INTERFACE_KEYS)
        self.assertIn("introducer", PEER_KEYS)


class InterfaceValueTests(SynchronousTestCase):
    """Accepted and rejected values of each [Interface] key."""

    def parse_interface(self, *lines: str) -> InterfaceConfig:
        return parse_config(interface(*lines)).interface

    def assertRejected(self, line: str, fragment: str) -> ConfigError:
        error: ConfigError = self.assertRaises(
            ConfigError, parse_config, interface(line), "mg0.conf"
        )
        self.assertEqual(error.line, 3)
        self.assertTrue(str(error).startswith("mg0.conf:3: "), str(error))
        self.assertIn(fragment, str(error))
        return error

    def test_listen_port(self) -> None:
        """ListenPort is 0..65535; absent is None (random)."""
        self.assertIsNone(self.parse_interface().listen_port)
        self.assertEqual(self.parse_interface("ListenPort=0").listen_port, 0)
        self.assertEqual(self.parse_interface("ListenPort=65535").listen_port, 65535)
        for bad in ("65536", "-1", "x", "1.5", "0x10", "99999999999999999999"):
            self.assertRejected(f"ListenPort = {bad}", "ListenPort")

    def test_address(self) -> None:
        """Address: comma list, may repeat, bare IPs become /32 or /128, host bits kept."""
        config = self.parse_interface("Address = 10.1.2.3/24,fd00::5", "Address = 10.9.9.9")
        self.assertEqual(
            config.addresses,
            [
                ipaddress.IPv4Interface("10.1.2.3/24"),
                ipaddress.IPv6Interface("fd00::5/128"),
                ipaddress.IPv4Interface("10.9.9.9/32"),
            ],
        )
        for bad in ("10.0.0.1/33", "10.0.0.1/255.0.0.0", "fe80::1%eth0", "10.0.0.1,", "nope"):
            self.assertRejected(f"Address = {bad}", "Address")

    def test_mtu(self) -> None:
        """MTU: absent or `auto` give None; `auto` sets mtu_auto; 576 up for IPv4 only."""
        absent = self.parse_interface()
        self.assertEqual((absent.mtu, absent.mtu_auto), (None, False))
        auto = self.parse_interface("MTU = Auto")
        self.assertEqual((auto.mtu, auto.mtu_auto), (None, True))
        self.assertEqual(self.parse_interface("MTU=576").mtu, 576)
        self.assertEqual(self.parse_interface("MTU=65455").mtu, 65455)
        for bad in ("575", "65456", "big"):
            self.assertRejected(f"MTU = {bad}", "MTU")

    def test_mtu_ipv6_minimum(self) -> None:
        """With an IPv6 Address the MTU must be at least 1280; the error names the MTU line."""
        self.assertEqual(self.parse_interface("MTU=1280", "Address=fd00::1/64").mtu, 1280)
        error = self.assertRaises(
            ConfigError,
            parse_config,
            interface("Address = 10.0.0.1/24", "MTU = 1279", "Address = fd00::1/64"),
            "mg0.conf",
        )
        self.assertEqual(error.line, 4)
        self.assertIn("1280", str(error))

    def test_table(self) -> None:
        """Table: auto (default), off, a number or a table name."""
        self.assertEqual(self.parse_interface().table, "auto")
        self.assertEqual(self.parse_interface("Table = OFF").table, "off")
        self.assertEqual(self.parse_interface("Table = 1234").table, "1234")
        self.assertEqual(self.parse_interface("Table = main").table, "main")
        for bad in ("4294967296", "-1", "a/b"):
            self.assertRejected(f"Table = {bad}", "Table")

    def test_fwmark(self) -> None:
        """FwMark: 0, off, decimal or 0x hex, 32 bits."""
        self.assertEqual(self.parse_interface().fwmark, 0)
        self.assertEqual(self.parse_interface("FwMark = off").fwmark, 0)
        self.assertEqual(self.parse_interface("FwMark = 51820").fwmark, 51820)
        self.assertEqual(self.parse_interface("FwMark = 0xCA6C").fwmark, 0xCA6C)
        self.assertEqual(self.parse_interface("FwMark = 4294967295").fwmark, 0xFFFFFFFF)
        for bad in ("4294967296", "0x100000000", "0x", "mark"):
            self.assertRejected(f"FwMark = {bad}", "FwMark")

    def test_forwarding(self) -> None:
        """Forwarding: yes/no (and true/false, on/off), default yes."""
        self.assertTrue(self.parse_interface().forwarding)
        self.assertFalse(self.parse_interface("Forwarding = no").forwarding)
        self.assertFalse(self.parse_interface("Forwarding = OFF").forwarding)
        self.assertTrue(self.parse_interface("Forwarding = Yes").forwarding)
        self.assertRejected("Forwarding = maybe", "Forwarding")

    def test_forwarding_rate(self) -> None:
        """ForwardingRate: MiB/s per sending peer (default 64), or unlimited."""
        self.assertEqual(self.parse_interface().forwarding_rate, 64 * 1024 * 1024)
        self.assertEqual(self.parse_interface("ForwardingRate = 8").forwarding_rate, 8 * 2**20)
        self.assertIsNone(self.parse_interface("ForwardingRate = unlimited").forwarding_rate)
        for bad in ("0", "-1", "fast", "100001"):
            self.assertRejected(f"ForwardingRate = {bad}", "ForwardingRate")

    def test_empty_value(self) -> None:
        """A key that needs a value says so."""
        self.assertRejected("ListenPort =", "ListenPort in [Interface] has no value")

    def test_bad_private_key_message(self) -> None:
        """A bad PrivateKey gets the exact advice and no part of the value."""
        secret = PRIVATE_B64[:-1]
        error = self.assertRaises(
            ConfigError, parse_config, f"[Interface]\n\nPrivateKey = {secret}\n", "mg0.conf"
        )
        self.assertEqual(
            str(error),
            "mg0.conf:3: PrivateKey is not a base64 WireGuard key (44 characters ending in '='); "
            "generate one with 'meshguard genkey'",
        )

    def test_private_key_rejects_noncanonical_base64(self) -> None:
        """Like wg, a last character with stray low bits is not a key."""
        self.assertRejected(f"PrivateKey = {PRIVATE_B64[:42]}B=", "PrivateKey")

    def test_private_key_and_file_conflict(self) -> None:
        """PrivateKey and PrivateKeyFile in one file is an error, not a silent choice."""
        error = self.assertRaises(
            ConfigError,
            parse_config,
            interface("PrivateKeyFile = k"),
            "mg0.conf",
            read_secret=lambda path: PRIVATE_B64,
        )
        self.assertIn("PrivateKeyFile and PrivateKey (line 2)", str(error))


class PrivateKeyFileTests(SynchronousTestCase):
    """PrivateKeyFile and PresharedKeyFile read a base64 key from a file."""

    def test_relative_to_config_directory(self) -> None:
        """A relative path is read next to the config file."""
        seen: list[str] = []

        def read(path: str) -> str:
            seen.append(path)
            return PRIVATE_B64 + "\n"

        config = parse_config(
            "[Interface]\nPrivateKeyFile = mg0.key\n", "/etc/meshguard/mg0.conf", read_secret=read
        )
        self.assertEqual(config.interface.private_key, PRIVATE)
        self.assertEqual(seen, ["/etc/meshguard/mg0.key"])

    def test_real_files(self) -> None:
        """load_config reads key files from disk, absolute or relative."""
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "mg0.key"), "w") as f:
                f.write(PRIVATE_B64 + "\n")
            with open(os.path.join(directory, "psk"), "w") as f:
                f.write(PSK_B64)
            conf = os.path.join(directory, "mg0.conf")
            with open(conf, "w") as f:
                f.write(
                    "[Interface]\nPrivateKeyFile = mg0.key\n"
                    f"[Peer]\nPublicKey = {PEER1_B64}\n"
                    f"PresharedKeyFile = {os.path.join(directory, 'psk')}\n"
                )
            config = load_config(conf)
        self.assertEqual(config.interface.private_key, PRIVATE)
        self.assertEqual(config.peers[0].preshared_key, PSK)

    def test_unreadable(self) -> None:
        """A missing key file names the path and the reason."""

        def read(path: str) -> str:
            raise FileNotFoundError(2, "No such file or directory")

        error = self.assertRaises(
            ConfigError,
            parse_config,
            "[Interface]\nPrivateKeyFile = /k\n",
            "mg0.conf",
            read_secret=read,
        )
        self.assertEqual(
            str(error), "mg0.conf:2: cannot read PrivateKeyFile '/k': No such file or directory"
        )

    def test_bad_contents_not_echoed(self) -> None:
        """A key file that holds no key is an error that does not show the contents."""
        secret = "x" + PRIVATE_B64[1:-1]
        error = self.assertRaises(
            ConfigError,
            parse_config,
            "[Interface]\nPrivateKeyFile = /k\n",
            "mg0.conf",
            read_secret=lambda path: secret,
        )
        self.assertIn("does not hold a base64 WireGuard key", str(error))
        self.assertNotIn(secret, str(error))


class PeerValueTests(SynchronousTestCase):
    """Accepted and rejected values of each [Peer] key."""

    def parse_peer(self, *lines: str) -> PeerConfig:
        return parse_config(interface(peers=peer(*lines))).peers[0]

    def parse_peer_warnings(self, *lines: str) -> list[str]:
        return parse_config(interface(peers=peer(*lines)), "mg0.conf").warnings

    def assertRejected(self, line: str, fragment: str) -> ConfigError:
        error: ConfigError = self.assertRaises(
            ConfigError, parse_config, interface(peers=peer(line)), "mg0.conf"
        )
        self.assertEqual(error.line, 6, str(error))
        self.assertIn(fragment, str(error))
        return error

    def test_defaults(self) -> None:
        """A peer with only a PublicKey: no PSK, no routes, no endpoint, no keepalive."""
        self.assertEqual(self.parse_peer(), PeerConfig(public_key=PEER1, line=4))

    def test_allowed_ips(self) -> None:
        """AllowedIPs may be empty, repeat, and a '+' prefix is accepted."""
        self.assertEqual(self.parse_peer("AllowedIPs =").allowed_ips, [])
        self.assertEqual(
            self.parse_peer("AllowedIPs = 0.0.0.0/0, ::/0", "AllowedIPs = +10.0.0.0/8").allowed_ips,
            [IPv4Network("0.0.0.0/0"), IPv6Network("::/0"), IPv4Network("10.0.0.0/8")],
        )
        for bad in ("10.0.0.0/33", "-10.0.0.0/8", "10.0.0.0/8,,", "fe80::/64%eth0", "::1/129"):
            self.assertRejected(f"AllowedIPs = {bad}", "AllowedIPs")

    def test_allowed_ips_host_bits(self) -> None:
        """Host bits are masked off with a warning that names the line."""
        self.assertEqual(
            self.parse_peer("AllowedIPs = 10.0.0.5/24").allowed_ips, [IPv4Network("10.0.0.0/24")]
        )
        self.assertEqual(
            self.parse_peer_warnings("AllowedIPs = 10.0.0.5/24"),
            ["mg0.conf:6: AllowedIPs entry 10.0.0.5/24 has host bits set; using 10.0.0.0/24"],
        )

    def test_overlapping_allowed_ips_warn(self) -> None:
        """Two peers claiming one prefix parse, with a warning: the later peer takes it."""
        config = parse_config(
            interface(
                peers=peer("AllowedIPs = 10.0.0.0/24")
                + peer("AllowedIPs = 10.0.0.0/24", key=PEER2_B64)
            ),
            "mg0.conf",
        )
        self.assertEqual(len(config.peers), 2)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("also given to the peer on line 4", config.warnings[0])

    def test_endpoint(self) -> None:
        """Endpoint keeps the host string (IP or DNS name) and an int port; nothing resolves."""
        cases = {
            "192.0.2.1:51820": ("192.0.2.1", 51820),
            "[2001:db8::1]:1": ("2001:db8::1", 1),
            "[fe80::1%eth0]:51820": ("fe80::1%eth0", 51820),
            "vpn.example.com:65535": ("vpn.example.com", 65535),
            "host_1.example.:9": ("host_1.example.", 9),
            "localhost:9": ("localhost", 9),
        }
        for text, expected in cases.items():
            self.assertEqual(self.parse_peer(f"Endpoint = {text}").endpoint, expected, text)

    def test_endpoint_unbracketed_ipv6(self) -> None:
        """An unbracketed IPv6 endpoint parses like wg (last colon is the port) with a warning."""
        self.assertEqual(
            self.parse_peer("Endpoint = 2001:db8::1:51820").endpoint, ("2001:db8::1", 51820)
        )
        self.assertEqual(len(self.parse_peer_warnings("Endpoint = 2001:db8::1:51820")), 1)

    def test_endpoint_errors(self) -> None:
        """Malformed endpoints are errors that say how to write one."""
        for bad in (
            "192.0.2.1",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "[2001:db8::1]51820",
            "[2001:db8::1]:",
            "[nothost]:1",
            ":51820",
            "bad..name:1",
            "1.2.3:1",
            "-x.example:1",
        ):
            self.assertRejected(f"Endpoint = {bad}", "Endpoint")

    def test_persistent_keepalive(self) -> None:
        """PersistentKeepalive: 0, off, or 1..65535."""
        self.assertEqual(self.parse_peer("PersistentKeepalive = 25").persistent_keepalive, 25)
        self.assertEqual(self.parse_peer("PersistentKeepalive = Off").persistent_keepalive, 0)
        self.assertEqual(self.parse_peer("PersistentKeepalive = 0").persistent_keepalive, 0)
        for bad in ("65536", "-1", "on"):
            self.assertRejected(f"PersistentKeepalive = {bad}", "PersistentKeepalive")

    def test_preshared_key(self) -> None:
        """PresharedKey is a base64 key; all zeros means none, as in wg."""
        self.assertEqual(self.parse_peer(f"PresharedKey = {PSK_B64}").preshared_key, PSK)
        zeros = keys.key_to_base64(bytes(32))
        self.assertIsNone(self.parse_peer(f"PresharedKey = {zeros}").preshared_key)
        error = self.assertRejected(f"PresharedKey = {PSK_B64[1:]}", "meshguard genpsk")
        self.assertNotIn(PSK_B64[1:], str(error))

    def test_introducer(self) -> None:
        """Introducer: yes/no, default no."""
        self.assertFalse(self.parse_peer().introducer)
        self.assertTrue(self.parse_peer("Introducer = yes").introducer)
        self.assertRejected("Introducer = 2", "Introducer")


class ErrorTests(SynchronousTestCase):
    """File-level errors: one line, PATH:LINE, what is wrong and what to do."""

    def assertError(self, text: str, expected: str) -> None:
        error = self.assertRaises(ConfigError, parse_config, text, "mg0.conf")
        self.assertEqual(str(error), expected)

    def test_unknown_key(self) -> None:
        """An unknown key names itself, the section and the line."""
        error = self.assertRaises(
            ConfigError, parse_config, interface(peers=peer("Foo = 1")), "mg0.conf"
        )
        self.assertTrue(str(error).startswith("mg0.conf:6: unknown key 'Foo' in [Peer]"))

    def test_key_in_wrong_section(self) -> None:
        """A known key in the other section says where it belongs."""
        error = self.assertRaises(
            ConfigError, parse_config, interface(peers=peer("ListenPort = 1")), "mg0.conf"
        )
        self.assertEqual(
            str(error),
            "mg0.conf:6: unknown key 'ListenPort' in [Peer]; it belongs in [Interface]",
        )

    def test_unknown_section(self) -> None:
        self.assertError(
            "[Interface]\n[Mash]\n",
            "mg0.conf:2: unknown section '[Mash]'; expected [Interface] or [Peer]",
        )

    def test_malformed_lines(self) -> None:
        self.assertError(
            "[Interface\n", "mg0.conf:1: a section header must look like [Interface] or [Peer]"
        )
        self.assertError(
            "[Interface]\nListenPort\n",
            "mg0.conf:2: expected 'Key = Value' or a [Section] header",
        )
        self.assertError(
            "[Interface]\n= 5\n", "mg0.conf:2: expected 'Key = Value' or a [Section] header"
        )

    def test_key_outside_section(self) -> None:
        self.assertError(
            "ListenPort = 1\n",
            "mg0.conf:1: key 'ListenPort' is outside a section; put it under [Interface] or [Peer]",
        )

    def test_peer_without_public_key(self) -> None:
        self.assertError(
            interface(peers="[Peer]\nAllowedIPs = 10.0.0.0/8\n"),
            "mg0.conf:4: [Peer] has no PublicKey; add 'PublicKey = <base64 key>'",
        )

    def test_duplicate_peer_names_both_lines(self) -> None:
        self.assertError(
            interface(peers=peer() + peer()),
            "mg0.conf:8: duplicate peer: this PublicKey is also on line 5; "
            "merge the two [Peer] sections",
        )

    def test_own_public_key(self) -> None:
        error = self.assertRaises(
            ConfigError, parse_config, interface(peers=peer(key=PUBLIC_B64)), "mg0.conf"
        )
        self.assertTrue(str(error).startswith("mg0.conf:5: PublicKey is this node's own"))

    def test_missing_file(self) -> None:
        """A missing file is an error naming the path."""
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "nope.conf")
            error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read config file: No such file or directory")
        self.assertIsNone(error.line)

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are an error naming the line."""
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "mg0.conf")
            with open(path, "wb") as f:
                f.write(b"[Interface]\n\n# caf\xe9\n")
            error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}:3: this line is not UTF-8 text")

    def test_world_readable_key_warns(self) -> None:
        """A file holding a key that others can read loads, with a chmod hint."""
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "mg0.conf")
            with open(path, "w") as f:
                f.write(interface())
            os.chmod(path, 0o644)
            loose = load_config(path)
            os.chmod(path, 0o600)
            tight = load_config(path)
        self.assertEqual(
            loose.warnings, [f"{path}: holds a key and is world accessible; run 'chmod 600 {path}'"]
        )
        self.assertEqual(tight.warnings, [])

    def test_key_in_a_key_file_does_not_warn(self) -> None:
        """With PrivateKeyFile the config itself holds no secret: no chmod hint for it."""
        with tempfile.TemporaryDirectory() as directory:
            key_path = os.path.join(directory, "mg0.key")
            with open(key_path, "w") as f:
                f.write(base64.b64encode(bytes(range(1, 33))).decode() + "\n")
            os.chmod(key_path, 0o600)
            path = os.path.join(directory, "mg0.conf")
            with open(path, "w") as f:
                f.write("[Interface]\nPrivateKeyFile = mg0.key\n")
            os.chmod(path, 0o644)
            config = load_config(path)
        self.assertIsNotNone(config.interface.private_key)
        self.assertEqual(config.warnings, [])


class SecretLeakTests(SynchronousTestCase):
    """No error message or warning contains key material, wherever the key is misplaced."""

    @settings(max_examples=200, deadline=None)
    @given(
        secret=st.binary(min_size=32, max_size=32),
        template=st.sampled_from(
            [
                "[Interface]\nPrivateKey = {b}x\n",
                "[Interface]\nPrivateKey = {b}\nListenPort = {b}\n",
                "[Interface]\nPrivateKey = {b}\nMTU = {b}\n",
                "[Interface]\nPrivateKey = {b}\nPrivatKey = {b}\n",
                "[Interface]\nPrivateKey = {b}\n[Peer]\nPublicKey = {b}\n",
                "[Interface]\nPrivateKey = {b}\nAddress = {b}\n",
                "[Interface]\nTable = {h}\n",
                "[Peer]\nPublicKey = {b}\nPresharedKey = {h}\n",
                "[Peer]\nPublicKey = {b}\nEndpoint = {b}\n",
                "[Peer]\nPublicKey = {b}\nEndpoint = {h}:1\n",
                "[Peer]\nPublicKey = {b}\nAllowedIPs = {b}\n",
                "[Peer]\n{b} = 1\n",
                "[{b}]\n",
                "{b}\n",
            ]
        ),
    )
    def test_no_secret_in_messages(self, secret: bytes, template: str) -> None:
        b64 = keys.key_to_base64(secret)
        hexed = keys.key_to_hex(secret)
        text = template.format(b=b64, h=hexed)
        try:
            messages = parse_config(text, "mg0.conf").warnings
        except ConfigError as e:
            messages = [str(e)]
        for message in messages:
            self.assertNotIn(b64.rstrip("="), message)
            self.assertNotIn(hexed, message)


def render(config: Config) -> str:
    """Write a Config back as a file (the tests' reference printer)."""
    iface = config.interface
    out = ["[Interface]"]
    if iface.private_key is not None:
        out.append(f"PrivateKey = {keys.key_to_base64(iface.private_key)}")
    if iface.listen_port is not None:
        out.append(f"ListenPort = {iface.listen_port}")
    out.extend(f"Address = {a}" for a in iface.addresses)
    if iface.mtu_auto:
        out.append("MTU = auto")
    elif iface.mtu is not None:
        out.append(f"MTU = {iface.mtu}")
    out.append(f"Table = {iface.table}")
    out.append(f"FwMark = {hex(iface.fwmark)}")
    out.append(f"Forwarding = {'yes' if iface.forwarding else 'no'}")
    for key, hooks in (
        ("PreUp", iface.pre_up),
        ("PostUp", iface.post_up),
        ("PreDown", iface.pre_down),
        ("PostDown", iface.post_down),
    ):
        out.extend(f"{key} = {hook}" for hook in hooks)
    for p in config.peers:
        out.append("[Peer]")
        out.append(f"PublicKey = {keys.key_to_base64(p.public_key)}")
        if p.preshared_key is not None:
            out.append(f"PresharedKey = {keys.key_to_base64(p.preshared_key)}")
        out.append(f"AllowedIPs = {', '.join(str(n) for n in p.allowed_ips)}")
        if p.endpoint is not None:
            host, port = p.endpoint
            out.append(f"Endpoint = {f'[{host}]' if ':' in host else host}:{port}")
        out.append(f"PersistentKeepalive = {p.persistent_keepalive}")
        out.append(f"Introducer = {'yes' if p.introducer else 'no'}")
    return "\n".join(out) + "\n"


keys32 = st.binary(min_size=32, max_size=32)
networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)
interfaces = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_interface((a, p)), st.ip_addresses(v=4), st.integers(0, 32)
    ),
    st.builds(
        lambda a, p: ipaddress.ip_interface((a, p)), st.ip_addresses(v=6), st.integers(0, 128)
    ),
)
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z]{2,6}){0,2}", fullmatch=True),
)
hook_text = st.text(
    alphabet=st.characters(blacklist_characters="#\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=30,
).map(lambda s: s.strip(" \t\n\v\f\r"))


@st.composite
def configs(draw: st.DrawFn) -> Config:
    private = draw(st.none() | keys32.map(keys.clamp))
    own = keys.pubkey(private) if private is not None else None
    addresses = draw(st.lists(interfaces, max_size=3))
    has_v6 = any(a.version == 6 for a in addresses)
    mtu_auto = draw(st.booleans())
    mtu = None if mtu_auto else draw(st.none() | st.integers(1280 if has_v6 else 576, 65455))
    iface = InterfaceConfig(
        private_key=private,
        listen_port=draw(st.none() | st.integers(0, 65535)),
        addresses=addresses,
        mtu=mtu,
        mtu_auto=mtu_auto,
        table=draw(st.sampled_from(["auto", "off", "main", "51820"])),
        fwmark=draw(st.integers(0, 2**32 - 1)),
        forwarding=draw(st.booleans()),
        pre_up=draw(st.lists(hook_text, max_size=2)),
        post_up=draw(st.lists(hook_text, max_size=2)),
        pre_down=draw(st.lists(hook_text, max_size=2)),
        post_down=draw(st.lists(hook_text, max_size=2)),
    )
    public_keys = draw(st.lists(keys32.filter(lambda k: k != own), unique=True, max_size=4))
    peers = [
        PeerConfig(
            public_key=key,
            preshared_key=draw(st.none() | keys32.filter(any)),
            allowed_ips=draw(st.lists(networks, max_size=3)),
            endpoint=draw(st.none() | st.tuples(hosts, st.integers(1, 65535))),
            persistent_keepalive=draw(st.integers(0, 65535)),
            introducer=draw(st.booleans()),
        )
        for key in public_keys
    ]
    return Config("mg0.conf", iface, peers, [])


class RoundTripTests(SynchronousTestCase):
    """Rendering a config and parsing it back gives the same config."""

    @settings(max_examples=200, deadline=None)
    @given(configs())
    def test_round_trip(self, config: Config) -> None:
        parsed = parse_config(render(config), "mg0.conf")
        for p in parsed.peers:
            p.line = 0
        self.assertEqual(parsed.interface, config.interface)
        self.assertEqual(parsed.peers, config.peers)


GRAMMAR_KEYS = sorted({k.name for k in INTERFACE_KEYS.values()} | {"PublicKey", "Foo"})
garbage_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "0", "off", "auto", "yes", "[::1]:1", "1.2.3.4/33", PRIVATE_B64]),
    st.from_regex(r"[0-9a-fA-Fx.:/\[\]%,+-]{0,40}", fullmatch=True),
)
garbage_lines = st.one_of(
    st.sampled_from(["[Interface]", "[Peer]", "[peer", "[]", "=", "#"]),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from(GRAMMAR_KEYS + [k.name for k in PEER_KEYS.values()]),
        garbage_values,
    ),
    st.text(max_size=40),
)


class GarbageTests(SynchronousTestCase):
    """Whatever the text, the parser returns a Config or raises ConfigError, nothing else."""

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=400))
    def test_any_text(self, text: str) -> None:
        self.parse(text)

    @settings(max_examples=1000, deadline=None)
    @given(st.lists(garbage_lines, max_size=20))
    def test_structured_garbage(self, lines: list[str]) -> None:
        self.parse("\n".join(lines))

    def parse(self, text: str) -> None:
        def unreadable(path: str) -> str:
            raise PermissionError(13, "Permission denied")

        try:
            parse_config(text, "g.conf", read_secret=unreadable)
        except ConfigError as e:
            self.assertTrue(str(e).startswith("g.conf"))
            self.assertNotIn("\n", str(e))


class UapiTests(SynchronousTestCase):
    """to_uapi_set renders what `wg setconf` sends for the same file."""

    def test_wg_quick_file(self) -> None:
        """Checked byte for byte against `wg setconf` talking to a fake UAPI socket."""
        self.assertEqual(
            to_uapi_set(parse_config(WG_QUICK_FILE)),
            "set=1\n"
            f"private_key={PRIVATE.hex()}\n"
            "listen_port=51820\n"
            "fwmark=4660\n"
            "replace_peers=true\n"
            f"public_key={PEER1.hex()}\n"
            f"preshared_key={PSK.hex()}\n"
            "endpoint=[2001:db8::1]:51820\n"
            "persistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\n"
            "allowed_ip=10.0.0.2/32\n"
            "allowed_ip=fd00::2/128\n"
            "allowed_ip=192.168.10.0/24\n"
            f"public_key={PEER2.hex()}\n"
            "replace_allowed_ips=true\n"
            "allowed_ip=10.0.0.3/32\n"
            "\n",
        )

    def test_no_identity(self) -> None:
        """Without PrivateKey or ListenPort, zeros are sent, as `wg setconf` does."""
        self.assertEqual(
            to_uapi_set(parse_config(peer("Endpoint = 192.0.2.1:9", "AllowedIPs="))),
            "set=1\n"
            f"private_key={'0' * 64}\n"
            "listen_port=0\n"
            "fwmark=0\n"
            "replace_peers=true\n"
            f"public_key={PEER1.hex()}\n"
            "endpoint=192.0.2.1:9\n"
            "replace_allowed_ips=true\n"
            "\n",
        )

    @settings(max_examples=100, deadline=None)
    @given(configs())
    def test_shape(self, config: Config) -> None:
        """Every rendered request starts with set=1, ends with a blank line, and is key=value."""
        text = to_uapi_set(config)
        self.assertTrue(text.startswith("set=1\n"))
        self.assertTrue(text.endswith("\n\n"))
        body = text[:-2].split("\n")
        self.assertTrue(all("=" in line for line in body))
        self.assertEqual(sum(line.startswith("public_key=") for line in body), len(config.peers))
        numeric = sum(
            1 for p in config.peers if p.endpoint is not None and is_ip_literal(p.endpoint[0])
        )
        self.assertEqual(sum(line.startswith("endpoint=") for line in body), numeric)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ExampleFileTests(SynchronousTestCase):
    """examples/mg0.conf fails until its placeholders are replaced, then parses."""

    def setUp(self) -> None:
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "mg0.conf")
        with open(path) as f:
            self.text = f.read()

    def test_placeholders_fail(self) -> None:
        error = self.assertRaises(ConfigError, parse_config, self.text, "mg0.conf")
        self.assertIn("PrivateKey is not a base64 WireGuard key", str(error))

    def test_filled_in(self) -> None:
        text = self.text.replace("REPLACE_WITH_OUTPUT_OF_meshguard_genkey", PRIVATE_B64)
        text = text.replace("REPLACE_WITH_PEER_PUBLIC_KEY", PEER1_B64)
        config = parse_config(text, "mg0.conf")
        self.assertEqual(config.warnings, [])
        self.assertEqual(config.interface.private_key, PRIVATE)
        self.assertEqual(config.interface.listen_port, 51820)
        self.assertEqual(len(config.peers), 1)
        self.assertEqual(config.peers[0].endpoint, ("peer.example.com", 51820))
