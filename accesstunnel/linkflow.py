"""
Back-pressure from a link's socket to the channels that fill it.

SSH windows bound what each channel may have in flight, not what all of a
connection's channels together may pile up in this process. A device link
carrying a hundred sessions with 2 MiB windows could queue 200 MiB in
Twisted's write buffer before any window closes, and draining that buffer
costs more the larger it is: C{FileDescriptor.doWrite} concatenates the
pending writes into one string whenever less than 128 KiB of the current one
is left, so a large backlog is copied again and again.

L{LinkFlow} registers as a streaming producer on the byte transport under the
SSH transport (TCP, TLS or the WebSocket adapter). While that transport holds
more than its C{bufferSize} (64 KiB for TCP), the link is paused and every
L{accesstunnel.channel.FlowChannel} keeps its output in its own queue, which
pauses the channel's source at high water and, on a relay, holds back the
window credit of the hop feeding it; so the backlog stays bounded end to end.
When the socket has drained, the channels that stopped for it are served in
the order they stopped, and one stopped again goes to the back of the line,
so that no channel can keep the others waiting.

The link is also held from our KEXINIT to the new keys: meanwhile Conch keeps
every channel message in a list nothing bounds (C{_blockedByKeyExchange}), and
the socket, being idle, would pause nothing, so each channel would pour its
whole window into that list at every key re-exchange.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer


@implementer(IPushProducer)
class LinkFlow:
    """Whether the link's socket will take more now, and who sends when it will."""

    _log = Logger()

    def __init__(self, transport: Any) -> None:
        #: True while channels must keep their output: the transport under the link
        #: has more than it wants queued, a key exchange runs, or the link is gone.
        self.paused = False
        self._socketPaused = False
        self._keyExchange = False
        self._stopped = False
        self._transport = transport
        # Channels that stopped for the link, oldest first: served in that
        # order, and one that is stopped again goes to the back.
        self._waiting: dict[Any, None] = {}

    @classmethod
    def attach(cls, connection: Any) -> LinkFlow | None:
        """
        Watch the byte transport under C{connection}'s SSH transport; None if
        it cannot report back-pressure (or already reports to someone else),
        in which case channels send as before, bounded by their windows only.
        """
        transport = getattr(connection.transport, "transport", None)
        register = getattr(transport, "registerProducer", None)
        if register is None:
            return None
        flow = cls(transport)
        try:
            register(flow, True)
        except RuntimeError:  # another producer is registered there
            cls._log.debug("link transport already has a producer; no link back-pressure")
            return None
        return flow

    # -- IPushProducer, called by the transport --------------------------------

    def pauseProducing(self) -> None:
        """The transport's buffer is full: channels stop sending data."""
        self._socketPaused = True
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The buffer has drained: let the channels that stopped for the link send
        again, oldest first, until the buffer fills up again.
        """
        self._socketPaused = False
        self._serve()

    def keyExchangeStarted(self) -> None:
        """
        The SSH transport holds every channel message until the new keys are in
        use (Conch's C{_blockedByKeyExchange}, which nothing bounds): channels
        keep their output in their own queues meanwhile.
        """
        self._keyExchange = True
        self.paused = True

    def keyExchangeFinished(self) -> None:
        """New keys are in use: serve the waiting channels if the socket has room."""
        self._keyExchange = False
        if not self._socketPaused and not self._stopped:
            self._serve()

    def _serve(self) -> None:
        """Serve the waiting channels, oldest first, while nothing holds the link."""
        if getattr(self._transport, "disconnecting", False):
            # Closing: Twisted resumes a paused producer instead of finishing
            # the close once the buffer is empty, and waits for it to write.
            # Let go instead, which lets the close complete.
            self.paused = False
            self._waiting.clear()
            self._transport.unregisterProducer()
            return
        self.paused = self._socketPaused or self._keyExchange
        waiting = self._waiting
        while waiting and not self.paused:
            channel = next(iter(waiting))
            del waiting[channel]
            channel.drainQueue()

    def waitForRoom(self, channel: Any) -> None:
        """C{channel} has output it could not send because the link is paused."""
        self._waiting.setdefault(channel, None)

    def stopProducing(self) -> None:
        """The connection is gone: nothing more is sent."""
        self._stopped = True
        self.paused = True


__all__ = ["LinkFlow"]
