"""
The pull (agent.session, agent._process): while the link to groundcontrol is backlogged, a
pipe child's stdout is left out of the reactor and read by its channel when the link serves
it, one read at a time, sent at once; the pipe goes back to the reactor once the link has
caught up with it.

A real TunnelConnection, LinkFlow and SessionChannel over an in-memory socket that pauses the
link above LINK_BUFFER_SIZE (tests.test_linkflow), and a fake pipe child; the process's hold,
pull and release on a real pipe under a MemoryReactor; the agent's pty child, on a real pty,
never held. A link lost while a pipe is held leaves no garbage:
tests/test_agent_link_garbage.py, with L{PipeChild}.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, cast

from twisted.conch.ssh import common
from twisted.internet import abstract
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.channel import LINK_MAX_PACKET
from accesstunnel.connection import TunnelConnection
from accesstunnel.linkflow import LINK_BUFFER_SIZE, SERVE_TURNS, LinkFlow
from agent import _process
from agent.session import SessionChannel, SessionEnvironment
from tests.test_agent_session import FakeChild
from tests.test_linkflow import BufferingByteTransport, PacketTransport

#: One read of a bulk child's pipe: four link packets, which fill the link.
READ = _process.READ_SIZE


class PipeChild(FakeChild):
    """
    A pipe child whose stdout is a queue of the reads the pipe would give, read by the reactor
    (L{reactorReads}) while it is not held, or pulled by the channel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pipe: deque[bytes] = deque()
        self.inReactor = True
        self.holds = self.releases = self.pulls = 0
        #: The child's process protocol.
        self.proto: Any = None

    def holdOutput(self) -> bool:
        self.inReactor = False
        self.holds += 1
        return True

    def pullOutput(self) -> bytes | None:
        self.pulls += 1
        return self.pipe.popleft() if self.pipe else None

    def releaseOutput(self) -> None:
        self.inReactor = True
        self.releases += 1

    def pauseProducing(self) -> None:
        super().pauseProducing()
        self.inReactor = False

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self.inReactor = True


class PlainChild(FakeChild):
    """
    A child that is no L{_process.OutputPull} (another reactor's): never held, its output is
    always the reactor's to read.
    """


def realPtyChild(case: SynchronousTestCase, reactor: MemoryReactor) -> Any:
    """
    The agent's own pty child (L{_process._SessionPTYProcess}) on the master of a real pty
    (no process behind it), read by C{reactor}.
    """
    master, slave = os.openpty()
    case.addCleanup(os.close, slave)
    case.addCleanup(os.close, master)
    child: Any = _process._SessionPTYProcess.__new__(_process._SessionPTYProcess)
    abstract.FileDescriptor.__init__(child, reactor)
    child.fd = master
    child.connected = 1
    child.pid = None
    child.startReading()
    return child


def spawnerOf(child: Any) -> _process.Spawner:
    """A spawner that starts C{child} for the session, whatever it asks to run."""

    def spawn(reactor: Any, protocol: Any, *args: Any) -> Any:
        protocol.makeConnection(child)
        child.proto = protocol
        return child

    return cast(_process.Spawner, spawn)


