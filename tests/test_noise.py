"""Tests for meshguard.core.noise: the digest's handshake KAT byte for byte, and an oracle.

The oracle is the independent ``noiseprotocol`` package running the same Noise_IKpsk2 pattern
with WireGuard's prologue; WireGuard's messages are its messages plus indices and macs.
"""

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.cookie import CookieGenerator
from meshguard.core.crypto import (
    CONSTRUCTION,
    IDENTIFIER,
    CryptoError,
    TransportCipher,
    blake2s,
    clamp,
    dh,
    generate_private_key,
    public_key,
    tai64n,
)
from meshguard.core.messages import TRANSPORT_HEADER, Transport, parse_message
from meshguard.core.noise import (
    ConsumedInitiation,
    InitiatorHandshake,
    SessionKeys,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from tests.kat import KAT_INITIATION, KAT_RESPONSE


def kat_key(label: str) -> bytes:
    """The digest's key recipe: clamp(HASH(ascii label))."""
    return clamp(blake2s(label.encode()))


SI = kat_key("meshguard KAT initiator static")
SR = kat_key("meshguard KAT responder static")
EI = kat_key("meshguard KAT initiator ephemeral")
ER = kat_key("meshguard KAT responder ephemeral")
PSK = blake2s(b"meshguard KAT preshared key")
SI_PUB = public_key(SI)
SR_PUB = public_key(SR)
II, IR = 0x11223344, 0x55667788
TIMESTAMP = bytes.fromhex("400000006553f10a00000000")

KAT_I_SEND = bytes.fromhex("aae0925e775a43b03dea07a36b9cb75d754d50a005cf0bfa731ac6e111ee2908")
KAT_I_RECV = bytes.fromhex("babef01544135ca152de9e3e192f52e9af7846d59cdf42ce491dd83713348efb")
KAT_KEEPALIVE = bytes.fromhex("0400000088776655000000000000000089f1c23f97c152df9fc63021761b8925")
KAT_DATA_PLAINTEXT = bytes.fromhex("4500001400000000400100000a0000010a000002") + bytes(12)
KAT_DATA = bytes.fromhex(
    "04000000443322110100000000000000ceda95464bfdaa5725631eaa6eb732a0d68f1ba52b6dc05b"
    "5a48e3df22b04e6a0e26850683b48b72e6d3e825f39a97ba"
)


def static_lookup(local_private: bytes, known: bytes) -> Callable[[bytes], bytes | None]:
    """A device's view of its peers with one known peer: the precomputed static-static DH."""
    precomputed = dh(local_private, known)

    def lookup(remote_static: bytes) -> bytes | None:
        return precomputed if remote_static == known else None

    return lookup


@dataclass
class Handshake:
    """Every value of one full handshake, for tests that tamper with a piece of it."""

    initiation: bytes
    state: InitiatorHandshake
    consumed: ConsumedInitiation
    response: bytes
    responder_keys: SessionKeys
    initiator_keys: SessionKeys


def run_handshake(
    si: bytes,
    sr: bytes,
    psk: bytes,
    ei: bytes,
    er: bytes,
    ii: int = II,
    ir: int = IR,
    timestamp: bytes = TIMESTAMP,
) -> Handshake:
    si_pub, sr_pub = public_key(si), public_key(sr)
    initiation, state = create_initiation(
        local_static_public=si_pub,
        local_static_private=si,
        remote_static=sr_pub,
        precomputed_ss=dh(si, sr_pub),
        ephemeral_private=ei,
        sender_index=ii,
        timestamp=timestamp,
    )
    consumed = consume_initiation(
        initiation,
        local_static_private=sr,
        local_static_public=sr_pub,
        precomputed_ss_for=static_lookup(sr, si_pub),
    )
    assert consumed is not None
    response, responder_keys = create_response(
        consumed, psk=psk, ephemeral_private=er, sender_index=ir
    )
    result = consume_response(response, state, local_static_private=si, psk=psk)
    assert result is not None
    remote_index, initiator_keys = result
    assert remote_index == ir
    return Handshake(initiation, state, consumed, response, responder_keys, initiator_keys)


def kat_handshake() -> Handshake:
    return run_handshake(SI, SR, PSK, EI, ER)


def noise_peer(
    *, initiator: bool, static: bytes, remote_static: bytes | None, ephemeral: bytes, psk: bytes
) -> NoiseConnection:
    """A noiseprotocol endpoint configured the way WireGuard uses Noise_IKpsk2."""
    peer = NoiseConnection.from_name(CONSTRUCTION)
    if initiator:
        peer.set_as_initiator()
    else:
        peer.set_as_responder()
    peer.set_prologue(IDENTIFIER)
    peer.set_psks(psk=psk)
    peer.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote_static is not None:
        peer.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_static)
    peer.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    with warnings.catch_warnings():
        # noiseprotocol warns that a fixed ephemeral is for testing only, which this is.
        warnings.simplefilter("ignore", UserWarning)
        peer.start_handshake()
    return peer


