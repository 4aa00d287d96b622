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

Interactive data gives up the CPU once it is sent (C{sched_yield}): a keystroke or
its echo has just woken the next hop's process (the agent, C{cat} behind the pty,
groundcontrol, the operator's ssh), and on a machine with few cores the scheduler
often queues it on this very CPU, behind the rest of this process's turn (the return
through the layers, the reactor's timers and its next poll: 30-70 us when the code is
cold after a pause). Yielding lets the next hop run first; the rest of the turn runs
while that process waits in its turn (bench/RESULTS.md, "Echo latency (session 10)":
4-8% off the echo's median). Only interactive data yields, so that a busy server's
other small writes (handshakes, keepalive answers) do not hand its CPU away: a small
write to a child (L{SEND_FD}: its terminal or stdin) yields here, after the bytes are
in; on an SSH connection the packet layer decides (a small channel-data packet yields,
L{accesstunnel.fastpath}), since only it knows what a write carries. When nothing
else is runnable here a yield costs one system call.

The descriptor must not be in a state where Twisted's next C{doWrite} has
work besides sending: a half-close or close in progress, or a producer that
is paused or pull-based (Twisted asks a pull producer for more only from
C{doWrite}), all keep the buffered path.

TCP connections write through from the moment they are made:
L{accesstunnel.addresses} builds groundcontrol's listeners and the agent's
connectors over L{writeThroughTCP}, whose ports accept L{WriteThroughServer}s
and whose connectors make L{WriteThroughClient}s. The agent mixes
L{WriteThroughMixin} into its child-process writers as well.
"""

from __future__ import annotations

import os
from errno import EINTR, EWOULDBLOCK
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import directlyProvides, providedBy

#: Writes above this many bytes always go through Twisted's buffer.
WRITE_THROUGH_LIMIT = 16 * 1024

#: Interactive data of at most this many bytes (a keystroke, its echo, a line of a
#: shell's output; not bulk, whose packets are larger) gives up the CPU once it is sent
#: (L{yieldAfterSend}): a write to a child here, a channel-data packet in the packet layer.
YIELD_AFTER_SEND_LIMIT = 1024

#: The call that gives up the CPU (C{sched_yield}); tests replace it.
yieldAfterSend = os.sched_yield

#: L{WriteThroughMixin._wtSend}: the socket's C{send}, or C{os.write} on C{fd}.
SEND_SOCKET = 1
SEND_FD = 2


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

    #: How a write through is sent: None through C{writeSomeData} (L{_writeThrough}),
    #: else done in L{write} itself, a frame or three fewer per write:
    #: L{SEND_SOCKET} the TCP socket's C{send} (what C{writeSomeData} and
    #: C{untilConcludes} would call), L{SEND_FD} C{os.write} on C{fd} (what
    #: C{fdesc.writeToFD} would call: a descriptor whose C{writeSomeData} does
    #: nothing else, as a pty's).
    _wtSend: int | None = None

    def _writeThrough(self, data: bytes) -> bytes:
        """Send what the kernel takes now; return the rest (to be buffered)."""
        sent = self.writeSomeData(data)  # type: ignore[attr-defined]
        if type(sent) is not int or sent < 0:
            # An error: buffer it all, so that doWrite meets the error again
            # and the reactor ends the connection as it always does.
            return data
        return data[sent:] if sent else data

    def write(self, data: bytes) -> None:
        # Small, nothing buffered, and nothing but sending for doWrite to do (no
        # half-close or close under way, no paused or pull producer).
        if (
            type(data) is bytes
            and 0 < len(data) <= self.writeThroughLimit
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and not self.producerPaused
            and (self.producer is None or self.streamingProducer)
        ):
            how = self._wtSend
            if how is None:
                data = self._writeThrough(data)
                if not data:
                    return
            else:
                while True:
                    try:
                        sent: int = (
                            self.socket.send(data)  # type: ignore[attr-defined]
                            if how == SEND_SOCKET
                            else os.write(self.fd, data)  # type: ignore[attr-defined]
                        )
                    except OSError as e:
                        if e.args[0] == EINTR:
                            continue
                        # Nothing sent: buffer it all (EAGAIN, ENOBUFS); an error
                        # meets doWrite again and the reactor ends the connection as
                        # it always does.
                        break
                    if sent == len(data):
                        if how == SEND_FD and sent <= YIELD_AFTER_SEND_LIMIT:
                            # A keystroke into a child's terminal or stdin woke the
                            # child, often onto this CPU: let it run now, ahead of what
                            # this process does before its next poll.
                            yieldAfterSend()
                        return
                    data = data[sent:]
                    break
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        if (
            iovec
            and all(type(chunk) is bytes for chunk in iovec)
            and sum(map(len, iovec)) <= self.writeThroughLimit
        ):
            # Small enough to write through: as one write (which buffers it, joined,
            # when it cannot go now).
            self.write(b"".join(iovec))
            return
        super().writeSequence(iovec)  # type: ignore[misc]


class _TCPWriteThroughMixin(WriteThroughMixin):
    """
    Write-through for a TCP connection: the send done in C{write}, not through
    C{writeSomeData} and C{untilConcludes} (the same call, the same errors:
    C{EINTR} retried, C{EWOULDBLOCK} and C{ENOBUFS} nothing sent, anything else
    left for C{doWrite} to meet). A write through is at most
    L{WRITE_THROUGH_LIMIT} bytes, under the connection's C{SEND_LIMIT}, so it is
    never cut.

    C{doRead} hands what it reads to the protocol itself, as C{tcp.Connection}'s
    C{doRead} and C{_dataReceived} do in two frames (one fewer per read).
    """

    socket: Any
    protocol: Any
    bufferSize: int
    _wtSend = SEND_SOCKET

    def doRead(self) -> Any:
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(data)
        return None


class WriteThroughServer(_TCPWriteThroughMixin, tcp.Server):
    """An accepted TCP connection that writes through."""


class WriteThroughClient(_TCPWriteThroughMixin, tcp.Client):
    """A connected TCP client connection that writes through."""


class WriteThroughPort(tcp.Port):
    """A TCP listening port whose accepted connections write through."""

    transport = WriteThroughServer


class WriteThroughConnector(tcp.Connector):
    """A TCP connector whose connection writes through."""

    def _makeTransport(self) -> WriteThroughClient:
        return WriteThroughClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _WriteThroughTCPReactor:
    """
    The reactor C{reactor} in every respect but C{listenTCP} and
    C{connectTCP} (and the C{listenSSL} and C{connectSSL} over them), which
    build L{WriteThroughPort} and L{WriteThroughConnector} where C{reactor}
    builds Twisted's own port and connector (what L{PosixReactorBase.listenTCP}
    and L{PosixReactorBase.connectTCP} do, with the subclasses).
    """

    def __init__(self, reactor: PosixReactorBase) -> None:
        self._reactor = reactor
        # Endpoints ask what a reactor provides (HostnameEndpoint wants its
        # name resolver): this one provides whatever the real one does.
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> WriteThroughPort:
        listening = WriteThroughPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> WriteThroughConnector:
        connector = WriteThroughConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector

    # Twisted's own TLS over TCP (C{ssl:} endpoint strings): its methods call
    # C{self.listenTCP} and C{self.connectTCP}, i.e. the two above.
    listenSSL = PosixReactorBase.listenSSL
    connectSSL = PosixReactorBase.connectSSL


def writeThroughTCP(reactor: Any) -> Any:
    """
    The reactor to build TCP endpoints with, so that every connection they
    make writes through from its first byte.

    Give it to an endpoint instead of C{reactor} (C{serverFromString},
    C{HostnameEndpoint}, C{TCP4ClientEndpoint}, an HTTP proxy's endpoint):
    the TCP connections it listens for or connects are L{WriteThroughServer}
    and L{WriteThroughClient}. Anything the endpoint wraps around TCP (TLS,
    WebSocket, the handshake limiter) is untouched: write-through changes
    when bytes reach the socket, never which bytes or in what order, so it
    is safe under any wrapper. Only a reactor that builds Twisted's own TCP
    port and connector (a L{PosixReactorBase}) has them swapped for the
    subclasses, which add nothing but the two write methods and a C{doRead}
    one frame shorter (L{_TCPWriteThroughMixin}); any other (a test's
    C{MemoryReactor}) is returned as it is.
    """
    if isinstance(reactor, PosixReactorBase):
        return _WriteThroughTCPReactor(reactor)
    return reactor


__all__ = [
    "SEND_FD",
    "SEND_SOCKET",
    "WRITE_THROUGH_LIMIT",
    "WriteThroughClient",
    "WriteThroughConnector",
    "WriteThroughMixin",
    "WriteThroughPort",
    "WriteThroughServer",
    "writeThroughTCP",
]
