"""Giving the SQLite file's free pages back to the disk.

SQLite keeps the pages of deleted rows inside the file and reuses them, so a store pruned by
C{--audit-max-age} stops growing but never shrinks. A store created with C{auto_vacuum =
INCREMENTAL} (every store made since session 18, see L{_sqlite.connect}) can hand its free
pages back a bounded number at a time, after each prune batch (L{giveBackFreePages}). An
older store cannot switch without being rewritten whole: L{compactSQLite} does that, once,
while nothing else has the store open, and leaves it incremental.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from shutil import disk_usage

from attrs import frozen

from ._errors import StoreError

__all__ = ["RECLAIM_PAGES", "Compacted", "compactSQLite", "giveBackFreePages", "sizeOnDisk"]

#: Free pages given back after one prune batch, at most (4 MiB of 4 KiB pages). A batch of
#: 1,000 audit rows (500 sessions) frees about 150 pages, so this keeps up with pruning
#: several times over; giving back 1,024 pages held the writer 23-89 ms here, in the worst
#: case (every page moved from the end of a 200 MB file; bench/RESULTS.md, "SQLite space
#: after pruning").
RECLAIM_PAGES = 1024

#: How long L{compactSQLite} waits for the store before it says another process has it.
_COMPACT_BUSY_TIMEOUT_MS = 1000

_AUTO_VACUUM_INCREMENTAL = 2
_WAL_FRAME_HEADER = 24


def giveBackFreePages(connection: sqlite3.Connection, limit: int = RECLAIM_PAGES) -> int:
    """
    Give up to C{limit} of the file's free pages back to the disk, in a write transaction
    of its own; return how many bytes went. Nothing on a store without incremental
    auto-vacuum (one made before session 18, until compacted): its free pages stay for
    reuse.

    SQLite moves pages from the end of the file into the free slots and truncates it (in
    WAL mode, at the next checkpoint).
    """
    if _pragma(connection, "auto_vacuum") != _AUTO_VACUUM_INCREMENTAL:
        return 0
    free = _pragma(connection, "freelist_count")
    pages = min(free, limit)
    if pages > 0:  # (0 would mean every free page)
        # executescript steps the pragma to its end. execute() steps it once, which frees
        # one page: its rows have no columns, so the driver takes it as done.
        connection.executescript(f"PRAGMA incremental_vacuum({pages})")
    return (free - _pragma(connection, "freelist_count")) * _pragma(connection, "page_size")


def _pragma(connection: sqlite3.Connection, name: str) -> int:
    return int(connection.execute(f"PRAGMA {name}").fetchone()[0])


@frozen
class Compacted:
    """What L{compactSQLite} did: the store's size on disk (file and write-ahead log) around it."""

    path: str
    bytesBefore: int
    bytesAfter: int

    @property
    def bytesGivenBack(self) -> int:
        return max(self.bytesBefore - self.bytesAfter, 0)


def sizeOnDisk(path: str) -> int:
    """The bytes a SQLite store takes: its file and its write-ahead log, if any."""
    total = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.path.getsize(name)
    return total


def compactSQLite(path: str) -> Compacted:
    """
    Rewrite the SQLite store at C{path} without its free pages (C{VACUUM}) and switch it to
    incremental auto-vacuum, so that pruning gives space back from then on.

    Only while no other process has the store open: groundcontrol's writes would wait
    behind the rewrite and fail. The connection takes the file's exclusive lock for its
    whole life (C{locking_mode = EXCLUSIVE}), which a server or a command holding the store
    open refuses; once taken, nothing else opens the store until the rewrite is done.

    C{VACUUM} needs free space about the size of the rewritten store, twice: for the copy
    (in the temporary directory) and for the write-ahead log beside the store. Without that
    much beside the store it refuses before writing anything: filling the disk would upset
    whatever else runs on the machine. If a disk fills all the same (the temporary
    directory's), SQLite rolls the rewrite back and the store is as it was.

    @raise StoreError: no store at C{path}, another process has it open, too little room
        beside it, or it could not be rewritten (a disk filled); the message says which, and
        the store is unchanged.
    """
    if not os.path.isfile(path):
        raise StoreError(f"there is no SQLite store at {path}")
    before = sizeOnDisk(path)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute(f"PRAGMA busy_timeout = {_COMPACT_BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA locking_mode = EXCLUSIVE")
        try:
            connection.execute("BEGIN EXCLUSIVE")
            connection.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if _errorCode(e) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StoreError(
                    f"{path} is in use by another process (groundcontrol, or a groundcontrol "
                    "command): stop groundcontrol first; compacting needs the store to itself"
                ) from None
            raise
        used = _pragma(connection, "page_count") - _pragma(connection, "freelist_count")
        needed = used * _pragma(connection, "page_size")
        # The log holds every page of the rewrite, each with a frame header.
        free = disk_usage(os.path.dirname(os.path.abspath(path))).free
        if free < needed + used * _WAL_FRAME_HEADER:
            raise StoreError(
                f"not enough free space to compact {path}: it needs about {needed:,} bytes "
                f"free beside it, and {free:,} are; the store is unchanged"
            )
        connection.execute(f"PRAGMA auto_vacuum = {_AUTO_VACUUM_INCREMENTAL}")
        try:
            _rewrite(connection)
        except sqlite3.OperationalError as e:
            if _errorCode(e) == sqlite3.SQLITE_FULL:
                raise StoreError(
                    f"the disk is full: compacting {path} needs about {needed:,} bytes free "
                    "beside it, and as much again in the temporary directory (SQLITE_TMPDIR "
                    "or TMPDIR, else /var/tmp) for SQLite's copy; the store is unchanged"
                ) from None
            raise StoreError(f"cannot compact {path} ({e}); the store is unchanged") from None
        finally:
            # The rewrite went through the write-ahead log (or failed half-way into it):
            # copy it into the file and empty it, so it does not keep the space it took.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()
    return Compacted(path, before, sizeOnDisk(path))


def _rewrite(connection: sqlite3.Connection) -> None:
    """The rewrite itself, apart so that a test can fail it as a full disk would."""
    connection.execute("VACUUM")


def _errorCode(error: sqlite3.Error) -> int:
    """SQLite's primary result code for C{error} (its extended code's low byte)."""
    return int(getattr(error, "sqlite_errorcode", 0)) & 0xFF
