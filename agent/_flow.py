"""
Window credit that follows what a local consumer (a pipe, a pty, a socket) accepts.

L{accesstunnel.channel.FlowChannel} re-opens its receive window only when told
the bytes are gone. A channel feeding a child's stdin or a TCP socket hands the
bytes to a Twisted write buffer; this producer, registered on that buffer,
learns when the buffer is full (C{pauseProducing}) and when it has drained
(C{resumeProducing}), and gives the window back only then. Memory held per
channel is thus bounded by the consumer's buffer plus one window.

Twisted resumes a producer only once the buffer is completely empty; a
consumer that is slow for a moment (a C{cat} not scheduled for a few ms) would
then hold the whole window and stop the sender. A writer with
L{ProgressMixin} also reports each partial drain (L{InputCredit.written}), and
the credit for held bytes that have left the buffer goes back at once. The
bound stays the same: nothing is credited that is still in the buffer beyond
what was there when it paused.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


class _Creditable(Protocol):
    def consumed(self, count: int) -> None: ...


@implementer(IPushProducer)
class InputCredit:
    """
    Registered as a streaming producer on the consumer a channel writes to.

    Call L{received} after each write to the consumer: the credit is given
    back at once while the consumer keeps up, and held while it is paused.
    """

    def __init__(self, channel: _Creditable) -> None:
        self._channel = channel
        self._held = 0
        self.paused = False
        self.stopped = False

    def received(self, count: int) -> None:
        """C{count} bytes were just written to the consumer."""
        if self.paused and not self.stopped:
            self._held += count
        else:
            self._channel.consumed(count)

    def pauseProducing(self) -> None:
        """The consumer's buffer is full: hold credit back."""
        self.paused = True

    def written(self, buffered: int) -> None:
        """
        The paused consumer sent part of its buffer; C{buffered} bytes are
        still in it. Held bytes are the newest in that buffer, so those beyond
        C{buffered} have left it: give their credit back now.
        """
        gone = self._held - buffered
        if gone > 0 and not self.stopped:
            self._held = buffered
            self._channel.consumed(gone)

    def resumeProducing(self) -> None:
        """The consumer's buffer drained: give back what was held."""
        self.paused = False
        self._release()

    def stopProducing(self) -> None:
        """
        The consumer is gone (the child closed its stdin, the socket closed):
        whatever arrives from now on is discarded, so credit it at once rather
        than let the peer stall on a full window.
        """
        self.stopped = True
        self.paused = False
        self._release()

    def _release(self) -> None:
        count, self._held = self._held, 0
        if count:
            self._channel.consumed(count)


class ProgressMixin:
    """
    For a subclass of L{twisted.internet.abstract.FileDescriptor}: after each
    send while its streaming producer is paused, tell the producer (if it has
    a C{written} method, as L{InputCredit} does) how much is still buffered.
    """

    dataBuffer: bytes
    offset: int
    _tempDataLen: int
    producer: Any
    producerPaused: bool

    def doWrite(self) -> Any:
        result = super().doWrite()  # type: ignore[misc]
        if self.producerPaused and self.producer is not None:
            written = getattr(self.producer, "written", None)
            if written is not None:
                written(len(self.dataBuffer) - self.offset + self._tempDataLen)
        return result


__all__ = ["InputCredit", "ProgressMixin"]
