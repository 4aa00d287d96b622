"""Tests for accesstunnel.addresses: URL parsing, and the listeners and connectors they build."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import txaio
from twisted.internet import endpoints, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

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
from accesstunnel.writethrough import WriteThroughClient, WriteThroughPort, WriteThroughServer
from tests.test_transports_tls import Fixture
from tests.test_writethrough import privateReactor


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


@implementer(IHostResolution)
class Resolution:
    """One finished resolution: nothing to cancel."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class LiteralResolver:
    """Resolves an address literal at once (no thread pool, no DNS)."""

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolutionReceiver.addressResolved(IPv4Address("TCP", hostName, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class WriteThroughTests(SynchronousTestCase):
    """
    Every TCP connection a listener accepts or a connector makes writes through from
    the start, under whatever travels inside it (TLS, WebSocket, an HTTP proxy's
    tunnel): proved on a real reactor of the test's own, on loopback, driven by hand.
    """

    def setUp(self) -> None:
        self.reactor = privateReactor(self)
        self.reactor.installNameResolver(LiteralResolver())
        # autobahn schedules its WebSocket timers through txaio's loop: this reactor's for
        # the length of the test, so none is left behind on the global reactor.
        self.patch(txaio.config, "loop", self.reactor)
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        fixture = Fixture(self.directory)
        self.serverCert, self.serverKey = fixture.serverCert, fixture.serverKey
        self.serverTLS = ServerTLS(fixture.serverCert, fixture.serverKey, fixture.caFile)
        self.clientTLS = ClientTLS(caFile=fixture.caFile)
        self.factory = Factory.forProtocol(Protocol)

    def test_listeners(self) -> None:
        """ssh://, tls://, wss://, ws:// and tcp: and ssl: endpoint strings listen on a
        port whose accepted connections are WriteThroughServers."""
        for address in (
            "ssh://127.0.0.1:0",
            "tls://127.0.0.1:0",
            "wss://127.0.0.1:0/tunnel",
            "ws://127.0.0.1:0/tunnel",
            "tcp:0:interface=127.0.0.1",
            f"ssl:0:interface=127.0.0.1:privateKey={self.serverKey}:certKey={self.serverCert}",
        ):
            listener = serverListener(self.reactor, address, self.serverTLS)
            port = self.successResultOf(
                listener.endpoint.listen(listener.wrapFactory(self.factory))
            )
            self.assertIsInstance(port, WriteThroughPort, address)
            self.assertIs(port.transport, WriteThroughServer)  # type: ignore[attr-defined]
            peer = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
            self.addCleanup(peer.close)
            port.doRead()  # type: ignore[attr-defined]
            accepted = [r for r in self.reactor.getReaders() if isinstance(r, tcp.Server)]
            self.assertEqual([type(r) for r in accepted], [WriteThroughServer], address)
            for selectable in [port, *accepted]:
                self.reactor.removeReader(selectable)  # type: ignore[arg-type]
                selectable.socket.close()  # type: ignore[attr-defined]

    def test_connectors(self) -> None:
        """ssh://, tls://, ws:// and wss:// (direct and through an HTTP proxy) and tcp: and
        ssl: endpoint strings connect a WriteThroughClient, and nothing else, over TCP."""
        listening = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        proxy = ProxySettings(httpsProxy=f"http://127.0.0.1:{port}")
        for address, settings in (
            (f"ssh://127.0.0.1:{port}", None),
            (f"tls://127.0.0.1:{port}", None),
            (f"ws://127.0.0.1:{port}/tunnel", None),
            (f"wss://127.0.0.1:{port}/tunnel", None),
            ("wss://gc.example/tunnel", proxy),
            (f"tcp:127.0.0.1:{port}", None),
            (f"ssl:host=127.0.0.1:port={port}", None),
        ):
            connector = clientConnector(self.reactor, address, self.clientTLS, settings)
            connecting = connector.endpoint.connect(connector.wrapFactory(self.factory))
            self.reactor.runUntilCurrent()  # the connect attempt, scheduled for "now"
            clients = [w for w in self.reactor.getWriters() if isinstance(w, tcp.Client)]
            self.assertEqual([type(w) for w in clients], [WriteThroughClient], address)
            connecting.cancel()
            self.failureResultOf(connecting)
            self.assertEqual(self.reactor.getWriters(), [], address)
