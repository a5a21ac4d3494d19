"""The meshguard config file: the wg-quick format plus mesh keys.

An existing wg-quick file must parse unchanged, so the syntax follows `wg(8)`: `#` starts a
comment, all whitespace is removed from a line (only trimmed for the PreUp/PostUp shell snippets,
as wg-quick does), section and key names are case-insensitive. Every key lives in one table per
section, so a mesh issue adds a key with one `_Key(...)` line. Errors are `PATH:LINE: message`
and never contain key material.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Final

from meshguard.codecs import keys

IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

MIN_MTU: Final = 576
MIN_MTU_IPV6: Final = 1280
# The outer datagram must fit in 65535 bytes; WireGuard over IPv6 adds 80 (40 + 8 + 32).
MAX_MTU: Final = 65535 - 80
MAX_FWMARK: Final = 0xFFFFFFFF
MAX_TABLE: Final = 0xFFFFFFFF
MAX_SECRET_FILE: Final = 4096

_WHITESPACE: Final = " \t\n\v\f\r"
_DROP_WHITESPACE: Final = str.maketrans("", "", _WHITESPACE)
_DIGITS: Final = re.compile(r"[0-9]{1,10}")
_HEX: Final = re.compile(r"0[xX][0-9A-Fa-f]{1,8}")
_TABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_LABEL: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# Any run this long of base64 or hex digits could be a key (or most of one).
_LOOKS_SECRET: Final = re.compile(r"[A-Za-z0-9+/]{40}|[0-9A-Fa-f]{40}")
_TRUE: Final = frozenset({"yes", "true", "on"})
_FALSE: Final = frozenset({"no", "false", "off"})


class ConfigError(Exception):
    """A config file that cannot be used; `str()` is the one line a user sees."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


#: ``PersistentKeepalive = auto`` (meshguard): the keepalive policy picks the interval from the
#: measured NAT (docs/keepalive.md); UAPI and ``wg`` only ever see the interval in force.
KEEPALIVE_AUTO: Final = -1


