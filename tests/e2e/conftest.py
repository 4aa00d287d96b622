"""Fixtures for end-to-end tests: a running fleet on loopback, torn down after each test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """groundcontrol running with an admin operator 'alice'; agents added by the test."""
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is required (make test installs it)")
    fleet = Fleet(tmp_path)
    try:
        fleet.addOperator("alice", admin=True)
        fleet.startServer()
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def kiln7(fleet: Fleet) -> Fleet:
    """The fleet with device 'kiln7' approved and reachable by alice."""
    fleet.addAgent("kiln7")
    fleet.waitRoutable(fleet.operators["alice"], "kiln7")
    return fleet
