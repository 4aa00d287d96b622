"""Tests for accesstunnel.addresses: URL parsing, and the listeners and connectors they build."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.addresses import (
    DEFAULT_SERVERS,
    Address,
    AddressError,
    clientConnector,
    clientEndpointString,
    parseAddress,
    serverEndpointString,
    serverListener,
)
from accesstunnel.transports.proxy import HTTPConnectEndpoint, ProxySettings
from accesstunnel.transports.tls import ClientTLS, ServerTLS
from accesstunnel.transports.tor import OnionServerEndpoint, TorSettings
from accesstunnel.transports.websocket import WebSocketClientFactory, WebSocketServerFactory
from tests.test_transports_tls import Fixture


class ParseTests(SynchronousTestCase):
    """Every scheme, its default port, and the mistakes people make."""

    def test_schemes(self) -> None:
        """Each scheme parses with its default port; ws paths default to '/'."""
        self.assertEqual(
            parseAddress("ssh://gc.example"), Address("ssh://gc.example", "ssh", "gc.example", 22)
        )
        self.assertEqual(parseAddress("tls://gc.example").port, 443)
        self.assertEqual(parseAddress("wss://gc.example/tunnel").path, "/tunnel")
        self.assertEqual(parseAddress("ws://gc.example").path, "/")
        self.assertEqual(parseAddress("ws://gc.example").port, 80)
        self.assertEqual(parseAddress("tor://abc.onion").port, 22)
        self.assertEqual(parseAddress("TLS://GC.example:8443").port, 8443)
        self.assertEqual(parseAddress("ssh://[::1]:2222").host, "::1")

    def test_endpointStrings(self) -> None:
        """Anything without '://' is an endpoint string, passed through as is."""
        self.assertEqual(parseAddress("tcp:127.0.0.1:22").scheme, "endpoint")
        self.assertFalse(parseAddress("tcp:127.0.0.1:22").isURL)

    def test_errors(self) -> None:
        """Unknown schemes, missing hosts, bad ports, paths and credentials are refused."""
        for bad in (
            "http://gc.example",
            "ssh://",
            "ssh://gc.example:99999",
            "ssh://gc.example:x",
            "tls://gc.example/path",
            "wss://user:pw@gc.example/tunnel",
            "wss://gc.example/tunnel?x=1",
            "",
        ):
            self.assertRaises(AddressError, parseAddress, bad)

    def test_serverOnAllInterfaces(self) -> None:
        """A listen address may leave out the host (all interfaces)."""
        self.assertEqual(parseAddress("tls://:8443").host, "")
        self.assertEqual(serverEndpointString("ssh://:2222"), "tcp:2222")

    def test_endpointStringForms(self) -> None:
        """ssh:// maps to tcp endpoint strings; IPv6 colons are escaped."""
        self.assertEqual(clientEndpointString("ssh://gc.example"), "tcp:gc.example:22")
        self.assertEqual(clientEndpointString("ssh://[::1]:2"), "tcp:\\:\\:1:2")
        self.assertEqual(serverEndpointString("ssh://127.0.0.1:0"), "tcp:0:interface=127.0.0.1")
        self.assertRaises(AddressError, clientEndpointString, "tls://gc.example")

    def test_defaultServers(self) -> None:
        """The default list holds the ssh, tls and wss forms of the production host."""
        self.assertEqual([parseAddress(a).scheme for a in DEFAULT_SERVERS], ["ssh", "tls", "wss"])
        self.assertEqual(
            {parseAddress(a).host for a in DEFAULT_SERVERS}, {"groundcontrol.osoximeter.com"}
        )


