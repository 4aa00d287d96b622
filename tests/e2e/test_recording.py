"""
End to end: session recording, audit and the session commands with real processes (issue 6).
A real `ssh -tt dev_kiln7` (pexpect) session is recorded, replayed through `ssh ctl@gc
replay`, and both renderings compared on a pyte screen; `sessions --json` shows it;
`watch` follows a live session and `kill` ends one; a full disk (a tiny tmpfs mounted
over DATA/recordings) refuses sessions fail-closed and lets them run fail-open.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pyte
import pytest

from tests.e2e.harness import Fleet, readChunk, waitFor

PROMPT = "PROMPT>"
ROWS, COLS = 24, 80
QUIET = ("-o", "LogLevel=ERROR")


def spawnShell(fleet: Fleet) -> tuple[pexpect.spawn, list[str]]:
    """A real ssh -tt to kiln7 in a pexpect pty; everything it prints is kept."""
    alice = fleet.operators["alice"]
    argv = alice.argv("dev_kiln7", tty=True, options=QUIET)
    child = pexpect.spawn(
        argv[0],
        argv[1:],
        dimensions=(ROWS, COLS),
        encoding="utf-8",
        timeout=20,
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin", "HOME": str(fleet.base)},
    )
    seen: list[str] = []

    class Log:
        def write(self, text: str) -> None:
            seen.append(text)

        def flush(self) -> None:
            pass

    child.logfile_read = Log()
    # Type nothing before the device's first prompt: until ssh has put the local
    # terminal in raw mode, the local pty would echo it too, which no recording sees.
    child.expect(r"[#$] ")
    child.sendline(f"PS1='{PROMPT}'; export PS1")
    child.expect_exact(PROMPT)
    child.expect_exact(PROMPT)
    return child, seen


def render(text: str) -> list[str]:
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.Stream(screen)
    stream.feed(text)
    return [line.rstrip() for line in screen.display]


def ctl(fleet: Fleet, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return fleet.operators["alice"].ssh("ctl", *args, timeout=timeout)


def sessions(fleet: Fleet, *extra: str) -> list[dict[str, Any]]:
    result = ctl(fleet, "sessions", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def livePty(fleet: Fleet) -> dict[str, Any]:
    return waitFor(
        lambda: next((s for s in sessions(fleet) if s["pty"] and s["mode"] == "shell"), None),
        20,
        "the pty session to be listed",
    )


def test_recording_replays_to_same_screen(kiln7: Fleet) -> None:
    """A recorded pty session replays (speed 100) to the live session's final screen."""
    child, seen = spawnShell(kiln7)
    sessionId = livePty(kiln7)["id"]
    child.sendline("printf '\\033[1;31mred\\033[0m plain\\n'; seq 1 30 | tail -n 5")
    child.expect_exact("30")
    child.expect_exact(PROMPT)
    child.sendline("printf 'caf\\303\\251\\n'; echo done")
    child.expect_exact("done")
    child.expect_exact(PROMPT)
    child.sendline("exit 4")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 4
    live = "".join(seen)

    ended = waitFor(
        lambda: next(
            (s for s in sessions(kiln7, "--all") if s["id"] == sessionId and s["state"] == "ended"),
            None,
        ),
        20,
        "the session to be audited as ended",
    )
    assert ended["exit_status"] == 4
    assert ended["bytes_in"] > 0 and ended["bytes_out"] > 0
    assert ended["account"] == "alice" and ended["device"] == "kiln7"
    assert ended["client"].startswith("127.0.0.1:")
    assert ended["key_fingerprint"].startswith("SHA256:")
    assert ended["recording"].endswith(f"{sessionId}.cast")

    cast = kiln7.gc.data / "recordings" / ended["recording"]
    waitFor(lambda: cast.exists() and cast.stat().st_size > 200, 10, "the recording on disk")
    header = json.loads(cast.read_text().splitlines()[0])
    assert (header["version"], header["width"], header["height"]) == (2, COLS, ROWS)
    assert header["env"]["TERM"] == "xterm-256color"
    asciinema = shutil.which("asciinema") or str(Path(sys.executable).parent / "asciinema")
    if os.path.exists(asciinema):
        subprocess.run([asciinema, "cat", str(cast)], check=True, capture_output=True, timeout=30)

    replay = subprocess.run(
        kiln7.operators["alice"].argv("ctl", "replay", sessionId, "--speed", "100"),
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(kiln7.base)},
    )
    assert replay.returncode == 0, replay.stderr
    replayed = render(replay.stdout.decode("utf-8"))
    assert replayed == render(live)
    assert any("red plain" in line for line in replayed)
    assert any("caf\u00e9" in line for line in replayed)


def test_watch_follows_and_kill_ends(kiln7: Fleet) -> None:
    """watch streams a live session read-only; kill ends it with a message and status 255."""
    child, _ = spawnShell(kiln7)
    sessionId = livePty(kiln7)["id"]
    watcher = pexpect.spawn(
        "ssh",
        kiln7.operators["alice"].argv("ctl", "watch", sessionId)[1:],
        encoding="utf-8",
        timeout=20,
        env={"PATH": "/usr/bin:/bin", "HOME": str(kiln7.base)},
    )
    try:
        watcher.expect_exact(f"watching session {sessionId}")
        child.sendline("echo WATCHED-$((6*7))")
        child.expect_exact("WATCHED-42")
        watcher.expect_exact("WATCHED-42")

        result = ctl(kiln7, "kill", sessionId)
        assert result.returncode == 0, result.stderr
        child.expect_exact(f"session {sessionId} was ended by alice")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 255
        watcher.expect_exact(f"session {sessionId} ended")
        watcher.expect(pexpect.EOF)
    finally:
        watcher.close(force=True)
    ended = next(s for s in sessions(kiln7, "--all") if s["id"] == sessionId)
    assert ended["killed_by"] == "alice"


