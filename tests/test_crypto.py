"""Tests for meshguard.core.crypto: known answers for every primitive WireGuard names."""

import ast
import hashlib
import inspect
import random
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

import meshguard.core.cookie
import meshguard.core.crypto
import meshguard.core.messages
import meshguard.core.noise
from meshguard.core.crypto import (
    C0,
    CONSTRUCTION,
    H0,
    IDENTIFIER,
    LABEL_COOKIE,
    LABEL_MAC1,
    TRANSPORT_NONCE,
    CryptoError,
    InvalidTag,
    TransportCipher,
    aead_decrypt,
    aead_encrypt,
    blake2s,
    clamp,
    dh,
    generate_private_key,
    hmac_blake2s,
    kdf1,
    kdf2,
    kdf3,
    mac,
    public_key,
    tai64n,
    xaead_decrypt,
    xaead_encrypt,
)

#: wireguard-go device/kdf_test.go: (key, input) -> (T1, T2, T3).
KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]

#: Points of small order on Curve25519 (u-coordinates); X25519 with any of them is all zero.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    ((1 << 255) - 20).to_bytes(32, "little"),  # p - 1
    ((1 << 255) - 19).to_bytes(32, "little"),  # p, i.e. 0
    ((1 << 255) - 18).to_bytes(32, "little"),  # p + 1, i.e. 1
]

FORBIDDEN_IMPORTS = {"twisted.internet", "socket", "select", "time", "os"}


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


class ConstantsTests(SynchronousTestCase):
    def test_labels(self) -> None:
        """The protocol strings have the exact lengths the spec gives (no NUL terminators)."""
        self.assertEqual(len(CONSTRUCTION), 37)
        self.assertEqual(len(IDENTIFIER), 34)
        self.assertEqual((LABEL_MAC1, LABEL_COOKIE), (b"mac1----", b"cookie--"))

    def test_initial_chaining_key_and_hash(self) -> None:
        """C0 and H0 match the digest (C0 also matches wireguard-rs's hard-coded value)."""
        self.assertEqual(
            C0.hex(), "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
        )
        self.assertEqual(
            H0.hex(), "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
        )


class HashTests(SynchronousTestCase):
    def test_blake2s_rfc7693(self) -> None:
        """HASH is plain BLAKE2s-256 (RFC 7693 appendix B: "abc")."""
        self.assertEqual(
            blake2s(b"abc").hex(),
            "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982",
        )

    @given(st.lists(st.binary(max_size=80), max_size=6))
    def test_blake2s_of_parts_is_hash_of_concatenation(self, parts: list[bytes]) -> None:
        """Passing parts is only a shortcut for hashing their concatenation."""
        self.assertEqual(blake2s(*parts), hashlib.blake2s(b"".join(parts)).digest())

    def test_mac_is_keyed_blake2s_16(self) -> None:
        """MAC uses BLAKE2s's own key parameter and a 16-byte digest, not HMAC or truncation."""
        key, data = b"k" * 32, b"data"
        out = mac(key, data)
        self.assertEqual(len(out), 16)
        self.assertEqual(out, hashlib.blake2s(data, key=key, digest_size=16).digest())
        self.assertNotEqual(out, hashlib.blake2s(data, key=key).digest()[:16])

    def test_cookie_mac_known_answer(self) -> None:
        """MAC with a 32-byte key over the digest's cookie source bytes gives its cookie."""
        secret = blake2s(b"meshguard KAT cookie secret")
        source = bytes.fromhex("c0000201ca6c")
        self.assertEqual(mac(secret, source).hex(), "08d2a9a09743c651baaceab89543e5e6")

    def test_hmac_blake2s_block_size(self) -> None:
        """HMAC uses BLAKE2s's 64-byte block, so keys longer than 64 bytes are hashed first."""
        long_key = b"x" * 65
        self.assertEqual(
            hmac_blake2s(long_key, b"m"),
            hmac_blake2s(hashlib.blake2s(long_key).digest(), b"m"),
        )
        self.assertEqual(len(hmac_blake2s(b"", b"")), 32)


