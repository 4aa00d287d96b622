"""
Window credit that follows what a local consumer (a pipe, a pty, a socket) accepts.

L{accesstunnel.channel.FlowChannel} re-opens its receive window only when told
the bytes are gone. A channel feeding a child's stdin or a TCP socket hands the
bytes to a Twisted write buffer; this producer, registered on that buffer,
learns when the buffer is full (C{pauseProducing}) and when it has drained
(C{resumeProducing}), and gives the window back only then. Memory held per
channel is thus bounded by the consumer's buffer plus one window.

Every agent channel whose bytes end at such a consumer (a session, a splice)
is an L{EndpointChannel}: it holds one credit and lets go of it when it closes.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from accesstunnel.channel import (
    ENDPOINT_HIGH_WATER,
    ENDPOINT_WINDOW,
    LINK_MAX_PACKET,
    FlowChannel,
)


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


class EndpointChannel(FlowChannel):
    """
    A channel on the link to groundcontrol whose bytes end here, at a consumer on
    the device (a session's child, a forward's socket): it offers the larger
    L{ENDPOINT_WINDOW}, which re-opens only as the consumer takes the bytes
    (C{self._credit}, an L{InputCredit}: a subclass registers it as the producer on
    its consumer and calls its C{received} after each write), and it stops reading
    its own source at L{ENDPOINT_HIGH_WATER}.

    The credit refers back to the channel, which holds it: the channel lets it go
    when it is closed, or when it will never open (L{abandoned}: no close comes
    then), so that no kind of channel keeps the cycle (the channel, its connection
    and a lost link's transport would wait for the cyclic collector;
    tests/test_agent_link_garbage.py).
    """

    receiveWindow = ENDPOINT_WINDOW  # the bytes end here (accesstunnel.channel)
    receiveMaxPacket = LINK_MAX_PACKET  # a channel on the link to groundcontrol
    highWater = ENDPOINT_HIGH_WATER

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._credit = InputCredit(self)

    def closed(self) -> None:
        """The channel is gone: so is what its consumer says from now on."""
        super().closed()
        self._credit.detach()

    def abandoned(self) -> None:
        """
        The channel never opens: the link went away before the open was confirmed
        (L{accesstunnel.connection.TunnelConnection} calls this), or before it was
        sent, or the peer refused it (a channel the agent opens says so itself).
        """
        self._credit.detach()


__all__ = ["EndpointChannel", "InputCredit"]
