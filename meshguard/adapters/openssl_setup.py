"""Load OpenSSL (``cryptography``'s) with its AVX-512 code paths off, before anything else does.

Every transport message is one ChaCha20-Poly1305 call of at most an MTU through
``cryptography``, whose bundled OpenSSL picks its code by CPU at load. On a CPU with AVX-512
it takes the AVX-512 ChaCha20 and Poly1305, which win on long buffers and lose on packets:
measured here (one CPU pinned, best of 7, a Xeon with AVX-512, OpenSSL 4.0), a 1,424-byte
seal took 1.71-1.73 us with them and 1.24 us with the AVX2 code, a 16-byte one 1.07-1.15
against 0.57; only at 8 KiB did AVX-512 pay (3.35 against 3.85 us). A bulk segment passes the
AEAD twice (seal and open), so this is about a quarter of the AEAD's cost, the largest item of
both nodes' profiles (docs/datapath.md, "OpenSSL's AVX-512 code off"). wireguard-go's
ChaCha20-Poly1305 is AVX2 code too.

OpenSSL reads its CPU capability mask, ``OPENSSL_ia32cap``, once, from the environment, when
the library is loaded. So :func:`load_openssl` sets the mask that clears AVX512F, loads the
binding, and takes the variable out of the environment again (child processes, such as
PostUp scripts running ``openssl``, see the environment the node was started with). A mask
the user set is left alone: ``OPENSSL_ia32cap=`` (empty) keeps OpenSSL's own choice. If the
binding was loaded before meshguard (a program that imported ``cryptography`` first), it is
too late, and nothing is changed.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Final

__all__ = ["AVX512_OFF", "BINDING", "load_openssl", "setup"]

#: The module whose loading loads OpenSSL (``cryptography``'s Rust binding, OpenSSL linked in).
BINDING: Final = "cryptography.hazmat.bindings._rust"
#: ``OPENSSL_ia32cap``'s second word is CPUID leaf 7's EBX (low half) and ECX; ``~`` clears
#: the bits given: bit 16 of EBX is AVX512F, and every AVX-512 path of OpenSSL requires it.
AVX512_OFF: Final = ":~0x10000"

#: What :func:`setup` found, once it ran.
_state: str | None = None


def load_openssl(
    environ: MutableMapping[str, str] = os.environ,
    modules: MutableMapping[str, Any] = sys.modules,
    load: Callable[[str], object] = importlib.import_module,
) -> str:
    """Load the binding with AVX-512 off where meshguard can, and say what happened:
    "avx512-off", "user-mask" (``OPENSSL_ia32cap`` set: loaded as the user asked) or
    "loaded-before" (loaded already, with whatever mask it had)."""
    if BINDING in modules:
        return "loaded-before"
    if "OPENSSL_ia32cap" in environ:
        load(BINDING)
        return "user-mask"
    environ["OPENSSL_ia32cap"] = AVX512_OFF
    try:
        load(BINDING)
    finally:
        del environ["OPENSSL_ia32cap"]
    return "avx512-off"


def setup() -> str:
    """:func:`load_openssl` once per process (``meshguard/__init__.py`` calls this first
    thing); every later call says what that one did."""
    global _state
    if _state is None:
        _state = load_openssl()
    return _state