def test_watch_in_a_terminal_shows_its_header(kiln7: Fleet) -> None:
    """
    ssh -tt ctl@gc watch: the replayed screen's clear would wipe the header line, so the
    header comes again on the watcher's bottom row; the screen a terminal draws from it
    (pyte) shows the session's prompt and the header both.
    """
    child, _ = spawnShell(kiln7)
    sessionId = livePty(kiln7)["id"]
    watcher = pexpect.spawn(
        "ssh",
        kiln7.operators["alice"].argv("ctl", "watch", sessionId, tty=True, options=QUIET)[1:],
        dimensions=(ROWS, COLS),
        encoding="utf-8",
        timeout=20,
        env={"PATH": "/usr/bin:/bin", "HOME": str(kiln7.base)},
    )
    seen = io.StringIO()
    watcher.logfile_read = seen
    try:
        watcher.expect_exact(f"\x1b[{ROWS};1H\x1b[7mwatching session {sessionId}")
        watcher.expect_exact("\x1b8")
        screen = render(seen.getvalue())
        assert screen[-1].startswith(f"watching session {sessionId}: alice on kiln7"), screen
        assert any(PROMPT in line for line in screen[:-1]), screen
    finally:
        watcher.close(force=True)
        child.close(force=True)


@contextlib.contextmanager
def fullDisk(directory: Path) -> Iterator[None]:
    """A 64 KiB tmpfs over C{directory}, filled to the last byte."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * chunk)
        finally:
            os.close(fd)
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_full_disk_fail_closed_then_open(kiln7: Fleet) -> None:
    """On a full disk a pty session is refused (fail-closed), or runs unrecorded (fail-open)."""
    recordings = kiln7.gc.data / "recordings"
    alice = kiln7.operators["alice"]
    with fullDisk(recordings):
        refused = alice.ssh("dev_kiln7", "echo", "hello", timeout=30, options=())
        # exec without a pty is not recorded, so it runs
        assert refused.returncode == 0 and refused.stdout == "hello\n"
        tty = subprocess.run(
            alice.argv("dev_kiln7", "echo", "recorded", tty=True, options=QUIET),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert tty.returncode != 0
        assert "session refused" in tty.stderr + tty.stdout
        assert "No space left on device" in tty.stderr + tty.stdout
        assert "recorded\r\n" not in tty.stdout
        failed = [s for s in sessions(kiln7, "--all") if s.get("recording_error")]
        assert failed and "No space left" in failed[-1]["recording_error"]

        kiln7.restartServer("--recording-failure", "open")
        kiln7.waitRoutable(alice, "kiln7")
        goes = subprocess.run(
            alice.argv("dev_kiln7", "echo", "unrecorded", tty=True, options=QUIET),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert goes.returncode == 0, goes.stderr
        assert "unrecorded" in goes.stdout


BULK = 100 * 1024 * 1024


def test_fast_output_is_recorded_not_ended(kiln7: Fleet) -> None:
    """
    100 MiB of NULs on a pty as fast as the device makes them (each becomes six bytes
    of JSON in the cast, about 600 MB): fail-closed (the default), the session completes
    with status 0 and the recording holds every byte. The recorder used to end such
    sessions ("the disk is not keeping up") after 8-56 MB; now it slows them if need be.
    """
    alice = kiln7.operators["alice"]
    argv = alice.argv("dev_kiln7", f"head -c {BULK} /dev/zero", tty=True, options=QUIET)
    ssh = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": str(kiln7.base)},
    )
    assert ssh.stdout is not None
    try:
        received = 0
        # Bounded only while no byte comes (a stalled session fails, not hangs the run);
        # generous, as the recorder may slow the session while the disk catches up.
        while chunk := readChunk(ssh.stdout, "the bulk session's output", 1 << 20, timeout=120):
            received += len(chunk)
        stderr = ssh.communicate(timeout=30)[1].decode("utf-8", "replace")
    finally:
        if ssh.poll() is None:
            ssh.kill()
            ssh.communicate(timeout=30)
    assert ssh.returncode == 0, stderr
    assert received == BULK, stderr

    ended = waitFor(
        lambda: next(
            (
                s
                for s in sessions(kiln7, "--all")
                if s["pty"] and s["mode"] == "exec" and s["state"] == "ended"
            ),
            None,
        ),
        20,
        "the bulk session to be audited as ended",
    )
    assert not ended.get("recording_error"), ended
    assert ended["exit_status"] == 0
    cast = kiln7.gc.data / "recordings" / ended["recording"]

    def recorded() -> int:
        with cast.open("rb") as f:
            f.readline()  # the header
            total = 0
            for line in f:
                if not line.endswith(b"\n"):
                    return 0  # still being written
                _at, code, text = json.loads(line)
                if code == "o":
                    total += len(text)
            return total

    assert waitFor(lambda: recorded() == BULK, 20, "the whole output in the recording")
