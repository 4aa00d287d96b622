"""
The fleet watcher's read of the audit feed: only the events it acts on or notifies come
out of the store, and it moves past the rest (the sessions' rows) without reading them
again or missing an event among them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.fleetwatch import FEED_PAGE, FleetWatcher
from groundcontrol.registry import Registry
from groundcontrol.store import SESSION_ENDED, SESSION_STARTED, AuditPage, SQLiteStore
from groundcontrol.testing import openMemoryStore, resultNow
from tests.test_enrollment import RecordingNotifier

T0 = 1_700_000_000.0


class FeedRecorder:
    """The store, noting each read of the audit log and what it handed back."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self.reads: list[tuple[int, list[str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def auditSince(self, afterId: int, limit: int = 100) -> Any:
        def note(events: list[Any]) -> list[Any]:
            self.reads.append((afterId, [e.event for e in events]))
            return events

        return self._store.auditSince(afterId, limit).addCallback(note)

    def auditFeed(self, afterId: int, events: Any, limit: int = 100) -> Any:
        def note(page: AuditPage) -> AuditPage:
            self.reads.append((afterId, [e.event for e in page.events]))
            return page

        return self._store.auditFeed(afterId, events, limit).addCallback(note)


class FeedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = openMemoryStore()
        self.feed = FeedRecorder(self.store)
        self.notifier = RecordingNotifier()
        self.clock = Clock()
        self.watcher = FleetWatcher(
            self.feed,  # type: ignore[arg-type]
            Registry(),
            self.clock,
            notifier=self.notifier,
        )
        self.poll()  # the first poll starts at the newest id
        self.feed.reads.clear()

    def poll(self) -> None:
        resultNow(self.watcher.poll())

    def sessions(self, count: int) -> None:
        """Audit C{count} relayed sessions, started and ended: two rows each."""
        for n in range(count):
            detail = {"id": f"s{n:09d}", "started_at": T0}
            for event in (SESSION_STARTED, SESSION_ENDED):
                resultNow(self.store.audit(event, "alice", "kiln7", detail, T0))

    def fleetEvent(self, event: str, device: str) -> int:
        return resultNow(self.store.audit(event, "root", device, {"n": device}, T0)).id

    def readBack(self) -> list[str]:
        return [kind for _, kinds in self.feed.reads for kind in kinds]

    def test_sessionRowsStayInTheStore(self) -> None:
        """
        Of 300 sessions' rows and two fleet events among them, the store hands the watcher
        the two events only, and both are notified.
        """
        self.sessions(100)
        self.fleetEvent("device.pending", "oven1")
        self.sessions(100)
        self.fleetEvent("claim.lapsed", "oven2")
        self.sessions(100)
        self.poll()
        self.assertEqual(self.readBack(), ["device.pending", "claim.lapsed"])
        self.assertEqual(
            [(e.event, e.device) for e in self.notifier.events],
            [("device.pending", "oven1"), ("claim.lapsed", "oven2")],
        )

    def test_movesPastRowsItPassedOver(self) -> None:
        """
        After a poll that found only session rows, the next read starts after the newest
        of them: the watcher never reads the same rows twice.
        """
        self.sessions(FEED_PAGE * 2)
        self.poll()
        newest = resultNow(self.store.lastAuditId())
        self.feed.reads.clear()
        self.poll()
        self.assertEqual(self.feed.reads, [(newest, [])])

    def test_noEventMissedAcrossPages(self) -> None:
        """
        More fleet events than one page holds, between session rows: each is notified
        once, in order, and later events are seen by the next poll.
        """
        written = []
        for n in range(FEED_PAGE + 20):
            self.sessions(1)
            written.append(f"d{n}")
            self.fleetEvent("device.offline", f"d{n}")
        self.poll()
        self.assertEqual([e.device for e in self.notifier.events], written)
        self.assertEqual(len(self.feed.reads), 2)  # a full page, then the rest

        self.sessions(3)
        self.fleetEvent("device.online", "late")
        self.sessions(3)
        self.poll()
        self.assertEqual([e.device for e in self.notifier.events], [*written, "late"])

    def test_notifiedWithTheAuditId(self) -> None:
        """
        A notified event carries its audit row's id, and the webhook payload sends it: a
        receiver told the same event twice (a retry after a lost answer) can tell.
        """
        first = self.fleetEvent("device.pending", "oven1")
        second = self.fleetEvent("device.pending", "oven1")
        self.poll()
        self.assertEqual([e.id for e in self.notifier.events], [first, second])
        self.assertEqual([e.toJSON()["id"] for e in self.notifier.events], [first, second])
