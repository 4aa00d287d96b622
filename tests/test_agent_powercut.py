"""
The agent's state directory after a power cut between writing a state file's temporary file
and renaming or linking it (L{accesstunnel.statefiles}): the temporary file stayed there for
ever. The agent removes those of its own writer when it starts, and says which, once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from accesstunnel import statefiles
from agent import tap
from agent.enrollment import CERTIFICATE_FILE, STATUS_FILE
from agent.identity import DEVICE_KEY_FILE, ServerKeyPin, loadOrCreateDeviceKey
from tests.test_agent_disk import names
from tests.test_agent_readonly import ReadOnlyDisk


def deadPID() -> int:
    """A process number no process has: the kernel gives out numbers below pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def start(stateDir: Path) -> list[str]:
    """Start the agent on C{stateDir} as twistd and tunnel-agentd do; the lines it logs."""
    config = tap.AgentConfig(
        stateDir=stateDir,
        servers=("ssh://127.0.0.1:2222",),
        name="kiln7",
        serverKey=ServerKeyPin("SHA256:" + "A" * 43),
    )
    with capturedLogs() as events:
        tap.buildService(config, MemoryReactorClock())
    return [formatEvent(e) for e in events]


def test_startRemovesWhatAPowerCutLeft(tmp_path: Path) -> None:
    """
    A device key cut off before its link (C{NAME.PID.tmp}, by an agent that is gone or had
    this process's number in an earlier boot) and state files cut off before their rename
    (C{NAME.tmp}) are removed at start and named in one line; the key is made as usual.
    """
    leftovers = [
        f"{DEVICE_KEY_FILE}.{deadPID()}.tmp",
        f"{DEVICE_KEY_FILE}.{os.getpid()}.tmp",
        f"{CERTIFICATE_FILE}.tmp",
        f"{STATUS_FILE}.tmp",
        f"{tap.LAST_SERVER_FILE}.tmp",
    ]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half a file")
    said = start(tmp_path)
    assert names(tmp_path) == [DEVICE_KEY_FILE, DEVICE_KEY_FILE + ".pub"]
    (line,) = [m for m in said if "temporary file" in m]
    assert line == (
        f"removed 5 temporary file(s) that a write cut short (a power cut, a kill) left in "
        f"{tmp_path}: {', '.join(sorted(leftovers))}"
    )
    assert not any("temporary file" in m for m in start(tmp_path))


def test_startLeavesWhatIsNotALeftoverOfItsOwn(tmp_path: Path) -> None:
    """
    Left alone: a key being written by another running process (a second start racing this
    one: its PID is live), other names, names that are not a PID, and what is not a file.
    """
    loadOrCreateDeviceKey(tmp_path)
    kept = [
        f"{DEVICE_KEY_FILE}.{os.getppid()}.tmp",  # a running process's
        f"{DEVICE_KEY_FILE}.0.tmp",
        f"{DEVICE_KEY_FILE}.{2**64}.tmp",
        f"{CERTIFICATE_FILE}.backup.tmp",
        "notes.tmp",
        f"notes.{deadPID()}.tmp",
        f"{STATUS_FILE}.tmp.old",
    ]
    for name in kept:
        (tmp_path / name).write_bytes(b"someone's")
    (tmp_path / f"{CERTIFICATE_FILE}.{deadPID()}.tmp").mkdir()
    os.symlink("/etc/hostname", tmp_path / f"{STATUS_FILE}.tmp")
    before = names(tmp_path)
    said = start(tmp_path)
    assert names(tmp_path) == before
    assert not any("temporary file" in m for m in said)


def test_readOnlyCardLeavesThemUnsaid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leftover that cannot be removed (a read-only card) is not named as removed."""
    (tmp_path / f"{STATUS_FILE}.tmp").write_bytes(b"half")
    monkeypatch.setattr(statefiles, "os", ReadOnlyDisk())
    with capturedLogs() as events:
        assert statefiles.removeStaleTemporaries(tmp_path, tap.STATE_FILES) == []
    assert list(events) == []
