"""
Why a tls:// or wss:// link failed, as the agent says it (accesstunnel.transports.tlsreasons):
each failure reproduced in memory with real OpenSSL (a self-signed server, one from another
CA, one for another name, a server that refuses the device's certificate, a port that does not
speak TLS, one that hangs up), WebSocket refusals as autobahn reports them, and the wss:// path
that said "SSL error: ... (in )" or dropped the reason.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import error, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from accesstunnel.transports.tls import ClientTLS, ServerTLS, clientCreator, serverContextFactory
from accesstunnel.transports.tlsreasons import (
    connectionUnder,
    tlsFailureText,
    trustNamed,
    webSocketRefusalText,
)
from accesstunnel.transports.websocket import WebSocketClientFactory, WebSocketServerFactory
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol import pki
from groundcontrol.testing import InMemoryFleet, publicLine, refuseForwards, scriptedSessions
from tests.test_transports_tls import Fixture, Sender
from tests.test_transports_websocket import PeerFactory

TRUST = (
    "(the agent trusts the CA file set by tls-ca in its config file or by "
    "--tls-ca, or the system's CAs when neither is set)"
)


def selfSigned(directory: Path, name: str = "gc.test") -> ServerTLS:
    """A server certificate for C{name}, signed by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return serverFiles(directory, "self", certificate.public_bytes(serialization.Encoding.PEM), key)


def serverFiles(
    directory: Path, stem: str, certificatePEM: bytes, key: ec.EllipticCurvePrivateKey
) -> ServerTLS:
    """groundcontrol's TLS settings: C{certificatePEM} and C{key} in STEM.crt and STEM.key."""
    certFile, keyFile = directory / f"{stem}.crt", directory / f"{stem}.key"
    certFile.write_bytes(certificatePEM)
    keyFile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ServerTLS(certFile, keyFile, None)


class Reporter(Sender):
    """The agent's side: what tlsreasons says as its connection ends (as the agent asks)."""

    said: list[str | None]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        Reporter.said.append(tlsFailureText(reason.value, connectionUnder(self.transport)))
        super().connectionLost(reason)


def dial(server: protocol.Protocol | ServerTLS, hostname: str, client: ClientTLS) -> str | None:
    """The agent's TLS dialling C{server} in memory: what it says of the failure."""
    Reporter.said = []
    clock = Clock()
    clientFactory = TLSMemoryBIOFactory(
        clientCreator(hostname, client), True, protocol.Factory.forProtocol(Reporter), clock=clock
    )
    if isinstance(server, ServerTLS):
        serverFactory = TLSMemoryBIOFactory(
            serverContextFactory(server),
            False,
            protocol.Factory.forProtocol(protocol.Protocol),
            clock=clock,
        )
        server = serverFactory.buildProtocol(iosim.FakeAddress())
    clientProtocol = clientFactory.buildProtocol(iosim.FakeAddress())
    iosim.connect(
        server,
        iosim.makeFakeServer(server),
        clientProtocol,
        iosim.makeFakeClient(clientProtocol),
        greet=False,
        clock=clock,
    ).flush()
    [said] = Reporter.said
    return said


class Talker(protocol.Protocol):
    """A server that is not TLS: it says C{hello} (or hangs up) as a client connects."""

    hello = b""

    def connectionMade(self) -> None:
        if self.hello:
            self.transport.write(self.hello)  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]


