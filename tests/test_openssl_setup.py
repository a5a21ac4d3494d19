"""Loading cryptography's OpenSSL with AVX-512 off (meshguard.adapters.openssl_setup)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters import openssl_setup
from meshguard.adapters.openssl_setup import AVX512_OFF, BINDING, load_openssl

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LoadOpenSSLTests(SynchronousTestCase):
    """The mask is in the environment exactly while the binding loads, and only when the user
    set none and nothing loaded the binding before."""

    def loader(self, environ: dict[str, str], modules: dict[str, object]) -> list[str | None]:
        seen: list[str | None] = []

        def load(name: str) -> object:
            self.assertEqual(name, BINDING)
            seen.append(environ.get("OPENSSL_ia32cap"))
            modules[name] = object()
            return modules[name]

        self.load = load
        return seen

    def test_mask_set_while_loading_then_removed(self) -> None:
        environ = {"PATH": "/bin"}
        modules: dict[str, object] = {}
        seen = self.loader(environ, modules)
        self.assertEqual(load_openssl(environ, modules, self.load), "avx512-off")
        self.assertEqual(seen, [AVX512_OFF])
        self.assertEqual(environ, {"PATH": "/bin"})
        self.assertIn(BINDING, modules)

    def test_a_mask_the_user_set_is_kept(self) -> None:
        """Even an empty one (OpenSSL's own choice)."""
        for mask in ("", "~0x200000000000000"):
            environ = {"OPENSSL_ia32cap": mask}
            modules: dict[str, object] = {}
            seen = self.loader(environ, modules)
            self.assertEqual(load_openssl(environ, modules, self.load), "user-mask")
            self.assertEqual(seen, [mask])
            self.assertEqual(environ, {"OPENSSL_ia32cap": mask})

    def test_too_late_once_loaded(self) -> None:
        environ: dict[str, str] = {}
        modules: dict[str, object] = {BINDING: object()}
        seen = self.loader(environ, modules)
        self.assertEqual(load_openssl(environ, modules, self.load), "loaded-before")
        self.assertEqual(seen, [])
        self.assertEqual(environ, {})

    def test_environment_restored_when_loading_fails(self) -> None:
        environ: dict[str, str] = {}

        def broken(name: str) -> object:
            raise ImportError("no binding")

        self.assertRaises(ImportError, load_openssl, environ, {}, broken)
        self.assertEqual(environ, {})

    def test_setup_runs_once(self) -> None:
        """``import meshguard`` ran it; a later call reports that run."""
        self.assertIn(openssl_setup.setup(), ("avx512-off", "user-mask", "loaded-before"))
        self.assertEqual(openssl_setup.setup(), openssl_setup.setup())

    def test_importing_meshguard_first_turns_avx512_off(self) -> None:
        """In a fresh interpreter: importing meshguard loads the binding with the mask and
        leaves the environment as it found it; a user's mask is kept; importing cryptography
        first leaves OpenSSL alone."""
        script = (
            "import json, os, sys\n"
            "if sys.argv[1] == 'first': import cryptography.hazmat.bindings._rust\n"
            "import meshguard\n"
            "from meshguard.adapters.openssl_setup import setup\n"
            "print(json.dumps([setup(), os.environ.get('OPENSSL_ia32cap'),"
            " 'cryptography.hazmat.bindings._rust' in sys.modules]))\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
        env["PYTHONPATH"] = _REPO

        def run(mode: str, **extra: str) -> list[object]:
            out = subprocess.run(
                [sys.executable, "-c", script, mode],
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            result: list[object] = json.loads(out.stdout)
            return result

        self.assertEqual(run("plain"), ["avx512-off", None, True])
        self.assertEqual(run("plain", OPENSSL_ia32cap=""), ["user-mask", "", True])
        self.assertEqual(run("first"), ["loaded-before", None, True])
