"""
End to end: faults with real processes (issue 8). Expected behaviour for each is in
SECURITY.md ("Faults"); these tests assert it.

  - groundcontrol killed with SIGKILL and started again: agents come back and are
    routable, the store is intact, every audit event of a change whose command returned
    is there;
  - an agent killed with SIGKILL: the device is offline at once (the kernel closes its
    socket), routable again when the agent is back;
  - the database locked by another process: changes fail after the busy timeout with a
    clear message and nothing half-done; logins (reads) go on; changes work once the lock
    is released;
  - the disk of the data directory full (a small tmpfs made and removed here): changes
    fail with a clear message, logins go on, changes work once there is room.

A blackholed link (network namespaces) is not here yet; the keepalive that finds it is
tested in memory (tests/test_keepalive.py, tests/test_clock_jumps.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet, readLine, waitFor

pytestmark = pytest.mark.slow


def auditIds(fleet: Fleet) -> list[int]:
    with contextlib.closing(sqlite3.connect(fleet.gc.data / "groundcontrol.sqlite3")) as db:
        return [row[0] for row in db.execute("SELECT id FROM audit ORDER BY id")]


def test_groundcontrol_kill9_and_restart(kiln7: Fleet) -> None:
    """
    After SIGKILL and a restart on the same port: the agent reconnects and is routable,
    the store still knows its devices and accounts, and the audit log holds every event
    up to the last change whose command had returned (ids without gaps).
    """
    alice = kiln7.operators["alice"]
    kiln7.addOperator("bob")
    kiln7.gc.cli("grant", "bob", "kiln7")
    assert alice.ssh("ctl", "grant", "bob", "kiln7", "--for", "1h").returncode == 0
    before = auditIds(kiln7)
    assert kiln7.gc.process is not None
    kiln7.gc.process.signal(signal.SIGKILL)
    kiln7.gc.process.kill()
    kiln7.gc.start(port=kiln7.gc.port or 0)
    kiln7.waitRoutable(alice, "kiln7", timeout=60)
    after = auditIds(kiln7)
    assert after[: len(before)] == before
    assert after == list(range(1, len(after) + 1))
    devices = {d["name"]: d for d in kiln7.gc.devices()}
    assert devices["kiln7"]["state"] == "approved"
    bob = kiln7.operators["bob"]
    assert bob.ssh("dev_kiln7", "true").returncode == 0


def test_recording_readable_after_groundcontrol_kill9(kiln7: Fleet) -> None:
    """
    groundcontrol killed -9 in the middle of a recorded pty session: the recording
    already on disk is valid asciicast v2 up to its last whole line (a line torn by the
    kill is the only loss), and holds the output flushed before the kill.
    """
    import json

    import pexpect

    from groundcontrol.recording import parseCast

    alice = kiln7.operators["alice"]
    argv = alice.argv("dev_kiln7", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=20)
    try:
        child.sendline("echo MARK-$((6*7))")
        child.expect_exact("MARK-42")
        recordings = kiln7.gc.data / "recordings"

        def flushed() -> Path | None:
            for cast in recordings.rglob("*.cast"):
                if "MARK-42" in cast.read_text(errors="replace"):
                    return cast
            return None

        cast = waitFor(flushed, 10, "the recording to reach the disk")
        child.sendline("yes | head -c 3000000 | tail -c 100")  # output in flight at the kill
        assert kiln7.gc.process is not None
        kiln7.gc.process.kill()
    finally:
        child.close(force=True)
    lines = cast.read_text(errors="replace").split("\n")
    whole = [line for line in lines if line]
    try:
        json.loads(whole[-1])
    except ValueError:
        whole = whole[:-1]  # torn by the kill
    recording = parseCast("\n".join(whole) + "\n")
    assert recording.header["width"] > 0
    assert any("MARK-42" in text for _, code, text in recording.events if code == "o")


def test_agent_kill9(kiln7: Fleet) -> None:
    """A killed agent's device is offline at once; routable again when it is back."""
    alice = kiln7.operators["alice"]
    (agent,) = kiln7.agents
    assert agent.process is not None
    agent.process.kill()

    def offline() -> bool:
        # ctl ls: an ssh to the device would wait for it (--device-wait).
        result = alice.ssh("ctl", "ls", "--json", timeout=20)
        rows = json.loads(result.stdout) if result.returncode == 0 else []
        return any(row["name"] == "kiln7" and row["online"] is False for row in rows)

    waitFor(offline, 10, "kiln7 to be offline", interval=0.2)
    agent.start(kiln7.serverAddress, str(kiln7.gc.data / "ssh_host_ed25519_key.pub"))
    kiln7.waitRoutable(alice, "kiln7", timeout=60)


