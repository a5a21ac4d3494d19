"""Secrets hygiene: key files others may read are named with a chmod hint; keys never appear in
the status document or the log; the control sockets are 0600 and answer no other user."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshguard.adapters.status_server import listen_status, socket_path
from meshguard.adapters.uapi_server import listen_uapi
from meshguard.app.node import Node
from meshguard.codecs.config import ConfigError, load_config, parse_config
from meshguard.codecs.uapi import DeviceStatus
from meshguard.core.crypto import generate_private_key

NOBODY = 65534


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PRIVATE = generate_private_key(lambda n: bytes([7]) * n)
PEER = bytes([9]) * 32
PSK = bytes([11]) * 32


def secret_forms(key: bytes) -> list[str]:
    return [b64(key), key.hex()]


class KeyFileModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name: str, text: str, mode: int) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def config_with_files(self, key_mode: int, psk_mode: int) -> list[str]:
        key = self.write("mg0.key", b64(PRIVATE) + "\n", key_mode)
        psk = self.write("peer.psk", b64(PSK) + "\n", psk_mode)
        conf = self.write(
            "mg0.conf",
            f"[Interface]\nPrivateKeyFile = {key}\n\n[Peer]\nPublicKey = {b64(PEER)}\n"
            f"PresharedKeyFile = {psk}\nAllowedIPs = 10.0.0.2/32\n",
            0o644,  # holds no key itself: no warning for it
        )
        return load_config(conf).warnings

    def test_loose_key_files_are_named_with_chmod(self) -> None:
        warnings = self.config_with_files(0o640, 0o604)
        key, psk = os.path.join(self.dir, "mg0.key"), os.path.join(self.dir, "peer.psk")
        self.assertEqual(
            warnings,
            [
                f"{key}: key file is readable by its group; run 'chmod 600 {key}'",
                f"{psk}: key file is world accessible; run 'chmod 600 {psk}'",
            ],
        )

    def test_tight_key_files_do_not_warn(self) -> None:
        self.assertEqual(self.config_with_files(0o600, 0o400), [])

    def test_group_readable_config_with_a_key(self) -> None:
        conf = self.write("mg1.conf", f"[Interface]\nPrivateKey = {b64(PRIVATE)}\n", 0o640)
        self.assertEqual(
            load_config(conf).warnings,
            [f"{conf}: holds a key and is readable by its group; run 'chmod 600 {conf}'"],
        )

    def test_nul_in_a_key_file_name_is_a_config_error(self) -> None:
        """Found by the config fuzz target: a NUL byte in PrivateKeyFile or PresharedKeyFile
        made open() raise ValueError out of the parser; now it is an error naming the line."""
        for key in ("PrivateKeyFile", "PresharedKeyFile"):
            text = (
                f"[Interface]\nPrivateKey = {b64(PRIVATE)}\n\n[Peer]\nPublicKey = {b64(PEER)}\n"
                if key == "PresharedKeyFile"
                else "[Interface]\n"
            ) + f"{key} = mi\0ssing\n"
            path = self.write(f"nul-{key}.conf", text, 0o600)
            error = self.assertRaises(ConfigError, load_config, path)
            self.assertIn("NUL byte", str(error))
            self.assertIn(f"{path}:", str(error))

    def test_warnings_never_show_the_key(self) -> None:
        warnings = " ".join(self.config_with_files(0o644, 0o644))
        for form in secret_forms(PRIVATE) + secret_forms(PSK):
            self.assertNotIn(form, warnings)


class StatusDocumentTests(SynchronousTestCase):
    def test_no_key_in_status_or_log(self) -> None:
        """The status document (what the control socket sends) and everything logged while
        the node is configured hold neither the private key nor a preshared key."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        clock.advance(1_700_000_000)
        node = Node("mgsec0", clock)
        config = parse_config(
            f"[Interface]\nPrivateKey = {b64(PRIVATE)}\nListenPort = 51820\n\n"
            f"[Peer]\nPublicKey = {b64(PEER)}\nPresharedKey = {b64(PSK)}\n"
            "AllowedIPs = 10.0.0.2/32\nEndpoint = 192.0.2.1:51820\n",
            "mg0.conf",
        )
        node.apply_config(config)
        node.apply_config(config, reload=True)
        text = json.dumps(node.status_document()) + repr(events)
        for form in secret_forms(PRIVATE) + secret_forms(PSK):
            self.assertNotIn(form, text)
        self.assertIn(b64(PEER), text)  # the document is really there


class _Backend:
    def status(self) -> DeviceStatus:
        return DeviceStatus(private_key=PRIVATE, listen_port=1, fwmark=0, peers=[])

    def apply(self, operations: object) -> None:
        raise AssertionError("no set expected")


class ControlSocketTests(TestCase):
    """Both control sockets are 0600; loosened by hand, they still answer only root and the
    node's user (SO_PEERCRED): a process running as nobody gets nothing."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("needs root to run a client as another user")
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        os.chmod(self.dir, 0o755)

    def as_nobody(self, path: str, request: bytes) -> Deferred[int]:
        """Fork a client that becomes nobody, connects and sends ``request``: its exit status
        is 0 when it got nothing back, 1 when it got an answer, 2 when it could not connect."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 3
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.settimeout(5)
                try:
                    client.connect(path)
                except OSError:
                    code = 2
                else:
                    try:
                        client.sendall(request)
                        code = 1 if client.recv(4096) else 0
                    except OSError:
                        code = 0
            finally:
                os._exit(code)

        def reap() -> int | Deferred[int]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            return deferLater(reactor, 0.02, reap)

        return deferLater(reactor, 0.02, reap)

    async def check(self, path: str, request: bytes) -> None:
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(await self.as_nobody(path, request), 2)  # the mode keeps nobody out
        os.chmod(path, 0o666)
        self.assertEqual(await self.as_nobody(path, request), 0)  # SO_PEERCRED does too
        # Root still gets its answer.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.setblocking(False)
        client.connect(path)
        client.sendall(request)
        deadline = time.monotonic() + 5
        got = b""
        while not got and time.monotonic() < deadline:
            await deferLater(reactor, 0.02, lambda: None)
            try:
                got = client.recv(4096)
            except BlockingIOError:
                pass
        self.assertTrue(got)

    async def test_status_socket(self) -> None:
        port = listen_status(reactor, "mgsec1", lambda: {"ok": True}, self.dir)
        self.addCleanup(port.stopListening)
        await self.check(socket_path("mgsec1", self.dir), b"")

    async def test_uapi_socket(self) -> None:
        port = listen_uapi(reactor, "mgsec2", _Backend(), self.dir)  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        await self.check(str(Path(self.dir) / "mgsec2.sock"), b"get=1\n\n")
