"""
Tests for the SQLite store giving space back (groundcontrol.store._space): new stores are
made with incremental auto-vacuum, pruning hands a bounded number of free pages back to
the disk, old stores open unchanged, and C{compactSQLite} rewrites a store alone, switching
it to incremental, or refuses and leaves it as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.store import (
    SESSION_ENDED,
    SESSION_STARTED,
    AuditPruned,
    SQLiteStore,
    StoreError,
    _space,
    compactSQLite,
    connect,
    migrateStore,
    openStore,
    synchronousRunner,
)
from groundcontrol.store._space import giveBackFreePages, sizeOnDisk
from tests.e2e.test_faults import smallDisk
from tests.test_store import T0, StoreTestCase
from tests.test_upgrade_store import loadFixture

DAY = 86400.0
NONE, INCREMENTAL = 0, 2
#: What a session's two audit rows carry, near enough (about 1.4 KiB with the index row).
SESSION_DETAIL = {"client": "SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5", "padding": "x" * 500}


def pragma(path: str, name: str) -> Any:
    """One PRAGMA's value, read on a connection of its own."""
    return scalar(path, f"PRAGMA {name}")


def auditRows(path: str) -> int:
    return int(scalar(path, "SELECT COUNT(*) FROM audit"))


def scalar(path: str, query: str) -> Any:
    """The first column of C{query}'s first row, on a connection of its own."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(query).fetchone()[0]
    finally:
        connection.close()


def writeSessions(store: SQLiteStore, count: int, at: float = T0) -> None:
    """Audit C{count} ended sessions, in one transaction (as fast as a test needs)."""
    with store._write() as c:
        for n in range(count):
            detail = dict(SESSION_DETAIL, session=f"s{n}", started_at=at)
            store._insertAudit(c, SESSION_STARTED, "alice", "kiln7", detail, at)
            store._insertAudit(c, SESSION_ENDED, "alice", "kiln7", detail, at)


def makeOldStore(path: str) -> None:
    """A store as releases before session 18 made it: auto-vacuum off (SQLite's default)."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode = WAL")  # writes the file's first page
    finally:
        connection.close()
    migrateStore(path)


class NewStoreTests(StoreTestCase):
    """Stores made today give space back; stores made before keep their mode."""

    def test_newStoreIsIncremental(self) -> None:
        """A store opened on a new file has incremental auto-vacuum (and is still WAL)."""
        self.assertEqual(pragma(self.path, "auto_vacuum"), INCREMENTAL)
        self.assertEqual(self.rawQuery("PRAGMA journal_mode"), [("wal",)])

    def test_initIsIncremental(self) -> None:
        """C{init} makes the file (0600) before SQLite does: it is new all the same."""
        path = str(Path(self.path).with_name("init.sqlite3"))
        migrateStore(path)
        self.assertEqual(pragma(path, "auto_vacuum"), INCREMENTAL)

    def test_oldStoreOpensUnchanged(self) -> None:
        """A store made without auto-vacuum opens, and is used, as it was: still without."""
        path = str(Path(self.path).with_name("old.sqlite3"))
        makeOldStore(path)
        store = self.successResultOf(openStore(path, synchronousRunner))
        self.addCleanup(store.close)
        self.successResultOf(store.audit("device.online", None, "kiln7", {}, T0))
        self.assertEqual(pragma(path, "auto_vacuum"), NONE)

    def test_releasedStoresOpenUnchanged(self) -> None:
        """Stores older releases wrote are upgraded and keep their mode (and rows)."""
        for fixture in ("store-schema4-f8099d5.sql", "store-schema5-cf11ebb.sql"):
            directory = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
            path = loadFixture(fixture, directory)
            rows = auditRows(path)
            self.assertEqual(pragma(path, "auto_vacuum"), NONE)
            store = self.successResultOf(openStore(path, synchronousRunner))
            self.successResultOf(store.close())
            self.assertEqual(pragma(path, "auto_vacuum"), NONE, fixture)
            self.assertEqual(auditRows(path), rows)


class PruneGivesSpaceBackTests(StoreTestCase):
    """After a prune batch, the store hands the pages it freed back to the disk."""

    def prune(self, store: SQLiteStore) -> AuditPruned:
        return self.successResultOf(store.pruneAudit(T0 + DAY, 1000, T0 + 400 * DAY))

    def test_pruneShrinksTheFile(self) -> None:
        """
        A batch frees pages and the same call gives them back: the file has no free page
        left, fewer pages than before, and a checkpoint makes it smaller on disk.
        """
        assert isinstance(self.store, SQLiteStore)
        writeSessions(self.store, 1000)
        self.rawQuery("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = pragma(self.path, "page_count")
        size = os.path.getsize(self.path)
        with capturedLogs() as events:
            pruned = self.prune(self.store)
        self.assertEqual(pruned.auditRows, 1000)
        self.assertEqual(pragma(self.path, "freelist_count"), 0)
        self.assertLess(pragma(self.path, "page_count"), pages - 50)
        self.rawQuery("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertLess(os.path.getsize(self.path), size - 50 * 4096)
        given = [e for e in events if "gave {freed} bytes" in e.get("log_format", "")]
        self.assertEqual(len(given), 1)
        self.assertGreater(given[0]["freed"], 50 * 4096)

    def test_boundedPerBatch(self) -> None:
        """One step gives back at most its limit, the pages moved and the file truncated."""
        assert isinstance(self.store, SQLiteStore)
        writeSessions(self.store, 1000)
        self.successResultOf(self.store._run(self.store._pruneAudit, T0 + DAY, 2000, T0))
        free = pragma(self.path, "freelist_count")
        pages = pragma(self.path, "page_count")
        self.assertGreater(free, 20)
        connection = connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(giveBackFreePages(connection, 20), 20 * 4096)
        self.assertEqual(pragma(self.path, "freelist_count"), free - 20)
        self.assertEqual(pragma(self.path, "page_count"), pages - 20)
        self.assertEqual(giveBackFreePages(connection, 0), 0)
        self.assertEqual(pragma(self.path, "freelist_count"), free - 20)

    def test_oldStoreKeepsItsPages(self) -> None:
        """A store without auto-vacuum keeps the pages for reuse, and pruning works."""
        path = str(Path(self.path).with_name("old.sqlite3"))
        makeOldStore(path)
        store = self.successResultOf(openStore(path, synchronousRunner))
        self.addCleanup(store.close)
        assert isinstance(store, SQLiteStore)
        writeSessions(store, 500)
        self.assertEqual(self.prune(store).auditRows, 1000)
        self.assertGreater(pragma(path, "freelist_count"), 50)

    def test_givingBackFails(self) -> None:
        """
        Giving back failing (a full disk) leaves the pages for reuse and is logged; the
        prune, committed already, is reported as done.
        """
        assert isinstance(self.store, SQLiteStore)
        writeSessions(self.store, 100)

        def full() -> int:
            raise sqlite3.OperationalError("database or disk is full")

        self.store._giveBackFreePages = full  # type: ignore[method-assign]
        with capturedLogs() as events:
            pruned = self.prune(self.store)
        self.assertEqual(pruned.auditRows, 200)
        (warning,) = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["error"], "database or disk is full")
        self.assertGreater(pragma(self.path, "freelist_count"), 0)

    def test_nothingPrunedNothingGiven(self) -> None:
        """With nothing old enough, the store does not look for free pages at all."""
        assert isinstance(self.store, SQLiteStore)
        calls: list[str] = []

        def giveBack() -> int:
            calls.append("giveBack")
            return 0

        self.store._giveBackFreePages = giveBack  # type: ignore[method-assign]
        self.assertEqual(self.prune(self.store), AuditPruned(0, 0, 0, 0))
        self.assertEqual(calls, [])


class CompactTests(SynchronousTestCase):
    """C{compactSQLite}: a full rewrite, alone, that leaves the store incremental."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.path = str(Path(directory) / "groundcontrol.sqlite3")

    def oldPrunedStore(self, path: str, sessions: int = 1000) -> None:
        """An old store (no auto-vacuum) whose prune left free pages in the file."""
        makeOldStore(path)
        store = self.successResultOf(openStore(path, synchronousRunner))
        assert isinstance(store, SQLiteStore)
        writeSessions(store, sessions)
        self.successResultOf(store.pruneAudit(T0 + DAY, 1000, T0 + 400 * DAY))
        self.successResultOf(store.close())

    def test_compactOldStore(self) -> None:
        """
        The free pages go, the store becomes incremental, every row stays, and what it
        says it gave back is what the file and its log shrank by.
        """
        self.oldPrunedStore(self.path)
        free = pragma(self.path, "freelist_count")
        self.assertGreater(free, 50)
        rows = auditRows(self.path)
        before = sizeOnDisk(self.path)
        done = compactSQLite(self.path)
        self.assertEqual(done.bytesBefore, before)
        self.assertEqual(done.bytesAfter, sizeOnDisk(self.path))
        self.assertGreaterEqual(done.bytesGivenBack, free * 4096)
        self.assertEqual(pragma(self.path, "auto_vacuum"), INCREMENTAL)
        self.assertEqual(pragma(self.path, "freelist_count"), 0)
        self.assertEqual(auditRows(self.path), rows)
        self.assertFalse(os.path.exists(self.path + "-wal"))
        store = self.successResultOf(openStore(self.path, synchronousRunner))
        self.addCleanup(store.close)
        self.successResultOf(store.audit("device.online", None, "kiln7", {}, T0))

    def test_refusedWhileOpen(self) -> None:
        """
        Another connection has the store open (groundcontrol, or a command): refused,
        saying so, and the other connection goes on using it.
        """
        self.oldPrunedStore(self.path)
        store = self.successResultOf(openStore(self.path, synchronousRunner))
        self.addCleanup(store.close)
        self.patch(_space, "_COMPACT_BUSY_TIMEOUT_MS", 0)
        with self.assertRaises(StoreError) as raised:
            compactSQLite(self.path)
        self.assertIn("is in use by another process", str(raised.exception))
        self.assertIn("stop groundcontrol first", str(raised.exception))
        self.assertEqual(pragma(self.path, "auto_vacuum"), NONE)
        self.successResultOf(store.audit("device.online", None, "kiln7", {}, T0))

    def test_noStore(self) -> None:
        """No file at the path: refused, and none is created."""
        with self.assertRaises(StoreError) as raised:
            compactSQLite(self.path)
        self.assertEqual(str(raised.exception), f"there is no SQLite store at {self.path}")
        self.assertFalse(os.path.exists(self.path))

    def test_vacuumFailsOtherwise(self) -> None:
        """
        Any other failure of the rewrite (here an injected one, in place of the full disk
        the next test needs root for) is one line, and the store is unchanged.
        """
        self.oldPrunedStore(self.path)
        rows = auditRows(self.path)

        def failingVacuum(connection: sqlite3.Connection) -> None:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
            raise error

        self.patch(_space, "_rewrite", failingVacuum)
        with self.assertRaises(StoreError) as raised:
            compactSQLite(self.path)
        message = str(raised.exception)
        self.assertIn(f"the disk is full: compacting {self.path} needs about ", message)
        self.assertIn("the store is unchanged", message)
        self.assertEqual(pragma(self.path, "auto_vacuum"), NONE)
        self.assertEqual(auditRows(self.path), rows)

    def assertIntact(self, path: str, rows: int) -> None:
        """The store after a refused compaction: sound, every row, auto-vacuum still off."""
        self.assertEqual(pragma(path, "integrity_check"), "ok")
        self.assertEqual(pragma(path, "auto_vacuum"), NONE)
        self.assertEqual(auditRows(path), rows)

    def test_noRoomBeside(self) -> None:
        """
        Less free space beside the store than the rewrite needs: refused before anything
        is written, saying how much; with room again, it compacts.
        """
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        with smallDisk(directory / "disk", "8m") as disk:
            path = str(disk / "groundcontrol.sqlite3")
            self.oldPrunedStore(path)
            rows = auditRows(path)
            size = sizeOnDisk(path)
            filler = fill(disk)
            with self.assertRaises(StoreError) as raised:
                compactSQLite(path)
            self.assertRegex(
                str(raised.exception),
                rf"\Anot enough free space to compact {path}: it needs about [\d,]+ bytes "
                r"free beside it, and [\d,]+ are; the store is unchanged\Z",
            )
            self.assertEqual(sizeOnDisk(path), size)
            filler.unlink()
            self.assertIntact(path, rows)
            self.assertEqual(compactSQLite(path).bytesAfter, sizeOnDisk(path))
            self.assertEqual(pragma(path, "auto_vacuum"), INCREMENTAL)
            self.assertEqual(auditRows(path), rows)

    def test_noRoomSaysHowMuch(self) -> None:
        """The refusal names the bytes needed (the pages in use) and those free."""
        self.oldPrunedStore(self.path)
        rows = auditRows(self.path)
        used = pragma(self.path, "page_count") - pragma(self.path, "freelist_count")
        self.patch(_space, "disk_usage", lambda directory: SimpleNamespace(free=4096))
        with self.assertRaises(StoreError) as raised:
            compactSQLite(self.path)
        self.assertEqual(
            str(raised.exception),
            f"not enough free space to compact {self.path}: it needs about {used * 4096:,} "
            "bytes free beside it, and 4,096 are; the store is unchanged",
        )
        self.assertIntact(self.path, rows)

    def test_temporaryDirectoryFills(self) -> None:
        """
        The temporary directory, where SQLite writes its copy, fills during the rewrite: the
        command fails with a clear message (exit status 1) and the store is intact.
        """
        self.oldPrunedStore(self.path, sessions=4000)  # beyond SQLite's 2 MB page cache
        rows = auditRows(self.path)
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        with smallDisk(directory / "tmp", "1m") as temporary:
            fill(temporary)
            command = ["--data", str(directory), "--store", f"sqlite://{self.path}"]
            done = subprocess.run(
                [sys.executable, "-m", "groundcontrol.cli", *command, "store", "compact"],
                env=dict(os.environ, SQLITE_TMPDIR=str(temporary)),
                capture_output=True,
                text=True,
            )
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertRegex(
            done.stderr,
            rf"\Agroundcontrol: error: the disk is full: compacting {self.path} needs about "
            r"[\d,]+ bytes free beside it, and as much again in the temporary directory "
            r"\(SQLITE_TMPDIR or TMPDIR, else /var/tmp\) for SQLite's copy; the store is "
            r"unchanged\n\Z",
        )
        self.assertFalse(os.path.exists(self.path + "-wal"))
        self.assertIntact(self.path, rows)


def fill(disk: Path) -> Path:
    """Fill C{disk} up with one file; return it (unlink it to make room again)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler
