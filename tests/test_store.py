"""Tests for groundcontrol.store: schema migration, device identity, enrollment, grants, audit."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from accesstunnel.keys import fingerprint
from accesstunnel.names import isValidDeviceName
from groundcontrol.store import (
    Account,
    AlreadyExists,
    AmbiguousRequest,
    AuditPage,
    Device,
    EnrollmentRequest,
    InvalidName,
    IStore,
    PostgreSQLStore,
    SQLiteStore,
    SQLStore,
    StoreError,
    ThreadRunner,
    UnknownAccount,
    UnknownDevice,
    connectPostgreSQL,
    migrate,
    migratePostgreSQL,
    openSQLiteStore,
    openStore,
    openStoreBlocking,
    schemaUpgraders,
    sqlitePath,
    storeKind,
    synchronousRunner,
    threadRunner,
)
from groundcontrol.store._dialect import POSTGRESQL
from groundcontrol.store._sqlite import connect
from groundcontrol.store.pgtesting import ThrowawayPostgreSQL

T0 = 1_700_000_000.0
_C = TypeVar("_C", bound=type)


def newPublicKey() -> str:
    """A fresh ed25519 public key as an OpenSSH one-line string."""
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    return key.public().toString("OPENSSH").decode("ascii")


#: Every table of the current schema, dependents first: what an upgrade test drops before it
#: migrates again from an older version. A new schema's table goes here, once.
EVERY_TABLE = (
    "notify_position",
    "session_index",
    "device_tags",
    "group_members",
    "audit",
    "grants",
    "account_keys",
    "devices",
    "accounts",
    "enrollment_requests",
    "certificates",
    "token_redemptions",
    "tokens",
    "claim_codes",
    "version",
)


class StoreTestCase(SynchronousTestCase):
    """
    Opens a migrated store with the synchronous runner: on a temporary SQLite file, or (in
    the C{PostgreSQL...} variants made by L{bothBackends}) in a fresh schema of the
    session's throwaway PostgreSQL server.
    """

    backend: ClassVar[str] = "sqlite"
    postgresql: ClassVar[ThrowawayPostgreSQL | None] = None

    def setUp(self) -> None:
        if self.backend == "postgresql":
            assert self.postgresql is not None, "the postgresqlForClass fixture did not run"
            self.url = self.postgresql.newDatabase()
        else:
            directory = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
            self.path = str(Path(directory) / "store.sqlite3")
            self.url = self.path
        self.store: SQLStore = self.openAnother()

    def openAnother(self) -> SQLStore:
        """Open another connection to the same store: another process, or another node."""
        store = self.successResultOf(openStore(self.url, synchronousRunner))
        self.addCleanup(store.close)
        return store

    def rawQuery(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (C{?} placeholders) on a fresh driver connection; commit."""
        if self.backend == "postgresql":
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as pg:
                cursor = pg.execute(POSTGRESQL.sql(sql), tuple(args))
                return list(cursor.fetchall()) if cursor.description else []
        connection = sqlite3.connect(self.path)
        try:
            rows = connection.execute(sql, tuple(args)).fetchall()
            connection.commit()
            return rows
        finally:
            connection.close()

    def rawMigrate(self, upTo: int | None = None) -> int:
        """Migrate with the driver-level function, as C{groundcontrol init} does."""
        if self.backend == "postgresql":
            connection = connectPostgreSQL(self.url)
            try:
                return migratePostgreSQL(connection, upTo)
            finally:
                connection.close()
        sqliteConnection = connect(self.path)
        try:
            return migrate(sqliteConnection, upTo)
        finally:
            sqliteConnection.close()

    def contact(
        self,
        name: str,
        publicKey: str,
        now: float = T0,
        serial: str | None = None,
        source: str = "192.0.2.1:5000",
        **kwargs: Any,
    ) -> Any:
        """Record an agent's contact and return the store's answer."""
        return self.successResultOf(
            self.store.recordContact(
                name, publicKey, fingerprint(publicKey), serial, source, now, **kwargs
            )
        )

    def enroll(self, name: str, now: float = T0) -> tuple[str, Device]:
        """Create an approved device and return its public key and record."""
        publicKey = newPublicKey()
        self.contact(name, publicKey, now)
        device = self.successResultOf(self.store.approveDevice(name, "admin", now))
        return publicKey, device

    def events(self, after: int = 0) -> list[Any]:
        """Every audit event after id C{after}."""
        return self.successResultOf(self.store.auditSince(after, limit=10_000))

    def failureOf(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        """Return the exception a failed Deferred carries, checking its type."""
        return self.failureResultOf(d, *errors).value


def bothBackends(cls: _C) -> _C:
    """
    Class decorator: also run C{cls} on PostgreSQL, as C{PostgreSQL<cls>} in its module.

    trial test cases cannot be parametrised by pytest, so the variant is a subclass that
    asks for the session's server through a class-scoped fixture; it is skipped, with the
    reason, only when the PostgreSQL binaries are not installed.
    """
    import sys

    name = f"PostgreSQL{cls.__name__}"
    variant = type(
        name,
        (cls,),
        {
            "backend": "postgresql",
            "__module__": cls.__module__,
            "__qualname__": name,
            "__doc__": f"{(cls.__doc__ or '').strip()} (on PostgreSQL)",
        },
    )
    variant = pytest.mark.usefixtures("postgresqlForClass")(variant)
    setattr(sys.modules[cls.__module__], name, variant)
    return cls


class FingerprintTests(SynchronousTestCase):
    """accesstunnel.keys.fingerprint matches OpenSSH's spelling."""

    def test_sha256NoPadding(self) -> None:
        """The fingerprint is SHA256: plus unpadded base64, the same for str, bytes and Key."""
        publicKey = newPublicKey()
        fp = fingerprint(publicKey)
        self.assertTrue(fp.startswith("SHA256:"))
        self.assertNotIn("=", fp)
        self.assertEqual(len(fp), len("SHA256:") + 43)
        self.assertEqual(fingerprint(publicKey.encode()), fp)
        self.assertEqual(fingerprint(keys.Key.fromString(publicKey)), fp)


class NameTests(SynchronousTestCase):
    """accesstunnel.names accepts exactly the documented device-name grammar."""

    def test_names(self) -> None:
        """Lower-case DNS-label-like names pass; anything else, even a trailing newline, fails."""
        for good in ["a", "kiln7", "0", "a-b", "a" * 63]:
            self.assertTrue(isValidDeviceName(good), good)
        for bad in ["", "-a", "A", "a_b", "a.b", "a" * 64, "kiln7\n", "dev_kiln7", None, "ä"]:
            self.assertFalse(isValidDeviceName(bad), bad)


@bothBackends
class MigrationTests(StoreTestCase):
    """The schema is created from the shipped files and re-opening is harmless."""

    def test_interface(self) -> None:
        """The store provides every IStore method."""
        expected = PostgreSQLStore if self.backend == "postgresql" else SQLiteStore
        self.assertIsInstance(self.store, expected)
        self.assertTrue(verifyObject(IStore, self.store))

    def test_fromEmpty(self) -> None:
        """A new database ends at the newest version with every table of the schema."""
        self.assertEqual(
            self.rawQuery("SELECT version FROM version"), [(schemaUpgraders()[-1][0],)]
        )
        for table in [
            "accounts",
            "account_keys",
            "devices",
            "enrollment_requests",
            "grants",
            "audit",
            "certificates",
            "tokens",
            "token_redemptions",
            "claim_codes",
            "device_tags",
            "group_members",
        ]:
            self.assertEqual(self.rawQuery(f"SELECT COUNT(*) FROM {table}"), [(0,)], table)

    def test_reopenIsIdempotent(self) -> None:
        """Re-opening keeps data and the single version row; migrating again is a no-op."""
        self.successResultOf(self.store.addAccount("alice", [newPublicKey()], False, T0))
        again = self.openAnother()
        self.assertEqual([a.name for a in self.successResultOf(again.listAccounts())], ["alice"])
        self.assertEqual(self.rawMigrate(), schemaUpgraders()[-1][0])
        self.assertEqual(len(self.rawQuery("SELECT * FROM version")), 1)

    def test_openStoreBlocking(self) -> None:
        """openStoreBlocking opens the same store at once, for start-up before the reactor."""
        self.successResultOf(self.store.addAccount("alice", [newPublicKey()], False, T0))
        store = openStoreBlocking(self.url, synchronousRunner)
        self.addCleanup(store.close)
        self.assertIsInstance(store, type(self.store))
        self.assertEqual([a.name for a in self.successResultOf(store.listAccounts())], ["alice"])

    def test_newerDatabaseRefused(self) -> None:
        """A database written by a newer groundcontrol is refused rather than misread."""
        self.rawQuery("UPDATE version SET version = 999")
        error = self.failureOf(openStore(self.url, synchronousRunner), StoreError)
        self.assertIn("newer", str(error))

    def test_sameVersionsInEveryDialect(self) -> None:
        """Version N exists for SQLite and PostgreSQL alike: one version, one schema."""
        self.assertEqual(
            [v for v, _ in schemaUpgraders()], [v for v, _ in POSTGRESQL.schemaUpgraders()]
        )

    def test_upgradeFrom001(self) -> None:
        """
        A version 1 database with pending requests upgrades to 2: the requests keep their
        data and get the host of their source (IPv4, bracketed IPv6, or whole).
        """
        self.rawQuery("DROP TABLE version")
        for table in [
            "session_index",
            "audit",
            "grants",
            "enrollment_requests",
            "devices",
            "account_keys",
            "accounts",
            "certificates",
            "token_redemptions",
            "tokens",
            "claim_codes",
            "device_tags",
            "group_members",
            "notify_position",
        ]:
            self.rawQuery(f"DROP TABLE {table}")
        self.assertEqual(self.rawMigrate(upTo=1), 1)
        for i, source in enumerate(["192.0.2.1:5000", "[2001:db8::1]:22", "test"]):
            self.rawQuery(
                "INSERT INTO enrollment_requests (fingerprint, requested_name, public_key, "
                "serial, source, first_seen, last_seen, kind) VALUES (?, ?, 'k', NULL, ?, ?, ?, "
                "'new')",
                (f"fp{i}", f"dev{i}", source, T0, T0),
            )
        self.assertEqual(self.rawMigrate(), schemaUpgraders()[-1][0])
        store = self.openAnother()
        for host in ["192.0.2.1", "2001:db8::1", "test"]:
            self.assertEqual(self.successResultOf(store.countPendingFrom(host, T0)), 1, host)
        requests = self.successResultOf(store.listEnrollmentRequests())
        self.assertEqual(requests[0].source, "192.0.2.1:5000")


class SQLiteFileTests(StoreTestCase):
    """What only the SQLite file needs: WAL for sharing with the CLI, store URLs."""

    def test_wal(self) -> None:
        """The file is in WAL mode, so the CLI can write while the server reads."""
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0].lower(), "wal")

    def test_openSQLiteStore(self) -> None:
        """openSQLiteStore(path) and openStore('sqlite://' + path) open the same file."""
        self.successResultOf(self.store.addAccount("alice", [newPublicKey()], False, T0))
        opened: list[Deferred[Any]] = [
            openSQLiteStore(self.path, synchronousRunner),
            openStore("sqlite://" + self.path, synchronousRunner),
        ]
        for d in opened:
            store = self.successResultOf(d)
            self.addCleanup(store.close)
            self.assertEqual(len(self.successResultOf(store.listAccounts())), 1)

    def test_urls(self) -> None:
        """Store URLs: sqlite:// and paths are SQLite, postgres(ql):// is PostgreSQL."""
        self.assertEqual(storeKind("/var/lib/gc.sqlite3"), "sqlite")
        self.assertEqual(storeKind("sqlite:///var/lib/gc.sqlite3"), "sqlite")
        self.assertEqual(sqlitePath("sqlite:///var/lib/gc.sqlite3"), "/var/lib/gc.sqlite3")
        self.assertEqual(sqlitePath("relative/gc.db"), "relative/gc.db")
        self.assertEqual(storeKind("postgresql://gc@db.example/gc"), "postgresql")
        self.assertEqual(storeKind("postgres://gc@db.example/gc"), "postgresql")
        self.assertRaises(StoreError, storeKind, "mysql://x/y")
        self.failureResultOf(openStore("mysql://x/y", synchronousRunner), StoreError)


