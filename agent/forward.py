"""
TCP (and UNIX socket) splices: "direct-tcpip" channels and channels the agent opens itself.

A "direct-tcpip" channel (ssh -L, ssh -W, ssh -J) is opened by groundcontrol, and so
is a "direct-streamlocal@openssh.com" channel (ssh -L to a UNIX socket path).
Like sshd, the agent connects first and answers the channel open only then, so
the operator's client gets a real "open failed: connect failed" instead of a
channel that opens and dies; the agent's connection supports opens answered
later (it takes a Deferred from C{channel_direct_tcpip}). Bytes are spliced
with the same flow control as sessions: the socket is not read while the
channel's output is paused, and the window re-opens only as the socket takes
the bytes.

The agent opens channels too, one per connection accepted on a listener it
made for the operator (C{forwarded-tcpip} for ssh -R, C{auth-agent@openssh.com}
for ssh -A, C{x11} for ssh -X): L{AcceptingFactory} builds an L{AcceptedChannel}
per connection, which does not read the socket until groundcontrol confirms
the channel, and closes it if the open is refused or the link goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.conch.error import ConchError
from twisted.conch.ssh import connection
from twisted.internet import defer, endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from agent._flow import EndpointChannel
from agent.session import _Payload

#: Seconds to wait for the device-side TCP connection.
CONNECT_TIMEOUT = 30.0

_Channel = TypeVar("_Channel", bound="SpliceChannel")


def parseDirectTCPIP(data: bytes) -> tuple[str, int, str, int]:
    """
    The RFC 4254 7.2 open payload: host to connect, port, originator address,
    originator port. Raises L{ValueError} when it does not parse.
    """
    payload = _Payload(data)
    host = payload.text()
    port = payload.uint32()
    originator = payload.text()
    originatorPort = payload.uint32()
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad destination {host!r}:{port}")
    return host, port, originator, originatorPort


def parseDirectStreamLocal(data: bytes) -> str:
    """
    OpenSSH's C{direct-streamlocal@openssh.com} open payload (its PROTOCOL file,
    2.4): the socket's path, then fields reserved for later that are not read.
    Raises L{ValueError} when it does not parse.
    """
    path = _Payload(data).text()
    if not path:
        raise ValueError("empty socket path")
    return path


def endpointFor(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """An address literal is connected directly; a name goes through HostnameEndpoint."""
    if isIPAddress(host):
        return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IHalfCloseableProtocol)
class _Splice(Protocol):
    """The socket side of a L{SpliceChannel}."""

    def __init__(self, channel: SpliceChannel) -> None:
        self._channel = channel
        self._readClosed = False
        self._writeClosed = False

    def connectionMade(self) -> None:
        self._channel.tcpConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._channel.write(data)

    def readConnectionLost(self) -> None:
        """The server half-closed: pass the EOF on."""
        self._readClosed = True
        self._channel.writeEOF()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        # With half-close, Twisted leaves the full close to the protocol.
        if self._readClosed and self._writeClosed:
            self.transport.loseConnection()  # type: ignore[union-attr, misc]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._channel.tcpLost()


class SpliceChannel(EndpointChannel):
    """
    A channel spliced to a socket on the device, with end-to-end flow
    control: the socket is not read while the channel's output is paused,
    and the window re-opens only as the socket takes the bytes. EOF becomes
    a half-close each way; the socket's close closes the channel.
    """

    log = Logger()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transport: Any = None

    # -- socket side ------------------------------------------------------------

    def tcpConnected(self, transport: Any) -> None:
        self._transport = transport
        transport.registerProducer(self._credit, True)  # type: ignore[attr-defined]

    def tcpLost(self) -> None:
        """The socket closed: EOF and close the channel after queued data."""
        self._transport = None
        self._credit.stopProducing()
        self.writeEOF()
        self.loseConnection()

    def outputPaused(self) -> None:
        if self._transport is not None:
            self._transport.pauseProducing()

    def outputResumed(self) -> None:
        if self._transport is not None:
            self._transport.resumeProducing()

    # -- channel side ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._transport is None:
            self.consumed(len(data))
            return
        self._transport.write(data)
        self._credit.received(len(data))

    def eofReceived(self) -> None:
        """Half-close towards the socket's peer, like sshd's shutdown(SHUT_WR)."""
        transport = self._transport
        if transport is None:
            return
        transport.unregisterProducer()  # a paused producer would block the close
        self._credit.stopProducing()
        loseWrite = getattr(transport, "loseWriteConnection", None)
        if loseWrite is not None:
            loseWrite()
        else:
            transport.loseConnection()

    def closed(self) -> None:
        super().closed()
        self._close()

    def abandoned(self) -> None:
        """The channel never opens: its socket goes, and the credit is let go."""
        self._close()
        super().abandoned()

    def _close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.unregisterProducer()
            transport.loseConnection()


class ForwardChannel(SpliceChannel):
    """
    A "direct-tcpip" channel spliced to a TCP connection on the device.

    The agent's connection answers C{channel_direct_tcpip} with::

        ForwardChannel.open(reactor, data, remoteWindow=windowSize,
                            remoteMaxPacket=maxPacket, conn=self)

    which is a Deferred of the channel, or of a L{ConchError} with
    C{OPEN_CONNECT_FAILED} that the connection turns into an open failure.
    """

    name = b"direct-tcpip"

    @classmethod
    def open(
        cls, reactor: Any, data: bytes, *, timeout: float = CONNECT_TIMEOUT, **channelArgs: Any
    ) -> defer.Deferred[ForwardChannel]:
        """Connect to the payload's destination, then give the channel."""
        try:
            host, port, originator, originatorPort = parseDirectTCPIP(data)
        except ValueError as e:
            return _malformed(cls, e)
        channel = cls(**channelArgs)
        cls.log.info(
            "forward from {originator!r}:{oport} to {host!r}:{port}",
            originator=originator,
            oport=originatorPort,
            host=host,
            port=port,
        )
        return _connected(channel, endpointFor(reactor, host, port, timeout), f"{host} port {port}")


