"""Fuzz target: config files (meshguard/codecs/config.py), key files included (read_secret)."""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.codecs.config import ConfigError, _read_secret_file, parse_config, to_uapi_set

_KEY = "YBk6X3pP8KjKz2L7RqTUyJ6CXyfTnWoh0qGFGf5TlFA="


def _read_secret(path: str) -> str:
    if path.endswith("missing") or "\0" in path:
        return _read_secret_file(path)  # the real reader: its errors, as in life
    return path.rsplit("/", 1)[-1] if path.endswith("=") else _KEY


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        config = parse_config(text, "/etc/meshguard/fuzz.conf", read_secret=_read_secret)
    except ConfigError as e:
        assert str(e)
        return
    to_uapi_set(config)


def seeds() -> list[bytes]:
    return [
        (
            "[Interface]\n"
            f"PrivateKey = {_KEY}\nListenPort = 51820\nAddress = 10.0.0.1/24, fd00::1/64\n"
            "MTU = 1420\nTable = auto\nFwMark = 0x10\nDNS = 1.1.1.1\n\n"
            f"[Peer]\nPublicKey = {_KEY}\nPresharedKey = {_KEY}\nAllowedIPs = 10.0.0.2/32\n"
            "Endpoint = example.org:51820\nPersistentKeepalive = 25\n"
        ).encode(),
        (
            "[Interface]\nPrivateKeyFile = key\n\n[Peer]\n"
            f"PublicKey = {_KEY}\nPresharedKeyFile = missing\nEndpoint = [fd00::2]:1\n"
        ).encode(),
    ]


if __name__ == "__main__":
    harness.main(test_one_input)
