"""
Channels that start on the device and end at an operator.

Three kinds, each tied to one operator:

  - ``forwarded-tcpip`` (``ssh -R``): the operator asked groundcontrol for a
    remote forward; groundcontrol passed the ``tcpip-forward`` request on to
    the device's agent and remembers which operator connection owns that
    (address, port) on that link. Connections the agent accepts come back as
    ``forwarded-tcpip`` channels and go to that operator. ``ssh -R`` from a
    UNIX socket path on the device is the same with OpenSSH's names
    (``streamlocal-forward@openssh.com``, ``forwarded-streamlocal@openssh.com``),
    kept as (path, L{SOCKET}).
  - ``auth-agent@openssh.com`` (``ssh -A``) and ``x11`` (``ssh -X``): the
    agent says which session they belong to (its own channel id of the
    session, appended to the payload, since one link carries many
    operators' sessions); groundcontrol finds that session's operator and
    opens the standard channel on their connection.

The device side of each is a L{RelayChannel} spliced to one opened on the
operator's connection, with the same end-to-end flow control as sessions.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import common, connection
from twisted.logger import Logger

from accesstunnel.channel import DEFAULT_MAX_PACKET, DEFAULT_WINDOW, LINK_MAX_PACKET
from groundcontrol.relay import RelayChannel, inertText, refusal, splice

FORWARDED_TCPIP = b"forwarded-tcpip"
AUTH_AGENT = b"auth-agent@openssh.com"
X11 = b"x11"
SOCKET_FORWARD = b"streamlocal-forward@openssh.com"
CANCEL_SOCKET_FORWARD = b"cancel-streamlocal-forward@openssh.com"
FORWARDED_SOCKET = b"forwarded-streamlocal@openssh.com"

#: The port a remote forward from a UNIX socket path is kept under (TCP's are 0-65535).
SOCKET = -1


class MalformedPayload(ValueError):  # noqa: N818 - reads as a state, like the others
    """A channel-open or request payload that does not parse."""


def _takeString(data: bytes, offset: int) -> tuple[bytes, int]:
    if len(data) < offset + 4:
        raise MalformedPayload("truncated string length")
    (length,) = struct.unpack(">L", data[offset : offset + 4])
    end = offset + 4 + length
    if len(data) < end:
        raise MalformedPayload("truncated string")
    return data[offset + 4 : end], end


def _takeUint32(data: bytes, offset: int) -> tuple[int, int]:
    if len(data) < offset + 4:
        raise MalformedPayload("truncated uint32")
    return struct.unpack(">L", data[offset : offset + 4])[0], offset + 4


def parseForwardRequest(data: bytes) -> tuple[bytes, int]:
    """(address, port) of a tcpip-forward / cancel-tcpip-forward request."""
    address, offset = _takeString(data, 0)
    port, _ = _takeUint32(data, offset)
    return address, port


def parseSocketForwardRequest(data: bytes) -> tuple[bytes, int]:
    """(path, L{SOCKET}) of a streamlocal-forward / cancel-streamlocal-forward request."""
    path, _ = _takeString(data, 0)
    if not path:
        raise MalformedPayload("empty socket path")
    return path, SOCKET


def cancelRequest(address: bytes, port: int) -> tuple[bytes, bytes]:
    """The request, and its payload, that takes down the remote forward (address, port)."""
    if port == SOCKET:
        return CANCEL_SOCKET_FORWARD, common.NS(address)
    return b"cancel-tcpip-forward", common.NS(address) + struct.pack(">L", port)


def forwardName(address: bytes, port: int) -> str:
    """A remote forward for the log: C{ADDRESS:PORT}, or a socket's path (inert, cut)."""
    name = inertText(address, 64)
    return name if port == SOCKET else f"{name}:{port}"


def parseForwardedChannel(data: bytes) -> tuple[bytes, int]:
    """(address, port) that a forwarded-tcpip channel says it arrived on."""
    address, offset = _takeString(data, 0)
    port, offset = _takeUint32(data, offset)
    _originator, offset = _takeString(data, offset)
    _takeUint32(data, offset)  # originator port
    return address, port


