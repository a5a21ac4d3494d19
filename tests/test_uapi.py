"""Tests for meshguard.codecs.uapi: the UAPI text format, without sockets."""

from __future__ import annotations

import errno
import time
from ipaddress import IPv4Network, IPv6Network, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.codecs.uapi import (
    UNSET,
    DeviceStatus,
    GetRequest,
    InvalidRequest,
    Operation,
    PeerStatus,
    PeerUpdate,
    ReplacePeers,
    Request,
    SetFwmark,
    SetListenPort,
    SetPrivateKey,
    SetRequest,
    UAPIError,
    UAPIRequestParser,
    format_error,
    format_get,
    format_set,
    parse_endpoint,
    parse_get,
    parse_set,
)

PRIV = bytes.fromhex("6009f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669")
PUB = bytes.fromhex("c53201039adba14be71f886da1d8dbe9eebded08cb111b75340078999aa9f038")
OTHER = bytes([0x22] * 32)
PSK = bytes([0x33] * 32)


def net(text: str) -> IPv4Network | IPv6Network:
    return ip_network(text)


class FormatGetTests(SynchronousTestCase):
    def test_empty_device(self) -> None:
        """A device with nothing set replies with only the errno line and the blank line."""
        self.assertEqual(format_get(DeviceStatus()), b"errno=0\n\n")

    def test_zero_values_are_omitted(self) -> None:
        """An all-zero private key, port 0 and fwmark 0 are left out, as wireguard-go does."""
        status = DeviceStatus(private_key=bytes(32), listen_port=0, fwmark=0)
        self.assertEqual(format_get(status), b"errno=0\n\n")

    def test_exact_bytes(self) -> None:
        """Device keys, then per peer the wireguard-go key order; zeros for a missing PSK."""
        status = DeviceStatus(
            private_key=PRIV,
            listen_port=51820,
            fwmark=7,
            peers=[
                PeerStatus(
                    public_key=PUB,
                    preshared_key=None,
                    endpoint=("192.0.2.1", 51820),
                    last_handshake_time=1700000000.25,
                    rx_bytes=2,
                    tx_bytes=1,
                    persistent_keepalive=25,
                    allowed_ips=[net("10.0.0.0/24"), net("fd00::/64")],
                ),
                PeerStatus(
                    public_key=OTHER,
                    preshared_key=PSK,
                    endpoint=("fe80::1%eth0", 1),
                ),
            ],
        )
        expected = (
            f"private_key={PRIV.hex()}\n"
            "listen_port=51820\n"
            "fwmark=7\n"
            f"public_key={PUB.hex()}\n"
            f"preshared_key={'00' * 32}\n"
            "protocol_version=1\n"
            "endpoint=192.0.2.1:51820\n"
            "last_handshake_time_sec=1700000000\n"
            "last_handshake_time_nsec=250000000\n"
            "tx_bytes=1\n"
            "rx_bytes=2\n"
            "persistent_keepalive_interval=25\n"
            "allowed_ip=10.0.0.0/24\n"
            "allowed_ip=fd00::/64\n"
            f"public_key={OTHER.hex()}\n"
            f"preshared_key={PSK.hex()}\n"
            "protocol_version=1\n"
            "endpoint=[fe80::1%eth0]:1\n"
            "last_handshake_time_sec=0\n"
            "last_handshake_time_nsec=0\n"
            "tx_bytes=0\n"
            "rx_bytes=0\n"
            "persistent_keepalive_interval=0\n"
            "errno=0\n\n"
        ).encode()
        self.assertEqual(format_get(status), expected)

    def test_errors_are_negative(self) -> None:
        """wg reads the errno as written and negates it, so errors go out negative."""
        self.assertEqual(format_error(errno.EINVAL), b"errno=-22\n\n")
        self.assertEqual(format_error(0), b"errno=0\n\n")


