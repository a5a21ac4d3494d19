"""Invitations and joins: the line, the store's single use and durability, the TLS exchange."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshguard.adapters.join import JoinError, JoinService, join_mesh, member_config
from meshguard.adapters.store import JoinRefusedError, SqliteStore, ThreadRunner
from meshguard.app import cli
from meshguard.codecs import keys
from meshguard.codecs.config import parse_config
from meshguard.mesh.authority import b64u, bind, bound_record, sign_grant, verify_member
from meshguard.mesh.invitation import (
    IntroducerAddress,
    Invitation,
    JoinAnswer,
    JoinRequest,
    parse_invitation,
    parse_join_answer,
    parse_join_request,
)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(list(argv), io.BytesIO(), out, err)
    return code, out.getvalue(), err.getvalue()


class Admin:
    """A mesh made with ``meshguard mesh init`` in a temporary directory."""

    def __init__(self, root: str) -> None:
        self.state = os.path.join(root, "state")
        self.configs = os.path.join(root, "etc")
        code, _, err = run_cli(
            "mesh",
            "init",
            "home",
            "--prefix",
            "10.99.0.0/24",
            "--endpoint",
            "127.0.0.1:51820",
            "--state-dir",
            self.state,
            "--config-dir",
            self.configs,
        )
        assert code == 0, err
        self.introducer_config = parse_config(
            open(os.path.join(self.configs, "home.conf")).read(),
            os.path.join(self.configs, "home.conf"),
        )
        self.store = SqliteStore(os.path.join(self.state, "home.db"))

    def invite(self, name: str, *extra: str) -> str:
        code, out, err = run_cli("invite", name, "--state-dir", self.state, *extra)
        assert code == 0, err
        return out.strip()


class InvitationLineTests(SynchronousTestCase):
    def test_round_trip_and_secret_not_shown(self) -> None:
        intro = IntroducerAddress("vps.example.net", 51820, 51821, b"\x01" * 32, b"\x02" * 32)
        invitation = Invitation("home", b"\x03" * 32, (intro,), b"\x04" * 32)
        self.assertEqual(parse_invitation(invitation.line()), invitation)
        self.assertNotIn(repr(b"\x04" * 32), repr(invitation))
        self.assertIsNone(parse_invitation(invitation.line()[:-5]))

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(max_size=300),
            st.binary(max_size=300).map(lambda b: "meshguard-invite-1:" + b64u(b)),
        )
    )
    def test_garbage_lines_are_refused(self, text: str) -> None:
        self.assertIsNone(parse_invitation(text))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_join_messages_never_raise(self, data: bytes) -> None:
        parse_join_request(data)
        parse_join_answer(data)

    def test_join_messages_round_trip(self) -> None:
        request = JoinRequest(b"\x01" * 32, b"\x02" * 32, b"\x03" * 64)
        self.assertEqual(parse_join_request(request.encode()), request)
        answer = JoinAnswer("a.b", "10.99.0.0/24", ("c.d",))
        self.assertEqual(parse_join_answer(answer.encode()), answer)
        self.assertEqual(parse_join_answer(JoinAnswer(error="no").encode()), JoinAnswer(error="no"))


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.admin = Admin(self.root)
        self.authority = SigningKey(
            __import__("base64").b64decode(open(os.path.join(self.admin.state, "home.key")).read())
        )

    def _grant(self, join_by: int) -> tuple[SigningKey, str]:
        invitation = SigningKey.generate()
        grant = sign_grant(
            self.authority,
            "home",
            "bob",
            (ipaddress.ip_network("10.99.0.9/32"),),
            frozenset(),
            int(time.time()) + 1000,
            bytes(invitation.verify_key),
            join_by,
        )
        self.admin.store.add_invitation(
            bytes(invitation.verify_key), "bob", grant, ["10.99.0.9/32"], join_by
        )
        return invitation, grant

    def test_an_invitation_is_used_once_under_concurrent_joins(self) -> None:
        """Eight joiners redeem one invitation at once (each with its own connection and a
        valid proof): exactly one gets a record, the others hear it was already used."""
        invitation, _ = self._grant(int(time.time()) + 100)
        results: list[str] = []
        barrier = threading.Barrier(8)

        def joiner() -> None:
            key = os.urandom(32)
            proof = bind(invitation, key)
            barrier.wait()
            try:
                self.admin.store.redeem(
                    bytes(invitation.verify_key),
                    key,
                    lambda grant: bound_record(grant, key, proof),
                    int(time.time()),
                )
                results.append("ok")
            except JoinRefusedError as e:
                results.append(str(e))

        threads = [threading.Thread(target=joiner) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results.count("ok"), 1, results)
        self.assertTrue(all("already used" in r for r in results if r != "ok"))

    def test_expired_and_unknown_invitations_are_refused(self) -> None:
        invitation, _ = self._grant(int(time.time()) - 1)
        key = os.urandom(32)
        with self.assertRaisesRegex(JoinRefusedError, "expired"):
            self.admin.store.redeem(
                bytes(invitation.verify_key), key, lambda g: "x", int(time.time())
            )
        with self.assertRaisesRegex(JoinRefusedError, "not known"):
            self.admin.store.redeem(os.urandom(32), key, lambda g: "x", int(time.time()))

    def test_store_round_trip_survives_reopening(self) -> None:
        """Records and revocations read back from a fresh connection, in order."""
        store = self.admin.store
        store.put_record(b"\x01" * 32, "a", ["10.99.0.5/32"], "rec-a")
        store.revoke(b"\x01" * 32, "rev-a")
        again = SqliteStore(store.path)
        snapshot = again.snapshot()
        self.assertNotIn("rec-a", snapshot.records)
        self.assertEqual(snapshot.revocations, ["rev-a"])
        self.assertEqual(again.keys_named("hub").__len__(), 1)

    def test_kill_9_loses_nothing_acknowledged(self) -> None:
        """A writer killed with SIGKILL in the middle of a stream of writes: every write it
        acknowledged (printed after commit) is in the store afterwards."""
        path = os.path.join(self.root, "crash.db")
        SqliteStore(path)
        code = (
            "import sys\n"
            "from meshguard.adapters.store import SqliteStore\n"
            f"s = SqliteStore({path!r})\n"
            "for i in range(100000):\n"
            "    s.put_record(i.to_bytes(32, 'big'), f'm{i}', [], f'text{i}')\n"
            "    print(i, flush=True)\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            env={
                **os.environ,
                "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            },
        )
        assert process.stdout is not None
        acknowledged = []
        for line in process.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) >= 40:
                break
        process.send_signal(signal.SIGKILL)
        for line in process.stdout:
            acknowledged.append(int(line))
        process.wait()
        self.assertGreaterEqual(len(acknowledged), 40)
        records = set(SqliteStore(path).snapshot().records)
        for i in acknowledged:
            self.assertIn(f"text{i}", records)


class JoinExchangeTests(TestCase):
    """The join service and client over real TLS on loopback."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.admin = Admin(self.root)
        interface = self.admin.introducer_config.interface
        assert interface.mesh_authority is not None and interface.join_certificate is not None
        from nacl.signing import VerifyKey

        self.authority = VerifyKey(interface.mesh_authority)
        self.service = JoinService(
            reactor,
            ThreadRunner(reactor, self.admin.store),
            "home",
            self.authority,
            "10.99.0.0/24",
            lambda: [interface.mesh_record or ""],
        )
        self.port = self.service.listen("127.0.0.1", 0, interface.join_certificate)
        self.addCleanup(self.port.stopListening)

    def _line(self, name: str) -> Invitation:
        invitation = parse_invitation(self.admin.invite(name))
        assert invitation is not None
        port = self.port.getHost().port
        return dataclasses.replace(
            invitation,
            introducers=tuple(
                dataclasses.replace(i, join_port=port) for i in invitation.introducers
            ),
        )

    async def test_join_gives_a_signed_record_and_a_ready_config(self) -> None:
        """A joiner gets its record (name, address) and writes a config that parses, with the
        introducer as its peer; a second use of the same line is refused with a clear error."""
        invitation = self._line("alice")
        private = keys.genkey(os.urandom)
        member, introducers, answer = await join_mesh(reactor, invitation, private)
        self.assertEqual(member.name, "alice")
        self.assertEqual(member.key, keys.pubkey(private))
        self.assertEqual([str(a) for a in member.addresses], ["10.99.0.2/32"])
        self.assertEqual({m.name for m in introducers.values()}, {"hub"})
        text = member_config(invitation, private, member, introducers, answer.prefix, 51820)
        config = parse_config(text, "alice.conf")
        self.assertEqual(config.interface.mesh_name, "home")
        self.assertEqual([str(a) for a in config.interface.addresses], ["10.99.0.2/24"])
        self.assertEqual(len(config.peers), 1)
        self.assertTrue(config.peers[0].introducer)
        self.assertEqual([str(n) for n in config.peers[0].allowed_ips], ["10.99.0.1/32"])
        assert config.interface.mesh_record is not None
        self.assertIsNotNone(
            verify_member(self.authority, "home", config.interface.mesh_record, time.time())
        )
        with self.assertRaisesRegex(JoinError, "already used"):
            await join_mesh(reactor, invitation, keys.genkey(os.urandom))

    async def test_expired_invitation_is_refused(self) -> None:
        invitation = self._line("bob")
        self.admin.store._write(lambda c: c.execute("UPDATE invitations SET join_by = 1"))
        with self.assertRaisesRegex(JoinError, "expired"):
            await join_mesh(reactor, invitation, keys.genkey(os.urandom))

    async def test_a_wrong_certificate_gets_nothing(self) -> None:
        """An introducer whose certificate is not the pinned one is not told anything, and the
        invitation stays unused."""
        invitation = self._line("carol")
        wrong = dataclasses.replace(
            invitation,
            introducers=tuple(
                dataclasses.replace(i, pin=b"\x00" * 32) for i in invitation.introducers
            ),
        )
        with self.assertRaisesRegex(
            JoinError, "no introducer could take the join.*not the one pinned"
        ):
            await join_mesh(reactor, wrong, keys.genkey(os.urandom))
        self.assertEqual(self.service.joined + self.service.refused, 0)
        member, _, _ = await join_mesh(reactor, invitation, keys.genkey(os.urandom))
        self.assertEqual(member.name, "carol")

    async def test_a_forged_proof_is_refused_and_the_invitation_survives(self) -> None:
        """A line with another secret names no invitation the introducer knows: refused, and
        the real invitation still works afterwards."""
        invitation = self._line("dave")
        forged = dataclasses.replace(invitation, secret=os.urandom(32))
        with self.assertRaisesRegex(JoinError, "not known"):
            await join_mesh(reactor, forged, keys.genkey(os.urandom))
        member, _, _ = await join_mesh(reactor, invitation, keys.genkey(os.urandom))
        self.assertEqual(member.name, "dave")


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.admin = Admin(self.root)

    def test_join_refuses_a_cut_line_from_argv_or_stdin(self) -> None:
        """A line that is not an invitation is refused with advice, and nothing is written."""
        config = os.path.join(self.root, "x.conf")
        code, _, err = run_cli("join", "meshguard-invite-1:abc", "--config", config)
        self.assertEqual(code, 1)
        self.assertIn("copy the whole line", err)
        out, errs = io.StringIO(), io.StringIO()
        code = cli.run(["join", "-", "--config", config], io.BytesIO(b"junk\n"), out, errs)
        self.assertEqual(code, 1)
        self.assertIn("not a meshguard invitation line", errs.getvalue())
        self.assertFalse(os.path.exists(config))

    def test_admin_commands(self) -> None:
        """A taken name, a second init, removing a stranger: each a clear error; the list shows
        the introducer and a removal."""
        self.admin.invite("alice")
        code, _, err = run_cli("invite", "alice", "--state-dir", self.admin.state)
        self.assertEqual((code, "taken" in err), (1, True))
        code, _, err = run_cli(
            "mesh", "init", "home", "--prefix", "10.99.0.0/24", "--endpoint", "h:1",
            "--state-dir", self.admin.state, "--config-dir", self.admin.configs,
        )  # fmt: skip
        self.assertEqual((code, "made here already" in err), (1, True))
        code, _, err = run_cli("members", "remove", "nobody", "--state-dir", self.admin.state)
        self.assertEqual((code, "no member named" in err), (1, True))
        code, out, _ = run_cli("members", "list", "--state-dir", self.admin.state)
        self.assertEqual(code, 0)
        self.assertIn("hub\t10.99.0.1/32\tintroducer,relay", out)
        code, out, _ = run_cli("members", "remove", "hub", "--state-dir", self.admin.state)
        self.assertEqual(code, 0)
        _, out, _ = run_cli("members", "list", "--state-dir", self.admin.state)
        self.assertIn("(1 revoked)", out)


