"""
What every part of the SQL store stands on: connection, transactions, audit, device reads.

L{StoreCore} holds the database connection (L{SharedConnection}) and the runner, opens read
cursors and the store-wide write transaction (L{groundcontrol.store._sql} says why one lock),
appends audit events with the session index kept in step, and reads a device the one way
every part returns one. The parts of L{SQLStore} (accounts, devices, certificates,
enrollment, grants, audit) are mixins over this class, so mypy checks what they use of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from ._dialect import Cursor, Dialect, Row
from ._errors import UnknownDevice
from ._records import SESSION_ENDED, SESSION_STARTED, Device
from ._runner import Runner

# The device's owner and certificate expiry are derived, so every device read goes through
# this one SELECT; callers append a WHERE on d.* columns.
_DEVICE_SELECT = (
    "SELECT d.name, d.state, d.fingerprint, d.public_key, d.serial, d.approved_at, "
    "d.approved_by, d.last_seen, d.created_at, d.lease_until, d.last_link_kex, "
    "a.name AS owner, "
    "(SELECT MAX(c.not_after) FROM certificates c WHERE c.device_name = d.name "
    "AND c.fingerprint = d.fingerprint AND c.revoked_at IS NULL) AS certificate_expires_at "
    "FROM devices d LEFT JOIN accounts a ON a.id = d.owner_account_id"
)


def _device(row: Row) -> Device:
    return Device(
        name=row["name"],
        state=row["state"],
        fingerprint=row["fingerprint"],
        publicKey=row["public_key"],
        serial=row["serial"],
        approvedAt=row["approved_at"],
        approvedBy=row["approved_by"],
        lastSeen=row["last_seen"],
        createdAt=row["created_at"],
        owner=row["owner"],
        leaseUntil=row["lease_until"],
        certificateExpiresAt=row["certificate_expires_at"],
        lastLinkKex=row["last_link_kex"],
    )


#: The session index's column for each of a session's audit events.
_SESSION_EVENT_COLUMNS = {SESSION_STARTED: "started_event", SESSION_ENDED: "ended_event"}


def _sessionId(detail: dict[str, Any]) -> str | None:
    """The session id a session event's detail carries (C{session}, or the record's C{id})."""
    for key in ("session", "id"):
        value = detail.get(key)
        if isinstance(value, str):
            return value
    return None


class SharedConnection:
    """
    The database connection of a store and of its interactive views (L{SQLStore.interactive}),
    held in one place: whichever of them replaces it (a PostgreSQL reconnect) replaces it
    for all, and closing the store closes it for all, for good.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        #: The store was closed: nothing may open a new connection.
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.connection.close()


class StoreCore:
    """
    The connection, runner and transactions the store's parts share, and the helpers every
    part's writes need: audit appends and device reads.

    Subclasses supply the dialect and the driver cursor (L{_rawCursor}).
    """

    dialect: Dialect

    def __init__(self, connection: Any, runner: Runner) -> None:
        self._db = SharedConnection(connection)
        self._run = runner

    def _rawCursor(self) -> Any:
        return self._db.connection.cursor()

    def _cursor(self) -> Cursor:
        return Cursor(self._rawCursor(), self.dialect)

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        c = self._cursor()
        for statement in self.dialect.beginWrite:
            c.execute(statement)
        try:
            yield c
        except BaseException:
            self._rollback(c)
            raise
        c.execute("COMMIT")

    def _rollback(self, c: Cursor) -> None:
        c.execute("ROLLBACK")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._cursor().execute(sql, args).fetchall()

    @staticmethod
    def _insertAudit(
        c: Cursor,
        event: str,
        actor: str | None,
        device: str | None,
        detail: dict[str, Any],
        now: float,
    ) -> int:
        """
        Append an event in the caller's write transaction; return its id. The detail is
        encoded once, for the row: nothing here reads it back.
        """
        row = c.execute(
            "INSERT INTO audit (at, event, actor, device, detail) VALUES (?, ?, ?, ?, ?) "
            "RETURNING id",
            (now, event, actor, device, json.dumps(detail, sort_keys=True)),
        ).fetchone()
        eventId = int(row["id"])
        if event in _SESSION_EVENT_COLUMNS:
            StoreCore._indexSession(c, eventId, event, detail)
        return eventId

    @staticmethod
    def _indexSession(c: Cursor, eventId: int, event: str, detail: dict[str, Any]) -> None:
        """Point the session index (schema 005) at a session's newest event of this kind."""
        sessionId = _sessionId(detail)
        if sessionId is None:
            return
        startedAt = detail.get("started_at")
        if not isinstance(startedAt, (int, float)) or isinstance(startedAt, bool):
            startedAt = 0
        column = _SESSION_EVENT_COLUMNS[event]
        c.execute(
            f"INSERT INTO session_index (id, started_at, {column}) VALUES (?, ?, ?) "
            f"ON CONFLICT (id) DO UPDATE SET {column} = excluded.{column}, "
            "started_at = CASE WHEN excluded.started_at <> 0 THEN excluded.started_at "
            "ELSE session_index.started_at END",
            (sessionId, startedAt, eventId),
        )

    @staticmethod
    def _deviceRow(c: Cursor, where: str, *args: Any) -> Device | None:
        row = c.execute(f"{_DEVICE_SELECT} WHERE {where}", args).fetchone()
        if row is None:
            return None
        return StoreCore._withMemberships(c, [_device(row)])[0]

    @staticmethod
    def _withMemberships(c: Cursor, devices: list[Device]) -> list[Device]:
        """Fill in the devices' tags (admin, reported) and groups: two reads for any number."""
        if not devices:
            return devices
        where, args = "", tuple[str, ...]()
        if len(devices) == 1:
            where, args = " WHERE device_name = ?", (devices[0].name,)
        tags: dict[tuple[str, str], list[str]] = {}
        for row in c.execute(
            f"SELECT device_name, tag, source FROM device_tags{where} ORDER BY tag", args
        ):
            tags.setdefault((row["device_name"], row["source"]), []).append(row["tag"])
        groups: dict[str, list[str]] = {}
        for row in c.execute(
            f"SELECT device_name, group_name FROM group_members{where} ORDER BY group_name", args
        ):
            groups.setdefault(row["device_name"], []).append(row["group_name"])
        return [
            attrs.evolve(
                d,
                tags=tuple(tags.get((d.name, "admin"), ())),
                reportedTags=tuple(tags.get((d.name, "agent"), ())),
                groups=tuple(groups.get(d.name, ())),
            )
            for d in devices
        ]

    @staticmethod
    def _deviceExists(c: Cursor, name: str) -> bool:
        """Whether a device (in any state) has this name; cheaper than L{_deviceRow}."""
        return c.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone() is not None

    def _deviceNamed(self, c: Cursor, name: str) -> Device:
        device = self._deviceRow(c, "d.name = ?", name)
        if device is None:
            raise UnknownDevice(f"no device named {name!r}")
        return device

    def close(self) -> Deferred[None]:
        return self._run(self._db.close)
