"""Fixtures for end-to-end tests: a running fleet on loopback, torn down after each test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet
from tests.e2e.tornet import TorNetwork


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


@pytest.fixture(scope="session")
def torNetwork(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorNetwork]:
    """
    The private Tor network every tor test of the run shares, not started: bringing one up
    takes 15-40 s of a CI run, once is enough. Each test starts what it needs of it (and
    may stop and start the client tor); every tor is killed at the end of the run.
    """
    network = TorNetwork(tmp_path_factory.mktemp("tor"))
    try:
        yield network
    finally:
        network.stop()


@pytest.fixture
def tornet(torNetwork: TorNetwork) -> TorNetwork:
    """The shared private Tor network, bootstrapped (its client tor started if stopped)."""
    torNetwork.start()
    return torNetwork
