"""
Tests for accesstunnel.linkflow.LinkFlow: a link whose socket is backed up holds
channel output in the channels' own queues (bounded, pausing their sources), and
serves the waiting channels in turn when the socket drains.

A real TunnelConnection and real FlowChannels; the SSH transport is a packet
recorder over a byte transport that behaves like Twisted's FileDescriptor towards
its producer (pause above bufferSize, resume once drained).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.conch.ssh import common, connection
from twisted.internet import abstract
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from accesstunnel import linkflow
from accesstunnel.channel import LINK_MAX_PACKET, FlowChannel
from accesstunnel.connection import TunnelConnection
from accesstunnel.linkflow import (
    EXPRESS_BYTES,
    LINK_BUFFER_SIZE,
    MALLOC_MMAP_THRESHOLD,
    MALLOC_TRIM_THRESHOLD,
    NOTSENT_LOWAT,
    SERVE_TURNS,
    LinkFlow,
    limitUnsent,
)


class BufferingByteTransport:
    """Pauses its streaming producer above C{bufferSize}, like a socket transport."""

    bufferSize = 64 * 1024

    def __init__(self) -> None:
        self.producer: Any = None
        self.buffered = 0
        self.peak = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("already registered")
        self.producer = producer

    def write(self, size: int) -> None:
        self.buffered += size
        self.peak = max(self.peak, self.buffered)
        if self.producer is not None and self.buffered > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The kernel took everything: resume the producer, as doWrite does."""
        self.buffered = 0
        if self.producer is not None:
            self.producer.resumeProducing()


class PacketTransport:
    """An SSH transport: records (type, channel, size) and writes the bytes below."""

    def __init__(self, below: Any) -> None:
        self.transport = below
        self.packets: list[tuple[str, int, int]] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        remote = struct.unpack(">L", payload[:4])[0]
        if messageType == connection.MSG_CHANNEL_DATA:
            size = len(common.getNS(payload[4:])[0])
            self.packets.append(("data", remote, size))
        elif messageType == connection.MSG_CHANNEL_EOF:
            self.packets.append(("eof", remote, 0))
        elif messageType == connection.MSG_CHANNEL_CLOSE:
            self.packets.append(("close", remote, 0))
        else:
            self.packets.append((str(messageType), remote, 0))
        if self.transport is not None:
            self.transport.write(len(payload) + 20)

    def take(self) -> list[tuple[str, int, int]]:
        taken, self.packets = self.packets, []
        return taken


