"""
Tests for accesstunnel.channel.FlowChannel and the window handling of
accesstunnel.connection.TunnelConnection: ordered output limited by the remote window,
and a receive window re-opened only by consumed().

A real TunnelConnection sends the packets; a recording transport stands in for SSH.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import common, connection
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.channel import DEFAULT_MAX_PACKET, DEFAULT_WINDOW, FlowChannel
from accesstunnel.connection import TunnelConnection

REMOTE = 7


class PacketRecorder:
    """An SSH transport that records the connection's packets in order."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.packets.append((messageType, payload))

    def sendDisconnect(self, reason: int, description: bytes) -> None:
        self.packets.append((-1, description))

    def take(self) -> list[tuple[Any, ...]]:
        """What was sent since the last call, decoded: ('data', n), ('eof',), ..."""
        out: list[tuple[Any, ...]] = []
        for kind, payload in self.packets:
            if kind == connection.MSG_CHANNEL_DATA:
                out.append(("data", len(common.getNS(payload[4:])[0])))
            elif kind == connection.MSG_CHANNEL_EXTENDED_DATA:
                out.append(("ext", len(common.getNS(payload[8:])[0])))
            elif kind == connection.MSG_CHANNEL_EOF:
                out.append(("eof",))
            elif kind == connection.MSG_CHANNEL_REQUEST:
                out.append(("request", common.getNS(payload[4:])[0]))
            elif kind == connection.MSG_CHANNEL_CLOSE:
                out.append(("close",))
            elif kind == connection.MSG_CHANNEL_WINDOW_ADJUST:
                out.append(("adjust", struct.unpack(">L", payload[4:8])[0]))
            else:
                out.append((kind,))
        self.packets.clear()
        return out


