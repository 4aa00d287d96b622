"""
groundcontrol's SSH front door: transport policy, authentication service,
realm and factory.

One listener serves operators and agents alike; the username tells them
apart (see L{groundcontrol.usernames}).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from twisted.conch import error
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common, connection, factory, keys, transport, userauth
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from accesstunnel import fastpath, policy
from accesstunnel.addresses import describeAddress
from accesstunnel.channel import packOpenFailure
from accesstunnel.clocks import elapsedClock
from accesstunnel.connection import TunnelConnection
from accesstunnel.keepalive import (
    DEFAULT_COUNT,
    DEFAULT_INTERVAL,
    KeepaliveSweep,
    KeepaliveTransportMixin,
)
from accesstunnel.letgo import letGo
from accesstunnel.quickack import QuickAckMixin
from accesstunnel.rekey import RekeyingTransportMixin, RekeyLimit
from accesstunnel.transports.tls import peerCertificate
from groundcontrol.auth import AgentLogin, FleetKeyChecker, OperatorLogin
from groundcontrol.avatars import AgentAvatar, OperatorAvatar
from groundcontrol.certverdict import CertificateVerdict, PresentedCertificate
from groundcontrol.cipherchoice import AESGCMAfterLoginMixin
from groundcontrol.devicewait import DeviceWaitPolicy, DeviceWaits
from groundcontrol.enrollment import AgentRequests, CertificatePolicy
from groundcontrol.hostbound import HOSTBOUND_EXTENSION, HostboundUserAuthMixin
from groundcontrol.pingreply import PingReplyMixin
from groundcontrol.pki import FleetCA
from groundcontrol.preauth import Allowance, ConnectionAllowance, PreauthMixin
from groundcontrol.registry import Registry
from groundcontrol.relay import inertText
from groundcontrol.router import SessionPolicy, SessionRouter
from groundcontrol.store import (
    Device,
    IStore,
    PendingLimitReached,
    PendingLimits,
)

#: Enrollment requests (L{AgentRequests.handled}) one link may make at once, then one per
#: L{ENROLLMENT_REQUEST_INTERVAL} seconds. Each costs a store call, most a write with an
#: audit event, a certificate a signature; any key may log in as a pending device, so
#: without a bound one link could flood the store and the audit log. Our agent makes at
#: most 4 at a link's start (hello, enroll, claim-code, certificate), then one every ten
#: minutes (a pending device's new pairing code) or hours (a certificate's renewal).
ENROLLMENT_REQUEST_BURST = 8
ENROLLMENT_REQUEST_INTERVAL = 10.0
_ENROLLMENT_ALLOWANCE = Allowance(
    size=ENROLLMENT_REQUEST_BURST,
    rate=1 / ENROLLMENT_REQUEST_INTERVAL,
    what="enrollment requests",
    reason="enrollment_requests",
)

#: Key re-exchanges a logged-in peer may start at once, then one per
#: L{PEER_REKEY_INTERVAL} seconds; beyond that it is disconnected (the defaults of
#: L{ServerSettings}). Each costs groundcontrol's one process a key exchange and a
#: signature (about 0.3 ms), and any key may log in as a pending device: unbounded, one
#: link could keep groundcontrol busy with nothing else (the pre-auth bounds,
#: L{groundcontrol.preauth}, end at login); bounded, a link costs at most 0.15% of a
#: core. Our agent renews its keys every 1 GiB or hour (accesstunnel.rekey), OpenSSH
#: every 1-4 GiB by default: at 1 GB/s, one a second. Four a second leave room for a
#: RekeyLimit of 64M at 250 MB/s; smaller limits at high rates would be cut off.
PEER_REKEY_BURST = 10
PEER_REKEY_INTERVAL = 0.25

#: Bytes groundcontrol may hold unsent for a peer before a request of the peer's that
#: wants an answer drops the peer instead: one that asks and never reads the answers
#: would have them kept in memory without end. Channel data never piles up there (the
#: link's back-pressure holds it in the channels, accesstunnel.linkflow); only answers
#: do, and a peer that reads has at most a socket buffer's worth (256 KiB) waiting.
MAX_UNSENT_FOR_PEER = 4 << 20

#: The smallest maximum packet size a channel's peer may offer. groundcontrol relays in
#: packets no larger than the receiving peer takes: at 1 byte, each byte relayed would
#: cost a packet of its own (64 KiB of a device's output: 65,540 packets instead of 6),
#: and one operator with any grant, or one device, could keep groundcontrol busy. Every
#: SSH implementation takes 32768 (RFC 4253 6.1); OpenSSH, Go, Conch and paramiko offer
#: 32768, PuTTY 16384: 4096 refuses none of them and bounds a channel's cost to about
#: eight times that of a full-sized one.
MIN_PEER_MAX_PACKET = 4096

#: What the agent's key may be used for in signatures we accept (RFC 8308).
USER_KEY_ALGORITHMS = [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"]

#: The version line groundcontrol sends (without CR LF), to operators and agents alike.
#: OpenSSH's client picks what it sends by the server's software version (compat.c): to
#: one whose version starts "OpenSSH" and matches none of its old releases' patterns it
#: sends C{eow@openssh.com} when its standard output closes (C{ssh dev_x@gc yes | head -1}
#: then ends as it does against sshd; with Conch's C{Twisted_26.10.0} it ran until ^C,
#: and C{yes} with it) and C{no-more-sessions@openssh.com} after its one session opens.
#: Nothing else in OpenSSH 9's client turns on it. "OpenSSH_compatible" says that much
#: and no more: no release number, so scanners (ssh-audit) match no OpenSSH release and
#: list none of its CVEs against us, now or when a named release grows old; the
#: comment says who we are, as the RFC 4253 4.2 comment is for. PuTTY's bug detection
#: matches OpenSSH release numbers, which this line has none of; Go's and paramiko's
#: clients, and Conch (our agent), ignore it. The agent's own line
#: (L{agent.link.versionLine}) stays: groundcontrol's handshake limiter tells agents by it.
SERVER_VERSION_LINE = b"SSH-2.0-OpenSSH_compatible AccessTunnel"

#: The global request OpenSSH's client sends (without a reply wanted) once it has opened
#: the one session it will use; a session opened after it ends the connection (sshd's rule).
NO_MORE_SESSIONS = b"no-more-sessions@openssh.com"


@attrs.frozen
class ServerSettings:
    """The tunables of the SSH front door."""

    loginGraceTime: float = 30.0
    maxAuthAttempts: int = 6
    keepaliveInterval: float = DEFAULT_INTERVAL
    keepaliveCount: int = DEFAULT_COUNT
    pendingLimits: PendingLimits = attrs.field(factory=PendingLimits)
    sessions: SessionPolicy = attrs.field(factory=SessionPolicy)
    rekeyLimit: RekeyLimit = attrs.field(factory=RekeyLimit)
    #: Renew an operator's keys with AES-GCM after login (L{cipherchoice}).
    aesGCMAfterLogin: bool = False
    #: Key re-exchanges a logged-in peer may start at once, then one per interval
    #: (L{PEER_REKEY_BURST}); a burst of 0 turns the bound off.
    peerRekeyBurst: int = PEER_REKEY_BURST
    peerRekeyInterval: float = PEER_REKEY_INTERVAL
    #: Wait for recently seen devices to reconnect (L{groundcontrol.devicewait}); None, or
    #: a wait of 0: an offline device's channel fails at once.
    deviceWait: DeviceWaitPolicy | None = None

    @functools.cached_property
    def peerRekeyAllowance(self) -> Allowance | None:
        """
        What L{peerRekeyBurst} and L{peerRekeyInterval} allow each connection (None:
        unbounded), made once for all of them.
        """
        if self.peerRekeyBurst <= 0:
            return None
        return Allowance(
            size=self.peerRekeyBurst,
            rate=1 / self.peerRekeyInterval,
            what="key re-exchanges",
            reason="peer_rekeys",
        )


class PendingRefused(UnauthorizedLogin):
    """An unknown device was turned away (pending caps); the text says why."""


@attrs.frozen
class PeerMind:
    """What the realm learns of the connection besides the credentials."""

    peer: IAddress
    #: The TLS client certificate the connection presented, if any.
    certificate: x509.Certificate | None = None
    #: The key exchange the connection negotiated (C{mlkem768x25519-sha256}), if known.
    kex: str | None = None


@implementer(IRealm)
class GroundControlRealm:
    """Make operator or agent avatars from what the checker established."""

    _log = Logger()

    def __init__(
        self,
        store: IStore,
        registry: Registry,
        router: SessionRouter,
        clock: IReactorTime,
        agentRequests: AgentRequests,
        pendingLimits: PendingLimits | None = None,
        ca: FleetCA | None = None,
    ) -> None:
        self._ca = ca
        self._store = store
        self._registry = registry
        self._router = router
        self._clock = clock
        self._agentRequests = agentRequests
        self._pendingLimits = pendingLimits or PendingLimits()

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH logins are served")
        if isinstance(avatarId, OperatorLogin):
            avatar = OperatorAvatar(avatarId, self._router)
            return IConchUser, avatar, avatar.logout
        if isinstance(avatarId, AgentLogin):
            return defer.Deferred.fromCoroutine(self._agentAvatar(avatarId, mind))
        raise NotImplementedError(f"unknown login {avatarId!r}")

    async def _agentAvatar(self, login: AgentLogin, mind: Any) -> Any:
        source = describeAddress(mind.peer) if isinstance(mind, PeerMind) else "unknown"
        kex = mind.kex if isinstance(mind, PeerMind) else None
        presented = PresentedCertificate.check(
            mind.certificate if isinstance(mind, PeerMind) else None,
            self._ca,
            self._clock.seconds(),
            login.keyFingerprint,
        )
        try:
            contact = await self._store.recordContact(
                login.requestedName,
                login.publicKey,
                login.keyFingerprint,
                None,
                source,
                self._clock.seconds(),
                limits=self._pendingLimits,
                link=lambda name: attrs.evolve(presented.linkRecordFor(name), kex=kex),
            )
        except PendingLimitReached as e:
            self._log.warn(
                "refused new device {requested} from {source}: {reason}",
                requested=login.requestedName,
                source=source,
                reason=str(e),
            )
            raise PendingRefused(str(e)) from None
        deviceName = None
        pendingKind = None
        if isinstance(contact, Device):
            if contact.state != "approved":
                self._log.warn(
                    "refused {state} device {device} from {source}",
                    state=contact.state,
                    device=contact.name,
                    source=source,
                )
                raise UnauthorizedLogin(f"device {contact.name} is {contact.state}")
            deviceName = contact.name
            login = self._admitCertificate(presented.verdictFor(contact.name), login, contact.name)
        else:
            pendingKind = contact.kind
        avatar = AgentAvatar(
            login,
            deviceName,
            self._registry,
            self._store,
            self._clock,
            self._agentRequests,
            source=source,
            pendingKind=pendingKind,
        )
        return IConchUser, avatar, avatar.logout

    def _admitCertificate(
        self, verdict: CertificateVerdict, login: AgentLogin, name: str
    ) -> AgentLogin:
        """
        Refuse the login of device C{name} if its certificate's verdict says so (the store
        has recorded no link for it, by the same verdict); otherwise return the login with
        the certificate that vouches for it, if one does, for the link's log line.
        """
        refusal = verdict.refusal
        if refusal is not None:
            if verdict.certificate is not None:
                self._log.warn(
                    "device {device} presented the certificate of {other}; refused",
                    device=name,
                    other=verdict.certificate.deviceName,
                    finding=verdict.finding.value,
                )
            raise UnauthorizedLogin(refusal)
        if verdict.vouching is None:
            return login
        return attrs.evolve(login, certificate=verdict.vouching)


class _PortalWithPeer:
    """A portal view that hands the realm the peer's address as the mind."""

    def __init__(self, portal: Portal, mind: PeerMind) -> None:
        self._portal = portal
        self._mind = mind

    def listCredentialsInterfaces(self) -> list[Any]:
        return self._portal.listCredentialsInterfaces()

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        return self._portal.login(credentials, self._mind, *interfaces)