class RunnerTests(SynchronousTestCase):
    """The runners deliver results and errors through Deferreds."""

    def test_synchronousRunner(self) -> None:
        """synchronousRunner returns an already-fired Deferred, failed if the function raised."""
        self.assertEqual(self.successResultOf(synchronousRunner(lambda a, b: a + b, 1, 2)), 3)
        self.failureResultOf(synchronousRunner(lambda: 1 / 0), ZeroDivisionError)

    def test_threadRunner(self) -> None:
        """
        threadRunner uses one single-worker pool, started with the reactor and stopped at
        shutdown, and hands results back through callFromThread.
        """
        events: list[Any] = []

        class FakePool(QueuedPool):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__()
                events.append(("pool", kwargs))

            def start(self) -> None:
                events.append("start")

            def stop(self) -> None:
                events.append("stop")

        class FakeReactor:
            def callWhenRunning(self, f: Callable[[], None]) -> None:
                events.append(("whenRunning", f.__name__))

            def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
                events.append(("trigger", phase, event, f.__name__))

            def callFromThread(self, f: Callable[..., None], *a: Any) -> None:
                events.append("fromThread")
                f(*a)

        run = threadRunner(FakeReactor(), poolFactory=FakePool)  # type: ignore[arg-type]
        result = run(pow, 2, 10)
        pool = cast(QueuedPool, run._pool)
        self.assertNoResult(result)
        pool.runAll()
        self.assertEqual(self.successResultOf(result), 1024)
        self.assertEqual(
            events,
            [
                ("pool", {"minthreads": 1, "maxthreads": 1, "name": "groundcontrol-store"}),
                ("whenRunning", "start"),
                ("trigger", "during", "shutdown", "stop"),
                "fromThread",
            ],
        )

    def lanes(self) -> tuple[ThreadRunner, QueuedPool]:
        """A thread runner on a pool that runs its queued turns only when told."""
        pool = QueuedPool()
        return threadRunner(InlineReactor(), poolFactory=lambda **kw: pool), pool

    def test_firstOvertakesQueuedCalls(self) -> None:
        """
        A call through C{first} runs before calls queued earlier through the runner
        itself, which keep their own order; each result reaches its own Deferred.
        """
        run, pool = self.lanes()
        ran: list[str] = []
        fleet = [run(ran.append, f"fleet-{i}") for i in range(3)]
        person = run.first(ran.append, "person")
        later = run(ran.append, "fleet-3")
        pool.runAll()
        self.assertEqual(ran, ["person", "fleet-0", "fleet-1", "fleet-2", "fleet-3"])
        for d in [person, *fleet, later]:
            self.assertIsNone(self.successResultOf(d))

    def test_oneDrainPerBurst(self) -> None:
        """
        Calls queued while a drain is pending, or made while it runs (a result's callback
        asking again), join it: the pool gets one job per burst, not one per call (each
        job of Twisted's pool is a self-referencing closure, cyclic garbage). A call
        made once the queues are empty hands the pool a new drain; a C{first} call made
        during a drain still overtakes the rest left in it.
        """
        run, pool = self.lanes()
        ran: list[str] = []
        run(ran.append, "fleet-0")
        run(ran.append, "fleet-1")
        asked = run.first(ran.append, "person")
        asked.addCallback(lambda _: run.first(ran.append, "person again"))
        self.assertEqual(len(pool.turns), 1)
        pool.runOne()
        self.assertEqual(ran, ["person", "person again", "fleet-0", "fleet-1"])
        self.assertEqual(pool.turns, [])
        run(ran.append, "fleet-2")
        self.assertEqual(len(pool.turns), 1)
        pool.runOne()
        self.assertEqual(ran[-1], "fleet-2")

    def test_firstCallsKeepTheirOrder(self) -> None:
        """Calls through C{first} run in the order they were made, ahead of the rest."""
        run, pool = self.lanes()
        ran: list[str] = []
        run(ran.append, "fleet")
        run.first(ran.append, "a")
        run.first(ran.append, "b")
        pool.runAll()
        self.assertEqual(ran, ["a", "b", "fleet"])

    def test_failureReachesItsCaller(self) -> None:
        """An exception in a call fails that call's Deferred; the next call still runs."""
        run, pool = self.lanes()
        failed = run.first(lambda: 1 / 0)
        fine = run(pow, 3, 2)
        pool.runAll()
        self.failureResultOf(failed, ZeroDivisionError)
        self.assertEqual(self.successResultOf(fine), 9)


