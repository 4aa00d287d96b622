"""
The agent's one link to groundcontrol: dial out, prove who we are, serve the
channels groundcontrol opens, and come back when the link dies.

The agent is the SSH client here. It refuses any server key but the pinned
one, logs in as ``agent+NAME`` with the device key, and then answers
``session`` and ``direct-tcpip`` channel opens. Reconnection is Twisted's
L{ClientService} with jittered exponential backoff; a link counts as made only
once it is authenticated, so a server that accepts TCP but refuses us is
retried with backoff too, not hammered.
"""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.internet import ClientService
from twisted.conch.ssh import keys, transport, userauth
from twisted.copyright import version as twisted_version
from twisted.internet import defer, error, protocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from accesstunnel import fastpath, policy
from accesstunnel.addresses import describeAddress
from accesstunnel.connection import TunnelConnection
from accesstunnel.enrollmessages import APPROVED
from accesstunnel.hybridkex import HybridKexClientMixin
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL, KeepaliveTransportMixin
from accesstunnel.keys import fingerprint
from accesstunnel.letgo import letGo
from accesstunnel.reasontext import reasonText
from accesstunnel.rekey import RekeyingTransportMixin, RekeyLimit
from agent import linklog
from agent.enrollment import Enrollment
from agent.identity import ServerKeyPin
from agent.remoteforward import (
    CANCEL_SOCKET_FORWARD,
    CANCEL_TCPIP_FORWARD,
    SOCKET_FORWARD,
    TCPIP_FORWARD,
    RemoteForwarder,
)

if TYPE_CHECKING:
    from agent.failover import Dial

AGENT_VERSION = "0.1.0"

#: Seconds a stopping agent gives its link to close before it aborts it. Over TCP the
#: close is at once; TLS's close alerts and WebSocket's closing handshake wait for
#: groundcontrol's answer, which a frozen or unreachable server never gives: the stop
#: must end anyway, well inside systemd's 90 s before SIGKILL.
STOP_GRACE = 5.0


def versionLine(agentVersion: str = AGENT_VERSION, twistedVersion: str = twisted_version) -> bytes:
    """
    The SSH version line the agent sends (without CR LF): C{SSH-2.0-AccessTunnelAgent_0.1.0
    Twisted_26.10.0}. groundcontrol's handshake limiter counts a connection that sends it
    among the agents, any other client (OpenSSH: an operator) in the operators' reserve.
    RFC 4253 allows no C{-} or space in the software version, hence the C{_}s.
    """
    agent, conch = (re.sub(r"[^A-Za-z0-9._]", "_", v) for v in (agentVersion, twistedVersion))
    return f"SSH-2.0-AccessTunnelAgent_{agent} Twisted_{conch}".encode("ascii")


@attrs.frozen
class LinkSettings:
    """Who we are and how to keep the link."""

    name: str
    deviceKey: keys.Key
    serverKey: ServerKeyPin
    serial: str | None = None
    keepaliveInterval: float = DEFAULT_INTERVAL
    keepaliveCount: int = DEFAULT_COUNT
    #: Seconds from groundcontrol's first key-exchange message to an authenticated link.
    handshakeTimeout: float = 30.0
    #: Seconds from TCP connect to groundcontrol's first key-exchange message. Longer than
    #: C{handshakeTimeout}: during a reconnect storm groundcontrol's handshake limiter keeps
    #: a new connection waiting, silent, until a handshake slot is free, and an agent that
    #: gave up there would only rejoin the queue at its end.
    answerTimeout: float = 120.0
    rekeyLimit: RekeyLimit = attrs.field(factory=RekeyLimit)


