"""
Write-through for Twisted file descriptors: send at once when nothing is waiting.

Twisted's C{FileDescriptor.write} only appends to a buffer and registers for
writability; the bytes leave in the next reactor turn, after an C{epoll_wait}
that reports the descriptor writable, and the descriptor is unregistered
again once the buffer is empty. On the interactive path (one keystroke: four
small writes between the operator's ssh and the child's pty) that is an
C{epoll_ctl} pair and an extra reactor turn per write.

L{WriteThroughMixin} sends a small write directly when nothing is buffered,
and falls back to Twisted's buffering for whatever the kernel did not take:
a partial write or C{EAGAIN} buffers the rest exactly as before, an error
buffers the data so that the next C{doWrite} meets the same error and the
connection is lost the usual way. Writes larger than
L{WriteThroughMixin.writeThroughLimit} are always buffered, so bulk transfers
keep coalescing a reactor turn's packets into one large send.

The descriptor must not be in a state where Twisted's next C{doWrite} has
work besides sending: a half-close or close in progress, or a producer that
is paused or pull-based (Twisted asks a pull producer for more only from
C{doWrite}), all keep the buffered path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

from accesstunnel.layers import transportLayers

#: Writes above this many bytes always go through Twisted's buffer.
WRITE_THROUGH_LIMIT = 16 * 1024


class WriteThroughMixin:
    """
    For a subclass of L{twisted.internet.abstract.FileDescriptor}: send
    small writes at once when the write buffer is empty.
    """

    writeThroughLimit = WRITE_THROUGH_LIMIT

    # The FileDescriptor attributes this relies on.
    connected: int
    disconnecting: int
    _writeDisconnecting: bool
    _writeDisconnected: bool
    _tempDataBuffer: list[bytes]
    dataBuffer: bytes
    offset: int
    producer: Any
    producerPaused: bool
    streamingProducer: bool

    def _mayWriteThrough(self) -> bool:
        return bool(
            self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and not self.producerPaused
            and (self.producer is None or self.streamingProducer)
        )

    def _writeThrough(self, data: bytes) -> bytes:
        """Send what the kernel takes now; return the rest (to be buffered)."""
        sent = self.writeSomeData(data)  # type: ignore[attr-defined]
        if type(sent) is not int or sent < 0:
            # An error: buffer it all, so that doWrite meets the error again
            # and the reactor ends the connection as it always does.
            return data
        return data[sent:] if sent else data

    def write(self, data: bytes) -> None:
        if (
            type(data) is bytes
            and 0 < len(data) <= self.writeThroughLimit
            and self._mayWriteThrough()
        ):
            data = self._writeThrough(data)
            if not data:
                return
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        if (
            iovec
            and all(type(chunk) is bytes for chunk in iovec)
            and sum(map(len, iovec)) <= self.writeThroughLimit
            and self._mayWriteThrough()
        ):
            data = self._writeThrough(b"".join(iovec))
            if data:
                super().write(data)  # type: ignore[misc]
            return
        super().writeSequence(iovec)  # type: ignore[misc]


class WriteThroughServer(WriteThroughMixin, tcp.Server):
    """An accepted TCP connection that writes through."""


class WriteThroughClient(WriteThroughMixin, tcp.Client):
    """A connected TCP client connection that writes through."""


_UPGRADES: dict[type, type] = {
    tcp.Server: WriteThroughServer,
    tcp.Client: WriteThroughClient,
}


def enable(transport: Any, depth: int = 4) -> bool:
    """
    Make the TCP connection under C{transport} write through, in place.

    C{transport} is what a protocol writes to: the TCP connection itself, or
    a protocol wrapping it (the handshake limiter, TLS, WebSocket) whose own
    C{transport} leads to it. Write-through changes when bytes reach the
    socket, never which bytes or in what order, so it is safe under any
    wrapper. Only Twisted's plain C{tcp.Server} and C{tcp.Client} are
    upgraded (to the subclass above, which adds nothing but the two write
    methods); anything else is left alone. Returns whether the connection
    now writes through.
    """
    for layer in transportLayers(transport, depth):
        if isinstance(layer, WriteThroughMixin):
            return True
        upgrade = _UPGRADES.get(type(layer))
        if upgrade is not None:
            layer.__class__ = upgrade
            return True
    return False


__all__ = [
    "WRITE_THROUGH_LIMIT",
    "WriteThroughClient",
    "WriteThroughMixin",
    "WriteThroughServer",
    "enable",
]
