"""
What groundcontrol writes to its log per relayed session, at its default level (info): one
line when the session starts (who, which device, what it runs, from where) and one when it
ends (the same, and its exit status, bytes each way and duration); Conch's own per-channel
events go to debug. In memory: the real groundcontrol (InMemoryFleet) and a scripted agent,
on a Clock, read through twisted.logger observers filtered as the programs filter them.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.conch.ssh import common
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import MSG_CHANNEL_OPEN
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.logfilter import filtered
from agent.link import AgentConnection
from groundcontrol.sshserver import GroundControlConnection
from tests.test_keepalive import _Recorder
from tests.test_sessions import SessionTestCase


class SessionLinesTests(SessionTestCase):
    """
    Device kiln7 with a scripted agent (a shell echoes until EOF, 'die' prints a line and
    exits 7, 'cat' echoes) and alice, granted; the log read at info from her first session.
    """

    def setUp(self) -> None:
        super().setUp()
        self.fleet.flush()  # alice logged in
        self.events: list[Any] = []
        observer = filtered(self.events.append, LogLevel.info)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self) -> list[str]:
        """groundcontrol's lines (the operator's own client left out)."""
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace", "").startswith(("groundcontrol.", "accesstunnel."))
            and not e["log_namespace"].startswith("groundcontrol.testing.")
        ]

    def runRequest(self, request: bytes, data: bytes) -> Any:
        """Open a session, send one request, and let everything settle."""
        session = self.fleet.session(self.alice)
        session.request(request, data)
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        return session

    def test_execWritesOneLineAtStartAndOneAtEnd(self) -> None:
        """
        An exec that prints 6 bytes and exits 7, 2.5 s after it was opened: two lines, the
        first saying who runs what on which device from where, the second how it ended.
        """
        session = self.fleet.session(self.alice)
        self.fleet.clock.advance(2.5)
        session.exec(b"die")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        opened, ended = self.lines()
        self.assertRegex(
            opened, r"^session [a-z2-9]{10}: alice opened exec on kiln7 from 127\.0\.0\.1:\d+$"
        )
        sessionId = opened.split()[1].rstrip(":")
        self.assertEqual(
            ended,
            f"session {sessionId} ended: alice exec on kiln7, status 7, 0 bytes in, 6 out, 2.500 s",
        )

    def test_endLineFields(self) -> None:
        """The end line's fields are structured, for JSON logs: status, bytes, duration."""
        self.runRequest(b"exec", common.NS(b"die"))
        (ended,) = [e for e in self.events if "ended" in e.get("log_format", "")]
        self.assertEqual(ended["account"], "alice")
        self.assertEqual(ended["device"], "kiln7")
        self.assertEqual(ended["what"], "exec")
        self.assertEqual(ended["status"], "7")
        self.assertEqual((ended["bytesIn"], ended["bytesOut"]), (0, 6))
        self.assertEqual(ended["duration"], 0.0)

    def test_shell(self) -> None:
        """A shell says so."""
        session = self.runRequest(b"shell", b"")
        session.sendEOF()
        self.fleet.flush()
        opened, ended = self.lines()
        self.assertIn(" alice opened shell on kiln7 from ", opened)
        self.assertIn(" alice shell on kiln7, status 0, 0 bytes in, 2 out, ", ended)

    def test_bytesEachWay(self) -> None:
        """Bytes each way are those the relay counted."""
        session = self.runRequest(b"exec", common.NS(b"cat"))
        session.conn.sendData(session, b"hello")
        session.sendEOF()
        self.fleet.flush()
        _, ended = self.lines()
        self.assertIn(" alice exec on kiln7, status 0, 5 bytes in, 5 out, ", ended)

    def test_subsystemNamed(self) -> None:
        """A subsystem's line names it, with any control character made inert."""
        self.runRequest(b"subsystem", common.NS(b"sftp\nforged line"))
        opened, ended = self.lines()
        self.assertIn(" alice opened subsystem sftp?forged line on kiln7 from ", opened)
        self.assertIn(" alice subsystem sftp?forged line on kiln7, status 0,", ended)

    def test_signal(self) -> None:
        """A session whose command was killed by a signal says which."""
        session = self.runRequest(b"exec", common.NS(b"cat"))
        (device,) = self.device
        device.sendRequestInOrder(b"exit-signal", common.NS(b"TERM") + b"\x00" + common.NS(b""))
        device.loseConnection()
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        _, ended = self.lines()
        self.assertIn(" alice exec on kiln7, status signal TERM, 0 bytes in, 0 out,", ended)

    def test_endedBeforeAnyRequest(self) -> None:
        """A session channel closed before it ran anything has its end line only."""
        session = self.fleet.session(self.alice)
        session.loseConnection()
        self.fleet.flush()
        (ended,) = self.lines()
        self.assertRegex(
            ended,
            r"^session [a-z2-9]{10} ended: alice session on kiln7, status none,"
            r" 0 bytes in, 0 out, 0\.000 s$",
        )

    def test_oneLinePerSessionOfMany(self) -> None:
        """Ten sessions, one after another, on the same connection: twenty lines."""
        for _ in range(10):
            self.runRequest(b"exec", common.NS(b"true"))
        lines = self.lines()
        self.assertEqual(len(lines), 20)
        self.assertEqual(len([line for line in lines if ": alice opened exec " in line]), 10)
        self.assertEqual(len([line for line in lines if " ended: alice exec " in line]), 10)


class OpeningChannelTests(SynchronousTestCase):
    """Conch's SSHConnection.openChannel logs "opening channel {id} with ..." at info."""

    def openLines(self, conn: Any, level: Any) -> list[str]:
        """What an observer filtered at C{level} gets from C{conn} as it opens a channel."""
        seen: list[Any] = []
        observer = filtered(seen.append, level)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        conn.transport = _Recorder()
        channel: Any = SSHChannel(conn=conn, localWindow=4096, localMaxPacket=1024)
        channel.name = b"session"
        conn.openChannel(channel)
        self.assertEqual([kind for kind, _ in conn.transport.packets], [MSG_CHANNEL_OPEN])
        return [formatEvent(e) for e in seen if e.get("log_source") is conn]

    def test_groundcontrolWritesItAtDebugOnly(self) -> None:
        """groundcontrol opens a channel on a device's link per session: debug only."""
        self.assertEqual(self.openLines(GroundControlConnection(), LogLevel.info), [])
        self.assertEqual(
            self.openLines(GroundControlConnection(), LogLevel.debug),
            ["opening channel 0 with 4096 1024"],
        )

    def test_agentWritesItAtDebugOnly(self) -> None:
        """The agent's link (channels back for forwards): the same."""
        conn = AgentConnection(cast(Any, None))
        self.assertEqual(self.openLines(conn, LogLevel.info), [])

    def test_onlyFromAnSSHConnection(self) -> None:
        """The same text logged by anything but an SSH connection is an info event as before."""
        seen: list[Any] = []
        log = Logger(namespace="elsewhere", observer=filtered(seen.append, LogLevel.info))
        log.info(
            "opening channel {id} with {localWindowSize} {localMaxPacket}",
            id=1,
            localWindowSize=2,
            localMaxPacket=3,
        )
        self.assertEqual([formatEvent(e) for e in seen], ["opening channel 1 with 2 3"])