class QueuedPool:
    """A thread pool double: C{callInThread} queues; C{runOne}/C{runAll} run the jobs."""

    def __init__(self) -> None:
        self.turns: list[Callable[[], object]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThread(self, func: Callable[..., object], *args: Any) -> None:
        self.turns.append(lambda: func(*args))

    def runOne(self) -> None:
        self.turns.pop(0)()

    def runAll(self) -> None:
        while self.turns:
            self.runOne()


class InlineReactor:
    """Just enough reactor for threadRunner: results handed back at once."""

    def callWhenRunning(self, f: Callable[[], None]) -> None:
        pass

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        pass

    def callFromThread(self, f: Callable[..., None], *a: Any) -> None:
        f(*a)


class InteractiveViewTests(SynchronousTestCase):
    """L{SQLStore.interactive}: the same data, its calls ahead of the fleet's."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.path = str(Path(directory) / "store.sqlite3")
        self.pool = QueuedPool()
        runner = threadRunner(InlineReactor(), poolFactory=lambda **kw: self.pool)
        self.store = openStoreBlocking(self.path, runner)
        self.addCleanup(self.pool.runAll)
        self.addCleanup(self.store.close)

    def test_viewReadsWhatTheStoreWrote(self) -> None:
        """A write through the store is read through the view: one database."""
        people = self.store.interactive()
        verifyObject(IStore, people)
        publicKey = newPublicKey()
        added = self.store.addAccount("ada", [publicKey], False, T0)
        self.pool.runAll()
        self.successResultOf(added)
        found = people.accountForKey(fingerprint(publicKey))
        self.pool.runAll()
        account = self.successResultOf(found)
        assert account is not None
        self.assertEqual(account.name, "ada")

    def test_viewCallsGoFirst(self) -> None:
        """
        An operator's query through the view is answered before the fleet's calls
        queued ahead of it.
        """
        people = self.store.interactive()
        answered: list[str] = []

        def note(d: Deferred[Any], name: str) -> Deferred[Any]:
            def noted(result: Any) -> Any:
                answered.append(name)
                return result

            return d.addCallback(noted)

        fleet = [note(self.store.lastAuditId(), "fleet") for _ in range(3)]
        query = note(people.listAccounts(), "person")
        self.pool.runAll()
        self.assertEqual(self.successResultOf(query), [])
        for d in fleet:
            self.successResultOf(d)
        self.assertEqual(answered, ["person", "fleet", "fleet", "fleet"])

    def test_synchronousStoreIsItsOwnView(self) -> None:
        """With a runner that queues nothing there is nothing to overtake: the same store."""
        store = openStoreBlocking(self.path, synchronousRunner)
        self.addCleanup(store.close)
        self.assertIs(store.interactive(), store)


class TwoLaneSynchronousRunner:
    """A runner with the interactive lane (C{first}), both inline: its store makes views."""

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return synchronousRunner(f, *args)

    first = staticmethod(synchronousRunner)


def backendPid(store: SQLStore) -> int:
    """The PostgreSQL server process serving C{store}'s next call."""
    return int(store._read("SELECT pg_backend_pid() AS pid")[0]["pid"])


@bothBackends
class InteractiveViewConnectionTests(StoreTestCase):
    """A store and its interactive views are one connection: closing the store closes it."""

    def test_closingTheStoreClosesItsViews(self) -> None:
        """
        After the store is closed, a call through a view it made fails, as one through
        the store does: a PostgreSQL view does not take the closed connection for a
        dropped one and open another, which nothing would ever close.
        """
        store = self.successResultOf(openStore(self.url, TwoLaneSynchronousRunner()))
        view = store.interactive()
        self.assertIsNot(view, store)
        self.successResultOf(view.addAccount("ada", [newPublicKey()], False, T0))
        self.successResultOf(store.close())
        self.failureResultOf(view.listAccounts())
        self.failureResultOf(store.listAccounts())


@bothBackends
class ContactTests(StoreTestCase):
    """recordContact: the key decides the device; names are only requests."""

    def test_unknownKeyBecomesRequest(self) -> None:
        """An unknown key yields a 'new' request, audited once as device.pending."""
        publicKey = newPublicKey()
        first = self.contact("kiln7", publicKey, T0, serial="SN1")
        self.assertIsInstance(first, EnrollmentRequest)
        self.assertEqual(
            (first.requestedName, first.kind, first.serial, first.firstSeen, first.lastSeen),
            ("kiln7", "new", "SN1", T0, T0),
        )
        again = self.contact("kiln7", publicKey, T0 + 10, serial="SN1")
        self.assertEqual((again.firstSeen, again.lastSeen), (T0, T0 + 10))
        self.assertIsNone(self.successResultOf(self.store.deviceByName("kiln7")))
        events = self.successResultOf(self.store.auditSince(0))
        self.assertEqual([(e.event, e.device) for e in events], [("device.pending", "kiln7")])
        self.assertEqual(events[0].detail["fingerprint"], fingerprint(publicKey))

    def test_approvedKeyRoutesByKeyOnly(self) -> None:
        """A's key asking for name b gets device a (last seen updated), never b."""
        keyA, _ = self.enroll("a", T0)
        self.enroll("b", T0)
        result = self.contact("b", keyA, T0 + 60)
        self.assertIsInstance(result, Device)
        self.assertEqual((result.name, result.state, result.lastSeen), ("a", "approved", T0 + 60))
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])

    def test_revokedKeyReturnsRevokedDevice(self) -> None:
        """A revoked device's key gets the revoked record back, not a fresh request."""
        key, _ = self.enroll("kiln7", T0)
        self.successResultOf(self.store.revokeDevice("kiln7", "admin", T0 + 1))
        result = self.contact("other", key, T0 + 2)
        self.assertIsInstance(result, Device)
        self.assertEqual((result.name, result.state), ("kiln7", "revoked"))
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])

    def test_pendingNeverShadowsApprovedName(self) -> None:
        """A new key asking for an approved name is a 'rekey' request; the device keeps its key."""
        key, device = self.enroll("kiln7", T0)
        request = self.contact("kiln7", newPublicKey(), T0 + 5)
        self.assertIsInstance(request, EnrollmentRequest)
        self.assertEqual(request.kind, "rekey")
        self.assertEqual(self.successResultOf(self.store.deviceByName("kiln7")), device)
        byKey = self.successResultOf(self.store.deviceForKey(fingerprint(key)))
        self.assertEqual(byKey, device)
        self.assertIsNone(
            self.successResultOf(self.store.deviceForKey(request.fingerprint)),
        )

    def test_invalidNameRefused(self) -> None:
        """An unknown key asking for a malformed name is refused and nothing is stored."""
        publicKey = newPublicKey()
        d = self.store.recordContact(
            "Bad_Name", publicKey, fingerprint(publicKey), None, "192.0.2.1:1", T0
        )
        self.failureResultOf(d, InvalidName)
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])

    def test_mismatchedFingerprintRefused(self) -> None:
        """A fingerprint that is not the key's own is refused, so a key is never mis-bound."""
        d = self.store.recordContact(
            "kiln7", newPublicKey(), fingerprint(newPublicKey()), None, "192.0.2.1:1", T0
        )
        self.failureResultOf(d, StoreError)

    def test_touchDevice(self) -> None:
        """touchDevice sets last seen; an unknown name fails with UnknownDevice."""
        self.enroll("kiln7", T0)
        self.successResultOf(self.store.touchDevice("kiln7", T0 + 99))
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(device and device.lastSeen, T0 + 99)
        self.failureResultOf(self.store.touchDevice("nope", T0), UnknownDevice)