class TLSFailureTests(SynchronousTestCase):
    """Each failure with real OpenSSL, as the agent's side of TLS ends."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        self.fixture = Fixture(self.directory)
        self.client = ClientTLS(self.fixture.caFile)

    def said(
        self,
        server: ServerTLS | protocol.Protocol,
        hostname: str = "gc.test",
        client: ClientTLS | None = None,
    ) -> str | None:
        return dial(server, hostname, client or self.client)

    def talker(self, hello: bytes) -> Talker:
        talker = Talker()
        talker.hello = hello
        return talker

    def test_selfSigned(self) -> None:
        """It was C{[('SSL routines', '', 'certificate verify failed')]}."""
        self.assertEqual(
            self.said(selfSigned(self.directory)),
            f"the server's certificate (CN=gc.test) is self-signed {TRUST} "
            "[OpenSSL: self-signed certificate]",
        )

    def serverFrom(self, ca: pki.FleetCA) -> ServerTLS:
        """groundcontrol's TLS settings with a certificate for gc.test issued by C{ca}."""
        key = ec.generate_private_key(ec.SECP256R1())
        issued = pki.issueServerCertificate(ca, ["gc.test"], key, datetime.now(UTC))
        return serverFiles(self.directory, "o", issued.pem, key)

    def test_anotherCA(self) -> None:
        """A certificate from a CA the device does not trust names that CA."""
        other = pki.FleetCA.create(self.directory / "other", datetime.now(UTC), "Other CA")
        self.assertEqual(
            self.said(self.serverFrom(other)),
            "the server's certificate (CN=gc.test) was issued by CN=Other CA, a CA this "
            f"device does not trust {TRUST} [OpenSSL: unable to get local issuer certificate]",
        )

    def test_otherChainFaults(self) -> None:
        """
        A chain a trusted CA vouches for that fails OpenSSL's check for another reason (here
        an intermediate that is no CA): not called untrusted, but what the check found.
        """
        now = datetime.now(UTC)

        def certificate(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> Any:
            return (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signer, hashes.SHA256())
            )

        rootKey, middleKey, leafKey = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
        root = certificate("Root", "Root", rootKey, rootKey, ca=True)
        middle = certificate("Not a CA", "Root", middleKey, rootKey, ca=False)
        leaf = certificate("gc.test", "Not a CA", leafKey, middleKey, ca=False)
        context = SSL.Context(SSL.TLS_METHOD)
        context.get_cert_store().add_cert(crypto.X509.from_cryptography(root))  # type: ignore[union-attr]
        self.assertEqual(
            trustNamed(SSL.Connection(context, None), [leaf, middle]),
            "the server's certificate (CN=gc.test) did not pass OpenSSL's check [OpenSSL: "
            "invalid CA certificate]",
        )

    def test_anotherName(self) -> None:
        """It was C{VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID(...))])}."""
        server = ServerTLS(self.fixture.serverCert, self.fixture.serverKey, None)
        self.assertEqual(
            self.said(server, "gc.example"),
            "the server's certificate is for gc.test, 127.0.0.1, not gc.example (is the "
            "address right, or is another server on that port?) [service_identity: "
            "DNSMismatch]",
        )

    def test_deviceCertificateFromAnotherCA(self) -> None:
        """groundcontrol refuses a device certificate from another CA: it was OpenSSL's alert."""
        other = pki.FleetCA.create(self.directory / "other", datetime.now(UTC), "Other CA")
        device, _ = self.fixture.device(ca=other)
        server = ServerTLS(self.fixture.serverCert, self.fixture.serverKey, self.fixture.caFile)
        self.assertEqual(
            self.said(server, client=device),
            "the server does not trust the CA that issued this device's certificate (is this "
            "the groundcontrol that issued it?) [OpenSSL: tlsv1 alert unknown ca]",
        )

    def test_deviceCertificateRevoked(self) -> None:
        """groundcontrol refuses a revoked device certificate: OpenSSL calls it internal."""
        device, _ = self.fixture.device()
        server = ServerTLS(
            self.fixture.serverCert,
            self.fixture.serverKey,
            self.fixture.caFile,
            isRevoked=lambda serial: True,
        )
        with capturedLogs():
            said = self.said(server, client=device)
        self.assertEqual(
            said,
            "the server broke off the TLS handshake (groundcontrol does when it refuses this "
            "device's certificate: revoked?) [OpenSSL: tlsv1 alert internal error]",
        )

    def test_notTLS(self) -> None:
        """An SSH port dialled as tls://: it was C{[(..., 'wrong version number')]}."""
        self.assertEqual(
            self.said(self.talker(b"SSH-2.0-OpenSSH_9.6\r\n")),
            "the server does not speak TLS on that port (a plain TCP or HTTP server? ssh:// "
            "and ws:// ports are not TLS ones) [OpenSSL: wrong version number]",
        )

    def test_hungUpDuringHandshake(self) -> None:
        """A port that takes the connection and closes it: it was "Connection lost"."""
        self.assertEqual(
            self.said(self.talker(b"")),
            "the server closed the connection during the TLS handshake (is it a TLS port? a "
            "proxy or firewall that cuts TLS does this too)",
        )

    def test_notATLSFailure(self) -> None:
        """A refused connection, or a close after the handshake: the caller says it."""
        self.assertIsNone(tlsFailureText(error.ConnectionRefusedError()))
        self.assertIsNone(tlsFailureText(error.ConnectionDone()))