class StreamLocalChannel(SpliceChannel):
    """
    A "direct-streamlocal@openssh.com" channel (ssh -L to a UNIX socket path, such
    as a database's or a container engine's) spliced to that socket on the device.
    Opened like L{ForwardChannel}: connected first, answered then.
    """

    name = b"direct-streamlocal@openssh.com"

    @classmethod
    def open(
        cls, reactor: Any, data: bytes, *, timeout: float = CONNECT_TIMEOUT, **channelArgs: Any
    ) -> defer.Deferred[StreamLocalChannel]:
        """Connect to the payload's socket, then give the channel."""
        try:
            path = parseDirectStreamLocal(data)
        except ValueError as e:
            return _malformed(cls, e)
        channel = cls(**channelArgs)
        cls.log.info("forward to UNIX socket {path!r}", path=path)
        endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=timeout)
        return _connected(channel, endpoint, path)


def _malformed(channelType: type[SpliceChannel], why: ValueError) -> defer.Deferred[Any]:
    """An open whose payload does not parse: refused, and said in the log."""
    kind = channelType.name.decode("ascii")
    channelType.log.warn("malformed {kind} open: {why}", kind=kind, why=str(why))
    return defer.fail(ConchError(f"malformed {kind} request", connection.OPEN_CONNECT_FAILED))


def _connected(channel: _Channel, endpoint: Any, destination: str) -> defer.Deferred[_Channel]:
    """
    Connect C{channel}'s socket by C{endpoint}; the channel once connected, or the
    open failure the operator's ssh prints ("connect to DESTINATION failed: why").
    """
    d = endpoint.connect(_SpliceFactory(channel))

    def refused(reason: Failure) -> Failure:
        if reason.check(defer.CancelledError):
            return reason
        why = reason.getErrorMessage()
        channel.log.info(
            "forward to {destination} failed: {why!r}", destination=destination, why=why
        )
        text = f"connect to {destination} failed: {why}"
        return Failure(ConchError(text, connection.OPEN_CONNECT_FAILED))

    return d.addCallbacks(lambda _: channel, refused)


class AcceptedChannel(SpliceChannel):
    """
    A channel the agent opens for a connection it accepted on the device.

    The socket is paused until groundcontrol confirms the channel, so nothing
    is read (or buffered) for a channel that may yet be refused; a refused
    open, or a link lost before the answer, closes the socket.
    """

    def __init__(self, channelType: bytes, payload: bytes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = channelType
        self.payload = payload

    def tcpConnected(self, transport: Any) -> None:
        super().tcpConnected(transport)
        transport.pauseProducing()
        conn = self.conn
        if conn is None or getattr(conn, "stopped", False) or conn.transport is None:
            self.abandoned()  # the link went before the open was even sent
            return
        conn.openChannel(self, self.payload)

    def channelOpen(self, specificData: bytes) -> None:
        super().channelOpen(specificData)
        if self._transport is not None:
            self._transport.resumeProducing()

    def openFailed(self, reason: Any) -> None:
        self.log.info(
            "{type} channel refused: {why}",
            type=self.name.decode("ascii", "replace"),
            why=str(getattr(reason, "value", reason)),
        )
        self.abandoned()  # it never opens: no close will come


class AcceptingFactory(Factory):
    """
    Listens for the operator: every accepted connection opens a channel of
    C{channelType} on C{conn}, with the open payload C{payloadFor(peer)}.
    C{accepted}, if given, is called after each connection is set up.
    """

    noisy = False

    def __init__(
        self,
        conn: Any,
        channelType: bytes,
        payloadFor: Callable[[IAddress], bytes],
        accepted: Callable[[], None] | None = None,
    ) -> None:
        self.conn = conn
        self.channelType = channelType
        self.payloadFor = payloadFor
        self.accepted = accepted

    def buildProtocol(self, addr: Any) -> _Splice:
        channel = AcceptedChannel(self.channelType, self.payloadFor(addr), conn=self.conn)
        if self.accepted is not None:
            self.accepted()
        return _Splice(channel)


class _SpliceFactory:
    """A client factory that builds the one L{_Splice} for a channel."""

    def __init__(self, channel: SpliceChannel) -> None:
        self._channel = channel

    def buildProtocol(self, addr: Any) -> _Splice:
        return _Splice(self._channel)

    def doStart(self) -> None: ...
    def doStop(self) -> None: ...
    def startedConnecting(self, connector: Any) -> None: ...


__all__ = [
    "CONNECT_TIMEOUT",
    "AcceptedChannel",
    "AcceptingFactory",
    "ForwardChannel",
    "SpliceChannel",
    "StreamLocalChannel",
    "endpointFor",
    "parseDirectStreamLocal",
    "parseDirectTCPIP",
]
