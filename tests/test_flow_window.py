"""
Tests for the receive windows channels offer: a relay hop (groundcontrol) offers
DEFAULT_WINDOW, a channel whose bytes end on the device (a session's child, a
forward's socket) offers the larger ENDPOINT_WINDOW, and what such a channel
holds for a consumer that never reads stays within that one window. And for the
output such a channel queues (ENDPOINT_HIGH_WATER) before it stops reading its
source, and the larger stdin a pipe child gets (STDIN_PIPE_SIZE).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any

from twisted.conch.ssh.common import NS
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from accesstunnel.channel import (
    DEFAULT_MAX_PACKET,
    DEFAULT_WINDOW,
    ENDPOINT_HIGH_WATER,
    ENDPOINT_WINDOW,
    FlowChannel,
)
from agent import _process
from agent._process import OUTPUT_PIPE_SIZE, READ_SIZE, STDIN_PIPE_SIZE
from agent.forward import ForwardChannel, SpliceChannel
from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.relay import RelayChannel
from tests.test_agent_session import FakeSpawner, RecordingConnection, deliver


def fakeSession(
    remoteWindow: int, remoteMaxPacket: int = DEFAULT_MAX_PACKET
) -> tuple[RecordingConnection, FakeSpawner, SessionChannel]:
    """An agent session channel with its default windows, over a recording connection."""
    conn = RecordingConnection()
    spawner = FakeSpawner()
    channel = SessionChannel(
        SessionEnvironment(home="/nonexistent", defaultPath="/bin"),
        Clock(),
        spawn=spawner,
        remoteWindow=remoteWindow,
        remoteMaxPacket=remoteMaxPacket,
    )
    conn.attach(channel)
    return conn, spawner, channel


class WindowChoiceTests(SynchronousTestCase):
    """Which receive window each kind of channel offers."""

    def test_relayHopKeepsDefaultWindow(self) -> None:
        """A plain FlowChannel and groundcontrol's relay channels offer DEFAULT_WINDOW."""
        self.assertEqual(FlowChannel().localWindowSize, DEFAULT_WINDOW)
        self.assertEqual(RelayChannel().localWindowSize, DEFAULT_WINDOW)

    def test_receiveWindowAttribute(self) -> None:
        """A subclass's receiveWindow is its default; a window the opener names wins."""

        class Wide(FlowChannel):
            receiveWindow = 3 * DEFAULT_WINDOW

        self.assertEqual(Wide().localWindowSize, 3 * DEFAULT_WINDOW)
        self.assertEqual(Wide().localWindowLeft, 3 * DEFAULT_WINDOW)
        self.assertEqual(Wide(localWindow=1000).localWindowSize, 1000)

    def test_deviceEndpointsOfferEndpointWindow(self) -> None:
        """The agent's session and forward channels offer the larger ENDPOINT_WINDOW."""
        self.assertGreater(ENDPOINT_WINDOW, DEFAULT_WINDOW)
        session = SessionChannel(
            SessionEnvironment(home="/nonexistent", defaultPath="/bin"), Clock()
        )
        self.assertEqual(session.localWindowSize, ENDPOINT_WINDOW)
        self.assertEqual(SpliceChannel().localWindowSize, ENDPOINT_WINDOW)
        self.assertEqual(ForwardChannel().localWindowSize, ENDPOINT_WINDOW)


class EndpointBoundTests(SynchronousTestCase):
    """The larger window still bounds what the device holds for a consumer."""

    def test_neverReadingChildHoldsOneWindow(self) -> None:
        """
        A child that never reads its stdin: the session passes on one
        ENDPOINT_WINDOW, gives no credit back, and the peer's window is then
        closed, so the agent holds at most that one window for it.
        """
        conn, spawner, channel = fakeSession(remoteWindow=1 << 20)
        channel.requestReceivedWithReply(b"exec", NS(b"cat > /dev/null"), True)
        child = spawner.child
        child.producer.pauseProducing()  # its pipe is full and stays full
        packet = b"u" * DEFAULT_MAX_PACKET
        while channel.localWindowLeft >= len(packet):
            deliver(channel, packet)
        self.assertEqual(channel.localWindowLeft, 0)
        self.assertEqual(conn.adjusted, 0)
        self.assertEqual(sum(map(len, child.stdin)), ENDPOINT_WINDOW)
        child.producer.resumeProducing()  # the child read it all after all
        self.assertEqual(conn.adjusted, ENDPOINT_WINDOW)
        self.assertEqual(channel.localWindowLeft, ENDPOINT_WINDOW)


