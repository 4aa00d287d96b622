"""
Access control on a whole in-memory groundcontrol: what an operator may see (``ls``) and
reach (``ssh dev_x``) follows their grants by device, group and tag, with expiry on a
Clock; the control shell's access commands; the login user a grant names.
"""

from __future__ import annotations

import json
import os
import pwd
from typing import Any

from twisted.conch.ssh import common, keys
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.control.commands import COMMANDS
from groundcontrol.store import LinkRecord
from groundcontrol.testing import (
    InMemoryFleet,
    OperatorSession,
    Script,
    ScriptedSession,
    echoScript,
    resultNow,
    scriptedSessions,
)

T0 = 1_700_000_000.0
LOGIN_USER = b"login-user@accesstunnel"


class LoginAwareSession(ScriptedSession):
    """A scripted device session that, like the real agent as root, accepts a login user."""

    def requestReceivedWithReply(self, requestType: bytes, data: bytes, wantReply: bool) -> Any:
        if requestType == LOGIN_USER:
            self.requests.append((requestType, data, wantReply))
            return common.getNS(data)[0] != b"ghost"
        return super().requestReceivedWithReply(requestType, data, wantReply)


class AccessFleet:
    """An in-memory fleet with devices lab1 (tag lab), lab2 (reports tag lab) and plain3."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.fleet = InMemoryFleet(clock=self.clock)
        self.root = self.fleet.addOperator("root", admin=True)
        self.bob = self.fleet.addOperator("bob")
        self.sessions: list[ScriptedSession] = []
        for name in ("lab1", "lab2", "plain3"):
            key = self.fleet.enrollDevice(name)
            self.fleet.agent(name, key, self._sessionFactory())
        resultNow(self.fleet.store.tagDevice("lab1", ["lab"], [], "root", T0))
        resultNow(self.fleet.store.reportTags("lab2", ["lab"], T0))

    def _sessionFactory(self) -> Any:
        record = self.sessions

        def factory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> ScriptedSession:
            session = LoginAwareSession(
                echoScript,
                self.clock,
                remoteWindow=windowSize,
                remoteMaxPacket=maxPacket,
                conn=conn,
            )
            record.append(session)
            return session

        return factory

    def advance(self, seconds: float) -> None:
        """Let time pass in steps, answering keepalives on the way, as a live link would."""
        while seconds > 0:
            step = min(seconds, 10.0)
            self.clock.advance(step)
            self.fleet.flush()
            seconds -= step

    def ctl(self, key: keys.Key, line: str) -> tuple[int | None, str, str]:
        """Run one control-shell command: (status, stdout, stderr)."""
        operator = self.fleet.operator("ctl", key)
        session = self.fleet.session(operator)
        assert session.isOpen, session.openFailure
        session.exec(line.encode())
        self.fleet.flush()
        self.clock.advance(0)  # the control shell runs the command after answering
        self.fleet.flush()
        return session.exitStatus, bytes(session.output).decode(), bytes(session.stderr).decode()

    def ls(self, key: keys.Key) -> list[str]:
        status, out, err = self.ctl(key, "ls --json")
        assert status == 0, err
        return [d["name"] for d in json.loads(out)]

    def session(self, key: keys.Key, device: str) -> OperatorSession:
        operator = self.fleet.operator(f"dev_{device}", key)
        return self.fleet.session(operator)

    def run(self, key: keys.Key, device: str, command: bytes = b"hello") -> OperatorSession:
        """Open a session on C{device} and exec C{command} if it opened."""
        session = self.session(key, device)
        if session.isOpen:
            session.exec(command)
            self.fleet.flush()
            self.clock.advance(0)
            self.fleet.flush()
        return session

    def reaches(self, key: keys.Key, device: str) -> bool:
        return bytes(self.run(key, device).output) == b"hello\n"


class OperatorVisibilityTests(SynchronousTestCase):
    """An operator sees and reaches exactly what their grants name."""

    def setUp(self) -> None:
        self.world = AccessFleet()

    def test_noGrantSeesAndReachesNothing(self) -> None:
        """Without grants, ls is empty and every device refuses as if unknown."""
        self.assertEqual(self.world.ls(self.world.bob), [])
        for name in ("lab1", "lab2", "plain3"):
            session = self.world.session(self.world.bob, name)
            self.assertFalse(session.isOpen)
            self.assertIn("has no grant for it", session.openFailureText)
        self.assertEqual(self.world.ls(self.world.root), ["lab1", "lab2", "plain3"])

    def test_tagGrantByCtl(self) -> None:
        """
        'grant bob tag:lab' (admin, over ctl) lets bob see and reach the devices tagged lab
        by an admin or by their agent, and not the untagged one, in ls and through ssh.
        """
        status, out, err = self.world.ctl(self.world.root, "grant bob tag:lab --for 1h")
        self.assertEqual(status, 0, err)
        self.assertIn("granted bob access to tag:lab", out)
        self.assertEqual(self.world.ls(self.world.bob), ["lab1", "lab2"])
        self.assertTrue(self.world.reaches(self.world.bob, "lab1"))
        self.assertTrue(self.world.reaches(self.world.bob, "lab2"))
        self.assertFalse(self.world.reaches(self.world.bob, "plain3"))
        self.assertIn("no grant", self.world.session(self.world.bob, "plain3").openFailureText)

    def test_grantExpiresOnTheClock(self) -> None:
        """
        A grant --for 10m works until the ten minutes are up; then ls hides the devices
        and ssh refuses for want of a grant, while the devices stay online.

        (Ten minutes, not hours: the in-memory fake agent logs in again at its first
        rekey, an hour in, which would replace its link mid-test.)
        """
        self.world.ctl(self.world.root, "grant bob tag:lab --for 10m")
        self.world.advance(599)
        self.assertTrue(self.world.reaches(self.world.bob, "lab1"))
        self.assertEqual(self.world.ls(self.world.bob), ["lab1", "lab2"])
        self.world.advance(1)
        refused = self.world.session(self.world.bob, "lab1")
        self.assertFalse(refused.isOpen)
        self.assertIn("no grant", refused.openFailureText)
        self.assertEqual(self.world.ls(self.world.bob), [])
        self.assertTrue(self.world.reaches(self.world.root, "lab1"))  # still online
        status, out, _ = self.world.ctl(self.world.bob, "grants --json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)[0]["state"], "expired")

    def test_groupAndDeviceGrants(self) -> None:
        """Group membership and device grants add up; removing either takes its reach away."""
        root, bob = self.world.root, self.world.bob
        self.assertEqual(self.world.ctl(root, "group add edge plain3")[0], 0)
        self.world.ctl(root, "grant bob group:edge")
        self.world.ctl(root, "grant bob dev_lab1")
        self.assertEqual(self.world.ls(bob), ["lab1", "plain3"])
        self.world.ctl(root, "group remove edge plain3")
        self.world.ctl(root, "ungrant bob lab1")
        self.assertEqual(self.world.ls(bob), [])

    def test_untaggingTakesAccessAway(self) -> None:
        """An admin removing the tag ends the reach it gave; the agent's own tag stays."""
        self.world.ctl(self.world.root, "grant bob tag:lab")
        status, out, _ = self.world.ctl(self.world.root, "tag lab1 -lab --json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)["tags"], [])
        self.assertEqual(self.world.ls(self.world.bob), ["lab2"])

    def test_lsColumns(self) -> None:
        """ls shows name, online, last seen, owner, tags, transport and agent version."""
        _status, out, _ = self.world.ctl(self.world.root, "ls")
        header = out.splitlines()[0].split()
        self.assertEqual(
            header, ["NAME", "ONLINE", "LAST_SEEN", "OWNER", "TAGS", "TRANSPORT", "VERSION"]
        )
        self.assertIn(
            ["lab2", "yes", "now", "-", "lab", "-", "-"], [r.split() for r in out.splitlines()]
        )
        rows = json.loads(self.world.ctl(self.world.root, "ls --json")[1])
        lab2 = next(r for r in rows if r["name"] == "lab2")
        self.assertEqual((lab2["tags"], lab2["reported_tags"]), ([], ["lab"]))
        self.assertEqual(lab2["online_since"], "2023-11-14T22:13:20Z")  # T0

    def test_lsByKex(self) -> None:
        """
        ls --kex KIND (the CLI's device list filter, same name and meaning) keeps the
        devices the caller may reach whose latest link's key exchange is of that kind:
        classical (the fake agents' curve25519: lab1), post-quantum (lab2's, recorded with
        the hybrid), unknown (plain3's last link recorded none); repeated, any of them.
        Each document carries the key exchange; an unknown kind is a usage error.
        """
        store = self.world.fleet.store
        for name, kex in (("lab2", "mlkem768x25519-sha256"), ("plain3", None)):
            device = resultNow(store.deviceByName(name))
            resultNow(
                store.recordContact(
                    name,
                    device.publicKey,
                    device.fingerprint,
                    None,
                    "test",
                    T0,
                    link=lambda _, kex=kex: LinkRecord(kex=kex),
                )
            )
        root, bob = self.world.root, self.world.bob

        def ls(key: keys.Key, line: str) -> list[str]:
            status, out, err = self.world.ctl(key, f"ls --json {line}")
            self.assertEqual(status, 0, err)
            return [d["name"] for d in json.loads(out)]

        self.assertEqual(ls(root, "--kex classical"), ["lab1"])
        self.assertEqual(ls(root, "--kex post-quantum"), ["lab2"])
        self.assertEqual(ls(root, "--kex unknown"), ["plain3"])
        self.assertEqual(ls(root, "--kex classical --kex unknown"), ["lab1", "plain3"])
        self.assertEqual(ls(root, ""), ["lab1", "lab2", "plain3"])
        self.world.ctl(root, "grant bob tag:lab")
        self.assertEqual(ls(bob, "--kex unknown"), [])  # plain3: not bob's to see
        self.assertEqual(ls(bob, "--kex classical --kex post-quantum"), ["lab1", "lab2"])

        rows = json.loads(self.world.ctl(root, "ls --json")[1])
        self.assertEqual(
            [(r["last_link_kex"], r["last_link_post_quantum"]) for r in rows],
            [("curve25519-sha256", False), ("mlkem768x25519-sha256", True), (None, None)],
        )
        status, out, err = self.world.ctl(root, "ls --kex pq")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("invalid choice: 'pq'", err)


class ControlCommandTests(SynchronousTestCase):
    """The access commands' roles and --json."""

    def setUp(self) -> None:
        self.world = AccessFleet()

    def test_operatorsRefusedClearly(self) -> None:
        """grant, ungrant, tag and group are admin-only: an operator gets a clear refusal."""
        for line in ["grant bob tag:lab", "ungrant bob lab1", "tag lab1 +x", "group add g lab1"]:
            status, _, err = self.world.ctl(self.world.bob, line)
            self.assertEqual(status, 1, line)
            self.assertIn("only admins may do this", err)
        status, _, err = self.world.ctl(self.world.bob, "grants root")
        self.assertEqual(status, 1)
        self.assertIn("only their own", err)

    def test_everyCommandTakesJSON(self) -> None:
        """Every command accepts --json; the ones that list or change print JSON with it."""
        free = {"claim", "approve", "revoke", "kill", "watch", "replay"}  # need real targets
        for name in sorted(COMMANDS):
            if name in free:
                status, _, err = self.world.ctl(self.world.root, f"{name} --json")
                self.assertNotIn("unrecognized arguments: --json", err, name)
                continue
            status, out, err = self.world.ctl(self.world.root, f"{name} --json")
            if status == 0 and out.strip():
                json.loads(out)  # parses
            self.assertNotIn("unrecognized arguments", err, name)
        status, out, _ = self.world.ctl(self.world.root, "grant bob lab1 --as pi --json")
        self.assertEqual(json.loads(out)["login_user"], "pi")
        status, out, _ = self.world.ctl(self.world.root, "group add g lab1 --json")
        self.assertEqual(json.loads(out), {"devices": ["lab1"], "group": "g"})

    def test_everyCommandExplainsItself(self) -> None:
        """
        CMD --help prints the command's help (status 0), for operators too, even when the
        command's required arguments are missing.
        """
        for name in sorted(COMMANDS):
            status, out, err = self.world.ctl(self.world.bob, f"{name} --help")
            self.assertEqual((status, err), (0, ""), name)
            self.assertTrue(out.startswith(f"usage: {name} "), (name, out))
        status, out, _ = self.world.ctl(self.world.bob, "show -h lab1")
        self.assertTrue(out.startswith("usage: show "), out)

    def test_badArguments(self) -> None:
        """Malformed selectors, tags and durations are usage errors (status 2)."""
        for line in ["grant bob host:x", "grant bob tag:Lab", "grant bob lab1 --for soon"]:
            status, _, err = self.world.ctl(self.world.root, line)
            self.assertEqual(status, 2, (line, err))
        status, _, err = self.world.ctl(self.world.root, "grant bob lab1 --as 'x y'")
        self.assertEqual(status, 1)
        self.assertIn("invalid login user", err)


class LoginUserTests(SynchronousTestCase):
    """A grant's login user is asked of the device before the operator's first request."""

    def setUp(self) -> None:
        self.world = AccessFleet()

    def test_loginUserSentFirst(self) -> None:
        """With --as pi, the device session gets login-user pi (want-reply) before exec."""
        self.world.ctl(self.world.root, "grant bob tag:lab --as pi")
        self.assertTrue(self.world.reaches(self.world.bob, "lab1"))
        requests = self.world.sessions[-1].requests
        self.assertEqual(requests[0], (LOGIN_USER, common.NS(b"pi"), True))
        self.assertIn(b"exec", [r[0] for r in requests[1:]])

    def test_noLoginUserNoRequest(self) -> None:
        """A grant without --as (or an admin's reach) sends no login-user request."""
        self.world.ctl(self.world.root, "grant bob lab1")
        self.assertTrue(self.world.reaches(self.world.bob, "lab1"))
        self.assertTrue(self.world.reaches(self.world.root, "lab2"))
        for session in self.world.sessions:
            self.assertNotIn(LOGIN_USER, [r[0] for r in session.requests])

    def test_refusedLoginUserRefusesTheSession(self) -> None:
        """A device that refuses the login user gives no session at all (fail closed)."""
        self.world.ctl(self.world.root, "grant bob lab1 --as ghost")
        session = self.world.session(self.world.bob, "lab1")
        self.assertFalse(session.isOpen)
        self.assertIn("cannot run sessions as 'ghost'", session.openFailureText)
        self.assertTrue(self.world.sessions[-1].isClosed)

    def test_agentWithoutLoginUserSupportRefuses(self) -> None:
        """An agent that does not know the request (it answers failure) is refused too."""
        fleet = self.world.fleet
        key = fleet.enrollDevice("old4")
        fleet.agent("old4", key, scriptedSessions(lambda c: Script(stdout=b"x\n")))
        self.world.ctl(self.world.root, "grant bob old4 --as pi")
        session = self.world.session(self.world.bob, "old4")
        self.assertFalse(session.isOpen)


class AgentLoginUserTests(SynchronousTestCase):
    """The agent's side: login-user@accesstunnel switches the session's user."""

    def channel(self) -> SessionChannel:
        return SessionChannel(SessionEnvironment(), Clock())

    def ask(self, channel: SessionChannel, user: bytes) -> Any:
        return channel.requestReceivedWithReply(LOGIN_USER, common.NS(user), True)

    def test_switchesUserAsRoot(self) -> None:
        """As root, an existing user becomes the session's user (home, shell, credentials)."""
        if os.geteuid() != 0:
            self.skipTest("needs the agent to run as root")
        channel = self.channel()
        self.assertTrue(self.ask(channel, b"nobody"))
        nobody = pwd.getpwnam("nobody")
        self.assertEqual(channel.environment.pw, nobody)
        self.assertEqual(channel.environment.credentials(), (nobody.pw_uid, nobody.pw_gid))
        self.assertEqual(channel.environment.variables()["USER"], "nobody")

    def test_refusals(self) -> None:
        """Unknown users, malformed payloads, and requests after a pty are refused."""
        channel = self.channel()
        self.assertFalse(self.ask(channel, b"no-such-user-here"))
        self.assertFalse(channel.requestReceivedWithReply(LOGIN_USER, b"\x00\x00", True))
        channel._terminal = object()  # type: ignore[assignment]
        self.assertFalse(self.ask(channel, pwd.getpwuid(os.getuid()).pw_name.encode()))

    def test_notRootRefusesOthers(self) -> None:
        """An agent not running as root refuses another user, but accepts its own."""
        import agent.session

        original = agent.session.os.geteuid
        self.addCleanup(setattr, agent.session.os, "geteuid", original)
        me = pwd.getpwuid(os.getuid())
        other = "nobody" if me.pw_name != "nobody" else "root"
        agent.session.os.geteuid = lambda: 4242  # type: ignore[assignment]
        self.assertFalse(self.ask(self.channel(), other.encode()))
        agent.session.os.geteuid = lambda: me.pw_uid  # type: ignore[assignment]
        self.assertTrue(self.ask(self.channel(), me.pw_name.encode()))
