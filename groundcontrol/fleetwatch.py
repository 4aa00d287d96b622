"""
Apply fleet changes made elsewhere to the live links.

Approvals and revocations are written to the store by whoever makes them (the
admin CLI in another process, the control shell, another groundcontrol node).
Every change is an audit event, so the audit table is also the change feed:
this watcher polls it and acts on the events that concern connected devices.
A revoked device's link is closed within one poll interval; a pending device
that was just approved becomes routable without reconnecting, and the link of a
key that an approved re-key replaced is closed.

It also sweeps, every lease check: leases that have ended, and pending requests nobody
has seen for the pending expiry (a week by default). Without that a queue filled by
requests that will never be approved (an attacker's, a rollout gone wrong) stayed full,
and no device could enroll, by token or claim either, until an admin cleared it. A
request whose agent is connected is being seen: this node marks its connected pending
agents as seen every hour, so neither it nor another node sharing the store expires them.

With an audit retention (--audit-max-age) the same sweep removes the oldest audit rows
and the sessions and expired certificates that go with them (L{IStore.pruneAudit}), a
batch at a time so the store's one write lock is never held for long: a backlog goes over
a few sweeps, each of which leaves one audit row and one log line saying what it removed.

A new device's, a re-key request's or a re-approval's notification waits (up to ten seconds)
for the serial its agent's hello reports, so it can say the board's serial and, for a re-key
or a re-approval, whether it is the device's (L{groundcontrol.requestnotice}).

A stopping watcher reads the feed once more (the rows written since the last poll) and the
serials stored on the requests it holds (a hello since the last poll), and sends what it
holds, within L{STOP_SERIAL_READ_WAIT}; groundcontrol's webhook waits for that hand-over
(L{MultiNotifier.handOverAtStop}) within its own stop bound. Then it leaves the audit id it
read up to in run/feed.json (L{groundcontrol.feedhandover}), and the next start reads on
from there: a row written later (a connection still open while groundcontrol stops, the
admin CLI or another node while it is down) is notified by that start, once, where a start
used to begin at the newest row and it never was. A store that does not answer the stop in
time leaves the rest of the feed, and the notifications held for serials, to the next start
in the same file: sent then, with the serial the hello stored meanwhile and within what was
left of their wait, rather than now without it (the webhook would never hear the serial).
The cost: a stop not followed by a start leaves them unsent (the audit log has the rows), as
a kill or a crash leaves no file and the start after it begins at the newest row. A
notification whose agent has not said hello when the store answers the stop goes at the
stop, without a serial, as before: the stop's bound stays the store's answer, not the hello.

With several nodes on a PostgreSQL store (a L{NotifierTurn} given), every node applies each
row to its own links, and only the node holding the fleet's notifier turn notifies them, on a
cursor of its own that starts at the fleet's position in the store and writes it as it goes
(L{groundcontrol.fleetturn} says why): a webhook hears of each row once per fleet, and a stop
or a crash leaves the rest to whichever node takes the turn next. run/feed.json is not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from accesstunnel.clocks import elapsedClock
from accesstunnel.timetext import isoTime
from groundcontrol.feedhandover import FeedHandOver, readHandOver, removeHandOver, writeHandOver
from groundcontrol.fleetturn import (
    IDLE_RECORD_INTERVAL,
    NOTIFY_BACKLOG,
    NOTIFY_PAGES_PER_POLL,
    NotifierTurn,
)
from groundcontrol.notify import FleetEvent, LogNotifier, MultiNotifier, Notifier, WebhookNotifier
from groundcontrol.registry import Registry
from groundcontrol.requestnotice import (
    HELD_EVENTS,
    SERIAL_CHANGED,
    HeldRequests,
    withSerialsCompared,
)
from groundcontrol.revocations import RevokedCertificates
from groundcontrol.store import IStore

DEFAULT_POLL_INTERVAL = 0.25

#: How often owned devices are checked for leases that have ended (and pending requests
#: for expiry).
DEFAULT_LEASE_CHECK_INTERVAL = 30.0

#: How long a pending request may go unseen before the sweep removes it (--pending-expiry).
DEFAULT_PENDING_EXPIRY = 7 * 86400.0

#: How often the pending requests of the agents connected to this node are marked as seen
#: (at most half the expiry): well before any node's sweep would find them stale.
PENDING_REFRESH_INTERVAL = 3600.0

#: Audit rows (and certificates) one retention sweep removes at most: a short write
#: transaction; 1,000 every lease check is far more than a fleet writes in that time.
AUDIT_PRUNE_BATCH = 1000

#: Audit events that remove a pending request: its agent, if connected, is disconnected.
REQUEST_REMOVED_EVENTS = frozenset({"enrollment.rejected", "enrollment.expired"})

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
        *REQUEST_REMOVED_EVENTS,
        # Rate limited per device by groundcontrol.flapping before they reach the feed.
        "device.online",
        "device.offline",
        "device.flapping",
    }
)

#: Audit events that change a live link (L{FleetWatcher._apply}).
APPLIED_EVENTS = frozenset(
    {"device.revoked", "device.approved", "device.claimed", *REQUEST_REMOVED_EVENTS}
)

#: What the watcher reads of the feed. The rest (two rows per relayed session, among
#: others) stays in the database: the store passes over it without handing it back.
#: Serial changes complete a held request's notification (L{HeldRequests}).
WATCHED_EVENTS = NOTIFIED_EVENTS | APPLIED_EVENTS | {SERIAL_CHANGED}

#: Events read from the feed at a time.
FEED_PAGE = 100

#: Seconds a stopping watcher waits for its last poll, one more read of the feed and one read
#: of the held requests' stored serials before it leaves the rest to the next start (or, with
#: nowhere to leave it, sends them without): a store answers in milliseconds, and this counts
#: against the webhook's STOP_DELIVERY_WAIT (5 s), which must leave time to POST.
STOP_SERIAL_READ_WAIT = 1.0


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
        pendingExpiry: float | None = DEFAULT_PENDING_EXPIRY,
        auditMaxAge: float | None = None,
        handOverFile: Path | None = None,
        turn: NotifierTurn | None = None,
    ) -> None:
        """
        @param pendingExpiry: seconds a pending request may go unseen before it is
            removed; None keeps them until an admin approves or rejects them.
        @param auditMaxAge: seconds audit rows (and expired certificates) are kept;
            None keeps everything.
        @param handOverFile: where a stop leaves the feed's position (and what it could not
            send) for the next start (L{groundcontrol.feedhandover}); None: a start begins
            at the newest row, and a stop sends what it holds whatever happens. Not used
            with a C{turn}.
        @param turn: with several nodes sharing the store, the fleet notifier's turn: this
            watcher notifies only while it holds it (L{groundcontrol.fleetturn}); None: one
            node, which notifies every row it reads.
        """
        self._turn = turn
        #: With a turn held: the audit id notified up to (the applying cursor is _lastId).
        self._notifyAt: int | None = None
        #: The ids of the rows held for their serials, not yet sent (with a turn).
        self._heldIds: set[int] = set()
        #: The ids sent since the position was last written (with a turn).
        self._unrecorded: list[int] = []
        self._nextIdleRecord = 0.0
        self._handOverFile = handOverFile
        #: What the last stop left, read at the start, until the first poll takes it.
        self._resume: FeedHandOver | None = None
        #: Set once a stop has left the rest to the next start: nothing more is notified.
        self._leftToNextStart = False
        self._auditMaxAge = auditMaxAge
        self._revocations = revocations
        self._store = store
        self._registry = registry
        self._clock = clock
        # When the next check is due and how long a notification is held: durations, on a
        # clock that does not step (the store's dates stay the reactor's wall clock).
        self._elapsed = elapsedClock(clock)
        self._interval = interval
        self._notifier = notifier or LogNotifier()
        self._leaseCheckInterval = leaseCheckInterval
        self._nextLeaseCheck = 0.0
        self._pendingExpiry = pendingExpiry
        self._nextPendingRefresh = 0.0
        self._lastId: int | None = None
        self._loop: LoopingCall | None = None
        #: Fires when the loop has stopped: at once, or when the poll in progress ends.
        self._loopEnded: Deferred[Any] | None = None
        self._stopping = False
        self._heldRequests = HeldRequests()

    def startService(self) -> None:
        self._leftToNextStart = False
        self._notifyAt = None
        if self._handOverFile is not None and self._turn is None:
            # Read here, not when built: a start refused after the build leaves it in place.
            resume = readHandOver(self._handOverFile)
            if resume is not None:
                # The first poll takes it (a watcher started again: what its stop left).
                self._resume, self._lastId = resume, None
        super().startService()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self._clock
        self._stopping = False
        self._loopEnded = self._loop.start(self._interval, now=True).addErrback(
            lambda f: self._log.failure("fleet watcher stopped", f)
        )

    def stopService(self) -> Any:
        """
        Stop polling, notify the rows written since the last poll, and send the held
        notifications with the serials their requests have stored by now: a hello that
        landed since the last poll is not lost. Fires when they are sent, within
        L{STOP_SERIAL_READ_WAIT}; groundcontrol's webhook, which stops after this service,
        waits for that (L{MultiNotifier.handOverAtStop}). Then the position reached, and
        what the store did not answer for in time, are left to the next start
        (L{groundcontrol.feedhandover}): rows written later, or not read in time, are
        notified by it, and a held notification keeps its chance of a serial.
        """
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        super().stopService()
        # Asked before the webhook's stop begins (it stops after this service).
        handedOver: Deferred[None] = (
            self._notifier.handOverAtStop()
            if isinstance(self._notifier, MultiNotifier)
            else Deferred()
        )
        sent = Deferred.fromCoroutine(self._lastReadAtStop())
        sent.addTimeout(STOP_SERIAL_READ_WAIT, self._clock)
        sent.addBoth(self._endAtStop)
        sent.addCallback(lambda _: handedOver.callback(None))
        return sent

    async def _lastReadAtStop(self) -> None:
        """
        After the poll in progress, read the feed once more and the held requests' stored
        serials; send them all (a request whose agent has not said hello by now without).
        """
        await self._pollEnded()
        if self._turn is not None:
            if self._turn.holding and self._notifyAt is not None:
                await self._readForNotification()
        elif self._lastId is not None:
            await self._readFeed(self._clock.seconds())
        keys = self._heldRequests.keys()
        if keys:
            await self._readStoredSerials(keys)
        self._send(self._heldRequests.drain())
        if self._turn is not None:
            await self._recordPosition(atStop=True)
            await self._turn.leave()

    def _endAtStop(self, result: object) -> None:
        """
        The stop's reads have ended, or been cut short at their bound (C{result} a
        L{Failure}): leave the position, and what is still held, to the next start; without
        a hand-over file (or if it cannot be written), send what is held now, not never.
        """
        failure = result if isinstance(result, Failure) else None
        cutShort = failure is not None
        if failure is not None and not failure.check(TimeoutError):
            self._log.failure("could not read the audit feed at stop", failure)
        if self._turn is not None:
            self._endTurnAtStop(cutShort)
            return
        held = self._heldRequests.handOver(self._elapsed())
        if self._handOverFile is not None and self._lastId is not None:
            try:
                writeHandOver(self._handOverFile, FeedHandOver(self._lastId, held))
            except OSError as e:
                self._log.warn(
                    "fleet watcher stopping: could not write {path} ({error}); the next "
                    "start begins at the newest audit row, not after id {readTo}",
                    path=str(self._handOverFile),
                    error=str(e),
                    readTo=self._lastId,
                )
            else:
                self._leftToNextStart = True
                if cutShort:
                    self._log.warn(
                        "fleet watcher stopping: the store did not answer within {wait} s; "
                        "the audit rows after id {readTo} and {held} notification(s) held "
                        "for serials are left to the next start ({path})",
                        wait=STOP_SERIAL_READ_WAIT,
                        readTo=self._lastId,
                        held=len(held),
                        path=str(self._handOverFile),
                    )
                return
        if cutShort and held:
            self._log.warn(
                "fleet watcher stopping: the store did not answer within {wait} s; the "
                "notifications held for serials were sent without them",
                wait=STOP_SERIAL_READ_WAIT,
            )
        # Without the serial they waited for, not at all.
        self._send([event for event, _ in held])

    def _endTurnAtStop(self, cutShort: bool) -> None:
        """
        With a turn: what the stop did not send (the store did not answer in time) is the
        next notifying node's, from the fleet's position, which is before it; none is sent
        from here after this.
        """
        self._leftToNextStart = True
        held = self._heldRequests.handOver(self._elapsed())
        self._heldIds.clear()
        if cutShort and self._notifyAt is not None:
            self._log.warn(
                "fleet watcher stopping: the store did not answer within {wait} s; the audit "
                "rows after the fleet's notified position {recorded} ({held} held for "
                "serials) are left to the node that notifies next",
                wait=STOP_SERIAL_READ_WAIT,
                recorded=self._turn.recorded if self._turn is not None else None,
                held=len(held),
            )

    def _pollEnded(self) -> Deferred[None]:
        """Fires when the loop's poll in progress, if any, has ended; the loop's is kept."""
        ended: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            if not ended.called:
                ended.callback(None)
            return result

        (self._loopEnded or succeed(None)).addBoth(fire)
        return ended

    def _send(self, events: list[FleetEvent]) -> None:
        if self._leftToNextStart:
            return  # a poll that outlived the stop: the next start notifies from its position
        for event in events:
            if self._turn is not None and event.id is not None:
                self._heldIds.discard(event.id)
                self._unrecorded.append(event.id)
            self._notifier.notify(event)

    async def _poll(self) -> None:
        if self._lastId is None:
            newest = await self._store.lastAuditId()
            if self._stopping:
                return  # a stop came first: what the last stop left stays for the next start
            self._lastId = self._startingPosition(newest)
            if self._revocations is not None:
                await self._revocations.load()
            return
        now = self._clock.seconds()
        if self._elapsed() >= self._nextLeaseCheck:
            self._nextLeaseCheck = self._elapsed() + self._leaseCheckInterval
            for device in await self._store.lapsedLeases(now):
                # Its audit event comes back through the feed and is notified.
                await self._store.endLease(device.name, now)
            if self._pendingExpiry is not None:
                await self._sweepPending(now, self._pendingExpiry)
            if self._auditMaxAge is not None:
                await self._pruneAudit(now, self._auditMaxAge)
        await self._readFeed(now)
        if self._turn is not None:
            await self._notifyWithTheTurn()
        await self._readStoredSerials(self._heldRequests.awaitingStoredSerial())
        self._send(self._heldRequests.due(self._elapsed()))
        if self._stopping and not self._leftToNextStart:
            # A poll that outlived the stop's wait: what it held goes now, not never.
            self._send(self._heldRequests.drain())
        if self._turn is not None and not self._stopping:
            await self._recordPosition()

    async def _notifyWithTheTurn(self) -> None:
        """
        If this node holds the fleet notifier's turn (taking it if free), notify on from
        where the fleet's notifications got to; one that lost it drops what it held (the
        node holding it now reads those rows from the fleet's position).
        """
        assert self._turn is not None
        if self._stopping:
            return  # the stop's last read notifies, and gives the turn up: not taken again
        if not await self._turn.take():
            if self._notifyAt is not None:
                self._notifyAt = None
                self._heldRequests = HeldRequests()
                self._heldIds.clear()
                self._unrecorded.clear()
            return
        if self._notifyAt is None:
            position = await self._turn.startingPosition()
            if self._stopping:
                return  # the stop leaves it to the next notifying node
            self._notifyAt = position
        await self._readForNotification()

    async def _readForNotification(self) -> None:
        """
        Notify the watched rows after the notifying cursor: a few pages a poll, and none
        while the webhook is behind, so that catching up on a backlog stays bounded.
        """
        for _ in range(NOTIFY_PAGES_PER_POLL):
            if len(self._unfinishedIds()) >= NOTIFY_BACKLOG or self._notifyAt is None:
                return
            page = await self._store.auditFeed(self._notifyAt, WATCHED_EVENTS, FEED_PAGE)
            if self._leftToNextStart:
                return  # a poll that outlived the stop: the next notifying node reads these
            for event in page.events:
                self._notifyAt = event.id
                self._notifyRow(_fleetEvent(event))
            self._notifyAt = page.readTo
            if len(page.events) < FEED_PAGE:
                return

    def _unfinishedIds(self) -> list[int]:
        """The audit ids the webhook has not delivered or given up yet."""
        if isinstance(self._notifier, (MultiNotifier, WebhookNotifier)):
            return self._notifier.unfinishedIds()
        return []

    async def _recordPosition(self, atStop: bool = False) -> None:
        """
        Write the fleet's notified position: the notifying cursor, or just below the lowest
        row still held for its serial or unfinished in the webhook. Written when it passes a
        row sent since the last write (or at the stop), else every L{IDLE_RECORD_INTERVAL}.
        """
        assert self._turn is not None
        if self._notifyAt is None or not self._turn.holding:
            return
        unfinished = [*self._heldIds, *self._unfinishedIds()]
        position = min(self._notifyAt, min(unfinished) - 1) if unfinished else self._notifyAt
        recorded = self._turn.recorded
        if recorded is not None and position <= recorded:
            return
        passesASentRow = any(sent <= position for sent in self._unrecorded)
        if not (atStop or passesASentRow or self._elapsed() >= self._nextIdleRecord):
            return
        self._nextIdleRecord = self._elapsed() + IDLE_RECORD_INTERVAL
        await self._turn.record(position, self._clock.seconds())
        self._unrecorded = [sent for sent in self._unrecorded if sent > position]

    def _startingPosition(self, newest: int) -> int:
        """
        The audit id the feed is read after: where the last stop left it, if it did
        (what it held is held again), else the newest row's. What happened before that is
        already in the store, and agents connecting now are checked against it.
        """
        resume, self._resume = self._resume, None
        if resume is None or self._handOverFile is None:
            return newest
        removeHandOver(self._handOverFile)
        if resume.readTo > newest:
            self._log.warn(
                "ignoring {path}: the last stop read the audit log up to id {readTo}, past "
                "its newest row ({newest}): another store? starting at the newest row",
                path=str(self._handOverFile),
                readTo=resume.readTo,
                newest=newest,
            )
            return newest
        for event, wait in resume.held:
            self._send(self._heldRequests.hold(event, self._elapsed(), wait))
        self._log.info(
            "fleet watcher: notifying the audit rows after id {readTo} (the newest is "
            "{newest}), where the last stop left them, and the {held} notification(s) it "
            "held for serials",
            readTo=resume.readTo,
            newest=newest,
            held=len(resume.held),
        )
        return resume.readTo

    async def _readStoredSerials(self, keys: frozenset[str]) -> None:
        """Send the held notifications of C{keys} whose serials are stored on their requests."""
        if not keys:
            return
        for request in await self._store.listEnrollmentRequests():
            if request.fingerprint in keys and request.serial is not None:
                self._send(self._heldRequests.release(request.fingerprint, request.serial))

    async def _readFeed(self, now: float) -> None:
        """Notify and apply the watched events written since the last read."""
        assert self._lastId is not None
        while True:
            page = await self._store.auditFeed(self._lastId, WATCHED_EVENTS, FEED_PAGE)
            if self._leftToNextStart:
                return  # a poll that outlived the stop: the next start reads these
            for event in page.events:
                self._lastId = event.id
                if self._turn is None:  # one node; with several, the turn's holder notifies
                    self._notifyRow(_fleetEvent(event))
                await self._apply(event)
            self._lastId = page.readTo
            if len(page.events) < FEED_PAGE:
                return  # read up to the newest row

    def _notifyRow(self, fleetEvent: FleetEvent) -> None:
        """Notify one watched row, or hold it for its serial."""
        # A held request's notification goes before any later event of its key.
        self._send(self._heldRequests.read(fleetEvent))
        if fleetEvent.event in HELD_EVENTS:
            if self._turn is not None and fleetEvent.id is not None:
                self._heldIds.add(fleetEvent.id)
            self._send(self._heldRequests.hold(fleetEvent, self._elapsed()))
        elif fleetEvent.event in NOTIFIED_EVENTS:
            self._send([withSerialsCompared(fleetEvent)])

    async def _sweepPending(self, now: float, expiry: float) -> None:
        """
        Mark this node's connected pending agents as seen (hourly, and at most every half
        expiry, so none of them is ever stale here), then remove the requests not seen for
        C{expiry}; each removal's audit event comes back through the feed and is notified.
        """
        connected = self._registry.pendingFingerprints()
        if connected and now >= self._nextPendingRefresh:
            self._nextPendingRefresh = now + min(PENDING_REFRESH_INTERVAL, expiry / 2)
            await self._store.touchRequests(connected, now)
        for request in await self._store.staleRequests(now - expiry):
            await self._store.expireRequest(request.fingerprint, now - expiry, now)

    async def _pruneAudit(self, now: float, maxAge: float) -> None:
        """Remove one batch of audit rows older than C{maxAge} (the store audits it)."""
        pruned = await self._store.pruneAudit(now - maxAge, AUDIT_PRUNE_BATCH, now)
        if pruned.auditRows or pruned.certificates:
            self._log.info(
                "audit retention: removed {auditRows} audit rows up to id {throughId} "
                "({sessions} sessions) and {certificates} expired certificates, "
                "older than {before}",
                auditRows=pruned.auditRows,
                throughId=pruned.throughId,
                sessions=pruned.sessions,
                certificates=pruned.certificates,
                before=isoTime(now - maxAge),
            )

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
        if event.event in REQUEST_REMOVED_EVENTS:
            self._disconnectRemovedRequest(event)
        elif event.event == "device.revoked" and event.device:
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

    def _disconnectRemovedRequest(self, event: Any) -> None:
        """
        Close the link of an agent whose pending request was rejected or expired: it may
        connect again, as a new request. A link that connected after the removal already
        made that new request, and is left alone.
        """
        fingerprint = event.detail.get("fingerprint")
        link = self._registry.pendingFor(fingerprint) if isinstance(fingerprint, str) else None
        if link is None or link.connectedAt > event.at:
            return
        why = "rejected by an admin" if event.event == "enrollment.rejected" else "expired"
        link.close(f"enrollment request {why}; connect again to ask again")


def _fleetEvent(event: Any) -> FleetEvent:
    """The notification of an audit row (L{groundcontrol.store.AuditEvent})."""
    return FleetEvent(
        event=event.event,
        device=event.device or "",
        actor=event.actor,
        at=event.at,
        detail=event.detail,
        id=event.id,
    )
