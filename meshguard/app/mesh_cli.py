"""``meshguard mesh init``, ``invite``, ``join`` and ``members``: signed membership by command.

The admin's machine (usually the first introducer) holds the mesh's authority key in
``STATE/MESH.key`` and the address of its store in ``STATE/MESH.mesh``; ``invite`` and
``members remove`` sign with it. ``join`` runs on the new machine and needs only the line.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import ipaddress
import json
import os
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

from nacl.signing import SigningKey

from meshguard.adapters.store import DEFAULT_DIRECTORY, MembershipStore, StoreError
from meshguard.adapters.store_url import open_store
from meshguard.codecs import keys
from meshguard.mesh.authority import (
    AuthorityError,
    authority_key_text,
    sign_grant,
    sign_member,
    sign_revocation,
    unb64u,
    valid_name,
    verify_member,
    verify_revocation,
)
from meshguard.mesh.invitation import IntroducerAddress, Invitation, parse_invitation

COMMANDS = ("mesh", "invite", "join", "members")
CONFIG_DIRECTORY = "/etc/meshguard"
DAY = 86400


class CommandError(Exception):
    """A failure the user can act on; the message says what to do."""


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the ``meshguard`` parser."""
    mesh = commands.add_parser("mesh", help="create a mesh with a signing authority")
    mesh_commands = mesh.add_subparsers(dest="mesh_command", metavar="ACTION", required=True)
    init = mesh_commands.add_parser("init", help="make the authority and the first introducer")
    init.add_argument("mesh", metavar="NAME")
    init.add_argument("--prefix", required=True, help="the mesh's addresses, e.g. 10.99.0.0/24")
    _introducer_arguments(init)
    init.add_argument("--store", help="sqlite:PATH (default STATE/NAME.db) or etcd:http://H:P")
    more = mesh_commands.add_parser("introducer", help="add another introducer to the mesh")
    more.add_argument("name", metavar="NAME")
    more.add_argument("--mesh", help="the mesh (default: the only one in the state directory)")
    _introducer_arguments(more)
    more.add_argument(
        "--store",
        help="its own store (home meshes: sqlite:PATH on its machine); default: the mesh's store",
    )
    more.add_argument(
        "--admin-dir", help="also write the signing key there, to invite from its store"
    )

    invite = commands.add_parser("invite", help="print an invitation line for a new member")
    invite.add_argument("name", metavar="NAME")
    invite.add_argument("--mesh")
    invite.add_argument("--state-dir", default=DEFAULT_DIRECTORY)
    invite.add_argument("--hours", type=float, default=24.0, help="join within (default 24)")
    invite.add_argument("--days", type=int, default=365, help="membership lasts (default 365)")
    invite.add_argument("--role", action="append", default=[], choices=["relay", "introducer"])

    join = commands.add_parser("join", help="join a mesh with an invitation line")
    join.add_argument("line", metavar="LINE", help="the invitation line (- reads stdin)")
    join.add_argument("--config", help="config to write (default /etc/meshguard/MESH.conf)")
    join.add_argument("--listen-port", type=int, default=51820)
    join.add_argument("--force", action="store_true", help="replace an existing config")

    members = commands.add_parser("members", help="list or remove the mesh's members")
    members_commands = members.add_subparsers(
        dest="members_command", metavar="ACTION", required=True
    )
    for action in ("list", "remove"):
        sub = members_commands.add_parser(action)
        if action == "remove":
            sub.add_argument("name", metavar="NAME")
        sub.add_argument("--mesh")
        sub.add_argument("--state-dir", default=DEFAULT_DIRECTORY)


def _introducer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="hub", help="this introducer's name (default hub)")
    parser.add_argument(
        "--endpoint", required=True, help="HOST:PORT where members reach its WireGuard port"
    )
    parser.add_argument("--join-port", type=int, default=51821, help="TCP port for joins")
    parser.add_argument("--config", help="config to write (default CONFIG_DIR/MESH.conf)")
    parser.add_argument("--config-dir", default=CONFIG_DIRECTORY)
    parser.add_argument("--state-dir", default=DEFAULT_DIRECTORY)
    parser.add_argument("--days", type=int, default=3650)


