"""
Addresses are URLs for people and Twisted endpoints underneath (DESIGN.md decision 2).

| address | what travels | default port |
|---|---|---|
| C{ssh://HOST[:PORT]} | SSH over TCP | 22 |
| C{tls://HOST[:PORT]} | SSH inside TLS (mutual fleet certificates) | 443 |
| C{wss://HOST[:PORT]/PATH} | SSH in binary WebSocket messages inside TLS | 443 |
| C{ws://HOST[:PORT]/PATH} | the same without TLS (behind a TLS-terminating balancer) | 80 |
| C{tor://ONION[:PORT]} | SSH through tor to an onion service | 22 |

Anything without C{://} is a Twisted endpoint string (C{tcp:HOST:PORT} for clients,
C{tcp:PORT:interface=HOST} for servers). The agent side builds a L{Connector}, the server
side a L{Listener}: an endpoint plus the factory wrapper (TLS, WebSocket) the URL implies, so
the SSH code never knows how its bytes travel. Their TCP connections write through (see
L{accesstunnel.writethrough}) from the start, whatever travels inside them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.protocols.policies import WrappingFactory
from zope.interface import implementer

from accesstunnel.writethrough import writeThroughTCP

if TYPE_CHECKING:
    from accesstunnel.transports.proxy import ProxySettings
    from accesstunnel.transports.tls import ClientTLS, ServerTLS
    from accesstunnel.transports.tor import TorSettings

# Each transport module is imported only when an address needs it: tor (txtorcon) and
# WebSocket (autobahn, cffi) are about 10 MB of an agent's RSS that dials ssh://; TLS and
# the HTTP CONNECT proxy are imported at the first tls://, ws:// or wss:// connect or listen.
# (Twisted's reactor imports pyOpenSSL by itself, so TLS costs our modules only.)

__all__ = [
    "DEFAULT_SERVERS",
    "Address",
    "AddressError",
    "ClientTLS",
    "Connector",
    "Listener",
    "ProxySettings",
    "ServerTLS",
    "TorSettings",
    "clientConnector",
    "clientEndpoint",
    "clientEndpointString",
    "describeAddress",
    "hostPort",
    "parseAddress",
    "serverEndpointString",
    "serverListener",
]

#: The URL schemes understood here, each with its port when the URL names none; anything
#: else containing "://" is an error.
DEFAULT_PORTS = {"ssh": 22, "tls": 443, "wss": 443, "ws": 80, "tor": 22}

#: Where an agent looks when it is given no server at all: every transport, most direct
#: first, so a device on a locked-down network still gets out.
DEFAULT_SERVER_HOST = "groundcontrol.osoximeter.com"
DEFAULT_SERVERS = (
    f"ssh://{DEFAULT_SERVER_HOST}",
    f"tls://{DEFAULT_SERVER_HOST}",
    f"wss://{DEFAULT_SERVER_HOST}/tunnel",
)

FactoryWrapper = Callable[[IProtocolFactory], IProtocolFactory]

#: How long one connect to an onion service may take. Tor fetches the service's descriptor
#: and builds an introduction and a rendezvous circuit before it answers the SOCKS request,
#: and a first connect on a slow network takes well over the 15 s other addresses get;
#: cutting it short would throw that work away on every attempt. Tor reports its own
#: failures at once (SOCKS reply codes), and gives up by itself after 120 s (SocksTimeout).
TOR_ATTEMPT_TIMEOUT = 60.0

#: The listen backlog of groundcontrol's TCP ports (Twisted's default is 50; Linux caps
#: it at net.core.somaxconn, 4096 by default). In a reconnect storm connections the
#: server is not accepting yet wait here; past it the kernel drops SYNs and clients retry
#: after 1, 3, 7... s. An endpoint string that names its own backlog keeps it.
LISTEN_BACKLOG = 1024


#: Settings classes re-exported here, each imported (with its transport) on first use.
_LAZY = {
    "ClientTLS": "accesstunnel.transports.tls",
    "ServerTLS": "accesstunnel.transports.tls",
    "ProxySettings": "accesstunnel.transports.proxy",
    "TorSettings": "accesstunnel.transports.tor",
}


def __getattr__(name: str) -> Any:
    """The settings classes in L{_LAZY}, imported when first asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class AddressError(ValueError):
    """An address that is neither a known URL nor an endpoint string."""


