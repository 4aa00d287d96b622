"""
Connecting through a proxy that opens a byte stream after a short handshake of its own
(HTTP CONNECT, SOCKS5): speak the handshake, then step aside.

Both share the one part that is easy to get wrong: the proxy's answer and the first bytes
of the far end can arrive in one read. A server that speaks first (an SSH server sends its
version line and KEXINIT at once) then has its opening in the same segment as the proxy's
reply, and those bytes must reach the caller's protocol at once. Holding them until more
data arrives deadlocks SSH: the client waits for the server's KEXINIT, the server for the
client's answer to it. (txtorcon's SOCKS client does hold them, which is why tor:// goes
through L{accesstunnel.transports.socks} instead.)
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer, error
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from accesstunnel.reasontext import reasonText

__all__ = ["ProxyError", "ProxyUnansweredError", "TunnelEndpoint", "TunnelProtocol"]


class ProxyError(ConnectionError):
    """The proxy refused the tunnel or answered something that is not its protocol."""


class ProxyUnansweredError(defer.CancelledError):
    """
    The connect was given up (its timeout) while the proxy, connected, had not answered:
    a cancel like any other (the agent's failover makes it a timeout), whose words say
    what the proxy left unanswered, since "no connection in 15 s" blamed the server.
    """


class TunnelProtocol(Protocol):
    """
    Speaks a proxy's handshake (L{opening}, then L{step} for each answer), then hands the
    connection to the protocol the caller's factory builds: every later byte and event
    goes to it, and bytes that came in the same read as the proxy's last answer are
    delivered to it at once.

    @ivar ready: fires with the caller's protocol once the tunnel is open.
    """

    #: Bytes of proxy answer buffered at most before the tunnel is open (bounded memory).
    maxHandshakeBytes = 16 * 1024

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory
        self._buffer = b""
        self._inner: IProtocol | None = None
        self.ready: defer.Deferred[IProtocol] = defer.Deferred(self._cancel)

    def opening(self) -> bytes:
        """What to send the proxy as soon as the connection to it is made."""
        raise NotImplementedError

    def step(self, buffer: bytes) -> tuple[int, bool]:
        """
        Read the proxy's answer at the start of C{buffer}: how many bytes it took (0 if
        the answer is not complete yet) and whether the tunnel is now open. May write the
        next request. Raises L{ProxyError} when the proxy refuses.
        """
        raise NotImplementedError

    def unanswered(self) -> str | None:
        """
        What the proxy, connected, has left unanswered, in words (C{the proxy P took the
        connection but did not answer the CONNECT}); C{None} to be a plain cancel.
        """
        return None

    def _cancel(self, d: defer.Deferred[IProtocol]) -> None:
        if self.transport is None:
            return
        unanswered = self.unanswered()
        if unanswered is not None:
            d.errback(Failure(ProxyUnansweredError(unanswered)))
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        self.transport.write(self.opening())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        try:
            while self._buffer:
                taken, done = self.step(self._buffer)
                self._buffer = self._buffer[taken:]
                if done:
                    self._open()
                    return
                if not taken:
                    break
        except ProxyError as e:
            self._fail(e)
            return
        if len(self._buffer) > self.maxHandshakeBytes:
            self._fail(ProxyError("the proxy's answer is too long"))

    def _open(self) -> None:
        rest, self._buffer = self._buffer, b""
        transport = self.transport
        assert transport is not None  # called from dataReceived
        inner = self._factory.buildProtocol(transport.getPeer())  # type: ignore[attr-defined]
        if inner is None:
            self._fail(error.ConnectError("the factory refused the connection"))
            return
        self._inner = inner
        inner.makeConnection(transport)
        self.ready.callback(inner)
        if rest and self._inner is inner:
            inner.dataReceived(rest)

    def _fail(self, reason: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(Failure(reason))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.ready.called:
            # Not "...: Connection was closed cleanly": a proxy that hangs up on CONNECT
            # (or SOCKS) without a word says nothing more.
            how = "" if reason.check(error.ConnectionDone) else f": {reasonText(reason.value)}"
            self.ready.errback(
                Failure(ProxyError(f"the proxy closed the connection before it answered{how}"))
            )


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    Connect through a proxy reached by C{proxyEndpoint}; L{buildTunnel} makes the
    L{TunnelProtocol} that speaks its handshake.

    The protocol the caller's factory builds gets the proxy connection's own transport, so
    C{abortConnection}, TCP options and TLS wrapping above all work as on a direct link.
    Cancelling the connect aborts it wherever it is, the handshake included.

    A proxy that cannot be reached fails the connect with a L{ProxyError} naming it
    (C{proxyName}): the agent's log then says "cannot reach tor's SOCKS port ...:
    connection refused", not a bare "connection refused" next to the server's address,
    which points at the server when it is the local tor or proxy that is down.
    """

    def __init__(self, proxyEndpoint: IStreamClientEndpoint, proxyName: str = "the proxy") -> None:
        self.proxyEndpoint = proxyEndpoint
        self.proxyName = proxyName

    def buildTunnel(self, factory: IProtocolFactory) -> TunnelProtocol:
        raise NotImplementedError

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        made: list[TunnelProtocol] = []

        def build() -> TunnelProtocol:
            protocol = self.buildTunnel(protocolFactory)
            made.append(protocol)
            return protocol

        factory: Any = Factory.forProtocol(build)  # type: ignore[arg-type]
        factory.noisy = False  # one per connection attempt
        connecting = self.proxyEndpoint.connect(factory)

        def cancel(d: defer.Deferred[IProtocol]) -> None:
            connecting.cancel()
            for protocol in made:
                protocol.ready.cancel()

        result: defer.Deferred[IProtocol] = defer.Deferred(cancel)

        def connected(protocol: IProtocol) -> defer.Deferred[IProtocol]:
            return cast(TunnelProtocol, protocol).ready  # built by build() above

        def unreachable(reason: Failure) -> Failure:  # the connect to the proxy only
            if reason.check(defer.CancelledError, error.ConnectingCancelledError):
                return reason  # the caller gave up (a timeout): not the proxy's fault
            return Failure(ProxyError(f"cannot reach {self.proxyName}: {reason.value}"))

        connecting.addErrback(unreachable).addCallback(connected).chainDeferred(result)
        return result