def run(
    args: argparse.Namespace, stdout: TextIO, stderr: TextIO, stdin: BinaryIO | None = None
) -> int:
    try:
        if args.command == "mesh" and args.mesh_command == "init":
            return _mesh_init(args, stdout)
        if args.command == "mesh":
            return _mesh_introducer(args, stdout)
        if args.command == "invite":
            return _invite(args, stdout)
        if args.command == "join":
            if args.line == "-" and stdin is not None:
                # The line is a one-time secret: stdin keeps it out of `ps` and shell history.
                args.line = stdin.read(8192).decode("ascii", "replace").strip()
            return _join(args, stdout)
        if args.members_command == "list":
            return _members_list(args, stdout)
        return _members_remove(args, stdout)
    except (CommandError, AuthorityError, StoreError) as e:
        stderr.write(f"meshguard {args.command}: {e}\n")
        return 1


# ---- admin state ---------------------------------------------------------------------------


def _write_private(path: str, text: str) -> None:
    from meshguard.adapters.join import write_atomically

    write_atomically(path, text, 0o600)


def _admin(mesh: str | None, state_dir: str) -> tuple[str, SigningKey, MembershipStore]:
    """The mesh's name, authority key and store, from the admin's state directory."""
    if mesh is None:
        found = sorted(glob.glob(os.path.join(state_dir, "*.mesh")))
        if len(found) != 1:
            raise CommandError(
                f"{len(found)} meshes in {state_dir}; say which with --mesh NAME"
                if found
                else f"no mesh in {state_dir}: run `meshguard mesh init` here first"
            )
        mesh = os.path.basename(found[0])[: -len(".mesh")]
    try:
        with open(os.path.join(state_dir, f"{mesh}.mesh")) as f:
            info = json.load(f)
        with open(os.path.join(state_dir, f"{mesh}.key")) as f:
            seed = base64.b64decode(f.read().strip())
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read the mesh {mesh!r} in {state_dir}: {e}") from None
    return mesh, SigningKey(seed), open_store(info["store"])


def _parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(f"--endpoint {text!r} is not HOST:PORT")
    return host, int(port)