class GroundControlUserAuth(HostboundUserAuthMixin, userauth.SSHUserAuthServer):
    """Public keys only (OpenSSH's host-bound form too); a bounded number of attempts."""

    #: Our server transport (Conch's is Optional: unset before the service starts).
    transport: Any

    def serviceStarted(self) -> None:
        settings: ServerSettings = self.transport.factory.settings
        # Conch disconnects when attempts exceed this, so N allows N attempts.
        self.attemptsBeforeDisconnect = settings.maxAuthAttempts - 1
        # The transport's grace timer covers authentication as a whole.
        self.loginTimeout = int(settings.loginGraceTime) + 1
        self.clock = self.transport.factory.clock
        super().serviceStarted()
        self.portal = _PortalWithPeer(
            self.portal,
            PeerMind(
                self.transport.getPeer(),
                peerCertificate(self.transport.transport),
                policy.negotiatedKex(self.transport),
            ),
        )
        self.supportedAuthentications = [b"publickey"]

    # Conch's two errbacks below re-raise a Failure they do not handle (Failure.trap).
    # The exception raised that way holds a traceback whose frames hold that Failure,
    # which holds the exception: a cycle of frames, tracebacks and Failures (about 20
    # tracked objects, more with the frames of the caller's stack) that only the cyclic
    # collector frees, made twice by every login (the "none" method tried first, and the
    # key query answered with PK_OK) and once more by every refused one. These pass the
    # Failure on instead: the next errback gets the same exception, nothing is raised.
    # They override private methods: tests/test_conch_overrides.py fails if Conch renames,
    # rewires or fixes them.

    def _ebCheckKey(self, reason: Any, packet: bytes) -> Any:
        if not reason.check(error.ValidPublicKey):
            return reason
        return super()._ebCheckKey(reason, packet)

    def _ebMaybeBadAuth(self, reason: Any) -> Any:
        if not reason.check(error.NotEnoughAuthentication):
            return reason
        return super()._ebMaybeBadAuth(reason)

    def _ebBadAuth(self, reason: Any) -> None:
        try:
            if reason.check(PendingRefused):
                # Say why, so the device's log shows it, instead of a bare failure.
                self.transport.sendDisconnect(
                    transport.DISCONNECT_TOO_MANY_CONNECTIONS,
                    str(reason.value).encode("utf-8", "replace"),
                )
                return
            super()._ebBadAuth(reason)
        finally:
            _dropTracebacks(reason)


