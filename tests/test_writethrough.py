"""
Tests for accesstunnel.writethrough: small writes leave at once when nothing is
buffered, and every other case (partial writes, EAGAIN, errors, large writes,
producers, closing) keeps Twisted's buffered path with the bytes in order; a small
write sent at once then gives up the CPU, a larger or buffered one does not.

A fake descriptor whose kernel takes a scripted number of bytes per call drives the
mixin under a MemoryReactor; a socketpair (no network) proves the same for a real
TCP connection; a private reactor on loopback, driven by hand, proves that the ports
and connectors writeThroughTCP builds make write-through connections from the start.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import abstract, fdesc, main, protocol, tcp
from twisted.internet.interfaces import IPushProducer, IReactorPluggableNameResolver
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer, providedBy

from accesstunnel import writethrough
from accesstunnel.writethrough import (
    SEND_FD,
    YIELD_AFTER_SEND_LIMIT,
    WriteThroughClient,
    WriteThroughConnector,
    WriteThroughMixin,
    WriteThroughPort,
    WriteThroughServer,
    writeThroughTCP,
)


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


def _server(
    sock: socket.socket, reactor: Any, proto: Any = None, kind: type = WriteThroughServer
) -> tcp.Server:
    proto = proto or protocol.Protocol()
    server = kind(sock, proto, ("127.0.0.1", 1), None, 1, reactor)
    proto.makeConnection(server)
    return server


class RealSocketTests(SynchronousTestCase):
    """WriteThroughServer over a socketpair (no network, no global reactor)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)

    def test_serverSendsInsideWrite(self) -> None:
        """A WriteThroughServer's write is readable on the peer before any reactor
        turn; Twisted's own tcp.Server only registers for writability."""
        server = _server(self.ours, self.reactor)
        server.write(b"keystroke")
        self.assertEqual(self.theirs.recv(100), b"keystroke")
        self.assertNotIn(server, self.reactor.getWriters())
        plain = _server(self.theirs, self.reactor, kind=tcp.Server)
        plain.write(b"echo")
        self.assertIn(plain, self.reactor.getWriters())
        self.assertRaises(BlockingIOError, self.ours.recv, 100)

    def test_fullSocketBuffersThenDrains(self) -> None:
        """With the socket buffer full the kernel takes part or nothing: the rest is
        buffered and doWrite delivers every byte, in order, once the peer reads."""
        server = _server(self.ours, self.reactor)
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

    def test_throughWrappers(self) -> None:
        """A protocol wrapping the SSH protocol (the handshake limiter's
        ProtocolWrapper) writes through to the socket underneath at once."""
        wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), protocol.Protocol())
        server = _server(self.ours, self.reactor, wrapper)
        wrapper.wrappedProtocol.transport.write(b"through the wrapper")
        self.assertEqual(self.theirs.recv(100), b"through the wrapper")
        self.assertNotIn(server, self.reactor.getWriters())

    def test_tcpSendsItself(self) -> None:
        """A TCP connection's write through calls the socket's send itself, not
        writeSomeData and untilConcludes (two frames per keystroke write)."""
        server = _server(self.ours, self.reactor)

        def notCalled(data: Any) -> Any:
            raise AssertionError("writeSomeData called for a write through")

        server.writeSomeData = notCalled  # type: ignore[method-assign]
        server.write(b"keystroke")
        self.assertEqual(self.theirs.recv(100), b"keystroke")

    def _flakySocket(self, server: tcp.Server, *errors: OSError) -> list[Any]:
        """Make C{server}'s socket raise C{errors} on its next sends; the calls made."""
        real = server.socket
        calls: list[Any] = []
        pending = list(errors)

        class Flaky:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def send(self, data: Any) -> int:
                calls.append(bytes(data))
                if pending:
                    raise pending.pop(0)
                return real.send(data)

            def recv(self, size: int) -> bytes:
                if pending:
                    raise pending.pop(0)
                return real.recv(size)

        server.socket = Flaky()  # type: ignore[assignment]
        return calls

    def test_tcpInterruptedSendIsRetried(self) -> None:
        """A send interrupted by a signal (EINTR) is retried at once, as untilConcludes
        would: the bytes leave inside the write."""
        server = _server(self.ours, self.reactor)
        calls = self._flakySocket(server, InterruptedError(errno.EINTR, "interrupted"))
        server.write(b"keystroke")
        self.assertEqual(calls, [b"keystroke", b"keystroke"])
        self.assertEqual(self.theirs.recv(100), b"keystroke")
        self.assertNotIn(server, self.reactor.getWriters())

    def test_tcpFullSocketBuffers(self) -> None:
        """EAGAIN and ENOBUFS: nothing sent, all of it buffered for doWrite, in order."""
        for error in (errno.EAGAIN, errno.ENOBUFS):
            server = _server(self.ours, self.reactor)
            self._flakySocket(server, OSError(error, "full"))
            server.write(b"one")
            server.write(b"two")
            self.assertIn(server, self.reactor.getWriters())
            self.assertIsNone(server.doWrite())
            self.assertEqual(self.theirs.recv(100), b"onetwo")
            self.reactor.removeWriter(server)

    def _yields(self) -> list[None]:
        """Record each yield of the CPU after a send."""
        yields: list[None] = []
        self.patch(writethrough, "yieldAfterSend", lambda: yields.append(None))
        return yields

    def test_tcpWriteThroughDoesNotYield(self) -> None:
        """
        A small write through on a TCP connection does not give up the CPU by itself:
        only the packet layer knows whether it carries a keystroke (a channel-data
        packet yields there) or a handshake or a keepalive's answer, which must not hand
        a busy server's CPU away.
        """
        server = _server(self.ours, self.reactor)
        yields = self._yields()
        server.write(b"keystroke")
        self.assertEqual(self.theirs.recv(100), b"keystroke")
        self.assertEqual(yields, [])

    def test_bufferedWriteDoesNotYield(self) -> None:
        """Nothing sent (EAGAIN, buffered for doWrite) or part sent: no yield."""
        server = _server(self.ours, self.reactor)
        yields = self._yields()
        self._flakySocket(server, OSError(errno.EAGAIN, "full"))
        server.write(b"one")
        self.assertIn(server, self.reactor.getWriters())
        self.assertIsNone(server.doWrite())
        self.assertEqual(yields, [])

    def test_tcpSendErrorIsMetByDoWrite(self) -> None:
        """Any other error: the write is buffered, and doWrite meets the error and
        reports the connection lost, the way the reactor always ends it."""
        server = _server(self.ours, self.reactor)
        self._flakySocket(
            server,
            ConnectionResetError(errno.ECONNRESET, "reset"),
            ConnectionResetError(errno.ECONNRESET, "reset"),
        )
        server.write(b"keystroke")
        self.assertIn(server, self.reactor.getWriters())
        self.assertEqual(server.doWrite(), main.CONNECTION_LOST)

    def test_tcpReadsItself(self) -> None:
        """A TCP connection's doRead hands what it reads to the protocol itself, not
        through _dataReceived (one frame per read); a read that would block is
        nothing, the peer's close is ConnectionDone, a reset ConnectionLost."""
        recorder = Recorder()
        server = _server(self.ours, self.reactor, recorder)

        def notCalled(data: Any) -> Any:
            raise AssertionError("_dataReceived called")

        server._dataReceived = notCalled  # type: ignore[method-assign]
        self.theirs.sendall(b"keystroke")
        self.assertIsNone(server.doRead())
        self.assertEqual(recorder.received, b"keystroke")
        self.assertIsNone(server.doRead())  # EAGAIN: nothing, and no loss
        self.assertEqual(recorder.received, b"keystroke")
        self._flakySocket(server, ConnectionResetError(errno.ECONNRESET, "reset"))
        self.assertIs(server.doRead(), main.CONNECTION_LOST)
        self.theirs.close()
        self.assertIs(server.doRead(), main.CONNECTION_DONE)
        self.assertEqual(recorder.received, b"keystroke")


