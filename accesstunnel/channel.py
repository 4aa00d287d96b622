"""
An SSH channel with explicit, end-to-end flow control and ordered output.

Conch's L{SSHChannel} re-opens its receive window as soon as data arrives and
buffers C{write()} without limit. A relay built on that would buffer whatever a
fast sender pushes towards a slow reader. L{FlowChannel} changes both halves:

  - B{Receiving}: the window is re-opened only when the code that received the
    data says it has passed it on, through L{FlowChannel.consumed}. The
    connection (L{accesstunnel.connection.TunnelConnection}) leaves such
    channels' windows alone.
  - B{Sending}: everything that leaves the channel (data, extended data, EOF,
    requests, close) goes through one ordered queue, so an EOF or an
    C{exit-status} can never overtake output still waiting for window space.
    L{FlowChannel.sent} reports how many payload bytes actually left, which is
    what a relay uses to credit the other side.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from twisted.conch.ssh import channel, common, connection
from twisted.internet import defer
from twisted.logger import Logger

#: Receive window offered on every channel. Conch's default of 128 KiB caps a
#: session near 2.6 MB/s on a 50 ms path; 2 MiB keeps a LAN-to-WAN path busy.
DEFAULT_WINDOW = 2 * 1024 * 1024

#: Receive window of a channel that ends here, at a consumer on this host (a
#: device's session feeding a child's stdin, a forward feeding a socket). Its
#: credit waits for the consumer, which can stall for a scheduling slice or
#: more while the sender still has bytes in flight; with only 2 MiB a stalled
#: consumer stops the whole path (bench/RESULTS.md, "Bulk up and 100
#: sessions"). What such a channel holds is bounded by this window plus the
#: consumer's buffer; a relay hop (groundcontrol) keeps L{DEFAULT_WINDOW}.
ENDPOINT_WINDOW = 8 * 1024 * 1024

#: Output such a channel queues before it stops reading its source (the
#: child's stdout, the socket). The queue only bridges the moments the window
#: or the link's socket is closed; the source keeps the rest (a pipe, a socket
#: buffer). At 2 MiB a device with 100 busy sessions held 450-540 MiB of queued
#: output (bench/RESULTS.md, "Bulk up and 100 sessions").
ENDPOINT_HIGH_WATER = 256 * 1024

#: Largest packet payload we accept (OpenSSH uses 32 KiB for sessions).
DEFAULT_MAX_PACKET = 32 * 1024

#: Largest packet payload a channel on a device link accepts. Both ends of
#: that hop are ours, so its channels advertise more than OpenSSH's 32 KiB:
#: the agent reads its child 64 KiB at a time and so sends half as many
#: packets (framing, dispatch, a cipher call per packet at both ends). A peer
#: still sends at most what the receiving side advertised when the channel
#: opened, so an older agent or groundcontrol that offers 32 KiB keeps getting
#: 32 KiB packets. Not larger: from 128 KiB on, each packet's buffers are big
#: enough that glibc's malloc returns them to the kernel and faults them in
#: again for the next packet (bench/RESULTS.md, "Bulk and 100 sessions
#: (session 4)": sealing a 256 KiB packet cost 2.0 CPU-s/GB against 0.19).
LINK_MAX_PACKET = 64 * 1024

_DATA, _EXTENDED, _EOF, _REQUEST, _CLOSE = range(5)

_pack_2uint32 = struct.Struct(">2L").pack

#: Conch's way of sending channel data, which L{FlowChannel.write} does itself
#: when the connection has not replaced it.
_conchSendData = connection.SSHConnection.sendData


class FlowChannel(channel.SSHChannel):
    """
    A channel whose receive window follows consumption and whose output is
    one ordered queue.

    Subclasses override L{dataReceived} / L{extReceived} and call
    L{consumed} once the bytes are gone from this process; they may override
    L{sent} to learn when queued bytes left, and L{outputPaused} /
    L{outputResumed} to stop and start their own source of output.
    """

    _log = Logger()

    #: Tells L{TunnelConnection} not to re-open the window on receipt.
    managesOwnWindow = True

    #: Receive window offered when the code opening the channel names none.
    receiveWindow = DEFAULT_WINDOW

    #: Largest packet payload offered when the code opening the channel names
    #: none (L{LINK_MAX_PACKET} for a channel on a device link).
    receiveMaxPacket = DEFAULT_MAX_PACKET

    #: Queued output above which L{outputPaused} is called.
    highWater = DEFAULT_WINDOW

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("localWindow", self.receiveWindow)
        kwargs.setdefault("localMaxPacket", self.receiveMaxPacket)
        super().__init__(*args, **kwargs)
        self._queue: deque[tuple[Any, ...]] = deque()
        self._queuedBytes = 0
        self._unacknowledged = 0
        self._paused = False
        self.eofSent = False

    # -- receiving ---------------------------------------------------------

    def consumed(self, count: int) -> None:
        """
        C{count} received bytes have been passed on: let the peer send as many
        again. Adjustments are batched to a quarter window so that a bulk
        transfer costs one WINDOW_ADJUST per quarter window (512 KiB on a relay
        hop, 2 MiB where the bytes end on the device), not one per packet.
        """
        self._unacknowledged += count
        if self._unacknowledged >= self.localWindowSize // 4 or (
            # Never let a trickle starve: if the peer is nearly out of window,
            # give back what we have even if it is little.
            self.localWindowLeft < self.localMaxPacket
        ):
            self.flushWindow()

    def flushWindow(self) -> None:
        """Send any window credit held back by L{consumed}'s batching."""
        credit, self._unacknowledged = self._unacknowledged, 0
        if credit and not self.localClosed and self.conn is not None:
            self.conn.adjustWindow(self, credit)

    # -- sending -----------------------------------------------------------

    @property
    def queuedBytes(self) -> int:
        """Payload bytes written but not yet sent for lack of window or link."""
        return self._queuedBytes

    @property
    def hasQueuedOutput(self) -> bool:
        """Anything (data, EOF, a request, the close) waits to be sent."""
        return bool(self._queue)

    def drainQueue(self) -> None:
        """
        Send what the window allows now: called by the connection's
        L{accesstunnel.linkflow.LinkFlow} when the link's socket has room again.
        """
        self._drain()

    def write(self, data: bytes) -> None:
        """Send C{data} as channel data, after anything already queued."""
        n = len(data)
        if not n:
            return
        # A keystroke's path: nothing queued, the window and the link open. One
        # packet straight to the transport: what _enqueue, _drain and Conch's
        # sendData would send, without their four frames and a dozen builtin
        # calls (bench/RESULTS.md, "Echo latency (session 7)").
        conn = self.conn
        if (
            conn is not None
            and not self._queue
            and n <= self.remoteWindowLeft
            and n <= self.remoteMaxPacket
        ):
            remote = conn.channelsToRemoteChannel.get(self)
            if remote is not None and not self.localClosed:
                link = getattr(conn, "linkFlow", None)
                if link is None or not link.paused:
                    self.remoteWindowLeft -= n
                    if type(conn).sendData is _conchSendData and conn.transport is not None:
                        payload = _pack_2uint32(remote, n) + data
                        conn.transport.sendPacket(connection.MSG_CHANNEL_DATA, payload)
                    else:
                        conn.sendData(self, data)  # a connection with its own sendData
                    self.sent(n)
                    return
        self._enqueue((_DATA, data), n)

    def writeExtended(self, dataType: int, data: bytes) -> None:
        """Send C{data} as extended data (stderr), in order with the rest."""
        if data:
            self._enqueue((_EXTENDED, data, dataType), len(data))

    def writeEOF(self) -> None:
        """Send EOF once everything written before it has been sent."""
        if not self.eofSent:
            self.eofSent = True
            self._enqueue((_EOF,), 0)

    def sendRequestInOrder(
        self, requestType: bytes, data: bytes, wantReply: bool = False
    ) -> defer.Deferred[Any] | None:
        """
        Send a channel request once everything written before it has been
        sent. With C{wantReply}, the result fires with the peer's answer.
        """
        d: defer.Deferred[Any] | None = defer.Deferred() if wantReply else None
        self._enqueue((_REQUEST, requestType, data, d), 0)
        return d

    def loseConnection(self) -> None:
        """Close the channel once everything queued has been sent."""
        if not self.closing:
            self.closing = 1
            self._enqueue((_CLOSE,), 0)

    def abortConnection(self) -> None:
        """Close now, dropping whatever is still queued."""
        self._discardQueue()
        self.closing = 1
        if self.conn is not None and not self.localClosed:
            self.conn.sendClose(self)

    def closeReceived(self) -> None:
        """
        The peer will accept nothing more, so queued output can never be
        delivered: drop it and answer with our close at once (Conch's default
        would wait for window space that is never coming).
        """
        self.abortConnection()

    def addWindowBytes(self, data: int) -> None:
        """The peer made room: send what was waiting for it."""
        self.remoteWindowLeft += data
        self._drain()

    def _enqueue(self, item: tuple[Any, ...], size: int) -> None:
        if self.localClosed:
            return
        self._queue.append(item)
        self._queuedBytes += size
        self._drain()
        if not self._paused and self._queuedBytes > self.highWater:
            self._paused = True
            self.outputPaused()

    def _drain(self) -> None:
        """
        Send from the head of the queue as far as the remote window allows,
        and only while the link's socket takes more (see L{accesstunnel.linkflow}).
        """
        conn = self.conn
        if conn is None or self.id is None or self not in conn.channelsToRemoteChannel:
            return  # not open yet; channelOpen drains
        link = getattr(conn, "linkFlow", None)
        queue = self._queue
        sentBytes = 0
        while queue and not self.localClosed:
            if link is not None and link.paused:
                link.waitForRoom(self)  # drained again when the socket has room
                break
            item = queue[0]
            kind = item[0]
            if kind in (_DATA, _EXTENDED):
                data = item[1]
                room = min(self.remoteWindowLeft, self.remoteMaxPacket)
                if room <= 0:
                    break
                if len(data) < room and len(queue) > 1 and queue[1][0] == kind:
                    # Several writes wait (the link was paused, or the peer
                    # offers larger packets than our source writes): one
                    # packet instead of several costs less than the copy.
                    chunk = self._gather(room)
                else:
                    chunk = data if len(data) <= room else memoryview(data)[:room]
                    if len(chunk) == len(data):
                        queue.popleft()
                    else:
                        # A memoryview keeps splitting a large write from
                        # copying its remainder once per packet.
                        queue[0] = (kind, memoryview(data)[len(chunk) :], *item[2:])
                if kind == _DATA:
                    conn.sendData(self, chunk)
                else:
                    conn.sendExtendedData(self, item[2], chunk)
                n = len(chunk)
                self.remoteWindowLeft -= n
                sentBytes += n
            else:
                queue.popleft()
                if kind == _EOF:
                    conn.sendEOF(self)
                elif kind == _REQUEST:
                    _, requestType, data, d = item
                    result = conn.sendRequest(self, requestType, data, wantReply=d is not None)
                    if d is not None:
                        if result is None:
                            d.errback(ConnectionError("channel closed"))
                        else:
                            # Conch fires with b"" on success: make it True,
                            # which is what a request handler returns.
                            result.addCallback(lambda _: True).chainDeferred(d)
                elif kind == _CLOSE:
                    conn.sendClose(self)
        if sentBytes:
            self._queuedBytes -= sentBytes
            self.sent(sentBytes)
            if self._paused and self._queuedBytes <= self.highWater // 2:
                self._paused = False
                self.outputResumed()

    def _gather(self, room: int) -> bytes:
        """
        Take up to C{room} bytes of data of the same kind (and extended data
        type) from the head of the queue, as one string.
        """
        queue = self._queue
        head = queue[0]
        kind = head[0]
        parts = []
        size = 0
        while queue and size < room:
            item = queue[0]
            if item[0] != kind or item[2:] != head[2:]:
                break
            data = item[1]
            take = room - size
            if len(data) <= take:
                parts.append(data)
                size += len(data)
                queue.popleft()
            else:
                parts.append(memoryview(data)[:take])
                queue[0] = (kind, memoryview(data)[take:], *item[2:])
                size = room
        return b"".join(parts)

    def _discardQueue(self) -> None:
        for item in self._queue:
            if item[0] == _REQUEST and item[3] is not None:
                item[3].errback(ConnectionError("channel closed"))
        self._queue.clear()
        self._queuedBytes = 0

    def channelOpen(self, specificData: bytes) -> None:
        """Send anything written before the peer confirmed the channel."""
        self._drain()

    def closed(self) -> None:
        """Both sides closed: fail any request still waiting in the queue."""
        self._discardQueue()

    # -- hooks ---------------------------------------------------------------

    def sent(self, count: int) -> None:
        """C{count} bytes of queued payload left for the peer."""

    def outputPaused(self) -> None:
        """More than L{highWater} bytes are queued: stop producing output."""

    def outputResumed(self) -> None:
        """The queue has drained below half of L{highWater}: produce again."""

    def requestReceivedWithReply(self, requestType: bytes, data: bytes, wantReply: bool) -> Any:
        """
        A channel request arrived. Unlike Conch's C{requestReceived}, this is
        told whether the peer wants a reply, which a relay needs in order to
        pass the request on unchanged.
        """
        return self.requestReceived(requestType, data)


def packOpenFailure(senderChannel: int, reason: int, text: str) -> bytes:
    """The payload of an SSH_MSG_CHANNEL_OPEN_FAILURE."""
    return (
        _pack_2uint32(senderChannel, reason)
        + common.NS(text.encode("utf-8", "replace"))
        + common.NS(b"en")
    )


__all__ = [
    "DEFAULT_MAX_PACKET",
    "DEFAULT_WINDOW",
    "ENDPOINT_HIGH_WATER",
    "ENDPOINT_WINDOW",
    "LINK_MAX_PACKET",
    "FlowChannel",
    "packOpenFailure",
]