class PullTests(SynchronousTestCase):
    """A session channel's pipe child held, pulled and released as the link backs up and drains."""

    def setUp(self) -> None:
        self.socket = BufferingByteTransport()
        self.socket.bufferSize = LINK_BUFFER_SIZE
        self.ssh = PacketTransport(self.socket)
        self.conn = TunnelConnection()
        self.conn.transport = self.ssh
        link = LinkFlow.attach(self.conn)
        assert link is not None
        self.conn.linkFlow = self.link = link

    def openSession(self, number: int, child: Any = None, window: int = 64 << 20) -> Any:
        """A session channel on the link running C{child} (a L{PipeChild} by default)."""
        child = child or PipeChild()
        channel: Any = SessionChannel(
            SessionEnvironment(home="/nonexistent-home"),
            Clock(),
            spawn=spawnerOf(child),
            remoteWindow=window,
            remoteMaxPacket=LINK_MAX_PACKET,
            conn=self.conn,
        )
        channel.id = number
        self.conn.channels[number] = channel
        self.conn.channelsToRemoteChannel[channel] = 100 + number
        self.conn.localToRemoteChannel[number] = 100 + number
        channel.channelOpen(b"")
        self.assertTrue(channel.requestReceivedWithReply(b"exec", common.NS(b"cat"), True))
        channel.child = child
        return channel

    def reactorReads(self, channel: Any) -> bool:
        """The reactor reads the child's pipe once if it may and the pipe has anything."""
        child = channel.child
        if not (child.inReactor and child.pipe):
            return False
        channel.process.proto.childDataReceived(1, child.pipe.popleft())
        return True

    def sentBy(self, packets: list[tuple[str, int, int]]) -> dict[int, int]:
        out: dict[int, int] = {}
        for kind, remote, size in packets:
            if kind == "data":
                out[remote - 100] = out.get(remote - 100, 0) + size
        return out

    def test_backloggedLinkHoldsThePipe(self) -> None:
        """
        A read that fills the link leaves the pipe out of the reactor: what the child writes
        next waits in its pipe, not in the channel's queue, and the channel waits for the
        link to serve it.
        """
        channel = self.openSession(0)
        channel.child.pipe.extend([b"a" * READ, b"b" * READ])
        self.assertTrue(self.reactorReads(channel))
        self.assertTrue(self.link.paused)
        self.assertFalse(channel.child.inReactor)
        self.assertFalse(self.reactorReads(channel))
        self.assertEqual(channel.queuedBytes, 0)
        self.assertEqual(len(channel.child.pipe), 1)
        self.assertIn(channel, self.link._waiting)

    def test_servedChannelReadsAndSendsAtOnce(self) -> None:
        """
        Each time the link drains, the held channel reads its pipe once and sends the read
        whole, in the same call, and waits again: nothing is ever queued, and the pipe stays
        out of the reactor (no re-registration per burst).
        """
        channel = self.openSession(0)
        channel.child.pipe.extend([bytes([65 + i]) * READ for i in range(4)])
        self.reactorReads(channel)
        self.ssh.take()
        for _ in range(3):
            self.socket.drain()
            self.assertEqual(self.sentBy(self.ssh.take()), {0: READ})
            self.assertEqual(channel.queuedBytes, 0)
            self.assertTrue(self.link.paused)
        self.assertEqual(channel.child.pulls, 3)
        self.assertEqual((channel.child.holds, channel.child.releases), (1, 0))
        self.assertFalse(channel.child.inReactor)

    def test_emptyPipeGoesBackToTheReactor(self) -> None:
        """
        Served with nothing in its pipe, the channel gives the pipe back to the reactor: the
        link has caught up, and output that comes later (a prompt, a reply) is read and sent
        as soon as it is written.
        """
        channel = self.openSession(0)
        channel.child.pipe.append(b"a" * READ)
        self.reactorReads(channel)
        self.socket.drain()
        self.assertTrue(channel.child.inReactor)
        self.assertEqual(channel.child.releases, 1)
        self.assertFalse(self.link.paused)
        self.ssh.take()
        channel.child.pipe.append(b"prompt$ ")
        self.assertTrue(self.reactorReads(channel))
        self.assertEqual(self.sentBy(self.ssh.take()), {0: 8})

    def test_shortReadsKeepTheHold(self) -> None:
        """
        A pull that gets less than a full read still sends it at once; the pipe stays held
        while the link keeps pausing, and is given back only when a pull finds it empty.
        """
        channel = self.openSession(0)
        channel.child.pipe.extend([b"a" * READ, b"b" * (READ - 1000), b"c" * READ])
        self.reactorReads(channel)
        self.socket.drain()  # pulls the short read: below the link's buffer, pulls again
        self.assertEqual(channel.child.pulls, 2)
        self.assertFalse(channel.child.inReactor)
        self.socket.drain()
        self.assertTrue(channel.child.inReactor)
        self.assertEqual(self.sentBy(self.ssh.take()), {0: 3 * READ - 1000})

    def test_servedInTurn(self) -> None:
        """
        Three held channels: each drain of the link serves one read of the channel at the
        front of the line, which keeps the front for SERVE_TURNS reads in a row (read
        just after its child refilled the pipe) and then goes to the back: every channel
        moves at the same rate, a run of reads at a time.
        """
        self.assertEqual(SERVE_TURNS, 4)
        channels = [self.openSession(n) for n in range(3)]
        for channel in channels:
            channel.child.pipe.extend([bytes([65 + channel.id]) * READ] * 9)
            self.reactorReads(channel)
        self.assertEqual(self.sentBy(self.ssh.take()), {0: READ})
        self.assertTrue(all(not c.child.inReactor for c in channels[1:]))
        order: list[int] = []
        for _ in range(16):
            self.socket.drain()
            order.extend(self.sentBy(self.ssh.take()))
        self.assertEqual(order, [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4)

    def test_replyGoesAheadOfHeldChannels(self) -> None:
        """
        A session's small output (an echo, a prompt) while held bulk channels fill the link
        goes out at the next drain, before their reads; a held channel, even with nothing
        queued, never takes that place.
        """
        bulk = [self.openSession(n) for n in range(3)]
        for channel in bulk:
            channel.child.pipe.extend([b"x" * READ] * 9)
            self.reactorReads(channel)
        self.assertTrue(all(channel.queuedBytes == 0 for channel in bulk[:1]))
        shell = self.openSession(3, child=PlainChild())
        shell.process.proto.childDataReceived(1, b"prompt$ ")
        self.ssh.take()
        self.socket.drain()
        packets = [p for p in self.ssh.take() if p[0] == "data"]
        self.assertEqual(packets[0], ("data", 103, 8))
        self.assertEqual({remote for _, remote, _ in packets[1:]}, {100})

    def test_nothingHeldWhileTheLinkHasRoom(self) -> None:
        """A child's output while the link has room is sent at once and the pipe stays read."""
        channel = self.openSession(0)
        channel.child.pipe.append(b"x" * 1000)
        self.reactorReads(channel)
        self.assertEqual(self.sentBy(self.ssh.take()), {0: 1000})
        self.assertTrue(channel.child.inReactor)
        self.assertEqual(channel.child.holds, 0)

    def test_closedWindowKeepsTheHighWaterPause(self) -> None:
        """
        A channel out of window waits for its peer, not the link: its pipe is not held for
        the link, and its queue pauses the child at high water as before.
        """
        channel = self.openSession(0, window=READ)
        channel.child.pipe.extend([b"a" * READ, b"b" * READ, b"c" * READ])
        self.reactorReads(channel)
        self.socket.drain()
        self.reactorReads(channel)
        self.reactorReads(channel)
        self.assertEqual(channel.child.holds, 0)
        self.assertTrue(channel.child.paused)

    def test_windowClosedWhileHeld(self) -> None:
        """
        A held channel that runs out of window gives the pipe back to the reactor when the
        link next serves it: it now waits for its peer, and its queue pauses the child at high
        water as before (the pipe is not held again meanwhile).
        """
        channel = self.openSession(0, window=2 * READ)
        channel.child.pipe.extend([b"a" * READ] * 4)
        self.reactorReads(channel)
        self.socket.drain()  # pulls the second read: the window is spent
        self.assertEqual(channel.remoteWindowLeft, 0)
        self.assertFalse(channel.child.inReactor)
        self.socket.drain()
        self.assertTrue(channel.child.inReactor)
        self.reactorReads(channel)
        self.reactorReads(channel)
        self.assertEqual((channel.child.holds, channel.child.releases), (1, 1))
        self.assertTrue(channel.child.paused)
        self.assertEqual(self.sentBy(self.ssh.take()), {0: 2 * READ})

    def test_highWaterPauseIsNotHeld(self) -> None:
        """
        A channel whose queue paused its child at high water (here with stderr) does not hold
        the pipe for the link as well: the pause alone keeps the child, and when the queue
        drains every pipe goes back to the reactor.
        """
        channel = self.openSession(0)
        self.link.pauseProducing()  # the other sessions have filled the socket
        channel.process.proto.childDataReceived(2, b"e" * (READ + 1))
        self.assertTrue(channel.child.paused)
        channel.process.proto.childDataReceived(1, b"o" * 1000)  # read in the same turn
        self.assertEqual(channel.child.holds, 0)
        self.socket.drain()
        self.assertFalse(channel.child.paused)
        self.assertTrue(channel.child.inReactor)

    def test_ptyOutputIsNeverHeld(self) -> None:
        """
        The agent's pty child says its output is never held: with the link backlogged, what
        it writes is queued and the reactor goes on reading the pty.
        """
        reactor = MemoryReactor()
        child = realPtyChild(self, reactor)
        self.assertIsInstance(child, _process.OutputPull)
        channel = self.openSession(0, child=child)
        channel.process.proto.childDataReceived(1, b"a" * READ)
        self.assertTrue(self.link.paused)
        channel.process.proto.childDataReceived(1, b"b" * 100)
        self.assertEqual(channel.queuedBytes, 100)
        self.assertFalse(channel._outputHeld)
        self.assertIn(child, reactor.readers)

    def test_childWithoutThePullIsNeverHeld(self) -> None:
        """A child that is no OutputPull (another reactor's): its output is read by the reactor."""
        channel = self.openSession(0, child=PlainChild())
        channel.process.proto.childDataReceived(1, b"a" * READ)
        self.assertTrue(self.link.paused)
        channel.process.proto.childDataReceived(1, b"b" * 100)
        self.assertEqual(channel.queuedBytes, 100)

    def test_closedChannelLetsGo(self) -> None:
        """
        A held channel closed before the link serves it reads nothing more: served, it gives
        the pipe back (which the hang-up closes).
        """
        channel = self.openSession(0)
        channel.child.pipe.extend([b"a" * READ, b"b" * READ])
        self.reactorReads(channel)
        channel.abortConnection()
        self.socket.drain()
        self.assertEqual(channel.child.pulls, 0)
        self.assertTrue(channel.child.inReactor)


class ProcessHoldTests(SynchronousTestCase):
    """L{_process._SessionProcess}'s hold, pull and release on a real pipe."""

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        read, write = os.pipe()
        os.set_blocking(read, False)
        self.write: int | None = write
        self.addCleanup(self.closeWriter)
        self.process = _process._SessionProcess.__new__(_process._SessionProcess)
        self.reader = _process._LargeReader(self.reactor, self.process, 1, read)
        self.addCleanup(os.close, read)
        self.process.pipes = {1: self.reader}

    def closeWriter(self) -> None:
        if self.write is not None:
            os.close(self.write)
            self.write = None

    def test_pipeChildIsAnOutputPull(self) -> None:
        """The pipe child says its output can be held; so does the pty child, which never is."""
        self.assertIsInstance(self.process, _process.OutputPull)
        pty = realPtyChild(self, self.reactor)
        self.assertFalse(pty.holdOutput())
        self.assertIn(pty, self.reactor.readers)
        self.assertIsNone(pty.pullOutput())

    def test_holdTakesThePipeFromTheReactor(self) -> None:
        """Held, the reactor no longer reads the pipe; released, it does again."""
        self.assertIn(self.reader, self.reactor.readers)
        self.assertTrue(self.process.holdOutput())
        self.assertNotIn(self.reader, self.reactor.readers)
        self.process.releaseOutput()
        self.assertIn(self.reader, self.reactor.readers)

    def test_pullReadsWhatWaits(self) -> None:
        """A pull is one read of what the child wrote; an empty pipe gives None."""
        self.process.holdOutput()
        assert self.write is not None
        os.write(self.write, b"output")
        self.assertEqual(self.process.pullOutput(), b"output")
        self.assertIsNone(self.process.pullOutput())

    def test_pullAtTheEnd(self) -> None:
        """
        At the pipe's end a pull gives None, so the channel gives the pipe back to the
        reactor, whose read then sees the end and closes it the usual way.
        """
        self.process.holdOutput()
        self.closeWriter()
        self.assertIsNone(self.process.pullOutput())

    def test_noStdout(self) -> None:
        """A process without a stdout pipe (closed already) is not held and gives nothing."""
        self.process.pipes = {}
        self.assertFalse(self.process.holdOutput())
        self.assertIsNone(self.process.pullOutput())
        self.process.releaseOutput()