class RecordingFlowChannel(FlowChannel):
    """A FlowChannel recording its hooks and what it receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sentCounts: list[int] = []
        self.hooks: list[str] = []
        self.received = bytearray()

    def sent(self, count: int) -> None:
        self.sentCounts.append(count)

    def outputPaused(self) -> None:
        self.hooks.append("paused")

    def outputResumed(self) -> None:
        self.hooks.append("resumed")

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class FlowChannelTestCase(SynchronousTestCase):
    """A TunnelConnection with one open channel."""

    def setUp(self) -> None:
        self.transport = PacketRecorder()
        self.conn = TunnelConnection()
        self.conn.transport = self.transport

    def openChannel(
        self, remoteWindow: int = 1000, remoteMaxPacket: int = 400
    ) -> RecordingFlowChannel:
        channel = RecordingFlowChannel(
            remoteWindow=remoteWindow, remoteMaxPacket=remoteMaxPacket, conn=self.conn
        )
        self.attach(channel)
        return channel

    def attach(self, channel: FlowChannel) -> None:
        channel.id = 0
        self.conn.channels[0] = channel
        self.conn.channelsToRemoteChannel[channel] = REMOTE
        self.conn.localToRemoteChannel[0] = REMOTE
        channel.channelOpen(b"")

    def receive(self, n: int) -> None:
        self.conn.ssh_CHANNEL_DATA(struct.pack(">2L", 0, n) + b"r" * n)


class SendingTests(FlowChannelTestCase):
    """Output goes out in order, within the remote window and packet size."""

    def test_windowLimitsOutput(self) -> None:
        """Only what the remote window allows is sent; the rest waits, counted in queuedBytes."""
        channel = self.openChannel(remoteWindow=1000, remoteMaxPacket=400)
        channel.write(b"a" * 1500)
        self.assertEqual(self.transport.take(), [("data", 400), ("data", 400), ("data", 200)])
        self.assertEqual(channel.queuedBytes, 500)
        self.assertEqual(channel.remoteWindowLeft, 0)
        self.assertEqual(channel.sentCounts, [1000])
        channel.addWindowBytes(300)
        self.assertEqual(self.transport.take(), [("data", 300)])
        self.assertEqual(channel.queuedBytes, 200)
        channel.addWindowBytes(10_000)
        self.assertEqual(self.transport.take(), [("data", 200)])
        self.assertEqual(channel.queuedBytes, 0)
        self.assertEqual(channel.remoteWindowLeft, 10_000 - 200)
        self.assertEqual(channel.sentCounts, [1000, 300, 200])

    def test_nothingOvertakesQueuedData(self) -> None:
        """EOF, requests and close wait behind queued data and keep their order."""
        channel = self.openChannel(remoteWindow=100, remoteMaxPacket=100)
        channel.write(b"a" * 250)
        channel.writeExtended(connection.EXTENDED_DATA_STDERR, b"e" * 50)
        channel.sendRequestInOrder(b"exit-status", struct.pack(">L", 0))
        channel.writeEOF()
        channel.loseConnection()
        self.assertEqual(self.transport.take(), [("data", 100)])
        channel.addWindowBytes(100)
        self.assertEqual(self.transport.take(), [("data", 100)])
        channel.addWindowBytes(1000)
        self.assertEqual(
            self.transport.take(),
            [("data", 50), ("ext", 50), ("request", b"exit-status"), ("eof",), ("close",)],
        )

    def test_extendedDataShareTheWindow(self) -> None:
        """Extended data is limited by the same window as data and stays in order with it."""
        channel = self.openChannel(remoteWindow=60, remoteMaxPacket=100)
        channel.writeExtended(connection.EXTENDED_DATA_STDERR, b"e" * 50)
        channel.write(b"d" * 50)
        self.assertEqual(self.transport.take(), [("ext", 50), ("data", 10)])
        self.assertEqual(channel.queuedBytes, 40)

    def test_heldUntilOpen(self) -> None:
        """Output written before the peer confirmed the channel goes out once it is open."""
        channel = RecordingFlowChannel(remoteWindow=1000, remoteMaxPacket=400, conn=self.conn)
        channel.write(b"early")
        channel.writeEOF()
        self.assertEqual(self.transport.take(), [])
        self.attach(channel)
        self.assertEqual(self.transport.take(), [("data", 5), ("eof",)])

    def test_oneEOF(self) -> None:
        """writeEOF twice sends one EOF."""
        channel = self.openChannel()
        channel.writeEOF()
        channel.writeEOF()
        self.assertEqual(self.transport.take(), [("eof",)])

    def test_emptyWritesIgnored(self) -> None:
        """Writing nothing sends nothing."""
        channel = self.openChannel()
        channel.write(b"")
        channel.writeExtended(1, b"")
        self.assertEqual(self.transport.take(), [])

    def test_smallWriteIsConchsPacket(self) -> None:
        """
        A write that fits the window and a packet with nothing queued (a
        keystroke) leaves at once as exactly the packet Conch's sendData makes,
        and is counted against the window and reported as sent.
        """
        channel = self.openChannel(remoteWindow=1000, remoteMaxPacket=400)
        channel.write(b"k")
        self.assertEqual(
            self.transport.packets,
            [(connection.MSG_CHANNEL_DATA, struct.pack(">L", REMOTE) + common.NS(b"k"))],
        )
        self.assertEqual(channel.remoteWindowLeft, 999)
        self.assertEqual(channel.sentCounts, [1])
        self.assertEqual(channel.queuedBytes, 0)

    def test_smallWriteDoesNotOvertakeTheQueue(self) -> None:
        """A small write while anything is queued waits behind it, whatever the window."""
        channel = self.openChannel(remoteWindow=0)
        channel.write(b"first")
        channel.remoteWindowLeft = 1000  # room, but the queue is not drained yet
        channel.write(b"second")
        self.assertEqual(
            self.transport.packets,
            [(connection.MSG_CHANNEL_DATA, struct.pack(">L", REMOTE) + common.NS(b"firstsecond"))],
        )

    def test_smallWriteWaitsForThePausedLink(self) -> None:
        """While the link's socket is full, a small write is queued and drained with the rest."""

        class PausedLink:
            paused = True
            waiting: list[FlowChannel] = []

            def waitForRoom(self, channel: FlowChannel) -> None:
                self.waiting.append(channel)

        link = PausedLink()
        self.conn.linkFlow = link  # type: ignore[attr-defined]
        channel = self.openChannel()
        channel.write(b"k")
        self.assertEqual(self.transport.take(), [])
        self.assertEqual(link.waiting, [channel])
        link.paused = False
        channel.drainQueue()
        self.assertEqual(self.transport.take(), [("data", 1)])

    def test_smallWriteAfterCloseSendsNothing(self) -> None:
        """Nothing is written on a channel we closed."""
        channel = self.openChannel()
        channel.localClosed = True
        channel.write(b"k")
        self.assertEqual(self.transport.take(), [])

    def test_smallWriteThroughAConnectionsOwnSendData(self) -> None:
        """A connection class with its own sendData still sends every write through it."""
        calls: list[bytes] = []

        class OwnSendData(TunnelConnection):
            def sendData(self, channel: Any, data: bytes) -> None:
                calls.append(data)
                super().sendData(channel, data)

        self.conn = OwnSendData()
        self.conn.transport = self.transport
        channel = self.openChannel()
        channel.write(b"k")
        self.assertEqual(calls, [b"k"])
        self.assertEqual(self.transport.take(), [("data", 1)])

    def test_requestReplyInOrder(self) -> None:
        """A request with want-reply gives a Deferred that fires True on the peer's success."""
        channel = self.openChannel(remoteWindow=0)
        channel.write(b"x")
        d = channel.sendRequestInOrder(b"exec", common.NS(b"ls"), wantReply=True)
        assert d is not None
        self.assertNoResult(d)
        self.assertEqual(self.transport.take(), [])
        channel.addWindowBytes(10)
        self.assertEqual(self.transport.take(), [("data", 1), ("request", b"exec")])
        self.conn.ssh_CHANNEL_SUCCESS(struct.pack(">L", 0))
        self.assertIs(self.successResultOf(d), True)

    def test_requestWithoutReply(self) -> None:
        """A request without want-reply returns None."""
        channel = self.openChannel()
        self.assertIsNone(channel.sendRequestInOrder(b"window-change", b"", wantReply=False))
        self.assertEqual(self.transport.take(), [("request", b"window-change")])

    def test_pauseAndResumeThresholds(self) -> None:
        """
        outputPaused is called once when the queue exceeds highWater, and outputResumed
        once when it has drained to half of it.
        """
        channel = self.openChannel(remoteWindow=0, remoteMaxPacket=1000)
        channel.highWater = 1000
        channel.write(b"a" * 1000)
        self.assertEqual(channel.hooks, [])
        channel.write(b"a")
        self.assertEqual(channel.hooks, ["paused"])
        channel.write(b"a" * 500)
        self.assertEqual(channel.hooks, ["paused"])
        channel.addWindowBytes(1000)  # 501 left: above half
        self.assertEqual(channel.hooks, ["paused"])
        channel.addWindowBytes(1)  # 500 left: half
        self.assertEqual(channel.hooks, ["paused", "resumed"])
        channel.addWindowBytes(1000)
        self.assertEqual(channel.hooks, ["paused", "resumed"])

    def test_closeReceivedDropsQueue(self) -> None:
        """
        When the peer closes, queued output is dropped, our close goes out at once, and a
        queued request's Deferred fails.
        """
        channel = self.openChannel(remoteWindow=0)
        channel.write(b"a" * 5000)
        d = channel.sendRequestInOrder(b"exit-status", b"\0\0\0\0", wantReply=True)
        assert d is not None
        self.conn.ssh_CHANNEL_CLOSE(struct.pack(">L", 0))
        self.assertEqual(self.transport.take(), [("close",)])
        self.assertEqual(channel.queuedBytes, 0)
        self.failureResultOf(d, ConnectionError)
        self.assertNotIn(0, self.conn.channels)
        channel.write(b"late")
        self.assertEqual(self.transport.take(), [])

    def test_abortDropsQueue(self) -> None:
        """abortConnection closes at once, without the queued output."""
        channel = self.openChannel(remoteWindow=0)
        channel.write(b"a" * 10)
        channel.abortConnection()
        self.assertEqual(self.transport.take(), [("close",)])
        self.assertEqual(channel.queuedBytes, 0)

    def test_defaults(self) -> None:
        """Channels offer a 2 MiB window and 32 KiB packets by default."""
        channel = FlowChannel()
        self.assertEqual(channel.localWindowSize, DEFAULT_WINDOW)
        self.assertEqual(channel.localMaxPacket, DEFAULT_MAX_PACKET)


