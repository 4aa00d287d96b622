"""The SQLite store: the default, one file shared by the server and the CLI.

The statements are shared with PostgreSQL in L{groundcontrol.store._sql}; this module only
opens the file the way concurrent processes need it, applies the SQLite DDL files, and gives
the file's free pages back after pruning (L{groundcontrol.store._space}).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._dialect import SQLITE, Cursor
from ._dialect import schemaUpgraders as _schemaUpgraders
from ._errors import StoreError
from ._records import AuditPruned
from ._runner import Runner
from ._space import giveBackFreePages
from ._sql import SQLStore, migrateWith

__all__ = ["SQLiteStore", "connect", "migrate", "openSQLiteStore", "schemaUpgraders"]

_BUSY_TIMEOUT_MS = 5000


def schemaUpgraders() -> list[tuple[int, str]]:
    """The SQLite schema files as C{(version, sql)}, in order (see L{_dialect.schemaUpgraders})."""
    return _schemaUpgraders(SQLITE.schemaDirectory)


def connect(path: str) -> sqlite3.Connection:
    """
    Open the database file for sharing between the running server and the CLI.

    WAL lets the CLI write while the server reads; the busy timeout makes a writer wait for
    the other process instead of failing at once; C{check_same_thread=False} because the
    connection is opened on the reactor thread or the runner's worker, and used by the
    worker. C{isolation_level=None} leaves transactions to the store's C{BEGIN IMMEDIATE}.

    A new (missing or empty) file gets incremental auto-vacuum, so that pruning can give
    space back (L{_space}): it must be set before WAL mode writes the file's first page.
    An existing file keeps its mode: setting it there would change nothing (only a full
    C{VACUUM} can, L{_space.compactSQLite}) and would cost a write transaction at each open.
    """
    isNew = not os.path.exists(path) or os.path.getsize(path) == 0
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if isNew:
            connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        connection.close()
        raise
    return connection


def migrate(connection: sqlite3.Connection, upTo: int | None = None) -> int:
    """
    Bring the database up to the newest shipped schema (or to C{upTo}); return its version.

    One C{BEGIN IMMEDIATE} transaction re-reads the version first, so two processes opening
    a fresh file at once cannot both apply it. Opening an up-to-date database changes
    nothing.

    @raise StoreError: the database is newer than this code.
    """
    return migrateWith(connection.cursor(), SQLITE, sqlite3.complete_statement, upTo)


class SQLiteStore(SQLStore):
    """L{IStore} on one SQLite connection (see L{SQLStore} for the locking story)."""

    dialect = SQLITE
    _log = Logger()

    def pruneAudit(self, before: float, limit: int, now: float) -> Deferred[AuditPruned]:
        """
        Prune as L{SQLStore.pruneAudit} does, then give back the file's free pages, a
        bounded number (L{giveBackFreePages}): in a call of its own, so a person's call
        queued meanwhile goes between the two. That step failing (the disk is full) leaves
        the pages for reuse, and the prune stands: it is logged, not reported as the
        prune's failure.
        """
        d = super().pruneAudit(before, limit, now)
        d.addCallback(self._giveBackAfter)
        return d

    def _giveBackAfter(self, pruned: AuditPruned) -> AuditPruned | Deferred[AuditPruned]:
        if not (pruned.auditRows or pruned.certificates):
            return pruned

        def given(freed: int) -> AuditPruned:
            if freed:
                self._log.info("gave {freed} bytes of the store's free pages back", freed=freed)
            return pruned

        def failed(failure: Failure) -> AuditPruned:
            self._log.warn(
                "could not give the store's free pages back (they stay for reuse): {error}",
                error=failure.getErrorMessage(),
            )
            return pruned

        return self._run(self._giveBackFreePages).addCallbacks(given, failed)

    def _giveBackFreePages(self) -> int:
        return giveBackFreePages(self._db.connection)

    @contextmanager
    def _write(self) -> Iterator[Cursor]:
        """
        A write transaction; when SQLite cannot write (locked past the busy timeout by
        another process, disk full) it is rolled back whole and the caller gets a
        L{StoreError} that says so, instead of a driver error (or a transaction left
        open by a failed COMMIT).
        """
        try:
            with super()._write() as c:
                yield c
        except sqlite3.OperationalError as e:
            with contextlib.suppress(sqlite3.Error):
                self._db.connection.execute("ROLLBACK")
            raise StoreError(f"the database cannot be written ({e}); nothing was changed") from None


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
