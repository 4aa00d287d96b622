"""
Shared fixtures: a throwaway PostgreSQL server on loopback for the store suites, and trial's
C{mktemp()} kept out of the working tree.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.store.pgtesting import (
    PostgreSQLUnavailable,
    ThrowawayPostgreSQL,
    findPostgreSQLBinaries,
)

# trial cuts each of the module, class and test names to this length in mktemp() paths.
MKTEMP_NAME_LENGTH = 32


@pytest.fixture(scope="session", autouse=True)
def trialTemporaryPathsOutsideTheTree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """
    Trial's C{TestCase.mktemp()} makes its paths relative to the current directory: trial
    itself runs in C{_trial_temp}, but pytest runs in the repo root, so every run left a
    C{tests.test_*/} directory there. Give them a root in pytest's temporary directory instead,
    in trial's layout (module/class/test/random/temp) and with its contract: a new path whose
    parent exists; the path is absolute, so a later chdir does not move it.
    """
    root = tmp_path_factory.mktemp("trial")

    def mktemp(self: SynchronousTestCase) -> str:
        names = (type(self).__module__, type(self).__name__, self._testMethodName)
        parent = root.joinpath(*(name[:MKTEMP_NAME_LENGTH] for name in names))
        parent.mkdir(parents=True, exist_ok=True)
        return os.path.join(tempfile.mkdtemp(dir=parent), "temp")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SynchronousTestCase, "mktemp", mktemp)
        yield


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
