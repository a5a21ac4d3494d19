"""Tests for meshguard.core.messages: exact layouts, round trips and a parser that never raises."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from meshguard.core.messages import (
    COOKIE_REPLY_ENCRYPTED_OFFSET,
    COOKIE_REPLY_NONCE_OFFSET,
    INITIATION_EPHEMERAL_OFFSET,
    INITIATION_MAC1_OFFSET,
    INITIATION_MAC2_OFFSET,
    INITIATION_STATIC_OFFSET,
    INITIATION_TIMESTAMP_OFFSET,
    RESPONSE_EMPTY_OFFSET,
    RESPONSE_EPHEMERAL_OFFSET,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_MAC2_OFFSET,
    TRANSPORT_HEADER,
    CookieReply,
    Initiation,
    Message,
    Response,
    Transport,
    mac_offsets,
    parse_message,
)
from tests.kat import KAT_COOKIE_REPLY, KAT_INITIATION, KAT_RESPONSE

KAT_KEEPALIVE = bytes.fromhex("0400000088776655000000000000000089f1c23f97c152df9fc63021761b8925")

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


def fixed(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


initiations = st.builds(Initiation, u32, fixed(32), fixed(48), fixed(28), fixed(16), fixed(16))
responses = st.builds(Response, u32, u32, fixed(32), fixed(16), fixed(16), fixed(16))
cookie_replies = st.builds(CookieReply, u32, fixed(24), fixed(32))
transports = st.builds(Transport, u32, u64, st.binary(min_size=16, max_size=200))
messages: st.SearchStrategy[Message] = st.one_of(initiations, responses, cookie_replies, transports)


class LayoutTests(SynchronousTestCase):
    def test_offsets(self) -> None:
        """The offset constants are the digest's tables, in order and without gaps."""
        self.assertEqual(
            [
                INITIATION_EPHEMERAL_OFFSET,
                INITIATION_STATIC_OFFSET,
                INITIATION_TIMESTAMP_OFFSET,
                INITIATION_MAC1_OFFSET,
                INITIATION_MAC2_OFFSET,
                INITIATION_SIZE,
            ],
            [8, 8 + 32, 40 + 48, 88 + 28, 116 + 16, 132 + 16],
        )
        self.assertEqual(
            [
                RESPONSE_EPHEMERAL_OFFSET,
                RESPONSE_EMPTY_OFFSET,
                RESPONSE_MAC1_OFFSET,
                RESPONSE_MAC2_OFFSET,
                RESPONSE_SIZE,
            ],
            [12, 12 + 32, 44 + 16, 60 + 16, 76 + 16],
        )
        self.assertEqual(
            [COOKIE_REPLY_NONCE_OFFSET, COOKIE_REPLY_ENCRYPTED_OFFSET, COOKIE_REPLY_SIZE],
            [8, 8 + 24, 32 + 32],
        )

    def test_initiation_fields(self) -> None:
        """Each field of the KAT initiation lands at its offset; integers are little-endian."""
        message = parse_message(KAT_INITIATION)
        assert isinstance(message, Initiation)
        self.assertEqual(message.sender, 0x11223344)
        self.assertEqual(message.ephemeral, KAT_INITIATION[8:40])
        self.assertEqual(message.encrypted_static, KAT_INITIATION[40:88])
        self.assertEqual(message.encrypted_timestamp, KAT_INITIATION[88:116])
        self.assertEqual(message.mac1.hex(), "629cda647ae6f469a600bb984fa71e39")
        self.assertEqual(message.mac2, bytes(16))
        self.assertEqual(message.to_bytes(), KAT_INITIATION)

    def test_response_fields(self) -> None:
        """The KAT response carries the responder's index and echoes the initiator's."""
        message = parse_message(KAT_RESPONSE)
        assert isinstance(message, Response)
        self.assertEqual((message.sender, message.receiver), (0x55667788, 0x11223344))
        self.assertEqual(message.ephemeral, KAT_RESPONSE[12:44])
        self.assertEqual(message.encrypted_nothing, KAT_RESPONSE[44:60])
        self.assertEqual(message.mac1, KAT_RESPONSE[60:76])
        self.assertEqual(message.to_bytes(), KAT_RESPONSE)

    def test_cookie_reply_fields(self) -> None:
        """The KAT cookie reply answers the initiation's sender index."""
        message = parse_message(KAT_COOKIE_REPLY)
        assert isinstance(message, CookieReply)
        self.assertEqual(message.receiver, 0x11223344)
        self.assertEqual(message.nonce.hex(), "29e3504b308092e730c1fe478a7d72e803f398983dd83701")
        self.assertEqual(message.encrypted_cookie, KAT_COOKIE_REPLY[32:])
        self.assertEqual(message.to_bytes(), KAT_COOKIE_REPLY)

    def test_keepalive_fields(self) -> None:
        """A keepalive is a 32-byte transport message: header plus a bare tag."""
        message = parse_message(KAT_KEEPALIVE)
        assert isinstance(message, Transport)
        self.assertEqual((message.receiver, message.counter), (0x55667788, 0))
        self.assertEqual(len(message.encrypted), 16)
        self.assertEqual(message.to_bytes(), KAT_KEEPALIVE)
        self.assertEqual(TRANSPORT_HEADER.unpack_from(KAT_KEEPALIVE), (4, 0x55667788, 0))

    def test_transport_counter_little_endian(self) -> None:
        """The counter field is the u64 LE nonce at bytes 8..15."""
        data = Transport(1, 0x0102030405060708, bytes(16)).to_bytes()
        self.assertEqual(data[8:16], bytes.fromhex("0807060504030201"))