@contextlib.contextmanager
def exclusiveLock(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding an exclusive SQLite lock on the database until released."""
    holder = subprocess.Popen(
        [
            "python3",
            "-c",
            "import sqlite3,sys; db=sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert readLine(holder.stdout, "the lock holder").strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_database_locked(kiln7: Fleet) -> None:
    """
    While another process holds an exclusive lock, a change fails with a clear message
    (and leaves no audit event); an operator still logs in and reads (ctl ls), but a
    device session is refused, saying why, since its session.started cannot be written
    (audit before access, fail-closed); once the lock is gone the same change succeeds.
    """
    alice = kiln7.operators["alice"]
    kiln7.addOperator("bob")
    before = auditIds(kiln7)
    with exclusiveLock(kiln7.gc.data / "groundcontrol.sqlite3"):
        result = alice.ssh("ctl", "grant", "bob", "kiln7", timeout=60)
        assert result.returncode != 0
        assert "locked" in result.stderr, result.stderr
        assert alice.ssh("ctl", "ls", timeout=30).returncode == 0
        refused = alice.ssh("dev_kiln7", "true", timeout=30)
        assert refused.returncode == 255
        assert "session refused: it cannot be audited" in refused.stderr, refused.stderr
        assert "locked" in refused.stderr, refused.stderr
    assert auditIds(kiln7) == before
    assert alice.ssh("dev_kiln7", "true", timeout=30).returncode == 0
    result = alice.ssh("ctl", "grant", "bob", "kiln7", timeout=60)
    assert result.returncode == 0, result.stderr
    assert kiln7.operators["bob"].ssh("dev_kiln7", "true").returncode == 0


@contextlib.contextmanager
def smallDisk(where: Path, size: str = "4m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "accesstunnel-test", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def test_disk_full(tmp_path: Path) -> None:
    """
    With the data directory's disk full, a change fails with a clear message and
    groundcontrol keeps serving logins; a device session is refused because its
    session.started cannot be written (audit before access, fail-closed); with room
    again, the change succeeds and sessions run.
    """
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is required")
    # 16 MiB: the fleet's start-up writes (the store and its write-ahead log, which SQLite
    # lets grow to ~4 MiB before a checkpoint, keys, logs) must fit with room to spare, so
    # that the disk is full only once the filler below fills it (4 MiB was full before it
    # in one fresh-clone run: the filler's open failed).
    with smallDisk(tmp_path / "disk", size="16m") as disk:
        base = disk / "fleet"
        base.mkdir()
        fleet = Fleet(base)
        try:
            alice = fleet.addOperator("alice", admin=True)
            fleet.addOperator("bob")
            fleet.startServer()
            fleet.addAgent("kiln7")
            fleet.waitRoutable(alice, "kiln7")
            filler = disk / "filler"
            with filler.open("wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            before = auditIds(fleet)
            result = alice.ssh("ctl", "users", timeout=30)
            assert result.returncode == 0, result.stderr  # logins and reads go on
            failed = alice.ssh("ctl", "tokens", "create", timeout=30)
            assert failed.returncode != 0
            assert "full" in failed.stderr, failed.stderr
            refused = alice.ssh("dev_kiln7", "true", timeout=30)
            assert refused.returncode == 255
            assert "session refused: it cannot be audited" in refused.stderr, refused.stderr
            assert "full" in refused.stderr, refused.stderr
            assert auditIds(fleet) == before
            filler.unlink()
            done = alice.ssh("ctl", "tokens", "create", timeout=30)
            assert done.returncode == 0, done.stderr
            assert alice.ssh("dev_kiln7", "true", timeout=30).returncode == 0
        finally:
            fleet.close()