def backoffPolicy(
    initialDelay: float = 1.0,
    maxDelay: float = 30.0,
    factor: float = 2.0,
    random: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """
    Delay before reconnect attempt C{n}: exponential, capped, with jitter over
    the upper half of the interval, so a fleet that lost the server at the
    same moment does not come back at the same moment.
    """

    def policy(attempt: int) -> float:
        ceiling = min(initialDelay * factor ** min(attempt, 64), maxDelay)
        return ceiling * (0.5 + 0.5 * random())

    return policy


def shortcutPassThroughLayers(sshTransport: Any) -> bool:
    """
    Once the link is up over plain TCP, let the socket call the SSH transport's
    C{dataReceived} directly and the SSH transport write to the socket directly,
    skipping the layers between them that only pass bytes on: Twisted's endpoint
    wrapper, the failover watch (L{agent.failover}) and ClientService's proxy
    (an attribute lookup that fails first, on every read). A keystroke pays
    each frame cold after every pause (bench/RESULTS.md, "Echo latency
    (session 7)").

    Instance attributes shadow the methods; the connection's loss still goes
    through every layer, so the watch and ClientService see it and reconnect
    as before. Any other chain (TLS, WebSocket, a proxy's tunnel: layers that
    do work on the bytes) is left as it is. Returns whether it shortcut.
    """
    watch: Any = sshTransport.transport
    socket: Any = getattr(watch, "transport", None)
    if not isinstance(socket, FileDescriptor):
        return False
    outer: Any = getattr(socket, "protocol", None)
    # Twisted's endpoints._WrappingProtocol over the watch, and nothing else.
    if not hasattr(outer, "_wrappedProtocol") or outer._wrappedProtocol is not watch:
        return False
    outer.dataReceived = sshTransport.dataReceived
    watch.write = socket.write
    watch.writeSequence = socket.writeSequence
    return True


class AgentConnection(TunnelConnection):
    """ssh-connection on the agent: answers the channels groundcontrol opens."""

    _log = Logger()
    _remoteForwards: RemoteForwarder | None = None

    def __init__(self, factory: AgentLinkFactory) -> None:
        super().__init__()
        self.factory = factory

    @property
    def remoteForwards(self) -> RemoteForwarder:
        """
        This link's ssh -R listeners, made on first use. The factory's clock
        is the reactor in the running agent; like sshd, ports below 1024
        only when sessions run as root (as the agent's own user, by default).
        """
        if self._remoteForwards is None:
            self._remoteForwards = RemoteForwarder(
                self.factory.clock, self, allowPrivilegedPorts=os.geteuid() == 0
            )
        return self._remoteForwards

    def serviceStarted(self) -> None:
        super().serviceStarted()
        if self.linkFlow is not None:  # read and buffer the link in larger pieces
            self.linkFlow.widen()
        shortcutPassThroughLayers(self.transport)
        self.transport.startKeepalive(self)
        self.transport.linkUp()
        enrollment = self.factory.enrollment
        if enrollment is not None:
            enrollment.linkUp(self).addErrback(
                lambda f: self._log.failure("enrollment step failed", f)
            )

    def serviceStopped(self) -> None:
        super().serviceStopped()
        # The forwarder refers back to this connection: let go of it with its listeners.
        forwards, self._remoteForwards = self._remoteForwards, None
        if forwards is not None:
            forwards.stopAll()
        if self.factory.enrollment is not None:
            self.factory.enrollment.linkDown()

    def channel_session(self, windowSize: int, maxPacket: int, data: bytes) -> Any:
        return self.factory.sessionFactory(self, windowSize, maxPacket, data)

    def channel_direct_tcpip(self, windowSize: int, maxPacket: int, data: bytes) -> Any:
        return self.factory.forwardFactory(self, windowSize, maxPacket, data)

    def channel_direct_streamlocal_openssh_com(
        self, windowSize: int, maxPacket: int, data: bytes
    ) -> Any:
        """ssh -L to a UNIX socket on the device (Conch names it with _ for @ and .)."""
        streamLocal = self.factory.streamLocalFactory
        if streamLocal is None:
            return None  # Conch refuses it as an unknown channel type
        return streamLocal(self, windowSize, maxPacket, data)

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        if requestType == APPROVED and self.factory.enrollment is not None:
            return self.factory.enrollment.approved(data)
        if requestType == TCPIP_FORWARD:
            return self.remoteForwards.forward(data)
        if requestType == CANCEL_TCPIP_FORWARD:
            return self.remoteForwards.cancel(data)
        if requestType == SOCKET_FORWARD:
            return self.remoteForwards.forwardSocket(data)
        if requestType == CANCEL_SOCKET_FORWARD:
            return self.remoteForwards.cancelSocket(data)
        return 0  # keepalives: a failure reply is the answer


class AgentUserAuth(userauth.SSHUserAuthClient):
    """Public-key authentication with the device key, once."""

    def __init__(self, user: bytes, instance: Any, deviceKey: keys.Key) -> None:
        super().__init__(user, instance)
        self._deviceKey = deviceKey
        self._offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self._offered:
            return None
        self._offered = True
        return self._deviceKey.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self._deviceKey)

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None

    def getGenericAnswers(self, name: bytes, instruction: bytes, questions: Any) -> Any:
        return defer.fail(NotImplementedError("the agent only uses its key"))