class ParserRejectionTests(SynchronousTestCase):
    def test_wrong_sizes(self) -> None:
        """Types 1-3 must have exactly their size; type 4 needs at least 32 bytes."""
        for message in (KAT_INITIATION, KAT_RESPONSE, KAT_COOKIE_REPLY):
            self.assertIsNone(parse_message(message[:-1]))
            self.assertIsNone(parse_message(message + b"\x00"))
        self.assertIsNone(parse_message(KAT_KEEPALIVE[: TRANSPORT_MIN_SIZE - 1]))
        self.assertIsInstance(parse_message(KAT_KEEPALIVE + b"x"), Transport)

    def test_reserved_bytes_must_be_zero(self) -> None:
        """A non-zero reserved byte makes an unknown type, as in wg-go and the kernel."""
        for message in (KAT_INITIATION, KAT_RESPONSE, KAT_COOKIE_REPLY, KAT_KEEPALIVE):
            for position in (1, 2, 3):
                bad = bytearray(message)
                bad[position] = 1
                self.assertIsNone(parse_message(bytes(bad)))

    def test_unknown_types_and_short_input(self) -> None:
        """Type 0, type 5 and anything shorter than the type field are dropped."""
        for kind in (0, 5, 255):
            self.assertIsNone(parse_message(bytes([kind]) + KAT_INITIATION[1:]))
        for size in range(4):
            self.assertIsNone(parse_message(b"\x04" * size))

    def test_constructors_refuse_bad_fields(self) -> None:
        """Building a message with wrong field sizes is local misuse and raises."""
        self.assertRaises(
            ValueError, Initiation, 0, bytes(31), bytes(48), bytes(28), bytes(16), bytes(16)
        )
        self.assertRaises(
            ValueError, Initiation, -1, bytes(32), bytes(48), bytes(28), bytes(16), bytes(16)
        )
        self.assertRaises(
            ValueError, Response, 0, 1 << 32, bytes(32), bytes(16), bytes(16), bytes(16)
        )
        self.assertRaises(ValueError, CookieReply, 0, bytes(23), bytes(32))
        self.assertRaises(ValueError, Transport, 0, 1 << 64, bytes(16))
        self.assertRaises(ValueError, Transport, 0, 0, bytes(15))


class ParserPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(messages)
    def test_round_trip(self, message: Message) -> None:
        """Every message encodes to bytes that parse back to an equal message."""
        self.assertEqual(parse_message(message.to_bytes()), message)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    def test_garbage_never_raises(self, data: bytes) -> None:
        """Arbitrary bytes give None or a message that re-encodes to exactly those bytes."""
        message = parse_message(data)
        if message is not None:
            self.assertEqual(message.to_bytes(), data)

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([1, 2, 3, 4]),
        st.sampled_from([INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, 16, 31, 32, 100]),
        st.data(),
    )
    def test_typed_garbage(self, kind: int, size: int, data: st.DataObject) -> None:
        """Plausible headers with random bodies parse exactly when the size fits the type."""
        body = data.draw(fixed(size - 4))
        raw = kind.to_bytes(4, "little") + body
        message = parse_message(raw)
        expected = {1: INITIATION_SIZE, 2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE}
        fits = size == expected[kind] if kind in expected else size >= TRANSPORT_MIN_SIZE
        self.assertEqual(message is not None, fits)
        if message is not None:
            self.assertEqual(message.to_bytes(), raw)


class MacOffsetTests(SynchronousTestCase):
    def test_handshake_messages(self) -> None:
        """mac1/mac2 positions are known for initiations and responses only."""
        self.assertEqual(mac_offsets(KAT_INITIATION), (116, 132))
        self.assertEqual(mac_offsets(KAT_RESPONSE), (60, 76))
        self.assertIsNone(mac_offsets(KAT_COOKIE_REPLY))
        self.assertIsNone(mac_offsets(KAT_KEEPALIVE))
        self.assertIsNone(mac_offsets(b"\x02" + KAT_INITIATION[1:]))