class KDFTests(SynchronousTestCase):
    def test_kdf_vectors(self) -> None:
        """KDF1/2/3 reproduce wireguard-go's kdf_test.go vectors."""
        for key_hex, input_hex, t1, t2, t3 in KDF_VECTORS:
            key, data = bytes.fromhex(key_hex), bytes.fromhex(input_hex)
            self.assertEqual(kdf1(key, data).hex(), t1)
            self.assertEqual([t.hex() for t in kdf2(key, data)], [t1, t2])
            self.assertEqual([t.hex() for t in kdf3(key, data)], [t1, t2, t3])


class X25519Tests(SynchronousTestCase):
    def test_clamp(self) -> None:
        """Clamping clears the low three bits and the top bit and sets bit 254."""
        clamped = clamp(b"\xff" * 32)
        self.assertEqual(clamped[0], 0xF8)
        self.assertEqual(clamped[31], 0x7F)
        self.assertEqual(clamp(bytes(32))[31], 0x40)
        self.assertEqual(clamp(clamped), clamped)

    def test_clamp_rejects_wrong_length(self) -> None:
        """A private key must be 32 bytes."""
        self.assertRaises(CryptoError, clamp, bytes(31))

    def test_generate_private_key_uses_injected_random(self) -> None:
        """Keys come from the injected source, clamped, so tests are deterministic."""
        a = generate_private_key(seeded(1).randbytes)
        b = generate_private_key(seeded(1).randbytes)
        self.assertEqual(a, b)
        self.assertEqual(a, clamp(seeded(1).randbytes(32)))

    def test_public_key_known_answers(self) -> None:
        """The digest's KAT static keys derive the published public keys."""
        si = clamp(blake2s(b"meshguard KAT initiator static"))
        sr = clamp(blake2s(b"meshguard KAT responder static"))
        self.assertEqual(
            si.hex(), "08698e5fbc7a81dcfe8c97b5b40519537f503faa1d360d02f67dfa2a818a6269"
        )
        self.assertEqual(
            public_key(si).hex(),
            "c371991a6e9ee8f98230cf01cf090d68136dd18c1f98348a9c7c7100f517a155",
        )
        self.assertEqual(
            public_key(sr).hex(),
            "7a569cb15d495a319753a9ef92a743d23832d63498713684fe0f0163577f4a3b",
        )

    def test_dh_matches_openssl(self) -> None:
        """X25519 via libsodium agrees with OpenSSL's (through cryptography) both ways."""
        rng = seeded(7)
        for _ in range(20):
            a = generate_private_key(rng.randbytes)
            b = generate_private_key(rng.randbytes)
            shared = dh(a, public_key(b))
            self.assertEqual(shared, dh(b, public_key(a)))
            oracle = X25519PrivateKey.from_private_bytes(a).exchange(
                X25519PublicKey.from_public_bytes(public_key(b))
            )
            self.assertEqual(shared, oracle)

    def test_dh_rejects_low_order_points(self) -> None:
        """An all-zero shared secret is an error, so low-order peer keys are refused."""
        private = generate_private_key(seeded(3).randbytes)
        for point in LOW_ORDER_POINTS:
            self.assertRaises(CryptoError, dh, private, point)

    def test_dh_rejects_wrong_lengths(self) -> None:
        """Malformed inputs raise CryptoError, not a library-specific exception."""
        key = generate_private_key(seeded(4).randbytes)
        self.assertRaises(CryptoError, dh, key[:31], public_key(key))
        self.assertRaises(CryptoError, dh, key, public_key(key) + b"\x00")
        self.assertRaises(CryptoError, public_key, key[:16])