def _join_certificate(path: str) -> bytes:
    """A self-signed P-256 certificate + key for the join service; returns its SHA-256 pin."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshguard join")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    _write_private(path, pem.decode())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _free_address(store: MembershipStore, prefix: str, now: int) -> Network:
    """The lowest free address of the store's pool (its part of the prefix: introducers of a
    home mesh with their own stores allocate from disjoint halves, so they never collide)."""
    network = ipaddress.ip_network(store.get_meta("pool") or prefix)
    used = store.used_addresses(now)
    for index, host in enumerate(network.hosts()):
        if index > 65536:
            break
        candidate = ipaddress.ip_network(f"{host}/{network.max_prefixlen}")
        if str(candidate) not in used:
            return candidate
    raise CommandError(f"no free address left in {prefix}")


def _make_introducer(
    args: argparse.Namespace,
    mesh: str,
    authority: SigningKey,
    store: MembershipStore,
    store_url: str,
    introducer_peers: str = "",
) -> tuple[str, str]:
    """An introducer's key, record, certificate and config; returns (config path, name)."""
    if not valid_name(args.name):
        raise CommandError(f"{args.name!r} is not a DNS label (a-z, 0-9, -)")
    now = int(time.time())
    if args.name in store.names_taken(now):
        raise CommandError(f"the name {args.name!r} is taken in mesh {mesh!r}")
    host, wg_port = _parse_endpoint(args.endpoint)
    prefix = store.get_meta("prefix")
    assert prefix is not None
    address = _free_address(store, prefix, now)
    private = keys.genkey(os.urandom)
    public = keys.pubkey(private)
    roles = frozenset({"introducer", "relay"})
    expires = now + args.days * DAY
    record = sign_member(authority, mesh, args.name, public, (address,), roles, expires)
    state_dir = args.state_dir
    certificate = os.path.join(state_dir, f"{mesh}-{args.name}-join.pem")
    pin = _join_certificate(certificate)
    store.put_record(public, args.name, [str(address)], record)
    introducers = json.loads(store.get_meta("introducers") or "[]")
    introducers.append(IntroducerAddress(host, wg_port, args.join_port, pin, public).to_json())
    store.set_meta("introducers", json.dumps(introducers))
    network = ipaddress.ip_network(prefix)
    config = args.config or os.path.join(args.config_dir, f"{mesh}.conf")
    text = (
        "\n".join(
            [
                f"# Introducer {args.name!r} of the mesh {mesh!r}, written by `meshguard mesh`.",
                "[Interface]",
                f"PrivateKey = {keys.key_to_base64(private)}",
                f"ListenPort = {wg_port}",
                f"Address = {address.network_address}/{network.prefixlen}",
                f"MeshName = {mesh}",
                f"MeshAuthority = {authority_key_text(authority.verify_key)}",
                f"MeshRecord = {record}",
                f"MeshStore = {store_url}",
                f"JoinListen = 0.0.0.0:{args.join_port}",
                f"JoinCertificate = {certificate}",
                "",
            ]
        )
        + introducer_peers
    )
    if os.path.exists(config):
        raise CommandError(f"{config} exists; move it away or give --config PATH")
    _write_private(config, text)
    return config, args.name


def _mesh_init(args: argparse.Namespace, stdout: TextIO) -> int:
    mesh = args.mesh
    if not valid_name(mesh) or len(mesh) > 15:
        raise CommandError(f"mesh name {mesh!r}: a DNS label of 15 characters at most")
    try:
        network = ipaddress.ip_network(args.prefix)
    except ValueError:
        raise CommandError(f"--prefix {args.prefix!r} is not a network like 10.99.0.0/24") from None
    state_dir = args.state_dir
    key_path = os.path.join(state_dir, f"{mesh}.key")
    if os.path.exists(key_path):
        raise CommandError(f"{key_path} exists: the mesh {mesh!r} was made here already")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    store_url = args.store or "sqlite:" + os.path.join(state_dir, f"{mesh}.db")
    store = open_store(store_url)
    if store.get_meta("authority") is not None:
        raise CommandError(f"the store {store_url} already holds a mesh")
    authority = SigningKey.generate()
    _write_private(key_path, base64.b64encode(bytes(authority)).decode() + "\n")
    store.set_meta("mesh", mesh)
    store.set_meta("prefix", str(network))
    store.set_meta("authority", authority_key_text(authority.verify_key))
    _write_private(os.path.join(state_dir, f"{mesh}.mesh"), json.dumps({"store": store_url}) + "\n")
    config, name = _make_introducer(args, mesh, authority, store, store_url)
    stdout.write(
        f"mesh {mesh}: authority {authority_key_text(authority.verify_key)}\n"
        f"  signing key {key_path} (keep it; it admits and removes members)\n"
        f"  introducer {name!r}: {config}\n"
        f"  start it:  twistd -n --pidfile= meshguard --config {config}\n"
        f"  invite:    meshguard invite NAME\n"
    )
    return 0