# What wireguard-tools v1.0.20210914 sent to a socket, captured verbatim.
WG_SET = (
    b"private_key=6009f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669\n"
    b"listen_port=4000\n"
    b"public_key=c53201039adba14be71f886da1d8dbe9eebded08cb111b75340078999aa9f038\n"
    b"endpoint=127.0.0.1:51820\n"
    b"persistent_keepalive_interval=25\n"
    b"replace_allowed_ips=true\n"
    b"allowed_ip=10.0.0.0/24\n"
    b"allowed_ip=fd00::/64\n"
)
WG_SETCONF = (
    b"private_key=6009f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669\n"
    b"listen_port=5555\n"
    b"fwmark=0\n"
    b"replace_peers=true\n"
    b"public_key=c53201039adba14be71f886da1d8dbe9eebded08cb111b75340078999aa9f038\n"
    b"endpoint=127.0.0.1:1\n"
    b"replace_allowed_ips=true\n"
    b"allowed_ip=10.9.0.0/16\n"
    b"allowed_ip=fd00::1/64\n"
)
WG_SYNCCONF = (
    b"private_key=6009f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669\n"
    b"listen_port=5555\n"
    b"fwmark=0\n"
    b"public_key=2222222222222222222222222222222222222222222222222222222222222222\n"
    b"remove=true\n"
    b"public_key=c53201039adba14be71f886da1d8dbe9eebded08cb111b75340078999aa9f038\n"
    b"endpoint=127.0.0.1:1\n"
    b"replace_allowed_ips=true\n"
    b"allowed_ip=10.9.0.0/16\n"
    b"allowed_ip=fd00::1/64\n"
)