@attrs.frozen
class Address:
    """
    A parsed address.

    @ivar scheme: a URL scheme from L{DEFAULT_PORTS}, or C{"endpoint"} for an endpoint string.
    @ivar host: the host (C{None} for endpoint strings; C{""} for a server on all interfaces).
    @ivar path: the WebSocket path (C{"/"} if none was given); C{""} for other schemes.
    """

    text: str
    scheme: str
    host: str | None = None
    port: int | None = None
    path: str = ""

    @property
    def isURL(self) -> bool:
        return self.scheme != "endpoint"


def parseAddress(address: str) -> Address:
    """
    Parse an address as people write it.

    @raise AddressError: an unknown scheme, a URL without a host, a bad port, or a path on
        a scheme that has none.
    """
    address = address.strip()
    if not address:
        raise AddressError("empty address")
    if "://" not in address:
        return Address(address, "endpoint")
    scheme = address.split("://", 1)[0].lower()
    if scheme not in DEFAULT_PORTS:
        raise AddressError(f"unsupported address scheme {scheme!r} in {address!r}")
    parts = urlsplit(address)
    if parts.username is not None or parts.password is not None:
        raise AddressError(f"{address!r}: credentials do not belong in a server address")
    if parts.query or parts.fragment:
        raise AddressError(f"{address!r}: no query or fragment is understood")
    try:
        port = parts.port if parts.port is not None else DEFAULT_PORTS[scheme]
    except ValueError:
        raise AddressError(f"{address!r} has a bad port{bracketsHint(parts.netloc)}") from None
    host = parts.hostname or ""
    if "%" in host:  # an IPv6 zone, escaped in URLs (RFC 6874): [fe80::1%25eth0]
        host = unquote(host)
    if not host and not parts.netloc.startswith(":"):
        raise AddressError(f"{address!r} has no host")
    path = ""
    if scheme in ("ws", "wss"):
        path = parts.path or "/"
    elif parts.path not in ("", "/"):
        raise AddressError(f"{address!r}: {scheme}:// addresses have no path")
    return Address(address, scheme, host, port, path)


def bracketsHint(netloc: str) -> str:
    """For a bad-port message: an unbracketed IPv6 address reads as host:port:port."""
    hostPart = netloc.rpartition("@")[2]
    if hostPart.count(":") > 1 and not hostPart.startswith("["):
        return " (write an IPv6 address in brackets: [2001:db8::1]:22)"
    return ""


def _escape(host: str) -> str:
    # Endpoint strings separate fields with ':'; IPv6 literals need escaping.
    return host.replace(":", "\\:")


def _urlHost(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def hostPort(host: str, port: int | str) -> str:
    """
    C{host:port} as people and URLs write it: an IPv6 literal in brackets (C{[::1]:22}),
    so the port cannot be read as part of the address.
    """
    return f"{_urlHost(host)}:{port}"


def describeAddress(peer: Any) -> str:
    """
    A connection's address for logs and records: C{host:port} by L{hostPort}, an
    IPv4-mapped IPv6 address (an IPv4 peer of a dual-stack C{[::]} listener) as the IPv4
    address it is, anything without a host (a UNIX socket) as it prints.
    """
    peer = getattr(peer, "address", peer)  # Conch wraps it in SSHTransportAddress
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None:
        return str(peer)
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        host = str(mapped) if mapped is not None else host
    return hostPort(host, port) if port is not None else str(host)


def sourceNetwork(host: str) -> str:
    """
    The source that limits count as one: an IPv4 address, an IPv4-mapped IPv6 address as
    that IPv4 address, an IPv6 address as its /64 (one host, or one customer, typically
    holds a whole /64 and can rotate through it), anything else as it is given. The
    handshake limiter, the login penalties and the pending-device cap all count by it.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def clientEndpointString(address: str) -> str:
    """
    The Twisted client endpoint string of a plain-TCP address (C{ssh://} or an endpoint
    string); other schemes need L{clientConnector}.
    """
    parsed = parseAddress(address)
    if parsed.scheme == "endpoint":
        return address
    if parsed.scheme == "ssh" and parsed.host:
        return f"tcp:{_escape(parsed.host)}:{parsed.port}"
    raise AddressError(f"{address!r} needs a connector, not an endpoint string")


def serverEndpointString(address: str) -> str:
    """The Twisted server endpoint string of C{ssh://} or an endpoint string."""
    parsed = parseAddress(address)
    if parsed.scheme == "endpoint":
        return address
    if parsed.scheme == "ssh":
        return _tcpServerString(parsed)
    raise AddressError(f"{address!r} needs a listener, not an endpoint string")


def _tcpServerString(parsed: Address) -> str:
    interface = f":interface={_escape(parsed.host)}" if parsed.host else ""
    return f"tcp:{parsed.port}{interface}"


def _withBacklog(endpoint: str) -> str:
    """A TCP server endpoint string with L{LISTEN_BACKLOG} unless it names a backlog."""
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={LISTEN_BACKLOG}"
    return endpoint


def _isIPv6Wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        return False


def _tcpServerEndpoint(reactor: Any, parsed: Address, alongside: Iterable[str]) -> Any:
    """The TCP listener under a URL address (IPv6-only for C{[::]} next to C{0.0.0.0})."""
    if _isIPv6Wildcard(parsed.host or ""):
        from accesstunnel.transports.dualstack import IPv6OnlyEndpoint, ipv4WildcardPorts

        assert parsed.port is not None
        if parsed.port in ipv4WildcardPorts(alongside):
            return IPv6OnlyEndpoint(reactor, parsed.port, LISTEN_BACKLOG)
    tcpReactor = writeThroughTCP(reactor)
    return endpoints.serverFromString(tcpReactor, _withBacklog(_tcpServerString(parsed)))


#: An IPv6 literal in brackets inside an endpoint string (tcp:[::1]:9050).
_BRACKETED_IPV6 = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[^\]]+)?)\]")


