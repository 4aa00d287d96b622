"""Tests for accesstunnel.transports.proxy: which proxy applies, and the CONNECT handshake."""

from __future__ import annotations

import base64

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from accesstunnel.transports.proxy import (
    HTTPConnectEndpoint,
    ProxyError,
    ProxySettings,
    ProxyURL,
    matchesNoProxy,
)


class NoProxyTests(SynchronousTestCase):
    """NO_PROXY entries in the forms curl and friends accept."""

    def test_exactHost(self) -> None:
        """A host name matches itself, case-insensitively, and not a different host."""
        self.assertTrue(matchesNoProxy("gc.example.com", "GC.example.com", 443))
        self.assertFalse(matchesNoProxy("gc.example.com", "other.example.com", 443))

    def test_domainSuffix(self) -> None:
        """A name, '.name' or '*.name' matches subdomains, but not a longer unrelated name."""
        for entry in ("example.com", ".example.com", "*.example.com"):
            self.assertTrue(matchesNoProxy(entry, "gc.example.com", 443), entry)
            self.assertFalse(matchesNoProxy(entry, "gc.badexample.com", 443), entry)
        self.assertTrue(matchesNoProxy("example.com", "example.com", 443))

    def test_star(self) -> None:
        """'*' turns the proxy off for every host."""
        self.assertTrue(matchesNoProxy("*", "anything.example", 1))

    def test_hostAndPort(self) -> None:
        """host:port applies to that port only."""
        self.assertTrue(matchesNoProxy("gc.example.com:8443", "gc.example.com", 8443))
        self.assertFalse(matchesNoProxy("gc.example.com:8443", "gc.example.com", 443))

    def test_listsAndIPs(self) -> None:
        """Comma/space separated lists; IPs match exactly, by CIDR block, or [v6]:port."""
        noProxy = "localhost, 127.0.0.1 10.0.0.0/8,[::1]:22"
        self.assertTrue(matchesNoProxy(noProxy, "localhost", 80))
        self.assertTrue(matchesNoProxy(noProxy, "127.0.0.1", 80))
        self.assertTrue(matchesNoProxy(noProxy, "10.2.3.4", 80))
        self.assertTrue(matchesNoProxy(noProxy, "::1", 22))
        self.assertFalse(matchesNoProxy(noProxy, "::1", 23))
        self.assertFalse(matchesNoProxy(noProxy, "192.0.2.1", 80))

    def test_empty(self) -> None:
        """An empty NO_PROXY matches nothing."""
        self.assertFalse(matchesNoProxy("", "gc.example.com", 443))


class ProxySettingsTests(SynchronousTestCase):
    """Which proxy a wss:// or ws:// address goes through."""

    def test_fromEnvironment(self) -> None:
        """HTTPS_PROXY for wss, HTTP_PROXY for ws, lower case winning; NO_PROXY applied."""
        settings = ProxySettings.fromEnvironment(
            {
                "HTTPS_PROXY": "http://upper:3128",
                "https_proxy": "http://lower:3128",
                "HTTP_PROXY": "http://plain:8080",
                "NO_PROXY": "internal.example",
            }
        )
        self.assertEqual(settings.proxyFor("wss", "gc.example.com", 443).host, "lower")
        self.assertEqual(settings.proxyFor("ws", "gc.example.com", 80).host, "plain")
        self.assertIsNone(settings.proxyFor("wss", "gc.internal.example", 443))

    def test_overrideWins(self) -> None:
        """--proxy replaces the environment for both schemes."""
        settings = ProxySettings.fromEnvironment(
            {"HTTPS_PROXY": "http://env:1"}, override="http://cli:2"
        )
        self.assertEqual(settings.proxyFor("wss", "h", 443), ProxyURL("cli", 2))
        self.assertEqual(settings.proxyFor("ws", "h", 80), ProxyURL("cli", 2))

    def test_noProxyConfigured(self) -> None:
        """Without any proxy variable, everything goes direct."""
        self.assertIsNone(ProxySettings.fromEnvironment({}).proxyFor("wss", "h", 443))

    def test_urlForms(self) -> None:
        """Credentials are URL-decoded; a bare host:port is taken as http; https is refused."""
        url = ProxyURL.parse("http://us%40er:p%3Ass@proxy.example:3128")
        self.assertEqual((url.username, url.password), ("us@er", "p:ss"))
        self.assertEqual(url.authorization(), b"Basic " + base64.b64encode(b"us@er:p:ss"))
        self.assertEqual(ProxyURL.parse("proxy:8080"), ProxyURL("proxy", 8080))
        self.assertIsNone(ProxyURL.parse("proxy:8080").authorization())
        self.assertRaises(ValueError, ProxyURL.parse, "https://proxy:8443")
        self.assertNotIn("p:ss", repr(url))