class HookChannel(FlowChannel):
    """Records the pause/resume hooks and what was reported sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks: list[str] = []
        self.sentTotal = 0

    def sent(self, count: int) -> None:
        self.sentTotal += count

    def outputPaused(self) -> None:
        self.hooks.append("paused")

    def outputResumed(self) -> None:
        self.hooks.append("resumed")


class LinkFlowTests(SynchronousTestCase):
    """Output beyond what the socket takes waits in the channels, not in the buffer."""

    def setUp(self) -> None:
        self.socket = BufferingByteTransport()
        self.ssh = PacketTransport(self.socket)
        self.conn = TunnelConnection()
        self.conn.transport = self.ssh
        self.conn.linkFlow = LinkFlow.attach(self.conn)

    def openChannels(self, count: int, window: int = 2 * 1024 * 1024) -> list[HookChannel]:
        channels = []
        for number in range(count):
            channel = HookChannel(remoteWindow=window, remoteMaxPacket=32 * 1024, conn=self.conn)
            channel.id = number
            self.conn.channels[number] = channel
            self.conn.channelsToRemoteChannel[channel] = 100 + number
            self.conn.localToRemoteChannel[number] = 100 + number
            channel.channelOpen(b"")
            channels.append(channel)
        return channels

    def test_attachRegistersAsStreamingProducer(self) -> None:
        """The connection's LinkFlow is the producer of the byte transport under SSH."""
        self.assertIsInstance(self.conn.linkFlow, LinkFlow)
        self.assertIs(self.socket.producer, self.conn.linkFlow)

    def test_noBackPressureWithoutAProducerCapableTransport(self) -> None:
        """Below SSH with no registerProducer (or one taken), attach gives None."""
        conn = TunnelConnection()
        conn.transport = PacketTransport(object())
        self.assertIsNone(LinkFlow.attach(conn))
        conn.transport = PacketTransport(self.socket)  # already has our producer
        self.assertIsNone(LinkFlow.attach(conn))

    def test_backedUpSocketHoldsOutputInTheChannel(self) -> None:
        """
        Once the socket is over its buffer size nothing more is sent: the rest
        stays queued, sent() is not reported for it (a relay keeps the feeding
        hop's window closed), and the channel's source is paused at high water.
        """
        (channel,) = self.openChannels(1)
        channel.write(b"x" * (3 * 1024 * 1024))
        packets = self.ssh.take()
        self.assertEqual(len(packets), 2)  # 2 x (32 KiB + framing) cross 64 KiB
        self.assertTrue(self.conn.linkFlow.paused)
        self.assertEqual(channel.sentTotal, 2 * 32 * 1024)
        self.assertEqual(channel.queuedBytes, 3 * 1024 * 1024 - 2 * 32 * 1024)
        self.assertEqual(channel.hooks, ["paused"])
        self.assertLessEqual(self.socket.peak, self.socket.bufferSize + 33 * 1024)

    def test_drainedSocketResumesTheChannel(self) -> None:
        """Each time the socket drains, about a buffer's worth more goes out, until done."""
        (channel,) = self.openChannels(1, window=8 * 1024 * 1024)
        channel.write(b"x" * (3 * 1024 * 1024))
        channel.writeEOF()
        channel.loseConnection()
        rounds = 0
        while channel.hasQueuedOutput:
            self.socket.drain()
            rounds += 1
            self.assertLess(rounds, 100)
        packets = self.ssh.take()
        self.assertEqual(sum(size for kind, _, size in packets if kind == "data"), 3 * 1024 * 1024)
        self.assertEqual([kind for kind, _, _ in packets[-2:]], ["eof", "close"])
        self.assertEqual(channel.sentTotal, 3 * 1024 * 1024)
        self.assertEqual(channel.hooks, ["paused", "resumed"])
        self.assertLessEqual(self.socket.peak, self.socket.bufferSize + 33 * 1024)

    def test_controlMessagesWaitBehindAPausedLink(self) -> None:
        """An EOF queued while the link is paused keeps its place and goes out on resume."""
        first, second = self.openChannels(2)
        first.write(b"x" * (96 * 1024 + 1))
        self.assertTrue(self.conn.linkFlow.paused)
        second.writeEOF()
        self.assertEqual([p for p in self.ssh.take() if p[0] == "eof"], [])
        self.socket.drain()
        self.assertIn(("eof", 101, 0), self.ssh.take())

    def test_waitingChannelsAreServedInTurn(self) -> None:
        """
        With several channels waiting, they are served in the order they
        stopped for the link; one that stops again during its turn keeps the
        link for SERVE_TURNS turns in a row, then goes to the back: every
        channel gets the link in turn.
        """
        self.assertEqual(SERVE_TURNS, 4)
        channels = self.openChannels(4)
        for channel in channels:
            channel.write(b"x" * (1024 * 1024))
        self.ssh.take()
        firsts = []
        for _ in range(20):
            self.socket.drain()
            firsts.append(self.ssh.take()[0][1] - 100)
        self.assertEqual(firsts, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [0] * 4)

    def test_smallOutputGoesAheadOfBulk(self) -> None:
        """
        A channel that joins the line with little to send (an echo, a prompt) is
        served at the next drain, before the bulk channels that stopped earlier,
        and in the order such channels came.
        """
        bulk = self.openChannels(3)
        for channel in bulk:
            channel.write(b"x" * (1024 * 1024))
        typed, prompt = self.openChannels(5)[3:]
        typed.write(b"k")
        prompt.write(b"$" * EXPRESS_BYTES)
        self.ssh.take()
        self.socket.drain()
        packets = self.ssh.take()
        self.assertEqual(packets[:2], [("data", 103, 1), ("data", 104, EXPRESS_BYTES)])
        self.assertEqual({number for _, number, _ in packets[2:]}, {100})

    def test_largeOutputJoinsTheBack(self) -> None:
        """More than EXPRESS_BYTES waiting: a channel joins the back of the line."""
        first, second = self.openChannels(2)
        first.write(b"x" * (1024 * 1024))
        second.write(b"y" * (EXPRESS_BYTES + 1))
        self.ssh.take()
        numbers = []
        for _ in range(SERVE_TURNS + 1):
            self.socket.drain()
            numbers.append(self.ssh.take()[0][1])
        self.assertEqual(numbers, [100] * SERVE_TURNS + [101])

    def test_bulkWaiterJoinsTheBack(self) -> None:
        """
        A channel that holds its source back for the link (the agent's pulled
        pipe) says so, and joins the back of the line with nothing queued.
        """
        first, held = self.openChannels(2)
        first.write(b"x" * (1024 * 1024))
        assert self.conn.linkFlow is not None
        self.conn.linkFlow.waitForRoom(held, bulk=True)
        drained: list[str] = []
        held.drainQueue = lambda: drained.append("held")  # type: ignore[method-assign]
        for _ in range(SERVE_TURNS):
            self.socket.drain()
            self.assertEqual(drained, [])
        self.socket.drain()
        self.assertEqual(drained, ["held"])

    def test_manyChannelsBoundedBuffer(self) -> None:
        """
        A hundred channels with 2 MiB windows writing 1 MiB each never put more
        than a buffer and a packet into the socket at once, and all of it is
        delivered, fairly: when the first channel finishes, every other one is
        at most one run of turns behind it.
        """
        channels = self.openChannels(100)
        for channel in channels:
            channel.write(b"x" * (1024 * 1024))
        sentAtFirstFinish = None
        while any(channel.hasQueuedOutput for channel in channels):
            self.socket.drain()
            if sentAtFirstFinish is None and any(not c.hasQueuedOutput for c in channels):
                sentAtFirstFinish = [c.sentTotal for c in channels]
        self.assertLessEqual(self.socket.peak, self.socket.bufferSize + 33 * 1024)
        self.assertEqual([c.sentTotal for c in channels], [1024 * 1024] * 100)
        assert sentAtFirstFinish is not None
        oneRun = SERVE_TURNS * (self.socket.bufferSize + 32 * 1024)
        self.assertGreaterEqual(min(sentAtFirstFinish), 1024 * 1024 - oneRun)

    def test_stopProducingHoldsOutput(self) -> None:
        """A transport that stops its producer (connection lost) gets nothing more."""
        (channel,) = self.openChannels(1)
        self.conn.linkFlow.stopProducing()
        channel.write(b"x" * 100)
        self.assertEqual(self.ssh.take(), [])
        self.assertEqual(channel.queuedBytes, 100)