def _fromString(
    parse: Callable[[Any, str], Any],
    reactor: Any,
    description: str,
    adjust: Callable[[str], str] = lambda text: text,
) -> Any:
    """
    A Twisted endpoint string parsed, with an IPv6 literal allowed in brackets as in every
    other address here (Twisted wants C{tcp:\\:\\:1:9050}); a bad string is an
    L{AddressError} that quotes it (a usage error), not a TypeError traceback.
    """
    text = _BRACKETED_IPV6.sub(lambda m: _escape(m.group(1)), description.strip())
    try:
        return parse(reactor, adjust(text))
    except (ValueError, TypeError, KeyError) as e:
        raise AddressError(f"bad endpoint string {description!r}: {e}") from None


def clientEndpoint(reactor: Any, description: str) -> IStreamClientEndpoint:
    """
    A client endpoint string (C{--tor-socks}, C{--tor-control}, an agent's C{tcp:} server)
    as Twisted reads it, but C{tcp:[::1]:9050} works.

    @raise AddressError: the string is not one.
    """
    return cast(
        IStreamClientEndpoint, _fromString(endpoints.clientFromString, reactor, description)
    )


def _identity(factory: IProtocolFactory) -> IProtocolFactory:
    return factory


@attrs.frozen
class Listener:
    """
    Where groundcontrol listens, and how: listen on C{endpoint} with
    C{wrapFactory(sshFactory)}.

    @ivar transport: the scheme (C{"ssh"}, C{"tls"}, ...), for logs and C{ctl ls}.
    """

    endpoint: IStreamServerEndpoint
    wrapFactory: FactoryWrapper
    description: str
    transport: str


@attrs.frozen
class Connector:
    """
    One way for the agent to reach groundcontrol: connect C{endpoint} with
    C{wrapFactory(linkFactory)}.

    @ivar description: the address as given (no credentials: a proxy is named by host only).
    @ivar transport: the scheme, shown by the server's C{ctl ls} and the agent's status.
    @ivar attemptTimeout: seconds one connect on this address may take before the next
        address is tried; C{None}: the failover endpoint's own (15 s).
    @ivar address: the server address alone, without the proxy the description names
        (what the agent remembers as the address that worked); C{None}: the description.
    """

    endpoint: IStreamClientEndpoint
    wrapFactory: FactoryWrapper
    description: str
    transport: str
    attemptTimeout: float | None = None
    address: str | None = None


