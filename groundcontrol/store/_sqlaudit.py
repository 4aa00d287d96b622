"""
The SQL store's audit log and the session index over it: reading, the change feed, pruning.

Every part appends its events through L{StoreCore._insertAudit}; this part reads them back
(by id, by kind for the fleet watcher's feed, by session) and prunes old rows.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from twisted.internet.defer import Deferred

from ._dialect import Cursor, Row
from ._records import AUDIT_PRUNED, AuditEvent, AuditPage, AuditPruned, SessionEvents
from ._sqlcore import _SESSION_EVENT_COLUMNS, StoreCore

_SESSION_SELECT = (
    "SELECT s.id AS id, "
    "st.id AS st_id, st.at AS st_at, st.event AS st_event, st.actor AS st_actor, "
    "st.device AS st_device, st.detail AS st_detail, "
    "en.id AS en_id, en.at AS en_at, en.event AS en_event, en.actor AS en_actor, "
    "en.device AS en_device, en.detail AS en_detail "
    "FROM session_index s "
    "LEFT JOIN audit st ON st.id = s.started_event "
    "LEFT JOIN audit en ON en.id = s.ended_event"
)


def _joinedEvent(row: Row, prefix: str) -> AuditEvent | None:
    if row[f"{prefix}_id"] is None:
        return None
    return AuditEvent(
        id=int(row[f"{prefix}_id"]),
        at=row[f"{prefix}_at"],
        event=row[f"{prefix}_event"],
        actor=row[f"{prefix}_actor"],
        device=row[f"{prefix}_device"],
        detail=json.loads(row[f"{prefix}_detail"]),
    )


def _sessionEvents(row: Row) -> SessionEvents:
    return SessionEvents(row["id"], _joinedEvent(row, "st"), _joinedEvent(row, "en"))


def _auditEvent(row: Row) -> AuditEvent:
    return AuditEvent(
        id=int(row["id"]),
        at=row["at"],
        event=row["event"],
        actor=row["actor"],
        device=row["device"],
        detail=json.loads(row["detail"]),
    )


class AuditRows(StoreCore):
    """L{IStore}'s audit log: appending from outside, reading, sessions, pruning."""

    def audit(
        self,
        event: str,
        actor: str | None,
        device: str | None,
        detail: dict[str, Any],
        now: float,
    ) -> Deferred[AuditEvent]:
        return self._run(self._audit, event, actor, device, detail, now)

    def _audit(
        self,
        event: str,
        actor: str | None,
        device: str | None,
        detail: dict[str, Any],
        now: float,
    ) -> AuditEvent:
        with self._write() as c:
            eventId = self._insertAudit(c, event, actor, device, detail, now)
        return AuditEvent(eventId, now, event, actor, device, detail)

    def auditSince(self, afterId: int, limit: int = 100) -> Deferred[list[AuditEvent]]:
        return self._run(self._auditSince, afterId, limit)

    def _auditSince(self, afterId: int, limit: int) -> list[AuditEvent]:
        rows = self._read(
            "SELECT id, at, event, actor, device, detail FROM audit WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (afterId, limit),
        )
        return [_auditEvent(r) for r in rows]

    def auditFeed(
        self, afterId: int, events: Collection[str], limit: int = 100
    ) -> Deferred[AuditPage]:
        return self._run(self._auditFeed, afterId, frozenset(events), limit)

    def _auditFeed(self, afterId: int, events: frozenset[str], limit: int) -> AuditPage:
        # The newest id first, then the rows up to it: audit ids become visible in commit
        # order (one writer at a time, on every node: the module docstring), so every row
        # up to that id is already readable and none can appear below it later.
        newest = self._lastAuditId()
        if newest <= afterId or not events:
            return AuditPage((), max(afterId, newest))
        kinds = sorted(events)
        rows = self._read(
            "SELECT id, at, event, actor, device, detail FROM audit WHERE id > ? AND id <= ? "
            f"AND event IN ({', '.join('?' * len(kinds))}) ORDER BY id LIMIT ?",
            (afterId, newest, *kinds, limit),
        )
        found = tuple(_auditEvent(r) for r in rows)
        return AuditPage(found, found[-1].id if found and len(found) == limit else newest)

    def latestDeviceEvent(
        self, device: str, events: Collection[str]
    ) -> Deferred[AuditEvent | None]:
        return self._run(self._latestDeviceEvent, device, frozenset(events))

    def _latestDeviceEvent(self, device: str, events: frozenset[str]) -> AuditEvent | None:
        if not events:
            return None
        kinds = sorted(events)
        rows = self._read(
            "SELECT id, at, event, actor, device, detail FROM audit WHERE device = ? "
            f"AND event IN ({', '.join('?' * len(kinds))}) ORDER BY id DESC LIMIT 1",
            (device, *kinds),
        )
        return _auditEvent(rows[0]) if rows else None

    def recentSessions(self, limit: int) -> Deferred[list[SessionEvents]]:
        return self._run(self._recentSessions, limit)

    def _recentSessions(self, limit: int) -> list[SessionEvents]:
        order = " ORDER BY s.started_at DESC, s.id DESC"
        if limit > 0:
            rows = self._read(_SESSION_SELECT + order + " LIMIT ?", (limit,))
        else:
            rows = self._read(_SESSION_SELECT + order)
        return [_sessionEvents(r) for r in reversed(rows)]

    def sessionEvents(self, sessionId: str) -> Deferred[SessionEvents | None]:
        return self._run(self._sessionEvents, sessionId)

    def _sessionEvents(self, sessionId: str) -> SessionEvents | None:
        rows = self._read(_SESSION_SELECT + " WHERE s.id = ?", (sessionId,))
        return _sessionEvents(rows[0]) if rows else None

    def pruneAudit(self, before: float, limit: int, now: float) -> Deferred[AuditPruned]:
        return self._run(self._pruneAudit, before, limit, now)

    def _pruneAudit(self, before: float, limit: int, now: float) -> AuditPruned:
        with self._write() as c:
            # The oldest ids by the primary key, stopping at the first row that is too new:
            # no scan of the log by time, and no hole in it.
            rows = c.execute(
                "SELECT id, at FROM audit ORDER BY id LIMIT ?", (max(limit, 0),)
            ).fetchall()
            throughId = 0
            for row in rows:
                if row["at"] >= before:
                    break
                throughId = int(row["id"])
            sessions = self._pruneSessionIndex(c, throughId) if throughId else 0
            auditRows = c.execute("DELETE FROM audit WHERE id <= ?", (throughId,)).rowcount
            # Each device key's newest unrevoked certificate stays, however old: the
            # device's certificate expiry is derived from it, and a device whose
            # certificate ran out must be approved again (_needsReapproval).
            certificates = c.execute(
                "DELETE FROM certificates WHERE serial_number IN (SELECT c.serial_number "
                "FROM certificates c WHERE c.not_after < ? AND c.not_after < "
                "(SELECT MAX(n.not_after) FROM certificates n WHERE n.device_name = "
                "c.device_name AND n.fingerprint = c.fingerprint AND n.revoked_at IS NULL) "
                "ORDER BY c.not_after LIMIT ?)",
                (before, max(limit, 0)),
            ).rowcount
            pruned = AuditPruned(auditRows, sessions, certificates, throughId)
            if auditRows or certificates:
                detail = {
                    "audit_rows": auditRows,
                    "sessions": sessions,
                    "certificates": certificates,
                    "through_id": throughId,
                    "before": before,
                }
                self._insertAudit(c, AUDIT_PRUNED, None, None, detail, now)
        return pruned

    @staticmethod
    def _pruneSessionIndex(c: Cursor, throughId: int) -> int:
        """
        Before the audit rows up to C{throughId} go: drop the sessions whose every event is
        among them, and the pointers of the others to those rows (a session started before
        the cut-off and still open, or ended after it). Return the sessions dropped.
        """
        # Two statements, so that each is a range of one index (schema 007).
        dropped = c.execute(
            "DELETE FROM session_index WHERE started_event <= ? "
            "AND (ended_event IS NULL OR ended_event <= ?)",
            (throughId, throughId),
        ).rowcount
        dropped += c.execute(
            "DELETE FROM session_index WHERE ended_event <= ? AND started_event IS NULL",
            (throughId,),
        ).rowcount
        for column in _SESSION_EVENT_COLUMNS.values():
            c.execute(f"UPDATE session_index SET {column} = NULL WHERE {column} <= ?", (throughId,))
        return int(dropped)

    def lastAuditId(self) -> Deferred[int]:
        return self._run(self._lastAuditId)

    def _lastAuditId(self) -> int:
        row = self._read("SELECT MAX(id) AS m FROM audit")[0]
        return int(row["m"]) if row["m"] is not None else 0
