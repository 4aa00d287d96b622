"""
Routing an operator's channel to a device: the checks, in order, and the
words an operator sees when one fails.

A malformed name is refused before any lookup. Then the device must exist,
not be revoked, be reachable by this account, and be connected now; only then
is a channel opened on its link, and the operator's channel is confirmed with
the device's own answer.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.conch.ssh import connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from accesstunnel.channel import DEFAULT_MAX_PACKET, DEFAULT_WINDOW
from groundcontrol.control import ControlChannel, ControlContext
from groundcontrol.registry import Registry
from groundcontrol.relay import RelayChannel, refusal, splice
from groundcontrol.store import Account, IStore
from groundcontrol.usernames import ControlTarget, DeviceTarget, MalformedTarget, Target

#: Channel types an operator may open on a device.
RELAYED_CHANNEL_TYPES = frozenset({b"session", b"direct-tcpip"})


def describeLastSeen(lastSeen: float | None, now: float) -> str:
    """'last seen 2026-11-25 13:02 UTC, 5 minutes ago', for offline errors."""
    if lastSeen is None:
        return "it has never connected"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lastSeen))
    ago = max(0, int(now - lastSeen))
    if ago < 120:
        span = f"{ago} seconds ago"
    elif ago < 7200:
        span = f"{ago // 60} minutes ago"
    elif ago < 172800:
        span = f"{ago // 3600} hours ago"
    else:
        span = f"{ago // 86400} days ago"
    return f"last seen {stamp}, {span}"


class SessionRouter:
    """Open the device side of an operator's channel."""

    _log = Logger()

    def __init__(self, store: IStore, registry: Registry, clock: IReactorTime) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock

    async def openChannel(
        self,
        account: Account,
        target: Target,
        channelType: bytes,
        windowSize: int,
        maxPacket: int,
        data: bytes,
    ) -> RelayChannel | ControlChannel:
        """
        Return the operator's side of a channel spliced to the device's, or
        raise a refusal whose text the operator's ssh prints.
        """
        if isinstance(target, MalformedTarget):
            raise refusal(target.reason)
        if isinstance(target, ControlTarget):
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
        name = target.name
        now = self._clock.seconds()
        device = await self._store.deviceByName(name)
        if device is None:
            raise refusal(f"unknown device {name!r}")
        if device.state != "approved":
            raise refusal(f"device {name!r} is {device.state}")
        if not await self._store.mayReach(account, name, now):
            raise refusal(f"account {account.name!r} has no grant for device {name!r}")
        link: Any = self._registry.lookup(name)
        if link is None:
            raise refusal(
                f"device {name!r} is offline ({describeLastSeen(device.lastSeen, now)})",
                connection.OPEN_CONNECT_FAILED,
            )

        deviceSide = RelayChannel(
            localWindow=DEFAULT_WINDOW,
            localMaxPacket=DEFAULT_MAX_PACKET,
            label=f"device {name}",
        )
        deviceSide.name = channelType
        link.openChannel(deviceSide, data)
        await deviceSide.opened
        operatorSide = RelayChannel(
            localWindow=DEFAULT_WINDOW,
            localMaxPacket=DEFAULT_MAX_PACKET,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            label=f"operator {account.name}",
            towardsOperator=True,
        )
        splice(operatorSide, deviceSide)
        self._log.info(
            "{account} opened {channelType} on device {device}",
            account=account.name,
            channelType=channelType.decode("ascii", "replace"),
            device=name,
        )
        return operatorSide
