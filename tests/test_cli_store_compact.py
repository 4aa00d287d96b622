"""Tests of C{groundcontrol store compact}: the SQLite store's free space back to the disk."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from groundcontrol.cli import main
from groundcontrol.datadir import DataDir
from groundcontrol.store import SQLiteStore, _space, openStore, synchronousRunner
from tests.test_cli import T0, result, run
from tests.test_store_space import DAY, INCREMENTAL, NONE, makeOldStore, pragma, writeSessions


@pytest.fixture
def oldData(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """
    A data directory whose store an older release made (no auto-vacuum) and pruning left
    with free pages.
    """
    path = tmp_path / "gc"
    assert run(capsys, "--data", str(path), "init")[0] == 0
    database = DataDir(path).databasePath
    database.unlink()
    makeOldStore(str(database))
    store = result(openStore(str(database), synchronousRunner))
    assert isinstance(store, SQLiteStore)
    writeSessions(store, 1000)
    result(store.pruneAudit(T0 + DAY, 1000, T0 + 400 * DAY))
    store.close()
    return path


def test_compact(oldData: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    The store is rewritten without its free pages and made incremental; the command says
    how many bytes it gave back, and they are what the file shrank by.
    """
    database = str(DataDir(oldData).databasePath)
    assert pragma(database, "freelist_count") > 50
    before = Path(database).stat().st_size
    status, out, err = run(capsys, "--data", str(oldData), "store", "compact")
    assert (status, err) == (0, "")
    after = Path(database).stat().st_size
    match = re.fullmatch(
        rf"compacted {re.escape(database)}: ([\d,]+) bytes before, ([\d,]+) after, "
        r"([\d,]+) given back; pruning \(--audit-max-age\) now gives space back as it goes\n",
        out,
    )
    assert match is not None, out
    numbers = [int(n.replace(",", "")) for n in match.groups()]
    assert numbers == [before, after, before - after]
    assert before - after > 50 * 4096
    assert pragma(database, "auto_vacuum") == INCREMENTAL
    assert pragma(database, "freelist_count") == 0
    status, out, _ = run(capsys, "--data", str(oldData), "audit", "--limit", "1")
    assert status == 0 and "audit.pruned" in out


def test_compactJSON(oldData: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{--json}: one document, in the CLI's vocabulary (snake_case keys, every key present):
    the store's file, compacted, its bytes before and after, and what was given back.
    """
    database = str(DataDir(oldData).databasePath)
    before = Path(database).stat().st_size
    status, out, err = run(capsys, "--data", str(oldData), "store", "compact", "--json")
    assert (status, err) == (0, "")
    after = Path(database).stat().st_size
    document = json.loads(out)
    assert out == json.dumps(document, indent=2, sort_keys=True) + "\n"
    assert document == {
        "backend": "sqlite",
        "store": database,
        "compacted": True,
        "bytes_before": before,
        "bytes_after": after,
        "bytes_given_back": before - after,
    }
    assert before - after > 50 * 4096
    assert pragma(database, "auto_vacuum") == INCREMENTAL


def test_refusedWhileOpenJSON(
    oldData: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With C{--json} a refusal is the same: nothing on stdout, the reason on stderr, 1."""
    monkeypatch.setattr(_space, "_COMPACT_BUSY_TIMEOUT_MS", 0)
    server = result(openStore(str(DataDir(oldData).databasePath), synchronousRunner))
    try:
        status, out, err = run(capsys, "--data", str(oldData), "store", "compact", "--json")
    finally:
        server.close()
    assert (status, out) == (1, "")
    assert "is in use by another process" in err


def test_refusedWhileOpen(
    oldData: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused, exit status 1, while another process (the server) has the store open."""
    monkeypatch.setattr(_space, "_COMPACT_BUSY_TIMEOUT_MS", 0)
    database = str(DataDir(oldData).databasePath)
    server = result(openStore(database, synchronousRunner))
    try:
        status, out, err = run(capsys, "--data", str(oldData), "store", "compact")
    finally:
        server.close()
    assert (status, out) == (1, "")
    assert err == (
        f"groundcontrol: error: {database} is in use by another process (groundcontrol, or "
        "a groundcontrol command): stop groundcontrol first; compacting needs the store to "
        "itself\n"
    )
    assert pragma(database, "auto_vacuum") == NONE


def test_storeElsewhere(oldData: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """C{--store sqlite:///PATH} compacts that file."""
    moved = oldData.parent / "elsewhere.sqlite3"
    DataDir(oldData).databasePath.rename(moved)
    status, out, _ = run(
        capsys, "--data", str(oldData), "--store", f"sqlite://{moved}", "store", "compact"
    )
    assert status == 0 and out.startswith(f"compacted {moved}: ")
    assert pragma(str(moved), "auto_vacuum") == INCREMENTAL


def test_postgreSQL(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL: nothing to do, said so, exit status 0; the database is not even reached."""
    url = "postgresql://gc@db.invalid/groundcontrol"
    status, out, err = run(
        capsys, "--data", str(tmp_path / "gc"), "--store", url, "store", "compact"
    )
    assert (status, err) == (0, "")
    assert out == (
        "the store is PostgreSQL: its autovacuum makes the space of deleted rows reusable; "
        "nothing to compact\n"
    )


def test_postgreSQLJSON(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    PostgreSQL with C{--json}: not compacted, the sizes null, the URL without its password
    (as C{init} prints it); the database is not reached.
    """
    url = "postgresql://gc:secret@db.invalid/groundcontrol"
    status, out, err = run(
        capsys, "--data", str(tmp_path / "gc"), "--store", url, "store", "compact", "--json"
    )
    assert (status, err) == (0, "")
    assert json.loads(out) == {
        "backend": "postgresql",
        "store": "postgresql://gc:***@db.invalid/groundcontrol",
        "compacted": False,
        "bytes_before": None,
        "bytes_after": None,
        "bytes_given_back": None,
    }


def test_notInitialised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No data directory: refused as every store command is, and no store is made."""
    path = tmp_path / "gc"
    status, _, err = run(capsys, "--data", str(path), "store", "compact")
    assert status == 1 and "is not initialised; run: groundcontrol" in err
    assert not path.exists()


def test_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """C{store} alone is a usage error (exit status 2) naming its one subcommand."""
    assert main(["--data", str(tmp_path), "store"]) == 2
    assert "{compact}" in capsys.readouterr().err


def test_openedStoreStaysWal(oldData: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After compacting, the store is still in WAL mode, for the server and the CLI to share."""
    assert run(capsys, "--data", str(oldData), "store", "compact")[0] == 0
    connection = sqlite3.connect(str(DataDir(oldData).databasePath))
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()