class OpenSSLWordsTests(SynchronousTestCase):
    """What the server's alerts and OpenSSL's other reasons become (no handshake needed)."""

    def words(self, reason: str) -> str | None:
        return tlsFailureText(SSL.Error([("SSL routines", "", reason)]))

    def test_certificateRequired(self) -> None:
        self.assertEqual(
            self.words("tlsv13 alert certificate required"),
            "the server wants a client certificate and this device has none to give it yet "
            "(is this groundcontrol's tls:// or wss:// port? A device gets its fleet "
            "certificate once approved) [OpenSSL: tlsv13 alert certificate required]",
        )

    def test_unknownCA(self) -> None:
        self.assertEqual(
            self.words("tlsv1 alert unknown ca"),
            "the server does not trust the CA that issued this device's certificate (is this "
            "the groundcontrol that issued it?) [OpenSSL: tlsv1 alert unknown ca]",
        )

    def test_versions(self) -> None:
        self.assertEqual(
            self.words("tlsv1 alert protocol version"),
            "the server and this device have no TLS version in common (1.2 or later) "
            "[OpenSSL: tlsv1 alert protocol version]",
        )

    def test_otherWordsKept(self) -> None:
        self.assertEqual(
            self.words("bad signature"), "the TLS handshake failed [OpenSSL: bad signature]"
        )


class WebSocketRefusalTests(SynchronousTestCase):
    """autobahn's reason for a server that answered the WebSocket request with a status."""

    def said(self, status: str) -> str | None:
        return webSocketRefusalText(
            f'connection was closed uncleanly ("WebSocket connection upgrade failed [{status}")'
        )

    def test_statuses(self) -> None:
        self.assertEqual(
            self.said("404]: Not Found"),
            "the server has no WebSocket at that path (HTTP 404 Not Found): is the path right?",
        )
        self.assertEqual(
            self.said("426]: Upgrade Required"),
            "the server, or a proxy on the way, would not upgrade to a WebSocket (HTTP 426 "
            "Upgrade Required): a proxy or load balancer that does not pass WebSocket?",
        )
        self.assertEqual(
            self.said("200]: OK"),
            "the server answered HTTP 200 OK, not a WebSocket (a web server or a captive "
            "portal, not groundcontrol?)",
        )
        self.assertIn("refused the WebSocket (HTTP 403 Forbidden)", self.said("403]: Forbidden"))
        self.assertIn("failed the WebSocket request (HTTP 502 Bad", self.said("502]: Bad Gateway"))

    def test_otherReasons(self) -> None:
        self.assertIsNone(webSocketRefusalText("peer dropped the TCP connection"))


