"""The SQL store: every statement groundcontrol runs, shared by SQLite and PostgreSQL.

Statements are written once with ``?`` placeholders in SQL both engines accept; the
L{Dialect} covers the rest (placeholders, how a write transaction locks, DDL files). Each
public method is a blocking ``_name`` function handed to the injected runner, so the reactor
never waits on the database.

Write transactions are serialised store-wide (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one
transaction-scoped advisory lock shared by every node). That makes every check-then-write
below atomic without per-statement reasoning about isolation levels, and keeps audit ids
appearing in commit order, which the change feed relies on. Writes are small and short, so
one lock is not a bottleneck at fleet sizes groundcontrol is built for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeGuard, TypeVar

import attrs
from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from zope.interface import implementer

import accesstunnel.keys
from accesstunnel.addresses import sourceNetwork
from accesstunnel.names import isValidDeviceName

from ._dialect import Cursor, Dialect, Row, splitStatements
from ._errors import (
    AlreadyExists,
    AmbiguousRequest,
    ClaimCodeExpired,
    ClaimCodeInvalid,
    ClaimRefused,
    InvalidName,
    NameTaken,
    PendingLimitReached,
    RekeyNeedsKey,
    StoreError,
    TokenExhausted,
    TokenExpired,
    TokenInvalid,
    UnknownAccount,
    UnknownDevice,
)
from ._interface import IStore
from ._records import (
    AUDIT_PRUNED,
    SESSION_ENDED,
    SESSION_STARTED,
    Account,
    AuditEvent,
    AuditPage,
    AuditPruned,
    Certificate,
    CertificateState,
    Device,
    EnrollmentRequest,
    Grant,
    LastLink,
    LinkCertificate,
    LinkRecord,
    PendingLimits,
    SessionEvents,
    TokenRecord,
)
from ._runner import Runner

__all__ = [
    "SQLStore",
    "cleanSerial",
    "hashSecret",
    "isValidLoginUser",
    "isValidTag",
    "migrateWith",
    "parseSelector",
    "sourceHost",
]

_T = TypeVar("_T")
_ACCOUNT_NAME_RE = re.compile(r"\A[a-z_][a-z0-9_.-]{0,31}\Z")
_SHA256_HEX_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_SERIAL_MAX = 128
# Tags and group names: what an admin types and a config file holds, safe to print.
_TAG_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")
# A POSIX-portable user name (what useradd accepts by default, upper case allowed).
_LOGIN_USER_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
#: Tags an agent may report; more are dropped (a device must not bloat every listing).
MAX_REPORTED_TAGS = 32
#: How specific a selector is: a device grant beats a group grant beats a tag grant.
_SPECIFICITY = {"device": 0, "group": 1, "tag": 2}


# -- schema -------------------------------------------------------------------------


def migrateWith(
    raw: Any,
    dialect: Dialect,
    isComplete: Callable[[str], bool],
    upTo: int | None = None,
) -> int:
    """
    Bring the database behind driver cursor C{raw} to the newest schema; return its version.

    Everything runs in one write transaction that also re-reads the version, so two
    processes (or nodes) opening a fresh database at once cannot both apply an upgrader.
    Both engines have transactional DDL, so a failing upgrader leaves the old version.

    @param upTo: stop at this version (tests of an upgrade path start from an old one).
    @raise StoreError: the database is newer than this code.
    """
    upgraders = dialect.schemaUpgraders()
    latest = upgraders[-1][0] if upgraders else 0
    target = latest if upTo is None else min(upTo, latest)
    for statement in dialect.beginWrite:
        raw.execute(statement)
    try:
        raw.execute("CREATE TABLE IF NOT EXISTS version (version INTEGER NOT NULL)")
        raw.execute("SELECT MAX(version) AS v FROM version")
        row = raw.fetchone()
        current = int(row["v"]) if row["v"] is not None else 0
        if current > latest:
            raise StoreError(
                f"database schema version {current} is newer than this groundcontrol "
                f"(knows up to {latest}); upgrade groundcontrol"
            )
        for version, script in upgraders:
            if version <= current or version > target:
                continue
            for statement in splitStatements(script, isComplete):
                raw.execute(statement)
            raw.execute("DELETE FROM version")
            raw.execute(dialect.sql(f"INSERT INTO version (version) VALUES ({version})"))
            current = version
    except BaseException:
        raw.execute("ROLLBACK")
        raise
    raw.execute("COMMIT")
    return current


# -- row conversion -----------------------------------------------------------------

# The device's owner and certificate expiry are derived, so every device read goes through
# this one SELECT; callers append a WHERE on d.* columns.
_DEVICE_SELECT = (
    "SELECT d.name, d.state, d.fingerprint, d.public_key, d.serial, d.approved_at, "
    "d.approved_by, d.last_seen, d.created_at, d.lease_until, a.name AS owner, "
    "(SELECT MAX(c.not_after) FROM certificates c WHERE c.device_name = d.name "
    "AND c.fingerprint = d.fingerprint AND c.revoked_at IS NULL) AS certificate_expires_at "
    "FROM devices d LEFT JOIN accounts a ON a.id = d.owner_account_id"
)
_DEVICE_INSERT_COLUMNS = (
    "name, state, fingerprint, public_key, serial, approved_at, approved_by, last_seen, "
    "created_at, owner_account_id, lease_until"
)
_REQUEST_COLUMNS = (
    "fingerprint, requested_name, public_key, serial, source, first_seen, last_seen, kind"
)
_CERTIFICATE_COLUMNS = (
    "serial_number, device_name, fingerprint, not_before, not_after, issued_at, revoked_at"
)
_TOKEN_COLUMNS = "id, uses, uses_left, expires_at, created_at, created_by"


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
    )


def _request(row: Row) -> EnrollmentRequest:
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


def _account(row: Row) -> Account:
    return Account(id=int(row["id"]), name=row["name"], isAdmin=bool(row["is_admin"]))


#: The session index's column for each of a session's audit events.
_SESSION_EVENT_COLUMNS = {SESSION_STARTED: "started_event", SESSION_ENDED: "ended_event"}

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


def _sessionId(detail: dict[str, Any]) -> str | None:
    """The session id a session event's detail carries (C{session}, or the record's C{id})."""
    for key in ("session", "id"):
        value = detail.get(key)
        if isinstance(value, str):
            return value
    return None


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


def _certificate(row: Row) -> Certificate:
    return Certificate(
        serialNumber=row["serial_number"],
        deviceName=row["device_name"],
        fingerprint=row["fingerprint"],
        notBefore=row["not_before"],
        notAfter=row["not_after"],
        issuedAt=row["issued_at"],
        revokedAt=row["revoked_at"],
    )


def _token(row: Row) -> TokenRecord:
    return TokenRecord(
        id=int(row["id"]),
        uses=int(row["uses"]),
        usesLeft=int(row["uses_left"]),
        expiresAt=row["expires_at"],
        createdAt=row["created_at"],
        createdBy=row["created_by"],
    )


# -- validation ---------------------------------------------------------------------


def _parseKey(publicKey: str) -> tuple[str, str]:
    """Return C{(normalised one-line key, fingerprint)}; the comment is dropped."""
    try:
        key = keys.Key.fromString(publicKey.strip().encode("ascii"))
    except (keys.BadKeyError, UnicodeEncodeError, ValueError) as e:
        raise StoreError(f"not an SSH public key: {e}") from None
    if not key.isPublic():
        raise StoreError("expected a public key, got a private key")
    return key.toString("OPENSSH").decode("ascii"), accesstunnel.keys.fingerprint(key)


def _checkKey(publicKey: str, fingerprint: str) -> str:
    """Return the normalised key line, refusing a fingerprint that is not the key's own."""
    line, actual = _parseKey(publicKey)
    if actual != fingerprint:
        raise StoreError(f"fingerprint {fingerprint} does not match the key ({actual})")
    return line


