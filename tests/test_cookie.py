"""Tests for meshguard.core.cookie: mac1, mac2 and cookie replies, against the digest's KAT."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.cookie import COOKIE_LIFETIME, CookieChecker, CookieGenerator
from meshguard.core.crypto import blake2s, clamp, public_key
from tests.kat import KAT_COOKIE_REPLY, KAT_INITIATION, KAT_RESPONSE

SI_PUB = public_key(clamp(blake2s(b"meshguard KAT initiator static")))
SR_PUB = public_key(clamp(blake2s(b"meshguard KAT responder static")))

KAT_SECRET = blake2s(b"meshguard KAT cookie secret")
KAT_NONCE = blake2s(b"meshguard KAT cookie nonce")[:24]
KAT_SOURCE = bytes.fromhex("c0000201ca6c")  # 192.0.2.1, port 51820
KAT_MAC2 = bytes.fromhex("8ca9440af0d29fdb87140e6d2f8cc3ed")
OTHER_SOURCE = bytes.fromhex("c0000202ca6c")


class ScriptedRandom:
    """A random source that hands out given byte strings in order, then seeded bytes."""

    def __init__(self, *chunks: bytes, seed: int = 0) -> None:
        self.chunks = list(chunks)
        self.fallback = random.Random(seed)
        self.requests: list[int] = []

    def __call__(self, size: int) -> bytes:
        self.requests.append(size)
        if self.chunks:
            chunk = self.chunks.pop(0)
            assert len(chunk) == size, (len(chunk), size)
            return chunk
        return self.fallback.randbytes(size)


def kat_checker() -> tuple[CookieChecker, ScriptedRandom]:
    rng = ScriptedRandom(KAT_SECRET, KAT_NONCE)
    return CookieChecker(SR_PUB, rng), rng


def zero_macs(message: bytes) -> bytes:
    return message[:-32] + bytes(32)


class Mac1Tests(SynchronousTestCase):
    def test_generator_reproduces_kat_mac1(self) -> None:
        """mac1 is keyed with HASH("mac1----" ‖ receiver's public key) over bytes 0..115."""
        generator = CookieGenerator(SR_PUB)
        self.assertEqual(generator.add_macs(zero_macs(KAT_INITIATION), 0.0), KAT_INITIATION)
        self.assertEqual(
            CookieGenerator(SI_PUB).add_macs(zero_macs(KAT_RESPONSE), 0.0), KAT_RESPONSE
        )

    def test_checker_accepts_kat(self) -> None:
        """The responder checks mac1 with its own public key, for both handshake messages."""
        self.assertTrue(CookieChecker(SR_PUB, ScriptedRandom()).check_mac1(KAT_INITIATION))
        self.assertTrue(CookieChecker(SI_PUB, ScriptedRandom()).check_mac1(KAT_RESPONSE))

    def test_checker_rejects(self) -> None:
        """A message for another key, any changed byte before mac2, or a non-handshake fails."""
        checker = CookieChecker(SR_PUB, ScriptedRandom())
        self.assertFalse(CookieChecker(SI_PUB, ScriptedRandom()).check_mac1(KAT_INITIATION))
        for position in range(132):
            bad = bytearray(KAT_INITIATION)
            bad[position] ^= 1
            self.assertFalse(checker.check_mac1(bytes(bad)), f"byte {position}")
        self.assertTrue(checker.check_mac1(KAT_INITIATION[:132] + b"\xff" * 16))
        self.assertFalse(checker.check_mac1(KAT_INITIATION[:64]))

    def test_add_macs_refuses_non_handshake(self) -> None:
        """Only initiations and responses carry macs; anything else is local misuse."""
        self.assertRaises(ValueError, CookieGenerator(SR_PUB).add_macs, bytes(64), 0.0)

    def test_mac2_zero_without_cookie(self) -> None:
        """With no cookie held, the mac2 field is 16 zero bytes."""
        message = CookieGenerator(SR_PUB).add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertEqual(message[132:], bytes(16))


class CookieReplyTests(SynchronousTestCase):
    def test_reply_known_answer(self) -> None:
        """The checker's reply to the KAT initiation is the digest's cookie reply."""
        checker, rng = kat_checker()
        reply = checker.create_reply(KAT_INITIATION, 0x11223344, KAT_SOURCE, 1000.0)
        self.assertEqual(reply.hex(), KAT_COOKIE_REPLY.hex())
        self.assertEqual(rng.requests, [32, 24])

    def test_generator_uses_cookie_for_mac2(self) -> None:
        """After consuming the KAT reply, mac2 of the KAT initiation is the digest's value."""
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 10.0)
        self.assertTrue(generator.consume_reply(KAT_COOKIE_REPLY, 10.0))
        message = generator.add_macs(zero_macs(KAT_INITIATION), 11.0)
        self.assertEqual(message[:132], KAT_INITIATION[:132])
        self.assertEqual(message[132:], KAT_MAC2)

    def test_checker_accepts_mac2_from_same_source_only(self) -> None:
        """mac2 binds the cookie to the source address it was issued to."""
        checker, _ = kat_checker()
        reply = checker.create_reply(KAT_INITIATION, 0x11223344, KAT_SOURCE, 0.0)
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertTrue(generator.consume_reply(reply, 0.0))
        message = generator.add_macs(zero_macs(KAT_INITIATION), 1.0)
        self.assertTrue(checker.check_mac1(message))
        self.assertTrue(checker.check_mac2(message, KAT_SOURCE, 1.0))
        self.assertFalse(checker.check_mac2(message, OTHER_SOURCE, 1.0))
        self.assertFalse(checker.check_mac2(KAT_INITIATION, KAT_SOURCE, 1.0))

    def test_response_path(self) -> None:
        """The same exchange works for a response sent by an under-load initiator."""
        checker = CookieChecker(SI_PUB, ScriptedRandom(seed=5))
        generator = CookieGenerator(SI_PUB)
        first = generator.add_macs(zero_macs(KAT_RESPONSE), 0.0)
        self.assertTrue(checker.check_mac1(first))
        self.assertFalse(checker.check_mac2(first, KAT_SOURCE, 0.0))
        reply = checker.create_reply(first, 0x55667788, KAT_SOURCE, 0.0)
        self.assertEqual(reply[4:8], (0x55667788).to_bytes(4, "little"))
        self.assertTrue(generator.consume_reply(reply, 0.5))
        second = generator.add_macs(zero_macs(KAT_RESPONSE), 1.0)
        self.assertTrue(checker.check_mac2(second, KAT_SOURCE, 1.0))

    def test_reply_needs_mac1_sent(self) -> None:
        """A reply is decrypted with the last mac1 sent as AD; with none sent, it is refused."""
        self.assertFalse(CookieGenerator(SR_PUB).consume_reply(KAT_COOKIE_REPLY, 0.0))

    def test_reply_accepted_once(self) -> None:
        """Like the kernel, a reply uses up the mac1 it answers, so a replay is refused."""
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertTrue(generator.consume_reply(KAT_COOKIE_REPLY, 0.0))
        self.assertFalse(generator.consume_reply(KAT_COOKIE_REPLY, 0.0))

    def test_reply_for_older_message(self) -> None:
        """A reply answering a mac1 other than the last one sent does not decrypt."""
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        other = bytearray(zero_macs(KAT_INITIATION))
        other[4] ^= 1  # a new sender index, so a new mac1
        generator.add_macs(bytes(other), 0.0)
        self.assertFalse(generator.consume_reply(KAT_COOKIE_REPLY, 0.0))

    def test_tampered_or_malformed_reply(self) -> None:
        """Any flipped bit in nonce or box, a wrong header or size: refused, no cookie kept."""
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        for position in list(range(4)) + list(range(8, 64)):
            bad = bytearray(KAT_COOKIE_REPLY)
            bad[position] ^= 0x20
            self.assertFalse(generator.consume_reply(bytes(bad), 0.0), f"byte {position}")
        self.assertFalse(generator.consume_reply(KAT_COOKIE_REPLY[:63], 0.0))
        self.assertFalse(generator.consume_reply(KAT_COOKIE_REPLY + b"\x00", 0.0))
        message = generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertEqual(message[132:], bytes(16))
        # The good reply still works: failures did not consume the mac1.
        self.assertTrue(generator.consume_reply(KAT_COOKIE_REPLY, 0.0))

    def test_cookie_from_other_responder(self) -> None:
        """A reply encrypted under another responder's key is refused."""
        generator = CookieGenerator(SI_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertFalse(generator.consume_reply(KAT_COOKIE_REPLY, 0.0))


class LifetimeTests(SynchronousTestCase):
    def test_initiator_cookie_lifetime(self) -> None:
        """The initiator uses a cookie for 120 - 5 = 115 s after receiving it, then zeros."""
        self.assertEqual(COOKIE_LIFETIME, 115.0)
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 100.0)
        self.assertTrue(generator.consume_reply(KAT_COOKIE_REPLY, 100.0))
        fresh = generator.add_macs(zero_macs(KAT_INITIATION), 214.9)
        self.assertEqual(fresh[132:], KAT_MAC2)
        stale = generator.add_macs(zero_macs(KAT_INITIATION), 215.0)
        self.assertEqual(stale[132:], bytes(16))

    def test_secret_rotates_after_120_s(self) -> None:
        """The responder's secret is replaced once 120 s old, so older cookies stop working."""
        checker = CookieChecker(SR_PUB, ScriptedRandom(seed=9))
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        reply = checker.create_reply(KAT_INITIATION, 0x11223344, KAT_SOURCE, 0.0)
        self.assertTrue(generator.consume_reply(reply, 0.0))
        message = generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertTrue(checker.check_mac2(message, KAT_SOURCE, 119.9))
        self.assertFalse(checker.check_mac2(message, KAT_SOURCE, 120.0))

    def test_secret_made_lazily_and_reused(self) -> None:
        """The secret is drawn on first use and reused for later cookies within its lifetime."""
        rng = ScriptedRandom(seed=3)
        checker = CookieChecker(SR_PUB, rng)
        self.assertEqual(rng.requests, [])
        checker.check_mac2(KAT_INITIATION, KAT_SOURCE, 0.0)
        checker.check_mac2(KAT_INITIATION, OTHER_SOURCE, 60.0)
        checker.create_reply(KAT_INITIATION, 1, KAT_SOURCE, 119.0)
        self.assertEqual(rng.requests, [32, 24])


class GarbageTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.binary(max_size=20))
    def test_checker_never_raises(self, data: bytes, source: bytes) -> None:
        """Arbitrary datagrams fail mac checks without raising."""
        checker = CookieChecker(SR_PUB, ScriptedRandom(seed=1))
        self.assertFalse(checker.check_mac1(data))
        self.assertFalse(checker.check_mac2(data, source, 0.0))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=60, max_size=68))
    def test_generator_refuses_garbage_replies(self, data: bytes) -> None:
        """Arbitrary cookie replies are refused without raising."""
        generator = CookieGenerator(SR_PUB)
        generator.add_macs(zero_macs(KAT_INITIATION), 0.0)
        self.assertFalse(generator.consume_reply(b"\x03\x00\x00\x00" + data[4:], 0.0))
        self.assertFalse(generator.consume_reply(data, 0.0))
