"""
The upgrade path of the store: stores written by older releases, opened by today's code.

The fixtures in C{tests/fixtures/} were written by the releases themselves (their CLI,
server and agents, over real links), not rebuilt from today's schema files, so a change
to an old upgrader or a new reading of old rows shows here.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from groundcontrol.cli import main
from groundcontrol.datadir import DataDir
from groundcontrol.recording import RecordingPolicy, parseCast
from groundcontrol.sessions import pastSession, pastSessions, recordingFile
from groundcontrol.store import (
    Account,
    SQLStore,
    StoreError,
    migrateStore,
    openStore,
    schemaUpgraders,
    synchronousRunner,
)
from groundcontrol.tap import Options
from groundcontrol.tap import openStore as openServerStore

FIXTURES = Path(__file__).parent / "fixtures"

#: After every row of the fixtures was written, before the lease, the grant to bob on dev1,
#: the tokens and dev2's pairing code run out.
NOW = 1_795_772_500.0

# Devices and keys as the fixture of commit f8099d5 holds them.
DEV1 = "SHA256:wHmMVW8XJ70rKR04aEXd2QphRJFo2XibCNlpAWCgYk4"
DEV2 = "SHA256:cm4BJRzXoycOobtvLAiWY4qS7NUZZXN4MD/i18x6EVE"
DEV3 = "SHA256:w7u9agdXGqDdX8siZQzi7fUfPKn/qzOsDbHX7jRPWGw"
DEV4 = "SHA256:HSp/0daRhzSXBRvjZThKot3iFIH4BQOgzs0TVIa26Ns"
DEV5 = "SHA256:J+I6/yI/uXgG1pvjTDIk7hrsl5QCbZ3dT5Nbw7ABRI0"
ALICE = "SHA256:F1YDMaFCoXf3fqGCIr+AFwM69vDb3b7Vc1Eo/e9HrtA"
DEV2_CLAIM_CODE_HASH = "42eacf3e6615214ac5de1214d9fbcd472e341c8c8b6c6f5d700d6396d2f4117b"
UNUSED_TOKEN_HASH = "337609ddd2cda9361784d04990800bd78e93cd379ed38a981a4ba96944ec0a6f"


def loadFixture(name: str, directory: str) -> str:
    """Write fixture C{name} (an SQL dump) into a new SQLite file in C{directory}."""
    path = str(Path(directory) / "groundcontrol.sqlite3")
    connection = sqlite3.connect(path)
    try:
        connection.executescript((FIXTURES / name).read_text(encoding="utf-8"))
    finally:
        connection.close()
    return path


def rawVersion(path: str) -> int:
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("SELECT version FROM version").fetchone()[0])
    finally:
        connection.close()


class OldStoreTestCase(SynchronousTestCase):
    """Loads one old release's store into a temporary file; C{open} migrates it."""

    fixture = "store-schema4-f8099d5.sql"
    fixtureVersion = 4

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.directory = Path(directory)
        self.path = loadFixture(self.fixture, directory)

    def open(self) -> SQLStore:
        store = self.successResultOf(openStore(self.path, synchronousRunner))
        self.addCleanup(store.close)
        return store

    def result(self, d: Any) -> Any:
        return self.successResultOf(d)

    def account(self, store: SQLStore, name: str) -> Account:
        (account,) = [a for a in self.result(store.listAccounts()) if a.name == name]
        return account