class KnownAnswerTests(SynchronousTestCase):
    def test_timestamp(self) -> None:
        """The KAT timestamp is TAI64N of unix 1700000000."""
        self.assertEqual(tai64n(1700000000.0), TIMESTAMP)

    def test_initiation(self) -> None:
        """create_initiation plus mac1 reproduces the digest's initiation, which wg-go accepts."""
        handshake = kat_handshake()
        self.assertEqual(handshake.initiation[116:], bytes(32))
        with_macs = CookieGenerator(SR_PUB).add_macs(handshake.initiation, 0.0)
        self.assertEqual(with_macs.hex(), KAT_INITIATION.hex())

    def test_responder_sees_initiator(self) -> None:
        """The responder recovers the initiator's static key, timestamp and index."""
        consumed = kat_handshake().consumed
        self.assertEqual(consumed.remote_static, SI_PUB)
        self.assertEqual(consumed.timestamp, TIMESTAMP)
        self.assertEqual(consumed.remote_index, II)
        self.assertEqual(consumed.remote_ephemeral, public_key(EI))

    def test_consume_kat_initiation_with_macs(self) -> None:
        """The on-the-wire initiation, macs included, is consumed like the zero-mac one."""
        consumed = consume_initiation(
            KAT_INITIATION,
            local_static_private=SR,
            local_static_public=SR_PUB,
            precomputed_ss_for=static_lookup(SR, SI_PUB),
        )
        self.assertEqual(consumed, kat_handshake().consumed)

    def test_response(self) -> None:
        """create_response plus mac1 reproduces the digest's response."""
        handshake = kat_handshake()
        self.assertEqual(handshake.response[60:], bytes(32))
        with_macs = CookieGenerator(SI_PUB).add_macs(handshake.response, 0.0)
        self.assertEqual(with_macs.hex(), KAT_RESPONSE.hex())

    def test_transport_keys(self) -> None:
        """Both sides derive the digest's keys, mirrored: Ti_send = Tr_recv, Ti_recv = Tr_send."""
        handshake = kat_handshake()
        self.assertEqual(handshake.initiator_keys, SessionKeys(KAT_I_SEND, KAT_I_RECV))
        self.assertEqual(handshake.responder_keys, SessionKeys(KAT_I_RECV, KAT_I_SEND))

    def test_consume_kat_response_with_macs(self) -> None:
        """The initiator accepts the digest's response bytes and learns the responder's index."""
        state = kat_handshake().state
        result = consume_response(KAT_RESPONSE, state, local_static_private=SI, psk=PSK)
        self.assertEqual(result, (IR, SessionKeys(KAT_I_SEND, KAT_I_RECV)))

    def test_keepalive(self) -> None:
        """The initiator's first packet, a keepalive with counter 0, matches the digest."""
        sealed = TransportCipher(KAT_I_SEND).seal(0, b"")
        self.assertEqual(Transport(IR, 0, sealed).to_bytes(), KAT_KEEPALIVE)
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(KAT_KEEPALIVE)
        self.assertEqual((receiver, counter), (IR, 0))
        self.assertEqual(TransportCipher(KAT_I_SEND).open(counter, KAT_KEEPALIVE[16:]), b"")

    def test_data_packet(self) -> None:
        """The responder's data packet with counter 1 and zero padding matches the digest."""
        sealed = TransportCipher(KAT_I_RECV).seal(1, KAT_DATA_PLAINTEXT)
        self.assertEqual(Transport(II, 1, sealed).to_bytes(), KAT_DATA)
        message = parse_message(KAT_DATA)
        assert isinstance(message, Transport)
        opened = TransportCipher(KAT_I_RECV).open(message.counter, message.encrypted)
        self.assertEqual(opened, KAT_DATA_PLAINTEXT)