class PulledSource:
    """
    A bulk channel as L{LinkFlow} sees the agent's session pulling a pipe: each turn
    it sends one read that fills the link and waits for its next turn, or, if its
    command has not refilled the pipe (`misses`: the turns, counted from 1, that
    find it empty), sends nothing and leaves the line until the test brings it
    back (the reactor seeing the pipe readable again).
    """

    def __init__(self, name: str, flow: LinkFlow, socket: BufferingByteTransport) -> None:
        self.name = name
        self.flow = flow
        self.socket = socket
        self.misses: set[int] = set()
        self.turns = 0
        self.served: list[str] = []
        self.queuedBytes = 0

    def drainQueue(self) -> None:
        self.turns += 1
        if self.turns in self.misses:
            return
        self.served.append(self.name)
        self.socket.write(self.socket.bufferSize + 1)
        self.flow.waitForRoom(self, bulk=True)


class MissedTurnsTests(SynchronousTestCase):
    """
    A bulk channel that leaves the line during its run because its source had
    nothing ready makes up the turns it missed in its next run.
    """

    def setUp(self) -> None:
        self.socket = BufferingByteTransport()
        self.flow = LinkFlow(self.socket)
        self.socket.registerProducer(self.flow, True)
        self.socket.write(self.socket.bufferSize + 1)  # the link is full
        self.served: list[str] = []

    def sources(self, *names: str) -> list[PulledSource]:
        made = [PulledSource(name, self.flow, self.socket) for name in names]
        for source in made:
            source.served = self.served
            self.flow.waitForRoom(source, bulk=True)
        return made

    def drains(self, count: int) -> list[str]:
        for _ in range(count):
            self.socket.drain()
        return self.served

    def test_missedTurnsMadeUp(self) -> None:
        """
        A finds its pipe empty on the second turn of its run and leaves; back at
        the end of the line, its next run is SERVE_TURNS + 2 turns: the two of
        the four it missed (the empty one counts as taken).
        """
        self.assertEqual(SERVE_TURNS, 4)
        a = self.sources("A", "B", "C")[0]
        a.misses = {2}
        self.drains(2)  # A's turn, then its empty one and B's first in the same drain
        self.flow.waitForRoom(a, bulk=True)  # the pipe is readable again
        self.drains(14)
        self.assertEqual(self.served, ["A"] + ["B"] * 4 + ["C"] * 4 + ["A"] * 6 + ["B"])

    def test_noMissNoExtraTurns(self) -> None:
        """Channels that never find their source empty take SERVE_TURNS each, in turn."""
        self.sources("A", "B")
        self.assertEqual(self.drains(12), ["A"] * 4 + ["B"] * 4 + ["A"] * 4)

    def test_expressChannelOwesNothing(self) -> None:
        """
        A channel served from the express line (an echo) that then sends nothing owes no
        turns: when it later joins the bulk line, its run is SERVE_TURNS.
        """
        self.sources("A")
        echo = PulledSource("E", self.flow, self.socket)
        echo.served = self.served
        echo.misses = {1}
        self.flow.waitForRoom(echo)  # nothing queued: the express line
        self.drains(1)
        self.flow.waitForRoom(echo, bulk=True)
        self.drains(12)
        self.assertEqual(self.served, ["A"] * 4 + ["E"] * 4 + ["A"] * 4 + ["E"])

    def test_atMostARunMadeUp(self) -> None:
        """
        However many turns a channel misses, its next run is at most two runs long: A
        empty at once (3 owed: a run of 7), back, and empty again at once (4 owed, not 6).
        """
        self.assertEqual(SERVE_TURNS, 4)
        a = self.sources("A", "B")[0]
        a.misses = {1, 2}
        self.drains(1)  # A empty, B's first turn
        self.flow.waitForRoom(a, bulk=True)
        self.drains(4)  # B's run; A empty again, B's next first turn
        self.flow.waitForRoom(a, bulk=True)
        self.drains(12)
        self.assertEqual("".join(self.served), "B" * 8 + "A" * 8 + "B")


