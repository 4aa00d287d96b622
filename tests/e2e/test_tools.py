"""
End to end: the OpenSSH tools that ride on SSH behave as if the device were
directly reachable: scp (SFTP and legacy), sftp, rsync (issue 5).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def makeTree(root: Path) -> dict[str, str]:
    """A small tree with odd modes, times and a binary file; returns relative path -> sha."""
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.txt": b"hello\n",
        "sub/b.bin": os.urandom(300_000),
        "sub/deeper/c sp.txt": b"spaces in name\n",
    }
    for rel, content in files.items():
        (root / rel).write_bytes(content)
    os.chmod(root / "sub" / "b.bin", 0o640)
    os.utime(root / "a.txt", (1_600_000_000, 1_600_000_000))
    return {rel: hashlib.sha256(content).hexdigest() for rel, content in files.items()}


def scpArgv(fleet: Fleet, *args: str) -> list[str]:
    return ["scp", "-F", str(fleet.operators["alice"].configPath), *args]


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "scp-protocol"])
def test_scp_both_ways_recursive_keeps_modes_and_times(
    kiln7: Fleet, tmp_path: Path, legacy: bool
) -> None:
    """scp -rp up and back down: same bytes, modes and mtimes (default and -O)."""
    source = tmp_path / "src"
    source.mkdir()
    expected = makeTree(source)
    remote = kiln7.base / "remote-copy"
    flags = ["-O"] if legacy else []
    up = subprocess.run(
        scpArgv(kiln7, *flags, "-rp", str(source), f"dev_kiln7@groundcontrol:{remote}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back"
    down = subprocess.run(
        scpArgv(kiln7, *flags, "-rp", f"dev_kiln7@groundcontrol:{remote}", str(back)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr
    for rel, digest in expected.items():
        assert sha256(back / rel) == digest, rel
    assert (back / "sub" / "b.bin").stat().st_mode & 0o777 == 0o640
    assert int((back / "a.txt").stat().st_mtime) == 1_600_000_000


def test_sftp_batch(kiln7: Fleet, tmp_path: Path) -> None:
    """sftp -b runs a batch: mkdir, put, ls, get; the files match."""
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(2_000_000))
    remoteDir = kiln7.base / "sftp-dir"
    batch = tmp_path / "batch"
    batch.write_text(
        f"mkdir {remoteDir}\nput {local} {remoteDir}/p.bin\nls -l {remoteDir}\n"
        f"get {remoteDir}/p.bin {tmp_path}/got.bin\n"
    )
    result = subprocess.run(
        [
            "sftp",
            "-F",
            str(kiln7.operators["alice"].configPath),
            "-b",
            str(batch),
            "dev_kiln7@groundcontrol",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "p.bin" in result.stdout
    assert sha256(tmp_path / "got.bin") == sha256(local)


def test_rsync_archive_and_delta(kiln7: Fleet, tmp_path: Path) -> None:
    """rsync -a copies a tree; a second run after a small change sends only a delta."""
    source = tmp_path / "src"
    source.mkdir()
    makeTree(source)
    big = source / "big.bin"
    big.write_bytes(os.urandom(4_000_000))
    remote = kiln7.base / "rsync-copy"
    ssh = f"ssh -F {kiln7.operators['alice'].configPath}"

    def rsync() -> str:
        result = subprocess.run(
            [
                "rsync",
                "-a",
                "--stats",
                "-e",
                ssh,
                f"{source}/",
                f"dev_kiln7@groundcontrol:{remote}/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    rsync()
    assert sha256(remote / "big.bin") == sha256(big)
    with big.open("r+b") as f:  # change 10 bytes in the middle
        f.seek(2_000_000)
        f.write(b"0123456789")
    later = big.stat().st_mtime + 10  # same size: make rsync's quick check see the change
    os.utime(big, (later, later))
    stats = rsync()
    assert sha256(remote / "big.bin") == sha256(big)
    literal = next(line for line in stats.splitlines() if line.startswith("Literal data"))
    sentLiteral = int(literal.split(":")[1].split()[0].replace(",", ""))
    assert sentLiteral < 100_000, literal  # a delta, not the 4 MB file again


def test_sftp_fallback_when_device_has_no_sftp_server(fleet: Fleet, tmp_path: Path) -> None:
    """An agent without sftp-server serves SFTP itself: scp still works."""
    fleet.addAgent("bare", extraArgs=["--sftp-server", "none"])
    alice = fleet.operators["alice"]
    fleet.waitRoutable(alice, "bare")
    local = tmp_path / "f.bin"
    local.write_bytes(os.urandom(100_000))
    remote = fleet.base / "fallback.bin"
    result = subprocess.run(
        scpArgv(fleet, str(local), f"dev_bare@groundcontrol:{remote}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sha256(remote) == sha256(local)


def test_sftp_interactive(kiln7: Fleet, tmp_path: Path) -> None:
    """sftp at its prompt: cd, put, ls and get work as typed by a person."""
    import pexpect

    local = tmp_path / "typed.bin"
    local.write_bytes(os.urandom(50_000))
    remoteDir = kiln7.base / "interactive"
    remoteDir.mkdir()
    child = pexpect.spawn(
        "sftp",
        ["-F", str(kiln7.operators["alice"].configPath), "dev_kiln7@groundcontrol"],
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect_exact("sftp> ")
        child.sendline(f"cd {remoteDir}")
        child.expect_exact("sftp> ")
        child.sendline(f"put {local}")
        child.expect_exact("sftp> ")
        child.sendline("ls")
        child.expect_exact("typed.bin")
        child.expect_exact("sftp> ")
        child.sendline(f"get typed.bin {tmp_path}/back.bin")
        child.expect_exact("sftp> ")
        child.sendline("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert sha256(tmp_path / "back.bin") == sha256(local)
