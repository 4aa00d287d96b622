"""
Tests for accesstunnel.writethrough: small writes leave at once when nothing is
buffered, and every other case (partial writes, EAGAIN, errors, large writes,
producers, closing) keeps Twisted's buffered path with the bytes in order.

A fake descriptor whose kernel takes a scripted number of bytes per call drives the
mixin under a MemoryReactor; a socketpair (no network) proves the same for a real
tcp.Server, and the in-place upgrade through wrapping protocols.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract, main, protocol, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from accesstunnel import writethrough
from accesstunnel.connection import TunnelConnection
from accesstunnel.writethrough import WriteThroughMixin, WriteThroughServer


class ScriptedDescriptor(WriteThroughMixin, abstract.FileDescriptor):
    """
    A descriptor whose kernel takes, per call, the next scripted count (or
    returns the next scripted error); with the script empty it takes everything.
    """

    def __init__(self, reactor: Any, *script: Any) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.script = list(script)
        self.wire: list[bytes] = []
        self.calls = 0

    def writeSomeData(self, data: Any) -> Any:
        self.calls += 1
        step = self.script.pop(0) if self.script else len(data)
        if isinstance(step, Exception):
            return step
        taken = bytes(data[: min(step, len(data))])
        if taken:
            self.wire.append(taken)
        return len(taken)

    def sent(self) -> bytes:
        return b"".join(self.wire)


@implementer(IPushProducer)
class Producer:
    """Records pause/resume calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class WriteThroughMixinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()

    def test_emptyBufferSendsAtOnce(self) -> None:
        """With nothing buffered a small write reaches the kernel inside write(),
        and the descriptor is never registered for writability."""
        fd = ScriptedDescriptor(self.reactor)
        fd.write(b"k")
        self.assertEqual(fd.sent(), b"k")
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual((fd.dataBuffer, fd._tempDataBuffer), (b"", []))

    def test_partialWriteBuffersTheRestInOrder(self) -> None:
        """When the kernel takes part, the rest is buffered, the descriptor waits
        for writability, later writes queue behind it, and doWrite sends them in order."""
        fd = ScriptedDescriptor(self.reactor, 3)
        fd.write(b"abcdef")
        self.assertEqual(fd.sent(), b"abc")
        self.assertEqual(self.reactor.getWriters(), [fd])
        calls = fd.calls
        fd.write(b"gh")
        self.assertEqual(fd.calls, calls, "a write behind buffered data must not go through")
        self.assertIsNone(fd.doWrite())
        self.assertEqual(fd.sent(), b"abcdefgh")
        self.assertEqual(self.reactor.getWriters(), [])

    def test_eagainBuffersEverything(self) -> None:
        """A kernel that takes nothing (EAGAIN) leaves the whole write to the buffered path."""
        fd = ScriptedDescriptor(self.reactor, 0)
        fd.write(b"abc")
        self.assertEqual(fd.sent(), b"")
        self.assertEqual(fd._tempDataBuffer, [b"abc"])
        self.assertEqual(self.reactor.getWriters(), [fd])
        fd.doWrite()
        self.assertEqual(fd.sent(), b"abc")

    def test_errorIsReportedByTheNextDoWrite(self) -> None:
        """A send error is not swallowed: the data is buffered and the reactor's next
        doWrite meets the error and returns it, which loses the connection as usual."""
        fd = ScriptedDescriptor(self.reactor, main.CONNECTION_LOST, main.CONNECTION_LOST)
        fd.write(b"abc")
        self.assertEqual(self.reactor.getWriters(), [fd])
        self.assertIs(fd.doWrite(), main.CONNECTION_LOST)

    def test_largeWritesAreBuffered(self) -> None:
        """Writes above the limit keep Twisted's buffering (bulk coalesces per turn)."""
        fd = ScriptedDescriptor(self.reactor)
        fd.write(b"x" * (fd.writeThroughLimit + 1))
        self.assertEqual(fd.calls, 0)
        self.assertEqual(self.reactor.getWriters(), [fd])

    def test_writeSequenceGoesThroughJoined(self) -> None:
        """A small writeSequence (a packet built from parts) leaves in one call."""
        fd = ScriptedDescriptor(self.reactor)
        fd.writeSequence([b"ab", b"cd", b"e"])
        self.assertEqual(fd.wire, [b"abcde"])
        self.assertEqual(self.reactor.getWriters(), [])

    def test_writeSequencePartialAndLarge(self) -> None:
        """A partly sent sequence buffers its rest; a large sequence is buffered whole."""
        fd = ScriptedDescriptor(self.reactor, 2)
        fd.writeSequence([b"ab", b"cd"])
        self.assertEqual(fd.sent(), b"ab")
        big = ScriptedDescriptor(self.reactor)
        big.writeSequence([b"x" * big.writeThroughLimit, b"y"])
        self.assertEqual(big.calls, 0)
        fd.doWrite()
        self.assertEqual(fd.sent(), b"abcd")

    def test_textIsStillRefused(self) -> None:
        """Write-through does not loosen Twisted's bytes-only check."""
        fd = ScriptedDescriptor(self.reactor)
        self.assertRaises(TypeError, fd.write, "text")
        self.assertRaises(TypeError, fd.writeSequence, ["text"])

    def test_nothingAfterLoss(self) -> None:
        """A write after the connection is gone is dropped, as Twisted drops it."""
        fd = ScriptedDescriptor(self.reactor)
        fd.connected = 0
        fd.write(b"late")
        self.assertEqual((fd.calls, fd._tempDataBuffer), (0, []))

    def test_closingKeepsTheBufferedPath(self) -> None:
        """Once loseConnection or loseWriteConnection was called, doWrite owns the
        ending: writes are buffered so the close still follows the last byte."""
        for close in ("loseConnection", "loseWriteConnection"):
            fd = ScriptedDescriptor(self.reactor)
            getattr(fd, close)()
            fd.write(b"last")
            self.assertEqual(fd.calls, 0, close)
            self.assertEqual(fd._tempDataBuffer, [b"last"], close)

    def test_streamingProducerNotPausedWritesThrough(self) -> None:
        """A registered, running streaming producer does not stop write-through, and
        is not paused by writes the kernel took."""
        fd = ScriptedDescriptor(self.reactor)
        producer = Producer()
        fd.registerProducer(producer, True)
        fd.write(b"a")
        self.assertEqual(fd.sent(), b"a")
        self.assertEqual(producer.events, [])

    def test_pausedProducerIsResumedByDoWrite(self) -> None:
        """While the producer is paused (buffer over its size) writes are buffered,
        and the drain in doWrite resumes it exactly as without write-through."""
        fd = ScriptedDescriptor(self.reactor, 0)
        fd.bufferSize = 4
        producer = Producer()
        fd.registerProducer(producer, True)
        fd.write(b"abcdef")
        self.assertEqual(producer.events, ["pause"])
        fd.write(b"g")
        self.assertEqual(fd.calls, 1, "no write-through while the producer is paused")
        fd.doWrite()
        self.assertEqual(fd.sent(), b"abcdefg")
        # (Twisted pauses again on each buffered write over the size.)
        self.assertEqual(producer.events[-1], "resume")
        self.assertFalse(fd.producerPaused)

    def test_pullProducerKeepsTheBufferedPath(self) -> None:
        """A pull producer is asked for more only from doWrite, so its writes are
        buffered: write-through would never ask it again."""
        fd = ScriptedDescriptor(self.reactor)
        producer = Producer()
        fd.registerProducer(producer, False)
        self.assertEqual(producer.events, ["resume"])
        fd.write(b"chunk")
        self.assertEqual(fd.calls, 0)
        fd.doWrite()
        self.assertEqual(fd.sent(), b"chunk")
        self.assertEqual(producer.events, ["resume", "resume"])


