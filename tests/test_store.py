"""Tests for groundcontrol.store: schema migration, device identity, enrollment, grants, audit."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    Device,
    EnrollmentRequest,
    InvalidName,
    IStore,
    SQLiteStore,
    StoreError,
    UnknownAccount,
    UnknownDevice,
    migrate,
    openSQLiteStore,
    schemaUpgraders,
    synchronousRunner,
    threadRunner,
)
from groundcontrol.store._sqlite import connect

T0 = 1_700_000_000.0


def newPublicKey() -> str:
    """A fresh ed25519 public key as an OpenSSH one-line string."""
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    return key.public().toString("OPENSSH").decode("ascii")


class StoreTestCase(SynchronousTestCase):
    """Opens a migrated store on a temporary SQLite file with the synchronous runner."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.path = str(Path(directory) / "store.sqlite3")
        self.store = self.successResultOf(openSQLiteStore(self.path, synchronousRunner))
        self.addCleanup(self.store.close)

    def contact(self, name: str, publicKey: str, now: float = T0, serial: str | None = None) -> Any:
        """Record an agent's contact and return the store's answer."""
        return self.successResultOf(
            self.store.recordContact(
                name, publicKey, fingerprint(publicKey), serial, "192.0.2.1:5000", now
            )
        )

    def enroll(self, name: str, now: float = T0) -> tuple[str, Device]:
        """Create an approved device and return its public key and record."""
        publicKey = newPublicKey()
        self.contact(name, publicKey, now)
        device = self.successResultOf(self.store.approveDevice(name, "admin", now))
        return publicKey, device

    def failureOf(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        """Return the exception a failed Deferred carries, checking its type."""
        return self.failureResultOf(d, *errors).value


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


class MigrationTests(StoreTestCase):
    """The schema is created from the shipped files and re-opening is harmless."""

    def test_interface(self) -> None:
        """SQLiteStore provides every IStore method."""
        self.assertIsInstance(self.store, SQLiteStore)
        self.assertTrue(verifyObject(IStore, self.store))

    def test_fromEmpty(self) -> None:
        """A new file ends at the newest version with every table of the schema."""
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        version = connection.execute("SELECT version FROM version").fetchall()
        self.assertEqual(version, [(schemaUpgraders()[-1][0],)])
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        for table in [
            "accounts",
            "account_keys",
            "devices",
            "enrollment_requests",
            "grants",
            "audit",
        ]:
            self.assertIn(table, tables)
        self.assertEqual(
            connection.execute("PRAGMA journal_mode").fetchone()[0].lower(),
            "wal",
        )

    def test_reopenIsIdempotent(self) -> None:
        """Re-opening keeps data and the single version row; migrate() again is a no-op."""
        self.successResultOf(self.store.addAccount("alice", [newPublicKey()], False, T0))
        again = self.successResultOf(openSQLiteStore(self.path, synchronousRunner))
        self.addCleanup(again.close)
        self.assertEqual([a.name for a in self.successResultOf(again.listAccounts())], ["alice"])
        connection = connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(migrate(connection), schemaUpgraders()[-1][0])
        self.assertEqual(len(connection.execute("SELECT * FROM version").fetchall()), 1)

    def test_newerDatabaseRefused(self) -> None:
        """A database written by a newer groundcontrol is refused rather than misread."""
        connection = sqlite3.connect(self.path)
        connection.execute("UPDATE version SET version = 999")
        connection.commit()
        connection.close()
        error = self.failureOf(openSQLiteStore(self.path, synchronousRunner), StoreError)
        self.assertIn("newer", str(error))


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

        class FakePool:
            def __init__(self, **kwargs: Any) -> None:
                events.append(("pool", kwargs))

            def start(self) -> None:
                events.append("start")

            def stop(self) -> None:
                events.append("stop")

            def callInThreadWithCallback(
                self, onResult: Callable[..., None], f: Callable[..., Any], *a: Any, **kw: Any
            ) -> None:
                events.append("inThread")
                onResult(True, f(*a, **kw))

        class FakeReactor:
            def callWhenRunning(self, f: Callable[[], None]) -> None:
                events.append(("whenRunning", f.__name__))

            def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
                events.append(("trigger", phase, event, f.__name__))

            def callFromThread(self, f: Callable[..., None], *a: Any) -> None:
                events.append("fromThread")
                f(*a)

        run = threadRunner(FakeReactor(), poolFactory=FakePool)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(run(pow, 2, 10)), 1024)
        self.assertEqual(
            events,
            [
                ("pool", {"minthreads": 1, "maxthreads": 1, "name": "groundcontrol-store"}),
                ("whenRunning", "start"),
                ("trigger", "during", "shutdown", "stop"),
                "inThread",
                "fromThread",
            ],
        )


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
        """Approving a 'rekey' request replaces the key: the new key routes, the old does not."""
        oldKey, _ = self.enroll("kiln7", T0)
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 5)
        device = self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 6))
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

    def test_otherConnectionSeesChanges(self) -> None:
        """A change made through a second connection (the CLI) shows up in this store's feed."""
        start = self.successResultOf(self.store.lastAuditId())
        other = self.successResultOf(openSQLiteStore(self.path, synchronousRunner))
        self.addCleanup(other.close)
        self.enroll("kiln7", T0)
        self.successResultOf(other.revokeDevice("kiln7", "cli", T0 + 1))
        events = self.successResultOf(self.store.auditSince(start))
        self.assertEqual(events[-1].event, "device.revoked")
