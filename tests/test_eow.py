"""
What OpenSSH's client sends to a server it takes for OpenSSH, and what we do with it.

OpenSSH's client sends C{eow@openssh.com} ("end of write": its standard output closed,
C{ssh dev_x@gc yes | head -1}) and C{no-more-sessions@openssh.com} only to a server
whose version starts "OpenSSH" (its compat.c, C{SSH_NEW_OPENSSH}). groundcontrol's
version line says so without naming an OpenSSH release (groundcontrol.sshserver,
C{SERVER_VERSION_LINE}); the relay passes eow to the device, where the agent closes a
pipe child's stdout as sshd does; a session opened after no-more-sessions ends the
operator's connection, as under sshd. tests/e2e/test_openssh_user.py runs the pipeline
with the real client.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from ssh_audit.banner import Banner  # type: ignore[import-untyped]
from ssh_audit.software import Software  # type: ignore[import-untyped]
from twisted.conch.ssh import common
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.sshserver import NO_MORE_SESSIONS, SERVER_VERSION_LINE, GroundControlTransport
from tests.test_agent_session import (
    FakeChild,
    FakeSpawner,
    RecordingConnection,
    deliver,
    peerClosed,
    ptyReq,
)
from tests.test_relay import RelayTestCase

NS = common.NS
EOW = b"eow@openssh.com"

#: OpenSSH's client (compat.c, 9.x) matches the server's software version against these
#: patterns in order; the first to match sets its flags. Only the last, C{OpenSSH*},
#: gives SSH_NEW_OPENSSH alone; the ones before it are old releases with bugs to work
#: around (and C{OpenSSH_5*}, C{OpenSSH_6.5*}... give SSH_NEW_OPENSSH with those bugs).
OPENSSH_OLD_RELEASE_PATTERNS = (
    "OpenSSH_2.*",
    "OpenSSH_3.0*",
    "OpenSSH_3.1*",
    "OpenSSH_3.*",
    "Sun_SSH_1.0*",
    "OpenSSH_2*",
    "OpenSSH_3*",
    "OpenSSH_4*",
    "OpenSSH_5*",
    "OpenSSH_6.6.1*",
    "OpenSSH_6.5*",
    "OpenSSH_6.6*",
    "OpenSSH_7.4*",
    "OpenSSH_7.0*",
    "OpenSSH_7.1*",
    "OpenSSH_7.2*",
    "OpenSSH_7.3*",
    "OpenSSH_7.5*",
    "OpenSSH_7.6*",
    "OpenSSH_7.7*",
)


def softwareVersion(line: bytes) -> str:
    """What OpenSSH's client matches: the line after C{SSH-2.0-}, comments included."""
    prefix = b"SSH-2.0-"
    assert line.startswith(prefix)
    return line[len(prefix) :].decode("ascii")


class VersionLineTests(SynchronousTestCase):
    """groundcontrol's version line turns on OpenSSH's extensions and names no release."""

    def test_transportSendsIt(self) -> None:
        """The transport's version line is L{SERVER_VERSION_LINE}, within RFC 4253's bounds."""
        self.assertEqual(GroundControlTransport.ourVersionString, SERVER_VERSION_LINE)
        self.assertLessEqual(len(SERVER_VERSION_LINE) + 2, 255)
        software = softwareVersion(SERVER_VERSION_LINE).split(" ", 1)[0]
        self.assertNotIn("-", software)  # RFC 4253 4.2: no minus sign, no space

    def test_openSSHClientTakesUsForNewOpenSSH(self) -> None:
        """
        OpenSSH's client matches it to C{OpenSSH*} (SSH_NEW_OPENSSH: eow and
        no-more-sessions) and to no old release's pattern (no bug workarounds).
        """
        version = softwareVersion(SERVER_VERSION_LINE)
        self.assertTrue(fnmatch.fnmatchcase(version, "OpenSSH*"))
        matched = [p for p in OPENSSH_OLD_RELEASE_PATTERNS if fnmatch.fnmatchcase(version, p)]
        self.assertEqual(matched, [])

    def test_scannersMatchNoOpenSSHRelease(self) -> None:
        """
        ssh-audit finds no software version in it, so lists no OpenSSH release's CVEs;
        the same line with a release number would be read as that release.
        """
        ours = Banner.parse(SERVER_VERSION_LINE.decode("ascii"))
        assert ours is not None
        self.assertIsNone(Software.parse(ours))
        named = Banner.parse("SSH-2.0-OpenSSH_9.9 AccessTunnel")
        assert named is not None
        self.assertIsNotNone(Software.parse(named))

    def test_commentNamesUs(self) -> None:
        """The line's comment says what answers: AccessTunnel, not OpenSSH."""
        self.assertEqual(softwareVersion(SERVER_VERSION_LINE).split(" ", 1)[1], "AccessTunnel")


