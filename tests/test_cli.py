"""Tests for the `meshguard` command: key tools in `wg` format, check-config and status."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult_base
from twisted.trial.unittest import SynchronousTestCase

from meshguard.app import cli
from meshguard.codecs import keys

KEY_LINE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\n")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counting_random(n: int) -> bytes:
    return bytes(range(n))


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err


def run(argv: list[str], stdin: bytes = b"") -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(argv, io.BytesIO(stdin), out, err, urandom=counting_random)
    return Result(code, out.getvalue(), err.getvalue())


class KeyCommandTests(SynchronousTestCase):
    """genkey, pubkey and genpsk print keys exactly like wg."""

    def test_genkey_format(self) -> None:
        """genkey prints one 44-character base64 key and a newline, clamped."""
        result = run(["genkey"])
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertRegex(result.out, KEY_LINE)
        self.assertEqual(keys.key_from_base64(result.out.strip()), keys.clamp(bytes(range(32))))

    def test_genkey_real_random(self) -> None:
        """With os.urandom, two keys differ and both are clamped."""
        out1, out2 = io.StringIO(), io.StringIO()
        cli.run(["genkey"], io.BytesIO(), out1, io.StringIO())
        cli.run(["genkey"], io.BytesIO(), out2, io.StringIO())
        self.assertNotEqual(out1.getvalue(), out2.getvalue())
        for out in (out1, out2):
            key = keys.key_from_base64(out.getvalue().strip())
            self.assertEqual(key, keys.clamp(key))

    def test_genpsk_format(self) -> None:
        """genpsk prints 32 random bytes, unclamped, in the same format."""
        result = run(["genpsk"])
        self.assertEqual(result.code, 0)
        self.assertRegex(result.out, KEY_LINE)
        self.assertEqual(keys.key_from_base64(result.out.strip()), bytes(range(32)))

    def test_genkey_then_pubkey(self) -> None:
        """`meshguard genkey | meshguard pubkey` gives nacl's public key."""
        private_line = run(["genkey"]).out
        result = run(["pubkey"], private_line.encode())
        self.assertEqual((result.code, result.err), (0, ""))
        self.assertRegex(result.out, KEY_LINE)
        private = keys.key_from_base64(private_line.strip())
        self.assertEqual(
            keys.key_from_base64(result.out.strip()), crypto_scalarmult_base(keys.clamp(private))
        )

    def test_pubkey_accepts_trailing_space_and_nul(self) -> None:
        """Like wg, whitespace and NULs after the key are fine, a missing newline too."""
        key = keys.key_to_base64(bytes(range(32)))
        expected = run(["pubkey"], key.encode()).out
        self.assertEqual(run(["pubkey"], (key + " \n\t\x00\n").encode()).out, expected)

    def test_pubkey_errors(self) -> None:
        """Bad input exits 1 with wg's messages and nothing on stdout."""
        key = keys.key_to_base64(bytes(range(32)))
        cases = {
            b"": "Key is not the correct length or format",
            b"short\n": "Key is not the correct length or format",
            key[:-1].encode() + b"!": "Key is not the correct length or format",
            (key[:42] + "B=").encode(): "Key is not the correct length or format",
            (key + " x").encode(): "Trailing characters found after key",
            (" " + key).encode(): "Trailing characters found after key",
            b"\xff" * 44: "Key is not the correct length or format",
        }
        for data, message in cases.items():
            result = run(["pubkey"], data)
            self.assertEqual(result.code, 1, data)
            self.assertEqual(result.out, "")
            self.assertEqual(result.err, f"meshguard pubkey: {message}\n")

    def test_world_accessible_warning(self) -> None:
        """Writing a key to a file others can read warns on stderr, as wg genkey does."""
        with tempfile.TemporaryDirectory() as directory:
            for mode, warned in ((0o644, True), (0o600, False)):
                path = os.path.join(directory, f"key{mode:o}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
                os.fchmod(fd, mode)
                with os.fdopen(fd, "w") as out:
                    err = io.StringIO()
                    self.assertEqual(cli.run(["genkey"], io.BytesIO(), out, err), 0)
                self.assertEqual("world accessible" in err.getvalue(), warned)
                with open(path) as f:
                    self.assertRegex(f.read(), KEY_LINE)


class ProcessTests(SynchronousTestCase):
    """The console entry point in real processes, and against the wg tool when present."""

    def meshguard(self, *args: str, stdin: bytes = b"") -> bytes:
        env = dict(os.environ, PYTHONPATH=REPO)
        return subprocess.run(
            [sys.executable, "-m", "meshguard.app.cli", *args],
            input=stdin,
            capture_output=True,
            check=True,
            env=env,
            cwd=REPO,
        ).stdout

    def test_pipe(self) -> None:
        """`meshguard genkey | meshguard pubkey` works across processes."""
        private = self.meshguard("genkey")
        self.assertRegex(private.decode(), KEY_LINE)
        public = self.meshguard("pubkey", stdin=private)
        expected = crypto_scalarmult_base(keys.key_from_base64(private.decode().strip()))
        self.assertEqual(keys.key_from_base64(public.decode().strip()), expected)

    def test_against_wg(self) -> None:
        """`wg pubkey` and `meshguard pubkey` agree on each other's keys."""
        wg = shutil.which("wg")
        if wg is None:
            raise self.skipTest("the wg tool is not installed")
        ours = self.meshguard("genkey")
        theirs = subprocess.run([wg, "genkey"], capture_output=True, check=True).stdout
        self.assertRegex(theirs.decode(), KEY_LINE)
        for private in (ours, theirs, (keys.key_to_base64(bytes(32)) + "\n").encode()):
            expected = subprocess.run(
                [wg, "pubkey"], input=private, capture_output=True, check=True
            ).stdout
            self.assertEqual(self.meshguard("pubkey", stdin=private), expected)


class CheckConfigTests(SynchronousTestCase):
    """check-config: OK with a peer count, or the one-line error and exit 1."""

    def write(self, text: str) -> str:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "mg0.conf")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path

    def test_ok(self) -> None:
        private = keys.key_to_base64(keys.clamp(bytes(range(32))))
        peers = "".join(
            f"[Peer]\nPublicKey = {keys.key_to_base64(keys.pubkey(bytes([i]) * 32))}\n"
            for i in (1, 2)
        )
        path = self.write(f"[Interface]\nPrivateKey = {private}\n{peers}")
        result = run(["check-config", path])
        self.assertEqual((result.code, result.out, result.err), (0, f"{path}: OK, 2 peers\n", ""))

    def test_one_peer_and_warnings(self) -> None:
        """Warnings go to stderr; the count is singular for one peer."""
        public = keys.key_to_base64(keys.pubkey(bytes([1]) * 32))
        path = self.write(f"[Interface]\nDNS = 1.1.1.1\n[Peer]\nPublicKey = {public}\n")
        result = run(["check-config", path])
        self.assertEqual((result.code, result.out), (0, f"{path}: OK, 1 peer\n"))
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.startswith(f"warning: {path}") for line in lines))

    def test_error(self) -> None:
        path = self.write("[Interface]\nListenPort = 70000\n")
        result = run(["check-config", path])
        self.assertEqual(result.code, 1)
        self.assertEqual(result.out, "")
        self.assertEqual(
            result.err, f"{path}:2: ListenPort '70000' is not a number from 0 to 65535\n"
        )

    def test_missing(self) -> None:
        result = run(["check-config", "/nonexistent/mg0.conf"])
        self.assertEqual(result.code, 1)
        self.assertEqual(
            result.err,
            "/nonexistent/mg0.conf: cannot read config file: No such file or directory\n",
        )


