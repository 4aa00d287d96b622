"""
Tests for the agent's tls:// and wss:// dialer with a device certificate on disk
(accesstunnel.addresses: clientConnector's TLS endpoint and its handshake watch), in memory:
the connector's real layers over iosim instead of TCP, against groundcontrol's real listener
layers (TLS with the fleet CA, WebSocket).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import txaio
from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from accesstunnel.addresses import clientConnector, serverListener
from accesstunnel.keys import certificateSerial
from accesstunnel.transports.tls import ClientTLS, ServerTLS, peerCertificate
from groundcontrol import pki
from tests.test_transports_tls import Fixture
from tests.test_transports_websocket import PeerFactory


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects each client protocol to a fresh server protocol in memory, as TCP would."""

    def __init__(self, serverFactory: IProtocolFactory, clock: MemoryReactorClock) -> None:
        self.serverFactory = serverFactory
        self.clock = clock
        self.servers: list[IProtocol] = []
        self.pump: iosim.IOPump | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        client = protocolFactory.buildProtocol(iosim.FakeAddress())
        server = self.serverFactory.buildProtocol(iosim.FakeAddress())
        assert client is not None and server is not None
        self.servers.append(server)
        self.pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        return defer.succeed(client)


class CertificateWatchTests(SynchronousTestCase):
    """
    The device certificate is presented over tls:// and wss:// alike, the link protocol
    sits right on its transport layer, and a refused certificate makes the next attempt
    go without it.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        # autobahn schedules its WebSocket timers through txaio's loop.
        self.patch(txaio.config, "loop", self.reactor)  # type: ignore[attr-defined]
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        self.fixture = Fixture(directory)
        self.serverTLS = ServerTLS(
            self.fixture.serverCert, self.fixture.serverKey, self.fixture.caFile
        )

    def dial(self, address: str, clientTLS: ClientTLS) -> tuple[Any, PeerFactory, PeerFactory]:
        """
        Connect once through the connector for C{address}; return the connector's endpoint,
        and the server's and the client's link factories (what each built and received).
        """
        serverLinks, clientLinks = (
            PeerFactory(b"SSH-2.0-server\r\n"),
            PeerFactory(b"SSH-2.0-agent\r\n"),
        )
        listener = serverListener(self.reactor, address.replace(":443", ":0"), self.serverTLS)
        connector = clientConnector(self.reactor, address, clientTLS)
        memory = MemoryEndpoint(listener.wrapFactory(serverLinks), self.reactor)
        connector.endpoint.inner = memory  # type: ignore[attr-defined]
        self.successResultOf(connector.endpoint.connect(connector.wrapFactory(clientLinks)))
        assert memory.pump is not None
        memory.pump.flush()
        self.pump = memory.pump
        return connector.endpoint, serverLinks, clientLinks

    def test_wssWithCertificate(self) -> None:
        """
        Over wss:// with a certificate on disk, the WebSocket opens on the TLS layer itself
        and the link's bytes flow both ways; groundcontrol sees the device certificate.
        (A wrapper between TLS and autobahn made autobahn raise in connectionMade: no
        WebSocket ever opened while the certificate was presented.)
        """
        clientTLS, issued = self.fixture.device()
        endpoint, serverLinks, clientLinks = self.dial("wss://127.0.0.1:443/tunnel", clientTLS)
        [serverLink], [clientLink] = serverLinks.built, clientLinks.built
        self.assertEqual(serverLink.received, b"SSH-2.0-agent\r\n")
        self.assertEqual(clientLink.received, b"SSH-2.0-server\r\n")
        webSocket = clientLink.transport
        self.assertIsInstance(webSocket.transport, TLSMemoryBIOProtocol)  # type: ignore[union-attr]
        seen = peerCertificate(serverLink.transport)
        self.assertIsNotNone(seen)
        # As the fleet names it: 32 digits, so one whose first is 0 (1 in 16) still matches.
        self.assertEqual(certificateSerial(seen.serial_number), issued.serialNumber)  # type: ignore[union-attr]
        clientLink.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()
        self.assertEqual(len(clientLink.lost), 1)
        self.assertFalse(endpoint.withoutCertificateNext)

    def test_tlsWithCertificate(self) -> None:
        """Over tls:// the link protocol's transport is the TLS layer itself."""
        clientTLS, _ = self.fixture.device()
        endpoint, serverLinks, clientLinks = self.dial("tls://127.0.0.1:443", clientTLS)
        [serverLink], [clientLink] = serverLinks.built, clientLinks.built
        self.assertEqual(serverLink.received, b"SSH-2.0-agent\r\n")
        self.assertEqual(clientLink.received, b"SSH-2.0-server\r\n")
        self.assertIsInstance(clientLink.transport, TLSMemoryBIOProtocol)
        self.assertIsNotNone(peerCertificate(serverLink.transport))
        self.assertFalse(endpoint.withoutCertificateNext)

    def test_refusedCertificateNotPresentedNext(self) -> None:
        """
        A certificate the server refuses (another CA's) ends the connection before any
        data reaches the link; the next attempt goes without it.
        """
        otherCA = pki.FleetCA.create(self.fixture.directory / "other", self.fixture.now)
        clientTLS, _ = self.fixture.device(ca=otherCA)
        for address in ("wss://127.0.0.1:443/tunnel", "tls://127.0.0.1:443"):
            endpoint, _, clientLinks = self.dial(address, clientTLS)
            self.assertFalse([link for link in clientLinks.built if link.received], address)
            self.assertTrue(endpoint.withoutCertificateNext, address)
            memory = endpoint.inner
            created = self.successResultOf(endpoint.connect(PeerFactory(b"")))
            self.assertIsNotNone(created)
            memory.pump.flush()
            self.assertIsNone(peerCertificate(memory.servers[-1]), address)
            self.assertFalse(endpoint.withoutCertificateNext, address)
