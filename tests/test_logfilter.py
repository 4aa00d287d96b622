"""
Tests for accesstunnel.logfilter's treatment of Conch's per-channel "sending close" event: both
programs write it at --log-level debug only (their own session lines say when a session ended).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import MSG_CHANNEL_CLOSE
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
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