class SchemaFourTests(OldStoreTestCase):
    """
    The store of commit f8099d5 (schema 4) opens with today's code: every upgrader since
    runs, and every kind of row it held reads back as it was and still works.
    """

    def test_migratesToNewest(self) -> None:
        """The fixture is at its old version; opening it brings it to the newest one."""
        self.assertEqual(rawVersion(self.path), self.fixtureVersion)
        self.open()
        self.assertEqual(rawVersion(self.path), schemaUpgraders()[-1][0])

    def test_devices(self) -> None:
        """Approved, revoked, token-enrolled and claimed devices keep every field."""
        store = self.open()
        devices = {d.name: d for d in self.result(store.listDevices())}
        self.assertEqual(sorted(devices), ["dev1", "dev3", "dev4", "dev5"])
        self.assertEqual(
            {n: (d.state, d.fingerprint, d.approvedBy) for n, d in devices.items()},
            {
                "dev1": ("approved", DEV1, "cli:root"),
                "dev3": ("revoked", DEV3, "cli:root"),
                "dev4": ("approved", DEV4, "token:1"),
                "dev5": ("approved", DEV5, "claim:bob"),
            },
        )
        for device in devices.values():
            self.assertEqual(device.serial, "3d1219c7c4c5404aaa1f6d2a48adfda4")
            self.assertTrue(device.publicKey.startswith("ssh-ed25519 "))
            self.assertIsNotNone(device.lastSeen)
        self.assertEqual(devices["dev1"].tags, ("admin-tag",))
        self.assertEqual(devices["dev1"].reportedTags, ("lab", "site-a"))
        self.assertEqual(devices["dev1"].groups, ("g1",))
        self.assertEqual(devices["dev4"].tags, ("lab",))
        self.assertEqual(devices["dev4"].groups, ("g1", "g2"))
        self.assertEqual(devices["dev1"].certificateExpiresAt, 1_798_364_425.0)
        self.assertIsNone(devices["dev3"].certificateExpiresAt)
        self.assertEqual(self.result(store.deviceForKey(DEV4)).name, "dev4")

    def test_leaseAndClaims(self) -> None:
        """bob's claim of dev5 still owns it until its lease ends, then it lapses."""
        store = self.open()
        dev5 = self.result(store.deviceByName("dev5"))
        self.assertEqual((dev5.owner, dev5.leaseUntil), ("bob", 1_795_779_626.741006))
        self.assertTrue(self.result(store.mayReach(self.account(store, "bob"), "dev5", NOW)))
        self.assertFalse(self.result(store.mayReach(self.account(store, "carol"), "dev5", NOW)))
        lapsed = self.result(store.lapsedLeases(1_795_779_627.0))
        self.assertEqual([d.name for d in lapsed], ["dev5"])

    def test_pendingRequestAndItsPairingCode(self) -> None:
        """dev2's pending request survives, and the code it showed can still claim it."""
        store = self.open()
        (request,) = self.result(store.listEnrollmentRequests())
        self.assertEqual(
            (request.requestedName, request.fingerprint, request.kind, request.source),
            ("dev2", DEV2, "new", "127.0.0.1:45320"),
        )
        self.assertEqual(self.result(store.countPendingFrom("127.0.0.1", NOW - 3600)), 1)
        device = self.result(
            store.claimDevice(DEV2_CLAIM_CODE_HASH, self.account(store, "carol"), NOW + 3600, NOW)
        )
        self.assertEqual((device.name, device.owner, device.state), ("dev2", "carol", "approved"))

    def test_accountsAndKeys(self) -> None:
        """Accounts keep their role, and their keys still log them in."""
        store = self.open()
        accounts = {a.name: a.isAdmin for a in self.result(store.listAccounts())}
        self.assertEqual(accounts, {"alice": True, "bob": False, "carol": False})
        self.assertEqual(self.result(store.accountForKey(ALICE)).name, "alice")

    def test_grants(self) -> None:
        """Grants keep selector, login user (--as), expiry (--for) and agent forwarding."""
        store = self.open()
        grants = {(g.account, g.selector): g for g in self.result(store.listGrants())}
        self.assertEqual(
            {k: (g.loginUser, g.expiresAt, g.agentForwarding) for k, g in grants.items()},
            {
                ("bob", "device:dev1"): ("nobody", 1_795_801_228.568866, False),
                ("bob", "device:dev4"): (None, None, False),
                ("carol", "tag:lab"): (None, None, True),
                ("carol", "group:g1"): (None, 1_798_364_429.6227086, False),
            },
        )
        self.assertEqual(
            self.result(store.loginUserFor(self.account(store, "bob"), "dev1", NOW)), "nobody"
        )
        self.assertTrue(self.result(store.mayReach(self.account(store, "bob"), "dev1", NOW)))
        self.assertFalse(
            self.result(store.mayReach(self.account(store, "bob"), "dev1", 1_795_801_229.0))
        )
        # carol reaches dev1 by its group and dev4 by its admin tag; both by the tag grant
        # that allows agent forwarding (dev1's "lab" is the one its agent reported).
        for device in ["dev1", "dev4"]:
            self.assertTrue(
                self.result(store.mayReach(self.account(store, "carol"), device, NOW)), device
            )
            self.assertTrue(
                self.result(store.agentForwardingAllowed(self.account(store, "carol"), device, NOW))
            )
        self.assertFalse(self.result(store.mayReach(self.account(store, "carol"), "dev3", NOW)))

    def test_tokens(self) -> None:
        """Tokens keep their uses; the unused one still enrolls a device."""
        store = self.open()
        tokens = {t.id: (t.uses, t.usesLeft, t.createdBy) for t in self.result(store.listTokens())}
        self.assertEqual(tokens, {1: (3, 2, "cli:root"), 2: (1, 1, "cli:root")})
        publicKey = keys.Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH")
        device = self.result(
            store.redeemToken(
                UNUSED_TOKEN_HASH,
                fingerprint(publicKey),
                publicKey.decode("ascii"),
                "dev6",
                None,
                "192.0.2.9:1",
                NOW,
            )
        )
        self.assertEqual((device.name, device.approvedBy), ("dev6", "token:2"))

    def test_certificates(self) -> None:
        """Issued certificates keep their state: dev3's was revoked with the device."""
        store = self.open()
        (dev3,) = self.result(store.listCertificates("dev3"))
        self.assertEqual(dev3.fingerprint, DEV3)
        self.assertEqual(self.result(store.certificateState(dev3.serialNumber, NOW)), "revoked")
        (dev1,) = self.result(store.listCertificates("dev1"))
        self.assertEqual(self.result(store.certificateState(dev1.serialNumber, NOW)), "valid")

    def test_lastLinkNotRecorded(self) -> None:
        """A device that has not linked since the upgrade says so, rather than guessing."""
        store = self.open()
        last = self.result(store.lastLink("dev1"))
        self.assertIsNone(last.auth)
        self.assertIsNone(last.certificate)

    def test_audit(self) -> None:
        """The whole audit log reads back, and new events continue its ids."""
        store = self.open()
        events = self.result(store.auditSince(0, limit=1000))
        self.assertEqual([e.id for e in events], list(range(1, 59)))
        self.assertEqual(events[0].event, "account.added")
        self.assertEqual(events[0].detail["account"], "alice")
        self.result(store.audit("test.event", "test", None, {}, NOW))
        self.assertEqual(self.result(store.lastAuditId()), 59)

    def test_sessionsAndRecording(self) -> None:
        """
        The sessions in the old log are indexed (schema 5's upgrader), read as past
        sessions, and the recorded one's file, where the old release wrote it, parses.
        """
        store = self.open()
        sessions = self.result(pastSessions(store, 0))
        self.assertEqual(len(sessions), 7)
        self.assertEqual({s["state"] for s in sessions}, {"ended"})
        recorded = self.result(pastSession(store, "pz3k9jhrj9"))
        self.assertEqual(
            (recorded["account"], recorded["device"], recorded["pty"], recorded["exit_status"]),
            ("alice", "dev1", True, 0),
        )
        self.assertEqual(recorded["recording"], "2026/11/27/pz3k9jhrj9.cast")
        recordings = self.directory / "recordings"
        target = recordings / "2026" / "11" / "27" / "pz3k9jhrj9.cast"
        target.parent.mkdir(parents=True)
        shutil.copy(FIXTURES / "recording-f8099d5-pz3k9jhrj9.cast", target)
        path = recordingFile(RecordingPolicy(directory=recordings), recorded["recording"])
        assert path is not None
        cast = parseCast(path.read_bytes())
        self.assertEqual(cast.events, [(0.010303, "o", "pty-from-f8099d5\r\n")])

    def test_nothingLost(self) -> None:
        """Every row of every old table is still there, column for column."""
        before = _rows(self.path)
        self.open()
        after = _rows(self.path)
        for table, rows in before.items():
            if table == "version":
                continue
            kept = [{k: row[k] for k in rows[0]} for row in after[table]] if rows else []
            self.assertEqual(sorted(map(repr, kept)), sorted(map(repr, rows)), table)