class AgentTransport(
    KeepaliveTransportMixin,
    RekeyingTransportMixin,
    fastpath.FastPathMixin,
    HybridKexClientMixin,
    transport.SSHClientTransport,
):
    """
    Client transport: policy, pinned host key, keepalives, rekeying, link readiness,
    and the post-quantum key exchange (accesstunnel.hybridkex).
    """

    _log = Logger()
    ourVersionString = versionLine()
    #: Conch's "connection lost" says less than our line about the link's end
    #: (accesstunnel.logfilter counts it as debug; agent.linklog).
    conchEventsSaidOtherwise = frozenset({"connection lost"})
    #: Where and when this connection was dialled (the failover endpoint says, L{dialed}).
    _dial: Dial | None = None
    #: When the link came up (the clock's seconds); None until it is.
    _upAt: float | None = None
    #: Why the link is ending, as noted when it happened (None: the loss will say).
    _endingBecause: str | None = None
    #: The link's transport, address and dial time, once it is up (L{_where}).
    _upWhere: tuple[str, str, float] = ("", "", 0.0)

    def dialed(self, dial: Dial) -> None:
        """The failover endpoint names the address this connection was dialled to, and when."""
        self._dial = dial

    def connectionMade(self) -> None:
        policy.applyClientPolicy(self)
        self._connectedAt = self.factory.clock.seconds()
        tcp = self.transport
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(tcp, option, None)
            if setter is not None:
                setter(True)
        #: Fires (with None: the transport as its result would be a cycle) once the
        #: link is authenticated; fails if it is lost before.
        self.ready: defer.Deferred[None] = defer.Deferred()
        self._answered = False
        #: Why the agent dropped the connection itself before the link was up (a timer).
        self._gaveUp: str | None = None
        self._handshakeTimer = self.factory.clock.callLater(
            self.factory.settings.answerTimeout, self._unansweredTimedOut
        )
        self.factory.currentLink = self
        super().connectionMade()

    def ssh_KEXINIT(self, packet: bytes) -> None:
        # groundcontrol's first KEXINIT ends the wait in its queue: from here the
        # handshake has its own, shorter, deadline.
        if not self._answered:
            self._answered = True
            if self._handshakeTimer.active():
                self._handshakeTimer.cancel()
                self._handshakeTimer = self.factory.clock.callLater(
                    self.factory.settings.handshakeTimeout, self._handshakeTimedOut
                )
        super().ssh_KEXINIT(packet)

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[Any]:
        if self.factory.settings.serverKey.matches(hostKey):
            return defer.succeed(True)
        self._log.error(
            "server presented a host key other than the pinned {pinned}; refusing it",
            pinned=self.factory.settings.serverKey.fingerprint,
        )
        return defer.fail(Failure(ValueError("server host key does not match --server-key")))

    def connectionSecure(self) -> None:
        settings = self.factory.settings
        conn = AgentConnection(self.factory)
        self.requestService(
            AgentUserAuth(f"agent+{settings.name}".encode(), conn, settings.deviceKey)
        )

    def linkUp(self) -> None:
        self.factory.failedLinks = 0
        if self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._upAt = self.factory.clock.seconds()
        # Kept for the line of the link's end: by then TCP has let go of its socket,
        # which the TLS check below reads.
        self._upWhere = self._where()
        transport, address, dialedAt = self._upWhere
        settings = self.factory.settings
        linklog.logLinkUp(
            self._log,
            self,
            transport=transport,
            address=address,
            seconds=self._upAt - dialedAt,
            name=settings.name,
            keyFingerprint=self.factory.deviceKeyFingerprint,
        )
        if not self.ready.called:
            self.ready.callback(None)

    def _where(self) -> tuple[str, str, float]:
        """
        The link's transport, address and dial time: as the failover endpoint dialled
        it, else (a link made by any other endpoint) its peer, from the TCP connect.
        """
        if self._dial is not None:
            return self._dial.transport, self._dial.address, self._dial.started
        address = describeAddress(self.transport.getPeer())
        transport = "tcp" if linklog.tlsConnection(self.transport) is None else "tls"
        return transport, address, self._connectedAt

    def _unansweredTimedOut(self) -> None:
        self._log.warn("groundcontrol did not start the key exchange in time; dropping the link")
        self._gaveUp = (
            f"groundcontrol did not start the key exchange in "
            f"{self.factory.settings.answerTimeout:g} s"
        )
        connection = linklog.tlsConnection(self.transport)
        if connection is not None:
            from accesstunnel.transports.tlsreasons import handshakeUnfinished  # TLS only

            if handshakeUnfinished(connection):
                self._gaveUp = (
                    "the server took the connection but did not finish the TLS handshake in "
                    f"{self.factory.settings.answerTimeout:g} s (is it a TLS port?)"
                )
        self.transport.abortConnection()

    def _handshakeTimedOut(self) -> None:
        self._log.warn("link not authenticated in time; dropping it")
        self._gaveUp = (
            f"the link was not authenticated in {self.factory.settings.handshakeTimeout:g} s"
        )
        self.transport.abortConnection()

    def startKeepalive(self, conn: TunnelConnection) -> None:
        settings = self.factory.settings
        # Checks on whole seconds of the (synchronised) clock: a fleet's pings reach
        # groundcontrol together and are answered in few wake-ups.
        self.watchPeer(
            conn,
            self.factory.clock,
            settings.keepaliveInterval,
            settings.keepaliveCount,
            align=min(1.0, settings.keepaliveInterval),
        )
        # Logged in: reads and packets skip the layers with nothing left to do
        # (fastpath.enterSteadyState).
        self.enterSteadyState()

    def peerSilent(self) -> None:
        # Said by the line about the link's end (agent.linklog), written as it closes.
        settings = self.factory.settings
        self._endingBecause = (
            "groundcontrol stopped answering "
            f"({settings.keepaliveCount} keepalives {settings.keepaliveInterval:g} s apart)"
        )
        self.transport.abortConnection()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        reason = description.decode("utf-8", "replace")
        self._endingBecause = f"groundcontrol closed the link: {reason}"
        if self._upAt is None:  # a link that was up says it in its end's line
            self._log.warn("groundcontrol closed the link: {reason}", reason=reason)
        super().receiveError(reasonCode, description)

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if self._endingBecause is None:
            self._endingBecause = f"the agent disconnected: {desc.decode('utf-8', 'replace')}"
        super().sendDisconnect(reason, desc)

    def _whyLost(self, e: BaseException) -> str | None:
        """
        Why the connection ended before the link was up: over TLS in an operator's words
        (accesstunnel.transports.tlsreasons: OpenSSL's at the end, in brackets); nothing
        for a plain close that TLS has nothing to say about. The agent's own doing (a
        timer, its stop) is said as such, not as the server's.
        """
        if self._gaveUp is not None:
            return self._gaveUp
        if self.factory.stopping:
            return linklog.AGENT_STOPPING
        connection = linklog.tlsConnection(self.transport)
        if connection is not None:
            from accesstunnel.transports.tlsreasons import tlsFailureText  # TLS links only

            text = tlsFailureText(e, connection)
            if text is not None:
                return text
        return None if isinstance(e, error.ConnectionDone) else reasonText(e)

    def connectionLost(self, reason: Any = None) -> None:
        if self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        if self.factory.currentLink is self:
            self.factory.currentLink = None
        if not self.ready.called:
            self.factory.failedLinks += 1
            why = "link closed before it was up"
            if isinstance(reason, Failure) and (said := self._whyLost(reason.value)):
                # Why TLS gave up (a certificate that did not verify, perhaps for the
                # device's clock: agent.clocksense) reaches the failover endpoint's line.
                why += f": {said}"
            self.ready.errback(Failure(ConnectionError(why)))
            self.ready.addErrback(lambda f: None)
        super().connectionLost(reason)
        if self._upAt is not None:
            transport, address, _ = self._upWhere
            linklog.logLinkDown(
                self._log,
                transport=transport,
                address=address,
                lasted=self.factory.clock.seconds() - self._upAt,
                why=linklog.endReason(self._endingBecause, reason, self.factory.stopping),
            )
        # An agent that re-dials its link many times a day frees each old one by
        # reference counting, at once.
        letGo(self)


