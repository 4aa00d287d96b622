"""
Devices coming online and going offline, as audit events a flapping device cannot flood.

A device whose link is up becomes C{device.online}; when its link drops (and no newer
link of the same device replaced it) it becomes C{device.offline}. The audit log is the
change feed every node polls and the fleet watcher notifies from (log, webhook), so a
device whose link bounces many times a minute would flood both, and take the store's
write lock each time. So per device and per window (a minute by default) at most one
C{device.online} and one C{device.offline} are written; further transitions in that
window are only counted, and when the window ends one C{device.flapping} event says how
many there were (C{flaps}), from which sources, and whether the device ended online.

Rate limiting the audit event as well as the notification is deliberate: the audit
record keeps every window's first transitions and the count of the rest, the server log
(twisted.logger) keeps each connect and disconnect, and C{devices.last_seen} keeps the
last contact; what is dropped is only the exact time of the suppressed transitions.

An offline event is only written for a device this limiter announced online, so that
consumers always see pairs (a pending device approved on its live link is announced
when it next connects).
"""

from __future__ import annotations

import weakref
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock
from groundcontrol.store import IStore

__all__ = [
    "DEFAULT_WINDOW",
    "FLAPPING",
    "OFFLINE",
    "ONLINE",
    "FlapLimiter",
    "limiterFor",
    "transitionsRecorded",
]

#: Seconds in which at most one online/offline pair per device is recorded.
DEFAULT_WINDOW = 60.0

#: Distinct sources a flapping summary lists, at most.
_MAX_SOURCES = 10

ONLINE = "device.online"
OFFLINE = "device.offline"
FLAPPING = "device.flapping"


@attrs.define
class _Window:
    """One device's current window: what was recorded, what was only counted."""

    start: float  #: on the elapsed clock: windows are durations, a clock step moves none
    since: float  #: the date it started (the audit's)
    recorded: set[str] = attrs.field(factory=set)
    suppressed: int = 0
    online: bool = False
    sources: list[str] = attrs.field(factory=list)
    timer: IDelayedCall | None = None


class FlapLimiter:
    """Record devices' online/offline transitions, at most a pair per device per window."""

    _log = Logger()

    def __init__(self, store: IStore, clock: IReactorTime, window: float = DEFAULT_WINDOW) -> None:
        self._store = store
        self._clock = clock
        self._elapsed = elapsedClock(clock)
        self.window = window
        self._windows: dict[str, _Window] = {}
        self._up: set[str] = set()
        self._nextSweep = 0.0

    def online(self, device: str, detail: dict[str, Any]) -> None:
        """C{device}'s link came up (and it was not connected before)."""
        self._up.add(device)
        self._transition(device, ONLINE, True, detail)

    def offline(self, device: str, detail: dict[str, Any]) -> None:
        """C{device}'s route went away (no newer link replaced it)."""
        if device not in self._up:
            return
        self._up.discard(device)
        self._transition(device, OFFLINE, False, detail)

    def _transition(self, device: str, event: str, online: bool, detail: dict[str, Any]) -> None:
        now = self._elapsed()
        window = self._windows.get(device)
        if window is None or now >= window.start + self.window:
            window = self._windows[device] = _Window(start=now, since=self._clock.seconds())
            self._forgetQuiet(now)
        window.online = online
        source = detail.get("source")
        if source and source not in window.sources and len(window.sources) < _MAX_SOURCES:
            window.sources.append(str(source))
        if event not in window.recorded:
            window.recorded.add(event)
            self._audit(event, device, detail, self._clock.seconds())
            return
        window.suppressed += 1
        if window.timer is None:
            window.timer = self._clock.callLater(
                window.start + self.window - now, self._summarise, device, window
            )

    def recorded(self, device: str) -> bool:
        """
        Whether the audit log has C{device}'s latest transition here: not while some of
        its window's were only counted (its C{device.flapping} summary still to come).
        """
        window = self._windows.get(device)
        return window is None or window.suppressed == 0

    def _summarise(self, device: str, window: _Window) -> None:
        """The window with suppressed transitions ended: say how many, and where it stands."""
        window.timer = None
        if self._windows.get(device) is window:
            del self._windows[device]
        self._log.info(
            "device {device} flapped {flaps} times in {window:g} s",
            device=device,
            flaps=window.suppressed,
            window=self.window,
        )
        self._audit(
            FLAPPING,
            device,
            {
                "flaps": window.suppressed,
                "since": window.since,
                "window": self.window,
                "online": window.online,
                "sources": window.sources,
            },
            self._clock.seconds(),
        )

    def _forgetQuiet(self, now: float) -> None:
        """
        Drop ended windows with nothing to summarise, so memory follows the live fleet;
        at most once a window, so a reconnect storm stays linear.
        """
        if now < self._nextSweep:
            return
        self._nextSweep = now + self.window
        for name in [
            n for n, w in self._windows.items() if w.timer is None and now >= w.start + self.window
        ]:
            del self._windows[name]

    def _audit(self, event: str, device: str, detail: dict[str, Any], now: float) -> None:
        d = self._store.audit(event, None, device, detail, now)
        d.addErrback(lambda f: self._log.failure("could not record {event}", f, event=event))

    def stop(self) -> None:
        """Cancel pending summaries (the server is stopping)."""
        for window in self._windows.values():
            if window.timer is not None and window.timer.active():
                window.timer.cancel()
            window.timer = None


_BY_REGISTRY: weakref.WeakKeyDictionary[Any, FlapLimiter] = weakref.WeakKeyDictionary()


def limiterFor(registry: Any, store: IStore, clock: IReactorTime) -> FlapLimiter:
    """
    The limiter of the groundcontrol owning C{registry} (one registry per server),
    made on first use: every agent avatar of a server shares it.
    """
    limiter = _BY_REGISTRY.get(registry)
    if limiter is None:
        limiter = _BY_REGISTRY[registry] = FlapLimiter(store, clock)
    return limiter


def transitionsRecorded(registry: Any, device: str) -> bool:
    """
    Whether the audit log has C{device}'s latest transition on the groundcontrol owning
    C{registry} (L{FlapLimiter.recorded}; True before its limiter is made: none yet).
    """
    limiter = _BY_REGISTRY.get(registry)
    return limiter is None or limiter.recorded(device)
