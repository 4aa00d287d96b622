"""
Tests for the store's session index (schema 005): the latest relayed sessions and one
session by id, read through the index instead of a scan of the whole audit log, on SQLite
and PostgreSQL, and the upgrade of a version 4 database that already holds sessions.
"""

from __future__ import annotations

import json
from typing import Any

from groundcontrol.sessions import _pastSession
from groundcontrol.store import (
    SESSION_ENDED,
    SESSION_STARTED,
    AuditEvent,
    SessionEvents,
    schemaUpgraders,
)
from groundcontrol.store._dialect import POSTGRESQL
from tests.test_store import EVERY_TABLE, T0, StoreTestCase, bothBackends


def scanned(events: list[AuditEvent], limit: int) -> list[dict[str, Any]]:
    """
    The latest C{limit} sessions (all with 0) as the scan of the audit log before the index
    found them (plus the id of a session whose events name it only as "session"), newest
    last: what the index must give.
    """
    found: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.event not in (SESSION_STARTED, SESSION_ENDED):
            continue
        sessionId = event.detail.get("session") or event.detail.get("id")
        if not isinstance(sessionId, str):
            continue
        row = found.setdefault(sessionId, {"id": sessionId})
        row.update(event.detail)
        row["state"] = "ended" if event.event == SESSION_ENDED else row.get("state", "open")
    rows = sorted(found.values(), key=lambda r: (r.get("started_at") or 0, r.get("id") or ""))
    return rows[-limit:] if limit else rows


def merged(sessions: list[SessionEvents]) -> list[dict[str, Any]]:
    """The index's answer in the same shape, as groundcontrol.sessions makes it."""
    return [_pastSession(s) for s in sessions]


def record(sessionId: str, startedAt: float, **more: Any) -> dict[str, Any]:
    """A session event's detail, as groundcontrol.sessions writes it."""
    return {"session": sessionId, "id": sessionId, "started_at": startedAt, **more}


class SessionIndexTestCase(StoreTestCase):
    def audit(self, event: str, detail: dict[str, Any], now: float = T0) -> AuditEvent:
        return self.successResultOf(self.store.audit(event, "alice", "kiln7", detail, now))

    def history(self) -> list[tuple[str, dict[str, Any]]]:
        """
        Six sessions and other events between them: two still open, one whose events
        came out of start order, one with its start only in the end event.
        """
        return [
            ("device.approved", {"device": "kiln7"}),
            (SESSION_STARTED, record("aaaaaaaaaa", T0 + 1, command="true")),
            (SESSION_STARTED, record("bbbbbbbbbb", T0 + 2, command="ls")),
            (SESSION_ENDED, record("aaaaaaaaaa", T0 + 1, command="true", exit_status=0)),
            ("session.killed", {"session": "bbbbbbbbbb", "by": "root"}),
            (SESSION_STARTED, record("dddddddddd", T0 + 5)),
            (SESSION_STARTED, record("cccccccccc", T0 + 4)),
            (SESSION_ENDED, record("bbbbbbbbbb", T0 + 2, command="ls", killed_by="root")),
            (SESSION_ENDED, {"session": "eeeeeeeeee", "started_at": T0 + 3, "bytes_in": 9}),
            (SESSION_STARTED, record("ffffffffff", T0 + 6, pty=True)),
            (SESSION_STARTED, {"note": "no session id: not a session"}),
        ]