class _Child(FakeChild):
    """A fake pipe child that records its stdout being closed."""

    stdoutClosed = False

    def closeStdout(self) -> None:
        self.stdoutClosed = True


class AgentEndOfWriteTests(SynchronousTestCase):
    """The agent's session takes eow@openssh.com as sshd does (chan_rcvd_eow)."""

    def setUp(self) -> None:
        self.child = _Child()
        self.spawner = FakeSpawner()
        self.spawner.child = self.child
        self.conn = RecordingConnection()
        self.channel = self.conn.attach(
            SessionChannel(
                SessionEnvironment(home="/nonexistent-home", defaultPath="/bin"),
                None,
                spawn=self.spawner,
                remoteWindow=1 << 20,
                remoteMaxPacket=32768,
            )
        )

    def request(self, name: bytes, data: bytes = b"") -> Any:
        return self.channel.requestReceivedWithReply(name, data, False)

    def test_closesPipeChildStdout(self) -> None:
        """eow after an exec closes the pipe child's stdout (its next write fails)."""
        self.assertTrue(self.request(b"exec", NS(b"yes")))
        self.assertTrue(self.request(EOW))
        self.assertTrue(self.child.stdoutClosed)
        self.assertFalse(self.child.stdinClosed)  # stdin is the operator's still

    def test_ptyNoLongerRead(self) -> None:
        """
        With a pty (its stdin too) eow closes nothing but stops reading it, as sshd
        does; the window re-opening does not start it again, the child's exit does (its
        end is seen by reading the pty).
        """
        self.assertTrue(self.request(b"pty-req", ptyReq()))
        self.addCleanup(self.channel._terminal.close)
        self.assertTrue(self.request(b"exec", NS(b"yes")))
        self.assertTrue(self.request(EOW))
        self.assertFalse(self.child.stdoutClosed)
        self.assertTrue(self.child.paused)
        self.channel.outputResumed()
        self.assertTrue(self.child.paused)
        self.spawner.protocol.processExited(None)
        self.assertFalse(self.child.paused)

    def test_beforeTheChildAfterItOrMalformed(self) -> None:
        """
        eow with no child, with data after it, or after the child exited (its output is
        read to its end) is refused and closes nothing.
        """
        self.assertFalse(self.request(EOW))
        self.assertTrue(self.request(b"exec", NS(b"yes")))
        self.assertFalse(self.request(EOW, b"junk"))
        self.child.pid = None  # what Twisted sets once it reaped the child
        self.assertFalse(self.request(EOW))
        self.assertFalse(self.child.stdoutClosed)
        self.assertFalse(self.child.paused)


def exitSignal(name: bytes) -> tuple[Any, ...]:
    """The exit-signal request a session sends for a child killed by C{name}."""
    return ("request", b"exit-signal", NS(name) + b"\x00" + NS(b"") + NS(b""))


