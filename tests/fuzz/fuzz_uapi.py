"""Fuzz target: UAPI text (meshguard/codecs/uapi.py): the request splitter, ``set`` and ``get``
bodies."""

from __future__ import annotations

import atheris
import harness

with atheris.instrument_imports(include=["meshguard"]):
    from meshguard.codecs.uapi import UAPIError, UAPIRequestParser, parse_get, parse_set


def test_one_input(data: bytes) -> None:
    parser = UAPIRequestParser(max_request_size=1 << 16)
    parser.feed(data)
    try:
        parse_set(data)
    except UAPIError:
        pass
    try:
        parse_get(data)
    except UAPIError:
        pass


def seeds() -> list[bytes]:
    key = "e" * 64
    return [
        b"get=1\n\n",
        (
            f"set=1\nprivate_key={key}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n"
            f"public_key={key}\npreshared_key={key}\nendpoint=[fd00::1]:51820\n"
            "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
            "allowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\nremove=true\n\n"
        ).encode(),
        (
            f"private_key={key}\nlisten_port=51820\npublic_key={key}\n"
            "endpoint=192.0.2.1:51820\nlast_handshake_time_sec=1\nlast_handshake_time_nsec=2\n"
            "rx_bytes=3\ntx_bytes=4\npersistent_keepalive_interval=0\nallowed_ip=10.0.0.1/32\n"
            "protocol_version=1\nerrno=0\n\n"
        ).encode(),
    ]


if __name__ == "__main__":
    harness.main(test_one_input)