class SchemaFiveTests(OldStoreTestCase):
    """The store of commit cf11ebb (schema 5, with its own session index) opens too."""

    fixture = "store-schema5-cf11ebb.sql"
    fixtureVersion = 5

    def test_migratesKeepingEverything(self) -> None:
        """Schema 6 is added; every old row, the session index's included, is kept."""
        self.assertEqual(rawVersion(self.path), 5)
        before = _rows(self.path)
        store = self.open()
        self.assertEqual(rawVersion(self.path), schemaUpgraders()[-1][0])
        after = _rows(self.path)
        for table, rows in before.items():
            if table != "version":
                kept = [{k: row[k] for k in rows[0]} for row in after[table]] if rows else []
                self.assertEqual(sorted(map(repr, kept)), sorted(map(repr, rows)), table)
        self.assertEqual(len(before["session_index"]), 7)
        devices = {d.name: d.state for d in self.result(store.listDevices())}
        self.assertEqual(
            devices, {"dev1": "approved", "dev3": "revoked", "dev4": "approved", "dev5": "approved"}
        )
        self.assertEqual(len(self.result(pastSessions(store, 0))), 7)


class NewerStoreTests(OldStoreTestCase):
    """A store migrated by newer code is refused by older code, and left as it was."""

    def test_refusedAndUntouched(self) -> None:
        """
        What an older groundcontrol meets after a newer one migrated its store: a version
        above the newest it knows. It refuses to open or migrate it, says to upgrade, and
        changes nothing (not even the version table it creates on a fresh store).
        """
        latest = schemaUpgraders()[-1][0]
        connection = sqlite3.connect(self.path)
        connection.execute("UPDATE version SET version = ?", (latest + 1,))
        connection.commit()
        connection.close()
        before = _rows(self.path)
        error = self.failureResultOf(openStore(self.path, synchronousRunner), StoreError).value
        self.assertEqual(
            str(error),
            f"database schema version {latest + 1} is newer than this groundcontrol "
            f"(knows up to {latest}); upgrade groundcontrol",
        )
        self.assertRaises(StoreError, migrateStore, self.path)
        self.assertEqual(_rows(self.path), before)
        self.assertEqual(rawVersion(self.path), latest + 1)