class SlowSocket(abstract.FileDescriptor):
    """
    Twisted's own write buffering over a fake socket that takes C{perCall}
    bytes per write: the real producer protocol (pause above bufferSize,
    resume when drained, closing only once the buffer is empty).
    """

    def __init__(self, perCall: int) -> None:
        super().__init__(reactor=MemoryReactor())
        self.connected = 1
        self.perCall = perCall
        self.written = 0
        self.sends = 0
        self.closed = False

    def writeSomeData(self, data: bytes) -> int:
        # Like Twisted's TCP: at most SEND_LIMIT bytes per call.
        taken = min(len(data), self.perCall, self.SEND_LIMIT)
        self.written += taken
        self.sends += 1
        return taken

    def _postLoseConnection(self) -> None:
        self.closed = True

    def connectionLost(self, reason: Any) -> None:
        self.closed = True


class RealBufferTests(SynchronousTestCase):
    """LinkFlow against twisted.internet.abstract.FileDescriptor itself."""

    def setUp(self) -> None:
        self.socket = SlowSocket(perCall=16 * 1024)
        self.ssh = RealSSH(self.socket)
        self.conn = TunnelConnection()
        self.conn.transport = self.ssh
        self.conn.linkFlow = LinkFlow.attach(self.conn)
        self.channel = HookChannel(remoteWindow=8 << 20, remoteMaxPacket=32 * 1024, conn=self.conn)
        self.channel.id = 0
        self.conn.channels[0] = self.channel
        self.conn.channelsToRemoteChannel[self.channel] = 5
        self.conn.localToRemoteChannel[0] = 5
        self.channel.channelOpen(b"")

    def pump(self) -> None:
        """Run the socket's writes as the reactor would, while it wants to write."""
        for _ in range(10_000):
            if self.socket not in self.socket.reactor.getWriters() or self.socket.closed:
                break
            self.socket.doWrite()

    def test_bufferStaysBoundedAndEverythingArrives(self) -> None:
        """
        4 MiB written at once: Twisted's buffer never holds more than its
        bufferSize and a packet, and all 4 MiB reach the socket in the end.
        """
        self.channel.write(b"x" * (4 << 20))
        peak = 0
        for _ in range(10_000):
            pending = len(self.socket.dataBuffer) - self.socket.offset + self.socket._tempDataLen
            peak = max(peak, pending)
            if not pending:
                break
            self.socket.doWrite()
        self.assertFalse(self.channel.hasQueuedOutput)
        self.assertLessEqual(peak, self.socket.bufferSize + 33 * 1024)
        self.assertEqual(self.ssh.payloadBytes, 4 << 20)

    def test_closeWhilePausedCompletes(self) -> None:
        """
        The transport is closed while the link is paused: once the buffer has
        drained the close completes (Twisted would otherwise resume the
        producer and wait for it forever).
        """
        self.channel.write(b"x" * (1 << 20))
        self.assertTrue(self.conn.linkFlow.paused)
        self.socket.loseConnection()
        self.pump()
        self.assertTrue(self.socket.closed)
        self.assertIsNone(self.socket.producer)


