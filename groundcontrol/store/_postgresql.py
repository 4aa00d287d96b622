"""The PostgreSQL store: one database shared by several groundcontrol nodes.

The statements are shared with SQLite in L{groundcontrol.store._sql}. What is particular
here: the driver (psycopg 3, imported only when a PostgreSQL URL is opened, so a SQLite-only
install does not need it), the PostgreSQL DDL files, reconnecting after the server went
away, and the write lock: every write transaction first takes one transaction-scoped
advisory lock, shared by all nodes, which gives the same serialised writers as SQLite's
C{BEGIN IMMEDIATE} and keeps audit ids visible in commit order (the change feed each node
polls must never skip an id that commits late). And the fleet notifier's turn: a
session-level advisory lock of its own (L{PostgreSQLStore._takeNotifierTurn}).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.defer import Deferred

from ._dialect import POSTGRESQL, Cursor
from ._runner import Runner
from ._sql import SQLStore, migrateWith

__all__ = ["PostgreSQLStore", "connectPostgreSQL", "migratePostgreSQL", "openPostgreSQLStore"]

# How long a writer waits for the store's write lock (or any row lock) before failing, like
# SQLite's busy timeout: a node stuck holding it must not hang every other node for good.
_LOCK_TIMEOUT = "5s"

# The fleet notifier's turn (groundcontrol.fleetturn): a session-level advisory lock whose
# key is "gcnt" in its high half, so it is never the store's write lock, and the store's
# schema's oid in its low half: advisory locks are per database, and several fleets may each
# keep their store in a schema of one database (a lock of one key would let one fleet's node
# hold every fleet's turn).
_TURN_KEY = (
    "((1734569588::bigint << 32) + "
    "(SELECT oid::bigint FROM pg_namespace WHERE nspname = current_schema()))"
)
_TURN_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
    "AND pid = pg_backend_pid() AND objsubid = 1 AND granted "
    f"AND (classid::bigint << 32) + objid::bigint = {_TURN_KEY}) AS held"
)
# While a node holds the turn, how soon PostgreSQL ends its session when the node is gone:
# its machine dead or cut off (TCP keepalives: 10 s idle, then 3 probes 5 s apart, where the
# default is two hours; and 25 s for data the server sends that goes unacknowledged, where
# the default retransmits for about 15 minutes) or its process hung (no statement for 30 s,
# PostgreSQL 14 on; the watcher polls every 0.25 s). The lock goes with the session, and
# another node takes it.
_TURN_SESSION_SETTINGS = (
    "SELECT set_config('tcp_keepalives_idle', '10', false), "
    "set_config('tcp_keepalives_interval', '5', false), "
    "set_config('tcp_keepalives_count', '3', false)",
    "SELECT set_config('tcp_user_timeout', '25000', false) "
    "WHERE current_setting('server_version_num')::integer >= 120000",
    "SELECT set_config('idle_session_timeout', '30s', false) "
    "WHERE current_setting('server_version_num')::integer >= 140000",
)


def connectPostgreSQL(url: str) -> Any:
    """
    Connect to C{url} (a libpq URL: C{postgresql://user@host:port/db?options=...}).

    Autocommit, because the store issues its own C{BEGIN}/C{COMMIT}: reads then never hold
    a transaction (and its snapshot) open between calls. Rows come back as dicts, which the
    store reads by column name exactly like C{sqlite3.Row}.
    """
    import psycopg
    from psycopg.rows import dict_row

    connection = psycopg.connect(
        url, autocommit=True, row_factory=dict_row, application_name="groundcontrol"
    )
    try:
        connection.execute(f"SET lock_timeout = '{_LOCK_TIMEOUT}'")
    except BaseException:
        connection.close()
        raise
    return connection


def migratePostgreSQL(connection: Any, upTo: int | None = None) -> int:
    """
    Bring the database to the newest PostgreSQL schema (or C{upTo}); return its version.

    The migration holds the advisory write lock, so nodes starting together apply each
    upgrader once; DDL is transactional, so a failed upgrade leaves the previous version.
    """
    return migrateWith(connection.cursor(), POSTGRESQL, sqlite3.complete_statement, upTo)


class PostgreSQLStore(SQLStore):
    """
    L{IStore} on one PostgreSQL connection, reconnecting if the server dropped it.

    A dropped connection fails the call that finds it (the caller sees the driver's
    C{OperationalError}); the next call, through the store or any of its interactive
    views, opens a new one for them all, so a server restart costs one failed request,
    not a groundcontrol restart. A store we closed stays closed.
    """

    dialect = POSTGRESQL

    def __init__(self, connection: Any, runner: Runner, url: str) -> None:
        super().__init__(connection, runner)
        self._url = url

    def _rawCursor(self) -> Any:
        db = self._db
        # Closed by the server (or the network), not by us: the store was not closed.
        if not db.closed and (db.connection.closed or db.connection.broken):
            db.connection = connectPostgreSQL(self._url)
        return db.connection.cursor()

    def _takeNotifierTurn(self) -> bool:
        """
        Whether this connection holds the fleet notifier's lock, taking it if it is free.
        Asked of the server every time: a reconnect (L{_rawCursor}) is a new session, which
        holds nothing, and the node must learn that it lost the turn.
        """
        c = self._cursor()
        if c.execute(_TURN_HELD).fetchone()["held"]:
            return True
        taken = c.execute(f"SELECT pg_try_advisory_lock({_TURN_KEY}) AS taken").fetchone()["taken"]
        if taken:
            for statement in _TURN_SESSION_SETTINGS:
                c.execute(statement)
        return bool(taken)

    def _leaveNotifierTurn(self) -> None:
        c = self._cursor()
        if c.execute(_TURN_HELD).fetchone()["held"]:
            c.execute(f"SELECT pg_advisory_unlock({_TURN_KEY})")
            c.execute(
                "SELECT set_config('idle_session_timeout', '0', false) "
                "WHERE current_setting('server_version_num')::integer >= 140000"
            )

    def _rollback(self, c: Cursor) -> None:
        if not self._db.connection.broken:
            c.execute("ROLLBACK")


def openPostgreSQLStore(url: str, runner: Runner) -> Deferred[PostgreSQLStore]:
    """Connect to the PostgreSQL store at C{url}, migrating it if needed, through C{runner}."""

    def _open() -> Any:
        connection = connectPostgreSQL(url)
        try:
            migratePostgreSQL(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    return runner(_open).addCallback(lambda connection: PostgreSQLStore(connection, runner, url))