def _dropTracebacks(reason: Failure) -> None:
    """
    A failed login is answered (and logged): drop the tracebacks of its Failure and of
    the exceptions it was raised from. Their frames hold the Failure (a refusal raised
    in a coroutine that Deferred callbacks ran), or the Failure of a store call it
    awaited (C{Deferred.__await__} re-raises one from C{Failure.raiseException}, whose
    frame holds it), so each would be a cycle only the cyclic collector frees.
    """
    reason.tb = None
    exception: BaseException | None = reason.value
    for _ in range(8):  # the chain a refusal can have is short; never loop on a long one
        if exception is None:
            break
        exception.__traceback__ = None
        exception = exception.__cause__ or exception.__context__


class GroundControlConnection(TunnelConnection):
    """The ssh-connection service; for agents, the device's link."""

    _log = Logger()
    #: Conch logs every message number this service does not know at info, with the
    #: payload's repr: a peer's to write into our log without end. Written at debug
    #: (accesstunnel.logfilter), as OpenSSH does; still answered UNIMPLEMENTED.
    conchEventsSaidOtherwise = frozenset({"couldn't handle {messageNum} {packet!r}"})

    def __init__(self) -> None:
        super().__init__()
        #: The enrollment requests this link makes (L{gotGlobalRequest}).
        self._enrollmentRequests = ConnectionAllowance(_ENROLLMENT_ALLOWANCE)
        #: The peer said it opens no more sessions (L{NO_MORE_SESSIONS}).
        self._noMoreSessions = False

    # -- a peer that asks and does not read the answers ---------------------------

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        if not self.transport.dropPeerNotReading():
            super().ssh_GLOBAL_REQUEST(packet)

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        if self.transport.dropPeerNotReading():
            return
        channelType, rest = common.getNS(packet)
        if channelType == b"session" and self._noMoreSessions:
            self._sessionAfterNoMore()
            return
        senderChannel, _, maxPacket = struct.unpack(">3L", rest[:12])
        if maxPacket < MIN_PEER_MAX_PACKET:
            # Refused before anything is looked up or opened on its behalf.
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE,
                packOpenFailure(
                    senderChannel,
                    connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                    f"maximum packet size {maxPacket} too small (at least {MIN_PEER_MAX_PACKET})",
                ),
            )
            return
        super().ssh_CHANNEL_OPEN(packet)

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        """A peer confirming our channel with a tiny maximum packet is dropped."""
        maxPacket = struct.unpack(">L", packet[12:16])[0]
        if maxPacket < MIN_PEER_MAX_PACKET:
            self._log.warn(
                "disconnecting {peer}: it confirmed a channel with a maximum packet "
                "size of {maxPacket}",
                peer=describeAddress(self.transport.getPeer()),
                maxPacket=maxPacket,
            )
            self.transport.sendDisconnect(
                transport.DISCONNECT_PROTOCOL_ERROR, b"maximum packet size too small"
            )
            return
        super().ssh_CHANNEL_OPEN_CONFIRMATION(packet)

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> Any:
        if not self.transport.dropPeerNotReading():
            return super().ssh_CHANNEL_REQUEST(packet)
        return None

    def _unsentToPeer(self) -> int:
        """
        Bytes the link's socket holds unsent; 0 while the link takes more (a paused link
        is the only time there can be much).
        """
        flow = self.linkFlow
        if flow is None or not flow.paused:
            return 0
        return unsentBytes(getattr(flow, "_transport", None))

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        """
        Enrollment requests beyond the link's allowance are refused unanswered;
        L{NO_MORE_SESSIONS} is noted and granted.
        """
        if requestType == NO_MORE_SESSIONS:
            self._noMoreSessions = True
            return 1
        if requestType in AgentRequests.handled and not self._spendEnrollmentRequest():
            return 0
        return super().gotGlobalRequest(requestType, data)

    def _sessionAfterNoMore(self) -> None:
        """
        A session opened after L{NO_MORE_SESSIONS}: disconnected, as sshd does. OpenSSH's
        client asks for it when it will open no other (it is not a ControlMaster), so
        that whoever takes over the connection afterwards (a hijacked client) gets no
        session of their own on the operator's grant.
        """
        self._log.warn(
            "disconnecting {peer}: a session opened after no-more-sessions",
            peer=describeAddress(self.transport.getPeer()),
        )
        self.transport.sendDisconnect(
            transport.DISCONNECT_PROTOCOL_ERROR, b"session opened after no-more-sessions"
        )

    def _spendEnrollmentRequest(self) -> bool:
        # A rate: measured on a clock that does not step (a step back was owed as requests).
        now = elapsedClock(self.transport.factory.clock)()
        if self._enrollmentRequests.spend(now):
            return True
        if self._enrollmentRequests.logRefusal(
            now, ENROLLMENT_REQUEST_INTERVAL * ENROLLMENT_REQUEST_BURST
        ):
            self._log.warn(
                "refusing enrollment requests from {peer}: more than {burst} at once "
                "(then one per {interval:.0f} s)",
                peer=describeAddress(self.transport.getPeer()),
                burst=ENROLLMENT_REQUEST_BURST,
                interval=ENROLLMENT_REQUEST_INTERVAL,
            )
        return False

    def serviceStarted(self) -> None:
        super().serviceStarted()
        if self.linkFlow is not None:  # every connection: read and buffer it in larger pieces
            self.linkFlow.widen()
        self.transport.startKeepalive(self)
        linkUp = getattr(self.transport.avatar, "linkUp", None)
        if linkUp is not None:
            linkUp(self)
        else:
            self.transport.preferAESGCM()


