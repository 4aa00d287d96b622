"""
Tests for the store's audit retention (IStore.pruneAudit, schema 007), on SQLite and
PostgreSQL: the oldest audit rows go a batch at a time, with the sessions indexed only by
them and the certificates long expired; the change feed neither skips nor repeats a row;
one audit row says what went.
"""

from __future__ import annotations

from typing import Any

from groundcontrol.store import (
    AUDIT_PRUNED,
    SESSION_ENDED,
    SESSION_STARTED,
    AuditEvent,
    AuditPruned,
    schemaUpgraders,
)
from tests.test_store import T0, StoreTestCase, bothBackends

DAY = 86400.0


@bothBackends
class PruneAuditTests(StoreTestCase):
    def audit(self, event: str, at: float, **detail: Any) -> AuditEvent:
        return self.successResultOf(self.store.audit(event, "alice", "kiln7", detail, at))

    def session(self, sessionId: str, startedAt: float, endedAt: float | None) -> None:
        """Audit a relayed session's two events (one, if it is still open)."""
        self.audit(SESSION_STARTED, startedAt, session=sessionId, started_at=startedAt)
        if endedAt is not None:
            self.audit(SESSION_ENDED, endedAt, session=sessionId, started_at=startedAt)

    def prune(self, before: float, limit: int = 1000, now: float = T0 + 400 * DAY) -> AuditPruned:
        return self.successResultOf(self.store.pruneAudit(before, limit, now))

    def test_nothingOldEnough(self) -> None:
        """Nothing before the cut-off: nothing goes, and no audit row says otherwise."""
        self.audit("device.approved", T0)
        self.assertEqual(self.prune(T0), AuditPruned(0, 0, 0, 0))
        self.assertEqual([e.event for e in self.events()], ["device.approved"])

    def test_oldestRowsGoInBatches(self) -> None:
        """
        The oldest rows go, C{limit} at a time, and each batch leaves one audit.pruned row
        saying how many went, up to which id and before when; the newer rows stay as they
        were.
        """
        old = [self.audit("device.online", T0 + n).id for n in range(5)]
        kept = self.audit("device.offline", T0 + 10 * DAY)
        cutoff = T0 + DAY
        first = self.prune(cutoff, limit=3, now=T0 + 20 * DAY)
        self.assertEqual(first, AuditPruned(3, 0, 0, old[2]))
        second = self.prune(cutoff, limit=3, now=T0 + 20 * DAY)
        self.assertEqual(second, AuditPruned(2, 0, 0, old[4]))
        events = self.events()
        self.assertEqual([e.event for e in events], ["device.offline", AUDIT_PRUNED, AUDIT_PRUNED])
        self.assertEqual(events[0], kept)
        self.assertEqual(
            [e.detail for e in events[1:]],
            [
                {
                    "audit_rows": 3,
                    "sessions": 0,
                    "certificates": 0,
                    "through_id": old[2],
                    "before": cutoff,
                },
                {
                    "audit_rows": 2,
                    "sessions": 0,
                    "certificates": 0,
                    "through_id": old[4],
                    "before": cutoff,
                },
            ],
        )
        self.assertEqual(events[1].at, T0 + 20 * DAY)

    def test_stopsAtTheFirstNewerRow(self) -> None:
        """
        Only a run of the oldest ids goes: an old row written after a newer one (a clock
        that jumped back) waits for that one, so the log keeps no hole.
        """
        first = self.audit("device.online", T0)
        newer = self.audit("device.online", T0 + 10 * DAY)
        late = self.audit("device.online", T0 + 1)
        self.assertEqual(self.prune(T0 + DAY), AuditPruned(1, 0, 0, first.id))
        self.assertEqual([e.id for e in self.events()][:2], [newer.id, late.id])

    def test_feedNeitherSkipsNorRepeats(self) -> None:
        """
        A reader of the feed that saw up to some id reads exactly the rows written after
        it, pruning or not, and ids go on growing after the oldest rows went.
        """
        for n in range(4):
            self.audit("device.online", T0 + n)
        seen = self.successResultOf(self.store.lastAuditId())
        unread = [self.audit("device.revoked", T0 + 2 * DAY + n).id for n in range(3)]
        self.prune(T0 + DAY)
        page = self.successResultOf(self.store.auditFeed(seen, {"device.revoked"}, 100))
        self.assertEqual([e.id for e in page.events], unread)
        again = self.successResultOf(self.store.auditFeed(page.readTo, {"device.revoked"}, 100))
        self.assertEqual(again.events, ())
        after = self.audit("device.revoked", T0 + 3 * DAY)
        self.assertGreater(after.id, page.readTo)

    def test_sessionsGoWithTheirEvents(self) -> None:
        """
        A session whose events all went leaves the index; one that started before the
        cut-off and ended after it keeps its ended event; newer sessions are untouched.
        """
        self.session("s-old", T0, T0 + 60)
        self.session("s-open", T0 + 100, None)
        self.session("s-span", T0 + 200, T0 + 2 * DAY)
        self.session("s-new", T0 + 3 * DAY, T0 + 3 * DAY + 60)
        pruned = self.prune(T0 + DAY)
        self.assertEqual((pruned.auditRows, pruned.sessions), (4, 2))
        self.assertIsNone(self.successResultOf(self.store.sessionEvents("s-old")))
        self.assertIsNone(self.successResultOf(self.store.sessionEvents("s-open")))
        span = self.successResultOf(self.store.sessionEvents("s-span"))
        assert span is not None
        self.assertIsNone(span.started)
        self.assertEqual(span.ended.event if span.ended else None, SESSION_ENDED)
        recent = self.successResultOf(self.store.recentSessions(0))
        self.assertEqual([s.id for s in recent], ["s-span", "s-new"])

    def test_expiredCertificatesGo(self) -> None:
        """
        Certificates past their not-after before the cut-off go, except each key's newest
        unrevoked one: the device's certificate expiry is derived from it, and a device
        whose certificate ran out must still be approved again.
        """
        _, device = self.enroll("kiln7")
        for n, notAfter in enumerate([T0 + DAY, T0 + 2 * DAY, T0 + 5 * DAY]):
            self.successResultOf(
                self.store.recordCertificate(
                    "kiln7", f"0{n}", device.fingerprint, T0, notAfter, T0 + n
                )
            )
        self.assertEqual(self.prune(T0 + 3 * DAY).certificates, 2)
        self.assertEqual(
            [c.serialNumber for c in self.successResultOf(self.store.listCertificates("kiln7"))],
            ["02"],
        )
        # Long after the last one ran out it stays, and the device still needs re-approval.
        self.assertEqual(self.prune(T0 + 100 * DAY).certificates, 0)
        after = self.successResultOf(self.store.deviceByName("kiln7"))
        assert after is not None
        self.assertEqual(after.certificateExpiresAt, T0 + 5 * DAY)
        self.assertTrue(self.store._needsReapproval(after, T0 + 100 * DAY))

    def test_theIndexesAreThere(self) -> None:
        """Schema 007 adds the indexes the sweep deletes by."""
        self.assertGreaterEqual(schemaUpgraders()[-1][0], 7)
        if self.backend == "postgresql":
            sql = "SELECT indexname FROM pg_indexes WHERE indexname LIKE ?"
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE ?"
        names = {row[0] for row in self.rawQuery(sql, ("%_event",))}
        names |= {row[0] for row in self.rawQuery(sql, ("certificates_by_not_after",))}
        self.assertEqual(
            names,
            {
                "session_index_by_started_event",
                "session_index_by_ended_event",
                "certificates_by_not_after",
            },
        )