class EndpointOutputTests(SynchronousTestCase):
    """A device endpoint stops reading its source after ENDPOINT_HIGH_WATER of queued output."""

    def test_endpointsUseEndpointHighWater(self) -> None:
        """Session and forward channels queue less than a relay hop's window before pausing."""
        self.assertLess(ENDPOINT_HIGH_WATER, DEFAULT_WINDOW)
        self.assertEqual(SessionChannel.highWater, ENDPOINT_HIGH_WATER)
        self.assertEqual(SpliceChannel.highWater, ENDPOINT_HIGH_WATER)
        self.assertEqual(ForwardChannel.highWater, ENDPOINT_HIGH_WATER)
        self.assertEqual(RelayChannel.highWater, DEFAULT_WINDOW)

    def test_stalledLinkPausesChildAtHighWater(self) -> None:
        """
        With nothing able to leave (window closed, as when the link is
        paused), the child is read until just over ENDPOINT_HIGH_WATER is
        queued, then no more: the device holds one read beyond the mark.
        """
        _, spawner, channel = fakeSession(remoteWindow=0)
        channel.requestReceivedWithReply(b"exec", NS(b"head -c 1G /dev/zero"), True)
        read = 64 * 1024
        while not spawner.child.paused:
            spawner.protocol.childDataReceived(1, b"d" * read)
        self.assertGreater(channel.queuedBytes, ENDPOINT_HIGH_WATER)
        self.assertLessEqual(channel.queuedBytes, ENDPOINT_HIGH_WATER + read)
        channel.addWindowBytes(ENDPOINT_HIGH_WATER)  # room again: it drains and reads on
        self.assertFalse(spawner.child.paused)


_F_GETPIPE_SZ = 1032


async def withSleepingChild(check: Callable[[Any], None]) -> None:
    """Spawn a real pipe child (C{sleep 30}) the agent's way, run C{check} on it, kill it."""
    ended: defer.Deferred[None] = defer.Deferred()

    class Child(ProcessProtocol):
        def processEnded(self, reason: Failure) -> None:
            ended.callback(None)

    child = _process.spawn(
        reactor, Child(), b"/bin/sleep", [b"sleep", b"30"], {}, "/", None, None, None
    )
    try:
        check(child)
    finally:
        child.signalProcess("KILL")
        await ended


class StdinPipeTests(TestCase):
    """A real pipe child on the real reactor: its stdin takes more before credit is held."""

    async def test_stdinPipeEnlarged(self) -> None:
        """
        The agent buffers up to STDIN_PIPE_SIZE for a pipe child before it
        holds back credit, and as root the kernel pipe itself is that large.
        """

        def check(child: Any) -> None:
            stdin = child.pipes[0]
            self.assertEqual(stdin.bufferSize, STDIN_PIPE_SIZE)
            if os.geteuid() == 0:
                self.assertEqual(fcntl.fcntl(stdin.fileno(), _F_GETPIPE_SZ), STDIN_PIPE_SIZE)

        await withSleepingChild(check)

    async def test_stdoutPipeHoldsOneRead(self) -> None:
        """
        As root, a pipe child's stdout pipe holds OUTPUT_PIPE_SIZE, at least one
        READ_SIZE read, so that a fast child is not woken every 64 KiB; stderr
        keeps the kernel's size.
        """
        if os.geteuid() != 0:
            raise SkipTest("the agent enlarges pipes only as root")
        self.assertGreaterEqual(OUTPUT_PIPE_SIZE, READ_SIZE)

        def check(child: Any) -> None:
            self.assertEqual(fcntl.fcntl(child.pipes[1].fileno(), _F_GETPIPE_SZ), OUTPUT_PIPE_SIZE)
            self.assertEqual(fcntl.fcntl(child.pipes[2].fileno(), _F_GETPIPE_SZ), 64 * 1024)

        await withSleepingChild(check)