def _peer_block(store: MembershipStore, mesh: str, authority: SigningKey, key: bytes) -> str:
    """A ``[Peer]`` section for the introducer ``key`` (from the store's introducer list)."""
    for host, wg_port, _, _, key_text in json.loads(store.get_meta("introducers") or "[]"):
        if unb64u(key_text) != key:
            continue
        addresses, name = "", host
        for text in store.snapshot().records:
            member = verify_member(authority.verify_key, mesh, text, time.time())
            if member is not None and member.key == key:
                addresses = ", ".join(str(a) for a in member.addresses)
                name = member.name
        shown = f"[{host}]" if ":" in host else host
        return (
            f"\n[Peer]\n# introducer {name}\nPublicKey = {base64.b64encode(key).decode()}\n"
            f"AllowedIPs = {addresses}\nEndpoint = {shown}:{wg_port}\n"
            "PersistentKeepalive = 25\nIntroducer = yes\n"
        )
    raise CommandError("the new introducer is missing from the store's list")


def _mesh_introducer(args: argparse.Namespace, stdout: TextIO) -> int:
    mesh, authority, store = _admin(args.mesh, args.state_dir)
    with open(os.path.join(args.state_dir, f"{mesh}.mesh")) as f:
        store_url = json.load(f)["store"]
    if args.store is None or args.store == store_url:
        config, name = _make_introducer(args, mesh, authority, store, store_url)
        stdout.write(f"introducer {name!r} of mesh {mesh}: {config}\n")
        return 0
    # A home mesh's second introducer with its own store: it starts as a copy of ours, lists
    # the introducers before it as its own, and from then on they exchange signed records
    # through the mesh (each stores what it hears from the others).
    before = [unb64u(k) or b"" for *_, k in json.loads(store.get_meta("introducers") or "[]")]
    peers = "".join(_peer_block(store, mesh, authority, key) for key in before)
    own_store = open_store(args.store)
    if own_store.get_meta("authority") is not None:
        raise CommandError(f"the store {args.store} already holds a mesh")
    config, name = _make_introducer(args, mesh, authority, store, args.store, peers)
    for key in ("mesh", "prefix", "authority", "introducers"):
        value = store.get_meta(key)
        if value is not None:
            own_store.set_meta(key, value)
    pool = ipaddress.ip_network(store.get_meta("pool") or store.get_meta("prefix") or "")
    if pool.max_prefixlen - pool.prefixlen < 3:
        raise CommandError(f"the address pool {pool} is too small to share with another store")
    lower, upper = pool.subnets(1)
    store.set_meta("pool", str(lower))
    own_store.set_meta("pool", str(upper))
    snapshot = store.snapshot()
    for text in snapshot.records:
        member = verify_member(authority.verify_key, mesh, text, time.time())
        if member is not None:
            addresses = [str(a) for a in member.addresses]
            own_store.put_record(member.key, member.name, addresses, text)
    for text in snapshot.revocations:
        revocation = verify_revocation(authority.verify_key, mesh, text)
        if revocation is not None:
            own_store.revoke(revocation.key, text)
    if args.admin_dir:
        os.makedirs(args.admin_dir, mode=0o700, exist_ok=True)
        _write_private(
            os.path.join(args.admin_dir, f"{mesh}.key"),
            base64.b64encode(bytes(authority)).decode() + "\n",
        )
        _write_private(
            os.path.join(args.admin_dir, f"{mesh}.mesh"), json.dumps({"store": args.store}) + "\n"
        )
    new_key = unb64u(json.loads(store.get_meta("introducers") or "[]")[-1][4]) or b""
    stdout.write(
        f"introducer {name!r} of mesh {mesh}: {config} (its own store {args.store})\n"
        "add this to the config of every introducer before it, then send it SIGHUP:\n"
        + _peer_block(store, mesh, authority, new_key)
    )
    return 0


