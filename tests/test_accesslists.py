"""
Grants and enrollment tokens: ``groundcontrol grants`` / ``token list`` and the control
shell's ``grants`` / ``tokens`` print the same table for the same records, in the times
``show`` uses. One store in a temporary data directory, a fixed clock, no reactor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.internet.task import Clock

from groundcontrol.cli import main
from groundcontrol.control import ControlContext, runCommand
from groundcontrol.datadir import DataDir
from groundcontrol.registry import Registry
from groundcontrol.store import SQLiteStore, openSQLiteStore, synchronousRunner
from groundcontrol.testing import publicLine, resultNow

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOUR = 3600.0

GRANTS = """\
USER   SELECTOR     LOGIN  AGENT_FWD  EXPIRES               STATE    BY
alice  group:field  pi     yes        never                 active   root
alice  tag:lab      -      no         2023-11-15T06:13:20Z  active   root
alice  tag:old      -      no         2023-11-14T21:13:20Z  expired  root
"""

TOKENS = """\
ID  STATE    USES_LEFT  EXPIRES               CREATED               BY
1   active   3/3        2023-11-15T22:13:20Z  2023-11-14T22:13:20Z  root
2   expired  1/1        2023-11-14T23:13:20Z  2023-11-14T21:13:20Z  ci?bot
"""


def cli(capsys: pytest.CaptureFixture[str], data: Path, *argv: str, now: float = T0) -> str:
    status = main(["--data", str(data), *argv], now=lambda: now)
    out, _ = capsys.readouterr()
    assert status == 0
    return out


def ctl(store: SQLiteStore, *argv: str, now: float = T0) -> str:
    root = next(a for a in resultNow(store.listAccounts()) if a.name == "root")
    assert root.isAdmin
    clock = Clock()
    clock.advance(now)
    context = ControlContext(root, store, Registry(), clock)
    result = resultNow(defer.Deferred.fromCoroutine(runCommand(context, list(argv))))
    assert result.status == 0, result.stderr
    return str(result.stdout)


def storeWithAccounts(data: Path) -> SQLiteStore:
    """
    A data directory initialised at C{data}, its store opened with accounts root (admin)
    and alice; C{store.data} is the directory, for the CLI.
    """
    assert main(["--data", str(data), "init"], now=lambda: T0) == 0
    s: SQLiteStore = resultNow(openSQLiteStore(str(DataDir(data).databasePath), synchronousRunner))
    for name, admin in (("root", True), ("alice", False)):
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        resultNow(s.addAccount(name, [publicLine(key)], admin, T0))
    s.data = data  # type: ignore[attr-defined]
    return s


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """An initialised data directory with root (admin), alice, three grants, two tokens."""
    s = storeWithAccounts(tmp_path / "gc")
    resultNow(s.grant("alice", "tag:lab", "root", T0, expiresAt=T0 + 8 * HOUR))
    resultNow(s.grant("alice", "group:field", "root", T0, loginUser="pi", agentForwarding=True))
    resultNow(s.grant("alice", "tag:old", "root", T0 - 2 * HOUR, expiresAt=T0 - HOUR))
    resultNow(s.createToken("a" * 64, 3, T0 + 24 * HOUR, "root", T0))
    resultNow(s.createToken("b" * 64, 1, T0 + HOUR, "ci\x1bbot", T0 - HOUR))
    capsys.readouterr()
    yield s
    s.close()


def test_grantsTheSameInBoth(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's grants and the control shell's are one table, in show's times."""
    assert cli(capsys, store.data, "grants") == GRANTS
    assert ctl(store, "grants") == GRANTS


def test_tokensTheSameInBoth(store: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    The CLI's token list and the control shell's tokens are one table (no secret: the
    store has only hashes); an actor's control characters are replaced.
    """
    later = T0 + 2 * HOUR  # past the second token's expiry
    assert cli(capsys, store.data, "token", "list", now=later) == TOKENS
    assert ctl(store, "tokens", now=later) == TOKENS
