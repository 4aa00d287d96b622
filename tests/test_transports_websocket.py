"""Tests for accesstunnel.transports.websocket: SSH bytes through autobahn's framing, in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.websocket import WebSocketClientFactory, WebSocketServerFactory


class Peer(protocol.Protocol):
    """Records bytes and the end of the connection; says hello when it starts."""

    def __init__(self, hello: bytes) -> None:
        self.hello = hello
        self.received = b""
        self.made = False
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made = True
        self.transport.write(self.hello)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.append(reason)


class PeerFactory(protocol.Factory):
    def __init__(self, hello: bytes) -> None:
        self.hello = hello
        self.built: list[Peer] = []
        self.failures: list[Failure] = []

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer(self.hello)
        peer.factory = self
        self.built.append(peer)
        return peer

    def transportFailed(self, reason: Failure) -> None:
        self.failures.append(reason)


def connect(clientPath: str) -> tuple[PeerFactory, PeerFactory, iosim.IOPump]:
    serverInner, clientInner = PeerFactory(b"SSH-2.0-server\r\n"), PeerFactory(b"SSH-2.0-agent\r\n")
    server = WebSocketServerFactory(serverInner, "ws://127.0.0.1:80/tunnel", "/tunnel")
    client = WebSocketClientFactory(clientInner, f"ws://127.0.0.1:80{clientPath}")
    serverProtocol = server.buildProtocol(iosim.FakeAddress())
    clientProtocol = client.buildProtocol(iosim.FakeAddress())
    pump = iosim.connect(
        serverProtocol,
        iosim.makeFakeServer(serverProtocol),
        clientProtocol,
        iosim.makeFakeClient(clientProtocol),
        greet=False,
        clock=Clock(),
    )
    pump.flush()
    return serverInner, clientInner, pump


class WebSocketTests(SynchronousTestCase):
    """The wrapped protocols talk as if on TCP; the wrong path gets nothing."""

    def test_bytesBothWays(self) -> None:
        """Each side's protocol starts after the WebSocket opens and gets the other's bytes."""
        serverInner, clientInner, pump = connect("/tunnel")
        [serverPeer], [clientPeer] = serverInner.built, clientInner.built
        self.assertEqual(serverPeer.received, b"SSH-2.0-agent\r\n")
        self.assertEqual(clientPeer.received, b"SSH-2.0-server\r\n")
        big = bytes(range(256)) * 1000  # several WebSocket frames
        clientPeer.transport.write(big)  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(serverPeer.received, b"SSH-2.0-agent\r\n" + big)

    def test_closePropagates(self) -> None:
        """Closing one end ends the other end's protocol too."""
        serverInner, clientInner, pump = connect("/tunnel")
        [serverPeer], [clientPeer] = serverInner.built, clientInner.built
        clientPeer.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(len(serverPeer.lost), 1)
        self.assertEqual(len(clientPeer.lost), 1)

    def test_wrongPathRefused(self) -> None:
        """
        A request for another path is refused; neither wrapped protocol ever starts, and the
        client's factory hears that the transport failed (so failover can move on).
        """
        serverInner, clientInner, _ = connect("/elsewhere")
        self.assertFalse([p for p in serverInner.built if p.made])
        self.assertFalse([p for p in clientInner.built if p.made])
        self.assertEqual(len(clientInner.failures), 1)

    def test_abortReachesTheTransport(self) -> None:
        """abortConnection on the adapter (keepalive's last resort) drops the connection."""
        _, clientInner, pump = connect("/tunnel")
        [clientPeer] = clientInner.built
        clientPeer.transport.abortConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(len(clientPeer.lost), 1)