class RealSSH:
    """An SSH transport writing each packet's payload (plus framing) to C{socket}."""

    def __init__(self, socket: Any) -> None:
        self.transport = socket
        self.payloadBytes = 0

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if messageType == connection.MSG_CHANNEL_DATA:
            self.payloadBytes += len(common.getNS(payload[4:])[0])
        self.transport.write(b"\0" * (len(payload) + 20))


class WideLinkTests(SynchronousTestCase):
    """
    A link's socket is read and buffered LINK_BUFFER_SIZE at a time
    (LinkFlow.widen), under whatever protocol wrappers sit on it.
    """

    def setUp(self) -> None:
        self.heapKept: list[None] = []
        self.patch(linkflow, "keepReadBuffersInHeap", lambda: self.heapKept.append(None))
        self.socket = SlowSocket(perCall=1 << 30)
        # Two wrappers, as on groundcontrol (the handshake limiter) or the agent
        # (the failover watch) with TLS under it.
        outer = ProtocolWrapper(WrappingFactory(Protocol()), Protocol())
        inner = ProtocolWrapper(WrappingFactory(Protocol()), outer)
        inner.makeConnection(self.socket)
        outer.makeConnection(inner)
        self.wrappers = (outer, inner)
        self.ssh = RealSSH(outer)
        self.conn = TunnelConnection()
        self.conn.transport = self.ssh
        self.conn.linkFlow = LinkFlow.attach(self.conn)
        assert self.conn.linkFlow is not None
        self.link = self.conn.linkFlow

    def openChannel(self, number: int) -> HookChannel:
        channel = HookChannel(remoteWindow=8 << 20, remoteMaxPacket=LINK_MAX_PACKET, conn=self.conn)
        channel.id = number
        self.conn.channels[number] = channel
        self.conn.channelsToRemoteChannel[channel] = 10 + number
        self.conn.localToRemoteChannel[number] = 10 + number
        channel.channelOpen(b"")
        return channel

    def test_widenSetsTheSocketsBufferSize(self) -> None:
        """
        widen() sets bufferSize on the descriptor under the wrappers (what
        Twisted reads per recv and buffers before pausing the producer), and
        leaves the wrappers alone.
        """
        self.assertEqual(self.socket.bufferSize, 64 * 1024)
        self.link.widen()
        self.assertEqual(self.socket.bufferSize, LINK_BUFFER_SIZE)
        for wrapper in self.wrappers:
            self.assertNotIn("bufferSize", vars(wrapper))
        # and has malloc keep such reads in its heap
        self.assertEqual(len(self.heapKept), 1)

    def test_widenLimitsUnsentBytes(self) -> None:
        """
        widen() has the kernel keep at most NOTSENT_LOWAT unsent bytes of the link's
        TCP socket: the rest waits in our buffer and queues, where the line's order
        (small output first) applies.
        """
        if not hasattr(socket, "TCP_NOTSENT_LOWAT"):
            raise SkipTest("no TCP_NOTSENT_LOWAT here")
        options: list[tuple[int, int, int]] = []

        class RecordingSocket:
            def setsockopt(self, level: int, option: int, value: int) -> None:
                options.append((level, option, value))

        self.socket.socket = RecordingSocket()  # type: ignore[attr-defined]
        self.link.widen()
        self.assertEqual(options, [(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)])

    def test_limitUnsentOnATCPSocket(self) -> None:
        """The limit is set on a real (unconnected) TCP socket."""
        if not hasattr(socket, "TCP_NOTSENT_LOWAT"):
            raise SkipTest("no TCP_NOTSENT_LOWAT here")
        descriptor = abstract.FileDescriptor(reactor=MemoryReactor())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            descriptor.socket = tcp  # type: ignore[attr-defined]
            limitUnsent(descriptor)
            value = tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        self.assertEqual(value, NOTSENT_LOWAT)

    def test_limitUnsentLeavesAUnixSocket(self) -> None:
        """A Unix socket has no such option: left as it is, and no error."""
        descriptor = abstract.FileDescriptor(reactor=MemoryReactor())
        left, right = socket.socketpair()
        with left, right:
            descriptor.socket = left  # type: ignore[attr-defined]
            limitUnsent(descriptor)

    def test_widenLeavesATransportWithoutBufferSize(self) -> None:
        """An in-memory transport with no bufferSize gets none."""
        transport = BufferingByteTransport()
        del BufferingByteTransport.bufferSize
        try:
            conn = TunnelConnection()
            conn.transport = PacketTransport(transport)
            flow = LinkFlow.attach(conn)
            assert flow is not None
            flow.widen()
            self.assertFalse(hasattr(transport, "bufferSize"))
            self.assertEqual(self.heapKept, [])
        finally:
            BufferingByteTransport.bufferSize = 64 * 1024

    def packetsBeforePause(self) -> int:
        """Link packets one channel with 1 MiB queued sends before the link pauses."""
        channel = self.openChannel(0)
        channel.write(b"x" * (1 << 20))
        self.assertTrue(self.link.paused)
        return self.ssh.payloadBytes // LINK_MAX_PACKET

    def test_narrowLinkPausesAfterOnePacket(self) -> None:
        """Without widen(), a link packet fills Twisted's 64 KiB: one per turn."""
        self.assertEqual(self.packetsBeforePause(), 1)

    def test_wideLinkSendsFourPacketsInARow(self) -> None:
        """
        Widened, a channel sends four link packets in a row before the link
        pauses, and one doWrite hands all four to the socket in one send
        (SEND_LIMIT raised from Twisted's 128 KiB, which took two sends and
        cut the last packet) instead of four reactor turns of one packet
        each; then the next four follow.
        """
        self.link.widen()
        self.assertEqual(self.socket.SEND_LIMIT, 2 * LINK_BUFFER_SIZE)
        self.assertEqual(self.packetsBeforePause(), 4)
        self.socket.doWrite()
        self.assertEqual(self.socket.sends, 1)
        self.assertGreater(self.socket.written, 4 * LINK_MAX_PACKET)
        self.assertLess(self.socket.written, 5 * LINK_MAX_PACKET)
        self.assertEqual(self.ssh.payloadBytes, 8 * LINK_MAX_PACKET)

    def test_wideLinkStaysBoundedAndFair(self) -> None:
        """
        Widened, two channels with 1 MiB each: the buffer never holds more than
        LINK_BUFFER_SIZE and a packet, both deliver everything, and they take
        turns: the second, which stopped for the link after the first, gets it
        once the first has sent all of its megabyte: its first write's burst,
        then its turns in a row (four buffers in all).
        """
        self.link.widen()
        first, second = self.openChannel(0), self.openChannel(1)
        first.write(b"x" * (1 << 20))
        second.write(b"y" * (1 << 20))
        peak = 0
        secondStartedAt = None
        for _ in range(1000):
            pending = len(self.socket.dataBuffer) - self.socket.offset + self.socket._tempDataLen
            peak = max(peak, pending)
            if secondStartedAt is None and second.sentTotal:
                secondStartedAt = first.sentTotal
            if not pending:
                break
            self.socket.doWrite()
        self.assertLessEqual(peak, LINK_BUFFER_SIZE + LINK_MAX_PACKET + 64)
        self.assertEqual((first.sentTotal, second.sentTotal), (1 << 20, 1 << 20))
        assert secondStartedAt is not None
        self.assertEqual(secondStartedAt, 1 << 20)

    def test_smallWriteLeavesAtOnce(self) -> None:
        """On a widened link a lone small write is still sent in the same call."""
        self.link.widen()
        channel = self.openChannel(0)
        channel.write(b"k")
        self.assertEqual(self.ssh.payloadBytes, 1)