class NewerStoreProgramsTests(SynchronousTestCase):
    """
    The programs an admin runs say the same about a newer store: the CLI in one line and
    exit status 1, the server by refusing to start.
    """

    def setUp(self) -> None:
        self.dataDir = DataDir(Path(self.mktemp()))
        self.dataDir.ensureInitialised()
        self.path = str(self.dataDir.databasePath)
        self.latest = schemaUpgraders()[-1][0]
        connection = sqlite3.connect(self.path)
        connection.execute("UPDATE version SET version = ?", (self.latest + 1,))
        connection.commit()
        connection.close()
        self.message = (
            f"database schema version {self.latest + 1} is newer than this groundcontrol "
            f"(knows up to {self.latest}); upgrade groundcontrol"
        )

    def test_cli(self) -> None:
        """C{groundcontrol device list} (and C{init}) fail with the message, nothing else."""
        for argv in (["device", "list"], ["init"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(["--data", str(self.dataDir.path), *argv])
            self.assertEqual(status, 1, argv)
            self.assertEqual(err.getvalue(), f"groundcontrol: error: {self.message}\n")
        self.assertEqual(rawVersion(self.path), self.latest + 1)

    def test_server(self) -> None:
        """C{twistd groundcontrol} stops at start-up with the message, as a usage error."""
        options = Options()
        options.parseOptions(["--data", str(self.dataDir.path), "--listen", "tcp:0"])
        error = self.assertRaises(
            usage.UsageError, openServerStore, options.toConfig(), MemoryReactorClock()
        )
        self.assertEqual(str(error), f"cannot open the store {self.path}: {self.message}")


def _rows(path: str) -> dict[str, list[dict[str, Any]]]:
    """Every table's rows as dicts, by table name."""
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    try:
        tables = [
            r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {t: [dict(r) for r in connection.execute(f"SELECT * FROM {t}")] for t in tables}
    finally:
        connection.close()