class AgentEndOfWriteProcessTests(TestCase):
    """Real children on the real reactor: what eow does to a pipe child and a pty child."""

    def start(self, *requests: tuple[bytes, bytes]) -> tuple[SessionChannel, RecordingConnection]:
        """A session channel on a recording connection, given C{requests} in turn."""
        home = self.mktemp()
        os.mkdir(home)
        conn = RecordingConnection()
        channel = conn.attach(
            SessionChannel(
                SessionEnvironment(home=home), reactor, remoteWindow=1 << 20, remoteMaxPacket=32768
            )
        )
        self.addCleanup(lambda: peerClosed(channel) if channel.process is not None else None)
        for name, data in requests:
            self.assertTrue(channel.requestReceivedWithReply(name, data, True), name)
        return channel, conn

    async def test_nextWriteEndsTheChild(self) -> None:
        """
        The child writes, eow comes, then the child writes again: it dies of SIGPIPE
        (exit-signal PIPE, as under sshd), and nothing of its second write is sent.
        """
        channel, conn = self.start((b"exec", NS(b"echo started; read line; exec yes")))
        await conn.when(lambda: b"started\n" in conn.stdout())
        self.assertTrue(channel.requestReceivedWithReply(EOW, b"", False))
        deliver(channel, b"go\n")
        await conn.when(conn.isClosed)
        self.assertEqual(conn.stdout(), b"started\n")
        self.assertIn(exitSignal(b"PIPE"), conn.events)

    test_nextWriteEndsTheChild.timeout = 20  # type: ignore[attr-defined]

    async def test_ptyChildEndsWhenSignalled(self) -> None:
        """
        On a pty, after eow, a child that keeps writing (blocked once the pty is full)
        still ends the session when signalled (the operator's ^C): its exit has the pty
        read again to its end, and exit-signal, EOF and close follow.
        """
        channel, conn = self.start((b"pty-req", ptyReq()), (b"exec", NS(b"echo started; exec yes")))
        await conn.when(lambda: b"started" in conn.stdout())
        self.assertTrue(channel.requestReceivedWithReply(EOW, b"", False))
        self.assertTrue(channel.requestReceivedWithReply(b"signal", NS(b"TERM"), True))
        await conn.when(conn.isClosed)
        self.assertIn(exitSignal(b"TERM"), conn.events)

    test_ptyChildEndsWhenSignalled.timeout = 20  # type: ignore[attr-defined]


class RelayTests(RelayTestCase):
    """groundcontrol passes eow on, and holds a connection to no-more-sessions."""

    def setUp(self) -> None:
        super().setUp()
        self.connectAgent()

    def test_eowReachesTheDevice(self) -> None:
        """The operator's eow reaches the device's session as sent: no reply wanted."""
        session = self.openSession()
        self.successResultOf(self.runCommand(session, b"sleep"))
        self.assertIsNone(session.request(EOW, b"", wantReply=False))
        self.fleet.flush()
        (device,) = self.sessions
        self.assertIn((EOW, b"", False), device.requests)
        self.assertFalse(session.isClosed)

    def test_noMoreSessions(self) -> None:
        """
        After no-more-sessions the open session goes on and a channel of another kind is
        answered as before (refused here: forwards are not scripted), but opening a
        session ends the connection, as sshd does.
        """
        operator = self.operator()
        second = self.openSession(operator)  # before it: as many sessions as wanted
        first = self.openSession(operator)
        assert operator.connection is not None
        operator.connection.sendGlobalRequest(NO_MORE_SESSIONS, b"", wantReply=False)
        self.fleet.flush()
        self.successResultOf(self.runCommand(first, b"echo still here"))
        self.assertEqual(bytes(first.output), b"echo still here\n")
        forward = operator.openSession(channelType=b"direct-tcpip")
        self.fleet.flush()
        self.assertIsNotNone(forward.openFailure)
        self.assertFalse(operator.lost)
        operator.openSession()
        self.fleet.flush()
        self.assertTrue(operator.lost)
        self.assertEqual(operator.disconnectReason, "session opened after no-more-sessions")
        self.assertTrue(second.isClosed)

    def test_noMoreSessionsAnswered(self) -> None:
        """Asked with a reply wanted (OpenSSH asks without), it is granted."""
        operator = self.operator()
        assert operator.connection is not None
        granted = operator.connection.sendGlobalRequest(NO_MORE_SESSIONS, b"", wantReply=True)
        self.fleet.flush()
        self.successResultOf(granted)
