"""
Routing an operator's channels and forwarding requests to a device: the
checks, in order, and the words an operator sees when one fails.

A malformed name is refused before any lookup. Then the device must exist and
be reachable by this account (an operator is not told which of the two failed),
not be revoked, and be connected now, or reconnect within the device wait if it was
online recently (L{groundcontrol.devicewait}); only then
is a channel opened on its link, and the operator's channel is confirmed with
the device's own answer.

``ctl`` is groundcontrol's own control shell; a ``direct-tcpip`` channel
through ``ctl`` to host ``dev_NAME`` is ProxyJump (``ssh -J ctl@gc
root@dev_NAME``): groundcontrol relays bytes to the device's own sshd and
never sees inside the end-to-end session.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs
from twisted.conch.ssh import common, connection
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from accesstunnel.channel import DEFAULT_MAX_PACKET, DEFAULT_WINDOW, LINK_MAX_PACKET
from accesstunnel.clocks import elapsedClock
from accesstunnel.durations import spokenDuration
from accesstunnel.timetext import absoluteTime, relativeTime
from groundcontrol.clientaddress import CLIENT_ADDRESS_REQUEST, clientAddressPayload
from groundcontrol.control import ControlChannel, ControlContext
from groundcontrol.devicewait import (
    DeviceElsewhereError,
    DeviceNotBackError,
    DeviceWaits,
    WaitRefusedError,
)
from groundcontrol.forwarding import (
    CANCEL_SOCKET_FORWARD,
    SOCKET,
    SOCKET_FORWARD,
    MalformedPayload,
    cancelRequest,
    forwardName,
    parseForwardRequest,
    parseSocketForwardRequest,
)
from groundcontrol.registry import Registry
from groundcontrol.relay import RelayChannel, refusal, splice
from groundcontrol.store import Account, Device, IStore
from groundcontrol.usernames import (
    DEVICE_PREFIX,
    ControlTarget,
    DeviceTarget,
    MalformedTarget,
    Target,
    parseUsername,
)

#: ssh -L to a UNIX socket path on the device (OpenSSH's name for it).
DIRECT_STREAMLOCAL = b"direct-streamlocal@openssh.com"

#: Channel types that forward a connection (ssh -L, -W, -D), under --no-port-forwarding.
_LOCAL_FORWARDS = frozenset({b"direct-tcpip", DIRECT_STREAMLOCAL})

#: Channel types an operator may open on a device.
RELAYED_CHANNEL_TYPES = frozenset({b"session"}) | _LOCAL_FORWARDS

_FORWARD_REQUESTS = (b"tcpip-forward", b"cancel-tcpip-forward")
_SOCKET_FORWARD_REQUESTS = (SOCKET_FORWARD, CANCEL_SOCKET_FORWARD)
_CANCELS = (b"cancel-tcpip-forward", CANCEL_SOCKET_FORWARD)

#: Ports below this only root may listen on (sshd: IPPORT_RESERVED).
_PRIVILEGED_PORTS = 1024


@attrs.frozen
class SessionPolicy:
    """What operators may do beyond a session, and how many channels they get."""

    #: Channels one operator connection may have open (sshd's MaxSessions).
    maxSessionsPerConnection: int = 10
    #: Channels one device link may carry at once, all operators together.
    maxChannelsPerLink: int = 1000
    permitLocalForwarding: bool = True
    permitRemoteForwarding: bool = True
    permitAgentForwarding: bool = False
    permitX11Forwarding: bool = True

    def refusedRequests(self) -> frozenset[bytes]:
        refused = set()
        if not self.permitAgentForwarding:
            refused.add(b"auth-agent-req@openssh.com")
        if not self.permitX11Forwarding:
            refused.add(b"x11-req")
        return frozenset(refused)


def describeLastSeen(lastSeen: float | None, now: float) -> str:
    """'last seen 2026-11-25T13:02:07Z, 5 min ago' for offline errors, in the shell's spelling."""
    if lastSeen is None:
        return "it has never connected"
    ago = relativeTime(lastSeen, now)
    # "now" is for a moment that is still going on: an offline device was seen before it.
    return f"last seen {absoluteTime(lastSeen)}, {'0 s ago' if ago == 'now' else ago}"


