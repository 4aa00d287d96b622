"""
The two kinds of logged-in peer: operators and device agents.

An operator's channels are routed to devices. An agent's connection is the
device's link: groundcontrol opens channels on it, and the agent opens channels
back only for what an operator's session set up (remote forwards, agent and X11
forwarding; L{AgentAvatar.lookupChannel}).
"""

from __future__ import annotations

from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import connection, transport
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock
from accesstunnel.durations import spokenDuration
from accesstunnel.enrollmessages import APPROVED, encodeMessage
from accesstunnel.policy import negotiatedKex
from groundcontrol.auth import AgentLogin, OperatorLogin, logLinkAccepted
from groundcontrol.enrollment import AgentRequests
from groundcontrol.flapping import limiterFor
from groundcontrol.forwarding import RemoteForwards, relayFromDevice
from groundcontrol.registry import Registry
from groundcontrol.relay import refusal
from groundcontrol.router import SessionRouter
from groundcontrol.store import IStore, LinkRecord


class OperatorAvatar(ConchUser):
    """An operator: every channel they open is routed to a device."""

    _log = Logger()

    def __init__(self, login: OperatorLogin, router: SessionRouter) -> None:
        super().__init__()
        self.login = login
        self._router = router
        #: Remote forwards not answered yet (one may wait for its device to reconnect).
        self._forwardsAsked: set[defer.Deferred[Any]] = set()

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(
            self._router.openChannel(
                self.login.account,
                self.login.target,
                channelType,
                windowSize,
                maxPacket,
                data,
                operatorConn=getattr(self, "conn", None),
            )
        )

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        """Remote forwards go to the device; anything else (keepalives) is refused."""
        asked = defer.Deferred.fromCoroutine(
            self._router.forwardRequest(
                self.login.account,
                self.login.target,
                getattr(self, "conn", None),
                requestType,
                data,
            )
        )
        if not asked.called:
            self._forwardsAsked.add(asked)
            asked.addBoth(self._answered, asked)
        return asked

    def _answered(self, result: Any, asked: defer.Deferred[Any]) -> Any:
        self._forwardsAsked.discard(asked)
        return result

    def logout(self) -> None:
        """
        Channels close with the connection; remote forwards are taken down, and those
        still waiting for their device to reconnect are given up (no waiter left behind).
        """
        for asked in list(self._forwardsAsked):
            asked.cancel()
        conn = getattr(self, "conn", None)
        if conn is not None:
            self._router.operatorGone(self.login.target, conn)
        # The connection (Conch set conn) holds its transport, which holds this avatar.
        self.conn = None


class DeviceLink:
    """A device agent's live connection, as the registry and router see it."""

    _log = Logger()

    def __init__(
        self,
        deviceName: str,
        fingerprint: str,
        conn: connection.SSHConnection,
        clock: IReactorTime,
    ) -> None:
        self.deviceName = deviceName
        self.fingerprint = fingerprint
        self.conn = conn
        self._clock = clock
        self.connectedAt = clock.seconds()  # a date (ctl show's online since)
        #: When it connected on the elapsed clock: how long it was connected.
        self.connectedElapsed = elapsedClock(clock)()
        self.details: dict[str, Any] = {}
        self.avatar: Any = None
        self.remoteForwards = RemoteForwards()

    def openChannel(self, channel: Any, data: bytes) -> None:
        """Open C{channel} towards the agent."""
        channel.conn = self.conn
        self.conn.openChannel(channel, data)

    def close(self, reason: str) -> None:
        """
        Disconnect the agent, telling it why. A link being replaced may be
        half-open, so the socket is aborted if a polite close has not finished
        within a second.
        """
        sshTransport = self.conn.transport
        if sshTransport is None or sshTransport.transport is None:
            return
        self._log.info("closing link of {device}: {reason}", device=self.deviceName, reason=reason)
        sshTransport.sendDisconnect(
            transport.DISCONNECT_BY_APPLICATION, reason.encode("utf-8", "replace")
        )
        tcp = sshTransport.transport
        if hasattr(tcp, "abortConnection"):
            self._clock.callLater(1.0, _abortIfOpen, tcp)


def _abortIfOpen(tcp: Any) -> None:
    if getattr(tcp, "connected", False) and not getattr(tcp, "disconnected", True):
        tcp.abortConnection()


