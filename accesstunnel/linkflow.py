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
SSH transport: the socket itself, under TLS and the WebSocket adapter (see
L{_socketLayer} for why not those). While that transport holds
more than its C{bufferSize} (64 KiB for TCP; see below), the link is paused and every
L{accesstunnel.channel.FlowChannel} keeps its output in its own queue, which
pauses the channel's source at high water and, on a relay, holds back the
window credit of the hop feeding it; so the backlog stays bounded end to end.
When the socket has drained, the channels that stopped for it are served in
the order they stopped. One that stops again keeps the front of the line for
L{SERVE_TURNS} turns in a row, then goes to the back, so that no channel can
keep the others waiting. One that leaves the line during its run, having sent
all it had (a session's command had not refilled its pipe yet), rejoins the
back once it has more, and its next run makes up the turns it missed: without
that, each such miss cost a channel up to three turns of its share, at random
(how a hundred commands are scheduled), and a hundred equal downloads drifted
apart by 2-2.5 MiB of 16 and ended over 0.4 s (bench/RESULTS.md, "100
sessions: the tail (session 20, H4)"). Turns in a row send bytes while they
are in cache: the agent reads a session's pipe just after its command refilled
it, and the operator's ssh client gets one channel's bytes in one run instead
of a piece between everyone else's. One turn each left every byte waiting in a pipe or a
socket behind 99 others' (25 MiB with 100 sessions) and cold when copied
(bench/RESULTS.md, "100 sessions: turns in a row and an express line
(session 13, lead)").

A channel that joins the line with little to send (L{EXPRESS_BYTES}: a
keystroke's echo, a prompt, a reply) is served before the bulk channels, as a
sparse flow is in fq_codel: without that, an operator typing on a device
while others download from it waited for every bulk channel's turn in the
line (24 ms per echo with ten downloads).

The link is also held from our KEXINIT to the new keys: meanwhile Conch keeps
every channel message in a list nothing bounds (C{_blockedByKeyExchange}), and
the socket, being idle, would pause nothing, so each channel would pour its
whole window into that list at every key re-exchange.

Every link's socket, the device links and the operators' connections alike,
is read and buffered L{LINK_BUFFER_SIZE} at a time (L{LinkFlow.widen}) rather
than Twisted's 64 KiB: a channel served from the waiting line then sends up to
four link packets in a row before the link pauses, the sender writes them in
fewer calls and the receiver reads them in one; groundcontrol relays them in
one reactor turn, and an operator's connection, widened too, takes them in one
send instead of pausing after each packet. The socket is also given a full
buffer in one send (C{SEND_LIMIT}, Twisted's 128 KiB per call otherwise): a
burst of eight 32 KiB packets to an operator (262,432 bytes) left in sends of
131,072 + 131,072 + 288 bytes, and the operator's ssh client woke up for each
(strace; bench/RESULTS.md, "100 sessions (session 8)").

A read of 256 KiB is above glibc malloc's threshold for mapping a block of its
own, and a read that comes back short is shrunk in place, so the threshold
never adapts: each read was then a fresh mapping faulted in page by page (56
faults per read; bench/RESULTS.md, "100 sessions (session 7)"). L{LinkFlow.widen}
therefore also has malloc keep such buffers in its heap (L{keepReadBuffersInHeap}).
"""

from __future__ import annotations

import os
import socket
import weakref
from collections import OrderedDict
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from accesstunnel.layers import transportLayers

_log = Logger()

#: Bytes a link's socket is read at once, and buffered before the link pauses
#: its channels (Twisted's C{bufferSize}, 64 KiB for TCP): four link packets
#: (L{accesstunnel.channel.LINK_MAX_PACKET}). With 64 KiB each read and each
#: send carried one packet; 100 busy sessions then cost groundcontrol, the
#: agent and the operators' ssh clients more per GB than one session did
#: (bench/RESULTS.md, "100 sessions (session 6)" and "(session 7)").
LINK_BUFFER_SIZE = 256 * 1024

#: Bytes a link's socket may hold unsent in the kernel (C{TCP_NOTSENT_LOWAT},
#: Linux): beyond that it says it is full, and the rest waits in our buffer and
#: the channels' queues, where the order of L{LinkFlow} applies. Without it an
#: agent's socket held 2-2.8 MB unsent behind ten downloads, which a keystroke's
#: echo waited behind whatever line it had skipped.
NOTSENT_LOWAT = LINK_BUFFER_SIZE

#: Turns in a row a waiting channel keeps the link while it has more to send:
#: four buffers, about 1 MiB on a widened link. With one turn each, 100 bulk
#: sessions on one link cost the operators' ssh clients and the sessions'
#: commands a third more CPU per GB than one session did (cold copies).
SERVE_TURNS = 4

#: Output a channel may have waiting when it joins the line and still go ahead
#: of the bulk channels: an echo, a prompt, a screenful of a terminal.
EXPRESS_BYTES = 16 * 1024

#: glibc malloc's thresholds once a link is widened: blocks up to 1 MiB come
#: from the heap, and up to 2 MiB of free heap is kept for the next reads
#: rather than given back and faulted in again (the defaults are 128 KiB each,
#: and adapt only to blocks freed at their full size).
MALLOC_MMAP_THRESHOLD = 1024 * 1024
MALLOC_TRIM_THRESHOLD = 2 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_heapKept = False


def _mallopt() -> Any:
    """glibc's C{mallopt}, or None with another C library."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None
    import ctypes  # only once a link is widened: the agent starts without it (agent.launcher)

    return getattr(ctypes.CDLL(None), "mallopt", None)


def keepReadBuffersInHeap() -> None:
    """
    Have glibc serve L{LINK_BUFFER_SIZE} reads from its heap and keep freed
    ones for the next (L{MALLOC_MMAP_THRESHOLD}, L{MALLOC_TRIM_THRESHOLD});
    once per process, and nothing with another C library.
    """
    global _heapKept
    if _heapKept:
        return
    _heapKept = True
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def limitUnsent(descriptor: Any, limit: int = NOTSENT_LOWAT) -> None:
    """
    Have the kernel keep at most C{limit} unsent bytes of C{descriptor}'s TCP
    socket (L{NOTSENT_LOWAT}); nothing where the option or a TCP socket is missing
    (another system, a Unix socket, a descriptor in memory).
    """
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    sock = getattr(descriptor, "socket", None)
    if option is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, limit)
    except OSError as error:  # not TCP
        _log.debug("no unsent limit on {descriptor}: {error}", descriptor=descriptor, error=error)


def _socketLayer(transport: Any) -> Any:
    """
    The layer L{LinkFlow} registers with: the lowest down the transport chain that
    takes a producer (the socket's descriptor, under TLS, the WebSocket adapter and
    any protocol wrapper), or C{transport} itself if none below it does.

    Not a layer that encrypts or frames on the way: Twisted's TLS
    (C{TLSMemoryBIOProtocol.loseConnection}) does not send its close alert, and so
    never closes, while a producer is registered with it; it waits for the producer
    to let go, which nothing on an idle link asks this one to do. A stopping agent
    linked over tls:// then never finished its stop. The socket's descriptor instead
    resumes a paused producer when it is closing (L{LinkFlow._serve} then lets go),
    and its buffer is the same back-pressure: the layers above it write through.
    """
    lowest = transport
    for layer in transportLayers(transport):
        if getattr(layer, "registerProducer", None) is not None:
            lowest = layer
    return lowest


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
        # Channels that stopped for the link with little to send, oldest first:
        # served before the others.
        self._express: dict[Any, None] = {}
        # The other channels that stopped for the link, oldest first, each
        # with the turns it has had in a row.
        self._waiting: OrderedDict[Any, int] = OrderedDict()
        # The channel being served, during its turn only (no reference kept).
        self._serving: Any = None
        # Bulk channels that left the line before their run's last turn, with
        # the turns they missed: their next run is that much longer.
        self._owed: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    @classmethod
    def attach(cls, connection: Any) -> LinkFlow | None:
        """
        Watch the byte transport under C{connection}'s SSH transport; None if
        it cannot report back-pressure (or already reports to someone else),
        in which case channels send as before, bounded by their windows only.
        """
        transport = _socketLayer(getattr(connection.transport, "transport", None))
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
            self._express.clear()
            self._waiting.clear()
            self._transport.unregisterProducer()
            return
        self.paused = self._socketPaused or self._keyExchange
        express, waiting = self._express, self._waiting
        while (express or waiting) and not self.paused:
            bulk = not express
            if express:
                channel = next(iter(express))
                del express[channel]
                turns = 0
            else:
                channel, turns = waiting.popitem(last=False)
            self._serving = channel
            try:
                channel.drainQueue()
            finally:
                self._serving = None
            turns += 1
            if channel in waiting and turns < SERVE_TURNS:
                # It stopped again during its turn: its next turn comes first.
                waiting[channel] = turns
                waiting.move_to_end(channel, last=False)
            elif bulk and channel not in waiting and turns < SERVE_TURNS:
                # It left the line during its run: the turns it missed, once back.
                self._owed[channel] = min(SERVE_TURNS - turns, SERVE_TURNS)

    def widen(self, size: int = LINK_BUFFER_SIZE) -> None:
        """
        Read and buffer this link's socket C{size} bytes at a time: set the
        C{bufferSize} of the first descriptor down the transport chain, under
        any protocol wrappers (the handshake limiter, the agent's failover
        watch, TLS, WebSocket), and let one send take all it buffers before the
        link pauses (C{SEND_LIMIT}: the buffer and the write that filled it). A
        chain without one (in memory) is left as it is.
        """
        for layer in transportLayers(self._transport):
            if isinstance(layer, FileDescriptor):
                layer.bufferSize = size
                layer.SEND_LIMIT = 2 * size
                keepReadBuffersInHeap()
                limitUnsent(layer)
                return

    def waitForRoom(self, channel: Any, bulk: bool = False) -> None:
        """
        C{channel} has output it could not send because the link is paused. It
        goes ahead of the bulk channels if it has at most L{EXPRESS_BYTES}
        queued and is neither being served (a turn that filled the link) nor
        C{bulk}, as a channel that holds its source back for the link says.
        """
        if channel in self._waiting or channel in self._express:
            return
        if bulk or channel is self._serving or channel.queuedBytes > EXPRESS_BYTES:
            self._waiting[channel] = -self._owed.pop(channel, 0)
        else:
            self._express[channel] = None

    def stopProducing(self) -> None:
        """
        The connection is gone: nothing more is sent, and no waiting channel
        will be served. Let go of them: each refers to its connection, which
        refers to this, a cycle that would keep a lost link for the collector.
        """
        self._stopped = True
        self.paused = True
        self._express.clear()
        self._waiting.clear()
        self._owed.clear()


__all__ = [
    "EXPRESS_BYTES",
    "LINK_BUFFER_SIZE",
    "MALLOC_MMAP_THRESHOLD",
    "MALLOC_TRIM_THRESHOLD",
    "NOTSENT_LOWAT",
    "SERVE_TURNS",
    "LinkFlow",
    "keepReadBuffersInHeap",
    "limitUnsent",
]