class ReceivingTests(FlowChannelTestCase):
    """The receive window re-opens only through consumed(), in batches."""

    def test_noAdjustOnReceipt(self) -> None:
        """Receiving data, even most of the window, sends no WINDOW_ADJUST by itself."""
        channel = self.openChannel()
        for _ in range(DEFAULT_WINDOW // DEFAULT_MAX_PACKET - 1):
            self.receive(DEFAULT_MAX_PACKET)
        self.assertEqual(self.transport.take(), [])
        self.assertEqual(channel.localWindowLeft, DEFAULT_MAX_PACKET)
        self.assertEqual(len(channel.received), DEFAULT_WINDOW - DEFAULT_MAX_PACKET)

    def test_consumedBatched(self) -> None:
        """Credit is given back once a quarter window has been consumed, in one adjustment."""
        channel = self.openChannel()
        quarter = DEFAULT_WINDOW // 4
        for _ in range(quarter // 1000 + 1):
            self.receive(1000)
        for _ in range(quarter // 1000):
            channel.consumed(1000)
        self.assertEqual(self.transport.take(), [])
        channel.consumed(1000)
        self.assertEqual(self.transport.take(), [("adjust", (quarter // 1000 + 1) * 1000)])
        self.assertEqual(channel.localWindowLeft, DEFAULT_WINDOW)

    def test_trickleNotStarved(self) -> None:
        """When the peer is nearly out of window, even a little consumption is credited at once."""
        channel = self.openChannel()
        for _ in range(DEFAULT_WINDOW // DEFAULT_MAX_PACKET):
            self.receive(DEFAULT_MAX_PACKET)
        self.assertEqual(channel.localWindowLeft, 0)
        channel.consumed(10)
        self.assertEqual(self.transport.take(), [("adjust", 10)])

    def test_flushWindow(self) -> None:
        """flushWindow gives back credit held by batching."""
        channel = self.openChannel()
        self.receive(100)
        channel.consumed(100)
        self.assertEqual(self.transport.take(), [])
        channel.flushWindow()
        self.assertEqual(self.transport.take(), [("adjust", 100)])
        channel.flushWindow()
        self.assertEqual(self.transport.take(), [])

    def test_overrunClosesChannel(self) -> None:
        """A peer sending more than the window allows gets the channel closed."""
        channel = self.openChannel()
        channel.localWindowLeft = 10
        self.receive(11)
        self.assertEqual(self.transport.take(), [("close",)])
        self.assertEqual(channel.received, b"")

    def test_shortPacketClosesChannel(self) -> None:
        """A peer claiming more data than its packet holds gets the channel closed."""
        channel = self.openChannel()
        self.conn.ssh_CHANNEL_DATA(struct.pack(">2L", 0, 100) + b"r" * 10)
        self.assertEqual(self.transport.take(), [("close",)])
        self.assertEqual(channel.received, b"")
        self.assertEqual(channel.localWindowLeft, channel.localWindowSize)

    def test_ordinaryChannelsStillAutoAdjust(self) -> None:
        """Channels that do not manage their window get Conch's automatic adjustment."""
        from twisted.conch.ssh.channel import SSHChannel

        channel = SSHChannel(localWindow=1000, localMaxPacket=1000, conn=self.conn)
        self.attach(channel)
        self.receive(600)
        self.assertEqual(self.transport.take(), [("adjust", 600)])