def unsentBytes(socket: Any) -> int:
    """Bytes a Twisted socket (a C{FileDescriptor}) holds unsent; 0 for anything else."""
    try:
        return len(socket.dataBuffer) - socket.offset + socket._tempDataLen
    except (AttributeError, TypeError):
        return 0


def agentProbeAfter(interval: float, count: int) -> float:
    """
    Seconds of silence before groundcontrol pings an agent: half an interval before
    the deadline (37.5 s with 15 s x 3). An agent with the default keepalive is
    heard from every 30 s (it checks every 15 s and pings when nothing came since
    its last check, so every other check), so it is never pinged; a quiet one has
    half an interval to answer.
    """
    return max(interval, interval * count - interval / 2)


class GroundControlTransport(
    QuickAckMixin,
    KeepaliveTransportMixin,
    RekeyingTransportMixin,
    AESGCMAfterLoginMixin,
    PreauthMixin,
    PingReplyMixin,
    fastpath.FastPathMixin,
    transport.SSHServerTransport,
):
    """
    Server transport with the algorithm policy, a grace time, keepalives and rekeying,
    and OpenSSH's ping answered (groundcontrol.pingreply; after PreauthMixin, whose
    bounds count a ping before login as any other packet).
    """

    _log = Logger()
    ourVersionString = SERVER_VERSION_LINE
    _graceTimer: Any = None
    #: The key re-exchanges a logged-in peer starts (L{ssh_KEXINIT}); None: unbounded
    #: (L{ServerSettings.peerRekeyBurst} 0).
    _peerRekeys: ConnectionAllowance | None = None

    def connectionMade(self) -> None:
        hostKeyAlgorithms = self.supportedPublicKeys
        policy.applyServerPolicy(self)
        self.supportedPublicKeys = [a for a in hostKeyAlgorithms if a in policy.HOST_KEY_ALGORITHMS]
        tcp = self.transport
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(tcp, option, None)
            if setter is not None:
                setter(True)
        settings: ServerSettings = self.factory.settings
        self._graceTimer = self.factory.clock.callLater(settings.loginGraceTime, self._graceExpired)
        if settings.peerRekeyAllowance is not None:
            self._peerRekeys = ConnectionAllowance(settings.peerRekeyAllowance)
        super().connectionMade()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        """
        The peer said why it disconnects. Conch logs every one at error level, over two
        lines, with the peer's words as sent: an operator's ssh leaving (by application,
        11) is how every session ends, and the words are the peer's to write (new lines,
        escape sequences). That one is debug; any other is one info line, the words inert.
        """
        fields = {
            "peer": describeAddress(self.transport.getPeer()),
            "code": reasonCode,
            "reason": inertText(description, 200),
        }
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            self._log.debug("{peer} disconnected: {reason}", **fields)
        else:
            self._log.info("{peer} disconnected with code {code}: {reason}", **fields)

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        """
        Conch's, for the first request only. Conch starts any service asked for
        at any time: a logged-in client asking for ssh-userauth again would
        replace its running connection (every channel of it closed) and could
        start logging in anew. OpenSSH's sshd answers UNIMPLEMENTED to it once a
        service runs; so does groundcontrol.
        """
        if self.service is not None:
            if self.dropPeerNotReading():
                return
            rejected = (self.incomingPacketSequence - 1) & 0xFFFFFFFF
            self.sendPacket(transport.MSG_UNIMPLEMENTED, struct.pack(">L", rejected))
            return
        super().ssh_SERVICE_REQUEST(packet)

    def ssh_KEXINIT(self, packet: bytes) -> Any:
        """
        A re-exchange the logged-in peer starts (not an answer to ours) spends its
        allowance (L{ServerSettings.peerRekeyBurst}); with none left the peer is
        disconnected.
        """
        if (
            hasattr(self, "avatar")
            and self._keyExchangeState == self._KEY_EXCHANGE_NONE
            and not self._spendPeerRekey()
        ):
            settings: ServerSettings = self.factory.settings
            self._log.warn(
                "disconnecting {peer}: more than {burst} key exchanges at once "
                "(then one per {interval:g} s)",
                peer=describeAddress(self.transport.getPeer()),
                burst=settings.peerRekeyBurst,
                interval=settings.peerRekeyInterval,
            )
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"too many key exchanges")
            return None
        return super().ssh_KEXINIT(packet)

    def _spendPeerRekey(self) -> bool:
        peerRekeys = self._peerRekeys
        # A rate: on a clock that does not step (a step back of an hour was owed as 14,400
        # re-exchanges, and the agent's next one dropped its link).
        return peerRekeys is None or peerRekeys.spend(elapsedClock(self.factory.clock)())

    def sendUnimplemented(self) -> None:
        if not self.dropPeerNotReading():
            super().sendUnimplemented()

    def dropPeerNotReading(self) -> bool:
        """
        Whether the peer was dropped, asking for another answer with more than
        L{MAX_UNSENT_FOR_PEER} of ours unread: aborted, not closed politely, which
        would wait for it to read them.
        """
        unsent = getattr(self.service, "_unsentToPeer", None)
        if unsent is None or unsent() <= MAX_UNSENT_FOR_PEER:
            return False
        self._log.warn(
            "dropping {peer}: it does not read ({unsent} bytes unsent) and asks for more",
            peer=describeAddress(self.transport.getPeer()),
            unsent=unsent(),
        )
        tcp = self.transport
        self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"not reading")
        abort = getattr(tcp, "abortConnection", None)
        if abort is not None:
            abort()
        return True

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        # Advertise the user-key signature algorithms we accept, not our host
        # key types: clients pick rsa-sha2-* over ssh-rsa from this list. And the
        # host-bound login GroundControlUserAuth takes (groundcontrol.hostbound).
        extensions = [
            (name, b",".join(USER_KEY_ALGORITHMS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ]
        super().sendExtInfo([*extensions, HOSTBOUND_EXTENSION])

    def _graceExpired(self) -> None:
        self._graceTimer = None
        if not hasattr(self, "avatar"):
            self._log.info("login grace time over for {peer}", peer=self.transport.getPeer())
            self.sendDisconnect(
                transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"login grace time exceeded"
            )

    def _loginIsNoauth(self) -> bool:
        """A device still pending when its link ends: any key can log in as one."""
        avatar = getattr(self, "avatar", None)
        return isinstance(avatar, AgentAvatar) and avatar.deviceName is None

    def startKeepalive(self, conn: TunnelConnection) -> None:
        """
        Authenticated: stop the grace timer and watch the peer for silence.

        Operators (OpenSSH sends no keepalives by default) are pinged after one
        interval of silence. Agents ping us every 30 s on their own (their
        keepalive, answered, is proof of life both ways), so on an agent link we
        only probe after L{agentProbeAfter} seconds of silence: nothing is sent
        while the agent's pings arrive, and a link that goes quiet is still
        dropped after interval * count seconds.
        """
        if self._graceTimer is not None and self._graceTimer.active():
            self._graceTimer.cancel()
        self._graceTimer = None
        settings: ServerSettings = self.factory.settings
        interval, count = settings.keepaliveInterval, settings.keepaliveCount
        isAgent = isinstance(self.avatar, AgentAvatar)
        if isAgent:
            # Our agent turns Nagle off from its first byte: quick ACKs (a setsockopt
            # and a bare ACK segment per read) buy an agent link nothing after login.
            self.stopQuickAcks()
            probeAfter = agentProbeAfter(interval, count)
            self.watchPeer(
                conn, self.factory.clock, interval, count, probeAfter, self.factory.sweep
            )
        else:
            self.watchPeer(conn, self.factory.clock, interval, count)
        # Logged in: once the quick ACKs are over too (at once on an agent link), reads
        # and packets skip the layers with nothing left to do (fastpath.enterSteadyState).
        self.enterSteadyState()

    def connectionLost(self, reason: Any = None) -> None:
        if self._graceTimer is not None and self._graceTimer.active():
            self._graceTimer.cancel()
        super().connectionLost(reason)
        # Freed by reference counting at once, not at a full pass of the cyclic
        # collector, which in a reconnect storm may be the storm's end (stormgc).
        letGo(self)


class GroundControlFactory(factory.SSHFactory):
    """Builds front-door transports; holds the host keys and the portal."""

    protocol = GroundControlTransport

    def __init__(
        self,
        hostKey: keys.Key,
        portal: Portal,
        clock: IReactorTime,
        settings: ServerSettings | None = None,
    ) -> None:
        self.privateKeys = {hostKey.sshType(): hostKey}
        self.publicKeys = {hostKey.sshType(): hostKey.public()}
        self.portal = portal
        self.clock = clock
        self.settings = settings or ServerSettings()
        #: One timer for the agent links' keepalive looks (accesstunnel.keepalive).
        self.sweep = KeepaliveSweep(clock)
        #: Connections waiting for a handshake slot (the limiter in front sets it).
        self.handshakesWaiting: Callable[[], int] = lambda: 0
        self.services = {
            b"ssh-userauth": GroundControlUserAuth,
            b"ssh-connection": GroundControlConnection,
        }

    def getPrimes(self) -> None:
        return None  # no group-exchange key exchange is offered

    def buildProtocol(self, addr: Any) -> Any:
        """
        Conch's, without its per-connection log line about the missing moduli file:
        group-exchange is never offered here, and under a reconnect storm or a flood
        that line was written for every connection.
        """
        t = protocol.Factory.buildProtocol(self, addr)
        if t is not None:
            t.supportedPublicKeys = [
                algorithm
                for key in self.privateKeys.values()
                for algorithm in key.supportedSignatureAlgorithms()
            ]
        return t


def buildFrontDoor(
    store: IStore,
    hostKey: keys.Key,
    clock: IReactorTime,
    settings: ServerSettings | None = None,
    registry: Registry | None = None,
    certificates: CertificatePolicy | None = None,
) -> tuple[GroundControlFactory, Registry]:
    """Assemble checker, realm, portal and factory around a store."""
    registry = registry if registry is not None else Registry()
    waitPolicy = settings.deviceWait if settings else None
    waits = None
    if waitPolicy is not None and waitPolicy.maxWait > 0:
        waits = DeviceWaits(waitPolicy, registry, clock, store.interactive())
    router = SessionRouter(
        store, registry, clock, settings.sessions if settings else None, waits=waits
    )
    agentRequests = AgentRequests(store, clock, certificates)
    realm = GroundControlRealm(
        store,
        registry,
        router,
        clock,
        agentRequests,
        settings.pendingLimits if settings else None,
        ca=certificates.ca if certificates else None,
    )
    portal = Portal(realm, [FleetKeyChecker(store)])
    return GroundControlFactory(hostKey, portal, clock, settings), registry