def serverListener(
    reactor: Any,
    address: str,
    tls: ServerTLS | None = None,
    tor: TorSettings | None = None,
    alongside: Iterable[str] = (),
) -> Listener:
    """
    Build groundcontrol's listener for C{address}.

    C{tls://} and C{wss://} need C{tls} (certificate, key, fleet CA); C{tor://[:PORT]}
    publishes an onion service through C{tor}'s control port (its host part is ignored: the
    onion address comes from the key). C{alongside} is the whole C{--listen} list: an
    C{[::]} listener is IPv6-only when it also has the IPv4 wildcard on that port
    (L{accesstunnel.transports.dualstack}).

    @raise AddressError: the address is malformed or needs settings that were not given.
    @raise accesstunnel.transports.tls.TLSConfigError: a certificate or key is unusable.
    """
    parsed = parseAddress(address)
    scheme = parsed.scheme
    tcpReactor = writeThroughTCP(reactor)
    if scheme == "endpoint":
        endpoint = _fromString(endpoints.serverFromString, tcpReactor, address, _withBacklog)
        return Listener(endpoint, _identity, address, "tcp")
    if scheme == "tor":
        from accesstunnel.transports.tor import OnionServerEndpoint, TorSettings

        assert parsed.port is not None
        return Listener(
            OnionServerEndpoint(tcpReactor, parsed.port, tor or TorSettings()),
            _identity,
            address,
            "tor",
        )
    tcp = _tcpServerEndpoint(reactor, parsed, alongside)
    if scheme == "ssh":
        return Listener(tcp, _identity, address, scheme)
    wrappers: list[FactoryWrapper] = []
    if scheme in ("tls", "wss"):
        if tls is None:
            raise AddressError(f"{address!r} needs a TLS certificate and key")
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from accesstunnel.transports.tls import serverContextFactory

        context = serverContextFactory(tls)
        wrappers.append(lambda f: TLSMemoryBIOFactory(context, False, f, clock=reactor))
    if scheme in ("ws", "wss"):
        # No port in the URL: autobahn refuses port 0, and behind a balancer the public port
        # differs anyway (autobahn checks the Host header's port only if told one).
        url = f"{scheme}://{_urlHost(parsed.host or 'localhost')}{parsed.path}"
        path = parsed.path
        from accesstunnel.transports.websocket import WebSocketServerFactory

        wrappers.append(lambda f: WebSocketServerFactory(f, url, path, reactor=reactor))

    def wrap(factory: IProtocolFactory) -> IProtocolFactory:
        # Innermost first: WebSocket around SSH, TLS around WebSocket.
        for wrapper in reversed(wrappers):
            factory = wrapper(factory)
        return factory

    return Listener(tcp, wrap, address, scheme)


def clientConnector(
    reactor: Any,
    address: str,
    tls: ClientTLS | None = None,
    proxy: ProxySettings | None = None,
    tor: TorSettings | None = None,
) -> Connector:
    """
    Build the agent's connector for C{address}.

    C{ws://} and C{wss://} go through the HTTP CONNECT proxy that C{proxy} names for the
    host (C{NO_PROXY} honoured); C{tls://} and C{wss://} verify the server by host name
    against C{tls.caFile} or the system roots and present the device certificate if there is
    one; C{tor://} dials through C{tor}'s SOCKS port.

    @raise AddressError: the address is malformed.
    """
    parsed = parseAddress(address)
    scheme = parsed.scheme
    tcpReactor = writeThroughTCP(reactor)
    if scheme == "endpoint":
        endpoint = clientEndpoint(tcpReactor, address)
        return Connector(endpoint, _identity, address, "tcp")
    host, port = parsed.host, parsed.port
    if not host:
        raise AddressError(f"{address!r} has no host")
    assert port is not None
    if scheme == "tor":
        from accesstunnel.transports.tor import TorSettings, onionClientEndpoint

        try:
            endpoint = onionClientEndpoint(tcpReactor, host, port, tor or TorSettings())
        except ValueError as e:  # a name SOCKS cannot carry, or a bad --tor-socks
            raise AddressError(f"{address!r}: {e}") from None
        return Connector(endpoint, _identity, address, "tor", TOR_ATTEMPT_TIMEOUT)
    description = address
    try:
        proxyURL = proxy.proxyFor(scheme, host, port) if proxy and scheme in ("ws", "wss") else None
    except ValueError as e:  # an unusable HTTPS_PROXY or --proxy: say which, not a traceback
        raise AddressError(f"{address!r}: {e}") from None
    if proxyURL is not None:
        from accesstunnel.transports.proxy import HTTPConnectEndpoint

        endpoint = HTTPConnectEndpoint.create(tcpReactor, proxyURL, host, port)
        description = f"{address} via proxy {hostPort(proxyURL.host, proxyURL.port)}"
    else:
        endpoint = endpoints.HostnameEndpoint(tcpReactor, host, port)
    if scheme in ("tls", "wss"):
        endpoint = _LazyTLSEndpoint(host, tls, endpoint, reactor)
    wrap: FactoryWrapper = _identity
    if scheme in ("ws", "wss"):
        url = f"{scheme}://{_urlHost(host)}:{port}{parsed.path}"
        from accesstunnel.transports.websocket import WebSocketClientFactory

        def wrap(factory: IProtocolFactory) -> IProtocolFactory:
            return WebSocketClientFactory(factory, url, reactor=reactor)

    return Connector(endpoint, wrap, description, scheme, address=address)