class AgentLinkFactory(protocol.ClientFactory):
    """Builds agent transports; holds settings and the channel factories."""

    protocol = AgentTransport
    #: Twisted's "Starting factory <...AgentLinkFactory object at 0x...>" and "Stopping
    #: factory" come with every attempt and every link's end and tell an operator
    #: nothing: the link's own lines say what happened (agent.linklog).
    noisy = False

    def __init__(
        self,
        settings: LinkSettings,
        clock: IReactorTime,
        sessionFactory: Callable[..., Any],
        forwardFactory: Callable[..., Any],
        enrollment: Enrollment | None = None,
        streamLocalFactory: Callable[..., Any] | None = None,
    ) -> None:
        self.settings = settings
        self.enrollment = enrollment
        self.clock = clock
        self.sessionFactory = sessionFactory
        self.forwardFactory = forwardFactory
        #: Opens ssh -L's channels to UNIX sockets; None: refused as unknown.
        self.streamLocalFactory = streamLocalFactory
        #: Links in a row that closed before they were authenticated.
        self.failedLinks = 0
        #: Whether the link service is stopping (the agent is): the link's end says so.
        self.stopping = False
        #: The link connected now, if one is (from its TCP connection to its loss).
        self.currentLink: Any = None

    @functools.cached_property
    def deviceKeyFingerprint(self) -> str:
        """
        The device key's C{SHA256:} fingerprint, for the line of each link that comes
        up: worked out once (a load driver's 10,000 links come up together).
        """
        return fingerprint(self.settings.deviceKey)


