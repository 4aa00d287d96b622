"""
Tests for accesstunnel.logfilter's treatment of Conch's per-channel "sending close" event: both
programs write it at --log-level debug only (their own session lines say when a session ended);
and of Twisted's own lines that name objects by repr (factories, listening ports).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import MSG_CHANNEL_CLOSE
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.logfilter import filtered
from agent.link import AgentConnection
from groundcontrol.sshserver import GroundControlConnection
from tests.test_keepalive import _Recorder


class SendingCloseTests(SynchronousTestCase):
    """Conch's SSHConnection.sendClose logs "sending close {id}" at info for every channel."""

    def closeLines(self, conn: Any, level: Any) -> list[str]:
        """
        The lines an observer filtered at C{level} gets from C{conn} while Conch's own
        sendClose closes one of its channels (local 3, remote 7).
        """
        seen: list[Any] = []
        observer = filtered(seen.append, level)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        conn.transport = _Recorder()
        channel: Any = SSHChannel(conn=conn)
        channel.id = 3
        conn.channels[3] = channel
        conn.channelsToRemoteChannel[channel] = 7
        conn.sendClose(channel)
        self.assertEqual(conn.transport.packets, [(MSG_CHANNEL_CLOSE, b"\x00\x00\x00\x07")])
        return [formatEvent(e) for e in seen if e.get("log_source") is conn]

    def test_agentWritesItAtDebugOnly(self) -> None:
        """The agent's link connection: not written at info, written at debug."""
        self.assertEqual(self.closeLines(AgentConnection(cast(Any, None)), LogLevel.info), [])
        self.assertEqual(
            self.closeLines(AgentConnection(cast(Any, None)), LogLevel.debug), ["sending close 3"]
        )

    def test_groundcontrolWritesItAtDebugOnly(self) -> None:
        """groundcontrol's connections (operators' and devices'): the same."""
        self.assertEqual(self.closeLines(GroundControlConnection(), LogLevel.info), [])
        self.assertEqual(
            self.closeLines(GroundControlConnection(), LogLevel.debug), ["sending close 3"]
        )

    def test_onlyFromAnSSHConnection(self) -> None:
        """The same text logged by anything but an SSH connection is an info event as before."""
        seen: list[Any] = []
        log = Logger(namespace="elsewhere", observer=filtered(seen.append, LogLevel.info))
        log.info("sending close {id}", id=3)
        self.assertEqual([formatEvent(e) for e in seen], ["sending close 3"])


class TwistedNoiseTests(SynchronousTestCase):
    """
    Twisted's own info lines that name objects by repr and that our lines say better:
    written at debug only, in both programs.
    """

    def test_factoryStartAndStop(self) -> None:
        """
        "Starting factory <...object at 0x...>" and "Stopping factory", which a noisy
        client factory logs for every connection it makes (on a device, at each retry).
        """
        for level, expected in ((LogLevel.info, 0), (LogLevel.debug, 2)):
            seen: list[Any] = []
            observer = filtered(seen.append, level)
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
            factory = Factory()
            factory.doStart()
            factory.doStop()
            self.assertEqual(len([e for e in seen if e.get("log_source") is factory]), expected)

    def test_listeningPortLines(self) -> None:
        """
        A listening port's legacy lines, "AcceptingFactory starting on 6010" and "(TCP Port
        6010 Closed)" (an X11 display, a remote forward), as Twisted's log.msg makes them;
        other legacy lines stay.
        """
        for level, expected in (
            (LogLevel.info, ["something else"]),
            (
                LogLevel.debug,
                [
                    "AcceptingFactory starting on 6010",
                    "(TCP Port 6010 Closed)",
                    "AcceptingFactory starting on '/tmp/ssh-x/agent.7'",
                    "(UNIX Port /tmp/ssh-x/agent.7 Closed)",
                    "something else",
                ],
            ),
        ):
            seen: list[Any] = []
            legacy = log.LogPublisher(publishPublisher=LogPublisher(filtered(seen.append, level)))
            legacy.msg("AcceptingFactory starting on 6010")
            legacy.msg("(TCP Port 6010 Closed)")
            legacy.msg("AcceptingFactory starting on '/tmp/ssh-x/agent.7'")
            legacy.msg("(UNIX Port /tmp/ssh-x/agent.7 Closed)")
            legacy.msg("something else")
            self.assertEqual([formatEvent(e) for e in seen], expected)

    def test_ourOwnStartingLinesStay(self) -> None:
        """The same words in a line of ours (not a legacy port line) are written at info."""
        seen: list[Any] = []
        ours = Logger(namespace="elsewhere", observer=filtered(seen.append, LogLevel.info))
        ours.info("{what} starting on {port}", what="display", port=6010)
        self.assertEqual([formatEvent(e) for e in seen], ["display starting on 6010"])
