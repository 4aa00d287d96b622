"""
SSH in binary WebSocket frames (autobahn), so the link passes HTTP load balancers and
proxies that only speak HTTP(S).

autobahn's wrapping factories do the framing; the subclasses here only fix what a wrapped
SSH transport needs from its transport: C{makeConnection} (so protocol wrappers in between see
the connection), C{abortConnection} (keepalive and grace timers use it),
C{getPeerCertificate} (the TLS below), and a connection lost before the WebSocket opened,
which the wrapped protocol never saw begin and must not see end.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    WrappingWebSocketClientFactory,
    WrappingWebSocketClientProtocol,
    WrappingWebSocketServerFactory,
    WrappingWebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from accesstunnel.transports.tlsreasons import (
    connectionUnder,
    openSSLWords,
    tlsFailureText,
    webSocketRefusalText,
)

__all__ = ["SUBPROTOCOL", "WebSocketClientFactory", "WebSocketServerFactory"]

_log = Logger()

#: Offered and required: SSH bytes ride as binary messages, never base64 text.
SUBPROTOCOL = "binary"

#: Largest WebSocket frame we send; SSH packets are at most 35000 bytes in practice.
FRAGMENT_SIZE = 32 * 1024

#: Largest message accepted from the peer before the WebSocket is failed (bounded memory).
MAX_MESSAGE = 256 * 1024


class _AdapterFixes:
    """What both ends' protocols add to autobahn's wrapping adapter."""

    _proto: Any
    transport: Any
    _opened = False
    _connectionLost: Any  # autobahn's: what its connectionLost does after its line

    def onOpen(self) -> None:
        self._opened = True
        self._proto.makeConnection(self)

    #: Why the connection under the WebSocket ended (the TLS failure, if any), kept for
    #: L{onClose}: autobahn hands it only a text, C{SSL error: WORDS (in )} (pyOpenSSL names
    #: no function) or, for a certificate made out to another name, none of the reason.
    _lostBecause: Failure | None = None

    #: The level of the line about a TLS failure below the WebSocket (autobahn's was an
    #: error, with "(in )"): info at groundcontrol, one per client that failed TLS.
    _tlsFailureLevel = LogLevel.info

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lostBecause = reason
        if not isinstance(reason.value, SSL.Error):
            super().connectionLost(reason)  # type: ignore[misc]  # autobahn's, beside this
            return
        _log.emit(
            self._tlsFailureLevel,
            "TLS under the WebSocket with {peer} failed: {why}",
            peer=getattr(self, "peer", "?"),
            why=self._saidOfTLS(reason.value),
        )
        self._connectionLost(reason)  # what autobahn's connectionLost does after its line

    def _saidOfTLS(self, e: SSL.Error) -> str:
        """A TLS failure as this end says it: groundcontrol in OpenSSL's words."""
        return openSSLWords(e)

    def _whyNotOpened(self, code: int | None, reason: str | None) -> str:
        """Why the WebSocket did not open, in words (accesstunnel.transports.tlsreasons)."""
        if self._lostBecause is not None:
            tls = tlsFailureText(self._lostBecause.value, connectionUnder(self.transport))
            if tls is not None:
                return tls
        refused = webSocketRefusalText(reason or "")
        return f"WebSocket did not open: {refused or reason or code}"

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._opened:
            self._opened = False
            self._proto.connectionLost(Failure(ConnectionError(f"WebSocket closed: {reason}")))
            return
        # The wrapped protocol never started; tell its factory, if it wants to know (the
        # agent's failover moves on to the next address at once instead of timing out).
        failed = getattr(self.factory._factory, "transportFailed", None)  # type: ignore[attr-defined]
        if failed is not None:
            failed(Failure(ConnectionError(self._whyNotOpened(code, reason))))

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        # The SSH transports turn TCP keepalive on through their transport; over WebSocket
        # that is this adapter, so pass it down to the socket (through TLS, if any).
        setter = getattr(self.transport, "setTcpKeepAlive", None)
        if setter is not None:
            setter(enabled)

    def setTcpNoDelay(self, enabled: bool) -> None:
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(enabled)

    def getPeerCertificate(self) -> Any:
        getter = getattr(self.transport, "getPeerCertificate", None)
        return getter() if getter is not None else None


# autobahn's two bases of its wrapping protocols declare peer and _transport_details apart.
class _ServerProtocol(_AdapterFixes, WrappingWebSocketServerProtocol):  # type: ignore[misc]
    _log = Logger()

    def onConnect(self, request: Any) -> Any:
        expected = self.factory.path  # type: ignore[attr-defined]
        if isinstance(request, ConnectionRequest) and request.path != expected:
            self._log.info(
                "refused WebSocket on {path} from {peer}", path=request.path, peer=request.peer
            )
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "no such path")
        return super().onConnect(request)


class _ClientProtocol(_AdapterFixes, WrappingWebSocketClientProtocol):  # type: ignore[misc]
    # The agent's line about the address it could not reach says it already.
    _tlsFailureLevel = LogLevel.debug

    def _saidOfTLS(self, e: SSL.Error) -> str:
        return tlsFailureText(e, connectionUnder(self.transport)) or openSSLWords(e)


def _commonOptions(factory: Any) -> None:
    factory.setProtocolOptions(
        autoFragmentSize=FRAGMENT_SIZE,
        maxMessagePayloadSize=MAX_MESSAGE,
        maxFramePayloadSize=MAX_MESSAGE,
        # SSH has its own keepalives; WebSocket pings would only add a second opinion.
        autoPingInterval=0,
        openHandshakeTimeout=30,
        closeHandshakeTimeout=5,
    )


def _buildWrapping(factory: Any, addr: Any) -> Any:
    """C{buildProtocol} of both factories: a WebSocket protocol around the wrapped one."""
    proto = factory.protocol()
    proto.factory = factory
    proto._proto = factory._factory.buildProtocol(addr)
    return proto


class WebSocketServerFactory(WrappingWebSocketServerFactory):  # type: ignore[misc]
    """Serve the wrapped factory's protocol in binary WebSocket messages on one path."""

    protocol = _ServerProtocol

    def __init__(self, factory: IProtocolFactory, url: str, path: str, reactor: Any = None):
        # No permessage-deflate: SSH is encrypted, so compression costs CPU and saves nothing.
        super().__init__(factory, url, reactor=reactor, enableCompression=False)
        self._subprotocols = [SUBPROTOCOL]
        self.protocols = [SUBPROTOCOL]
        self.path = path
        _commonOptions(self)

    buildProtocol = _buildWrapping


class WebSocketClientFactory(WrappingWebSocketClientFactory):  # type: ignore[misc]
    """Carry the wrapped factory's protocol in binary WebSocket messages to C{url}."""

    protocol = _ClientProtocol

    def __init__(self, factory: IProtocolFactory, url: str, reactor: Any = None):
        super().__init__(factory, url, reactor=reactor, enableCompression=False)
        self._subprotocols = [SUBPROTOCOL]
        self.protocols = [SUBPROTOCOL]
        _commonOptions(self)

    buildProtocol = _buildWrapping