@bothBackends
class ApprovalTests(StoreTestCase):
    """approveDevice and revokeDevice."""

    def test_approveNew(self) -> None:
        """Approving a 'new' request creates an approved device bound to that key."""
        publicKey = newPublicKey()
        self.contact("kiln7", publicKey, T0, serial="SN1")
        device = self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 1))
        self.assertEqual(
            device,
            Device(
                name="kiln7",
                state="approved",
                fingerprint=fingerprint(publicKey),
                publicKey=publicKey,
                serial="SN1",
                approvedAt=T0 + 1,
                approvedBy="root",
                lastSeen=T0,
                createdAt=T0 + 1,
            ),
        )
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        approved = self.successResultOf(self.store.auditSince(0))[-1]
        self.assertEqual(
            (approved.event, approved.actor, approved.device), ("device.approved", "root", "kiln7")
        )
        self.assertEqual(approved.detail["kind"], "new")

    def test_approveRekey(self) -> None:
        """
        Approving a 'rekey' request by its key replaces the key: the new key routes, the old
        does not.
        """
        oldKey, _ = self.enroll("kiln7", T0)
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 5)
        device = self.successResultOf(
            self.store.approveDevice("kiln7", "root", T0 + 6, fingerprint=fingerprint(newKey))
        )
        self.assertEqual((device.fingerprint, device.createdAt), (fingerprint(newKey), T0))
        self.assertIsNone(self.successResultOf(self.store.deviceForKey(fingerprint(oldKey))))
        event = self.successResultOf(self.store.auditSince(0))[-1]
        self.assertEqual(event.detail["previousFingerprint"], fingerprint(oldKey))
        # The old key is now just an unknown key: it may only ask, as a rekey request.
        self.assertEqual(self.contact("kiln7", oldKey, T0 + 7).kind, "rekey")

    def test_approveRevokedReinstates(self) -> None:
        """With nothing pending, approving a revoked device re-approves its known key."""
        key, _ = self.enroll("kiln7", T0)
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 1))
        device = self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 2))
        self.assertEqual((device.state, device.fingerprint), ("approved", fingerprint(key)))

    def test_approveAmbiguous(self) -> None:
        """Two requests for one name need a fingerprint; with one, only that request is approved."""
        first, second = newPublicKey(), newPublicKey()
        self.contact("kiln7", first, T0)
        self.contact("kiln7", second, T0 + 1)
        error = self.failureResultOf(
            self.store.approveDevice("kiln7", "root", T0 + 2), AmbiguousRequest
        ).value
        assert isinstance(error, AmbiguousRequest)
        self.assertEqual(set(error.fingerprints), {fingerprint(first), fingerprint(second)})
        self.assertIn(fingerprint(first), str(error))
        self.assertIsNone(self.successResultOf(self.store.deviceByName("kiln7")))

        device = self.successResultOf(
            self.store.approveDevice("kiln7", "root", T0 + 3, fingerprint=fingerprint(second))
        )
        self.assertEqual(device.fingerprint, fingerprint(second))
        remaining = self.successResultOf(self.store.listEnrollmentRequests())
        self.assertEqual([r.fingerprint for r in remaining], [fingerprint(first)])

    def test_approveUnknown(self) -> None:
        """No request and no device: UnknownDevice; a wrong fingerprint also: UnknownDevice."""
        self.failureResultOf(self.store.approveDevice("ghost", "root", T0), UnknownDevice)
        self.contact("kiln7", newPublicKey(), T0)
        self.failureResultOf(
            self.store.approveDevice("kiln7", "root", T0, fingerprint=fingerprint(newPublicKey())),
            UnknownDevice,
        )

    def test_approveAlreadyApproved(self) -> None:
        """Approving an approved device with nothing pending says so instead of pretending."""
        self.enroll("kiln7", T0)
        self.failureResultOf(self.store.approveDevice("kiln7", "root", T0), AlreadyExists)

    def test_revoke(self) -> None:
        """Revoking marks the device revoked and audits it; an unknown name is UnknownDevice."""
        self.enroll("kiln7", T0)
        device = self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 1))
        self.assertEqual(device.state, "revoked")
        event = self.successResultOf(self.store.auditSince(0))[-1]
        self.assertEqual(
            (event.event, event.device, event.actor), ("device.revoked", "kiln7", "root")
        )
        self.failureResultOf(self.store.revokeDevice("ghost", "root", T0), UnknownDevice)


