"""
Tests for accesstunnel.quickack: an SSH transport asks the kernel for an immediate ACK
after each of its first reads (so an OpenSSH client's Nagle-held key exchange packet is
not kept waiting for a delayed ACK), then stops; without a TCP socket it does nothing.

An unconnected TCP socket that records setsockopt stands in for the connection (no
network); the protocol is a minimal one under the mixin.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel import quickack
from accesstunnel.quickack import TCP_QUICKACK, QuickAckMixin, tcpSocketOf


class RecordingSocket(socket.socket):
    """A TCP socket (never connected) that records the options set on it."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.options: list[tuple[int, int, int]] = []
        self.fail = fail

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        if self.fail:
            raise OSError("closed")
        self.options.append((level, option, value))


class SocketTransport(StringTransport):
    def __init__(self, sock: Any) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> Any:
        return self.sock


class Receiver(QuickAckMixin, protocol.Protocol):
    quickAckReads = 3

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.received.append(data)


class QuickAckTests(SynchronousTestCase):
    def setUp(self) -> None:
        if TCP_QUICKACK is None:
            raise self.skipTest("no TCP_QUICKACK on this platform")

    def connect(self, sock: Any) -> Receiver:
        if isinstance(sock, socket.socket):
            self.addCleanup(sock.close)
        receiver = Receiver()
        receiver.makeConnection(SocketTransport(sock))
        return receiver

    def test_firstReadsAskForQuickAcks(self) -> None:
        """Each of the first reads sets TCP_QUICKACK (it is not sticky), then none do;
        the data is passed on unchanged every time."""
        sock = RecordingSocket()
        receiver = self.connect(sock)
        for chunk in (b"a", b"b", b"c", b"d", b"e"):
            receiver.dataReceived(chunk)
        self.assertEqual(sock.options, [(socket.IPPROTO_TCP, TCP_QUICKACK, 1)] * 3)
        self.assertEqual(receiver.received, [b"a", b"b", b"c", b"d", b"e"])

    def test_failureStopsQuietly(self) -> None:
        """A socket that refuses the option (closed under us) ends the quick ACKs
        without disturbing the protocol."""
        sock = RecordingSocket(fail=True)
        receiver = self.connect(sock)
        receiver.dataReceived(b"a")
        receiver.dataReceived(b"b")
        self.assertEqual(receiver.received, [b"a", b"b"])
        self.assertEqual(receiver._quickAcksLeft, 0)

    def test_noTcpSocketNoQuickAcks(self) -> None:
        """In memory (no handle) or over a non-TCP socket nothing is attempted."""
        receiver = Receiver()
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(b"a")
        self.assertEqual(receiver._quickAcksLeft, 0)
        unix, other = socket.socketpair()
        self.addCleanup(unix.close)
        self.addCleanup(other.close)
        self.assertIsNone(tcpSocketOf(SocketTransport(unix)))

    def test_socketFoundThroughWrapper(self) -> None:
        """The handshake limiter's ProtocolWrapper forwards getHandle, so the
        front door's transport reaches the TCP socket under it."""
        sock = RecordingSocket()
        self.addCleanup(sock.close)
        wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), protocol.Protocol())
        wrapper.makeConnection(SocketTransport(sock))
        self.assertIs(tcpSocketOf(wrapper), sock)

    def test_frontDoorTransportUsesIt(self) -> None:
        """groundcontrol's SSH transport is built with the mixin, ahead of the
        mixins that consume the bytes."""
        from groundcontrol.sshserver import GroundControlTransport

        mro = GroundControlTransport.__mro__
        self.assertLess(mro.index(QuickAckMixin), mro.index(GroundControlTransport.__bases__[1]))
        self.assertEqual(quickack.QUICK_ACK_READS, QuickAckMixin.quickAckReads)

    def test_stopQuickAcks(self) -> None:
        """After stopQuickAcks no read sets the option again, though reads were left."""
        sock = RecordingSocket()
        receiver = self.connect(sock)
        receiver.dataReceived(b"a")
        receiver.stopQuickAcks()
        receiver.dataReceived(b"b")
        receiver.dataReceived(b"c")
        self.assertEqual(sock.options, [(socket.IPPROTO_TCP, TCP_QUICKACK, 1)])
        self.assertEqual(receiver.received, [b"a", b"b", b"c"])