@implementer(IStreamClientEndpoint)
class _LazyTLSEndpoint:
    """
    TLS over C{inner}, with the options built at each connect: the device certificate may
    appear or be renewed on disk while the agent runs.

    A certificate the server refuses in the handshake (revoked, say, before an admin
    approved the device again) would lock the device out for good if it were presented
    at every attempt. So after a connection that presented the certificate ends without
    ever carrying data, the next attempt goes without it: the device then logs in by its
    key alone, and is refused, queued as pending, or given a fresh certificate, as its
    record says.
    """

    def __init__(
        self,
        hostname: str,
        settings: ClientTLS | None,
        inner: IStreamClientEndpoint,
        clock: IReactorTime | None = None,
    ):
        self.hostname = hostname
        self.settings = settings
        self.inner = inner
        self.clock = clock  # TLS schedules its write flushes here (None: the global reactor)
        self.withoutCertificateNext = False

    def connect(self, protocolFactory: IProtocolFactory) -> Any:
        from accesstunnel.transports import tls as _tls

        presentCertificate = not self.withoutCertificateNext
        self.withoutCertificateNext = False
        try:
            creator = _tls.clientCreator(
                self.hostname, self.settings, presentCertificate=presentCertificate
            )
        except _tls.TLSConfigError:
            return defer.fail()
        factory: IProtocolFactory = protocolFactory
        if presentCertificate and _tls.wouldPresentCertificate(self.settings):
            factory = _WatchHandshake(protocolFactory, self)
        # What endpoints.wrapClientTLS does, but with TLSMemoryBIOFactory imported now: the
        # endpoints module decided at import whether it has TLS, and agent/launcher.py
        # imports it before pyOpenSSL so that an agent dialling no TLS never loads it.
        from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

        def unwrapped(protocol: IProtocol) -> IProtocol:
            return cast(TLSMemoryBIOProtocol, protocol).wrappedProtocol

        connecting = self.inner.connect(
            TLSMemoryBIOFactory(creator, True, factory, clock=self.clock)
        )
        return connecting.addCallback(unwrapped)


class _WatchHandshake(WrappingFactory):
    """
    Notice a TLS connection that closed before any data reached the link protocol.

    It watches the protocol C{wrappedFactory} builds in place instead of putting a
    ProtocolWrapper under it: that protocol's transport must be the TLSMemoryBIOProtocol
    itself. A wrapper there claims every interface of the TLS transport (ISSLTransport
    too) without being one, and autobahn's WebSocket client asks such a transport for its
    TLS channel binding in connectionMade and raises: every wss:// attempt that presented
    the device certificate died without a word on the wire (the attempt timed out), and
    the next one went without the certificate.
    """

    def __init__(self, wrappedFactory: IProtocolFactory, endpoint: _LazyTLSEndpoint) -> None:
        super().__init__(wrappedFactory)
        self._endpoint = endpoint

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        gotData = False
        received, lost = protocol.dataReceived, protocol.connectionLost

        def dataReceived(data: bytes) -> None:
            nonlocal gotData
            gotData = True
            protocol.dataReceived = received  # seen: later reads go straight in
            received(data)

        def connectionLost(reason: Any) -> None:
            if not gotData:
                self._endpoint.withoutCertificateNext = True
            lost(reason)

        protocol.dataReceived = dataReceived  # type: ignore[method-assign]
        protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        return protocol
