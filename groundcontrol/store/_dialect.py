"""What differs between the SQL engines the store runs on, and nothing else.

The store's statements are written once, with ``?`` placeholders and SQL that SQLite and
PostgreSQL both accept (``RETURNING``, ``ON CONFLICT``, ``LIMIT ?``). A L{Dialect} covers the
few real differences: the placeholder spelling, how a write transaction takes the store's
write lock, row locking, where the DDL files live and which driver errors mean "the
database failed" rather than "the request was refused".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any

from attrs import frozen

from ._errors import StoreError

__all__ = ["Cursor", "Dialect", "Row", "schemaUpgraders"]

# A result row: sqlite3.Row or psycopg's dict row; both are read by column name only.
Row = Any

_SCHEMA_FILE_RE = re.compile(r"\A(\d{3})-[a-z0-9-]+\.sql\Z")


@frozen
class Dialect:
    """
    One SQL engine's spelling of the few things the store cannot write portably.

    @ivar name: C{"sqlite"} or C{"postgresql"}.
    @ivar schemaDirectory: the directory under C{groundcontrol/} with this engine's numbered
        DDL files; version N means the same logical schema in every dialect.
    @ivar beginWrite: statements that open a write transaction holding the store-wide write
        lock (SQLite: C{BEGIN IMMEDIATE}; PostgreSQL: C{BEGIN} and an advisory lock).
    @ivar forUpdate: suffix that row-locks a C{SELECT} inside a write transaction (empty on
        SQLite, where the whole database is already locked).
    @ivar placeholder: the driver's parameter marker, replacing C{?}.
    """

    name: str
    schemaDirectory: str
    beginWrite: tuple[str, ...]
    forUpdate: str
    placeholder: str

    def sql(self, statement: str) -> str:
        """Translate a statement written with C{?} placeholders into this dialect."""
        return _translate(statement, self.placeholder)

    def schemaUpgraders(self) -> list[tuple[int, str]]:
        """This dialect's shipped schema files as C{(version, sql)}; see L{schemaUpgraders}."""
        return schemaUpgraders(self.schemaDirectory)


@functools.lru_cache(maxsize=512)
def _translate(statement: str, placeholder: str) -> str:
    if placeholder == "?":
        return statement
    # No statement of the store uses a literal '%' or '?', so a plain replace is exact.
    assert "%" not in statement, statement
    return statement.replace("?", placeholder)


SQLITE = Dialect(
    name="sqlite",
    schemaDirectory="schema",
    beginWrite=("BEGIN IMMEDIATE",),
    forUpdate="",
    placeholder="?",
)

# Any constant works, as long as every groundcontrol node uses the same one: it names the
# single lock that serialises writers across nodes (see groundcontrol.store._postgresql).
ADVISORY_LOCK_KEY = 0x6763_7374_6F72_6500  # "gcstore"

POSTGRESQL = Dialect(
    name="postgresql",
    schemaDirectory="schema/postgresql",
    beginWrite=("BEGIN", f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})"),
    forUpdate=" FOR UPDATE",
    placeholder="%s",
)


def schemaUpgraders(directory: str = "schema") -> list[tuple[int, str]]:
    """
    Return the shipped schema files in C{groundcontrol/DIRECTORY} as C{(version, sql)}.

    Version N's file turns a version N-1 database into version N; version 1 starts from
    nothing. Gaps or duplicates would make a database's version meaningless, so they are
    refused here rather than discovered in production.
    """
    folder = resources.files("groundcontrol")
    for part in directory.split("/"):
        folder = folder.joinpath(part)
    found: dict[int, str] = {}
    for entry in folder.iterdir():
        match = _SCHEMA_FILE_RE.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise StoreError(f"two schema files for version {version}")
        found[version] = entry.read_text(encoding="utf-8")
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(f"schema versions are not 1..N without gaps: {versions}")
    return [(v, found[v]) for v in versions]


def splitStatements(script: str, isComplete: Callable[[str], bool]) -> Iterator[str]:
    """
    Split a SQL script into statements, dropping comment lines.

    Drivers either refuse several statements per call or (SQLite's C{executescript})
    commit the surrounding transaction first, so a migration runs them one by one inside
    its own transaction. C{isComplete} (C{sqlite3.complete_statement}) keeps a semicolon
    inside a literal from splitting a statement; the store's DDL needs no more than that in
    either dialect.
    """
    buffered = ""
    for piece in script.split(";"):
        buffered += piece + ";"
        if isComplete(buffered):
            statement = "\n".join(
                line for line in buffered.splitlines() if not line.lstrip().startswith("--")
            ).strip()
            if statement.strip(";").strip():
                yield statement
            buffered = ""


class Cursor:
    """
    A driver cursor that speaks the store's portable SQL (C{?} placeholders).

    The store never touches a driver cursor directly, so one body of code serves both
    engines.
    """

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self._dialect = dialect

    def execute(self, statement: str, args: Sequence[Any] = ()) -> Cursor:
        self._raw.execute(self._dialect.sql(statement), tuple(args))
        return self

    def fetchone(self) -> Row:
        """The next row, or None (typed as Any, like the drivers', to keep call sites short)."""
        return self._raw.fetchone()

    def fetchall(self) -> list[Row]:
        return list(self._raw.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._raw.rowcount)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.fetchall())