class AEADTests(SynchronousTestCase):
    key = bytes(range(32))

    def test_nonce_layout(self) -> None:
        """The nonce is four zero bytes then the counter as a little-endian u64."""
        counter = 0x0102030405060708
        nonce = b"\x00" * 4 + struct.pack("<Q", counter)
        expected = ChaCha20Poly1305(self.key).encrypt(nonce, b"payload", b"ad")
        self.assertEqual(aead_encrypt(self.key, counter, b"payload", b"ad"), expected)

    def test_round_trip_and_tamper(self) -> None:
        """Decryption returns the plaintext; any change to key, counter, AD or box raises."""
        box = aead_encrypt(self.key, 5, b"hello", b"ad")
        self.assertEqual(len(box), 5 + 16)
        self.assertEqual(aead_decrypt(self.key, 5, box, b"ad"), b"hello")
        self.assertRaises(CryptoError, aead_decrypt, self.key, 6, box, b"ad")
        self.assertRaises(CryptoError, aead_decrypt, self.key, 5, box, b"ax")
        self.assertRaises(CryptoError, aead_decrypt, bytes(32), 5, box, b"ad")
        for i in range(len(box)):
            bad = bytearray(box)
            bad[i] ^= 1
            self.assertRaises(CryptoError, aead_decrypt, self.key, 5, bytes(bad), b"ad")
        self.assertRaises(CryptoError, aead_decrypt, self.key, 5, box[:15], b"ad")

    def test_empty_plaintext_is_tag_only(self) -> None:
        """AEAD(κ, 0, ε, H) is the 16-byte tag that fills the response's empty field."""
        box = aead_encrypt(self.key, 0, b"", b"h")
        self.assertEqual(len(box), 16)
        self.assertEqual(aead_decrypt(self.key, 0, box, b"h"), b"")

    def test_xaead_round_trip_and_tamper(self) -> None:
        """XChaCha20-Poly1305 round-trips and refuses a wrong AD, nonce or key."""
        nonce = bytes(range(24))
        box = xaead_encrypt(self.key, nonce, b"cookie-cookie-16", b"mac1")
        self.assertEqual(len(box), 32)
        self.assertEqual(xaead_decrypt(self.key, nonce, box, b"mac1"), b"cookie-cookie-16")
        self.assertRaises(CryptoError, xaead_decrypt, self.key, nonce, box, b"mac2")
        self.assertRaises(CryptoError, xaead_decrypt, self.key, bytes(24), box, b"mac1")
        self.assertRaises(CryptoError, xaead_decrypt, bytes(32), nonce, box, b"mac1")
        self.assertRaises(CryptoError, xaead_decrypt, self.key, nonce[:12], box, b"mac1")
        self.assertRaises(CryptoError, xaead_encrypt, self.key, nonce[:12], b"", b"")

    def test_xaead_is_not_aead(self) -> None:
        """XAEAD uses HChaCha20 on the nonce, so it is not ChaCha20-Poly1305 with a cut nonce."""
        box = xaead_encrypt(self.key, bytes(24), b"x", b"")
        self.assertNotEqual(box, aead_encrypt(self.key, 0, b"x", b""))