def _invite(args: argparse.Namespace, stdout: TextIO) -> int:
    mesh, authority, store = _admin(args.mesh, args.state_dir)
    name = args.name
    if not valid_name(name):
        raise CommandError(f"{name!r} is not a DNS label (a-z, 0-9, -)")
    now = int(time.time())
    if name in store.names_taken(now):
        raise CommandError(f"the name {name!r} is taken in mesh {mesh!r}")
    prefix = store.get_meta("prefix")
    introducers = [
        IntroducerAddress(h, w, j, unb64u(p) or b"", unb64u(k) or b"")
        for h, w, j, p, k in json.loads(store.get_meta("introducers") or "[]")
    ]
    if prefix is None or not introducers:
        raise CommandError(f"the store of mesh {mesh!r} has no prefix or introducers")
    address = _free_address(store, prefix, now)
    invitation_key = SigningKey.generate()
    join_by = now + int(args.hours * 3600)
    grant = sign_grant(
        authority,
        mesh,
        name,
        (address,),
        frozenset(args.role),
        now + args.days * DAY,
        bytes(invitation_key.verify_key),
        join_by,
    )
    store.add_invitation(bytes(invitation_key.verify_key), name, grant, [str(address)], join_by)
    invitation = Invitation(
        mesh, bytes(authority.verify_key), tuple(introducers), bytes(invitation_key)
    )
    stdout.write(invitation.line() + "\n")
    return 0


def _members_list(args: argparse.Namespace, stdout: TextIO) -> int:
    mesh, authority, store = _admin(args.mesh, args.state_dir)
    snapshot = store.snapshot()
    for text in snapshot.records:
        member = verify_member(authority.verify_key, mesh, text, time.time())
        if member is None:
            stdout.write("(a record that does not verify or expired)\n")
            continue
        roles = ",".join(sorted(member.roles)) or "-"
        addresses = ",".join(str(a) for a in member.addresses)
        key = base64.b64encode(member.key).decode()
        stdout.write(f"{member.name}\t{addresses}\t{roles}\t{key}\n")
    stdout.write(f"({len(snapshot.revocations)} revoked)\n")
    return 0


def _members_remove(args: argparse.Namespace, stdout: TextIO) -> int:
    mesh, authority, store = _admin(args.mesh, args.state_dir)
    found = store.keys_named(args.name)
    if not found:
        raise CommandError(f"no member named {args.name!r} in mesh {mesh!r}")
    for key in found:
        store.revoke(key, sign_revocation(authority, mesh, key, args.name, int(time.time())))
    stdout.write(
        f"removed {args.name!r} from mesh {mesh}; the introducers pass it on within seconds\n"
    )
    return 0


# ---- the joiner ------------------------------------------------------------------------------


def _join(args: argparse.Namespace, stdout: TextIO, reactor: Any = None) -> int:
    from meshguard.adapters.join import JoinError, join_mesh, member_config, write_atomically

    invitation = parse_invitation(args.line)
    if invitation is None:
        raise CommandError("this is not a meshguard invitation line (copy the whole line)")
    config = args.config or os.path.join(CONFIG_DIRECTORY, f"{invitation.mesh}.conf")
    if os.path.exists(config) and not args.force:
        raise CommandError(f"{config} exists; give --force to replace it or --config PATH")
    private = keys.genkey(os.urandom)
    outcome: dict[str, Any] = {}
    started = time.monotonic()
    run_reactor(lambda r: join_mesh(r, invitation, private), outcome, reactor)
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, JoinError):
            raise CommandError(str(error))
        raise CommandError(f"join failed: {error}")
    member, introducers, answer = outcome["result"]
    text = member_config(invitation, private, member, introducers, answer.prefix, args.listen_port)
    write_atomically(config, text, 0o600)
    address = ", ".join(str(a.network_address) for a in member.addresses)
    stdout.write(
        f"joined mesh {invitation.mesh} as {member.name} ({address}) in "
        f"{time.monotonic() - started:.1f} s; config {config}\n"
        f"start it:  twistd -n --pidfile= meshguard --config {config}\n"
    )
    return 0


def run_reactor(work: Callable[[Any], Any], outcome: dict[str, Any], reactor: Any = None) -> None:
    """Run one Deferred-returning job on the reactor of a command-line process."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    def go() -> None:
        d = work(reactor)
        d.addCallbacks(
            lambda r: outcome.__setitem__("result", r),
            lambda f: outcome.__setitem__("error", f.value),
        )
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