@bothBackends
class AccountTests(StoreTestCase):
    """Accounts and their keys."""

    def test_accountForKey(self) -> None:
        """Every key of an account finds it; an unknown key finds nothing."""
        first, second = newPublicKey(), newPublicKey()
        alice = self.successResultOf(self.store.addAccount("alice", [first], False, T0))
        self.successResultOf(self.store.addAccountKey("alice", second, T0))
        self.assertEqual(alice, Account(alice.id, "alice", False))
        for key in (first, second):
            self.assertEqual(
                self.successResultOf(self.store.accountForKey(fingerprint(key))), alice
            )
        self.assertIsNone(
            self.successResultOf(self.store.accountForKey(fingerprint(newPublicKey())))
        )

    def test_duplicates(self) -> None:
        """A taken name or key is AlreadyExists; nothing half-created remains."""
        key = newPublicKey()
        self.successResultOf(self.store.addAccount("alice", [key], False, T0))
        self.failureResultOf(
            self.store.addAccount("alice", [newPublicKey()], False, T0), AlreadyExists
        )
        self.failureResultOf(self.store.addAccount("bob", [key], False, T0), AlreadyExists)
        self.assertEqual(
            [a.name for a in self.successResultOf(self.store.listAccounts())], ["alice"]
        )

    def test_badInput(self) -> None:
        """A malformed key is a StoreError; a key for an unknown account is UnknownAccount."""
        self.failureResultOf(self.store.addAccount("bob", ["not a key"], False, T0), StoreError)
        self.failureResultOf(self.store.addAccount("Bad Name", [], False, T0), InvalidName)
        self.failureResultOf(self.store.addAccountKey("nobody", newPublicKey(), T0), UnknownAccount)