class TransportCipherTests(SynchronousTestCase):
    key = blake2s(b"transport key")

    def test_matches_aead_with_empty_ad(self) -> None:
        """The fast path is exactly AEAD with empty additional data."""
        cipher = TransportCipher(self.key)
        for counter in (0, 1, 255, 1 << 40, (1 << 64) - 1):
            self.assertEqual(
                cipher.seal(counter, b"packet"), aead_encrypt(self.key, counter, b"packet", b"")
            )

    @given(st.integers(0, (1 << 64) - 1), st.binary(max_size=300))
    def test_round_trip(self, counter: int, plaintext: bytes) -> None:
        """What one side seals the other side's cipher with the same key opens."""
        box = TransportCipher(self.key).seal(counter, plaintext)
        self.assertEqual(TransportCipher(self.key).open(counter, box), plaintext)

    def test_tamper_returns_none(self) -> None:
        """A flipped bit, wrong counter, wrong key or truncated box is None, not an exception."""
        cipher = TransportCipher(self.key)
        box = cipher.seal(9, b"some ip packet")
        self.assertIsNone(cipher.open(10, box))
        self.assertIsNone(TransportCipher(bytes(32)).open(9, box))
        for i in range(len(box)):
            bad = bytearray(box)
            bad[i] ^= 0x80
            self.assertIsNone(cipher.open(9, bytes(bad)))
        for size in (0, 1, 15, 16):
            self.assertIsNone(cipher.open(9, box[:size]))

    @given(st.integers(0, (1 << 64) - 1), st.binary(max_size=100))
    def test_garbage_returns_none(self, counter: int, data: bytes) -> None:
        """Arbitrary bytes never raise and never authenticate."""
        self.assertIsNone(TransportCipher(self.key).open(counter, data))

    def test_zero(self) -> None:
        """After zero() nothing opens, and sealing is refused as local misuse."""
        cipher = TransportCipher(self.key)
        box = cipher.seal(0, b"")
        self.assertFalse(cipher.zeroed)
        cipher.zero()
        self.assertTrue(cipher.zeroed)
        self.assertIsNone(cipher.open(0, box))
        self.assertRaises(CryptoError, cipher.seal, 1, b"")

    @given(st.integers(0, (1 << 64) - 1), st.binary(max_size=300))
    def test_batch_calls_match_seal_and_open(self, counter: int, plaintext: bytes) -> None:
        """The bound calls a batch loop uses, with TRANSPORT_NONCE, seal and open exactly as
        seal() and open() do; the nonce's last eight bytes are the counter field."""
        cipher = TransportCipher(self.key)
        nonce = TRANSPORT_NONCE(counter)
        self.assertEqual(nonce, bytes(4) + counter.to_bytes(8, "little"))
        box = cipher.encryptor()(nonce, plaintext, None)
        self.assertEqual(box, cipher.seal(counter, plaintext))
        decrypt = cipher.decryptor()
        assert decrypt is not None
        self.assertEqual(decrypt(nonce, memoryview(box), None), plaintext)
        self.assertRaises(InvalidTag, decrypt, TRANSPORT_NONCE(counter ^ 1), box, None)

    def test_batch_calls_after_zero(self) -> None:
        """Once zeroed, the batch encryptor is refused and there is no decryptor."""
        cipher = TransportCipher(self.key)
        cipher.zero()
        self.assertRaises(CryptoError, cipher.encryptor)
        self.assertIsNone(cipher.decryptor())

    def test_rejects_short_key(self) -> None:
        """A transport key is 32 bytes."""
        self.assertRaises(CryptoError, TransportCipher, bytes(16))

    def test_reuses_one_cipher_object(self) -> None:
        """The key object is built once, not per packet."""
        cipher = TransportCipher(self.key)
        before = cipher._aead
        cipher.seal(0, b"a")
        cipher.open(0, cipher.seal(1, b"b"))
        self.assertIs(cipher._aead, before)


class TAI64NTests(SynchronousTestCase):
    def test_known_answers(self) -> None:
        """Unix time maps to 2**62 + 10 + seconds, big-endian, then nanoseconds."""
        self.assertEqual(tai64n(1700000000.0).hex(), "400000006553f10a00000000")
        self.assertEqual(tai64n(0.0).hex(), "400000000000000a00000000")

    def test_nanoseconds_rounded_down_to_2_24(self) -> None:
        """Like wg-go, the nanoseconds lose their low 24 bits."""
        stamp = tai64n(1700000000.5)
        (nanoseconds,) = struct.unpack(">I", stamp[8:])
        self.assertEqual(nanoseconds, 500_000_000 & ~0xFFFFFF)
        self.assertEqual(tai64n(1700000000.01)[8:], bytes(4))  # 10 ms < 2**24 ns

    @given(
        st.floats(0, 4e9, allow_nan=False, allow_infinity=False),
        st.floats(0, 4e9, allow_nan=False, allow_infinity=False),
    )
    def test_monotonic(self, a: float, b: float) -> None:
        """Byte order follows time order, which is what the peer's replay check compares."""
        low, high = sorted((a, b))
        self.assertLessEqual(tai64n(low), tai64n(high))
        self.assertEqual(len(tai64n(a)), 12)
        (nanoseconds,) = struct.unpack(">I", tai64n(a)[8:])
        self.assertLess(nanoseconds, 1_000_000_000)
        self.assertEqual(nanoseconds % (1 << 24), 0)


class CoreImportTests(SynchronousTestCase):
    def test_no_io_imports(self) -> None:
        """The crypto layer stays sans-I/O: no reactor, sockets, clocks or os."""
        for module in (
            meshguard.core.crypto,
            meshguard.core.messages,
            meshguard.core.noise,
            meshguard.core.cookie,
        ):
            tree = ast.parse(inspect.getsource(module))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    for forbidden in FORBIDDEN_IMPORTS:
                        self.assertFalse(
                            name == forbidden or name.startswith(forbidden + "."),
                            f"{module.__name__} imports {name}",
                        )