class AgentAvatar(ConchUser):
    """
    A device's agent. It is routable when its key belongs to an approved
    device (C{deviceName} set), otherwise it waits as pending.
    """

    _log = Logger()

    def __init__(
        self,
        login: AgentLogin,
        deviceName: str | None,
        registry: Registry,
        store: IStore,
        clock: IReactorTime,
        requests: AgentRequests,
        source: str = "unknown",
        pendingKind: str | None = None,
    ) -> None:
        super().__init__()
        self.login = login
        self.deviceName = deviceName
        self._registry = registry
        self._store = store
        self._clock = clock
        self._requests = requests
        self.source = source
        self.pendingKind = pendingKind
        #: Tags the agent reported in its hello (stored once it is approved).
        self.reportedTags: list[str] | None = None
        self.link: DeviceLink | None = None

    def linkUp(self, conn: connection.SSHConnection) -> None:
        """The agent's ssh-connection service started: register the link."""
        self.link = DeviceLink(
            self.deviceName or self.login.requestedName,
            self.login.keyFingerprint,
            conn,
            self._clock,
        )
        self.link.avatar = self
        if self.deviceName is None:
            self._log.info(
                "device asking for name {requested} is pending approval (key {fingerprint})",
                requested=self.login.requestedName,
                fingerprint=self.login.keyFingerprint,
            )
            self._registry.attachPending(self.link)
        else:
            logLinkAccepted(
                self._log,
                self.deviceName,
                self.login,
                self.source,
                self._clock.seconds(),
                negotiatedKex(conn.transport),
            )
            self._attachRoutable(self.link)

    def _attachRoutable(self, link: DeviceLink) -> None:
        """Route the device over C{link}; an online event unless it replaces a live link."""
        assert self.deviceName is not None
        replacing = self._registry.lookup(self.deviceName) is not None
        self._registry.attach(link)
        if not replacing:  # a newer link of a connected device is no transition
            limiterFor(self._registry, self._store, self._clock).online(
                self.deviceName,
                {"source": self.source, "fingerprint": self.login.keyFingerprint},
            )

    def promote(self, deviceName: str, notify: bool = True) -> None:
        """
        This pending device was approved (by an admin, a token or a claim):
        make it routable now, and tell the agent so it fetches a certificate.
        """
        self.deviceName = deviceName
        self.pendingKind = None
        link = self.link
        if link is None:
            return
        link.deviceName = deviceName
        self._log.info("device {device} approved and routable", device=deviceName)
        self._attachRoutable(link)
        self._recordPromotedLink(deviceName)
        defer.Deferred.fromCoroutine(self._requests.reportTags(self)).addErrback(
            lambda f: self._log.failure("could not store the reported tags", f)
        )
        if notify:
            link.conn.sendGlobalRequest(APPROVED, encodeMessage({"name": deviceName}))

    def _recordPromotedLink(self, deviceName: str) -> None:
        """
        Record this link as the device's last (C{device show}): it was accepted while the
        key was pending, when no device record held it. Approved on it, it is a link by
        the device's key (a certificate, if one came, was not for an approved device
        then), over the key exchange it negotiated. The same store call a link of an
        approved device makes at its login, once per approval.
        """
        login = self.login
        kex = None if self.link is None else negotiatedKex(self.link.conn.transport)
        self._store.recordContact(
            login.requestedName,
            login.publicKey,
            login.keyFingerprint,
            None,
            self.source,
            self._clock.seconds(),
            link=lambda name: LinkRecord(kex=kex),
        ).addErrback(
            lambda f: self._log.failure(
                "could not record the link of approved device {device}", f, device=deviceName
            )
        )

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> Any:
        """Channels back to an operator: remote forwards, agent and X11 forwarding."""
        if self.link is None or self.deviceName is None:
            raise refusal("devices waiting for approval may not open channels")
        return defer.Deferred.fromCoroutine(
            relayFromDevice(self.link, channelType, windowSize, maxPacket, data)
        )

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        """
        Enrollment requests are answered (later, in order); the rest refused.

        The refusal is returned at once, not through a coroutine: an idle fleet's
        keepalives are most of what reaches here, and an answer that is ready at once
        goes out at once (L{accesstunnel.connection}).
        """
        if requestType not in self._requests.handled:
            return 0
        return defer.Deferred.fromCoroutine(self._requests.handle(self, requestType, data))

    def logout(self) -> None:
        # The connection (Conch set conn) holds its transport, which holds this avatar.
        self.conn = None
        link, self.link = self.link, None
        if link is None:
            return
        wasRoute = self.deviceName is not None and self._registry.lookup(self.deviceName) is link
        self._registry.detach(link)
        if self.deviceName is not None:
            # To 0.1 s, as every duration in the documents: a webhook's 23.138279676437378
            # claimed a precision the clock does not have and nobody reads.
            connectedFor = round(elapsedClock(self._clock)() - link.connectedElapsed, 1)
            self._log.info(
                "device {device} disconnected after {lasted}",
                device=self.deviceName,
                lasted=spokenDuration(connectedFor),
                connectedFor=connectedFor,
            )
            if wasRoute:  # not replaced by a newer link of the same device
                limiterFor(self._registry, self._store, self._clock).offline(
                    self.deviceName, {"connectedFor": connectedFor}
                )
            self._store.touchDevice(self.deviceName, self._clock.seconds()).addErrback(
                lambda f: self._log.failure("could not record last seen", f)
            )