class MeshConfigTests(SynchronousTestCase):
    """The signed-membership config keys: accepted values, and errors that name the line."""

    def rejected(self, line: str, fragment: str) -> None:
        from meshguard.codecs.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            parse_config(f"[Interface]\n{line}\n", "m.conf")
        self.assertTrue(str(caught.exception).startswith("m.conf:2: "), str(caught.exception))
        self.assertIn(fragment, str(caught.exception))

    def test_values(self) -> None:
        key = "A" * 43 + "="
        config = parse_config(
            "[Interface]\nMeshName = home\nMeshAuthority = " + key + "\n"
            "MeshStore = etcd:http://10.0.0.1:2379,http://10.0.0.2:2379\n"
            "JoinListen = *:51821\nJoinCertificate = join.pem\n",
            "/etc/meshguard/m.conf",
        ).interface
        self.assertEqual(config.mesh_name, "home")
        self.assertEqual(config.mesh_authority, bytes(32))
        self.assertEqual(config.mesh_store, "etcd:http://10.0.0.1:2379,http://10.0.0.2:2379")
        self.assertEqual(config.join_listen, ("0.0.0.0", 51821))
        self.assertEqual(config.join_certificate, "/etc/meshguard/join.pem")
        relative = parse_config("[Interface]\nMeshStore = home.db\n", "/etc/mg/m.conf")
        self.assertEqual(relative.interface.mesh_store, "sqlite:/etc/mg/home.db")

    def test_errors_name_the_line(self) -> None:
        self.rejected("MeshName = Home!", "DNS label")
        self.rejected("MeshAuthority = abc", "Ed25519 public key")
        self.rejected("MeshRecord = not a record", "signed member record")
        self.rejected("MeshStore = etcd:10.0.0.1:2379", "etcd:http://HOST:PORT")
        self.rejected("JoinListen = example.com:51821", "ADDRESS:PORT")

    @settings(max_examples=200, deadline=None)
    @given(
        st.fixed_dictionaries(
            {},
            optional={
                "key": st.one_of(st.text(max_size=50), st.just("A" * 43 + "=")),
                "allowed": st.lists(st.sampled_from(["10.99.0.2/32", "x", "::/0"]), max_size=3),
                "observed": st.one_of(st.none(), st.lists(st.integers(), max_size=2)),
                "local": st.lists(st.text(max_size=5), max_size=2),
                "record": st.one_of(st.none(), st.integers(), st.text(max_size=40)),
            },
        )
    )
    def test_member_entries_with_records_parse_or_are_refused(
        self, value: dict[str, object]
    ) -> None:
        """Member entries carrying a record field parse strictly and round-trip."""
        from meshguard.mesh.members import parse_member

        member = parse_member(value)
        if member is not None:
            self.assertEqual(parse_member(member.to_json()), member)