def readAll(fd: int) -> bytes:
    """Everything a non-blocking descriptor has to read now."""
    got = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return bytes(got)
        got += chunk


def fillThenDrain(case: SynchronousTestCase, writer: Any, reactor: Any, readEnd: int) -> None:
    """
    Write to C{writer} until it buffers (its descriptor full: part or nothing sent),
    then read C{readEnd} and run C{writer.doWrite} until every byte arrived, in order.
    """
    sent = bytearray()
    n = 0
    while writer not in reactor.getWriters():
        chunk = bytes([n % 251]) * 1000
        n += 1
        sent += chunk
        writer.write(chunk)
        case.assertLess(n, 10_000, "the descriptor never filled")
    received = bytearray(readAll(readEnd))
    for _ in range(10_000):
        if len(received) >= len(sent):
            break
        case.assertIsNone(writer.doWrite())
        received += readAll(readEnd)
    case.assertEqual(bytes(received), bytes(sent))


class PipeWriter(WriteThroughMixin, abstract.FileDescriptor):
    """The write end of a pipe whose write-through is C{os.write} (SEND_FD, as a pty's)."""

    _wtSend = SEND_FD

    def __init__(self, reactor: Any, fd: int) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.connected = 1
        self.calls = 0

    def fileno(self) -> int:
        return self.fd

    def writeSomeData(self, data: Any) -> Any:
        self.calls += 1
        return fdesc.writeToFD(self.fd, data)


