"""
End to end: commands run on a device through groundcontrol behave exactly as
over a direct ssh connection (issue 2, exec half).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from tests.e2e.harness import Fleet


def test_exit_status_and_streams_apart(kiln7: Fleet) -> None:
    """stdout and stderr arrive separately and the exit status comes back."""
    alice = kiln7.operators["alice"]
    result = alice.ssh("dev_kiln7", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert "err\n" in result.stderr
    assert "out" not in result.stderr


def test_stdin_piped_and_eof_delivered(kiln7: Fleet) -> None:
    """Input reaches the command and EOF ends it: wc -l counts two lines."""
    alice = kiln7.operators["alice"]
    result = alice.ssh("dev_kiln7", "wc -l", input="a\nb\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


def test_killed_command_reports_signal(kiln7: Fleet) -> None:
    """A command killed by a signal gives exit-signal: ssh reports it and exits 255."""
    alice = kiln7.operators["alice"]
    result = subprocess.run(
        alice.argv("dev_kiln7", "kill -TERM $$", options=["-v"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 255
    assert "exit-signal" in result.stderr


def test_100_megabytes_each_way_byte_exact(kiln7: Fleet, tmp_path: Path) -> None:
    """100 MB round-trip unchanged in both directions (sha256 compared)."""
    alice = kiln7.operators["alice"]
    payload = tmp_path / "payload"
    with payload.open("wb") as f:
        block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB of non-repeating-ish data
        for i in range(100):
            f.write(bytes([i]) + block[1:])
    expected = hashlib.sha256(payload.read_bytes()).hexdigest()

    up = subprocess.run(
        alice.argv("dev_kiln7", "sha256sum"),
        stdin=payload.open("rb"),
        capture_output=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    assert up.stdout.split()[0].decode() == expected

    down = subprocess.run(
        alice.argv("dev_kiln7", f"cat {payload}"),
        capture_output=True,
        timeout=300,
    )
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256(down.stdout).hexdigest() == expected