class OracleTests(SynchronousTestCase):
    """Random handshakes checked against noiseprotocol in both roles."""

    def keys(self, seed: int) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        rng = random.Random(seed)
        si, sr, ei, er = (generate_private_key(rng.randbytes) for _ in range(4))
        psk = bytes(32) if seed % 3 == 0 else rng.randbytes(32)
        return si, sr, ei, er, psk

    def test_our_initiator_matches_oracle(self) -> None:
        """Our messages and keys are the oracle's, for the same keys and ephemerals."""
        for seed in range(6):
            si, sr, ei, er, psk = self.keys(seed)
            timestamp = tai64n(1700000000.0 + seed)
            ours = run_handshake(si, sr, psk, ei, er, timestamp=timestamp)

            initiator = noise_peer(
                initiator=True, static=si, remote_static=public_key(sr), ephemeral=ei, psk=psk
            )
            responder = noise_peer(
                initiator=False, static=sr, remote_static=None, ephemeral=er, psk=psk
            )
            first = bytes(initiator.write_message(timestamp))
            self.assertEqual(ours.initiation[8:116], first)
            self.assertEqual(bytes(responder.read_message(first)), timestamp)
            second = bytes(responder.write_message(b""))
            self.assertEqual(ours.response[12:60], second)
            self.assertEqual(bytes(initiator.read_message(second)), b"")

            packet = b"ping %d" % seed
            self.assertEqual(
                TransportCipher(ours.initiator_keys.send_key).seal(0, packet),
                bytes(initiator.encrypt(packet)),
            )
            self.assertEqual(
                TransportCipher(ours.responder_keys.send_key).seal(0, packet),
                bytes(responder.encrypt(packet)),
            )

    def test_oracle_initiator_with_our_responder(self) -> None:
        """An initiation written by the oracle (random ephemeral) is consumed and answered."""
        for seed in range(6):
            si, sr, _, er, psk = self.keys(seed)
            initiator = NoiseConnection.from_name(CONSTRUCTION)
            initiator.set_as_initiator()
            initiator.set_prologue(IDENTIFIER)
            initiator.set_psks(psk=psk)
            initiator.set_keypair_from_private_bytes(Keypair.STATIC, si)
            initiator.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, public_key(sr))
            initiator.start_handshake()
            timestamp = tai64n(1800000000.25)
            body = bytes(initiator.write_message(timestamp))
            message = b"\x01\x00\x00\x00" + (7).to_bytes(4, "little") + body + bytes(32)

            consumed = consume_initiation(
                message,
                local_static_private=sr,
                local_static_public=public_key(sr),
                precomputed_ss_for=static_lookup(sr, public_key(si)),
            )
            assert consumed is not None
            self.assertEqual(consumed.timestamp, timestamp)
            self.assertEqual(consumed.remote_index, 7)
            response, keys = create_response(
                consumed, psk=psk, ephemeral_private=er, sender_index=9
            )
            self.assertEqual(bytes(initiator.read_message(response[12:60])), b"")
            sealed = bytes(initiator.encrypt(b"hello"))
            self.assertEqual(TransportCipher(keys.receive_key).open(0, sealed), b"hello")


