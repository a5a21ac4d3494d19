"""A short run of every atheris fuzz target in tests/fuzz/ (the long run: docs/hardening.md).

Each target runs in its own process for a bounded number of inputs and seconds, from its seed
corpus; new inputs go to a temporary directory, never into the repository. A crash (an
exception the parser does not promise, a failed invariant) fails the test with the fuzzer's
output, which names the input that did it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

FUZZ = Path(__file__).resolve().parent / "fuzz"
TARGETS = ("messages", "responder", "cookie", "mesh_control", "relay_frames", "uapi", "config")
RUNS = 3000
SECONDS = 4


class FuzzSmokeTests(TestCase):
    def setUp(self) -> None:
        if importlib.util.find_spec("atheris") is None:
            if os.environ.get("CI") == "true":
                self.fail("atheris is not installed (setup.cfg's test extras list it)")
            raise SkipTest("atheris is not installed")

    def run_target(self, name: str) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir(parents=True)
        script = FUZZ / f"fuzz_{name}.py"
        corpus = FUZZ / "corpus" / name
        self.assertTrue(any(corpus.iterdir()), f"{corpus} has no seeds")
        argv = [
            sys.executable,
            str(script),
            str(work),
            str(corpus),
            f"-runs={RUNS}",
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={work}/",
            "-print_final_stats=1",
        ]
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=SECONDS + 120, cwd=str(FUZZ)
        )
        self.assertEqual(cp.returncode, 0, f"{name}: {cp.stderr[-3000:]}")
        self.assertIn("Done", cp.stderr, cp.stderr[-2000:])

    def test_messages(self) -> None:
        self.run_target("messages")

    def test_responder(self) -> None:
        self.run_target("responder")

    def test_cookie(self) -> None:
        self.run_target("cookie")

    def test_mesh_control(self) -> None:
        self.run_target("mesh_control")

    def test_relay_frames(self) -> None:
        self.run_target("relay_frames")

    def test_uapi(self) -> None:
        self.run_target("uapi")

    def test_config(self) -> None:
        self.run_target("config")

    def test_every_target_is_run(self) -> None:
        on_disk = {p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py")}
        self.assertEqual(on_disk, set(TARGETS))