class StatusTests(SynchronousTestCase):
    """status hands over to meshguard.app.status_client when it exists."""

    def test_not_available(self) -> None:
        self.patch(cli, "STATUS_MODULE", "meshguard._no_such_status_client")
        result = run(["status", "mg0"])
        self.assertEqual((result.code, result.err), (1, "status: not available\n"))

    def test_delegates(self) -> None:
        calls: list[tuple[str | None, bool]] = []

        def main(name: str | None, as_json: bool) -> int:
            calls.append((name, as_json))
            return 3

        module = types.ModuleType("meshguard._fake_status_client")
        module.main = main  # type: ignore[attr-defined]
        sys.modules["meshguard._fake_status_client"] = module
        self.addCleanup(sys.modules.pop, "meshguard._fake_status_client")
        self.patch(cli, "STATUS_MODULE", "meshguard._fake_status_client")
        self.assertEqual(run(["status"]).code, 3)
        self.assertEqual(run(["status", "mg1", "--json"]).code, 3)
        self.assertEqual(calls, [(None, False), ("mg1", True)])


class UsageTests(SynchronousTestCase):
    """argparse exits become return codes, and its output goes to the given streams."""

    def test_no_command(self) -> None:
        result = run([])
        self.assertEqual(result.code, 2)
        self.assertIn("usage: meshguard", result.err)

    def test_help(self) -> None:
        result = run(["--help"])
        self.assertEqual(result.code, 0)
        for command in ("genkey", "pubkey", "genpsk", "check-config", "status", "ping", "netcheck"):
            self.assertIn(command, result.out)

    def test_unknown_command(self) -> None:
        self.assertEqual(run(["frobnicate"]).code, 2)


class KeyEncodingTests(SynchronousTestCase):
    """meshguard.codecs.keys: strict base64/hex codecs whose errors never contain the input."""

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=32, max_size=32))
    def test_round_trips(self, key: bytes) -> None:
        self.assertEqual(keys.key_from_base64(keys.key_to_base64(key)), key)
        self.assertEqual(keys.key_from_hex(keys.key_to_hex(key)), key)
        self.assertEqual(keys.key_from_hex(keys.key_to_hex(key).upper()), key)
        self.assertEqual(len(keys.key_to_base64(key)), 44)
        clamped = keys.clamp(key)
        self.assertEqual((clamped[0] & 7, clamped[31] >> 6), (0, 1))
        self.assertEqual(keys.clamp(clamped), clamped)
        self.assertEqual(keys.pubkey(key), keys.pubkey(clamped))

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=70))
    def test_garbage_raises_value_error_without_input(self, text: str) -> None:
        for decode in (keys.key_from_base64, keys.key_from_hex):
            try:
                decode(text)
            except ValueError as e:
                self.assertIn(
                    str(e),
                    (
                        "not a base64 WireGuard key (44 characters ending in '=')",
                        "not a hex WireGuard key (64 hex digits)",
                    ),
                )

    def test_rejects_near_misses(self) -> None:
        key = keys.key_to_base64(bytes(range(32)))
        for bad in (
            key[:-1],
            key + "=",
            key[:-1] + "A",
            key[:42] + "B=",
            " " + key[1:],
            key[:-2] + "==",
        ):
            self.assertRaises(ValueError, keys.key_from_base64, bad)
        self.assertRaises(ValueError, keys.key_from_hex, "0" * 63)
        self.assertRaises(ValueError, keys.key_from_hex, "g" * 64)
        self.assertRaises(ValueError, keys.key_to_base64, b"short")