def _server(sock: socket.socket, reactor: Any, proto: Any = None) -> tcp.Server:
    proto = proto or protocol.Protocol()
    server = tcp.Server(sock, proto, ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    proto.makeConnection(server)
    return server


class RealSocketTests(SynchronousTestCase):
    """tcp.Server over a socketpair (no network, no global reactor)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)

    def test_upgradedServerSendsInsideWrite(self) -> None:
        """After enable(), a write is readable on the peer before any reactor turn."""
        server = _server(self.ours, self.reactor)
        self.assertTrue(writethrough.enable(server))
        self.assertIsInstance(server, WriteThroughServer)
        server.write(b"keystroke")
        self.assertEqual(self.theirs.recv(100), b"keystroke")
        self.assertNotIn(server, self.reactor.getWriters())

    def test_fullSocketBuffersThenDrains(self) -> None:
        """With the socket buffer full the kernel takes part or nothing: the rest is
        buffered and doWrite delivers every byte, in order, once the peer reads."""
        server = _server(self.ours, self.reactor)
        writethrough.enable(server)
        sent = bytearray()
        received = bytearray()
        n = 0
        while server not in self.reactor.getWriters():
            chunk = bytes([n % 251]) * 4096
            n += 1
            sent += chunk
            server.write(chunk)
            self.assertLess(n, 10_000, "the socket never filled")
        while len(received) < len(sent):
            try:
                received += self.theirs.recv(1 << 20)
            except BlockingIOError:
                self.assertIsNone(server.doWrite())
        self.assertEqual(bytes(received), bytes(sent))
        self.assertNotIn(server, self.reactor.getWriters())

    def test_enableThroughWrappers(self) -> None:
        """enable() finds the TCP connection under a wrapping protocol (the handshake
        limiter's ProtocolWrapper), and leaves transports it does not know alone."""
        wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), protocol.Protocol())
        server = _server(self.ours, self.reactor, wrapper)
        self.assertIs(wrapper.transport, server)
        self.assertTrue(writethrough.enable(wrapper))
        self.assertIsInstance(server, WriteThroughServer)
        self.assertTrue(writethrough.enable(server), "enabling twice is harmless")
        self.assertFalse(writethrough.enable(StringTransport()))
        self.assertFalse(writethrough.enable(None))

    def test_connectionServiceEnablesItsLink(self) -> None:
        """The ssh-connection service, once started (authenticated), makes the TCP
        connection under its SSH transport write through."""
        server = _server(self.ours, self.reactor)

        class SSHTransport:
            transport = server

        conn = TunnelConnection()
        conn.transport = SSHTransport()
        conn.serviceStarted()
        self.assertIsInstance(server, WriteThroughServer)
