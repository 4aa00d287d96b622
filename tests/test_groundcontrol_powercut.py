"""
groundcontrol's data directory after a power cut (or a kill) between writing a state file's
temporary file and renaming or linking it (L{accesstunnel.statefiles}): the host key, the
fleet CA, run/listening.json, run/metrics.json, run/stopped.json, run/alive.json,
run/feed.json, the onion service's key.
The temporary file stayed there for ever; groundcontrol removes those of its own writer
when it starts, as the agent does (tests/test_agent_powercut.py), and says which, once per
directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from groundcontrol.datadir import DataDir
from groundcontrol.devicewait import ALIVE_FILE, STOPPED_FILE
from groundcontrol.feedhandover import FEED_HANDOVER_FILE
from groundcontrol.listening import LISTENING_FILE
from groundcontrol.metrics import METRICS_FILE
from groundcontrol.pki import CA_CERTIFICATE_FILE, CA_KEY_FILE
from groundcontrol.tap import Options, buildService
from tests.test_agent_powercut import deadPID

HOST_KEY = "ssh_host_ed25519_key"


def initialised(tmp_path: Path) -> Path:
    """A data directory after C{groundcontrol init}."""
    data = tmp_path / "gc"
    DataDir(data).ensureInitialised()
    (data / "run").mkdir(exist_ok=True)
    return data


def start(data: Path, *extra: str) -> list[str]:
    """Build groundcontrol on C{data} as twistd does; the lines it logs."""
    options = Options()
    options.parseOptions(["--data", str(data), "--listen", "tcp:0:interface=127.0.0.1", *extra])
    with capturedLogs() as events:
        buildService(options.toConfig(), MemoryReactorClock())
    return [formatEvent(e) for e in events]


def removedLines(said: list[str]) -> list[str]:
    return [line for line in said if "temporary file" in line]


def test_startRemovesWhatAPowerCutLeft(tmp_path: Path) -> None:
    """
    A host key and a CA cut off before their link (C{NAME.PID.tmp} of a process that is
    gone), a public key, listening.json, metrics.json, stopped.json, feed.json and an onion
    key cut off before their rename (C{NAME.tmp}) are removed at start, each directory's in
    one line.
    """
    data = initialised(tmp_path)
    leftovers = {
        data: [f"{HOST_KEY}.{deadPID()}.tmp", f"{HOST_KEY}.pub.tmp", "onion_key.tmp"],
        data / "ca": [f"{CA_KEY_FILE}.{deadPID()}.tmp", f"{CA_CERTIFICATE_FILE}.{os.getpid()}.tmp"],
        data / "run": [
            f"{LISTENING_FILE}.tmp",
            f"{METRICS_FILE}.tmp",
            f"{STOPPED_FILE}.tmp",
            f"{ALIVE_FILE}.tmp",
            f"{FEED_HANDOVER_FILE}.tmp",
        ],
    }
    for directory, names in leftovers.items():
        for name in names:
            (directory / name).write_bytes(b"half a file")
    said = removedLines(start(data))
    assert said == [
        f"removed {len(names)} temporary file(s) that a write cut short (a power cut, a kill) "
        f"left in {directory}: {', '.join(sorted(names))}"
        for directory, names in leftovers.items()
    ]
    for directory, names in leftovers.items():
        assert not any((directory / name).exists() for name in names)
    assert (data / HOST_KEY).exists() and (data / "ca" / CA_KEY_FILE).exists()
    assert removedLines(start(data)) == []


def test_onionKeyElsewhere(tmp_path: Path) -> None:
    """An onion key kept outside the data directory (--onion-key): its leftover too."""
    data = initialised(tmp_path)
    elsewhere = tmp_path / "tor"
    elsewhere.mkdir()
    (elsewhere / "hs_key.tmp").write_bytes(b"half")
    (elsewhere / "other.tmp").write_bytes(b"not ours")
    said = removedLines(start(data, "--onion-key", str(elsewhere / "hs_key")))
    assert said == [
        "removed 1 temporary file(s) that a write cut short (a power cut, a kill) left in "
        f"{elsewhere}: hs_key.tmp"
    ]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["other.tmp"]


def test_startLeavesWhatIsNotALeftoverOfItsOwn(tmp_path: Path) -> None:
    """
    Left alone: a host key being written by another running process (its PID is live),
    other names, and the store's own files.
    """
    data = initialised(tmp_path)
    kept = [
        f"{HOST_KEY}.{os.getppid()}.tmp",  # a running process's
        "groundcontrol.sqlite3.tmp",
        "notes.tmp",
    ]
    for name in kept:
        (data / name).write_bytes(b"someone's")
    assert removedLines(start(data)) == []
    assert all((data / name).exists() for name in kept)
