"""
Window credit that follows what a local consumer (a pipe, a pty, a socket) accepts.

L{accesstunnel.channel.FlowChannel} re-opens its receive window only when told
the bytes are gone. A channel feeding a child's stdin or a TCP socket hands the
bytes to a Twisted write buffer; this producer, registered on that buffer,
learns when the buffer is full (C{pauseProducing}) and when it has drained
(C{resumeProducing}), and gives the window back only then. Memory held per
channel is thus bounded by the consumer's buffer plus one window.
"""

from __future__ import annotations

from typing import Protocol

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

    def detach(self) -> None:
        """
        The channel closed: forget it. It holds this credit, so holding it back would
        be a reference cycle, keeping the channel, its connection and the link's
        transport for the cyclic collector. Whatever the consumer says from now on
        gives credit to nobody.
        """
        self.stopped = True
        self._held = 0
        self._channel = _NOBODY

    def _release(self) -> None:
        count, self._held = self._held, 0
        if count:
            self._channel.consumed(count)


class _Nobody:
    """What a detached credit gives back to."""

    def consumed(self, count: int) -> None:
        pass


_NOBODY = _Nobody()


__all__ = ["InputCredit"]
