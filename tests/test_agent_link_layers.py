"""
agent.link.shortcutPassThroughLayers: once the link is up over plain TCP, the
socket and the SSH transport talk directly, past the layers that only pass
bytes on; the connection's loss still goes through every layer.

The chain is built from the real classes the running agent has: Twisted's
endpoint wrapper, the failover watch, ClientService's proxy, over Twisted's own
FileDescriptor.
"""

from __future__ import annotations

from typing import Any

from twisted.application._client_service import _ReconnectingProtocolProxy
from twisted.internet import abstract, defer, endpoints, protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from agent.failover import _WatchFactory
from agent.link import shortcutPassThroughLayers


class FakeSocket(abstract.FileDescriptor):
    """Twisted's write buffering over a socket that takes everything at once."""

    def __init__(self) -> None:
        super().__init__(reactor=MemoryReactor())
        self.connected = 1
        self.sent = b""

    def writeSomeData(self, data: bytes) -> int:
        self.sent += bytes(data)
        return len(data)

    def flush(self) -> None:
        """What the reactor does once the socket is writable."""
        self.doWrite()


class RecordingSSH(protocol.Protocol):
    """Stands in for the agent's SSH transport: keeps what it receives and its loss."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.append(reason)


class ShortcutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ssh = RecordingSSH()
        self.serviceLost: list[Failure] = []
        self.proxy = _ReconnectingProtocolProxy(self.ssh, self.serviceLost.append)
        self.watchFactory = _WatchFactory(protocol.Factory())
        self.watch = self.watchFactory.protocol(self.watchFactory, self.proxy)
        self.outer = endpoints._WrappingProtocol(defer.Deferred(), self.watch)

    def connect(self, transport: Any) -> None:
        self.outer.makeConnection(transport)
        if isinstance(transport, abstract.FileDescriptor):
            transport.protocol = self.outer  # as a tcp.Client has it

    def test_plainTCPTalksDirectly(self) -> None:
        """
        Over a socket, reads go from the socket's protocol straight to the SSH
        transport and its writes straight to the socket; bytes still flow both ways.
        """
        socket = FakeSocket()
        self.connect(socket)
        self.assertIs(self.ssh.transport, self.watch)
        self.assertTrue(shortcutPassThroughLayers(self.ssh))
        self.assertEqual(self.outer.dataReceived, self.ssh.dataReceived)
        self.assertEqual(self.watch.write, socket.write)
        self.assertEqual(self.watch.writeSequence, socket.writeSequence)
        socket.protocol.dataReceived(b"in")
        self.assertEqual(self.ssh.received, b"in")
        self.ssh.transport.write(b"out")  # type: ignore[union-attr]
        self.ssh.transport.writeSequence([b"+", b"more"])  # type: ignore[union-attr]
        socket.flush()
        self.assertEqual(socket.sent, b"out+more")

    def test_lossStillGoesThroughEveryLayer(self) -> None:
        """
        The loss reaches the SSH transport, ClientService's notification (which
        reconnects) and the failover watch's factory, as without the shortcut.
        """
        socket = FakeSocket()
        self.connect(socket)
        shortcutPassThroughLayers(self.ssh)
        watchLost: list[Failure] = []
        self.watchFactory.up.addErrback(watchLost.append)
        reason = Failure(ConnectionError("gone"))
        self.outer.connectionLost(reason)
        self.assertEqual(self.ssh.lost, [reason])
        self.assertEqual(self.serviceLost, [reason])
        self.assertEqual(watchLost, [])  # it was up: made, then lost
        self.assertTrue(self.watchFactory.up.called)

    def test_otherChainsLeftAlone(self) -> None:
        """
        Under anything but a socket (TLS, WebSocket: layers that work on the bytes)
        nothing is shortcut.
        """
        notASocket = StringTransport()
        self.connect(notASocket)
        self.assertFalse(shortcutPassThroughLayers(self.ssh))
        self.assertNotIn("write", vars(self.watch))
        self.assertNotIn("dataReceived", vars(self.outer))

    def test_socketUnderAnotherProtocolLeftAlone(self) -> None:
        """
        A socket whose protocol is not the endpoint wrapper over the watch (an HTTP
        proxy's tunnel in between) is left alone.
        """
        socket = FakeSocket()
        self.connect(socket)
        socket.protocol = protocol.Protocol()
        self.assertFalse(shortcutPassThroughLayers(self.ssh))
        self.assertNotIn("write", vars(self.watch))
