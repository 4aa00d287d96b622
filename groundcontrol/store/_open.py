"""Open whichever store a URL names: the one switch between SQLite and PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail

from ._errors import StoreError
from ._postgresql import (
    PostgreSQLStore,
    connectPostgreSQL,
    migratePostgreSQL,
    openPostgreSQLStore,
)
from ._runner import Runner
from ._sql import SQLStore
from ._sqlite import SQLiteStore, connect, migrate, openSQLiteStore

__all__ = [
    "databaseErrors",
    "migrateStore",
    "openStore",
    "openStoreBlocking",
    "sqlitePath",
    "storeKind",
]


def storeKind(url: str) -> str:
    """
    C{"postgresql"} for C{postgresql://} or C{postgres://} URLs, C{"sqlite"} for
    C{sqlite:///path} or a plain path.

    @raise StoreError: another URL scheme (a typo must not become a file of that name).
    """
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    if url.startswith("sqlite://") or "://" not in url:
        return "sqlite"
    scheme = url.split("://", 1)[0]
    raise StoreError(f"unsupported store URL {scheme}://...: use sqlite:// or postgresql://")


def sqlitePath(url: str) -> str:
    """The file path of a SQLite store URL: C{sqlite:///var/lib/gc.db} is C{/var/lib/gc.db}."""
    return url[len("sqlite://") :] if url.startswith("sqlite://") else url


def openStore(url: str, runner: Runner) -> Deferred[SQLStore]:
    """
    Open (creating and migrating as needed) the store at C{url} through C{runner}.

    C{sqlite:///ABSOLUTE/PATH}, C{sqlite://RELATIVE/PATH} or a bare path open a SQLite file;
    C{postgresql://user@host:port/db} (any libpq URL, C{?options=-csearch_path=...} included)
    opens a PostgreSQL database that several groundcontrol nodes may share.
    """
    try:
        kind = storeKind(url)
    except StoreError:
        return fail()
    if kind == "postgresql":
        return openPostgreSQLStore(url, runner)  # type: ignore[return-value]
    return openSQLiteStore(sqlitePath(url), runner)  # type: ignore[return-value]


def openStoreBlocking(url: str, runner: Runner) -> SQLStore:
    """
    Open and migrate the store at C{url} now, blocking; later calls go through C{runner}.

    For start-up before the reactor runs (C{makeService}), where a Deferred would have
    nothing to fire it and failing fast with the real error is what an operator wants.
    """
    connection, _ = _connectMigrated(url)
    if storeKind(url) == "postgresql":
        return PostgreSQLStore(connection, runner, url)
    return SQLiteStore(connection, runner)


def migrateStore(url: str) -> int:
    """
    Create and migrate the store at C{url} now, blocking, and return its schema version:
    what C{init} does. A new SQLite file is created private (0600) before SQLite creates
    it, since its -wal and -shm files copy those bits.
    """
    if storeKind(url) == "sqlite" and not os.path.exists(sqlitePath(url)):
        os.close(os.open(sqlitePath(url), os.O_WRONLY | os.O_CREAT, 0o600))
    connection, version = _connectMigrated(url)
    connection.close()
    return version


def _connectMigrated(url: str) -> tuple[Any, int]:
    """A connection to the store at C{url}, migrated, and its schema version."""
    if storeKind(url) == "postgresql":
        connection: Any = connectPostgreSQL(url)
        migrateConnection: Callable[[Any], int] = migratePostgreSQL
    else:
        connection = connect(sqlitePath(url))
        migrateConnection = migrate
    try:
        return connection, migrateConnection(connection)
    except BaseException:
        connection.close()
        raise


def databaseErrors() -> tuple[type[BaseException], ...]:
    """
    The drivers' own error classes: the database failed (unreachable, locked too long,
    disk full) rather than the store refusing a request. The CLI reports them in one line.
    """
    import sqlite3

    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)