class ListenerTests(SynchronousTestCase):
    """What serverListener builds for each scheme."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        fixture = Fixture(self.directory)
        self.tls = ServerTLS(fixture.serverCert, fixture.serverKey, fixture.caFile)
        self.factory = Factory.forProtocol(Protocol)

    def test_ssh(self) -> None:
        """ssh:// is TCP, no wrapping."""
        listener = serverListener(self.reactor, "ssh://127.0.0.1:0")
        self.assertIsInstance(listener.endpoint, endpoints.TCP4ServerEndpoint)
        self.assertIs(listener.wrapFactory(self.factory), self.factory)
        self.assertEqual(listener.transport, "ssh")

    def test_tls(self) -> None:
        """tls:// wraps the SSH factory in TLS."""
        listener = serverListener(self.reactor, "tls://127.0.0.1:0", self.tls)
        wrapped = listener.wrapFactory(self.factory)
        self.assertIsInstance(wrapped, TLSMemoryBIOFactory)
        self.assertIs(wrapped.wrappedFactory, self.factory)

    def test_wss(self) -> None:
        """wss:// is TLS around WebSocket around SSH."""
        listener = serverListener(self.reactor, "wss://127.0.0.1:0/tunnel", self.tls)
        wrapped = listener.wrapFactory(self.factory)
        self.assertIsInstance(wrapped, TLSMemoryBIOFactory)
        self.assertIsInstance(wrapped.wrappedFactory, WebSocketServerFactory)
        self.assertEqual(wrapped.wrappedFactory.path, "/tunnel")

    def test_ws(self) -> None:
        """ws:// is WebSocket without TLS (for a TLS-terminating balancer in front)."""
        wrapped = serverListener(self.reactor, "ws://127.0.0.1:0/t").wrapFactory(self.factory)
        self.assertIsInstance(wrapped, WebSocketServerFactory)

    def test_tlsNeedsCertificate(self) -> None:
        """tls:// and wss:// without certificate settings are a usage error."""
        self.assertRaises(AddressError, serverListener, self.reactor, "tls://127.0.0.1:0")
        self.assertRaises(AddressError, serverListener, self.reactor, "wss://127.0.0.1:0/t")

    def test_tor(self) -> None:
        """tor:// publishes an onion service on the given public port."""
        listener = serverListener(
            self.reactor, "tor://:22", tor=TorSettings(control="tcp:127.0.0.1:1")
        )
        self.assertIsInstance(listener.endpoint, OnionServerEndpoint)
        self.assertEqual(listener.endpoint.publicPort, 22)  # type: ignore[attr-defined]

    def test_endpointString(self) -> None:
        """Raw endpoint strings still work; bad ones are an AddressError."""
        listener = serverListener(self.reactor, "tcp:0:interface=127.0.0.1")
        self.assertIsInstance(listener.endpoint, endpoints.TCP4ServerEndpoint)
        self.assertRaises(AddressError, serverListener, self.reactor, "nonsense:1")


class ConnectorTests(SynchronousTestCase):
    """What clientConnector builds: TLS by name, WebSocket, proxy, Tor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = Factory.forProtocol(Protocol)
        self.proxy = ProxySettings(httpsProxy="http://u:secret@proxy:3128", noProxy="internal")

    def test_ssh(self) -> None:
        """ssh:// dials the host name (happy eyeballs), no wrapping."""
        connector = clientConnector(self.reactor, "ssh://gc.example:2222")
        self.assertIsInstance(connector.endpoint, endpoints.HostnameEndpoint)
        self.assertIs(connector.wrapFactory(self.factory), self.factory)

    def test_wssThroughProxy(self) -> None:
        """wss:// goes through the HTTPS proxy, TLS inside the tunnel; credentials not shown."""
        connector = clientConnector(
            self.reactor, "wss://gc.example/tunnel", ClientTLS(), self.proxy
        )
        inner = connector.endpoint.inner  # type: ignore[attr-defined]
        self.assertIsInstance(inner, HTTPConnectEndpoint)
        self.assertEqual((inner.host, inner.port), ("gc.example", 443))
        self.assertEqual(connector.endpoint.hostname, "gc.example")  # type: ignore[attr-defined]
        self.assertIsInstance(connector.wrapFactory(self.factory), WebSocketClientFactory)
        self.assertNotIn("secret", connector.description)
        self.assertIn("proxy:3128", connector.description)

    def test_noProxyGoesDirect(self) -> None:
        """A NO_PROXY host is dialled directly."""
        connector = clientConnector(self.reactor, "wss://gc.internal/t", None, self.proxy)
        self.assertIsInstance(connector.endpoint.inner, endpoints.HostnameEndpoint)  # type: ignore[attr-defined]

    def test_tlsNotProxied(self) -> None:
        """tls:// and ssh:// never use the HTTP proxy."""
        connector = clientConnector(self.reactor, "tls://gc.example", None, self.proxy)
        self.assertIsInstance(connector.endpoint.inner, endpoints.HostnameEndpoint)  # type: ignore[attr-defined]

    def test_tor(self) -> None:
        """tor:// dials through tor's SOCKS port with our SOCKS5 client, the name unresolved."""
        from accesstunnel.transports.socks import SOCKS5Endpoint

        connector = clientConnector(self.reactor, "tor://abcdef.onion:2222", tor=TorSettings())
        self.assertIsInstance(connector.endpoint, SOCKS5Endpoint)
        self.assertEqual((connector.endpoint.host, connector.endpoint.port), ("abcdef.onion", 2222))  # type: ignore[attr-defined]
        self.assertEqual(connector.transport, "tor")
