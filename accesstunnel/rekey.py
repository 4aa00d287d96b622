"""
Rekey a long-lived SSH transport after so many bytes or so much time.

Conch answers a peer's key re-exchange but never starts one itself, and the
agent link lives for weeks and carries every session of a device. OpenSSH
rekeys by default (after an amount of data that depends on the cipher, and
optionally after a time, its ``RekeyLimit``); L{RekeyingTransportMixin} gives
both of our transports the same habit: after C{limit.bytes} bytes both ways
together (read from the socket, and payload sent), or C{limit.seconds} since the
last key exchange, send a KEXINIT if no key exchange is already under way.

Counting is one addition per read and per packet; the time limit is one
timer per connection, moved after every key exchange.

Conch's client also calls C{connectionSecure()} after every NEWKEYS, which on
a re-exchange would ask for C{ssh-userauth} a second time and tear down the
running connection service; the mixin keeps a re-exchange to the keys.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock
from accesstunnel.durations import parseDuration
from accesstunnel.fastpath import FIRST_UPPER_LAYER_MESSAGE

DEFAULT_REKEY_BYTES = 1 << 30
DEFAULT_REKEY_SECONDS = 3600.0

_SIZE = re.compile(r"\A(\d{1,15})([kmg]?)\Z")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@attrs.frozen
class RekeyLimit:
    """When to renew the keys: bytes both ways together, or seconds; 0 means never."""

    bytes: int = DEFAULT_REKEY_BYTES
    seconds: float = DEFAULT_REKEY_SECONDS


def parseRekeyLimit(text: str) -> RekeyLimit:
    """
    Parse OpenSSH's C{RekeyLimit} spelling: C{SIZE [TIME]}, e.g. C{1G},
    C{64M 30m}, C{512M,1h}; SIZE takes K, M or G (powers of 1024), TIME a
    duration (C{30s}, C{15m}, C{1h}); C{default} keeps the default of either,
    C{none} turns either off.

    @raise ValueError: with the accepted forms.
    """
    parts = text.replace(",", " ").split()
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"bad rekey limit {text!r}: use SIZE [TIME], e.g. 1G or 256M 1h")
    size = parts[0].lower()
    if size == "default":
        nbytes = DEFAULT_REKEY_BYTES
    elif size == "none":
        nbytes = 0
    else:
        match = _SIZE.match(size)
        if match is None:
            raise ValueError(f"bad rekey size {parts[0]!r}: a number with K, M or G, e.g. 1G")
        nbytes = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
        if nbytes < 16 << 10:
            raise ValueError(f"rekey size {parts[0]!r} is too small (at least 16K)")
    seconds: float = DEFAULT_REKEY_SECONDS
    if len(parts) == 2:
        when = parts[1].lower()
        if when == "none":
            seconds = 0.0
        elif when != "default":
            seconds = float(parseDuration(when))
    return RekeyLimit(bytes=nbytes, seconds=seconds)


class RekeyingTransportMixin:
    """
    Mix into a Conch transport class, before the Conch base:
    C{class T(RekeyingTransportMixin, SSHServerTransport)}.

    The limit and the clock come from L{rekeySettings}, by default the
    factory's C{settings.rekeyLimit} and C{clock}.

    @ivar keyExchanges: key exchanges completed on this connection (the
        first one included).
    """

    _rekeyLog = Logger()
    #: The fast packet layer's steady path counts the bytes and applies the limit
    #: of every read and packet for this layer (accesstunnel.fastpath.enterSteadyState).
    steadyCovers = frozenset({"dataReceived", "sendPacket"})

    keyExchanges = 0
    _rekeyBytes = 0
    _rekeyBytesLimit = 0
    _rekeyTimer: Any = None  # IDelayedCall
    #: When the keys were last renewed, on a clock that does not step (L{_rekeyTimeUp}).
    _keysRenewedAt = 0.0
    _rekeyByUs = False

    # Provided by the Conch transport this is mixed into.
    factory: Any
    transport: Any
    isClient: bool
    _keyExchangeState: str
    _KEY_EXCHANGE_NONE: str

    def rekeySettings(self) -> tuple[RekeyLimit, Any]:
        """The limit to apply and the clock (an IReactorTime) for the time limit."""
        limit = getattr(self.factory.settings, "rekeyLimit", None) or RekeyLimit()
        return limit, self.factory.clock

    def dataReceived(self, data: bytes) -> None:
        self._rekeyBytes += len(data)
        super().dataReceived(data)  # type: ignore[misc]
        if self._rekeyBytesLimit and self._rekeyBytes >= self._rekeyBytesLimit:
            self._startRekey("bytes")

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        super().sendPacket(messageType, payload)  # type: ignore[misc]
        self._rekeyBytes += len(payload)
        if (
            self._rekeyBytesLimit
            and self._rekeyBytes >= self._rekeyBytesLimit
            and messageType >= FIRST_UPPER_LAYER_MESSAGE
        ):
            self._startRekey("bytes")

    def _startRekey(self, limit: str) -> None:
        self.renewKeys(f"{limit} limit reached")

    def renewKeys(self, why: str) -> bool:
        """
        Send KEXINIT now, for C{why} (logged), unless a key exchange is running, none
        has finished yet or the connection is closing; whether one was started.
        """
        if (
            self.keyExchanges == 0
            or self._keyExchangeState != self._KEY_EXCHANGE_NONE
            or getattr(self.transport, "disconnecting", False)
        ):
            return False
        self._rekeyLog.info(
            "renewing the session keys: {why} ({count} bytes since the last key exchange)",
            why=why,
            count=self._rekeyBytes,
        )
        self._rekeyBytes = 0
        self._rekeyByUs = True
        self.sendKexInit()  # type: ignore[attr-defined]
        return True

    def _newKeys(self) -> None:
        self.keyExchanges += 1
        # Before the queued packets are flushed: they count towards the new keys.
        self._rekeyBytes = 0
        # Conch never clears this; left set, the next exchange would take
        # the peer's NEWKEYS as already received.
        self._gotNewKeys = 0
        limit, clock = self.rekeySettings()
        self._rekeyBytesLimit = limit.bytes
        super()._newKeys()  # type: ignore[misc]
        flow = self._linkFlow()
        if flow is not None:
            flow.keyExchangeFinished()
        if self.keyExchanges > 1:
            self._rekeyLog.info(
                "session keys renewed (key exchange {number} on this connection, started by "
                "{initiator})",
                number=self.keyExchanges,
                initiator="us" if self._rekeyByUs else "the peer",
            )
        self._rekeyByUs = False
        if limit.seconds > 0:
            self._keysRenewedAt = elapsedClock(clock)()
            if self._rekeyTimer is not None and self._rekeyTimer.active():
                self._rekeyTimer.reset(limit.seconds)
            else:
                self._rekeyTimer = clock.callLater(limit.seconds, self._rekeyTimeUp)

    def _linkFlow(self) -> Any:
        """The running connection service's L{accesstunnel.linkflow.LinkFlow}, if any."""
        return getattr(getattr(self, "service", None), "linkFlow", None)

    def sendKexInit(self) -> None:
        # Ours or in answer to the peer's KEXINIT: from here to NEWKEYS, Conch
        # holds back every channel message, so let the channels hold them instead.
        super().sendKexInit()  # type: ignore[misc]
        flow = self._linkFlow()
        if flow is not None:
            flow.keyExchangeStarted()

    def _rekeyTimeUp(self) -> None:
        self._rekeyTimer = None
        # groundcontrol's timers run on the wall clock: a step forward fires every
        # connection's timer at once, 10,000 key exchanges in one burst. The time limit
        # is counted on a clock that does not step; a timer that ran early waits again.
        limit, clock = self.rekeySettings()
        early = limit.seconds - (elapsedClock(clock)() - self._keysRenewedAt)
        if early > max(1.0, limit.seconds / 100):
            self._rekeyTimer = clock.callLater(early, self._rekeyTimeUp)
            return
        # A running exchange reschedules the timer when it ends.
        self._startRekey("time")

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        if not (self.isClient and self.keyExchanges and packet == b""):
            super().ssh_NEWKEYS(packet)  # type: ignore[misc]
            return
        # A re-exchange on the client: what Conch's client does, except
        # calling connectionSecure() again (it would restart ssh-userauth).
        if not self.nextEncryptions.encBlockSize:  # type: ignore[attr-defined]
            self._gotNewKeys = 1
            return
        self._newKeys()

    def connectionLost(self, reason: Any = None) -> None:
        if self._rekeyTimer is not None and self._rekeyTimer.active():
            self._rekeyTimer.cancel()
        self._rekeyTimer = None
        super().connectionLost(reason)  # type: ignore[misc]


__all__ = [
    "DEFAULT_REKEY_BYTES",
    "DEFAULT_REKEY_SECONDS",
    "RekeyLimit",
    "RekeyingTransportMixin",
    "parseRekeyLimit",
]
