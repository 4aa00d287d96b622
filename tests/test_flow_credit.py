"""
Tests for L{agent._flow}: credit given back as a paused consumer drains part
of its buffer (L{InputCredit.written}, reported by L{ProgressMixin}), never for
bytes still in it, so a consumer that never reads still gets exactly one window.
"""

from __future__ import annotations

from twisted.internet import abstract
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from agent._flow import InputCredit, ProgressMixin


class Channel:
    """Records the credit given back."""

    def __init__(self) -> None:
        self.credited = 0

    def consumed(self, count: int) -> None:
        self.credited += count


class InputCreditWrittenTests(SynchronousTestCase):
    """L{InputCredit.written}: what a partial drain gives back."""

    def setUp(self) -> None:
        self.channel = Channel()
        self.credit = InputCredit(self.channel)

    def test_creditWhatLeftTheBuffer(self) -> None:
        """
        Held bytes are the newest in the buffer: once fewer than them are
        buffered, the difference has left and is credited, the rest on resume.
        """
        self.credit.received(1000)  # not paused: credited at once
        self.credit.pauseProducing()
        self.credit.received(300)
        self.assertEqual(self.channel.credited, 1000)
        self.credit.written(1100)  # only older bytes left
        self.assertEqual(self.channel.credited, 1000)
        self.credit.written(200)
        self.assertEqual(self.channel.credited, 1100)
        self.credit.written(250)  # more arrived in the buffer: nothing back
        self.assertEqual(self.channel.credited, 1100)
        self.credit.written(0)
        self.assertEqual(self.channel.credited, 1300)
        self.credit.resumeProducing()
        self.assertEqual(self.channel.credited, 1300)

    def test_neverDrainedNeverCredited(self) -> None:
        """A buffer that does not shrink below the held bytes gives nothing back."""
        self.credit.pauseProducing()
        self.credit.received(500)
        self.credit.written(500)
        self.credit.written(10_000)
        self.assertEqual(self.channel.credited, 0)

    def test_afterStopNothingTwice(self) -> None:
        """After stopProducing (all credited), a late report credits nothing more."""
        self.credit.pauseProducing()
        self.credit.received(500)
        self.credit.stopProducing()
        self.credit.written(0)
        self.assertEqual(self.channel.credited, 500)


class Writer(ProgressMixin, abstract.FileDescriptor):
    """A descriptor whose kernel takes C{room} bytes per send."""

    bufferSize = 100

    def __init__(self) -> None:
        super().__init__(reactor=MemoryReactor())
        self.connected = 1
        self.room = 0
        self.sent = b""

    def writeSomeData(self, data: bytes) -> int:
        taken = bytes(data[: self.room])
        self.sent += taken
        self.room -= len(taken)
        return len(taken)


class ProgressMixinTests(SynchronousTestCase):
    """L{ProgressMixin} reports partial drains to a paused producer."""

    def setUp(self) -> None:
        self.channel = Channel()
        self.credit = InputCredit(self.channel)
        self.writer = Writer()
        self.writer.registerProducer(self.credit, True)

    def feed(self, size: int) -> None:
        self.writer.write(b"x" * size)
        self.credit.received(size)

    def test_partialDrainCredits(self) -> None:
        """
        Past bufferSize the producer is paused and later bytes held; each
        send that drains past them gives their credit back before the buffer
        is empty.
        """
        self.feed(80)  # below bufferSize: credited at once
        self.feed(80)  # now 160 buffered: paused after this write
        self.assertTrue(self.credit.paused)
        self.feed(40)
        self.assertEqual(self.channel.credited, 80)
        self.writer.room = 100
        self.writer.doWrite()  # 100 buffered, 120 were held
        self.assertTrue(self.credit.paused)
        self.assertEqual(self.channel.credited, 100)
        self.writer.room = 60
        self.writer.doWrite()  # 40 buffered
        self.assertEqual(self.channel.credited, 160)
        self.writer.room = 40
        self.writer.doWrite()  # empty: Twisted resumes the producer
        self.assertFalse(self.credit.paused)
        self.assertEqual(self.channel.credited, 200)
        self.assertEqual(len(self.writer.sent), 200)

    def test_stuckConsumerHoldsItAll(self) -> None:
        """A consumer whose kernel takes nothing: sends credit nothing held."""
        self.feed(150)
        self.feed(1000)
        self.writer.doWrite()
        self.writer.doWrite()
        self.assertEqual(self.channel.credited, 0)

    def test_producerWithoutWritten(self) -> None:
        """A producer without C{written} (a plain IPushProducer) is left alone."""

        class Plain:
            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        writer = Writer()
        writer.registerProducer(Plain(), True)
        writer.write(b"y" * 200)
        writer.room = 50
        writer.doWrite()
        self.assertEqual(writer.sent, b"y" * 50)
