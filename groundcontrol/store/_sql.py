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

L{SQLStore} is put together from one part a kind of record, each a mixin in a module of its
own over L{StoreCore} (C{_sqlcore}: connection, transactions, audit appends, device reads):
accounts (C{_sqlaccounts}), devices and pending requests (C{_sqldevices}), certificates
(C{_sqlcertificates}), enrollment tokens and claims (C{_sqlenrollment}), grants, tags and
groups (C{_sqlgrants}), the audit log and sessions (C{_sqlaudit}), the fleet notifier's turn
(C{_sqlnotifyturn}). This module keeps the schema's migration and the composed store.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from ._dialect import Dialect, splitStatements
from ._errors import StoreError
from ._interface import IStore
from ._sqlaccounts import AccountRows
from ._sqlaudit import AuditRows
from ._sqlcertificates import CertificateRows
from ._sqldevices import DeviceRows, sourceHost
from ._sqlenrollment import EnrollmentRows, hashSecret
from ._sqlgrants import GrantRows, isValidLoginUser, isValidTag, parseSelector
from ._sqlnotifyturn import NotifyTurnRows
from ._sqlvalidation import cleanSerial

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


@implementer(IStore)
class SQLStore(
    AccountRows,
    EnrollmentRows,
    DeviceRows,
    CertificateRows,
    GrantRows,
    AuditRows,
    NotifyTurnRows,
):
    """
    L{IStore} on one database connection, used only through the runner.

    With L{threadRunner} the runner's single worker is the only thread touching the
    connection, so calls from one process are serialised; write transactions take the
    store-wide write lock (see the module docstring) so other processes and nodes wait.

    Subclasses supply the dialect and the driver cursor (L{_rawCursor}).
    """

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