@bothBackends
class GrantTests(StoreTestCase):
    """mayReach: admins reach all, operators what is granted and unexpired."""

    def setUp(self) -> None:
        super().setUp()
        self.enroll("kiln7", T0)
        self.enroll("oven2", T0)
        self.admin = self.successResultOf(self.store.addAccount("root", [newPublicKey()], True, T0))
        self.alice = self.successResultOf(
            self.store.addAccount("alice", [newPublicKey()], False, T0)
        )

    def reach(self, account: Account, name: str, now: float = T0) -> bool:
        return self.successResultOf(self.store.mayReach(account, name, now))

    def test_admin(self) -> None:
        """An admin reaches every device without any grant."""
        self.assertTrue(self.reach(self.admin, "kiln7"))
        self.assertTrue(self.reach(self.admin, "oven2"))

    def test_grantedAndUngranted(self) -> None:
        """An operator reaches a granted device only, and not after ungrant."""
        self.assertFalse(self.reach(self.alice, "kiln7"))
        self.successResultOf(self.store.grant("alice", "kiln7", "root", T0))
        self.assertTrue(self.reach(self.alice, "kiln7"))
        self.assertFalse(self.reach(self.alice, "oven2"))
        self.assertTrue(self.successResultOf(self.store.ungrant("alice", "kiln7", "root", T0)))
        self.assertFalse(self.reach(self.alice, "kiln7"))
        self.assertFalse(self.successResultOf(self.store.ungrant("alice", "kiln7", "root", T0)))

    def test_expired(self) -> None:
        """A grant with an expiry works before it and not from it on; re-granting replaces it."""
        self.successResultOf(self.store.grant("alice", "kiln7", "root", T0, expiresAt=T0 + 60))
        self.assertTrue(self.reach(self.alice, "kiln7", T0 + 59))
        self.assertFalse(self.reach(self.alice, "kiln7", T0 + 60))
        self.successResultOf(self.store.grant("alice", "kiln7", "root", T0 + 61))
        self.assertTrue(self.reach(self.alice, "kiln7", T0 + 10_000))

    def test_unknowns(self) -> None:
        """Granting to an unknown account or device fails clearly."""
        self.failureResultOf(self.store.grant("nobody", "kiln7", "root", T0), UnknownAccount)
        self.failureResultOf(self.store.grant("alice", "ghost", "root", T0), UnknownDevice)


