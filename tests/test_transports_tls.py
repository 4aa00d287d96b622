"""
Tests for accesstunnel.transports.tls: mutual TLS as the agent link uses it, in memory.

OpenSSL checks validity against the wall clock, so certificates here are issued for now.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from OpenSSL import SSL
from twisted.conch.ssh import keys
from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.tls import (
    ClientTLS,
    ServerTLS,
    TLSConfigError,
    clientCreator,
    loadPrivateKey,
    peerCertificate,
    serverContextFactory,
)
from groundcontrol import pki


class Fixture:
    """A fleet CA, a server certificate for 127.0.0.1 and gc.test, and device keys, on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.now = datetime.now(UTC)
        self.ca = pki.FleetCA.create(directory / "ca", self.now - timedelta(days=60))
        serverKey = ed25519.Ed25519PrivateKey.generate()
        issued = pki.issueServerCertificate(self.ca, ["gc.test", "127.0.0.1"], serverKey, self.now)
        self.serverCert = directory / "server.crt"
        self.serverCert.write_bytes(issued.pem)
        self.serverKey = directory / "server.key"
        self.serverKey.write_bytes(
            serverKey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.caFile = directory / "ca" / pki.CA_CERTIFICATE_FILE

    def device(
        self,
        name: str = "kiln7",
        ca: pki.FleetCA | None = None,
        now: datetime | None = None,
        lifetime: timedelta = pki.DEFAULT_DEVICE_LIFETIME,
    ) -> tuple[ClientTLS, pki.IssuedCertificate]:
        """A device key (OpenSSH file, as the agent keeps it) and its certificate."""
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        keyFile = self.directory / f"{name}_ed25519"
        keyFile.write_bytes(key.toString("OPENSSH"))
        issued = pki.issueDeviceCertificate(
            ca or self.ca,
            name,
            "SN-1",
            key.public().toString("OPENSSH").decode(),
            now or self.now,
            lifetime,
        )
        certFile = self.directory / f"{name}.crt"
        certFile.write_bytes(issued.pem)
        return ClientTLS(self.caFile, certFile, keyFile), issued


class Receiver(protocol.Protocol):
    """Server side: records what arrives and how the connection ended."""

    instances: list[Receiver]

    def connectionMade(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []
        Receiver.instances.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.append(reason)


class Sender(protocol.Protocol):
    """Client side: says hello like an SSH client would."""

    lost: list[Failure]

    def connectionMade(self) -> None:
        Sender.lost = []
        self.transport.write(b"SSH-2.0-agent\r\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        Sender.lost.append(reason)


def handshake(
    serverSettings: ServerTLS, hostname: str, client: ClientTLS | None, **creatorOptions: Any
) -> Any:
    """Run the handshake in memory; return (client TLS protocol, server TLS protocol)."""
    clientProtocol, serverProtocol, _ = connectedPair(
        serverSettings, hostname, client, **creatorOptions
    )
    return clientProtocol, serverProtocol


def connectedPair(
    serverSettings: ServerTLS, hostname: str, client: ClientTLS | None, **creatorOptions: Any
) -> tuple[Any, Any, iosim.IOPump]:
    """
    Run the handshake in memory; return the client and server TLS protocols and the
    pump that moves their bytes, for a test that goes on using the connection.
    """
    Receiver.instances = []
    clock = Clock()
    serverFactory = TLSMemoryBIOFactory(
        serverContextFactory(serverSettings),
        False,
        protocol.Factory.forProtocol(Receiver),
        clock=clock,
    )
    clientFactory = TLSMemoryBIOFactory(
        clientCreator(hostname, client, **creatorOptions),
        True,
        protocol.Factory.forProtocol(Sender),
        clock=clock,
    )
    clientProtocol = clientFactory.buildProtocol(iosim.FakeAddress())
    serverProtocol = serverFactory.buildProtocol(iosim.FakeAddress())
    pump = iosim.connect(
        serverProtocol,
        iosim.makeFakeServer(serverProtocol),
        clientProtocol,
        iosim.makeFakeClient(clientProtocol),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return clientProtocol, serverProtocol, pump


class MutualTLSTests(SynchronousTestCase):
    """What the server accepts and refuses, and what the SSH layer learns."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        self.fixture = Fixture(self.directory)
        self.revoked: set[str] = set()
        self.server = ServerTLS(
            self.fixture.serverCert,
            self.fixture.serverKey,
            self.fixture.caFile,
            isRevoked=self.revoked.__contains__,
        )

    def test_deviceCertificate(self) -> None:
        """
        A device presenting its fleet certificate (key from its OpenSSH file) gets through,
        and the SSH layer can read the verified certificate through the transport.
        """
        client, issued = self.fixture.device()
        handshake(self.server, "127.0.0.1", client)
        [receiver] = Receiver.instances
        self.assertEqual(receiver.received, b"SSH-2.0-agent\r\n")
        certificate = peerCertificate(receiver.transport)
        assert certificate is not None
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.assertEqual(
            pki.verifyDeviceCertificate(self.fixture.ca, pem, self.fixture.now).deviceName, "kiln7"
        )
        self.assertEqual(pem, issued.pem)

    def test_noCertificateStillConnects(self) -> None:
        """A new device with no certificate yet connects (to queue as pending); no peer cert."""
        client = ClientTLS(self.fixture.caFile, self.directory / "missing.crt", None)
        handshake(self.server, "gc.test", client)
        [receiver] = Receiver.instances
        self.assertEqual(receiver.received, b"SSH-2.0-agent\r\n")
        self.assertIsNone(peerCertificate(receiver.transport))

    def assertRefused(self) -> None:
        self.assertEqual([r.received for r in Receiver.instances if r.received], [])
        reasons = [r for receiver in Receiver.instances for r in receiver.lost]
        self.assertTrue(reasons, "the server side should have lost the connection")
        reasons[0].trap(SSL.Error)

    def test_otherCARefused(self) -> None:
        """A certificate from some other CA fails the handshake."""
        other = pki.FleetCA.create(self.directory / "other", self.fixture.now, "Other CA")
        client, _ = self.fixture.device(ca=other)
        handshake(self.server, "127.0.0.1", client)
        self.assertRefused()

    def test_expiredRefused(self) -> None:
        """An expired fleet certificate, if presented, fails the handshake."""
        client, _ = self.fixture.device(
            now=self.fixture.now - timedelta(days=10), lifetime=timedelta(days=1)
        )
        handshake(self.server, "127.0.0.1", client, presentExpired=True)
        self.assertRefused()

    def test_expiredNotPresented(self) -> None:
        """
        The agent does not present its own expired certificate: the handshake goes on
        without one, so a device offline past expiry can come back (as pending, by key).
        """
        client, _ = self.fixture.device(
            now=self.fixture.now - timedelta(days=10), lifetime=timedelta(days=1)
        )
        handshake(self.server, "127.0.0.1", client)
        self.assertEqual(
            [r.received for r in Receiver.instances if r.received], [b"SSH-2.0-agent\r\n"]
        )

    def test_revokedRefused(self) -> None:
        """A certificate whose serial the server holds as revoked fails the handshake."""
        client, issued = self.fixture.device()
        self.revoked.add(issued.serialNumber)
        handshake(self.server, "127.0.0.1", client)
        self.assertRefused()

    def test_wrongHostnameRefusedByClient(self) -> None:
        """The agent refuses a server whose certificate does not name the host it dialled."""
        client, _ = self.fixture.device()
        handshake(self.server, "elsewhere.test", client)
        self.assertEqual([r.received for r in Receiver.instances if r.received], [])
        self.assertTrue(Sender.lost or any(r.lost for r in Receiver.instances))

    def test_untrustedServerRefusedByClient(self) -> None:
        """Without the pinned CA, the agent (trusting only system roots) refuses the server."""
        _, _ = self.fixture.device()
        handshake(self.server, "gc.test", ClientTLS(None))
        self.assertEqual([r.received for r in Receiver.instances if r.received], [])


class LoadingTests(SynchronousTestCase):
    """Files that are missing or wrong give a clear error, not a traceback deep in OpenSSL."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)

    def test_missingFiles(self) -> None:
        """A missing certificate file names itself in the error."""
        with self.assertRaises(TLSConfigError) as caught:
            serverContextFactory(ServerTLS(self.directory / "no.crt", self.directory / "no.key"))
        self.assertIn("no.crt", str(caught.exception))

    def test_badKey(self) -> None:
        """A file that is no private key is refused."""
        path = self.directory / "key"
        path.write_text("not a key")
        self.assertRaises(TLSConfigError, loadPrivateKey, path)

    def test_noTLSNoCertificate(self) -> None:
        """peerCertificate of a plain transport is None."""
        self.assertIsNone(peerCertificate(object()))
