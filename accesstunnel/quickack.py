"""
Acknowledge a peer's TCP segments at once while its SSH handshake is under way.

The OpenSSH client turns Nagle's algorithm off (TCP_NODELAY) only once its
session channel is open. Before that, a small packet it writes while an
earlier one is unacknowledged waits in its kernel for the ACK. In the key
exchange it writes KEXINIT and, without waiting for an answer, ECDH_INIT; our
kernel, with nothing to send back at that moment, delays its ACK of KEXINIT
by up to 40 ms, and ECDH_INIT waits that long. That was the slow half of a
bimodal session setup (26-35 ms or 69-81 ms on the same machine).

L{QuickAckMixin}, on an SSH transport protocol, sets TCP_QUICKACK on the
socket after each of the first L{QuickAckMixin.quickAckReads} reads. Linux
then sends any ACK it was holding back at once and leaves its delayed-ACK
("ping-pong") mode; the option is not sticky, hence once per read. After
that (the client has turned Nagle off by then) reads cost nothing extra.
Elsewhere (no TCP_QUICKACK, not a TCP socket, e.g. in memory) it does nothing.
"""

from __future__ import annotations

import socket
from typing import Any

#: Linux's TCP_QUICKACK (12), where the socket module has it.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

#: Reads after which quick ACKs stop: an OpenSSH login and channel open take
#: about ten.
QUICK_ACK_READS = 32


def tcpSocketOf(transport: Any) -> socket.socket | None:
    """The TCP socket under C{transport} (through wrappers that forward C{getHandle})."""
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return None
    try:
        handle = getHandle()
    except Exception:
        return None
    if (
        isinstance(handle, socket.socket)
        and handle.family in (socket.AF_INET, socket.AF_INET6)
        and handle.type == socket.SOCK_STREAM
    ):
        return handle
    return None


class QuickAckMixin:
    """For an SSH transport protocol: quick ACKs during the first reads."""

    quickAckReads = QUICK_ACK_READS
    #: Nothing to do per read once the quick ACKs are over: the fast packet layer's
    #: steady path may skip this layer (accesstunnel.fastpath.enterSteadyState).
    steadyCovers = frozenset({"dataReceived"})
    _quickAckSocket: socket.socket | None = None
    _quickAcksLeft = 0
    transport: Any

    def connectionMade(self) -> None:
        if TCP_QUICKACK is not None:
            self._quickAckSocket = tcpSocketOf(self.transport)
            if self._quickAckSocket is not None:
                self._quickAcksLeft = self.quickAckReads
        super().connectionMade()  # type: ignore[misc]

    def dataReceived(self, data: bytes) -> None:
        if not self._quickAcksLeft:
            super().dataReceived(data)  # type: ignore[misc]
            return
        self._quickAck()
        super().dataReceived(data)  # type: ignore[misc]
        if not self._quickAcksLeft:
            self._quickAcksOver()

    def stopQuickAcks(self) -> None:
        """No more quick ACKs on this connection (a peer that never waits on them)."""
        self._quickAcksLeft = 0
        self._quickAckSocket = None

    def _steadyReady(self) -> bool:
        return not self._quickAcksLeft and super()._steadyReady()  # type: ignore[misc, no-any-return]

    def _quickAcksOver(self) -> None:
        """The last quick ACK went: a transport with a steady path may take it now."""
        enterSteadyState = getattr(self, "enterSteadyState", None)
        if enterSteadyState is not None:
            enterSteadyState()

    def _quickAck(self) -> None:
        self._quickAcksLeft -= 1
        sock = self._quickAckSocket
        if not self._quickAcksLeft:
            self._quickAckSocket = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)  # type: ignore[union-attr, arg-type]
        except OSError:
            # Closed under us, or an option this kernel refuses: stop trying.
            self._quickAcksLeft = 0
            self._quickAckSocket = None


__all__ = ["QUICK_ACK_READS", "TCP_QUICKACK", "QuickAckMixin", "tcpSocketOf"]