def _openChannelCount(conn: Any) -> int:
    return len(getattr(conn, "channels", ())) + len(getattr(conn, "_pendingOpens", ()))


class SessionRouter:
    """Open the device side of an operator's channels and forwards."""

    _log = Logger()

    def __init__(
        self,
        store: IStore,
        registry: Registry,
        clock: IReactorTime,
        policy: SessionPolicy | None = None,
        waits: DeviceWaits | None = None,
    ) -> None:
        # Operators opening sessions and admins in the control shell wait on these
        # calls: ahead of the fleet's queued bookkeeping (IStore.interactive).
        self._store = store.interactive()
        self._registry = registry
        self._clock = clock
        self.policy = policy or SessionPolicy()
        #: Channel opens waiting for recently seen devices to reconnect (None: never wait).
        self.waits = waits

    async def reachableLink(self, account: Account, name: str, wait: bool = False) -> Any:
        """
        The live link of device C{name} if C{account} may reach it, else a refusal.

        An operator may not learn which devices exist beyond those they may reach (C{ctl ls}
        and C{show} hide the rest): a name that is unknown and one they hold no grant for get
        the same words, after the same two lookups. Admins, and operators whose grant names
        the device, are told exactly what is wrong; the log always says it.

        With C{wait}, an offline device seen recently is waited for (L{_waitForLink}).
        """
        now = self._clock.seconds()
        device = await self._store.deviceByName(name)
        allowed = await self._store.mayReach(account, name, now)
        if device is None or not allowed:
            reason = "unknown device" if device is None else "no grant"
            self._log.info(
                "refused {account} a channel to {device}: {reason}",
                account=account.name,
                device=name,
                reason=reason,
            )
            if allowed:
                raise refusal(f"unknown device {name!r}")
            raise refusal(
                f"unknown device {name!r}, or account {account.name!r} has no grant for it"
            )
        if device.state != "approved":
            raise refusal(f"device {name!r} is {device.state}")
        link = self._registry.lookup(name)
        if link is None:
            if wait and self.waits is not None and self.waits.worthWaiting(device, now):
                return await self._waitForLink(account, device)
            raise refusal(
                f"device {name!r} is offline ({describeLastSeen(device.lastSeen, now)})",
                connection.OPEN_CONNECT_FAILED,
            )
        return link

    async def _waitForLink(self, account: Account, device: Device) -> Any:
        """
        Hold the channel open, unanswered, until the recently seen C{device} reconnects
        (its link), or refuse it: not back within the wait, back on another node, too many
        waiting already. One log line says how long it waited and how it ended.

        Once it is back, the account and the device are checked again, as for a channel
        opened now: the grant (or lease) and the device's state were read as the wait began,
        up to the wait's length before, and a grant removed, a lease ended or the device
        revoked meanwhile must not let the channel open.
        """
        assert self.waits is not None
        name = device.name
        try:
            waiting = self.waits.wait(name)
        except WaitRefusedError as e:
            self._log.info(
                "refused {account} a wait for device {device} to reconnect: {reason}",
                account=account.name,
                device=name,
                reason=str(e),
            )
            raise refusal(
                f"device {name!r} is offline "
                f"({describeLastSeen(device.lastSeen, self._clock.seconds())}); "
                f"not waiting for it to reconnect: {e}",
                connection.OPEN_RESOURCE_SHORTAGE,
            ) from None
        startedAt = elapsedClock(self._clock)()  # how long it waited: a clock step moves none
        outcome = "it did"
        try:
            await waiting
        except defer.CancelledError:
            outcome = "the operator left"
            raise
        except DeviceNotBackError:
            outcome = "it did not"
            raise await self._offlineAfterWait(name, startedAt, "") from None
        except DeviceElsewhereError:
            outcome = "it logged in elsewhere"
            raise await self._offlineAfterWait(
                name,
                startedAt,
                ": its agent logged in elsewhere (another groundcontrol node routes it) or was "
                "refused",
            ) from None
        finally:
            waited = round(elapsedClock(self._clock)() - startedAt, 1)
            self._log.info(
                "{account} waited {waited} for device {device} to reconnect: {outcome}",
                account=account.name,
                waited=spokenDuration(waited),
                device=name,
                outcome=outcome,
                waitedFor=waited,
            )
        return await self.reachableLink(account, name)

    async def _offlineAfterWait(self, name: str, startedAt: float, why: str) -> Exception:
        """The refusal of a wait that ended without the link: the device as it is now."""
        now = self._clock.seconds()
        device = await self._store.deviceByName(name)
        if device is not None and device.state != "approved":
            return refusal(f"device {name!r} is {device.state}")
        lastSeen = describeLastSeen(device.lastSeen if device else None, now)
        return refusal(
            f"device {name!r} is offline ({lastSeen}); waited "
            f"{spokenDuration(round(elapsedClock(self._clock)() - startedAt, 1))} for it to "
            f"reconnect{why}",
            connection.OPEN_CONNECT_FAILED,
        )

    async def openChannel(
        self,
        account: Account,
        target: Target,
        channelType: bytes,
        windowSize: int,
        maxPacket: int,
        data: bytes,
        operatorConn: Any = None,
    ) -> RelayChannel | ControlChannel:
        """
        Return the operator's side of a channel spliced to the device's, or
        raise a refusal whose text the operator's ssh prints.
        """
        if isinstance(target, MalformedTarget):
            raise refusal(target.reason)
        limit = self.policy.maxSessionsPerConnection
        if operatorConn is not None and _openChannelCount(operatorConn) >= limit:
            raise refusal(
                f"too many channels on this connection (at most {limit})",
                connection.OPEN_RESOURCE_SHORTAGE,
            )
        if isinstance(target, ControlTarget):
            if channelType == b"direct-tcpip":
                return await self._proxyJump(account, windowSize, maxPacket, data, operatorConn)
            if channelType != b"session":
                raise refusal("the control shell serves session channels only")
            return ControlChannel(
                ControlContext(account, self._store, self._registry, self._clock),
                remoteWindow=windowSize,
                remoteMaxPacket=maxPacket,
            )
        assert isinstance(target, DeviceTarget)
        if channelType not in RELAYED_CHANNEL_TYPES:
            raise refusal(
                f"channel type {channelType.decode('ascii', 'replace')!r} is not relayed",
                connection.OPEN_UNKNOWN_CHANNEL_TYPE,
            )
        if channelType in _LOCAL_FORWARDS and not self.policy.permitLocalForwarding:
            raise refusal("port forwarding is not permitted on this server")
        link = await self.reachableLink(account, target.name, wait=True)
        if channelType == DIRECT_STREAMLOCAL:
            await self._refuseSocketsAsAnotherUser(account, link)
        return await self._relay(
            account, link, channelType, windowSize, maxPacket, data, operatorConn
        )

    async def _relay(
        self,
        account: Account,
        link: Any,
        channelType: bytes,
        windowSize: int,
        maxPacket: int,
        data: bytes,
        operatorConn: Any = None,
    ) -> RelayChannel:
        from groundcontrol.sessions import AuditRefusedError, sessionsFor

        limit = self.policy.maxChannelsPerLink
        if _openChannelCount(link.conn) >= limit:
            raise refusal(
                f"device {link.deviceName!r} is busy: {limit} channels open",
                connection.OPEN_RESOURCE_SHORTAGE,
            )
        # A grant may name the user the device session runs as (agent as root).
        loginUser = None
        refused = self.policy.refusedRequests()
        if channelType == b"session":
            now = self._clock.seconds()
            loginUser = await self._store.loginUserFor(account, link.deviceName, now)
            if self.policy.permitAgentForwarding and not (
                await self._store.agentForwardingAllowed(account, link.deviceName, now)
            ):
                # The server allows ssh -A, but this operator's grant does not.
                refused = refused | {b"auth-agent-req@openssh.com"}
        deviceSide = RelayChannel(
            localWindow=DEFAULT_WINDOW,
            localMaxPacket=LINK_MAX_PACKET,  # the agent is ours: larger packets
            label=f"device {link.deviceName}",
        )
        deviceSide.name = channelType
        link.openChannel(deviceSide, data)
        await deviceSide.opened
        if loginUser is not None:
            # Before any of the operator's requests: refused means no session at all.
            asked = deviceSide.sendRequestInOrder(
                b"login-user@accesstunnel", common.NS(loginUser.encode()), wantReply=True
            )
            try:
                assert asked is not None
                await asked
            except Exception:
                deviceSide.loseConnection()
                raise refusal(
                    f"device {link.deviceName!r} cannot run sessions as {loginUser!r} "
                    "(its agent must run as root, and the user exist there)"
                ) from None
        addresses = clientAddressPayload(operatorConn) if channelType == b"session" else None
        if addresses is not None:
            # No reply wanted: an older agent refuses it and the session goes on without.
            deviceSide.sendRequestInOrder(CLIENT_ADDRESS_REQUEST, addresses, wantReply=False)
        operatorSide = RelayChannel(
            localWindow=DEFAULT_WINDOW,
            localMaxPacket=DEFAULT_MAX_PACKET,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            label=f"operator {account.name}",
            towardsOperator=True,
        )
        operatorSide.refusedRequests = refused
        # Record, audit and let it be watched or killed: groundcontrol.sessions.
        sessions = sessionsFor(self._registry, self._store, self._clock)
        session = sessions.track(
            account.name, link.deviceName, channelType, operatorSide, deviceSide
        )
        # session.started is in the store before the operator's channel is confirmed.
        try:
            await sessions.announce(session, operatorConn)
        except AuditRefusedError as e:
            deviceSide.loseConnection()
            raise refusal(f"session refused: {e}") from None
        except defer.CancelledError:
            deviceSide.loseConnection()  # the operator left meanwhile
            raise
        if session.ended:  # the device closed its side while the store wrote
            raise refusal(f"device {link.deviceName!r} closed the channel")
        splice(operatorSide, deviceSide)
        # Its log lines (what it runs, and how it ended) are the session registry's.
        return operatorSide

    async def _refuseSocketsAsAnotherUser(self, account: Account, link: Any) -> None:
        """
        The agent, as root, connects to any UNIX socket, where a socket's file mode is
        its access control: not for an operator whose grant runs their sessions as
        another user, who could not connect to it there (sshd connects as the user).
        """
        loginUser = await self._store.loginUserFor(account, link.deviceName, self._clock.seconds())
        if loginUser not in (None, "root"):
            raise refusal(
                f"UNIX sockets on device {link.deviceName!r} are reached as its agent's "
                f"user, and your sessions there run as {loginUser!r}"
            )

    async def _proxyJump(
        self,
        account: Account,
        windowSize: int,
        maxPacket: int,
        data: bytes,
        operatorConn: Any = None,
    ) -> RelayChannel:
        """``ssh -J ctl@gc -p PORT user@dev_NAME``: bytes to the device's own sshd."""
        try:
            host, rest = common.getNS(data)
            (port,) = struct.unpack(">L", rest[:4])
        except (struct.error, ValueError):
            raise refusal("malformed direct-tcpip request") from None
        target = parseUsername(host)
        if not host.startswith(DEVICE_PREFIX.encode()) or not isinstance(target, DeviceTarget):
            reason = target.reason if isinstance(target, MalformedTarget) else "not a device"
            raise refusal(
                f"ProxyJump through ctl reaches devices as dev_NAME ({reason})",
                connection.OPEN_CONNECT_FAILED,
            )
        if not self.policy.permitLocalForwarding:
            raise refusal("port forwarding is not permitted on this server")
        link = await self.reachableLink(account, target.name, wait=True)
        # The device's own sshd, on the device's loopback.
        payload = common.NS(b"127.0.0.1") + struct.pack(">L", port) + rest[4:]
        return await self._relay(
            account, link, b"direct-tcpip", windowSize, maxPacket, payload, operatorConn
        )

    async def forwardRequest(
        self, account: Account, target: Target, operatorConn: Any, requestType: bytes, data: bytes
    ) -> Any:
        """
        ``ssh -R``: pass ``tcpip-forward`` / ``cancel-tcpip-forward`` (and their
        UNIX socket forms) on to the device, and remember which operator connection
        owns the forward: only that connection may cancel it.

        A forward to a device that is reconnecting waits for it as a channel does
        (L{reachableLink}'s wait): ssh sends its ``-R`` requests just before it opens the
        session, which waited while the forward was refused at once ("remote port
        forwarding failed"). Replies go out in the order of the requests, so the replies
        behind it on this connection (ssh's ServerAliveInterval keepalives) wait too, for
        --device-wait at most, each met at once with an SSH_MSG_IGNORE
        (L{accesstunnel.connection.TunnelConnection._aliveWhileRepliesWait}); OpenSSH's
        client waits for the forward's reply as long as it takes (no timeout of its own).
        A cancel does not
        wait: nothing is forwarded to take down. A forward whose operator left during the
        wait is not made.
        """
        sockets = requestType in _SOCKET_FORWARD_REQUESTS
        if not (sockets or requestType in _FORWARD_REQUESTS):
            return 0
        if not isinstance(target, DeviceTarget) or not self.policy.permitRemoteForwarding:
            return 0
        try:
            parse = parseSocketForwardRequest if sockets else parseForwardRequest
            address, port = parse(data)
        except MalformedPayload:
            return 0
        cancel = requestType in _CANCELS
        try:
            link = await self.reachableLink(account, target.name, wait=not cancel)
        except Exception:
            return 0
        if getattr(operatorConn, "stopped", False):
            return 0  # the operator left while it waited: nobody to forward to
        refused = await self._forwardRefused(account, link, address, port, cancel, operatorConn)
        if refused is not None:
            self._log.info(
                "refused {account} {what} {forward} on device {device}: {reason}",
                account=account.name,
                what="cancelling" if cancel else "a remote forward on",
                forward=forwardName(address, port),
                device=link.deviceName,
                reason=refused,
            )
            return 0
        try:
            reply = await link.conn.sendGlobalRequest(requestType, data, wantReply=1)
        except Exception:
            return 0
        if cancel:
            link.remoteForwards.remove(address, port)
            return 1
        if port == 0 and len(reply) >= 4:
            (port,) = struct.unpack(">L", reply[:4])
        link.remoteForwards.add(address, port, operatorConn)
        self._log.info(
            "{account} forwards {forward} on device {device}",
            account=account.name,
            forward=forwardName(address, port),
            device=link.deviceName,
        )
        return (1, reply) if reply else 1

    async def _forwardRefused(
        self, account: Account, link: Any, address: bytes, port: int, cancel: bool, conn: Any
    ) -> str | None:
        """Why this remote forward (or its cancel) is not passed on to the device, if not."""
        if cancel:
            # Only the connection that made a forward may take it down: another operator's
            # cancel would free the device's port for the canceller to listen on instead.
            if link.remoteForwards.owner(address, port) is not conn:
                return "not theirs"
            return None
        if 0 < port < _PRIVILEGED_PORTS or port == SOCKET:
            # The agent, as root, takes such a port, or makes a socket anywhere, for anyone:
            # not for an operator whose grant runs their sessions as another user, who
            # could not do it there.
            loginUser = await self._store.loginUserFor(
                account, link.deviceName, self._clock.seconds()
            )
            if loginUser not in (None, "root"):
                what = "a UNIX socket" if port == SOCKET else f"below {_PRIVILEGED_PORTS}"
                return f"{what}, and their sessions run as {loginUser}"
        return None

    def operatorGone(self, target: Target, operatorConn: Any) -> None:
        """An operator's connection ended: take down the remote forwards it owned."""
        if not isinstance(target, DeviceTarget):
            return
        link = self._registry.lookup(target.name)
        if link is None:
            return
        for address, port in link.remoteForwards.ownedBy(operatorConn):
            link.remoteForwards.remove(address, port)
            d = link.conn.sendGlobalRequest(*cancelRequest(address, port), wantReply=1)
            if d is not None:
                d.addErrback(lambda f: None)
