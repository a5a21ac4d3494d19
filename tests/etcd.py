"""A real etcd (Debian's etcd-server) for tests: started in a temporary directory, stopped after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import unittest
import urllib.request

from tests.netns import wait_for


def require_etcd(testcase: unittest.TestCase) -> str:
    """The etcd binary; skip without it, fail on CI (where .ci/run installs etcd-server)."""
    path = shutil.which("etcd")
    if path is None:
        if os.environ.get("CI") == "true":
            raise testcase.failureException("etcd is missing (apt-get install etcd-server)")
        raise unittest.SkipTest("etcd is not installed")
    return path


def etcd_argv(binary: str, data_dir: str, host: str, client: int, peer: int) -> list[str]:
    return [
        binary,
        "--name", "t",
        "--data-dir", data_dir,
        "--listen-client-urls", f"http://{host}:{client}",
        "--advertise-client-urls", f"http://{host}:{client}",
        "--listen-peer-urls", f"http://{host}:{peer}",
        "--initial-advertise-peer-urls", f"http://{host}:{peer}",
        "--initial-cluster", f"t=http://{host}:{peer}",
    ]  # fmt: skip


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return b'"true"' in response.read()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_loopback_etcd(testcase: unittest.TestCase) -> str:
    """An etcd on 127.0.0.1 (free ports), stopped at cleanup; returns its client URL."""
    binary = require_etcd(testcase)
    data = tempfile.mkdtemp(prefix="meshguard-etcd-")
    client, peer = _free_port(), _free_port()
    log = open(os.path.join(data, "etcd.log"), "wb")
    process = subprocess.Popen(
        etcd_argv(binary, os.path.join(data, "d"), "127.0.0.1", client, peer),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def stop() -> None:
        process.kill()
        process.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)

    testcase.addCleanup(stop)
    url = f"http://127.0.0.1:{client}"
    wait_for(lambda: healthy(url), timeout=20, what="etcd to answer")
    return url
