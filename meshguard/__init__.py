"""meshguard: a mesh VPN node on Twisted that speaks the WireGuard protocol."""

from meshguard.adapters.openssl_setup import setup as _openssl_setup

__version__ = "0.1.0"

# Before any module loads cryptography's OpenSSL: its AVX-512 ChaCha20-Poly1305 costs more per
# packet than its AVX2 code (meshguard/adapters/openssl_setup.py).
_openssl_setup()
