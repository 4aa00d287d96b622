"""
OpenSSH's transport-level ping (C{ping@openssh.com}), answered for logged-in peers.

Since 9.5 OpenSSH's client hides an operator's keystroke timing (C{ObscureKeystrokeTiming},
on by default): while someone types in a terminal session it sends on a fixed ~20 ms beat
and fills the beats without a keystroke, for a second or two after the last one, with
C{SSH2_MSG_PING} packets the size of a keystroke, which the server answers with
C{SSH2_MSG_PONG} the size of an echo. It sends that chaff only to a server whose
C{SSH2_MSG_EXT_INFO} names C{ping@openssh.com} (its C{send_chaff}); sshd's does. Without it
a 10.x client's typing through groundcontrol was quantised but not hidden: an observer of
the operator's connection saw each keystroke's packet, so how many were typed (a password's
length at a sudo prompt on the device) and when the typing stopped (C{-vvv}: "stopping:
chaff time expired (0 chaff packets sent)").

The rules are sshd's (packet.c): no answer before login, where a peer has proved nothing
and an answer is work for anyone who connects; none during a key exchange (OpenSSH's
PROTOCOL says an answer then waits for its end; sshd drops the ping instead, and so do we,
so that a peer that starts an exchange and never ends it cannot pile answers up in us); a
ping whose string does not fill its payload exactly ends the connection as any malformed
message does (accesstunnel.fastpath). A PONG is ignored: groundcontrol sends no pings.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

#: The message numbers of OpenSSH's PROTOCOL, section 1.9.
MSG_PING = 192
MSG_PONG = 193
#: The RFC 8308 extension that says a server answers them, and its version.
PING_EXTENSION = (b"ping@openssh.com", b"0")


def pingData(payload: bytes) -> bytes:
    """
    The data of a ping's payload (one SSH string, nothing after it). Raises
    C{struct.error} for a payload that is not exactly that: a parse of the peer's bytes
    (accesstunnel.handlerfault), so the connection ends with one "malformed" line.
    """
    if len(payload) < 4:
        raise struct.error(f"ping payload of {len(payload)} bytes has no string length")
    (length,) = struct.unpack(">L", payload[:4])
    if length != len(payload) - 4:
        raise struct.error(f"ping string of {length} bytes in a payload of {len(payload)}")
    return payload[4:]


class PingReplyMixin:
    """
    For groundcontrol's server transport: C{ping@openssh.com} in the extensions it sends,
    and a PONG for each PING of a logged-in peer outside a key exchange.
    """

    _keyExchangeState: Any
    _KEY_EXCHANGE_NONE: Any
    #: The transport's (groundcontrol.sshserver): drops a peer that does not read what it
    #: asked for, as for every other answer.
    dropPeerNotReading: Callable[[], bool]

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        super().sendExtInfo([*extensions, PING_EXTENSION])  # type: ignore[misc]

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if messageNum == MSG_PING:
            data = pingData(payload)
            if (
                hasattr(self, "avatar")
                and self._keyExchangeState == self._KEY_EXCHANGE_NONE
                and not self.dropPeerNotReading()
            ):
                self.sendPacket(MSG_PONG, struct.pack(">L", len(data)) + data)  # type: ignore[attr-defined]
            return
        if messageNum == MSG_PONG:
            return
        super().dispatchMessage(messageNum, payload)  # type: ignore[misc]
