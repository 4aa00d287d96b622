"""
End to end: `twistd groundcontrol --penalty-exempt` with the real OpenSSH client. A source
inside an exempt network (a NAT in front of many devices) is served however often its
connections fail or close after the key exchange without trying to log in; a neighbour
outside it is refused at the door by the same penalties (SECURITY.md, "Penalties").

127.0.0.2 is the exempt NAT, 127.0.0.3 the neighbour (`ssh -b`); groundcontrol listens on
127.0.0.1. And real agents of new devices that the pending caps refuse make their address
a failing source like any other.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Fleet, run, waitFor

EXEMPT = "127.0.0.2"
NEIGHBOUR = "127.0.0.3"


@pytest.fixture
def exemptFleet(tmp_path: Path) -> Iterator[Fleet]:
    """
    groundcontrol exempting 127.0.0.2 from its penalties, with two key exchanges without
    a login attempt per source and then one per 100 s (so a refusal lasts 100 s: no race
    with the test's next connection), and operator alice.
    """
    fleet = Fleet(tmp_path)
    try:
        fleet.addOperator("alice", admin=True)
        fleet.startServer(
            "--penalty-exempt",
            f"{EXEMPT}/32",
            "--noauth-allowance",
            "2",
            "--noauth-rate",
            "0.01",
        )
        yield fleet
    finally:
        fleet.close()


def stranger(
    fleet: Fleet, source: str, key: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """
    `ssh ctl@groundcontrol whoami` from C{source} with no account: with C{key} (unknown to
    groundcontrol) a failed authentication attempt; without one, only the key exchange and
    SSH's 'none' probe (a connection that closes without trying to log in).
    """
    options = [
        "BatchMode=yes",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "GlobalKnownHostsFile=/dev/null",
        "IdentitiesOnly=yes",
        "IdentityAgent=none",
        "ConnectTimeout=10",
        *([] if key else ["PubkeyAuthentication=no"]),
    ]
    argv = ["ssh", "-F", "/dev/null", "-p", str(fleet.gc.port), "-b", source]
    argv += [f"-o{option}" for option in options] + (["-i", str(key)] if key else [])
    argv += [f"ctl@{LOOPBACK}", "whoami"]
    return run(argv, timeout=30)


def served(result: subprocess.CompletedProcess[str]) -> bool:
    """groundcontrol answered (a key exchange and authentication), whatever the outcome."""
    return "Permission denied" in result.stderr


def refused(result: subprocess.CompletedProcess[str]) -> bool:
    """Closed at the door, before groundcontrol's version line."""
    return result.returncode == 255 and (
        "kex_exchange_identification" in result.stderr or "Connection closed" in result.stderr
    )


def test_exempt_source_served_neighbour_refused(exemptFleet: Fleet, tmp_path: Path) -> None:
    """
    From the exempt 127.0.0.2: three connections that close after the key exchange (one
    more than the allowance) and six failed logins (one more than the free failures) are
    all served, and alice then logs in from there; groundcontrol logs that it did not
    refuse the source because it is exempt. From 127.0.0.3 the third such connection is
    refused before any key exchange, and so is alice's login.
    """
    fleet = exemptFleet
    alice = fleet.operators["alice"]
    unknown = tmp_path / "unknown_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(unknown)], check=True)

    for _ in range(3):
        result = stranger(fleet, EXEMPT)
        assert served(result), result.stderr
    for _ in range(6):
        result = stranger(fleet, EXEMPT, unknown)
        assert served(result), result.stderr
    login = alice.ssh("ctl", "whoami", options=["-b", EXEMPT])
    assert login.returncode == 0 and "alice" in login.stdout, login.stderr

    for _ in range(2):
        result = stranger(fleet, NEIGHBOUR)
        assert served(result), result.stderr
    result = stranger(fleet, NEIGHBOUR)
    assert refused(result), result.stderr
    login = alice.ssh("ctl", "whoami", options=["-b", NEIGHBOUR])
    assert refused(login), login.stderr

    log = waitFor(
        lambda: (text := fleet.gc.process.output()) and f"refusing {NEIGHBOUR}" in text and text,
        10,
        "the refusal in groundcontrol's log",
    )
    assert f"not refusing {EXEMPT}" in log and "(exempt)" in log
    assert f"refusing {EXEMPT}" not in log.replace(f"not refusing {EXEMPT}", "")


def test_pending_refusals_penalise_their_source(tmp_path: Path) -> None:
    """
    With no room for pending devices (--max-pending 0), three new devices' real agents
    on 127.0.0.1 are refused at login and retry with their backoff; each refusal is a
    failed connection of 127.0.0.1, so after the five free ones groundcontrol refuses the
    address at the door and logs why (SECURITY.md, "Penalties").
    """
    fleet = Fleet(tmp_path)
    try:
        fleet.startServer("--max-pending", "0")
        for n in range(3):
            fleet.addAgent(f"newcomer{n}", approve=False)
        why = "failed connections (last: a new device refused by the pending caps)"
        log = waitFor(
            lambda: (text := fleet.gc.process.output()) and why in text and text,
            60,
            "groundcontrol to refuse 127.0.0.1 after the pending caps' refusals",
            interval=0.2,
        )
        line = next(x for x in log.splitlines() if why in x)
        assert f"refusing {LOOPBACK} for 2s after 6 {why}" in line, line
        assert "refused new device newcomer" in log
    finally:
        fleet.close()
