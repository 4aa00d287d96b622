"""Shared fixtures: a throwaway PostgreSQL server on loopback for the store suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from groundcontrol.store.pgtesting import (
    PostgreSQLUnavailable,
    ThrowawayPostgreSQL,
    findPostgreSQLBinaries,
)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[ThrowawayPostgreSQL]:
    """
    One PostgreSQL server for the whole run (starting one takes seconds), torn down at the
    end. Skipped, saying what to install, only when the server binaries are missing.
    """
    try:
        binDir = findPostgreSQLBinaries()
    except PostgreSQLUnavailable as e:
        pytest.skip(str(e))
    server = ThrowawayPostgreSQL(binDir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="class")
def postgresqlForClass(request: pytest.FixtureRequest, postgresql: ThrowawayPostgreSQL) -> None:
    """Hand the server to a trial/unittest test class, which cannot take fixtures itself."""
    request.cls.postgresql = postgresql