@bothBackends
class SessionIndexTests(SessionIndexTestCase):
    """The latest sessions and a session by id, from the index kept as events are written."""

    def setUp(self) -> None:
        super().setUp()
        for event, detail in self.history():
            self.audit(event, detail)
        self.log = self.successResultOf(self.store.auditSince(0, limit=10_000))

    def test_latestByStartNewestLast(self) -> None:
        """
        recentSessions(n) gives the n latest sessions by their start, newest last, each
        with its started and ended events: exactly what scanning the log gave.
        """
        for limit in (1, 3, 6, 0):
            got = self.successResultOf(self.store.recentSessions(limit))
            self.assertEqual(merged(got), scanned(self.log, limit), limit)
        latest = self.successResultOf(self.store.recentSessions(3))
        self.assertEqual([s.id for s in latest], ["cccccccccc", "dddddddddd", "ffffffffff"])
        self.assertIsNone(latest[-1].ended)
        assert latest[-1].started is not None
        self.assertEqual(latest[-1].started.detail["pty"], True)

    def test_oneById(self) -> None:
        """sessionEvents finds one session by its id; an unknown id is None."""
        found = self.successResultOf(self.store.sessionEvents("bbbbbbbbbb"))
        assert found is not None and found.started is not None and found.ended is not None
        self.assertEqual(found.started.event, SESSION_STARTED)
        self.assertEqual(found.ended.detail["killed_by"], "root")
        onlyEnd = self.successResultOf(self.store.sessionEvents("eeeeeeeeee"))
        assert onlyEnd is not None
        self.assertIsNone(onlyEnd.started)
        self.assertIsNone(self.successResultOf(self.store.sessionEvents("zzzzzzzzzz")))

    def test_writtenWithTheEvent(self) -> None:
        """
        The index is written in the event's own transaction: another connection (the CLI,
        another node) sees a session as soon as its event, and its end as soon as that.
        """
        other = self.openAnother()
        self.audit(SESSION_STARTED, record("gggggggggg", T0 + 7))
        (latest,) = self.successResultOf(other.recentSessions(1))
        self.assertEqual((latest.id, latest.ended), ("gggggggggg", None))
        self.audit(SESSION_ENDED, record("gggggggggg", T0 + 7, exit_status=1))
        (latest,) = self.successResultOf(other.recentSessions(1))
        assert latest.ended is not None
        self.assertEqual(latest.ended.detail["exit_status"], 1)

    def test_listingReadsTheIndexNotTheLog(self) -> None:
        """
        The listing's query plan walks the index by start and looks the events up by
        primary key: no scan of the audit log (on PostgreSQL with sequential scans
        discouraged, so that the plan shows what the indexes allow, not what a table of
        a few rows makes cheapest).
        """
        from groundcontrol.store._sqlaudit import _SESSION_SELECT

        query = _SESSION_SELECT + " ORDER BY s.started_at DESC, s.id DESC LIMIT 100"
        byId = _SESSION_SELECT + " WHERE s.id = 'bbbbbbbbbb'"
        for sql in (query, byId):
            plan = self.plan(sql)
            self.assertNotRegex(plan, r"(?i)(seq scan on audit|scan (audit|st|en)\b(?! using))")
        self.assertRegex(self.plan(query), r"session_index_by_start|Index Scan Backward")

    def plan(self, sql: str) -> str:
        if self.backend == "postgresql":
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as pg:
                pg.execute("SET enable_seqscan = off")
                rows = pg.execute("EXPLAIN " + POSTGRESQL.sql(sql)).fetchall()
            return "\n".join(r[0] for r in rows)
        return "\n".join(str(r[-1]) for r in self.rawQuery("EXPLAIN QUERY PLAN " + sql))


@bothBackends
class UpgradeTo005Tests(SessionIndexTestCase):
    """A version 4 database with months of audit gains the index of the sessions in it."""

    def test_existingSessionsIndexed(self) -> None:
        """
        Sessions audited under version 4 (no index) are listed after the upgrade exactly as
        the scan of the log listed them, and found by id; new ones are indexed as written.
        """
        for table in EVERY_TABLE:
            self.rawQuery(f"DROP TABLE {table}")
        self.assertEqual(self.rawMigrate(upTo=4), 4)
        for n, (event, detail) in enumerate(self.history()):
            self.rawQuery(
                "INSERT INTO audit (at, event, actor, device, detail) VALUES (?, ?, ?, ?, ?)",
                (T0 + n, event, "alice", "kiln7", json.dumps(detail)),
            )
        self.assertEqual(self.rawMigrate(), schemaUpgraders()[-1][0])
        self.assertGreaterEqual(schemaUpgraders()[-1][0], 5)
        store = self.openAnother()
        log = self.successResultOf(store.auditSince(0, limit=10_000))
        for limit in (2, 0):
            got = self.successResultOf(store.recentSessions(limit))
            self.assertEqual(merged(got), scanned(log, limit), limit)
        found = self.successResultOf(store.sessionEvents("aaaaaaaaaa"))
        assert found is not None and found.ended is not None
        self.assertEqual(found.ended.detail["exit_status"], 0)
        self.successResultOf(
            store.audit(SESSION_STARTED, "alice", "kiln7", record("hhhhhhhhhh", T0 + 9), T0)
        )
        (latest,) = self.successResultOf(store.recentSessions(1))
        self.assertEqual(latest.id, "hhhhhhhhhh")