def _checkDeviceName(name: str) -> None:
    if not isValidDeviceName(name):
        raise InvalidName(f"invalid device name {name!r}: must match [a-z0-9][a-z0-9-]{{0,62}}")


def _sameForAnyDevice(record: LinkRecord) -> Callable[[str], LinkRecord]:
    """A caller's decision that does not depend on which device the key turns out to be."""
    return lambda deviceName: record


def hashSecret(secret: str) -> str:
    """
    What the store keeps of an enrollment token or a pairing code: SHA-256 of its UTF-8, hex.

    The CLI (which makes tokens) and the server (which checks them) must hash alike; both
    call this. A plain hash suffices for tokens (32 random bytes); short pairing codes are
    protected by living minutes and being single use, not by the hash.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _checkHash(value: str, what: str) -> None:
    """Refuse anything but SHA-256 hex, so a raw token or code is never stored by mistake."""
    if not isinstance(value, str) or _SHA256_HEX_RE.match(value) is None:
        raise StoreError(f"{what} must be the SHA-256 of the secret as 64 lower-case hex digits")


def _replacesApprovedKey(device: Device | None, request: EnrollmentRequest) -> TypeGuard[Device]:
    """
    Whether approving C{request} takes an approved device's name from its key: a re-key,
    which L{SQLStore.approveDevice} does only for a request chosen by its fingerprint. A
    revoked device coming back with a new key, or a new name, is not.
    """
    return (
        device is not None
        and device.state == "approved"
        and device.fingerprint != request.fingerprint
    )


def cleanSerial(serial: str | None) -> str | None:
    """
    A device-reported serial as stored: control and format characters removed, at most
    128 characters, None if nothing is left.

    The serial comes from the device and is printed by the CLI and the control shell, so it
    must not be able to drive a terminal, nor be long enough to bloat every listing.
    """
    if serial is None:
        return None
    cleaned = "".join(c for c in str(serial) if not unicodedata.category(c).startswith("C"))
    cleaned = cleaned.strip()[:_SERIAL_MAX]
    return cleaned or None


def sourceHost(source: str) -> str:
    """
    The host a C{host:port} source is counted as: C{[v6]:port} and C{v4:port} lose the
    port, and the host is taken as the limits take it (L{sourceNetwork}: an IPv6 address
    as its /64); anything else (a description) is taken whole.

    The per-host pending cap counts by host because one attacker has one host and many
    ports, and, on IPv6, many addresses in one /64.
    """
    if source.startswith("[") and "]" in source:
        return sourceNetwork(source[1 : source.index("]")])
    if source.count(":") == 1:
        return sourceNetwork(source.split(":", 1)[0])
    return sourceNetwork(source)


def isValidTag(tag: object) -> bool:
    """A tag or group name: C{[a-z0-9][a-z0-9._-]{0,62}}."""
    return isinstance(tag, str) and _TAG_RE.match(tag) is not None


def isValidLoginUser(user: object) -> bool:
    """A user name a grant may name for the device session (portable POSIX spelling)."""
    return isinstance(user, str) and _LOGIN_USER_RE.match(user) is not None


def _checkTag(tag: str, what: str = "tag") -> None:
    if not isValidTag(tag):
        raise InvalidName(f"invalid {what} {tag!r}: must match [a-z0-9][a-z0-9._-]{{0,62}}")


def parseSelector(text: str) -> str:
    """
    The canonical spelling of what a grant names: C{device:NAME}, C{group:NAME} or
    C{tag:NAME}. A bare C{NAME} or C{dev_NAME} is a device, as grants always took.

    @raise InvalidName: anything else, or a malformed name.
    """
    kind, sep, name = text.partition(":")
    if not sep:
        kind, name = "device", text.removeprefix("dev_")
    if kind == "device":
        _checkDeviceName(name)
    elif kind in ("group", "tag"):
        _checkTag(name, f"{kind} name")
    else:
        raise InvalidName(f"invalid selector {text!r}: use device:NAME, group:NAME or tag:NAME")
    return f"{kind}:{name}"


def _grant(row: Row) -> Grant:
    return Grant(
        account=row["account"],
        selector=row["selector"],
        loginUser=row["login_user"],
        expiresAt=row["expires_at"],
        createdAt=row["created_at"],
        createdBy=row["created_by"],
        agentForwarding=bool(row["agent_forwarding"]),
    )


# -- the store ----------------------------------------------------------------------


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


@implementer(IStore)
class SQLStore:
    """
    L{IStore} on one database connection, used only through the runner.

    With L{threadRunner} the runner's single worker is the only thread touching the
    connection, so calls from one process are serialised; write transactions take the
    store-wide write lock (see the module docstring) so other processes and nodes wait.

    Subclasses supply the dialect and the driver cursor (L{_rawCursor}).
    """

    dialect: Dialect

    def __init__(self, connection: Any, runner: Runner) -> None:
        self._db = SharedConnection(connection)
        self._run = runner

    def interactive(self) -> SQLStore:
        """
        This store for people waiting at a prompt: with L{threadRunner}, its calls run
        before those still queued for the fleet's bookkeeping (L{ThreadRunner.first}).
        With a runner that queues nothing (L{synchronousRunner}), this very store.

        The view shares the store's connection (L{SharedConnection}), so calls through
        either still run one at a time on the one worker, over one connection: a PostgreSQL
        reconnect by either serves both, and closing the store closes the view too.
        """
        first = getattr(self._run, "first", None)
        if first is None:
            return self
        view = copy.copy(self)
        view._run = first
        return view

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
            SQLStore._indexSession(c, eventId, event, detail)
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
        return SQLStore._withMemberships(c, [_device(row)])[0]

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
            row = c.execute(
                "INSERT INTO accounts (name, is_admin, created_at) VALUES (?, ?, ?) RETURNING id",
                (name, int(isAdmin), now),
            ).fetchone()
            accountId = int(row["id"])
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
    def _insertAccountKey(c: Cursor, accountId: int, line: str, fp: str, now: float) -> None:
        if c.execute("SELECT 1 FROM account_keys WHERE fingerprint = ?", (fp,)).fetchone():
            raise AlreadyExists(f"key {fp} already belongs to an account")
        if c.execute("SELECT 1 FROM devices WHERE fingerprint = ?", (fp,)).fetchone():
            raise AlreadyExists(f"key {fp} is a device key")
        c.execute(
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
            self._insertAccountKey(c, int(row["id"]), line, fp, now)
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
        return self._deviceRow(self._cursor(), "d.name = ?", name)

    def lastLink(self, name: str) -> Deferred[LastLink | None]:
        return self._run(self._lastLink, name)

    def _lastLink(self, name: str) -> LastLink | None:
        c = self._cursor()
        row = c.execute(
            "SELECT last_link_auth, last_certificate_serial, last_certificate_fingerprint, "
            "last_certificate_not_after, last_certificate_at FROM devices WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        certificate = None
        if row["last_certificate_serial"] is not None:
            certificate = LinkCertificate(
                serialNumber=row["last_certificate_serial"],
                fingerprint=row["last_certificate_fingerprint"],
                notAfter=row["last_certificate_not_after"],
                deviceName=name,
            )
        return LastLink(row["last_link_auth"], certificate, row["last_certificate_at"])

    def deviceForKey(self, fingerprint: str) -> Deferred[Device | None]:
        return self._run(self._deviceForKey, fingerprint)

    def _deviceForKey(self, fingerprint: str) -> Device | None:
        return self._deviceRow(self._cursor(), "d.fingerprint = ?", fingerprint)

    def listDevices(self) -> Deferred[list[Device]]:
        return self._run(self._listDevices)

    def _listDevices(self) -> list[Device]:
        c = self._cursor()
        rows = c.execute(f"{_DEVICE_SELECT} ORDER BY d.name").fetchall()
        return self._withMemberships(c, [_device(r) for r in rows])

    def listEnrollmentRequests(self) -> Deferred[list[EnrollmentRequest]]:
        return self._run(self._listEnrollmentRequests)

    def _listEnrollmentRequests(self) -> list[EnrollmentRequest]:
        rows = self._read(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests "
            "ORDER BY requested_name, first_seen, fingerprint"
        )
        return [_request(r) for r in rows]

    def countPending(self) -> Deferred[int]:
        return self._run(self._countPending)

    def _countPending(self) -> int:
        return self._countPendingIn(self._cursor(), None, 0.0)

    def countPendingFrom(self, sourceHost: str, since: float) -> Deferred[int]:
        return self._run(self._countPendingFrom, sourceHost, since)

    def _countPendingFrom(self, host: str, since: float) -> int:
        return self._countPendingIn(self._cursor(), host, since)

    @staticmethod
    def _countPendingIn(c: Cursor, host: str | None, since: float) -> int:
        if host is None:
            row = c.execute("SELECT COUNT(*) AS n FROM enrollment_requests").fetchone()
        else:
            row = c.execute(
                "SELECT COUNT(*) AS n FROM enrollment_requests "
                "WHERE source_host = ? AND first_seen >= ?",
                (host, since),
            ).fetchone()
        return int(row["n"])

    def recordContact(
        self,
        requestedName: str,
        publicKey: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
        limits: PendingLimits | None = None,
        certificate: LinkCertificate | None = None,
        certificateRefused: bool = False,
        link: Callable[[str], LinkRecord] | None = None,
    ) -> Deferred[Device | EnrollmentRequest]:
        if link is None:
            link = _sameForAnyDevice(
                LinkRecord.refusedLink() if certificateRefused else LinkRecord(certificate)
            )
        elif certificate is not None or certificateRefused:
            raise TypeError("recordContact takes a link, or a certificate decision, not both")
        return self._run(
            self._recordContact,
            requestedName,
            publicKey,
            fingerprint,
            serial,
            source,
            now,
            limits,
            link,
        )

    def _recordContact(
        self,
        requestedName: str,
        publicKey: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
        limits: PendingLimits | None,
        link: Callable[[str], LinkRecord],
    ) -> Device | EnrollmentRequest:
        serial = cleanSerial(serial)
        with self._write() as c:
            device = self._deviceRow(c, "d.fingerprint = ?", fingerprint)
            if device is not None:
                # The key decides; requestedName is only a claim and is ignored here.
                if device.state != "approved":
                    return device
                if self._needsReapproval(device, now):
                    c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, device.name))
                    return self._upsertRequest(
                        c,
                        device.name,
                        device.publicKey,
                        fingerprint,
                        serial,
                        source,
                        now,
                        "reapprove",
                        None,
                    )
                # Only here is it known which device the key is: the caller says what its
                # link records for that device (its certificate's verdict), as it is.
                record = link(device.name)
                if record.refused:
                    # The caller refuses this login: seen, but no link to record.
                    c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, device.name))
                else:
                    self._recordLink(c, device.name, now, record.certificate)
                return self._deviceNamed(c, device.name)

            # Unknown key: only now is the claimed name worth validating and storing.
            _checkDeviceName(requestedName)
            line = _checkKey(publicKey, fingerprint)
            kind = "rekey" if self._deviceExists(c, requestedName) else "new"
            return self._upsertRequest(
                c, requestedName, line, fingerprint, serial, source, now, kind, limits
            )

    @staticmethod
    def _recordLink(c: Cursor, name: str, now: float, certificate: LinkCertificate | None) -> None:
        """
        An approved device's link is accepted: its last contact, how it authenticated and
        the certificate it presented, in the one statement a contact always cost.
        """
        if certificate is None:
            c.execute(
                "UPDATE devices SET last_seen = ?, last_link_auth = 'key' WHERE name = ?",
                (now, name),
            )
        else:
            c.execute(
                "UPDATE devices SET last_seen = ?, last_link_auth = 'certificate', "
                "last_certificate_serial = ?, last_certificate_fingerprint = ?, "
                "last_certificate_not_after = ?, last_certificate_at = ? WHERE name = ?",
                (
                    now,
                    certificate.serialNumber,
                    certificate.fingerprint,
                    certificate.notAfter,
                    now,
                    name,
                ),
            )

    @staticmethod
    def _needsReapproval(device: Device, now: float) -> bool:
        """
        An approved device whose certificate ran out and that nobody approved since.

        Comparing with C{approvedAt} is what lets a one-step re-approval (or a claim) end
        the condition without touching the expired certificate's record.
        """
        expiresAt = device.certificateExpiresAt
        return expiresAt is not None and expiresAt <= now and device.approvedAt < expiresAt

    def _upsertRequest(
        self,
        c: Cursor,
        requestedName: str,
        line: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
        kind: str,
        limits: PendingLimits | None,
    ) -> EnrollmentRequest:
        existing = c.execute(
            "SELECT 1 FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        if existing is None:
            host = sourceHost(source)
            if limits is not None:
                self._checkLimits(c, limits, host, now)
            c.execute(
                f"INSERT INTO enrollment_requests ({_REQUEST_COLUMNS}, source_host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fingerprint, requestedName, line, serial, source, now, now, kind, host),
            )
            detail = {"fingerprint": fingerprint, "kind": kind, "serial": serial, "source": source}
            if kind in ("rekey", "reapprove"):
                # The serial the request's must match to be the same board: its notification
                # says whether it does once the agent's hello reports one (fleetwatch).
                detail["deviceSerial"] = c.execute(
                    "SELECT serial FROM devices WHERE name = ?", (requestedName,)
                ).fetchone()["serial"]
            self._insertAudit(
                c,
                "device.rekey-requested" if kind == "rekey" else "device.pending",
                None,
                requestedName,
                detail,
                now,
            )
        else:
            c.execute(
                "UPDATE enrollment_requests SET requested_name = ?, serial = COALESCE(?, serial), "
                "source = ?, last_seen = ?, kind = ? WHERE fingerprint = ?",
                (requestedName, serial, source, now, kind, fingerprint),
            )
        request = self._requestFor(c, fingerprint)
        assert request is not None
        return request

    @staticmethod
    def _requestFor(c: Cursor, fingerprint: str) -> EnrollmentRequest | None:
        row = c.execute(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return _request(row) if row is not None else None

    def _checkLimits(self, c: Cursor, limits: PendingLimits, host: str, now: float) -> None:
        if self._countPendingIn(c, None, 0.0) >= limits.total:
            raise PendingLimitReached(
                f"too many devices are waiting for approval ({limits.total}); try again later"
            )
        if self._countPendingIn(c, host, now - limits.window) >= limits.perHost:
            raise PendingLimitReached(
                f"too many new devices from {host} ({limits.perHost} per "
                f"{limits.window:g} s); try again later"
            )

    def updateSerial(
        self, fingerprint: str, serial: str | None, now: float | None = None
    ) -> Deferred[bool]:
        return self._run(self._updateSerial, fingerprint, serial, now)

    def _updateSerial(self, fingerprint: str, serial: str | None, now: float | None) -> bool:
        serial = cleanSerial(serial)
        with self._write() as c:
            row = c.execute(
                "SELECT name, serial FROM devices WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            table = "devices"
            if row is None:
                row = c.execute(
                    "SELECT requested_name AS name, serial FROM enrollment_requests "
                    "WHERE fingerprint = ?",
                    (fingerprint,),
                ).fetchone()
                table = "enrollment_requests"
            if row is None:
                return False
            previous = row["serial"]
            if table == "devices":
                reapproval = c.execute(
                    "SELECT serial FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
                if reapproval is not None:
                    # A device asking to be re-approved with its own key: the serial goes on
                    # its request only, as a new key's does (its notification, the approval
                    # take it there). The device keeps the serial it was approved with until
                    # the request is approved, so the two can be compared (serial_matches).
                    table = "enrollment_requests"
                    c.execute(
                        "UPDATE enrollment_requests SET serial = ? WHERE fingerprint = ?",
                        (serial, fingerprint),
                    )
                    if reapproval["serial"] is not None:
                        previous = reapproval["serial"]
            if previous != serial:
                c.execute(
                    f"UPDATE {table} SET serial = ? WHERE fingerprint = ?", (serial, fingerprint)
                )
                # Without a clock argument the audit time is the key's last recorded
                # contact: the serial is reported right after that login.
                if now is not None:
                    when = now
                elif table == "devices":
                    when = c.execute(
                        "SELECT COALESCE(last_seen, approved_at) AS t FROM devices "
                        "WHERE fingerprint = ?",
                        (fingerprint,),
                    ).fetchone()["t"]
                else:
                    when = c.execute(
                        "SELECT last_seen AS t FROM enrollment_requests WHERE fingerprint = ?",
                        (fingerprint,),
                    ).fetchone()["t"]
                self._insertAudit(
                    c,
                    "device.serial-changed",
                    None,
                    row["name"],
                    {"fingerprint": fingerprint, "serial": serial, "previous": previous},
                    when,
                )
            return True

    def approveDevice(
        self, name: str, actor: str, now: float, fingerprint: str | None = None
    ) -> Deferred[Device]:
        return self._run(self._approveDevice, name, actor, now, fingerprint)

    def _approveDevice(self, name: str, actor: str, now: float, fingerprint: str | None) -> Device:
        with self._write() as c:
            requests = self._requestsNamed(c, name, fingerprint)
            device = self._deviceRow(c, "d.name = ?", name)

            if len(requests) > 1:
                raise AmbiguousRequest(name, requests, device, now)
            if requests:
                request = requests[0]
                if fingerprint is None and _replacesApprovedKey(device, request):
                    raise RekeyNeedsKey(device, request)
                return self._approveRequest(c, request, device, actor, now)
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
                {"fingerprint": device.fingerprint, "kind": "reinstate", "serial": device.serial},
                now,
            )
            return self._deviceNamed(c, name)

    @staticmethod
    def _requestsNamed(c: Cursor, name: str, fingerprint: str | None) -> list[EnrollmentRequest]:
        """The requests asking for C{name} (only the one of key C{fingerprint}, if given)."""
        sql = f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE requested_name = ?"
        args: tuple[str, ...] = (name,)
        if fingerprint is not None:
            sql += " AND fingerprint = ?"
            args += (fingerprint,)
        return [_request(r) for r in c.execute(sql + " ORDER BY first_seen", args)]

    def _approveRequest(
        self,
        c: Cursor,
        request: EnrollmentRequest,
        device: Device | None,
        actor: str,
        now: float,
        owner: tuple[int, float] | None = None,
    ) -> Device:
        """
        Turn one request into the device's binding. Whether it is new, a re-key or a
        re-approval is decided from the devices table now, not from the request's kind
        recorded at contact time. Audits C{device.approved} unless C{owner} (a claim, whose
        caller audits C{device.claimed}) is given.
        """
        name = request.requestedName
        detail: dict[str, Any] = {"fingerprint": request.fingerprint, "serial": request.serial}
        ownerId, leaseUntil = owner if owner is not None else (None, None)
        if device is None:
            self._insertDevice(
                c,
                name,
                request.fingerprint,
                request.publicKey,
                request.serial,
                actor,
                now,
                request.lastSeen,
                ownerId,
                leaseUntil,
            )
            detail["kind"] = "new"
        elif device.fingerprint == request.fingerprint:
            c.execute(
                "UPDATE devices SET state = 'approved', serial = COALESCE(?, serial), "
                "approved_at = ?, approved_by = ?, last_seen = ? WHERE name = ?",
                (request.serial, now, actor, request.lastSeen, name),
            )
            detail["kind"] = "reapprove"
            # The serial the device was approved with, for the one its key reports now
            # (serial_matches in the notification: no, the key on another board).
            detail["deviceSerial"] = device.serial
        else:
            c.execute(
                "UPDATE devices SET state = 'approved', fingerprint = ?, public_key = ?, "
                "serial = ?, approved_at = ?, approved_by = ?, last_seen = ?, "
                "owner_account_id = NULL, lease_until = NULL WHERE name = ?",
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
            # The old key's certificates certify a key that is no longer this device's.
            detail["revokedCertificates"] = self._revokeCertificates(
                c, name, now, device.fingerprint
            )
            detail["kind"] = "rekey"
            detail["previousFingerprint"] = device.fingerprint
        if owner is not None:
            c.execute(
                "UPDATE devices SET owner_account_id = ?, lease_until = ? WHERE name = ?",
                (ownerId, leaseUntil, name),
            )
        c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (request.fingerprint,))
        if owner is None:
            self._insertAudit(c, "device.approved", actor, name, detail, now)
        return self._deviceNamed(c, name)

    @staticmethod
    def _insertDevice(
        c: Cursor,
        name: str,
        fingerprint: str,
        line: str,
        serial: str | None,
        actor: str,
        now: float,
        lastSeen: float | None,
        ownerId: int | None = None,
        leaseUntil: float | None = None,
    ) -> None:
        c.execute(
            f"INSERT INTO devices ({_DEVICE_INSERT_COLUMNS}) "
            "VALUES (?, 'approved', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, fingerprint, line, serial, now, actor, lastSeen, now, ownerId, leaseUntil),
        )
        # Other keys still asking for this name now ask for a taken one: they are re-keys.
        c.execute(
            "UPDATE enrollment_requests SET kind = 'rekey' "
            "WHERE requested_name = ? AND kind = 'new'",
            (name,),
        )

    def revokeDevice(self, name: str, actor: str, now: float) -> Deferred[Device]:
        return self._run(self._revokeDevice, name, actor, now)

    def _revokeDevice(self, name: str, actor: str, now: float) -> Device:
        with self._write() as c:
            device = self._deviceNamed(c, name)
            c.execute("UPDATE devices SET state = 'revoked' WHERE name = ?", (name,))
            revoked = self._revokeCertificates(c, name, now)
            # A pending re-approval of this key would otherwise undo the revocation.
            c.execute(
                "DELETE FROM enrollment_requests WHERE fingerprint = ?", (device.fingerprint,)
            )
            c.execute("DELETE FROM claim_codes WHERE fingerprint = ?", (device.fingerprint,))
            self._insertAudit(
                c,
                "device.revoked",
                actor,
                name,
                {"fingerprint": device.fingerprint, "revokedCertificates": revoked},
                now,
            )
            return self._deviceNamed(c, name)

    @staticmethod
    def _revokeCertificates(
        c: Cursor, name: str, now: float, fingerprint: str | None = None
    ) -> list[str]:
        where = "device_name = ? AND revoked_at IS NULL"
        args: tuple[Any, ...] = (name,)
        if fingerprint is not None:
            where += " AND fingerprint = ?"
            args += (fingerprint,)
        rows = c.execute(
            f"UPDATE certificates SET revoked_at = ? WHERE {where} RETURNING serial_number",
            (now, *args),
        ).fetchall()
        return sorted(r["serial_number"] for r in rows)

    def touchDevice(self, name: str, now: float) -> Deferred[None]:
        return self._run(self._touchDevice, name, now)

    def _touchDevice(self, name: str, now: float) -> None:
        with self._write() as c:
            c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, name))
            if c.rowcount == 0:
                raise UnknownDevice(f"no device named {name!r}")

    # -- pending requests: rejected by an admin, expired when not seen ------------------

    def rejectRequest(
        self, name: str, actor: str, now: float, fingerprint: str | None = None
    ) -> Deferred[EnrollmentRequest]:
        return self._run(self._rejectRequest, name, actor, now, fingerprint)

    def _rejectRequest(
        self, name: str, actor: str, now: float, fingerprint: str | None
    ) -> EnrollmentRequest:
        with self._write() as c:
            requests = self._requestsNamed(c, name, fingerprint)
            if len(requests) > 1:
                device = self._deviceRow(c, "d.name = ?", name)
                raise AmbiguousRequest(name, requests, device, now)
            if not requests:
                withKey = "" if fingerprint is None else f" with key {fingerprint}"
                raise UnknownDevice(f"no pending request for {name!r}{withKey}")
            (request,) = requests
            self._dropRequest(c, request, "enrollment.rejected", actor, now)
            return request

    def staleRequests(self, seenBefore: float) -> Deferred[list[EnrollmentRequest]]:
        return self._run(self._staleRequests, seenBefore)

    def _staleRequests(self, seenBefore: float) -> list[EnrollmentRequest]:
        rows = self._read(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE last_seen < ? "
            "ORDER BY last_seen, fingerprint",
            (seenBefore,),
        )
        return [_request(r) for r in rows]

    def touchRequests(self, fingerprints: Sequence[str], now: float) -> Deferred[int]:
        return self._run(self._touchRequests, list(fingerprints), now)

    def _touchRequests(self, fingerprints: list[str], now: float) -> int:
        if not fingerprints:
            return 0
        with self._write() as c:
            c.execute(
                "UPDATE enrollment_requests SET last_seen = ? "
                f"WHERE fingerprint IN ({', '.join('?' * len(fingerprints))})",
                (now, *fingerprints),
            )
            return int(c.rowcount)

    def expireRequest(
        self, fingerprint: str, seenBefore: float, now: float
    ) -> Deferred[EnrollmentRequest | None]:
        return self._run(self._expireRequest, fingerprint, seenBefore, now)

    def _expireRequest(
        self, fingerprint: str, seenBefore: float, now: float
    ) -> EnrollmentRequest | None:
        with self._write() as c:
            request = self._requestFor(c, fingerprint)
            if request is None or request.lastSeen >= seenBefore:
                return None  # approved, rejected or seen since staleRequests listed it
            self._dropRequest(c, request, "enrollment.expired", None, now)
            return request

    def _dropRequest(
        self, c: Cursor, request: EnrollmentRequest, event: str, actor: str | None, now: float
    ) -> None:
        """
        Remove a pending request and its key's claim code, audited as C{event}: the
        request as it was (the fleet watcher closes its agent's link if one is connected).
        """
        c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (request.fingerprint,))
        c.execute("DELETE FROM claim_codes WHERE fingerprint = ?", (request.fingerprint,))
        detail = {
            "fingerprint": request.fingerprint,
            "kind": request.kind,
            "serial": request.serial,
            "source": request.source,
            "lastSeen": request.lastSeen,
        }
        self._insertAudit(c, event, actor, request.requestedName, detail, now)

    # -- certificates ---------------------------------------------------------------

    def recordCertificate(
        self,
        deviceName: str,
        serialNumber: str,
        fingerprint: str,
        notBefore: float,
        notAfter: float,
        now: float,
    ) -> Deferred[Certificate]:
        return self._run(
            self._recordCertificate, deviceName, serialNumber, fingerprint, notBefore, notAfter, now
        )

    def _recordCertificate(
        self,
        deviceName: str,
        serialNumber: str,
        fingerprint: str,
        notBefore: float,
        notAfter: float,
        now: float,
    ) -> Certificate:
        if not serialNumber or not isinstance(serialNumber, str):
            raise StoreError("a certificate serial number is a non-empty string")
        if notAfter <= notBefore:
            raise StoreError("a certificate must end after it starts")
        with self._write() as c:
            device = self._deviceNamed(c, deviceName)
            if device.state != "approved":
                raise StoreError(f"device {deviceName!r} is {device.state}; no certificate")
            if device.fingerprint != fingerprint:
                raise StoreError(
                    f"device {deviceName!r} has key {device.fingerprint}, not {fingerprint}"
                )
            if c.execute(
                "SELECT 1 FROM certificates WHERE serial_number = ?", (serialNumber,)
            ).fetchone():
                raise AlreadyExists(f"certificate serial {serialNumber} was already issued")
            c.execute(
                f"INSERT INTO certificates ({_CERTIFICATE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (serialNumber, deviceName, fingerprint, notBefore, notAfter, now),
            )
            self._insertAudit(
                c,
                "certificate.issued",
                None,
                deviceName,
                {"serialNumber": serialNumber, "fingerprint": fingerprint, "notAfter": notAfter},
                now,
            )
        return Certificate(serialNumber, deviceName, fingerprint, notBefore, notAfter, now, None)

    def certificateState(self, serialNumber: str, now: float) -> Deferred[CertificateState]:
        return self._run(self._certificateState, serialNumber, now)

    def _certificateState(self, serialNumber: str, now: float) -> CertificateState:
        rows = self._read(
            "SELECT not_after, revoked_at FROM certificates WHERE serial_number = ?",
            (serialNumber,),
        )
        if not rows:
            return "unknown"
        if rows[0]["revoked_at"] is not None:
            return "revoked"
        if rows[0]["not_after"] <= now:
            return "expired"
        return "valid"

    def listCertificates(self, deviceName: str) -> Deferred[list[Certificate]]:
        return self._run(self._listCertificates, deviceName)

    def _listCertificates(self, deviceName: str) -> list[Certificate]:
        rows = self._read(
            f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE device_name = ? "
            "ORDER BY issued_at, serial_number",
            (deviceName,),
        )
        return [_certificate(r) for r in rows]

    # -- enrollment tokens ----------------------------------------------------------

    def createToken(
        self, tokenHash: str, uses: int, expiresAt: float, actor: str, now: float
    ) -> Deferred[TokenRecord]:
        return self._run(self._createToken, tokenHash, uses, expiresAt, actor, now)

    def _createToken(
        self, tokenHash: str, uses: int, expiresAt: float, actor: str, now: float
    ) -> TokenRecord:
        _checkHash(tokenHash, "a token hash")
        if not isinstance(uses, int) or uses < 1:
            raise StoreError(f"a token needs at least one use, not {uses!r}")
        if expiresAt <= now:
            raise StoreError("a token must expire in the future")
        with self._write() as c:
            if c.execute("SELECT 1 FROM tokens WHERE token_hash = ?", (tokenHash,)).fetchone():
                raise AlreadyExists("that token already exists")
            row = c.execute(
                "INSERT INTO tokens (token_hash, uses, uses_left, expires_at, created_at, "
                f"created_by) VALUES (?, ?, ?, ?, ?, ?) RETURNING {_TOKEN_COLUMNS}",
                (tokenHash, uses, uses, expiresAt, now, actor),
            ).fetchone()
            token = _token(row)
            self._insertAudit(
                c,
                "token.created",
                actor,
                None,
                {"token": token.id, "uses": uses, "expiresAt": expiresAt},
                now,
            )
        return token

    def listTokens(self) -> Deferred[list[TokenRecord]]:
        return self._run(self._listTokens)

    def _listTokens(self) -> list[TokenRecord]:
        return [_token(r) for r in self._read(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY id")]

    def redeemToken(
        self,
        tokenHash: str,
        fingerprint: str,
        publicKey: str,
        requestedName: str,
        serial: str | None,
        source: str,
        now: float,
    ) -> Deferred[Device]:
        return self._run(
            self._redeemToken, tokenHash, fingerprint, publicKey, requestedName, serial, source, now
        )

    def _redeemToken(
        self,
        tokenHash: str,
        fingerprint: str,
        publicKey: str,
        requestedName: str,
        serial: str | None,
        source: str,
        now: float,
    ) -> Device:
        _checkDeviceName(requestedName)
        line = _checkKey(publicKey, fingerprint)
        serial = cleanSerial(serial)
        with self._write() as c:
            token = c.execute(
                f"SELECT id, uses_left, expires_at FROM tokens WHERE token_hash = ?"
                f"{self.dialect.forUpdate}",
                (tokenHash,),
            ).fetchone()
            if token is None:
                raise TokenInvalid("no such enrollment token")
            tokenId = int(token["id"])
            if token["expires_at"] <= now:
                raise TokenExpired(f"enrollment token {tokenId} has expired")
            if c.execute(
                "SELECT 1 FROM token_redemptions WHERE token_id = ? AND fingerprint = ?",
                (tokenId, fingerprint),
            ).fetchone():
                raise TokenInvalid(f"this key has already redeemed enrollment token {tokenId}")
            known = self._deviceRow(c, "d.fingerprint = ?", fingerprint)
            if known is not None:
                raise AlreadyExists(
                    f"this key is already device {known.name!r} ({known.state}); "
                    "tokens only enroll new devices"
                )
            if self._deviceExists(c, requestedName):
                raise NameTaken(
                    f"device {requestedName!r} exists with another key; "
                    "a token cannot re-key it (ask an admin)"
                )
            # Conditional: even without the row lock, two redeemers cannot both take the last.
            c.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ? AND uses_left > 0",
                (tokenId,),
            )
            if c.rowcount != 1:
                raise TokenExhausted(f"enrollment token {tokenId} has no uses left")
            c.execute(
                "INSERT INTO token_redemptions (token_id, fingerprint, device_name, redeemed_at) "
                "VALUES (?, ?, ?, ?)",
                (tokenId, fingerprint, requestedName, now),
            )
            actor = f"token:{tokenId}"
            self._insertDevice(c, requestedName, fingerprint, line, serial, actor, now, now)
            c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,))
            self._insertAudit(
                c,
                "device.approved",
                actor,
                requestedName,
                {
                    "fingerprint": fingerprint,
                    "serial": serial,
                    "kind": "token",
                    "token": tokenId,
                    "source": source,
                },
                now,
            )
            return self._deviceNamed(c, requestedName)

    # -- claims ---------------------------------------------------------------------

    def registerClaimCode(
        self,
        codeHash: str,
        fingerprint: str,
        requestedName: str,
        expiresAt: float,
        now: float,
    ) -> Deferred[None]:
        return self._run(
            self._registerClaimCode, codeHash, fingerprint, requestedName, expiresAt, now
        )

    def _registerClaimCode(
        self,
        codeHash: str,
        fingerprint: str,
        requestedName: str,
        expiresAt: float,
        now: float,
    ) -> None:
        _checkHash(codeHash, "a claim code hash")
        _checkDeviceName(requestedName)
        if expiresAt <= now:
            raise StoreError("a claim code must expire in the future")
        with self._write() as c:
            # The claim takes the key from the request (or the device) the agent's login
            # recorded: a code is only ever registered for a key that has connected.
            if not (
                c.execute(
                    "SELECT 1 FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
                or c.execute(
                    "SELECT 1 FROM devices WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
            ):
                raise UnknownDevice(f"no device or pending request has key {fingerprint}")
            c.execute(
                "DELETE FROM claim_codes WHERE fingerprint = ? OR expires_at <= ?",
                (fingerprint, now),
            )
            if c.execute("SELECT 1 FROM claim_codes WHERE code_hash = ?", (codeHash,)).fetchone():
                raise AlreadyExists("that claim code is in use; make another")
            c.execute(
                "INSERT INTO claim_codes (code_hash, fingerprint, requested_name, expires_at, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (codeHash, fingerprint, requestedName, expiresAt, now),
            )
            # The hash of a short code is easy to invert: it stays out of the audit log.
            self._insertAudit(
                c,
                "claim.code-registered",
                None,
                requestedName,
                {"fingerprint": fingerprint, "expiresAt": expiresAt},
                now,
            )

    def claimDevice(
        self, codeHash: str, account: Account, leaseUntil: float, now: float
    ) -> Deferred[Device]:
        return self._run(self._claimDevice, codeHash, account, leaseUntil, now)

    def _claimDevice(
        self, codeHash: str, account: Account, leaseUntil: float, now: float
    ) -> Device:
        if leaseUntil <= now:
            raise StoreError("a claim's lease must end in the future")
        with self._write() as c:
            code = c.execute(
                "SELECT fingerprint, requested_name, expires_at FROM claim_codes "
                "WHERE code_hash = ?",
                (codeHash,),
            ).fetchone()
            if code is None:
                raise ClaimCodeInvalid("no such claim code (it may have been used or replaced)")
            if code["expires_at"] <= now:
                raise ClaimCodeExpired("the claim code has expired; show a new one")
            fingerprint = code["fingerprint"]
            c.execute("DELETE FROM claim_codes WHERE code_hash = ?", (codeHash,))
            actor = f"claim:{account.name}"
            owner = (account.id, leaseUntil)
            device = self._deviceRow(c, "d.fingerprint = ?", fingerprint)
            request = self._requestFor(c, fingerprint)

            if device is None:
                if request is None:
                    raise ClaimCodeInvalid("the device is no longer waiting to be claimed")
                name = code["requested_name"]
                request = attrs.evolve(request, requestedName=name)
                if self._deviceExists(c, name):
                    raise NameTaken(
                        f"device {name!r} exists with another key; a claim cannot re-key it"
                    )
                claimed = self._approveRequest(c, request, None, actor, now, owner)
                kind = "new"
            else:
                kind = self._claimableKind(device, request, account, now)
                if request is not None:
                    claimed = self._approveRequest(c, request, device, actor, now, owner)
                else:
                    c.execute(
                        "UPDATE devices SET owner_account_id = ?, lease_until = ? WHERE name = ?",
                        (account.id, leaseUntil, device.name),
                    )
                    claimed = self._deviceNamed(c, device.name)
            detail: dict[str, Any] = {
                "owner": account.name,
                "leaseUntil": leaseUntil,
                "fingerprint": fingerprint,
                "kind": kind,
                # As an approval's: what the request's agent reported, else the device's.
                "serial": claimed.serial if request is None else request.serial,
            }
            if kind == "reapprove" and device is not None:
                detail["deviceSerial"] = device.serial
            self._insertAudit(c, "device.claimed", account.name, claimed.name, detail, now)
            return claimed

    @staticmethod
    def _claimableKind(
        device: Device, request: EnrollmentRequest | None, account: Account, now: float
    ) -> str:
        """
        Decide whether a known device may be claimed, and as what.

        A claim proves someone can read the device's screen or logs; that is enough to take
        a device nobody vouched for, not one an admin approved or another operator holds.
        """
        if device.state != "approved":
            raise ClaimRefused(f"device {device.name!r} is revoked; only an admin can reinstate it")
        if request is not None and request.kind == "reapprove":
            if device.owner not in (None, account.name) and (device.leaseUntil or 0) > now:
                raise ClaimRefused(f"device {device.name!r} is owned by {device.owner}")
            return "reapprove"
        if device.owner == account.name:
            return "renew"
        if device.approvedBy.startswith("claim:") and (
            device.owner is None or (device.leaseUntil or 0) <= now
        ):
            return "reclaim"
        raise ClaimRefused(
            f"device {device.name!r} is already approved"
            + (f" and owned by {device.owner}" if device.owner else "")
            + "; ask an admin for a grant"
        )

    def lapsedLeases(self, now: float) -> Deferred[list[Device]]:
        return self._run(self._lapsedLeases, now)

    def _lapsedLeases(self, now: float) -> list[Device]:
        rows = self._read(
            f"{_DEVICE_SELECT} WHERE d.owner_account_id IS NOT NULL AND d.lease_until <= ? "
            "ORDER BY d.lease_until, d.name",
            (now,),
        )
        return [_device(r) for r in rows]

    def endLease(self, name: str, now: float) -> Deferred[Device | None]:
        return self._run(self._endLease, name, now)

    def _endLease(self, name: str, now: float) -> Device | None:
        with self._write() as c:
            device = self._deviceNamed(c, name)
            if device.owner is None or device.leaseUntil is None or device.leaseUntil > now:
                return None  # no lease, or renewed since lapsedLeases saw it
            c.execute(
                "UPDATE devices SET owner_account_id = NULL, lease_until = NULL WHERE name = ?",
                (name,),
            )
            self._insertAudit(
                c,
                "claim.lapsed",
                None,
                name,
                {"owner": device.owner, "leaseUntil": device.leaseUntil},
                now,
            )
            return self._deviceNamed(c, name)

    def renewLease(
        self, name: str, account: Account, leaseUntil: float, now: float
    ) -> Deferred[Device]:
        return self._run(self._renewLease, name, account, leaseUntil, now)

    def _renewLease(self, name: str, account: Account, leaseUntil: float, now: float) -> Device:
        if leaseUntil <= now:
            raise StoreError("a claim's lease must end in the future")
        with self._write() as c:
            device = self._leaseHeldBy(c, name, account, now)
            c.execute("UPDATE devices SET lease_until = ? WHERE name = ?", (leaseUntil, name))
            self._insertAudit(
                c,
                "claim.renewed",
                account.name,
                name,
                {"owner": device.owner, "leaseUntil": leaseUntil, "was": device.leaseUntil},
                now,
            )
            return self._deviceNamed(c, name)

    def releaseLease(self, name: str, account: Account, now: float) -> Deferred[Device]:
        return self._run(self._releaseLease, name, account, now)

    def _releaseLease(self, name: str, account: Account, now: float) -> Device:
        with self._write() as c:
            device = self._leaseHeldBy(c, name, account, now)
            c.execute(
                "UPDATE devices SET owner_account_id = NULL, lease_until = NULL WHERE name = ?",
                (name,),
            )
            self._insertAudit(
                c,
                "claim.released",
                account.name,
                name,
                {"owner": device.owner, "leaseUntil": device.leaseUntil},
                now,
            )
            return self._deviceNamed(c, name)

    def _leaseHeldBy(self, c: Cursor, name: str, account: Account, now: float) -> Device:
        """The device C{name} if it has a live lease C{account} may change, else why not."""
        device = self._deviceNamed(c, name)
        if device.state != "approved":
            raise ClaimRefused(f"device {name!r} is {device.state}")
        if device.owner is None or device.leaseUntil is None:
            raise ClaimRefused(f"device {name!r} is not claimed by anyone")
        if device.owner != account.name and not account.isAdmin:
            raise ClaimRefused(f"device {name!r} is claimed by {device.owner}, not by you")
        if device.leaseUntil <= now:
            raise ClaimRefused(
                f"the lease of {device.owner} on {name!r} has ended; "
                "claim it again with the code the device shows"
            )
        return device

    # -- grants ---------------------------------------------------------------------

    def grant(
        self,
        accountName: str,
        selector: str,
        actor: str,
        now: float,
        expiresAt: float | None = None,
        loginUser: str | None = None,
        agentForwarding: bool = False,
    ) -> Deferred[Grant]:
        return self._run(
            self._grant, accountName, selector, actor, now, expiresAt, loginUser, agentForwarding
        )

    def _grant(
        self,
        accountName: str,
        selector: str,
        actor: str,
        now: float,
        expiresAt: float | None,
        loginUser: str | None,
        agentForwarding: bool = False,
    ) -> Grant:
        selector = parseSelector(selector)
        kind, name = selector.split(":", 1)
        if loginUser is not None and not isValidLoginUser(loginUser):
            raise InvalidName(f"invalid login user {loginUser!r}")
        if expiresAt is not None and expiresAt <= now:
            raise StoreError("a grant must expire in the future")
        with self._write() as c:
            accountId = self._accountId(c, accountName)
            if kind == "device" and not self._deviceExists(c, name):
                raise UnknownDevice(f"no device named {name!r}")
            # Granting again replaces the grant: its expiry and its login user.
            c.execute(
                "DELETE FROM grants WHERE account_id = ? AND selector = ?", (accountId, selector)
            )
            c.execute(
                "INSERT INTO grants (account_id, selector, login_user, expires_at, created_at, "
                "created_by, agent_forwarding) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (accountId, selector, loginUser, expiresAt, now, actor, bool(agentForwarding)),
            )
            self._insertAudit(
                c,
                "grant.added",
                actor,
                name if kind == "device" else None,
                {
                    "account": accountName,
                    "selector": selector,
                    "expiresAt": expiresAt,
                    "loginUser": loginUser,
                    "agentForwarding": bool(agentForwarding),
                },
                now,
            )
        return Grant(accountName, selector, loginUser, expiresAt, now, actor, bool(agentForwarding))

    def ungrant(self, accountName: str, selector: str, actor: str, now: float) -> Deferred[bool]:
        return self._run(self._ungrant, accountName, selector, actor, now)

    def _ungrant(self, accountName: str, selector: str, actor: str, now: float) -> bool:
        selector = parseSelector(selector)
        kind, name = selector.split(":", 1)
        with self._write() as c:
            accountId = self._accountId(c, accountName)
            c.execute(
                "DELETE FROM grants WHERE account_id = ? AND selector = ?", (accountId, selector)
            )
            removed = c.rowcount > 0
            if removed:
                self._insertAudit(
                    c,
                    "grant.removed",
                    actor,
                    name if kind == "device" else None,
                    {"account": accountName, "selector": selector},
                    now,
                )
            return removed

    def listGrants(self, accountName: str | None = None) -> Deferred[list[Grant]]:
        return self._run(self._listGrants, accountName)

    def _listGrants(self, accountName: str | None) -> list[Grant]:
        sql = (
            "SELECT a.name AS account, g.selector, g.login_user, g.expires_at, g.created_at, "
            "g.created_by, g.agent_forwarding FROM grants g JOIN accounts a ON a.id = g.account_id"
        )
        args: tuple[Any, ...] = ()
        if accountName is not None:
            sql += " WHERE a.name = ?"
            args = (accountName,)
        return [_grant(r) for r in self._read(sql + " ORDER BY a.name, g.selector", args)]

    @staticmethod
    def _accountId(c: Cursor, name: str) -> int:
        row = c.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAccount(f"no account named {name!r}")
        return int(row["id"])

    @staticmethod
    def _matchingGrants(c: Cursor, account: Account, deviceName: str, now: float) -> list[Row]:
        """The account's unexpired grants whose selector names the device, its groups or tags."""
        return c.execute(
            "SELECT g.id, g.selector, g.login_user, g.agent_forwarding FROM grants g "
            "WHERE g.account_id = ? "
            "AND (g.expires_at IS NULL OR g.expires_at > ?) AND (g.selector = ? "
            "OR g.selector IN (SELECT 'group:' || m.group_name FROM group_members m "
            "WHERE m.device_name = ?) "
            "OR g.selector IN (SELECT 'tag:' || t.tag FROM device_tags t WHERE t.device_name = ?))",
            (account.id, now, f"device:{deviceName}", deviceName, deviceName),
        ).fetchall()

    def mayReach(self, account: Account, deviceName: str, now: float) -> Deferred[bool]:
        return self._run(self._mayReach, account, deviceName, now)

    def _mayReach(self, account: Account, deviceName: str, now: float) -> bool:
        if account.isAdmin:
            return True
        c = self._cursor()
        if self._matchingGrants(c, account, deviceName, now):
            return True
        return bool(
            c.execute(
                "SELECT 1 FROM devices WHERE name = ? AND owner_account_id = ? AND lease_until > ?",
                (deviceName, account.id, now),
            ).fetchone()
        )

    def loginUserFor(self, account: Account, deviceName: str, now: float) -> Deferred[str | None]:
        return self._run(self._loginUserFor, account, deviceName, now)

    def _loginUserFor(self, account: Account, deviceName: str, now: float) -> str | None:
        rows = self._matchingGrants(self._cursor(), account, deviceName, now)
        if not rows:
            return None

        def rank(row: Row) -> tuple[int, bool, str]:
            # Most specific first; among equals, one naming a user, then by name.
            user = row["login_user"]
            return (_SPECIFICITY[row["selector"].split(":", 1)[0]], user is None, user or "")

        return min(rows, key=rank)["login_user"]  # type: ignore[no-any-return]

    def agentForwardingAllowed(
        self, account: Account, deviceName: str, now: float
    ) -> Deferred[bool]:
        return self._run(self._agentForwardingAllowed, account, deviceName, now)

    def _agentForwardingAllowed(self, account: Account, deviceName: str, now: float) -> bool:
        if account.isAdmin:
            return True
        rows = self._matchingGrants(self._cursor(), account, deviceName, now)
        return any(bool(row["agent_forwarding"]) for row in rows)

    # -- tags and groups ------------------------------------------------------------

    def tagDevice(
        self,
        deviceName: str,
        add: Sequence[str],
        remove: Sequence[str],
        actor: str,
        now: float,
    ) -> Deferred[Device]:
        return self._run(self._tagDevice, deviceName, list(add), list(remove), actor, now)

    def _tagDevice(
        self, deviceName: str, add: list[str], remove: list[str], actor: str, now: float
    ) -> Device:
        for tag in add + remove:
            _checkTag(tag)
        with self._write() as c:
            before = set(self._deviceNamed(c, deviceName).tags)
            for tag in remove:
                c.execute(
                    "DELETE FROM device_tags WHERE device_name = ? AND tag = ? "
                    "AND source = 'admin'",
                    (deviceName, tag),
                )
            for tag in add:
                c.execute(
                    "INSERT INTO device_tags (device_name, tag, source, added_at) "
                    "VALUES (?, ?, 'admin', ?) ON CONFLICT DO NOTHING",
                    (deviceName, tag, now),
                )
            device = self._deviceNamed(c, deviceName)
            after = set(device.tags)
            if after != before:
                self._insertAudit(
                    c,
                    "device.tagged",
                    actor,
                    deviceName,
                    {
                        "added": sorted(after - before),
                        "removed": sorted(before - after),
                        "tags": sorted(after),
                    },
                    now,
                )
            return device

    def reportTags(self, deviceName: str, tags: Sequence[str], now: float) -> Deferred[bool]:
        return self._run(self._reportTags, deviceName, list(tags), now)

    def _reportTags(self, deviceName: str, tags: list[str], now: float) -> bool:
        # The device is not trusted to spell them well: malformed tags are dropped.
        wanted = sorted({t for t in tags if isValidTag(t)})[:MAX_REPORTED_TAGS]
        with self._write() as c:
            device = self._deviceNamed(c, deviceName)
            if list(device.reportedTags) == wanted:
                return False
            c.execute(
                "DELETE FROM device_tags WHERE device_name = ? AND source = 'agent'",
                (deviceName,),
            )
            for tag in wanted:
                c.execute(
                    "INSERT INTO device_tags (device_name, tag, source, added_at) "
                    "VALUES (?, ?, 'agent', ?)",
                    (deviceName, tag, now),
                )
            self._insertAudit(
                c,
                "device.tags-reported",
                None,
                deviceName,
                {"tags": wanted, "previous": list(device.reportedTags)},
                now,
            )
            return True

    def addToGroup(
        self, groupName: str, deviceNames: Sequence[str], actor: str, now: float
    ) -> Deferred[list[str]]:
        return self._run(self._addToGroup, groupName, list(deviceNames), actor, now)

    def _addToGroup(
        self, groupName: str, deviceNames: list[str], actor: str, now: float
    ) -> list[str]:
        _checkTag(groupName, "group name")
        if not deviceNames:
            raise StoreError("name at least one device to add to the group")
        with self._write() as c:
            added = []
            for name in dict.fromkeys(deviceNames):
                self._deviceNamed(c, name)
                c.execute(
                    "INSERT INTO group_members (group_name, device_name, added_at, added_by) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (groupName, name, now, actor),
                )
                if c.rowcount > 0:
                    added.append(name)
            if added:
                self._insertAudit(
                    c, "group.added", actor, None, {"group": groupName, "devices": added}, now
                )
            return self._groupMembers(c, groupName)

    def removeFromGroup(
        self, groupName: str, deviceNames: Sequence[str], actor: str, now: float
    ) -> Deferred[list[str]]:
        return self._run(self._removeFromGroup, groupName, list(deviceNames), actor, now)

    def _removeFromGroup(
        self, groupName: str, deviceNames: list[str], actor: str, now: float
    ) -> list[str]:
        _checkTag(groupName, "group name")
        with self._write() as c:
            members = self._groupMembers(c, groupName)
            removed = [n for n in members if not deviceNames or n in deviceNames]
            for name in removed:
                c.execute(
                    "DELETE FROM group_members WHERE group_name = ? AND device_name = ?",
                    (groupName, name),
                )
            if removed:
                self._insertAudit(
                    c,
                    "group.removed",
                    actor,
                    None,
                    {"group": groupName, "devices": removed, "whole": not deviceNames},
                    now,
                )
            return removed

    @staticmethod
    def _groupMembers(c: Cursor, groupName: str) -> list[str]:
        rows = c.execute(
            "SELECT device_name FROM group_members WHERE group_name = ? ORDER BY device_name",
            (groupName,),
        )
        return [r["device_name"] for r in rows]

    def listGroups(self) -> Deferred[dict[str, list[str]]]:
        return self._run(self._listGroups)

    def _listGroups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for row in self._read(
            "SELECT group_name, device_name FROM group_members ORDER BY group_name, device_name"
        ):
            groups.setdefault(row["group_name"], []).append(row["device_name"])
        return groups

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

    def close(self) -> Deferred[None]:
        return self._run(self._db.close)
