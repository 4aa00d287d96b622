"""
FlowChannel.write's direct path: a write with nothing queued, within the remote window and
packet size and with the link's socket taking more, leaves at once as one packet without
passing through the queue; every other write goes through the queue as before, in order.
"""

from __future__ import annotations

from typing import Any

from tests.test_flowchannel import FlowChannelTestCase, RecordingFlowChannel


class EnqueueRecordingChannel(RecordingFlowChannel):
    """Records every write that went through the queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enqueued: list[tuple[Any, ...]] = []

    def _enqueue(self, item: tuple[Any, ...], size: int) -> None:
        self.enqueued.append((item[0], size))
        super()._enqueue(item, size)


class PausedLink:
    """A LinkFlow stand-in whose socket is backed up."""

    paused = True

    def __init__(self) -> None:
        self.waiting: list[Any] = []

    def waitForRoom(self, channel: Any) -> None:
        self.waiting.append(channel)


class DirectWriteTests(FlowChannelTestCase):
    def openRecording(self, remoteWindow: int = 1000, remoteMaxPacket: int = 400) -> Any:
        channel = EnqueueRecordingChannel(
            remoteWindow=remoteWindow, remoteMaxPacket=remoteMaxPacket, conn=self.conn
        )
        self.attach(channel)
        return channel

    def test_keystrokeGoesStraightOut(self) -> None:
        """
        A small write on an idle channel is one packet at once, with the window, sent() and
        queue accounting as the queue would leave them, and never enters the queue.
        """
        channel = self.openRecording(remoteWindow=1000, remoteMaxPacket=400)
        channel.write(b"k")
        channel.write(b"x" * 400)
        self.assertEqual(self.transport.take(), [("data", 1), ("data", 400)])
        self.assertEqual(channel.enqueued, [])
        self.assertEqual(channel.sentCounts, [1, 400])
        self.assertEqual(channel.remoteWindowLeft, 599)
        self.assertEqual(channel.queuedBytes, 0)
        self.assertFalse(channel.hasQueuedOutput)
        self.assertEqual(channel.hooks, [])

    def test_largerThanPacketOrWindowIsQueued(self) -> None:
        """A write above the packet size or the window left goes through the queue and is split."""
        channel = self.openRecording(remoteWindow=1000, remoteMaxPacket=400)
        channel.write(b"a" * 401)
        self.assertEqual(self.transport.take(), [("data", 400), ("data", 1)])
        channel.write(b"b" * 300)
        channel.write(b"c" * 300)  # 299 bytes of window left
        self.assertEqual(self.transport.take(), [("data", 300), ("data", 299)])
        self.assertEqual(channel.enqueued, [(0, 401), (0, 300)])
        self.assertEqual(channel.queuedBytes, 1)

    def test_nothingOvertakesTheQueue(self) -> None:
        """A write that would fit waits behind queued output (data, a request, EOF)."""
        channel = self.openRecording(remoteWindow=100, remoteMaxPacket=100)
        channel.write(b"a" * 150)
        channel.sendRequestInOrder(b"exit-status", b"\0\0\0\0")
        channel.addWindowBytes(10)  # 10 of the 50 queued bytes leave
        channel.write(b"z")
        self.assertEqual(self.transport.take(), [("data", 100), ("data", 10)])
        channel.addWindowBytes(1000)
        self.assertEqual(
            self.transport.take(), [("data", 40), ("request", b"exit-status"), ("data", 1)]
        )

    def test_pausedLinkQueues(self) -> None:
        """While the link's socket is backed up, a write is queued and waits for room."""
        channel = self.openRecording()
        link = self.conn.linkFlow = PausedLink()  # type: ignore[attr-defined]
        channel.write(b"k")
        self.assertEqual(self.transport.take(), [])
        self.assertEqual(link.waiting, [channel])
        link.paused = False
        channel.drainQueue()
        self.assertEqual(self.transport.take(), [("data", 1)])

    def test_notOpenOrClosedQueues(self) -> None:
        """Before the peer confirmed the channel a write is held; after our close it is dropped."""
        channel = EnqueueRecordingChannel(remoteWindow=1000, remoteMaxPacket=400, conn=self.conn)
        channel.write(b"early")
        self.assertEqual(self.transport.take(), [])
        self.attach(channel)
        self.assertEqual(self.transport.take(), [("data", 5)])
        channel.loseConnection()
        self.assertEqual(self.transport.take(), [("close",)])
        channel.write(b"late")
        self.assertEqual(self.transport.take(), [])
        self.assertEqual(channel.queuedBytes, 0)