class KeepReadBuffersInHeapTests(SynchronousTestCase):
    """
    Widened reads are above glibc's mmap threshold: keepReadBuffersInHeap
    raises its thresholds once per process, and leaves another C library alone.
    """

    def setUp(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.patch(linkflow, "_heapKept", False)

    def test_raisesBothThresholdsOnce(self) -> None:
        """
        mallopt gets M_MMAP_THRESHOLD 1 MiB and M_TRIM_THRESHOLD 2 MiB (glibc's
        parameter numbers -3 and -1), on the first call only.
        """
        self.patch(linkflow, "_mallopt", lambda: lambda *a: self.calls.append(a))
        linkflow.keepReadBuffersInHeap()
        linkflow.keepReadBuffersInHeap()
        self.assertEqual(self.calls, [(-3, MALLOC_MMAP_THRESHOLD), (-1, MALLOC_TRIM_THRESHOLD)])
        self.assertEqual((MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD), (1 << 20, 2 << 20))

    def test_otherCLibrary(self) -> None:
        """Without glibc (no mallopt), nothing is called and nothing fails."""
        self.patch(linkflow, "_mallopt", lambda: None)
        linkflow.keepReadBuffersInHeap()
        self.assertEqual(self.calls, [])

    def test_mallopt(self) -> None:
        """On glibc, _mallopt finds the C library's mallopt; elsewhere None."""
        try:
            os.confstr("CS_GNU_LIBC_VERSION")
        except (ValueError, OSError):
            self.assertIsNone(linkflow._mallopt())
        else:
            self.assertIsNotNone(linkflow._mallopt())


class LinksAreWideTests(SynchronousTestCase):
    """
    The real agent link, groundcontrol and an operator in memory: both ends of
    a device's link and groundcontrol's end of an operator's connection are
    widened.
    """

    def test_deviceLinksAndOperatorConnectionsAreWidened(self) -> None:
        """
        LinkFlow.widen is called for the agent's link, for groundcontrol's end
        of it and for groundcontrol's end of alice's connection (whose sends
        then carry several link packets relayed in one turn), and only once each.
        """
        from tests import test_rekey
        from tests.test_rekey import NEVER

        widened: list[LinkFlow] = []
        self.patch(LinkFlow, "widen", lambda flow: widened.append(flow))
        test_rekey.LinkRekeyTests.connect(self, server=NEVER, agent=NEVER)  # type: ignore[arg-type]
        agentFlow = self.agentSide.service.linkFlow  # type: ignore[attr-defined]
        serverFlow = self.serverSide.service.linkFlow  # type: ignore[attr-defined]
        operatorSide = self.fleet.network.pumps[-1].server  # type: ignore[attr-defined]
        operatorFlow = operatorSide.service.linkFlow
        for flow in (agentFlow, serverFlow, operatorFlow):
            self.assertIsNotNone(flow)
        self.assertCountEqual(widened, [agentFlow, serverFlow, operatorFlow])