class _LinkService(ClientService):
    """
    L{ClientService} that tells the factory it is stopping, so the link's end says why,
    and whose stop ends within L{STOP_GRACE} whatever groundcontrol does.
    """

    def __init__(self, endpoint: Any, factory: AgentLinkFactory, **kwargs: Any) -> None:
        super().__init__(endpoint, factory, **kwargs)
        self._linkFactory = factory

    def startService(self) -> None:
        self._linkFactory.stopping = False
        super().startService()

    def stopService(self) -> Any:
        self._linkFactory.stopping = True
        stopped = super().stopService()
        link = self._linkFactory.currentLink
        transport = getattr(link, "transport", None)
        if transport is None or stopped.called:
            return stopped
        abort = self._linkFactory.clock.callLater(STOP_GRACE, transport.abortConnection)

        def closed(result: Any) -> Any:
            if abort.active():
                abort.cancel()
            return result

        return stopped.addBoth(closed)


def linkService(
    endpoint: IStreamClientEndpoint,
    factory: AgentLinkFactory,
    clock: IReactorTime,
    retryPolicy: Callable[[int], float] | None = None,
) -> ClientService:
    """
    The service that keeps one link up through every failure.

    L{ClientService} counts an attempt as successful once TCP connects, so a
    server that accepts TCP and then refuses the login would be retried at
    the shortest delay forever. The factory counts links that closed before
    they were up, and the retry delay grows with that count too. (Its
    C{prepareConnection} hook would fit, but in Twisted 26.10 a connection
    lost while it is pending raises NoTransition inside ClientService.)
    """
    policy = retryPolicy or backoffPolicy()
    return _LinkService(
        endpoint,
        factory,
        retryPolicy=lambda attempt: policy(attempt + factory.failedLinks),
        clock=clock,
    )