def splitSessionId(data: bytes) -> tuple[bytes, int]:
    """The standard payload, and the agent's session channel id appended to it."""
    if len(data) < 4:
        raise MalformedPayload("no session id")
    return data[:-4], struct.unpack(">L", data[-4:])[0]


def openOnOperator(operatorConn: Any, channelType: bytes, data: bytes, label: str) -> RelayChannel:
    """Open C{channelType} on the operator's connection; C{.opened} fires when it answers."""
    channel = RelayChannel(
        localWindow=DEFAULT_WINDOW,
        localMaxPacket=DEFAULT_MAX_PACKET,
        label=label,
        towardsOperator=True,
    )
    channel.name = channelType
    channel.conn = operatorConn
    operatorConn.openChannel(channel, data)
    return channel


class RemoteForwards:
    """Which operator connection owns each remote forward on one device link."""

    _log = Logger()

    def __init__(self) -> None:
        self._owners: dict[tuple[bytes, int], Any] = {}

    def add(self, address: bytes, port: int, operatorConn: Any) -> None:
        self._owners[(address, port)] = operatorConn

    def remove(self, address: bytes, port: int) -> None:
        self._owners.pop((address, port), None)

    def owner(self, address: bytes, port: int) -> Any:
        return self._owners.get((address, port))

    def ownedBy(self, operatorConn: Any) -> list[tuple[bytes, int]]:
        return [key for key, owner in self._owners.items() if owner is operatorConn]


async def relayFromDevice(
    link: Any, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
) -> RelayChannel:
    """
    The agent opened C{channelType}: find the operator it is for, open the
    matching channel on their connection, and return the device side.
    """
    try:
        if channelType == FORWARDED_TCPIP:
            address, port = parseForwardedChannel(data)
            operatorConn = link.remoteForwards.owner(address, port)
            payload = data
            label = f"remote forward {address.decode('ascii', 'replace')}:{port}"
        elif channelType == FORWARDED_SOCKET:
            address, _ = _takeString(data, 0)
            operatorConn = link.remoteForwards.owner(address, SOCKET)
            payload = data
            label = f"remote forward {address.decode('ascii', 'replace')}"
        elif channelType in (AUTH_AGENT, X11):
            payload, sessionId = splitSessionId(data)
            operatorChannel = _operatorSideOf(link.conn, sessionId)
            operatorConn = operatorChannel.conn if operatorChannel is not None else None
            if operatorChannel is not None and channelType not in operatorChannel.permittedBack:
                operatorConn = None
            label = channelType.decode("ascii")
        else:
            raise refusal(
                f"devices may not open {channelType.decode('ascii', 'replace')!r} channels",
                connection.OPEN_UNKNOWN_CHANNEL_TYPE,
            )
    except MalformedPayload as e:
        raise refusal(f"malformed {channelType.decode('ascii', 'replace')} open: {e}") from None
    if operatorConn is None or getattr(operatorConn, "stopped", False):
        raise refusal("nobody asked for this channel", connection.OPEN_CONNECT_FAILED)

    operatorSide = openOnOperator(operatorConn, channelType, payload, label)
    await operatorSide.opened
    deviceSide = RelayChannel(
        localWindow=DEFAULT_WINDOW,
        localMaxPacket=LINK_MAX_PACKET,  # the agent is ours: larger packets, as router.py
        remoteWindow=windowSize,
        remoteMaxPacket=maxPacket,
        label=f"device {link.deviceName}",
    )
    splice(operatorSide, deviceSide)
    return deviceSide


def _operatorSideOf(deviceConn: Any, sessionId: int) -> Any:
    """The operator channel spliced to the device's session channel C{sessionId}."""
    for channel, remoteId in deviceConn.channelsToRemoteChannel.items():
        if remoteId == sessionId and isinstance(channel, RelayChannel):
            return channel.peer
    return None


__all__ = [
    "AUTH_AGENT",
    "CANCEL_SOCKET_FORWARD",
    "FORWARDED_SOCKET",
    "FORWARDED_TCPIP",
    "SOCKET",
    "SOCKET_FORWARD",
    "X11",
    "RemoteForwards",
    "cancelRequest",
    "forwardName",
    "parseForwardRequest",
    "parseSocketForwardRequest",
    "relayFromDevice",
]