@dataclass
class PeerConfig:
    """One `[Peer]` section; `line` is its header line, for messages about the peer."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int = 0
    introducer: bool = False
    line: int = 0


@dataclass
class InterfaceConfig:
    """The `[Interface]` section.

    `mtu` is None when the file gives none (use the default) or says `auto` (`mtu_auto`: compute
    it from the route toward the endpoints, as wg-quick does).
    """

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    addresses: list[IPInterface] = field(default_factory=list)
    mtu: int | None = None
    mtu_auto: bool = False
    table: str = "auto"
    fwmark: int = 0
    forwarding: bool = True
    #: ``PortMapping``: ``auto`` asks the gateway for a port mapping (PCP, NAT-PMP, UPnP-IGD;
    #: docs/portmapping.md), ``off`` never does.
    port_mapping: str = "auto"
    #: Bytes per second a member relay forwards for one sending peer (``ForwardingRate``,
    #: written in MiB/s); None: no limit.
    forwarding_rate: float | None = 64 * 1024 * 1024
    #: TLS relay (docs/relay.md): serve on ``relay_listen`` with this certificate and key, and
    #: keep a connection to every ``relays`` entry, verified with ``relay_ca`` or ``relay_pins``.
    relay_listen: tuple[str, int] | None = None
    relay_certificate: str | None = None
    relay_key: str | None = None
    relays: list[tuple[str, int]] = field(default_factory=list)
    relay_ca: str | None = None
    relay_pins: list[bytes] = field(default_factory=list)
    #: ``MetricsListen = HOST:PORT``: serve Prometheus metrics there (docs/operations.md).
    metrics_listen: tuple[str, int] | None = None
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    #: Signed membership (docs/invitations.md): the mesh's name, its authority's Ed25519 key and
    #: this node's own signed record; on an introducer also its store and join service.
    mesh_name: str | None = None
    mesh_authority: bytes | None = None
    mesh_record: str | None = field(default=None, repr=False)
    mesh_store: str | None = None
    join_listen: tuple[str, int] | None = None
    join_certificate: str | None = None


@dataclass
class Config:
    """A parsed file. `warnings` are `PATH:LINE: message` strings for things that still work."""

    path: str
    interface: InterfaceConfig
    peers: list[PeerConfig]
    warnings: list[str]


class _BadValueError(Exception):
    """A bad value; the parser adds the path and line."""


@dataclass
class _Context:
    """What a value parser may need besides the value: where it is, and a way to warn."""

    path: str
    line: int
    base_dir: str
    read_secret: Callable[[str], str]
    warnings: list[str]

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.path}:{self.line}: {message}")


ValueParser = Callable[[str, _Context], object]


@dataclass(frozen=True)
class _Key:
    """One config key: its spelling in messages, the attribute it fills and how to read it.

    `field` None means accepted and ignored. `repeats` keys hold lists and append when the key
    repeats. `raw` keeps the value's inner whitespace (shell snippets). `empty_ok` allows `Key =`.
    """

    name: str
    field: str | None
    parse: ValueParser
    repeats: bool = False
    raw: bool = False
    empty_ok: bool = False


# ---- value parsers ---------------------------------------------------------------------------


def _shown(value: str) -> str:
    """Quote a value for a message, unless it could be key material or is too long to help."""
    if _LOOKS_SECRET.search(value) or len(value) > 64:
        return "(value not shown)"
    return repr(value)


def _number(value: str, what: str, low: int, high: int) -> int:
    if _DIGITS.fullmatch(value) is None or not low <= int(value) <= high:
        raise _BadValueError(f"{what} {_shown(value)} is not a number from {low} to {high}")
    return int(value)


def _base64_key(value: str, name: str, advice: str) -> bytes:
    try:
        return keys.key_from_base64(value)
    except ValueError:
        raise _BadValueError(
            f"{name} is not a base64 WireGuard key ({keys.BASE64_KEY_HINT}); {advice}"
        ) from None


def _secret_from_file(value: str, ctx: _Context, name: str, advice: str) -> bytes:
    path = os.path.join(ctx.base_dir, value)
    if "\0" in path:
        # open() would raise ValueError, not OSError (found by tests/fuzz/fuzz_config.py).
        raise _BadValueError(f"{name} {_shown(path)} contains a NUL byte")
    try:
        text = ctx.read_secret(path)
    except OSError as e:
        raise _BadValueError(f"cannot read {name} {_shown(path)}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        text = ""
    loose = loose_key_file(path)
    if loose is not None:
        ctx.warnings.append(loose)
    try:
        return keys.key_from_base64(text.strip(_WHITESPACE))
    except ValueError:
        raise _BadValueError(
            f"{name} {_shown(path)} does not hold a base64 WireGuard key "
            f"({keys.BASE64_KEY_HINT}); {advice}"
        ) from None


_PRIVATE_ADVICE: Final = "generate one with 'meshguard genkey'"
_PSK_ADVICE: Final = "generate one with 'meshguard genpsk'"


def _private_key(value: str, ctx: _Context) -> bytes:
    return _base64_key(value, "PrivateKey", _PRIVATE_ADVICE)


def _private_key_file(value: str, ctx: _Context) -> bytes:
    return _secret_from_file(
        value, ctx, "PrivateKeyFile", f"{_PRIVATE_ADVICE} > FILE; chmod 600 FILE"
    )


def _public_key(value: str, ctx: _Context) -> bytes:
    return _base64_key(value, "PublicKey", "get it by running 'meshguard pubkey' on the peer")


def _preshared_key(value: str, ctx: _Context) -> bytes | None:
    psk = _base64_key(value, "PresharedKey", _PSK_ADVICE)
    return None if psk == bytes(keys.KEY_LEN) else psk


def _preshared_key_file(value: str, ctx: _Context) -> bytes | None:
    psk = _secret_from_file(value, ctx, "PresharedKeyFile", f"{_PSK_ADVICE} > FILE; chmod 600 FILE")
    return None if psk == bytes(keys.KEY_LEN) else psk


def _listen_port(value: str, ctx: _Context) -> int:
    return _number(value, "ListenPort", 0, 65535)


def _mtu(value: str, ctx: _Context) -> int | None:
    if value.lower() == "auto":
        return None
    return _number(value, "MTU", MIN_MTU, MAX_MTU)


def _table(value: str, ctx: _Context) -> str:
    lowered = value.lower()
    if lowered in ("auto", "off"):
        return lowered
    if _DIGITS.fullmatch(value):
        return str(_number(value, "Table", 0, MAX_TABLE))
    if _TABLE_NAME.fullmatch(value):
        return value
    raise _BadValueError(
        f"Table {_shown(value)} is not 'auto', 'off', a table number or a table name"
    )


def _fwmark(value: str, ctx: _Context) -> int:
    if value.lower() == "off":
        return 0
    if _HEX.fullmatch(value):
        return int(value, 16)
    if _DIGITS.fullmatch(value) and int(value) <= MAX_FWMARK:
        return int(value)
    raise _BadValueError(
        f"FwMark {_shown(value)} is not 'off', a decimal number or 0x hex up to 32 bits"
    )


def _port_mapping(value: str, ctx: _Context) -> str:
    lowered = value.lower()
    if lowered in ("auto", "off"):
        return lowered
    raise _BadValueError(f"PortMapping {_shown(value)} is not 'auto' or 'off'")


def _bool(name: str) -> ValueParser:
    def parse(value: str, ctx: _Context) -> bool:
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _BadValueError(f"{name} {_shown(value)} is not 'yes' or 'no'")

    return parse


def _ignored(name: str, why: str) -> ValueParser:
    def parse(value: str, ctx: _Context) -> None:
        ctx.warn(f"{name} is ignored: {why}")

    return parse


def _shell(value: str, ctx: _Context) -> list[str]:
    return [value]


def _split_list(value: str, name: str) -> list[str]:
    if value == "":
        return []
    entries = value.split(",")
    if "" in entries:
        raise _BadValueError(f"{name} has an empty entry; separate entries with single commas")
    return entries


def _ip_and_prefix(entry: str, name: str) -> tuple[IPv4Address | IPv6Address, int]:
    """Read `ip[/prefix]` strictly: numeric prefix only, no zone, no netmask form."""
    address, slash, prefix = entry.partition("/")
    problem = _BadValueError(
        f"{name} entry {_shown(entry)} is not an IP address with an optional /prefix"
    )
    if "%" in address:
        raise problem
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise problem from None
    if not slash:
        return ip, ip.max_prefixlen
    if re.fullmatch(r"[0-9]{1,3}", prefix) is None or int(prefix) > ip.max_prefixlen:
        raise _BadValueError(
            f"{name} entry {_shown(entry)} has a prefix length that is not 0..{ip.max_prefixlen}"
        )
    return ip, int(prefix)


def _addresses(value: str, ctx: _Context) -> list[IPInterface]:
    result: list[IPInterface] = []
    for entry in _split_list(value, "Address"):
        ip, prefix = _ip_and_prefix(entry, "Address")
        result.append(ipaddress.ip_interface((ip, prefix)))
    return result


def _allowed_ips(value: str, ctx: _Context) -> list[IPNetwork]:
    result: list[IPNetwork] = []
    for entry in _split_list(value, "AllowedIPs"):
        if entry.startswith("-"):
            raise _BadValueError(
                f"AllowedIPs entry {_shown(entry)} removes a prefix, which only 'wg set' can do; "
                "list the prefixes this peer should have"
            )
        ip, prefix = _ip_and_prefix(entry.removeprefix("+"), "AllowedIPs")
        network = ipaddress.ip_network((ip, prefix), strict=False)
        if network.network_address != ip:
            ctx.warn(f"AllowedIPs entry {entry} has host bits set; using {network}")
        result.append(network)
    return result


def _is_dns_name(host: str) -> bool:
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    # A name whose last label is all digits would be read as a legacy IPv4 form by getaddrinfo.
    if labels[-1].isascii() and labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def _endpoint(value: str, ctx: _Context) -> tuple[str, int]:
    usage = "write it as host:port or [IPv6]:port"
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise _BadValueError(
                f"Endpoint {_shown(value)} has no ']:port' after an IPv6 address; {usage}"
            )
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _BadValueError(
                f"Endpoint {_shown(value)} has no IPv6 address in brackets"
            ) from None
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon or not host:
            raise _BadValueError(f"Endpoint {_shown(value)} has no port; {usage}")
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _BadValueError(
                    f"Endpoint {_shown(value)} is not host:port; {usage}"
                ) from None
            ctx.warn(f"Endpoint {value} has an IPv6 address without brackets; write [{host}]:port")
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                if not _is_dns_name(host):
                    raise _BadValueError(
                        f"Endpoint host {_shown(host)} is neither an IP address nor a DNS name"
                    ) from None
    port = _number(port_text, "Endpoint port", 1, 65535)
    return host, port


def _persistent_keepalive(value: str, ctx: _Context) -> int:
    if value.lower() == "off":
        return 0
    if value.lower() == "auto":
        return KEEPALIVE_AUTO
    return _number(value, "PersistentKeepalive", 0, 65535)


def _forwarding_rate(value: str, ctx: _Context) -> float | None:
    """``ForwardingRate = 64`` (MiB/s per sending peer) or ``unlimited``."""
    if value.lower() == "unlimited":
        return None
    return float(_number(value, "ForwardingRate (MiB/s, or unlimited)", 1, 100000) * 1024 * 1024)


def _relay_listen(value: str, ctx: _Context) -> tuple[str, int]:
    host, port = _endpoint(value.replace("*:", "0.0.0.0:", 1), ctx)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _BadValueError(
            f"RelayListen {_shown(value)} is not ADDRESS:PORT (e.g. 0.0.0.0:8443 or [::]:8443)"
        ) from None
    return host, port


def _metrics_listen(value: str, ctx: _Context) -> tuple[str, int]:
    try:
        host, port = _endpoint(value, ctx)
        ipaddress.ip_address(host)
    except (_BadValueError, ValueError):
        raise _BadValueError(
            f"MetricsListen {_shown(value)} is not ADDRESS:PORT (e.g. 127.0.0.1:9586)"
        ) from None
    return host, port


def _relay_url(value: str, ctx: _Context) -> list[tuple[str, int]]:
    if not value.lower().startswith("tls://"):
        raise _BadValueError(f"Relay {_shown(value)} is not tls://HOST:PORT")
    try:
        return [_endpoint(value[6:].rstrip("/"), ctx)]
    except _BadValueError:
        raise _BadValueError(f"Relay {_shown(value)} is not tls://HOST:PORT") from None


def _path(name: str) -> ValueParser:
    def parse(value: str, ctx: _Context) -> str:
        return os.path.join(ctx.base_dir, value)

    return parse


def _relay_pin(value: str, ctx: _Context) -> list[bytes]:
    scheme, _, digits = value.partition(":")
    try:
        digest = bytes.fromhex(digits.replace(":", ""))
    except ValueError:
        digest = b""
    if scheme.lower() != "sha256" or len(digest) != 32:
        raise _BadValueError(
            "RelayPin is not sha256:<64 hex digits> (the SHA-256 of the relay certificate's "
            "DER form; 'openssl x509 -in CERT -outform DER | sha256sum' prints it)"
        )
    return [digest]


# ---- signed membership (docs/invitations.md) ------------------------------------------------


def _mesh_name(value: str, ctx: _Context) -> str:
    if re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", value) is None:
        raise _BadValueError(f"MeshName {_shown(value)} is not a DNS label (a-z, 0-9, -)")
    return value


def _mesh_authority(value: str, ctx: _Context) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise _BadValueError(
            "MeshAuthority is not a base64 Ed25519 public key (44 characters); copy it from "
            "the admin's `meshguard mesh init` output"
        )
    return raw


def _mesh_record(value: str, ctx: _Context) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){1,3}", value) is None:
        raise _BadValueError(
            "MeshRecord is not a signed member record (as `meshguard join` writes it)"
        )
    return value


def _mesh_store(value: str, ctx: _Context) -> str:
    if value.startswith("etcd:"):
        if not value[5:].startswith(("http://", "https://")):
            raise _BadValueError(f"MeshStore {_shown(value)} is not etcd:http://HOST:PORT")
        return value
    path = value[len("sqlite:") :] if value.startswith("sqlite:") else value
    return "sqlite:" + os.path.join(ctx.base_dir, path)


def _join_listen(value: str, ctx: _Context) -> tuple[str, int]:
    host, port = _endpoint(value.replace("*:", "0.0.0.0:", 1), ctx)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _BadValueError(
            f"JoinListen {_shown(value)} is not ADDRESS:PORT (e.g. 0.0.0.0:51821)"
        ) from None
    return host, port


# ---- the key tables --------------------------------------------------------------------------


def _table_of(*entries: _Key) -> dict[str, _Key]:
    return {entry.name.lower(): entry for entry in entries}


INTERFACE_KEYS: Final[dict[str, _Key]] = _table_of(
    _Key("PrivateKey", "private_key", _private_key),
    _Key("PrivateKeyFile", "private_key", _private_key_file, raw=True),
    _Key("ListenPort", "listen_port", _listen_port),
    _Key("Address", "addresses", _addresses, repeats=True, empty_ok=True),
    _Key("MTU", "mtu", _mtu),
    _Key("Table", "table", _table),
    _Key("FwMark", "fwmark", _fwmark),
    _Key(
        "DNS",
        None,
        _ignored("DNS", "meshguard does not change resolvers; use resolvconf or resolvectl"),
        empty_ok=True,
    ),
    _Key("SaveConfig", None, _ignored("SaveConfig", "meshguard never rewrites its config file")),
    _Key("PreUp", "pre_up", _shell, repeats=True, raw=True, empty_ok=True),
    _Key("PostUp", "post_up", _shell, repeats=True, raw=True, empty_ok=True),
    _Key("PreDown", "pre_down", _shell, repeats=True, raw=True, empty_ok=True),
    _Key("PostDown", "post_down", _shell, repeats=True, raw=True, empty_ok=True),
    # Mesh keys.
    _Key("Forwarding", "forwarding", _bool("Forwarding")),
    _Key("PortMapping", "port_mapping", _port_mapping),
    _Key("ForwardingRate", "forwarding_rate", _forwarding_rate),
    # TLS relay keys (docs/relay.md).
    _Key("RelayListen", "relay_listen", _relay_listen),
    _Key("RelayCertificate", "relay_certificate", _path("RelayCertificate"), raw=True),
    _Key("RelayKey", "relay_key", _path("RelayKey"), raw=True),
    _Key("Relay", "relays", _relay_url, repeats=True),
    _Key("RelayCA", "relay_ca", _path("RelayCA"), raw=True),
    _Key("RelayPin", "relay_pins", _relay_pin, repeats=True),
    # Operations (docs/operations.md).
    _Key("MetricsListen", "metrics_listen", _metrics_listen),
    # Signed membership keys (docs/invitations.md).
    _Key("MeshName", "mesh_name", _mesh_name),
    _Key("MeshAuthority", "mesh_authority", _mesh_authority),
    _Key("MeshRecord", "mesh_record", _mesh_record),
    _Key("MeshStore", "mesh_store", _mesh_store, raw=True),
    _Key("JoinListen", "join_listen", _join_listen),
    _Key("JoinCertificate", "join_certificate", _path("JoinCertificate"), raw=True),
)

PEER_KEYS: Final[dict[str, _Key]] = _table_of(
    _Key("PublicKey", "public_key", _public_key),
    _Key("PresharedKey", "preshared_key", _preshared_key),
    _Key("PresharedKeyFile", "preshared_key", _preshared_key_file, raw=True),
    _Key("AllowedIPs", "allowed_ips", _allowed_ips, repeats=True, empty_ok=True),
    _Key("Endpoint", "endpoint", _endpoint),
    _Key("PersistentKeepalive", "persistent_keepalive", _persistent_keepalive),
    # Mesh keys.
    _Key("Introducer", "introducer", _bool("Introducer")),
)

SECTIONS: Final[dict[str, tuple[str, dict[str, _Key]]]] = {
    "interface": ("Interface", INTERFACE_KEYS),
    "peer": ("Peer", PEER_KEYS),
}


# ---- the parser ------------------------------------------------------------------------------


def _read_secret_file(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_SECRET_FILE).decode("ascii")


@dataclass
class _Section:
    """A section being read: its target object and which line set each field."""

    name: str
    line: int
    target: InterfaceConfig | PeerConfig
    set_by: dict[str, tuple[str, int]] = field(default_factory=dict)


class _Parser:
    def __init__(self, path: str, read_secret: Callable[[str], str]) -> None:
        self.path = path
        self.base_dir = os.path.dirname(path) if path != "<string>" else ""
        self.read_secret = read_secret
        self.warnings: list[str] = []
        self.interface = InterfaceConfig()
        self.interface_section: _Section | None = None
        self.peer_sections: list[_Section] = []
        self.current: _Section | None = None

    def error(self, line: int | None, message: str) -> ConfigError:
        return ConfigError(self.path, line, message)

    def warn(self, line: int | None, message: str) -> None:
        where = self.path if line is None else f"{self.path}:{line}"
        self.warnings.append(f"{where}: {message}")

    def parse(self, text: str) -> Config:
        for number, raw_line in enumerate(text.split("\n"), start=1):
            self.parse_line(number, raw_line.partition("#")[0])
        return self.finish()

    def parse_line(self, number: int, line: str) -> None:
        compact = line.translate(_DROP_WHITESPACE)
        if not compact:
            return
        if compact.startswith("["):
            self.start_section(number, compact)
            return
        key_text, equals, raw_value = line.partition("=")
        key_name = key_text.translate(_DROP_WHITESPACE)
        if not equals or not key_name:
            raise self.error(number, "expected 'Key = Value' or a [Section] header")
        if self.current is None:
            raise self.error(
                number,
                f"key {_shown(key_name)} is outside a section; put it under [Interface] or [Peer]",
            )
        section_title, table = SECTIONS[self.current.name]
        key = table.get(key_name.lower())
        if key is None:
            raise self.error(number, self.unknown_key_message(key_name, section_title))
        value = raw_value.strip(_WHITESPACE) if key.raw else raw_value.translate(_DROP_WHITESPACE)
        if not value and not key.empty_ok:
            raise self.error(number, f"{key.name} in [{section_title}] has no value")
        ctx = _Context(self.path, number, self.base_dir, self.read_secret, self.warnings)
        try:
            parsed = key.parse(value, ctx)
        except _BadValueError as e:
            raise self.error(number, str(e)) from None
        self.store(self.current, key, parsed, number)

    def unknown_key_message(self, key_name: str, section_title: str) -> str:
        message = f"unknown key {_shown(key_name)} in [{section_title}]"
        for _, (other_title, other_table) in SECTIONS.items():
            if other_title != section_title and key_name.lower() in other_table:
                return f"{message}; it belongs in [{other_title}]"
        return f"{message}; see docs/configuration.md for the keys meshguard knows"

    def store(self, section: _Section, key: _Key, parsed: object, number: int) -> None:
        if key.field is None:
            return
        if key.repeats:
            current = getattr(section.target, key.field)
            assert isinstance(current, list) and isinstance(parsed, list)
            current.extend(parsed)
            return
        previous = section.set_by.get(key.field)
        if previous is not None:
            previous_name, previous_line = previous
            if previous_name != key.name:
                raise self.error(
                    number,
                    f"{key.name} and {previous_name} (line {previous_line}) both set the same "
                    "thing; keep one",
                )
            self.warn(number, f"{key.name} is set again; this replaces line {previous_line}")
        section.set_by[key.field] = (key.name, number)
        setattr(section.target, key.field, parsed)

    def start_section(self, number: int, compact: str) -> None:
        if not compact.endswith("]"):
            raise self.error(number, "a section header must look like [Interface] or [Peer]")
        name = compact[1:-1].lower()
        if name not in SECTIONS:
            raise self.error(
                number,
                f"unknown section {_shown(compact)}; expected [Interface] or [Peer]",
            )
        if name == "interface":
            if self.interface_section is None:
                self.interface_section = _Section(name, number, self.interface)
            else:
                self.warn(
                    number,
                    f"second [Interface] section; its keys add to line "
                    f"{self.interface_section.line}'s",
                )
            self.current = self.interface_section
        else:
            self.current = _Section(name, number, PeerConfig(public_key=b"", line=number))
            self.peer_sections.append(self.current)

    def finish(self) -> Config:
        interface = self.interface
        own_public: bytes | None = None
        if interface.private_key is None:
            line = None if self.interface_section is None else self.interface_section.line
            self.warn(
                line,
                "no PrivateKey in [Interface]; the node has no identity and cannot make "
                "handshakes until one is set",
            )
        else:
            own_public = keys.pubkey(interface.private_key)
        self.check_mtu()
        self.check_relay()
        interface.mtu_auto = (
            self.interface_section is not None
            and "mtu" in self.interface_section.set_by
            and interface.mtu is None
        )

        peers: list[PeerConfig] = []
        first_line: dict[bytes, int] = {}
        for section in self.peer_sections:
            peer = section.target
            assert isinstance(peer, PeerConfig)
            if "public_key" not in section.set_by:
                raise self.error(
                    section.line, "[Peer] has no PublicKey; add 'PublicKey = <base64 key>'"
                )
            key_line = section.set_by["public_key"][1]
            if peer.public_key == own_public:
                raise self.error(
                    key_line,
                    "PublicKey is this node's own public key (from PrivateKey); remove this "
                    "[Peer] or fix the key",
                )
            if peer.public_key in first_line:
                raise self.error(
                    key_line,
                    f"duplicate peer: this PublicKey is also on line "
                    f"{first_line[peer.public_key]}; merge the two [Peer] sections",
                )
            first_line[peer.public_key] = key_line
            peers.append(peer)
        self.check_overlaps(peers)
        return Config(self.path, interface, peers, self.warnings)

    def check_relay(self) -> None:
        """A relay server needs its certificate and key; a pin or CA needs a relay to verify."""
        section = self.interface_section
        if section is None:
            return
        set_by = section.set_by
        if "relay_listen" in set_by:
            for name, attr in (
                ("RelayCertificate", "relay_certificate"),
                ("RelayKey", "relay_key"),
            ):
                if attr not in set_by:
                    raise self.error(
                        set_by["relay_listen"][1],
                        f"RelayListen needs {name} = PATH (PEM); see docs/relay.md",
                    )
        for attr in ("relay_certificate", "relay_key"):
            if attr in set_by and "relay_listen" not in set_by:
                raise self.error(set_by[attr][1], f"{set_by[attr][0]} without RelayListen")
        if not self.interface.relays:
            if "relay_ca" in set_by:
                raise self.error(
                    set_by["relay_ca"][1], "RelayCA without any Relay = tls://HOST:PORT"
                )
            if self.interface.relay_pins:
                raise self.error(section.line, "RelayPin without any Relay = tls://HOST:PORT")

    def check_mtu(self) -> None:
        mtu = self.interface.mtu
        if mtu is None or mtu >= MIN_MTU_IPV6 or self.interface_section is None:
            return
        if any(a.version == 6 for a in self.interface.addresses):
            line = self.interface_section.set_by["mtu"][1]
            raise self.error(
                line,
                f"MTU {mtu} is below {MIN_MTU_IPV6}, the minimum for IPv6, and Address has an "
                f"IPv6 address; use MTU {MIN_MTU_IPV6} or more",
            )

    def check_overlaps(self, peers: Iterable[PeerConfig]) -> None:
        """Warn when two peers claim one prefix: like wg, the later peer silently takes it."""
        owner: dict[IPNetwork, int] = {}
        for peer in peers:
            for network in peer.allowed_ips:
                previous = owner.get(network)
                if previous is not None and previous != peer.line:
                    self.warn(
                        peer.line,
                        f"AllowedIPs {network} is also given to the peer on line {previous}; "
                        "this peer takes it",
                    )
                owner[network] = peer.line


def parse_config(
    text: str,
    path: str = "<string>",
    *,
    read_secret: Callable[[str], str] = _read_secret_file,
) -> Config:
    """Parse config text; `path` is used in messages and to find relative key files.

    `read_secret` reads PrivateKeyFile/PresharedKeyFile (injectable for tests).
    """
    return _Parser(path, read_secret).parse(text)


_INLINE_SECRET = re.compile(r"^[ \t]*(privatekey|presharedkey)[ \t]*=", re.I | re.M)


def load_config(path: str) -> Config:
    """Read and parse a config file, warning when it holds a key and others may read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, line, "this line is not UTF-8 text") from None
    config = parse_config(text, path)
    # Only keys written in the file itself; a key file's own mode is the key file's business.
    holds_key = _INLINE_SECRET.search(text) is not None
    if holds_key and stat.S_ISREG(mode) and mode & 0o077:
        who = "is world accessible" if mode & 0o007 else "is readable by its group"
        config.warnings.insert(0, f"{path}: holds a key and {who}; run 'chmod 600 {path}'")
    return config


