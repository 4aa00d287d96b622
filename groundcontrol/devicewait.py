"""
Holding an operator's channel open while its device reconnects.

A device's link drops and comes back within seconds all the time: a Wi-Fi roam, a
carrier's NAT timeout, the agent restarting after an upgrade, the device rebooting,
groundcontrol itself restarting (then the whole fleet reconnects within minutes). An
operator's ssh opened in that gap would fail at once and be retried by hand. Instead a
channel to a device that was online recently is left unanswered for up to
C{--device-wait} seconds and opened over the device's link the moment it attaches.

Only recently seen devices are waited for: one gone for a week fails at once, as before.
Waiters are bounded, per device and in all, so holding channels is no memory lever; one
whose operator leaves is forgotten (its Deferred is cancelled). The registry tells
L{DeviceWaits} when a device's link attaches; an online device's channel never reaches
this module.

With several nodes sharing a store, a device may come back on another node, which this
one never sees: the store's C{lastSeen}, which every node sets when an agent logs in, is
read while someone waits, and the waiters are told where it went instead of waiting for
nothing. One already linked to another node as the wait begins is not waited for at all:
the audit log's online and offline events, which every node writes, say so at once
(L{DeviceWaits._checkLinkedElsewhere}), and the channel is answered as when it logs in
elsewhere during the wait.

After groundcontrol restarts, the whole fleet reconnects over minutes, and the devices
online when it went away are waited for however long it was down. A clean stop writes
C{run/stopped.json}, and its links' ends set the devices' C{lastSeen} as it stops. A kill
(OOM, power loss, a host reboot, a crash loop) writes neither, and C{lastSeen} cannot stand
in: it is set as a link begins and as it ends, so a device online for a day before the kill
was last seen a day before it. Hence L{StopRecord}'s C{run/alive.json}, written every minute
while groundcontrol runs: when it last ran and which devices were online then. A file of
this node's own, not the store: the store's times are the fleet's (several nodes may share
it) and none of them says which devices were linked to this node; and a write a minute (a
few hundred kilobytes for 10,000 devices, on this node's disk) costs less than one more
write per link event, which a reconnect storm would double.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock
from accesstunnel.statefiles import writeAtomically
from groundcontrol.flapping import FLAPPING, OFFLINE, ONLINE, transitionsRecorded
from groundcontrol.registry import Link, Registry
from groundcontrol.store import AuditEvent, Device, IStore

#: --device-wait's default: a roam or an agent restart is back within it.
DEFAULT_DEVICE_WAIT = 15.0
#: --device-wait-recent's default: how recently a device must have been seen to be waited for.
DEFAULT_RECENT_WINDOW = 300.0
#: --max-device-waits and --max-device-waits-per-device.
DEFAULT_MAX_WAITERS = 1000
DEFAULT_MAX_WAITERS_PER_DEVICE = 20
#: With a shared store, how often it is read for a device that came back elsewhere.
DEFAULT_SHARED_STORE_POLL = 2.0
#: In DATA/run: when groundcontrol last stopped, written as it stops, read as it starts.
STOPPED_FILE = "stopped.json"
#: In DATA/run: when groundcontrol last ran and the devices online then, every minute.
ALIVE_FILE = "alive.json"
#: How often ALIVE_FILE is written: a kill loses at most this much of what it says.
ALIVE_INTERVAL = 60.0


@attrs.frozen
class DeviceWaitPolicy:
    """How long, for which devices and for how many channels groundcontrol waits."""

    #: Seconds a channel open waits for its device's link (0: never wait).
    maxWait: float = DEFAULT_DEVICE_WAIT
    #: Wait only for a device seen within this many seconds, or one seen within it before
    #: groundcontrol started, while groundcontrol has run less than it.
    recentWindow: float = DEFAULT_RECENT_WINDOW
    maxWaiters: int = DEFAULT_MAX_WAITERS
    maxWaitersPerDevice: int = DEFAULT_MAX_WAITERS_PER_DEVICE
    #: Seconds between reads of a shared store for a device back on another node; None
    #: with a store of this node's own (SQLite), where only this node links devices.
    sharedStorePoll: float | None = None


class WaitRefusedError(Exception):
    """Too many channels wait already; the text says which cap."""


class DeviceNotBackError(Exception):
    """The device did not reconnect within the wait; C{args[0]} is how long it was."""


class DeviceElsewhereError(Exception):
    """
    The device's agent logged in, but not here (another node sharing the store, or its
    login was refused); C{args[0]}: how long the channel waited.
    """


@attrs.define(eq=False)
class _Waiter:
    deferred: defer.Deferred[Link]
    startedAt: float  #: on the elapsed clock: how long it waited, whatever the clock did
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class _Device:
    """The channels waiting for one device, and the shared-store watch over it."""

    since: float
    waiters: list[_Waiter] = attrs.field(factory=list)
    poll: IDelayedCall | None = None
    #: A poll saw a login newer than C{since} that has not attached here (yet).
    contactSeen: bool = False


class DeviceWaits:
    """Channel opens waiting for devices to reconnect, by device name."""

    _log = Logger()

    def __init__(
        self,
        policy: DeviceWaitPolicy,
        registry: Registry,
        clock: IReactorTime,
        store: IStore | None = None,
    ) -> None:
        self.policy = policy
        self._registry = registry
        self._clock = clock
        self._store = store
        #: When this groundcontrol started: its own restart is a reason to wait.
        self.startedAt = clock.seconds()
        #: When the one before it was last known to run (L{StopRecord}): its clean stop,
        #: or its last alive.json after a kill; None if neither was found.
        self.lastStop: float | None = None
        #: The devices online then, by that alive.json: after a kill their C{lastSeen} is
        #: when their links began, which may be long before.
        self.onlineAtStop: frozenset[str] = frozenset()
        self._devices: dict[str, _Device] = {}
        self._count = 0
        registry.waits = self

    def __len__(self) -> int:
        """How many channel opens are waiting, for all devices."""
        return self._count

    def waitingFor(self, name: str) -> int:
        """How many channel opens are waiting for device C{name}."""
        device = self._devices.get(name)
        return 0 if device is None else len(device.waiters)

    def worthWaiting(self, device: Device, now: float) -> bool:
        """
        Whether C{device} (approved, offline) was online recently enough to wait for: seen
        within the recent window, or, while groundcontrol started less than that ago, online
        when the groundcontrol before it was last known to run (L{onlineAtStop}), or seen
        within the window before then (a clean stop's links' ends set C{lastSeen} as it
        stops), or before this one started if nothing was recorded.
        """
        if self.policy.maxWait <= 0 or device.lastSeen is None:
            return False
        window = self.policy.recentWindow
        if now - device.lastSeen <= window:
            return True
        if now - self.startedAt > window:
            return False
        if device.name in self.onlineAtStop:
            return True
        stopped = self.startedAt if self.lastStop is None else min(self.lastStop, self.startedAt)
        return stopped - device.lastSeen <= window

    def onlineNow(self) -> list[str]:
        """
        The devices alive.json names now: those online, and, while groundcontrol started
        less than the window ago, those online before it, still waited for: a crash loop
        must not forget the devices that have not reconnected yet.
        """
        online = set(self._registry.connectedNames())
        if self._clock.seconds() - self.startedAt <= self.policy.recentWindow:
            online |= self.onlineAtStop
        return sorted(online)

    def wait(self, name: str) -> defer.Deferred[Link]:
        """
        A Deferred firing with device C{name}'s link once it attaches; failing with
        L{DeviceNotBackError} after the policy's wait, L{DeviceElsewhereError} if it linked to
        another node. Cancelling it forgets the waiter. Raises L{WaitRefusedError} past a cap.
        """
        policy = self.policy
        device = self._devices.get(name)
        if self._count >= policy.maxWaiters:
            raise WaitRefusedError(
                f"{self._count} channels wait for devices already (at most {policy.maxWaiters})"
            )
        if device is not None and len(device.waiters) >= policy.maxWaitersPerDevice:
            raise WaitRefusedError(
                f"{len(device.waiters)} channels wait for it already "
                f"(at most {policy.maxWaitersPerDevice})"
            )
        now = self._clock.seconds()
        if device is None:
            device = self._devices[name] = _Device(since=now)
            self._schedulePoll(name, device)
        waiter = _Waiter(
            defer.Deferred(lambda d: self._forget(name, waiter)),
            startedAt=elapsedClock(self._clock)(),
        )
        waiter.timer = self._clock.callLater(policy.maxWait, self._timedOut, name, waiter)
        device.waiters.append(waiter)
        self._count += 1
        if len(device.waiters) == 1:
            self._checkAtStart(name, device)
        return waiter.deferred

    def linkAttached(self, name: str) -> None:
        """
        Device C{name}'s link attached (the registry calls this): its waiters get it,
        once the attach has finished (the agent's login is still going on).
        """
        if name in self._devices:
            self._clock.callLater(0, self._deliver, name)

    def _deliver(self, name: str) -> None:
        link = self._registry.lookup(name)
        device = self._devices.get(name)
        if link is None or device is None:
            return  # gone again already: the waiters go on waiting
        self._dropDevice(name, device)
        for waiter in device.waiters:
            self._stopTimer(waiter)
            waiter.deferred.callback(link)

    def _timedOut(self, name: str, waiter: _Waiter) -> None:
        waiter.timer = None
        self._forget(name, waiter)
        waited = elapsedClock(self._clock)() - waiter.startedAt
        waiter.deferred.errback(DeviceNotBackError(waited))

    def _forget(self, name: str, waiter: _Waiter) -> None:
        """Take C{waiter} out (timed out, or cancelled: its operator left)."""
        self._stopTimer(waiter)
        device = self._devices.get(name)
        if device is None or waiter not in device.waiters:
            return
        device.waiters.remove(waiter)
        self._count -= 1
        if not device.waiters:
            self._dropDevice(name, device)

    def _dropDevice(self, name: str, device: _Device) -> None:
        if self._devices.get(name) is device:
            del self._devices[name]
            self._count -= len(device.waiters)
        if device.poll is not None and device.poll.active():
            device.poll.cancel()
        device.poll = None

    @staticmethod
    def _stopTimer(waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    # -- several nodes ---------------------------------------------------------------

    def _schedulePoll(self, name: str, device: _Device) -> None:
        interval = self.policy.sharedStorePoll
        if interval is None or self._store is None:
            return
        device.poll = self._clock.callLater(interval, self._poll, name, device)

    def _poll(self, name: str, device: _Device) -> None:
        device.poll = None
        d = defer.Deferred.fromCoroutine(self._checkElsewhere(name, device))
        d.addErrback(lambda f: self._log.failure("could not read device {device}", f, device=name))
        d.addBoth(lambda _: self._pollAgain(name, device))

    def _pollAgain(self, name: str, device: _Device) -> None:
        if self._devices.get(name) is device and device.poll is None:
            self._schedulePoll(name, device)

    async def _checkElsewhere(self, name: str, device: _Device) -> None:
        """
        A login newer than the first waiter that has not attached here by the next poll
        (a login here attaches within milliseconds of recording itself) went elsewhere.
        """
        assert self._store is not None
        record = await self._store.deviceByName(name)
        if self._devices.get(name) is not device:
            return
        if record is None or record.lastSeen is None or record.lastSeen <= device.since:
            return
        if not device.contactSeen:
            device.contactSeen = True
            return
        self._elsewhere(name, device)

    def _elsewhere(self, name: str, device: _Device) -> None:
        """The device is linked to another node: its waiters are told so, now."""
        self._dropDevice(name, device)
        now = elapsedClock(self._clock)()
        for waiter in device.waiters:
            self._stopTimer(waiter)
            waiter.deferred.errback(DeviceElsewhereError(now - waiter.startedAt))

    def _checkAtStart(self, name: str, device: _Device) -> None:
        if self.policy.sharedStorePoll is None or self._store is None:
            return
        d = defer.Deferred.fromCoroutine(self._checkLinkedElsewhere(name, device))
        d.addErrback(
            lambda f: self._log.failure("could not read device {device}'s links", f, device=name)
        )

    async def _checkLinkedElsewhere(self, name: str, device: _Device) -> None:
        """
        A device linked to another node as the wait begins is not waited for: the audit
        log's latest of its online, offline and flapping events (every node writes them,
        L{groundcontrol.flapping}) says it is online, and it is not linked here. Its waiters
        are answered as when it logs in elsewhere during the wait (L{_elsewhere}).

        Not trusted, so waited for as before: an online event older than this node's start
        while it has run less than the window (its own, maybe, from before a kill, which
        wrote no offline event), and the log of a device whose transitions here were only
        counted (the flap limiter's window, until its summary). Another node's kill leaves
        its devices' online events too: until they link again, a channel to one is answered
        at once (the refusal's "or was refused" and the agent's retry cover it).
        """
        assert self._store is not None
        event = await self._store.latestDeviceEvent(name, (ONLINE, OFFLINE, FLAPPING))
        if self._devices.get(name) is not device or self._registry.lookup(name) is not None:
            return
        if event is None or not _saysOnline(event):
            return
        restarting = self._clock.seconds() - self.startedAt <= self.policy.recentWindow
        if restarting and event.at < self.startedAt:
            return
        if not transitionsRecorded(self._registry, name):
            return
        self._elsewhere(name, device)


def _saysOnline(event: AuditEvent) -> bool:
    """Whether a device's online, offline or flapping event leaves it online."""
    if event.event == FLAPPING:
        return event.detail.get("online") is True
    return event.event == ONLINE


class StopRecord(Service):
    """
    When groundcontrol was last known to run, so that once it starts again the devices
    online then are waited for however long it was down: C{DATA/run/stopped.json}, written
    as it stops (its links' ends set the devices' C{lastSeen} then), read and removed as it
    starts, so a later kill leaves no stale record behind; and C{DATA/run/alive.json},
    written every L{aliveInterval} while it runs with the devices online, which after a kill
    is all there is (the module docstring says why a file). The later of the two counts.

    Read at L{startService}, not when the service is built: a start that fails on its
    options after the build (a --tls-cert that cannot be read) consumed the record, and
    the start that followed the fix did not wait for the devices online at the stop. Its
    parent starts it before the listeners, so no channel is opened before it is read.

    A record that cannot be read or makes no sense is ignored with a log line (the start
    is then the only restart there is to go by); one from the future (the clock stepped
    back since it was written) is taken as written at this start, its devices still named.
    """

    _log = Logger()

    def __init__(self, waits: DeviceWaits, runDirectory: Path, clock: IReactorTime) -> None:
        self._waits = waits
        self._path = runDirectory / STOPPED_FILE
        self._alivePath = runDirectory / ALIVE_FILE
        self._clock = clock
        self._beat: LoopingCall | None = None
        #: A fifth of the recent window at most: a kill loses that much of the devices
        #: that went offline within the window before it.
        self.aliveInterval = min(ALIVE_INTERVAL, waits.policy.recentWindow / 5)

    def startService(self) -> None:
        stoppedAt = self._readAndRemove()
        aliveAt, online = self._readAlive()
        times = [t for t in (stoppedAt, aliveAt) if t is not None]
        lastStop = max(times) if times else None
        now = self._clock.seconds()
        if lastStop is not None and lastStop > now:
            # worthWaiting counts no record later than the start: say why here.
            self._log.warn(
                "groundcontrol's last record in {path} is later than now ({when} > {now}): "
                "the clock stepped back since; taken as written at this start",
                path=str(self._path.parent),
                when=lastStop,
                now=now,
            )
        self._waits.lastStop = lastStop
        self._waits.onlineAtStop = online
        beat = self._beat = LoopingCall(self._recordAlive)
        beat.clock = self._clock
        beat.start(self.aliveInterval, now=False)
        super().startService()

    def _readAndRemove(self) -> float | None:
        try:
            stoppedAt = json.loads(self._path.read_text())["stoppedAt"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._log.warn("ignoring {path}: {error}", path=str(self._path), error=str(e))
            stoppedAt = None
        with contextlib.suppress(OSError):
            self._path.unlink()
        if not _isTime(stoppedAt):
            return None
        return float(stoppedAt)

    def _readAlive(self) -> tuple[float | None, frozenset[str]]:
        """alive.json's time and devices; kept, as the next write replaces it."""
        path = self._alivePath
        try:
            document = json.loads(path.read_text())
            aliveAt, online = document["aliveAt"], document["online"]
        except FileNotFoundError:
            return None, frozenset()
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._log.warn("ignoring {path}: {error}", path=str(path), error=str(e))
            return None, frozenset()
        if not _isTime(aliveAt) or not (
            isinstance(online, list) and all(isinstance(name, str) for name in online)
        ):
            self._log.warn("ignoring {path}: not a time and a list of device names", path=str(path))
            return None, frozenset()
        return float(aliveAt), frozenset(online)

    def _recordAlive(self) -> None:
        document = {"aliveAt": self._clock.seconds(), "online": self._waits.onlineNow()}
        try:
            self._alivePath.parent.mkdir(parents=True, exist_ok=True)
            writeAtomically(self._alivePath, json.dumps(document).encode() + b"\n")
        except OSError as e:
            self._log.warn(
                "could not record the devices online in {path}: {error}",
                path=str(self._alivePath),
                error=e,
            )

    def stopService(self) -> Any:
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            document = json.dumps({"stoppedAt": self._clock.seconds()})
            writeAtomically(self._path, document.encode() + b"\n")
        except OSError as e:
            self._log.warn(
                "could not record the stop in {path}: {error}", path=str(self._path), error=e
            )
        return super().stopService()


def _isTime(value: object) -> bool:
    """A finite number of seconds (JSON's true is no time, nor are NaN and infinities)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


__all__ = [
    "ALIVE_FILE",
    "ALIVE_INTERVAL",
    "DEFAULT_DEVICE_WAIT",
    "DEFAULT_MAX_WAITERS",
    "DEFAULT_MAX_WAITERS_PER_DEVICE",
    "DEFAULT_RECENT_WINDOW",
    "DEFAULT_SHARED_STORE_POLL",
    "DeviceElsewhereError",
    "DeviceNotBackError",
    "DeviceWaitPolicy",
    "DeviceWaits",
    "StopRecord",
    "WaitRefusedError",
]