class WebSocketOverTLSTests(SynchronousTestCase):
    """
    wss:// against a self-signed server, in memory: the agent's factory hears the TLS reason
    in words (it heard 'WebSocket did not open: connection was closed uncleanly ("SSL error:
    certificate verify failed (in )")'), and autobahn's error lines with "(in )" are gone
    from both ends.
    """

    def test_selfSigned(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        fixture = Fixture(directory)
        clock = Clock()
        inner = PeerFactory(b"SSH-2.0-agent\r\n")
        webSocket = WebSocketClientFactory(inner, "wss://gc.test:443/tunnel")
        clientFactory = TLSMemoryBIOFactory(
            clientCreator("gc.test", ClientTLS(fixture.caFile)), True, webSocket, clock=clock
        )
        serverInner = PeerFactory(b"SSH-2.0-server\r\n")
        serverFactory = TLSMemoryBIOFactory(
            serverContextFactory(selfSigned(directory)),
            False,
            WebSocketServerFactory(serverInner, "wss://gc.test:443/tunnel", "/tunnel"),
            clock=clock,
        )
        clientProtocol = clientFactory.buildProtocol(iosim.FakeAddress())
        serverProtocol = serverFactory.buildProtocol(iosim.FakeAddress())
        with capturedLogs() as events:
            iosim.connect(
                serverProtocol,
                iosim.makeFakeServer(serverProtocol),
                clientProtocol,
                iosim.makeFakeClient(clientProtocol),
                greet=False,
                clock=clock,
            ).flush()
        [failure] = inner.failures
        self.assertEqual(
            str(failure.value),
            f"the server's certificate (CN=gc.test) is self-signed {TRUST} "
            "[OpenSSL: self-signed certificate]",
        )
        # The agent's line about the address says it, once; groundcontrol's side says the
        # client's alert at info in OpenSSL's words (autobahn's was an error, with "(in )").
        said = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
        self.assertEqual(len(said), 1, said)
        self.assertTrue(said[0].startswith("TLS under the WebSocket with "), said)
        self.assertTrue(said[0].endswith(" failed: tlsv1 alert unknown ca"), said)
        self.assertEqual([e for e in events if e["log_level"] > LogLevel.info], [])
        self.assertFalse([e for e in events if "(in )" in formatEvent(e)])


class TLSTransport(StringTransport):
    """A link's transport over TLS whose handshake has not got as far as a certificate."""

    def getHandle(self) -> SSL.Connection:
        return SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)


class LinkEndTests(SynchronousTestCase):
    """The agent's link that ends before it is up over TLS says why in words."""

    def setUp(self) -> None:
        fleet = InMemoryFleet()
        settings = LinkSettings(
            name="kiln7",
            deviceKey=fleet.enrollDevice("kiln7"),
            serverKey=ServerKeyPin(fingerprint(publicLine(fleet.hostKey))),
        )
        self.clock = fleet.clock
        self.factory = AgentLinkFactory(settings, fleet.clock, scriptedSessions(), refuseForwards)
        link: Any = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 443))
        link.makeConnection(TLSTransport())
        self.ended: list[Failure] = []
        link.ready.addErrback(self.ended.append)
        self.link = link

    def endedWith(self, reason: Failure) -> str:
        self.link.connectionLost(reason)
        [failure] = self.ended
        return str(failure.value)

    def test_wordsOverTLS(self) -> None:
        """It was "link closed before it was up: [('SSL routines', '', 'wrong version ...')]"."""
        self.assertEqual(
            self.endedWith(Failure(SSL.Error([("SSL routines", "", "wrong version number")]))),
            "link closed before it was up: the server does not speak TLS on that port (a "
            "plain TCP or HTTP server? ssh:// and ws:// ports are not TLS ones) [OpenSSL: "
            "wrong version number]",
        )

    def test_serverHungUp(self) -> None:
        """It was "... lost in a non-clean fashion: Connection lost"."""
        self.assertEqual(
            self.endedWith(Failure(error.ConnectionLost())),
            "link closed before it was up: the server closed the connection during the TLS "
            "handshake (is it a TLS port? a proxy or firewall that cuts TLS does this too)",
        )

    def test_silentServer(self) -> None:
        """
        A port that takes the connection and says nothing: the agent gives up on it, and
        says so, rather than blaming the server for the close it made itself.
        """
        with capturedLogs():
            self.clock.advance(self.factory.settings.answerTimeout)
        self.assertTrue(self.link.transport.disconnecting)
        self.assertEqual(
            self.endedWith(Failure(error.ConnectionLost())),
            "link closed before it was up: the server took the connection but did not finish "
            "the TLS handshake in 120 s (is it a TLS port?)",
        )

    def test_agentStopping(self) -> None:
        """The agent's own stop during the handshake is not the server's hang-up."""
        self.factory.stopping = True
        self.assertEqual(
            self.endedWith(Failure(error.ConnectionLost())),
            "link closed before it was up: the agent is stopping",
        )