def loose_key_file(path: str) -> str | None:
    """A warning when the key file at ``path`` may be read by its group or others (None when
    only its owner may, or it cannot be checked)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(mode) or not mode & 0o077:
        return None
    who = "world accessible" if mode & 0o007 else "readable by its group"
    return f"{path}: key file is {who}; run 'chmod 600 {path}'"


def _uapi_endpoint(endpoint: tuple[str, int]) -> str | None:
    host, port = endpoint
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def to_uapi_set(config: Config) -> str:
    """Render the UAPI `set=1` request that `wg setconf` sends for this file, blank line included.

    Peers' endpoints that are DNS names are left out: the caller resolves them and sets them.
    One difference from `wg`, with the same result: `PersistentKeepalive = 0` sends no line.
    """
    interface = config.interface
    private_key = interface.private_key or bytes(keys.KEY_LEN)
    lines = [
        "set=1",
        f"private_key={keys.key_to_hex(private_key)}",
        f"listen_port={interface.listen_port or 0}",
        f"fwmark={interface.fwmark}",
        "replace_peers=true",
    ]
    for peer in config.peers:
        lines.append(f"public_key={keys.key_to_hex(peer.public_key)}")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={keys.key_to_hex(peer.preshared_key)}")
        if peer.endpoint is not None:
            endpoint = _uapi_endpoint(peer.endpoint)
            if endpoint is not None:
                lines.append(f"endpoint={endpoint}")
        if peer.persistent_keepalive > 0:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network}" for network in peer.allowed_ips)
    return "\n".join(lines) + "\n\n"