class FdWriteThroughTests(SynchronousTestCase):
    """Write-through by C{os.write} on the descriptor itself, over a real pipe."""

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.readEnd, self.writeEnd = os.pipe()
        os.set_blocking(self.readEnd, False)
        os.set_blocking(self.writeEnd, False)
        self.addCleanup(self._close)
        self.fd = PipeWriter(self.reactor, self.writeEnd)

    def _close(self) -> None:
        for end in (self.readEnd, self.writeEnd):
            if end >= 0:
                os.close(end)

    def _drain(self) -> bytes:
        return readAll(self.readEnd)

    def test_writesItself(self) -> None:
        """A small write is in the pipe when write returns, without writeSomeData."""
        self.fd.write(b"keystroke")
        self.assertEqual(os.read(self.readEnd, 100), b"keystroke")
        self.assertEqual(self.fd.calls, 0)
        self.assertNotIn(self.fd, self.reactor.getWriters())

    def test_writeYields(self) -> None:
        """A keystroke written to the pipe (a pty's write) gives up the CPU once, after."""
        yields: list[bytes] = []
        self.patch(writethrough, "yieldAfterSend", lambda: yields.append(self._drain()))
        self.fd.write(b"keystroke")
        self.assertEqual(yields, [b"keystroke"])
        self.fd.write(b"x" * YIELD_AFTER_SEND_LIMIT)
        self.assertEqual(len(yields), 2)

    def test_largerWriteDoesNotYield(self) -> None:
        """A write to the child above the limit (a paste, a file) does not yield."""
        yields: list[bytes] = []
        self.patch(writethrough, "yieldAfterSend", lambda: yields.append(b""))
        self.fd.write(b"x" * (YIELD_AFTER_SEND_LIMIT + 1))
        self.assertEqual(len(self._drain()), YIELD_AFTER_SEND_LIMIT + 1)
        self.assertEqual(yields, [])

    def test_fullPipeBuffersInOrder(self) -> None:
        """A pipe that takes part (then nothing, EAGAIN) leaves the rest buffered for
        doWrite, which delivers every byte in order once the reader drains it."""
        fillThenDrain(self, self.fd, self.reactor, self.readEnd)
        self.assertEqual(self.fd.calls, 1)  # doWrite's, once the reader drained

    def test_errorIsMetByDoWrite(self) -> None:
        """A write that fails (the reader gone: EPIPE) is buffered whole, and doWrite
        meets the error and reports the connection lost."""
        os.close(self.readEnd)
        self.readEnd = -1
        self.fd.write(b"keystroke")
        self.assertIn(self.fd, self.reactor.getWriters())
        self.assertEqual(self.fd.doWrite(), main.CONNECTION_LOST)


