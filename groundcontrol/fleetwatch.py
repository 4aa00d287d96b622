"""
Apply fleet changes made elsewhere to the live links.

Approvals and revocations are written to the store by whoever makes them (the
admin CLI in another process, the control shell, another groundcontrol node).
Every change is an audit event, so the audit table is also the change feed:
this watcher polls it and acts on the events that concern connected devices.
A revoked device's link is closed within one poll interval; a pending device
that was just approved becomes routable without reconnecting, and the link of a
key that an approved re-key replaced is closed.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from groundcontrol.notify import FleetEvent, LogNotifier, Notifier
from groundcontrol.registry import Registry
from groundcontrol.revocations import RevokedCertificates
from groundcontrol.store import IStore

DEFAULT_POLL_INTERVAL = 0.25

#: How often owned devices are checked for leases that have ended.
DEFAULT_LEASE_CHECK_INTERVAL = 30.0

#: Audit events someone is told about (log always, webhook when configured).
NOTIFIED_EVENTS = frozenset(
    {
        "device.pending",
        "device.rekey-requested",
        "device.approved",
        "device.claimed",
        "device.revoked",
        "claim.lapsed",
        "claim.renewed",
        "claim.released",
        # Rate limited per device by groundcontrol.flapping before they reach the feed.
        "device.online",
        "device.offline",
        "device.flapping",
    }
)

#: Audit events that change a live link (L{FleetWatcher._apply}).
APPLIED_EVENTS = frozenset({"device.revoked", "device.approved", "device.claimed"})

#: What the watcher reads of the feed. The rest (two rows per relayed session, among
#: others) stays in the database: the store passes over it without handing it back.
WATCHED_EVENTS = NOTIFIED_EVENTS | APPLIED_EVENTS

#: Events read from the feed at a time.
FEED_PAGE = 100


class FleetWatcher(Service):
    """Poll the audit feed and apply approvals and revocations."""

    _log = Logger()

    def __init__(
        self,
        store: IStore,
        registry: Registry,
        clock: IReactorTime,
        interval: float = DEFAULT_POLL_INTERVAL,
        notifier: Notifier | None = None,
        leaseCheckInterval: float = DEFAULT_LEASE_CHECK_INTERVAL,
        revocations: RevokedCertificates | None = None,
    ) -> None:
        self._revocations = revocations
        self._store = store
        self._registry = registry
        self._clock = clock
        self._interval = interval
        self._notifier = notifier or LogNotifier()
        self._leaseCheckInterval = leaseCheckInterval
        self._nextLeaseCheck = 0.0
        self._lastId: int | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self._log.failure("fleet watcher stopped", f)
        )

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    async def _poll(self) -> None:
        if self._lastId is None:
            # Start from now: what happened before start-up is already in the
            # store, and agents connecting now are checked against it.
            self._lastId = await self._store.lastAuditId()
            if self._revocations is not None:
                await self._revocations.load()
            return
        now = self._clock.seconds()
        if now >= self._nextLeaseCheck:
            self._nextLeaseCheck = now + self._leaseCheckInterval
            for device in await self._store.lapsedLeases(now):
                # Its audit event comes back through the feed and is notified.
                await self._store.endLease(device.name, now)
        while True:
            page = await self._store.auditFeed(self._lastId, WATCHED_EVENTS, FEED_PAGE)
            for event in page.events:
                self._lastId = event.id
                if event.event in NOTIFIED_EVENTS:
                    self._notifier.notify(
                        FleetEvent(
                            event=event.event,
                            device=event.device or "",
                            actor=event.actor,
                            at=event.at,
                            detail=event.detail,
                            id=event.id,
                        )
                    )
                await self._apply(event)
            self._lastId = page.readTo
            if len(page.events) < FEED_PAGE:
                return  # read up to the newest row

    def poll(self) -> Any:
        """One look at the feed (what the loop calls every interval)."""
        d = Deferred.fromCoroutine(self._poll())
        # A store hiccup must not stop the watcher: log it and poll again.
        d.addErrback(lambda f: self._log.failure("could not read the audit feed", f))
        return d

    async def _apply(self, event: Any) -> None:
        revokesCertificates = event.event in ("device.revoked", "device.approved")
        if revokesCertificates and event.device and self._revocations is not None:
            # A revocation, or a re-key approval, revokes certificates.
            await self._revocations.refresh(event.device)
        if event.event == "device.revoked" and event.device:
            if self._registry.drop(event.device, "device revoked"):
                self._log.info("closed the link of revoked device {device}", device=event.device)
        elif event.event in ("device.approved", "device.claimed") and event.device:
            device = await self._store.deviceByName(event.device)
            if device is None or device.state != "approved":
                return
            current = self._registry.lookup(device.name)
            if current is not None and current.fingerprint != device.fingerprint:
                # A re-key: the old key is no longer this device's, even if the agent
                # with the new key is not connected to take its place.
                self._registry.drop(device.name, "device re-keyed: this key was replaced")
            link = self._registry.pendingFor(device.fingerprint)
            if link is not None:
                link.avatar.promote(device.name)