class HandshakeRejectionTests(SynchronousTestCase):
    def consume(self, message: bytes, private: bytes = SR) -> ConsumedInitiation | None:
        return consume_initiation(
            message,
            local_static_private=private,
            local_static_public=public_key(private),
            precomputed_ss_for=static_lookup(private, SI_PUB),
        )

    def test_unknown_peer(self) -> None:
        """An initiation from a static key we have no peer for is dropped."""
        result = consume_initiation(
            KAT_INITIATION,
            local_static_private=SR,
            local_static_public=SR_PUB,
            precomputed_ss_for=lambda remote: None,
        )
        self.assertIsNone(result)

    def test_zero_static_static_dh(self) -> None:
        """A peer whose precomputed static-static DH is all zero cannot complete a handshake."""
        result = consume_initiation(
            KAT_INITIATION,
            local_static_private=SR,
            local_static_public=SR_PUB,
            precomputed_ss_for=lambda remote: bytes(32),
        )
        self.assertIsNone(result)

    def test_not_for_us(self) -> None:
        """An initiation made for another responder key does not decrypt."""
        self.assertIsNone(self.consume(KAT_INITIATION, private=kat_key("someone else")))

    def test_tampered_initiation(self) -> None:
        """Flipping any bit in the ephemeral, static or timestamp fields makes it a drop."""
        for position in range(8, 116):
            bad = bytearray(KAT_INITIATION)
            bad[position] ^= 0x04
            self.assertIsNone(self.consume(bytes(bad)), f"byte {position}")

    def test_initiation_framing(self) -> None:
        """Wrong type or size is a drop; the sender index and macs are not Noise's to check."""
        self.assertIsNone(self.consume(b"\x02" + KAT_INITIATION[1:]))
        self.assertIsNone(self.consume(KAT_INITIATION[:-1]))
        other_index = KAT_INITIATION[:4] + bytes(4) + KAT_INITIATION[8:]
        consumed = self.consume(other_index)
        assert consumed is not None
        self.assertEqual(consumed.remote_index, 0)

    def test_low_order_ephemeral(self) -> None:
        """An initiation whose ephemeral is a low-order point is dropped, not raised."""
        bad = KAT_INITIATION[:8] + bytes(32) + KAT_INITIATION[40:]
        self.assertIsNone(self.consume(bad))

    def test_wrong_psk(self) -> None:
        """A PSK mismatch fails at the response's empty AEAD, on the initiator."""
        handshake = kat_handshake()
        result = consume_response(
            handshake.response, handshake.state, local_static_private=SI, psk=bytes(32)
        )
        self.assertIsNone(result)

    def test_zero_psk_handshake(self) -> None:
        """With no PSK configured, 32 zero bytes are still mixed in and both sides agree."""
        zero = run_handshake(SI, SR, bytes(32), EI, ER)
        self.assertEqual(zero.initiator_keys.send_key, zero.responder_keys.receive_key)
        self.assertNotEqual(zero.initiator_keys, kat_handshake().initiator_keys)

    def test_response_to_other_handshake(self) -> None:
        """A response whose receiver index is not our handshake's local index is dropped."""
        handshake = kat_handshake()
        state = InitiatorHandshake(
            handshake.state.chaining_key,
            handshake.state.hash,
            handshake.state.ephemeral_private,
            handshake.state.local_index + 1,
        )
        self.assertIsNone(consume_response(KAT_RESPONSE, state, local_static_private=SI, psk=PSK))

    def test_tampered_response(self) -> None:
        """Flipping any bit in the response's ephemeral or tag makes it a drop."""
        state = kat_handshake().state
        for position in list(range(0, 4)) + list(range(8, 60)):
            bad = bytearray(KAT_RESPONSE)
            bad[position] ^= 0x10
            result = consume_response(bytes(bad), state, local_static_private=SI, psk=PSK)
            self.assertIsNone(result, f"byte {position}")
        self.assertIsNone(
            consume_response(KAT_RESPONSE[:-1], state, local_static_private=SI, psk=PSK)
        )

    def test_wrong_initiator_static(self) -> None:
        """The response binds the initiator's static key through the se DH."""
        state = kat_handshake().state
        other = kat_key("not the initiator")
        self.assertIsNone(
            consume_response(KAT_RESPONSE, state, local_static_private=other, psk=PSK)
        )

    def test_create_initiation_refuses_bad_local_input(self) -> None:
        """Local misuse (low-order peer key, missing DH, bad timestamp) raises CryptoError."""
        good = {
            "local_static_public": SI_PUB,
            "local_static_private": SI,
            "remote_static": SR_PUB,
            "precomputed_ss": dh(SI, SR_PUB),
            "ephemeral_private": EI,
            "sender_index": II,
            "timestamp": TIMESTAMP,
        }
        for change in (
            {"remote_static": bytes(32)},
            {"precomputed_ss": bytes(32)},
            {"timestamp": TIMESTAMP[:11]},
            {"sender_index": 1 << 32},
        ):
            with self.assertRaises(CryptoError):
                create_initiation(**{**good, **change})  # type: ignore[arg-type]

    def test_fresh_ephemerals_give_fresh_keys(self) -> None:
        """Two handshakes between the same peers never share transport keys."""
        rng = random.Random(11)
        first = run_handshake(SI, SR, PSK, generate_private_key(rng.randbytes), ER)
        second = run_handshake(SI, SR, PSK, generate_private_key(rng.randbytes), ER)
        self.assertNotEqual(first.initiator_keys, second.initiator_keys)


class GarbageTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=144, max_size=144), st.booleans())
    def test_consume_initiation_never_raises(self, body: bytes, valid_ephemeral: bool) -> None:
        """Random 148-byte initiations are dropped, even with a real ephemeral key in them."""
        if valid_ephemeral:
            body = body[:4] + public_key(clamp(body[4:36])) + body[36:]
        message = b"\x01\x00\x00\x00" + body
        result = consume_initiation(
            message,
            local_static_private=SR,
            local_static_public=SR_PUB,
            precomputed_ss_for=static_lookup(SR, SI_PUB),
        )
        self.assertIsNone(result)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=148, max_size=148))
    def test_consume_initiation_arbitrary_bytes(self, message: bytes) -> None:
        """Arbitrary bytes of the right size, any header, are dropped without raising."""
        result = consume_initiation(
            message,
            local_static_private=SR,
            local_static_public=SR_PUB,
            precomputed_ss_for=lambda remote: None,
        )
        self.assertIsNone(result)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=80, max_size=80), st.booleans())
    def test_consume_response_never_raises(self, body: bytes, valid_ephemeral: bool) -> None:
        """Random responses addressed to our handshake are dropped without raising."""
        if valid_ephemeral:
            body = public_key(clamp(body[:32])) + body[32:]
        message = b"\x02\x00\x00\x00" + body[:4] + II.to_bytes(4, "little") + body
        state = kat_handshake().state
        self.assertIsNone(consume_response(message, state, local_static_private=SI, psk=PSK))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=92, max_size=92))
    def test_consume_response_arbitrary_bytes(self, message: bytes) -> None:
        """Arbitrary 92-byte inputs are dropped without raising."""
        state = kat_handshake().state
        self.assertIsNone(consume_response(message, state, local_static_private=SI, psk=PSK))