def privateReactor(case: SynchronousTestCase) -> SelectReactor:
    """
    A real reactor of C{case}'s own, never run and never the global one: the test
    drives its ports and connections by hand (C{doRead}, C{doWrite},
    C{runUntilCurrent}). Everything registered with it is closed at cleanup.
    """
    reactor = SelectReactor()

    def cleanUp() -> None:
        for call in reactor.getDelayedCalls():
            call.cancel()
        for selectable in reactor.removeAll():
            sock = getattr(selectable, "socket", None)
            if sock is not None:
                sock.close()
        reactor.waker.connectionLost(None)

    case.addCleanup(cleanUp)
    return reactor


class Recorder(protocol.Protocol):
    """Keeps what arrives."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class ConstructionTests(SynchronousTestCase):
    """writeThroughTCP: listening ports and connectors that make write-through
    connections from the start, on a real reactor (loopback, driven by hand)."""

    def setUp(self) -> None:
        self.reactor = privateReactor(self)
        self.tcp = writeThroughTCP(self.reactor)
        self.built: list[Recorder] = []

        def build() -> Recorder:
            proto = Recorder()
            self.built.append(proto)
            return proto

        self.factory = protocol.ClientFactory.forProtocol(build)  # type: ignore[arg-type]

    def test_listenAcceptsWriteThroughServers(self) -> None:
        """listenTCP listens on a WriteThroughPort; the connection it accepts is a
        WriteThroughServer whose first write reaches the peer inside write()."""
        port = self.tcp.listenTCP(0, self.factory, interface="127.0.0.1")
        self.assertIsInstance(port, WriteThroughPort)
        self.assertIn(port, self.reactor.getReaders())
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        port.doRead()
        [accepted] = self.built
        self.assertIsInstance(accepted.transport, WriteThroughServer)
        accepted.transport.write(b"SSH-2.0-first\r\n")
        self.assertEqual(peer.recv(100), b"SSH-2.0-first\r\n")
        self.assertNotIn(accepted.transport, self.reactor.getWriters())

    def test_connectMakesWriteThroughClients(self) -> None:
        """connectTCP's connector makes a WriteThroughClient: once connected its
        first write reaches the peer inside write()."""
        listening = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listening.close)
        connector = self.tcp.connectTCP("127.0.0.1", listening.getsockname()[1], self.factory)
        self.assertIsInstance(connector, WriteThroughConnector)
        client = connector.transport
        self.assertIsInstance(client, WriteThroughClient)
        self.reactor.runUntilCurrent()  # the connect attempt, scheduled for "now"
        peer, _ = listening.accept()
        self.addCleanup(peer.close)
        client.doWrite()  # connecting: doWrite is doConnect, which finds it done
        [connected] = self.built
        self.assertIs(connected.transport, client)
        client.write(b"SSH-2.0-first\r\n")
        self.assertEqual(peer.recv(100), b"SSH-2.0-first\r\n")
        self.assertNotIn(client, self.reactor.getWriters())

    def test_everythingElseIsTheReactor(self) -> None:
        """Apart from listenTCP and connectTCP it is the reactor: it provides the same
        interfaces (HostnameEndpoint wants a pluggable name resolver), and time and
        name resolution are the reactor's own."""
        self.assertEqual(set(providedBy(self.tcp)), set(providedBy(self.reactor)))
        self.assertTrue(IReactorPluggableNameResolver.providedBy(self.tcp))
        self.assertIs(self.tcp.nameResolver, self.reactor.nameResolver)
        call = self.tcp.callLater(5, lambda: None)
        self.assertEqual(self.reactor.getDelayedCalls(), [call])

    def test_otherReactorsAreLeftAlone(self) -> None:
        """A reactor that does not build Twisted's own TCP ports and connectors (a
        test's MemoryReactor) is returned as it is, so it still records listens."""
        memory = MemoryReactor()
        self.assertIs(writeThroughTCP(memory), memory)
