"""The SQLite store: schema migration and every SQL statement groundcontrol runs.

All SQL lives here (DDL in ``groundcontrol/schema/*.sql``) so a PostgreSQL dialect can be
added beside it. The statements stick to what both engines accept (``?`` placeholders aside),
and each public method is a blocking ``_name`` function handed to the injected runner, so
the reactor never waits on the database.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from zope.interface import implementer

import accesstunnel.keys
from accesstunnel.names import isValidDeviceName

from ._errors import (
    AlreadyExists,
    AmbiguousRequest,
    InvalidName,
    StoreError,
    UnknownAccount,
    UnknownDevice,
)
from ._interface import IStore
from ._records import Account, AuditEvent, Device, EnrollmentRequest
from ._runner import Runner

__all__ = ["SQLiteStore", "connect", "migrate", "openSQLiteStore", "schemaUpgraders"]

_SCHEMA_FILE_RE = re.compile(r"\A(\d{3})-[a-z0-9-]+\.sql\Z")
_ACCOUNT_NAME_RE = re.compile(r"\A[a-z_][a-z0-9_.-]{0,31}\Z")
_BUSY_TIMEOUT_MS = 5000


# -- schema -------------------------------------------------------------------------


def schemaUpgraders() -> list[tuple[int, str]]:
    """
    Return the shipped schema files as C{(version, sql)}, in order.

    Version N's file turns a version N-1 database into version N; version 1 starts from
    nothing. Gaps or duplicates would make a database's version meaningless, so they are
    refused here rather than discovered in production.
    """
    directory = resources.files("groundcontrol").joinpath("schema")
    found: dict[int, str] = {}
    for entry in directory.iterdir():
        match = _SCHEMA_FILE_RE.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise StoreError(f"two schema files for version {version}")
        found[version] = entry.read_text(encoding="utf-8")
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(f"schema versions are not 1..N without gaps: {versions}")
    return [(v, found[v]) for v in versions]


def _statements(script: str) -> Iterator[str]:
    """
    Split a SQL script into statements.

    C{executescript} would commit the migration transaction before running, so each
    statement is executed on its own inside ours; C{complete_statement} keeps semicolons
    inside literals or triggers from splitting a statement.
    """
    buffered = ""
    for piece in script.split(";"):
        buffered += piece + ";"
        if sqlite3.complete_statement(buffered):
            statement = "\n".join(
                line for line in buffered.splitlines() if not line.lstrip().startswith("--")
            ).strip()
            if statement.strip(";").strip():
                yield statement
            buffered = ""


def connect(path: str) -> sqlite3.Connection:
    """
    Open the database file for sharing between the running server and the CLI.

    WAL lets the CLI write while the server reads; the busy timeout makes a writer wait for
    the other process instead of failing at once; C{check_same_thread=False} because the
    connection is opened on the reactor thread or the runner's worker, and used by the
    worker. C{isolation_level=None} leaves transactions to L{SQLiteStore._write}.
    """
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        connection.close()
        raise
    return connection


def migrate(connection: sqlite3.Connection) -> int:
    """
    Bring the database up to the newest shipped schema; return its version.

    Each upgrader runs in its own C{BEGIN IMMEDIATE} transaction that also re-reads the
    version, so two processes opening a fresh file at once cannot both apply it. Opening an
    up-to-date database changes nothing.

    @raise StoreError: the database is newer than this code.
    """
    upgraders = schemaUpgraders()
    latest = upgraders[-1][0] if upgraders else 0
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS version (version INTEGER NOT NULL)")
        current = _currentVersion(connection)
        if current > latest:
            raise StoreError(
                f"database schema version {current} is newer than this groundcontrol "
                f"(knows up to {latest}); upgrade groundcontrol"
            )
        for version, script in upgraders:
            if version <= current:
                continue
            for statement in _statements(script):
                connection.execute(statement)
            connection.execute("DELETE FROM version")
            connection.execute("INSERT INTO version (version) VALUES (?)", (version,))
            current = version
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return current


def _currentVersion(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT MAX(version) FROM version").fetchone()
    return int(row[0]) if row[0] is not None else 0


def openSQLiteStore(path: str, runner: Runner) -> Deferred[SQLiteStore]:
    """
    Open (creating and migrating if needed) the SQLite store at C{path}.

    Opening and migrating are blocking too, so they go through C{runner} like every call.
    """

    def _open() -> sqlite3.Connection:
        connection = connect(path)
        try:
            migrate(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    return runner(_open).addCallback(lambda connection: SQLiteStore(connection, runner))


# -- row conversion -----------------------------------------------------------------

_DEVICE_COLUMNS = (
    "name, state, fingerprint, public_key, serial, approved_at, approved_by, last_seen, created_at"
)
_REQUEST_COLUMNS = (
    "fingerprint, requested_name, public_key, serial, source, first_seen, last_seen, kind"
)


def _device(row: sqlite3.Row) -> Device:
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
    )


def _request(row: sqlite3.Row) -> EnrollmentRequest:
    return EnrollmentRequest(
        fingerprint=row["fingerprint"],
        requestedName=row["requested_name"],
        publicKey=row["public_key"],
        serial=row["serial"],
        source=row["source"],
        firstSeen=row["first_seen"],
        lastSeen=row["last_seen"],
        kind=row["kind"],
    )


def _account(row: sqlite3.Row) -> Account:
    return Account(id=row["id"], name=row["name"], isAdmin=bool(row["is_admin"]))


def _auditEvent(row: sqlite3.Row) -> AuditEvent:
    return AuditEvent(
        id=row["id"],
        at=row["at"],
        event=row["event"],
        actor=row["actor"],
        device=row["device"],
        detail=json.loads(row["detail"]),
    )


def _parseKey(publicKey: str) -> tuple[str, str]:
    """Return C{(normalised one-line key, fingerprint)}; the comment is dropped."""
    try:
        key = keys.Key.fromString(publicKey.strip().encode("ascii"))
    except (keys.BadKeyError, UnicodeEncodeError, ValueError) as e:
        raise StoreError(f"not an SSH public key: {e}") from None
    if not key.isPublic():
        raise StoreError("expected a public key, got a private key")
    return key.toString("OPENSSH").decode("ascii"), accesstunnel.keys.fingerprint(key)


def _checkDeviceName(name: str) -> None:
    if not isValidDeviceName(name):
        raise InvalidName(f"invalid device name {name!r}: must match [a-z0-9][a-z0-9-]{{0,62}}")


def _deviceSelector(name: str) -> str:
    return f"device:{name}"


# -- the store ----------------------------------------------------------------------


@implementer(IStore)
class SQLiteStore:
    """
    L{IStore} on one SQLite connection, used only through the runner.

    With L{threadRunner} the runner's single worker is the only thread touching the
    connection, so calls are serialised; write transactions start with C{BEGIN IMMEDIATE}
    so a second process (the CLI) waits on the busy timeout rather than deadlocking.
    """

    def __init__(self, connection: sqlite3.Connection, runner: Runner) -> None:
        self._connection = connection
        self._run = runner

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        cursor = self._connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._connection.execute(sql, args).fetchall()

    @staticmethod
    def _insertAudit(
        cursor: sqlite3.Cursor,
        event: str,
        actor: str | None,
        device: str | None,
        detail: dict[str, Any],
        now: float,
    ) -> AuditEvent:
        encoded = json.dumps(detail, sort_keys=True)
        cursor.execute(
            "INSERT INTO audit (at, event, actor, device, detail) VALUES (?, ?, ?, ?, ?)",
            (now, event, actor, device, encoded),
        )
        eventId = cursor.lastrowid
        assert eventId is not None
        return AuditEvent(eventId, now, event, actor, device, json.loads(encoded))

    # -- accounts -------------------------------------------------------------------

    def addAccount(
        self, name: str, publicKeys: Sequence[str], isAdmin: bool, now: float
    ) -> Deferred[Account]:
        return self._run(self._addAccount, name, list(publicKeys), isAdmin, now)

    def _addAccount(self, name: str, publicKeys: list[str], isAdmin: bool, now: float) -> Account:
        if _ACCOUNT_NAME_RE.match(name) is None:
            raise InvalidName(
                f"invalid account name {name!r}: must match [a-z_][a-z0-9_.-]{{0,31}}"
            )
        parsed = [_parseKey(k) for k in publicKeys]
        with self._write() as c:
            if c.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"account {name!r} already exists")
            c.execute(
                "INSERT INTO accounts (name, is_admin, created_at) VALUES (?, ?, ?)",
                (name, int(isAdmin), now),
            )
            accountId = c.lastrowid
            assert accountId is not None
            for line, fp in parsed:
                self._insertAccountKey(c, accountId, line, fp, now)
            self._insertAudit(
                c,
                "account.added",
                None,
                None,
                {"account": name, "admin": isAdmin, "keys": [fp for _, fp in parsed]},
                now,
            )
        return Account(accountId, name, isAdmin)

    @staticmethod
    def _insertAccountKey(
        cursor: sqlite3.Cursor, accountId: int, line: str, fp: str, now: float
    ) -> None:
        if cursor.execute("SELECT 1 FROM account_keys WHERE fingerprint = ?", (fp,)).fetchone():
            raise AlreadyExists(f"key {fp} already belongs to an account")
        if cursor.execute("SELECT 1 FROM devices WHERE fingerprint = ?", (fp,)).fetchone():
            raise AlreadyExists(f"key {fp} is a device key")
        cursor.execute(
            "INSERT INTO account_keys (fingerprint, account_id, public_key, added_at) "
            "VALUES (?, ?, ?, ?)",
            (fp, accountId, line, now),
        )

    def addAccountKey(self, name: str, publicKey: str, now: float) -> Deferred[Account]:
        return self._run(self._addAccountKey, name, publicKey, now)

    def _addAccountKey(self, name: str, publicKey: str, now: float) -> Account:
        line, fp = _parseKey(publicKey)
        with self._write() as c:
            row = c.execute(
                "SELECT id, name, is_admin FROM accounts WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise UnknownAccount(f"no account named {name!r}")
            self._insertAccountKey(c, row["id"], line, fp, now)
            self._insertAudit(c, "account.key_added", None, None, {"account": name, "key": fp}, now)
        return _account(row)

    def accountForKey(self, fingerprint: str) -> Deferred[Account | None]:
        return self._run(self._accountForKey, fingerprint)

    def _accountForKey(self, fingerprint: str) -> Account | None:
        rows = self._read(
            "SELECT a.id, a.name, a.is_admin FROM accounts a "
            "JOIN account_keys k ON k.account_id = a.id WHERE k.fingerprint = ?",
            (fingerprint,),
        )
        return _account(rows[0]) if rows else None

    def listAccounts(self) -> Deferred[list[Account]]:
        return self._run(self._listAccounts)

    def _listAccounts(self) -> list[Account]:
        rows = self._read("SELECT id, name, is_admin FROM accounts ORDER BY name")
        return [_account(r) for r in rows]

    # -- devices --------------------------------------------------------------------

    def deviceByName(self, name: str) -> Deferred[Device | None]:
        return self._run(self._deviceByName, name)

    def _deviceByName(self, name: str) -> Device | None:
        rows = self._read(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (name,))
        return _device(rows[0]) if rows else None

    def deviceForKey(self, fingerprint: str) -> Deferred[Device | None]:
        return self._run(self._deviceForKey, fingerprint)

    def _deviceForKey(self, fingerprint: str) -> Device | None:
        rows = self._read(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE fingerprint = ?", (fingerprint,)
        )
        return _device(rows[0]) if rows else None

    def listDevices(self) -> Deferred[list[Device]]:
        return self._run(self._listDevices)

    def _listDevices(self) -> list[Device]:
        return [
            _device(r) for r in self._read(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY name")
        ]

    def listEnrollmentRequests(self) -> Deferred[list[EnrollmentRequest]]:
        return self._run(self._listEnrollmentRequests)

    def _listEnrollmentRequests(self) -> list[EnrollmentRequest]:
        rows = self._read(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests "
            "ORDER BY requested_name, first_seen, fingerprint"
        )
        return [_request(r) for r in rows]

    def recordContact(
        self,
        requestedName: str,
        publicKey: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
    ) -> Deferred[Device | EnrollmentRequest]:
        return self._run(
            self._recordContact, requestedName, publicKey, fingerprint, serial, source, now
        )

    def _recordContact(
        self,
        requestedName: str,
        publicKey: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
    ) -> Device | EnrollmentRequest:
        with self._write() as c:
            row = c.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is not None:
                # The key decides; requestedName is only a claim and is ignored here.
                if row["state"] != "approved":
                    return _device(row)
                c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, row["name"]))
                return _device(
                    c.execute(
                        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (row["name"],)
                    ).fetchone()
                )

            # Unknown key: only now is the claimed name worth validating and storing.
            _checkDeviceName(requestedName)
            line, actual = _parseKey(publicKey)
            if actual != fingerprint:
                raise StoreError(f"fingerprint {fingerprint} does not match the key ({actual})")
            taken = c.execute("SELECT 1 FROM devices WHERE name = ?", (requestedName,)).fetchone()
            kind = "rekey" if taken else "new"
            existing = c.execute(
                "SELECT 1 FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if existing is None:
                c.execute(
                    f"INSERT INTO enrollment_requests ({_REQUEST_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (fingerprint, requestedName, line, serial, source, now, now, kind),
                )
                self._insertAudit(
                    c,
                    "device.pending",
                    None,
                    requestedName,
                    {"fingerprint": fingerprint, "kind": kind, "serial": serial, "source": source},
                    now,
                )
            else:
                c.execute(
                    "UPDATE enrollment_requests SET requested_name = ?, serial = ?, source = ?, "
                    "last_seen = ?, kind = ? WHERE fingerprint = ?",
                    (requestedName, serial, source, now, kind, fingerprint),
                )
            return _request(
                c.execute(
                    f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE fingerprint = ?",
                    (fingerprint,),
                ).fetchone()
            )

    def approveDevice(
        self, name: str, actor: str, now: float, fingerprint: str | None = None
    ) -> Deferred[Device]:
        return self._run(self._approveDevice, name, actor, now, fingerprint)

    def _approveDevice(self, name: str, actor: str, now: float, fingerprint: str | None) -> Device:
        with self._write() as c:
            sql = f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE requested_name = ?"
            args: tuple[str, ...] = (name,)
            if fingerprint is not None:
                sql += " AND fingerprint = ?"
                args += (fingerprint,)
            requests = [_request(r) for r in c.execute(sql + " ORDER BY first_seen", args)]
            deviceRow = c.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (name,)
            ).fetchone()
            device = _device(deviceRow) if deviceRow is not None else None

            if len(requests) > 1:
                raise AmbiguousRequest(name, [r.fingerprint for r in requests])
            if requests:
                return self._approveRequest(c, requests[0], device, actor, now)
            if device is None:
                raise UnknownDevice(f"no device or pending request named {name!r}")
            if fingerprint is not None and fingerprint != device.fingerprint:
                raise UnknownDevice(f"no pending request for {name!r} with key {fingerprint}")
            if device.state == "approved":
                raise AlreadyExists(f"device {name!r} is already approved; nothing is pending")
            c.execute(
                "UPDATE devices SET state = 'approved', approved_at = ?, approved_by = ? "
                "WHERE name = ?",
                (now, actor, name),
            )
            self._insertAudit(
                c,
                "device.approved",
                actor,
                name,
                {"fingerprint": device.fingerprint, "kind": "reinstate"},
                now,
            )
            return _device(
                c.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (name,)
                ).fetchone()
            )

    def _approveRequest(
        self,
        c: sqlite3.Cursor,
        request: EnrollmentRequest,
        device: Device | None,
        actor: str,
        now: float,
    ) -> Device:
        """
        Turn one request into the device's binding. Whether it is new or a re-key is decided
        from the devices table now, not from the request's kind recorded at contact time.
        """
        name = request.requestedName
        detail: dict[str, Any] = {"fingerprint": request.fingerprint, "serial": request.serial}
        if device is None:
            c.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) "
                "VALUES (?, 'approved', ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    request.fingerprint,
                    request.publicKey,
                    request.serial,
                    now,
                    actor,
                    request.lastSeen,
                    now,
                ),
            )
            detail["kind"] = "new"
        else:
            c.execute(
                "UPDATE devices SET state = 'approved', fingerprint = ?, public_key = ?, "
                "serial = ?, approved_at = ?, approved_by = ?, last_seen = ? WHERE name = ?",
                (
                    request.fingerprint,
                    request.publicKey,
                    request.serial,
                    now,
                    actor,
                    request.lastSeen,
                    name,
                ),
            )
            detail["kind"] = "rekey"
            detail["previousFingerprint"] = device.fingerprint
        c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (request.fingerprint,))
        self._insertAudit(c, "device.approved", actor, name, detail, now)
        return _device(
            c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (name,)).fetchone()
        )

    def revokeDevice(self, name: str, actor: str, now: float) -> Deferred[Device]:
        return self._run(self._revokeDevice, name, actor, now)

    def _revokeDevice(self, name: str, actor: str, now: float) -> Device:
        with self._write() as c:
            row = c.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise UnknownDevice(f"no device named {name!r}")
            c.execute("UPDATE devices SET state = 'revoked' WHERE name = ?", (name,))
            self._insertAudit(
                c, "device.revoked", actor, name, {"fingerprint": row["fingerprint"]}, now
            )
            return _device(
                c.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE name = ?", (name,)
                ).fetchone()
            )

    def touchDevice(self, name: str, now: float) -> Deferred[None]:
        return self._run(self._touchDevice, name, now)

    def _touchDevice(self, name: str, now: float) -> None:
        with self._write() as c:
            c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, name))
            if c.rowcount == 0:
                raise UnknownDevice(f"no device named {name!r}")

    # -- grants ---------------------------------------------------------------------

    def grant(
        self,
        accountName: str,
        deviceName: str,
        actor: str,
        now: float,
        expiresAt: float | None = None,
    ) -> Deferred[None]:
        return self._run(self._grant, accountName, deviceName, actor, now, expiresAt)

    def _grant(
        self, accountName: str, deviceName: str, actor: str, now: float, expiresAt: float | None
    ) -> None:
        with self._write() as c:
            accountId = self._accountId(c, accountName)
            if not c.execute("SELECT 1 FROM devices WHERE name = ?", (deviceName,)).fetchone():
                raise UnknownDevice(f"no device named {deviceName!r}")
            selector = _deviceSelector(deviceName)
            c.execute(
                "DELETE FROM grants WHERE account_id = ? AND selector = ? AND login_user IS NULL",
                (accountId, selector),
            )
            c.execute(
                "INSERT INTO grants (account_id, selector, login_user, expires_at, created_at, "
                "created_by) VALUES (?, ?, NULL, ?, ?, ?)",
                (accountId, selector, expiresAt, now, actor),
            )
            self._insertAudit(
                c,
                "grant.added",
                actor,
                deviceName,
                {"account": accountName, "expiresAt": expiresAt},
                now,
            )

    def ungrant(self, accountName: str, deviceName: str, actor: str, now: float) -> Deferred[bool]:
        return self._run(self._ungrant, accountName, deviceName, actor, now)

    def _ungrant(self, accountName: str, deviceName: str, actor: str, now: float) -> bool:
        with self._write() as c:
            accountId = self._accountId(c, accountName)
            c.execute(
                "DELETE FROM grants WHERE account_id = ? AND selector = ?",
                (accountId, _deviceSelector(deviceName)),
            )
            removed = c.rowcount > 0
            if removed:
                self._insertAudit(
                    c, "grant.removed", actor, deviceName, {"account": accountName}, now
                )
            return removed

    @staticmethod
    def _accountId(cursor: sqlite3.Cursor, name: str) -> int:
        row = cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAccount(f"no account named {name!r}")
        return int(row["id"])

    def mayReach(self, account: Account, deviceName: str, now: float) -> Deferred[bool]:
        return self._run(self._mayReach, account, deviceName, now)

    def _mayReach(self, account: Account, deviceName: str, now: float) -> bool:
        if account.isAdmin:
            return True
        rows = self._read(
            "SELECT 1 FROM grants WHERE account_id = ? AND selector = ? "
            "AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
            (account.id, _deviceSelector(deviceName), now),
        )
        return bool(rows)

    # -- audit ----------------------------------------------------------------------

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
            return self._insertAudit(c, event, actor, device, detail, now)

    def auditSince(self, afterId: int, limit: int = 100) -> Deferred[list[AuditEvent]]:
        return self._run(self._auditSince, afterId, limit)

    def _auditSince(self, afterId: int, limit: int) -> list[AuditEvent]:
        rows = self._read(
            "SELECT id, at, event, actor, device, detail FROM audit WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (afterId, limit),
        )
        return [_auditEvent(r) for r in rows]

    def lastAuditId(self) -> Deferred[int]:
        return self._run(self._lastAuditId)

    def _lastAuditId(self) -> int:
        row = self._read("SELECT MAX(id) FROM audit")[0]
        return int(row[0]) if row[0] is not None else 0

    def close(self) -> Deferred[None]:
        return self._run(self._connection.close)