@bothBackends
class AuditTests(StoreTestCase):
    """The audit log as an ordered, resumable change feed."""

    def test_auditSinceOrderAndLimit(self) -> None:
        """Events come back oldest first after the given id, at most `limit` at a time."""
        written = [
            self.successResultOf(self.store.audit(f"e{i}", "me", None, {"i": i}, T0 + i))
            for i in range(5)
        ]
        self.assertEqual(self.successResultOf(self.store.lastAuditId()), written[-1].id)
        page = self.successResultOf(self.store.auditSince(written[0].id, limit=2))
        self.assertEqual(page, written[1:3])
        rest = self.successResultOf(self.store.auditSince(page[-1].id))
        self.assertEqual([e.event for e in rest], ["e3", "e4"])
        self.assertEqual(rest[0].detail, {"i": 3})
        self.assertEqual(self.successResultOf(self.store.auditSince(written[-1].id)), [])

    def test_auditFeedKinds(self) -> None:
        """
        The feed read for some kinds hands back those only, and reads to the newest row,
        whatever its kind: the next read starts after the rows passed over.
        """
        start = self.successResultOf(self.store.lastAuditId())
        for i, event in enumerate(["session.started", "device.revoked", "session.ended"] * 2):
            self.successResultOf(self.store.audit(event, "me", "kiln7", {"i": i}, T0 + i))
        newest = self.successResultOf(self.store.lastAuditId())
        page = self.successResultOf(self.store.auditFeed(start, {"device.revoked", "x"}))
        self.assertEqual(
            [(e.event, e.detail) for e in page.events],
            [
                ("device.revoked", {"i": 1}),
                ("device.revoked", {"i": 4}),
            ],
        )
        self.assertEqual(page.readTo, newest)
        self.assertEqual(
            self.successResultOf(self.store.auditFeed(newest, {"device.revoked"})),
            AuditPage((), newest),
        )

    def test_auditFeedPages(self) -> None:
        """A full page reads to its last event; the pages together hold every event once."""
        start = self.successResultOf(self.store.lastAuditId())
        wanted = []
        for i in range(5):
            self.successResultOf(self.store.audit("session.ended", "me", None, {}, T0 + i))
            wanted.append(self.successResultOf(self.store.audit("e", "me", None, {"i": i}, T0)))
        self.successResultOf(self.store.audit("session.ended", "me", None, {}, T0))
        newest = self.successResultOf(self.store.lastAuditId())
        first = self.successResultOf(self.store.auditFeed(start, ["e"], limit=2))
        self.assertEqual(first, AuditPage(tuple(wanted[:2]), wanted[1].id))
        second = self.successResultOf(self.store.auditFeed(first.readTo, ["e"], limit=2))
        self.assertEqual(second, AuditPage(tuple(wanted[2:4]), wanted[3].id))
        last = self.successResultOf(self.store.auditFeed(second.readTo, ["e"], limit=2))
        self.assertEqual(last, AuditPage(tuple(wanted[4:]), newest))

    def test_auditFeedOfNoKinds(self) -> None:
        """Asked for no kind at all, the read finds nothing and still moves to the newest."""
        self.successResultOf(self.store.audit("e", "me", None, {}, T0))
        newest = self.successResultOf(self.store.lastAuditId())
        self.assertEqual(self.successResultOf(self.store.auditFeed(0, [])), AuditPage((), newest))

    def test_auditWritesTheDetailGiven(self) -> None:
        """
        The stored event carries the caller's detail as it is, not a copy decoded from the
        row just encoded; the row reads back equal to it.
        """
        detail = {"session": "abcdefghij", "id": "abcdefghij", "started_at": T0, "n": [1, 2]}
        written = self.successResultOf(
            self.store.audit("session.started", "me", "kiln7", detail, T0)
        )
        self.assertIs(written.detail, detail)
        (read,) = self.successResultOf(self.store.auditSince(written.id - 1))
        self.assertEqual(read, written)

    def test_otherConnectionSeesChanges(self) -> None:
        """A change made through a second connection (the CLI, a node) shows in this feed."""
        start = self.successResultOf(self.store.lastAuditId())
        other = self.openAnother()
        self.enroll("kiln7", T0)
        self.successResultOf(other.revokeDevice("kiln7", "cli", T0 + 1))
        events = self.successResultOf(self.store.auditSince(start))
        self.assertEqual(events[-1].event, "device.revoked")


