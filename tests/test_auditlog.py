"""
The audit log as people and scripts read it: C{groundcontrol audit} and C{ctl audit} print
the same events, oldest first, in the JSON vocabulary (snake_case, ISO Z times) however the
row was stored. One store in a temporary data directory, a fixed clock, no reactor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from groundcontrol.cli import main
from groundcontrol.control import ControlContext, runCommand
from groundcontrol.registry import Registry
from groundcontrol.store import SQLiteStore
from groundcontrol.testing import resultNow
from tests.test_accesslists import storeWithAccounts

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOUR = 3600.0


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """
    root (admin) and alice (two account.added rows, ids 1 and 2), then three rows as the
    store has always written them: a claim renewal (camelCase, epoch times), a revocation
    and a row whose detail is already in today's spelling.
    """
    s = storeWithAccounts(tmp_path / "gc")
    resultNow(
        s.audit(
            "claim.renewed",
            "alice",
            "kiln7",
            {"owner": "alice", "leaseUntil": T0 + 2 * HOUR, "was": T0 + HOUR},
            T0,
        )
    )
    resultNow(
        s.audit("device.revoked", "root", "kiln7", {"revokedCertificates": ["0a1b", "0c"]}, T0)
    )
    resultNow(
        s.audit("claim.released", "alice", "oven\x1b3", {"lease_until": "2023-11-15T00:13:20Z"}, T0)
    )
    capsys.readouterr()
    yield s
    s.close()


def cli(capsys: pytest.CaptureFixture[str], store: Any, *argv: str) -> str:
    assert main(["--data", str(store.data), "audit", *argv], now=lambda: T0) == 0
    return capsys.readouterr().out


def ctl(store: SQLiteStore, account: str, *argv: str) -> tuple[int, str, str]:
    who = next(a for a in resultNow(store.listAccounts()) if a.name == account)
    clock = Clock()
    clock.advance(T0)
    context = ControlContext(who, store, Registry(), clock)
    result = resultNow(defer.Deferred.fromCoroutine(runCommand(context, ["audit", *argv])))
    return result.status, str(result.stdout), str(result.stderr)


def test_latestEventsAsATable(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    The latest events, oldest first, one a line: id, time, event, device, actor, and the
    detail as key=value in today's spelling (a stored leaseUntil reads lease_until, an
    epoch time ISO), device-given text cleaned.
    """
    assert cli(capsys, store, "--limit", "3") == (
        "ID  AT                    EVENT           DEVICE  ACTOR  DETAIL\n"
        "3   2023-11-14T22:13:20Z  claim.renewed   kiln7   alice  "
        "lease_until=2023-11-15T00:13:20Z owner=alice previous_lease_until=2023-11-14T23:13:20Z\n"
        "4   2023-11-14T22:13:20Z  device.revoked  kiln7   root   "
        "revoked_certificates=0a1b,0c\n"
        "5   2023-11-14T22:13:20Z  claim.released  oven?3  alice  "
        "lease_until=2023-11-15T00:13:20Z\n"
    )


def test_jsonInTheVocabulary(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    --json gives each event's document, as webhooks are sent it: an old row and a row
    already in today's spelling read alike.
    """
    renewed, revoked, released = json.loads(cli(capsys, store, "--limit", "3", "--json"))
    assert renewed == {
        "id": 3,
        "event": "claim.renewed",
        "device": "kiln7",
        "actor": "alice",
        "at": "2023-11-14T22:13:20Z",
        "detail": {
            "owner": "alice",
            "lease_until": "2023-11-15T00:13:20Z",
            "previous_lease_until": "2023-11-14T23:13:20Z",
        },
    }
    assert revoked["detail"] == {"revoked_certificates": ["0a1b", "0c"]}
    assert released["detail"]["lease_until"] == renewed["detail"]["lease_until"]


def test_afterAnId(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """--after ID reads on from the last id seen; --limit bounds how many."""
    assert [e["id"] for e in json.loads(cli(capsys, store, "--after", "1", "--json"))] == [
        2,
        3,
        4,
        5,
    ]
    after = json.loads(cli(capsys, store, "--after", "1", "--limit", "2", "--json"))
    assert [e["id"] for e in after] == [2, 3]
    assert json.loads(cli(capsys, store, "--after", "5", "--json")) == []
    assert main(["--data", str(store.data), "audit", "--after", "-1"]) == 2


def test_shellGivesTheSame(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """ctl audit prints what the CLI prints, as text and JSON; operators are refused."""
    assert ctl(store, "root", "--limit", "4") == (0, cli(capsys, store, "--limit", "4"), "")
    status, out, _ = ctl(store, "root", "--json")
    assert (status, out) == (0, cli(capsys, store, "--json"))
    status, _, err = ctl(store, "alice")
    assert status == 1 and "only admins" in err


def test_sameOptionsInBothHelps(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    ctl audit --help names and explains --limit and --after as the CLI's does (it once
    read --limit LIMIT --after AFTER), and refuses a bad value in the same words.
    """
    assert main(["--data", str(store.data), "audit", "--help"]) == 0
    cliHelp = capsys.readouterr().out
    _, shellHelp, _ = ctl(store, "root", "--help")
    for text in (cliHelp, shellHelp):
        assert "[--limit N] [--after ID]" in text
        assert "  --limit N   at most N events (50)\n" in text
        assert "  --after ID  the events after this id (the last one seen, to read on" in text
    for argv, words in (
        (["--limit", "0"], "must be at least 1, not 0"),
        (["--after", "-1"], "not a whole number: '-1'"),
    ):
        assert main(["--data", str(store.data), "audit", *argv]) == 2
        assert f"argument {argv[0]}: {words}" in capsys.readouterr().err
        status, _, err = ctl(store, "root", *argv)
        assert status == 2 and f"argument {argv[0]}: {words}" in err, err