class ParseSetTests(SynchronousTestCase):
    def assertErrno(self, body: bytes, code: int) -> None:
        with self.assertRaises(UAPIError) as ctx:
            parse_set(body)
        self.assertEqual(ctx.exception.errno, code)

    def test_wg_set(self) -> None:
        """`wg set ... peer ... allowed-ips a,b endpoint ... persistent-keepalive` parses whole."""
        self.assertEqual(
            parse_set(WG_SET),
            [
                SetPrivateKey(PRIV),
                SetListenPort(4000),
                PeerUpdate(
                    public_key=PUB,
                    endpoint=("127.0.0.1", 51820),
                    persistent_keepalive=25,
                    replace_allowed_ips=True,
                    allowed_ips=[(True, net("10.0.0.0/24")), (True, net("fd00::/64"))],
                ),
            ],
        )

    def test_wg_setconf_masks_host_bits(self) -> None:
        """setconf's replace_peers and fwmark=0 come through; host bits are masked like wg-go."""
        ops = parse_set(WG_SETCONF)
        self.assertEqual(ops[:4], [SetPrivateKey(PRIV), SetListenPort(5555), SetFwmark(0),
                                   ReplacePeers()])  # fmt: skip
        peer = ops[4]
        assert isinstance(peer, PeerUpdate)
        self.assertEqual(peer.allowed_ips, [(True, net("10.9.0.0/16")), (True, net("fd00::/64"))])

    def test_wg_syncconf_removes(self) -> None:
        """syncconf's remove=true block becomes a bare removal."""
        ops = parse_set(WG_SYNCCONF)
        self.assertEqual(ops[3], PeerUpdate(public_key=OTHER, remove=True))
        self.assertNotIn(ReplacePeers(), ops)

    def test_empty(self) -> None:
        """An empty set is valid and does nothing."""
        self.assertEqual(parse_set(b""), [])

    def test_remove_discards_rest_of_block(self) -> None:
        """wg-go ignores a block after remove=true; the later lines are still validated."""
        body = b"public_key=" + PUB.hex().encode() + b"\nendpoint=1.2.3.4:5\nremove=true\n"
        body += b"allowed_ip=10.0.0.0/8\n"
        self.assertEqual(parse_set(body), [PeerUpdate(public_key=PUB, remove=True)])
        self.assertErrno(body + b"allowed_ip=bogus\n", errno.EINVAL)

    def test_incremental_allowed_ips(self) -> None:
        """allowed_ip=-x/y is a removal; order is kept; replace_allowed_ips drops earlier adds."""
        body = (
            b"public_key=" + PUB.hex().encode() + b"\n"
            b"allowed_ip=10.1.0.0/16\nallowed_ip=-10.0.0.0/24\n"
        )
        (peer,) = parse_set(body)
        assert isinstance(peer, PeerUpdate)
        self.assertEqual(
            peer.allowed_ips, [(True, net("10.1.0.0/16")), (False, net("10.0.0.0/24"))]
        )
        self.assertFalse(peer.replace_allowed_ips)
        (peer,) = parse_set(body + b"replace_allowed_ips=true\nallowed_ip=10.2.0.0/16\n")
        assert isinstance(peer, PeerUpdate)
        self.assertEqual(peer.allowed_ips, [(True, net("10.2.0.0/16"))])
        self.assertTrue(peer.replace_allowed_ips)

    def test_zero_keys_mean_none(self) -> None:
        """All-zero private and preshared keys remove them."""
        zero = b"0" * 64
        ops = parse_set(
            b"private_key=" + zero + b"\npublic_key=" + PUB.hex().encode() + b"\n"
            b"preshared_key=" + zero + b"\nupdate_only=true\nprotocol_version=1\n"
        )
        self.assertEqual(
            ops,
            [SetPrivateKey(None), PeerUpdate(public_key=PUB, preshared_key=None, update_only=True)],
        )

    def test_unchanged_fields_are_unset(self) -> None:
        """A bare public_key block leaves everything unchanged."""
        (peer,) = parse_set(b"public_key=" + PUB.hex().encode())
        self.assertEqual(peer, PeerUpdate(public_key=PUB))
        assert isinstance(peer, PeerUpdate)
        self.assertIs(peer.preshared_key, UNSET)
        self.assertIs(peer.endpoint, UNSET)
        self.assertIsNone(peer.persistent_keepalive)

    def test_uppercase_hex_accepted(self) -> None:
        """wg-go decodes keys with encoding/hex, which takes either case."""
        (peer,) = parse_set(b"public_key=" + PUB.hex().upper().encode() + b"\n")
        self.assertEqual(peer, PeerUpdate(public_key=PUB))

    def test_errors(self) -> None:
        """Each malformed line fails the whole request with wg-go's errno."""
        pk = b"public_key=" + PUB.hex().encode() + b"\n"
        cases = [
            (b"listen_port\n", errno.EPROTO),
            (b"bogus=1\n", errno.EINVAL),
            (pk + b"listen_port=1\n", errno.EINVAL),
            (pk + b"bogus=1\n", errno.EINVAL),
            (b"private_key=" + b"0" * 63 + b"\n", errno.EINVAL),
            (b"private_key=" + b"g" * 64 + b"\n", errno.EINVAL),
            (b"private_key= " + b"0" * 62 + b" \n", errno.EINVAL),
            (b"listen_port=65536\n", errno.EINVAL),
            (b"listen_port=-1\n", errno.EINVAL),
            (b"listen_port=+1\n", errno.EINVAL),
            (b"listen_port=\n", errno.EINVAL),
            (b"fwmark=4294967296\n", errno.EINVAL),
            (b"replace_peers=false\n", errno.EINVAL),
            (pk + b"remove=1\n", errno.EINVAL),
            (pk + b"protocol_version=2\n", errno.EINVAL),
            (pk + b"persistent_keepalive_interval=65536\n", errno.EINVAL),
            (pk + b"endpoint=example.com:51820\n", errno.EINVAL),
            (pk + b"endpoint=1.2.3.4\n", errno.EINVAL),
            (pk + b"endpoint=1.2.3.4:65536\n", errno.EINVAL),
            (pk + b"endpoint=::1:51820\n", errno.EINVAL),
            (pk + b"endpoint=1.2.3.4%eth0:1\n", errno.EINVAL),
            (pk + b"allowed_ip=10.0.0.0\n", errno.EINVAL),
            (pk + b"allowed_ip=10.0.0.0/255.0.0.0\n", errno.EINVAL),
            (pk + b"allowed_ip=10.0.0.0/33\n", errno.EINVAL),
            (pk + b"allowed_ip=fe80::%eth0/64\n", errno.EINVAL),
            (pk + b"allowed_ip=\xff/8\n", errno.EINVAL),
            (pk + b"\n", errno.EPROTO),
        ]
        for body, code in cases:
            with self.subTest(body=body):
                self.assertErrno(body, code)

    def test_error_message_has_no_key(self) -> None:
        """Error text names the key and line, never the (possibly secret) value."""
        with self.assertRaises(UAPIError) as ctx:
            parse_set(b"preshared_key=" + b"ab" * 31 + b"\n")
        self.assertNotIn("abab", str(ctx.exception))
        self.assertIn("line 1", str(ctx.exception))

    def test_endpoint_forms(self) -> None:
        """Numeric endpoints only; v6 in brackets with an optional zone, normalised."""
        self.assertEqual(parse_endpoint("1.2.3.4:0"), ("1.2.3.4", 0))
        self.assertEqual(parse_endpoint("[2001:DB8:0::1]:65535"), ("2001:db8::1", 65535))
        self.assertEqual(parse_endpoint("[fe80::1%wg0]:51820"), ("fe80::1%wg0", 51820))
        for bad in ["[1.2.3.4]:1", "1.2.3.4:", "[::1]", "01.2.3.4:1", "1.2.3.4:1:2"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                parse_endpoint(bad)

    def test_large_setconf(self) -> None:
        """100,000 allowed IPs parse (about 0.5 s on an idle dev box; reported, not asserted)."""
        lines = [f"allowed_ip=10.{i >> 8 & 255}.{i & 255}.{i >> 16}/32" for i in range(100_000)]
        body = (f"public_key={PUB.hex()}\nreplace_allowed_ips=true\n" + "\n".join(lines)).encode()
        started, cpu = time.perf_counter(), time.process_time()
        (peer,) = parse_set(body)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert isinstance(peer, PeerUpdate)
        self.assertEqual(len(peer.allowed_ips), 100_000)
        print(f"\n  parse_set, 100k allowed_ip: {elapsed:.3f}s wall, {cpu:.3f}s CPU", end=" ")


class ClientSideTests(SynchronousTestCase):
    def test_parse_get_errno(self) -> None:
        """A negative errno in a reply raises with the positive code."""
        with self.assertRaises(UAPIError) as ctx:
            parse_get(b"errno=-98\n\n")
        self.assertEqual(ctx.exception.errno, errno.EADDRINUSE)

    def test_parse_get_truncated(self) -> None:
        """A reply without the blank line is EPROTO, as in wg."""
        with self.assertRaises(UAPIError) as ctx:
            parse_get(b"listen_port=1\nerrno=0\n")
        self.assertEqual(ctx.exception.errno, errno.EPROTO)


# --- property tests ------------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
v4nets = st.builds(
    lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
v6nets = st.builds(
    lambda a, n: IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
nets = st.one_of(v4nets, v6nets)
endpoints = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
    st.tuples(st.just("fe80::1%eth0"), st.integers(0, 65535)),
)


def _peer_update(
    pub: bytes,
    remove: bool,
    update_only: bool,
    psk: object,
    endpoint: object,
    keepalive: int | None,
    replace: bool,
    ips: list[tuple[bool, IPv4Network | IPv6Network]],
) -> PeerUpdate:
    if remove:
        return PeerUpdate(public_key=pub, remove=True)
    return PeerUpdate(
        public_key=pub,
        update_only=update_only,
        preshared_key=psk,  # type: ignore[arg-type]
        endpoint=endpoint,  # type: ignore[arg-type]
        persistent_keepalive=keepalive,
        replace_allowed_ips=replace,
        allowed_ips=ips,
    )


peer_updates = st.builds(
    _peer_update,
    keys,
    st.booleans(),
    st.booleans(),
    st.one_of(st.just(UNSET), st.none(), keys.filter(any)),
    st.one_of(st.just(UNSET), endpoints),
    st.one_of(st.none(), st.integers(0, 65535)),
    st.booleans(),
    st.lists(st.tuples(st.booleans(), nets), max_size=5),
)
device_ops: st.SearchStrategy[Operation] = st.one_of(
    st.builds(SetPrivateKey, st.one_of(st.none(), keys.filter(any))),
    st.builds(SetListenPort, st.integers(0, 65535)),
    st.builds(SetFwmark, st.integers(0, 2**32 - 1)),
    st.just(ReplacePeers()),
)
operations = st.builds(
    lambda d, p: d + p, st.lists(device_ops, max_size=4), st.lists(peer_updates, max_size=4)
)


def _set_body(ops: list[Operation]) -> bytes:
    request = format_set(ops)
    assert request.startswith(b"set=1\n") and request.endswith(b"\n")
    return request[len(b"set=1\n") : -1]


peer_statuses = st.builds(
    PeerStatus,
    public_key=keys,
    preshared_key=st.one_of(st.none(), keys.filter(any)),
    endpoint=st.one_of(st.none(), endpoints),
    last_handshake_time=st.integers(0, 2**40).map(lambda ns: ns / 1000),
    rx_bytes=st.integers(0, 2**64 - 1),
    tx_bytes=st.integers(0, 2**64 - 1),
    persistent_keepalive=st.integers(0, 65535),
    allowed_ips=st.lists(nets, max_size=4),
)
statuses = st.builds(
    DeviceStatus,
    private_key=st.one_of(st.none(), keys.filter(any)),
    listen_port=st.integers(0, 65535),
    fwmark=st.integers(0, 2**32 - 1),
    peers=st.lists(peer_statuses, max_size=4),
)

line_keys = st.sampled_from(
    [b"private_key", b"listen_port", b"fwmark", b"replace_peers", b"public_key", b"remove",
     b"update_only", b"preshared_key", b"endpoint", b"persistent_keepalive_interval",
     b"replace_allowed_ips", b"allowed_ip", b"protocol_version", b"bogus", b""]
)  # fmt: skip
line_values = st.one_of(
    st.binary(max_size=70),
    st.sampled_from([b"true", b"1", b"0" * 64, PUB.hex().encode(), b"[::1]:1", b"10.0.0.0/8"]),
    st.integers(-5, 2**33).map(lambda n: str(n).encode()),
)
lines = st.builds(lambda k, v: k + b"=" + v, line_keys, line_values) | st.binary(max_size=20)


class PropertyTests(SynchronousTestCase):
    @given(operations)
    def test_set_round_trip(self, ops: list[Operation]) -> None:
        """Whatever format_set writes, parse_set reads back unchanged."""
        self.assertEqual(parse_set(_set_body(ops)), ops)

    @given(statuses)
    def test_get_round_trip(self, status: DeviceStatus) -> None:
        """format_get then parse_get keeps every field (handshake time to the nanosecond)."""
        back = parse_get(format_get(status))
        for peer in back.peers + status.peers:
            peer.last_handshake_time = round(peer.last_handshake_time, 6)
        self.assertEqual(back, status)

    @given(st.binary(max_size=300))
    def test_parse_set_garbage(self, body: bytes) -> None:
        """Arbitrary bytes either parse or raise UAPIError, nothing else."""
        try:
            parse_set(body)
        except UAPIError as e:
            self.assertIn(e.errno, (errno.EINVAL, errno.EPROTO))

    @settings(max_examples=300)
    @given(st.lists(lines, max_size=12))
    def test_parse_set_plausible_garbage(self, body_lines: list[bytes]) -> None:
        """Near-valid lines either parse or raise UAPIError, nothing else."""
        try:
            parse_set(b"\n".join(body_lines))
        except UAPIError as e:
            self.assertIn(e.errno, (errno.EINVAL, errno.EPROTO))

    @given(st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=10))
    def test_request_parser_garbage(self, data: bytes, cuts: list[int]) -> None:
        """The stream splitter never raises, and nothing follows an InvalidRequest."""
        parser = UAPIRequestParser(max_request_size=100)
        out: list[Request] = []
        for chunk in _chunks(data, cuts):
            out += parser.feed(chunk)
        for request in out[:-1]:
            self.assertNotIsInstance(request, InvalidRequest)

    @given(st.lists(st.one_of(st.just(None), operations), max_size=5), st.lists(st.integers(1, 40)))
    def test_request_parser_splits(
        self, requests: list[list[Operation] | None], cuts: list[int]
    ) -> None:
        """A stream of gets and sets, cut anywhere, yields the same requests in order."""
        stream = b"".join(b"get=1\n\n" if r is None else format_set(r) for r in requests)
        parser = UAPIRequestParser()
        out: list[Request] = []
        for chunk in _chunks(stream, cuts):
            out += parser.feed(chunk)
        expected = [GetRequest() if r is None else SetRequest(_set_body(r)) for r in requests]
        self.assertEqual(out, expected)
        self.assertFalse(parser.pending)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(data[at : at + cut])
        at += cut
    chunks.append(data[at:])
    return chunks


class RequestParserTests(SynchronousTestCase):
    def test_several_requests_in_one_chunk(self) -> None:
        """wg-go accepts several operations per connection; so do we."""
        parser = UAPIRequestParser()
        out = parser.feed(b"get=1\n\nset=1\nlisten_port=1\n\nset=1\n\nget=1\n\n")
        self.assertEqual(
            out, [GetRequest(), SetRequest(b"listen_port=1\n"), SetRequest(b""), GetRequest()]
        )

    def test_byte_by_byte(self) -> None:
        """A request split into single bytes is recognised once complete."""
        parser = UAPIRequestParser()
        stream = b"set=1\nlisten_port=1\nfwmark=2\n\n"
        out: list[Request] = []
        for i in range(len(stream)):
            out += parser.feed(stream[i : i + 1])
            if i < len(stream) - 1:
                self.assertEqual(out, [])
        self.assertEqual(out, [SetRequest(b"listen_port=1\nfwmark=2\n")])

    def test_unknown_operation(self) -> None:
        """An unknown operation is EPROTO and ends the stream; later bytes are ignored."""
        parser = UAPIRequestParser()
        (bad,) = parser.feed(b"put=1\n\nget=1\n\n")
        assert isinstance(bad, InvalidRequest)
        self.assertEqual(bad.error.errno, errno.EPROTO)
        self.assertEqual(parser.feed(b"get=1\n\n"), [])

    def test_unknown_operation_detected_early(self) -> None:
        """A wrong first byte is rejected at once, without waiting for a newline."""
        (bad,) = UAPIRequestParser().feed(b"x")
        self.assertIsInstance(bad, InvalidRequest)

    def test_get_with_trailing_data(self) -> None:
        """get=1 must be followed by the blank line, as wg-go requires (EINVAL)."""
        (bad,) = UAPIRequestParser().feed(b"get=1\nx")
        assert isinstance(bad, InvalidRequest)
        self.assertEqual(bad.error.errno, errno.EINVAL)

    def test_oversized_request(self) -> None:
        """A set that grows past the bound without ending is refused with EMSGSIZE."""
        parser = UAPIRequestParser(max_request_size=1000)
        self.assertEqual(parser.feed(b"set=1\n" + b"allowed_ip=10.0.0.0/8\n" * 40), [])
        (bad,) = parser.feed(b"allowed_ip=10.0.0.0/8\n" * 10)
        assert isinstance(bad, InvalidRequest)
        self.assertEqual(bad.error.errno, errno.EMSGSIZE)

    def test_large_request_scanned_incrementally(self) -> None:
        """A 3 MB setconf in 64 KiB chunks comes out as one request."""
        body = b"".join(
            b"allowed_ip=10.0.%d.%d/32\n" % (i >> 8 & 255, i & 255) for i in range(120_000)
        )
        stream = b"set=1\n" + body + b"\n"
        parser = UAPIRequestParser()
        out: list[Request] = []
        for at in range(0, len(stream), 65536):
            out += parser.feed(stream[at : at + 65536])
        self.assertEqual(out, [SetRequest(body)])