@pytest.mark.usefixtures("postgresqlForClass")
class PostgreSQLConnectionTests(StoreTestCase):
    """What only the PostgreSQL store needs: surviving a dropped server connection."""

    backend = "postgresql"

    def test_reconnectsAfterTheServerDroppedIt(self) -> None:
        """
        A connection the server dropped fails the one call that finds it, with the driver's
        error (never a half-done write); the next call reconnects and sees everything.
        """
        import psycopg

        assert isinstance(self.store, PostgreSQLStore)
        self.successResultOf(self.store.addAccount("alice", [newPublicKey()], False, T0))
        pid = backendPid(self.store)
        self.rawQuery("SELECT pg_terminate_backend(?)", (pid,))
        self.failureResultOf(self.store.listAccounts(), psycopg.OperationalError)
        accounts = self.successResultOf(self.store.listAccounts())
        self.assertEqual([a.name for a in accounts], ["alice"])
        self.successResultOf(self.store.addAccount("bob", [newPublicKey()], False, T0))

    def test_viewsReconnectWithTheStore(self) -> None:
        """
        After the server dropped the connection, the store and its interactive views go
        on over one new connection, whichever of them found the drop: not one each (a
        node's three views would hold four connections, and the views' would outlive
        the store's close).
        """
        import psycopg

        store = self.successResultOf(openStore(self.url, TwoLaneSynchronousRunner()))
        self.addCleanup(store.close)
        views = [store.interactive() for _ in range(3)]
        self.assertEqual({backendPid(s) for s in [store, *views]}, {backendPid(store)})
        self.rawQuery("SELECT pg_terminate_backend(?)", (backendPid(store),))
        self.failureResultOf(views[0].listAccounts(), psycopg.OperationalError)
        self.successResultOf(views[0].listAccounts())
        self.assertEqual({backendPid(s) for s in [store, *views]}, {backendPid(store)})