@implementer(IStreamClientEndpoint)
class FakeProxyEndpoint:
    """Connects the given factory's protocol to a StringTransport at once."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list[Protocol] = []

    def connect(self, factory: Factory) -> defer.Deferred[Protocol]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return defer.succeed(protocol)


class Recorder(Protocol):
    """The protocol that should get the tunnel."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class ConnectTests(SynchronousTestCase):
    """The CONNECT request, the proxy's answer, and the hand-over to the real protocol."""

    def setUp(self) -> None:
        self.proxyEndpoint = FakeProxyEndpoint()
        self.endpoint = HTTPConnectEndpoint(
            self.proxyEndpoint,
            ProxyURL.parse("http://user:pw@proxy:3128"),
            "gc.example.com",
            443,
        )
        self.d = self.endpoint.connect(Factory.forProtocol(Recorder))
        [self.transport] = self.proxyEndpoint.transports
        [self.connectProtocol] = self.proxyEndpoint.protocols

    def test_requestWithBasicAuth(self) -> None:
        """The request names host:port twice and carries Basic credentials from the URL."""
        self.assertEqual(
            self.transport.value(),
            b"CONNECT gc.example.com:443 HTTP/1.1\r\n"
            b"Host: gc.example.com:443\r\n"
            b"Proxy-Authorization: Basic " + base64.b64encode(b"user:pw") + b"\r\n\r\n",
        )
        self.assertNoResult(self.d)

    def test_established(self) -> None:
        """
        A 200 answer (even split across reads) hands the connection over: bytes after the
        head reach the new protocol, which writes to the proxy connection directly.
        """
        self.connectProtocol.dataReceived(b"HTTP/1.1 200 Connection established\r\nVia: x\r")
        self.assertNoResult(self.d)
        self.connectProtocol.dataReceived(b"\n\r\nSSH-2.0-server\r\n")
        protocol = self.successResultOf(self.d)
        self.assertIsInstance(protocol, Recorder)
        self.assertEqual(protocol.received, b"SSH-2.0-server\r\n")
        self.assertIs(protocol.transport, self.transport)
        self.connectProtocol.dataReceived(b"more")
        self.assertEqual(protocol.received, b"SSH-2.0-server\r\nmore")
        self.connectProtocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(protocol.lost), 1)

    def test_authenticationRequired(self) -> None:
        """A 407 fails the connect with the proxy's status line and drops the connection."""
        self.connectProtocol.dataReceived(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
        )
        failure = self.failureResultOf(self.d, ProxyError)
        self.assertIn("407", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_garbage(self) -> None:
        """A non-HTTP answer fails the connect."""
        self.connectProtocol.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.failureResultOf(self.d, ProxyError)

    def test_headTooLong(self) -> None:
        """An endless response head is cut off: memory before the tunnel is bounded."""
        self.connectProtocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)
        self.failureResultOf(self.d, ProxyError)

    def test_refusalsSayWhatTheyMean(self) -> None:
        """
        A 403 and a 502 say whose side the refusal is on (they were the status line alone,
        'the proxy refused CONNECT: HTTP/1.1 403 Forbidden').
        """
        hints = {
            b"403 Forbidden": "(the proxy does not let this device reach gc.example.com:443: "
            "ask its admin)",
            b"502 Bad Gateway": "(the proxy could not reach gc.example.com:443: is the server "
            "up, and the address right?)",
        }
        for status, hint in hints.items():
            endpoint = HTTPConnectEndpoint(
                self.proxyEndpoint, ProxyURL.parse("http://proxy:3128"), "gc.example.com", 443
            )
            connecting = endpoint.connect(Factory.forProtocol(Recorder))
            self.proxyEndpoint.protocols[-1].dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
            failure = self.failureResultOf(connecting, ProxyError)
            self.assertEqual(
                str(failure.value),
                f"the proxy refused CONNECT: HTTP/1.1 {status.decode()} {hint}",
            )

    def test_closedBeforeAnswer(self) -> None:
        """The proxy hanging up before answering fails the connect."""
        self.connectProtocol.connectionLost(Failure(ConnectionError("reset")))
        failure = self.failureResultOf(self.d, ProxyError)
        self.assertEqual(
            str(failure.value), "the proxy closed the connection before it answered: reset"
        )

    def test_closedCleanlyBeforeAnswer(self) -> None:
        """
        A proxy that hangs up on CONNECT without a word: it was 'the proxy closed the
        connection: Connection was closed cleanly'.
        """
        self.connectProtocol.connectionLost(Failure(error.ConnectionDone()))
        failure = self.failureResultOf(self.d, ProxyError)
        self.assertEqual(str(failure.value), "the proxy closed the connection before it answered")

    def test_cancel(self) -> None:
        """Cancelling a connect that waits for the proxy aborts the proxy connection."""
        self.d.cancel()
        self.failureResultOf(self.d, defer.CancelledError)
        self.assertTrue(self.transport.disconnecting)
