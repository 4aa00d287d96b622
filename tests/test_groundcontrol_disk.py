"""
groundcontrol's own files on a full disk, in memory: its host key, fleet CA, onion service
key and C{listening.json} go through L{accesstunnel.statefiles} like the agent's state files
(tests/test_agent_disk.py), whose C{os} is replaced here by a disk with no room left.

What is promised: a write that fails part way leaves the previous file whole (or no file,
for one that is only ever created) and no temporary file beside it; on success the names
and modes are as before (0600 for keys).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from accesstunnel.transports.tor import _writePrivate
from groundcontrol.datadir import DataDir
from groundcontrol.listening import writeListeningFile
from groundcontrol.pki import CA_CERTIFICATE_FILE, CA_KEY_FILE, FleetCA
from tests.test_agent_disk import FullDisk, disk, names

__all__ = ["disk"]  # the fixture, shared with tests/test_agent_disk.py


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_onionKeyOnAFullDiskLeavesNothing(tmp_path: Path, disk: FullDisk) -> None:
    """
    The onion service key that cannot be written leaves no key and no C{onion_key.tmp}
    (it left the temporary file, taking what space there was, before).
    """
    path = tmp_path / "gc" / "onion_key"
    with pytest.raises(OSError) as raised:
        _writePrivate(path, "ED25519-V3:KEY\n")
    assert raised.value.errno == errno.ENOSPC
    assert names(path.parent) == []


def test_onionKeyWrittenPrivate(tmp_path: Path, disk: FullDisk) -> None:
    """With room, the key is written whole, 0600, in a directory made 0700, nothing else."""
    disk.room = None
    path = tmp_path / "gc" / "onion_key"
    _writePrivate(path, "ED25519-V3:KEY\n")
    assert path.read_text() == "ED25519-V3:KEY\n"
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert names(path.parent) == ["onion_key"]


def test_listeningFileOnAFullDiskKeepsTheOldOne(tmp_path: Path, disk: FullDisk) -> None:
    """A C{listening.json} that cannot be written again leaves the old one and no temporary."""
    path = tmp_path / "run" / "listening.json"
    path.parent.mkdir()
    path.write_text('{"listening": []}\n')
    with pytest.raises(OSError):
        writeListeningFile(path, [])(None)
    assert path.read_text() == '{"listening": []}\n'
    assert names(path.parent) == ["listening.json"]
    disk.room = None
    writeListeningFile(path, [])(None)
    assert json.loads(path.read_text())["listening"] == []
    assert names(path.parent) == ["listening.json"]


def test_hostKeyOnAFullDiskLeavesNoKey(tmp_path: Path, disk: FullDisk) -> None:
    """
    C{init} on a full disk fails and leaves no host key, rather than an empty one that the
    next start would read as the key agents pin; with room, the key is made, 0600.
    """
    dataDir = DataDir(tmp_path / "gc")
    with pytest.raises(OSError) as raised:
        dataDir.ensureInitialised()
    assert raised.value.errno == errno.ENOSPC
    assert names(dataDir.path) == []
    disk.room = None
    assert dataDir.ensureInitialised().createdHostKey
    assert mode(dataDir.hostKeyPath) == 0o600
    assert dataDir.hostPublicKeyLine().startswith("ssh-ed25519 ")


def test_fullDiskErrorNamesTheFile(tmp_path: Path, disk: FullDisk) -> None:
    """
    The error of a write that found the disk full names the file it was for, as an open
    that fails does: C{groundcontrol init} printed C{[Errno 28] No space left on device}
    and nothing more, leaving the user to guess which disk.
    """
    dataDir = DataDir(tmp_path / "gc")
    with pytest.raises(OSError) as raised:
        dataDir.ensureInitialised()
    assert raised.value.filename == str(dataDir.hostKeyPath)
    assert str(raised.value) == (
        f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{dataDir.hostKeyPath}'"
    )


def test_hostKeyMadeByAnotherInitIsKept(tmp_path: Path) -> None:
    """An C{init} that loses the race to another keeps the other's key and says so."""
    dataDir = DataDir(tmp_path / "gc")
    dataDir.path.mkdir()
    made = dataDir._writeNewHostKey()
    first = dataDir.hostKeyPath.read_bytes()
    assert made
    assert not dataDir._writeNewHostKey()
    assert dataDir.hostKeyPath.read_bytes() == first


def test_fleetCAOnAFullDiskLeavesNothing(tmp_path: Path, disk: FullDisk) -> None:
    """A CA that cannot be written leaves no key, no certificate, no temporary file."""
    directory = tmp_path / "ca"
    with pytest.raises(OSError):
        FleetCA.create(directory, datetime.now(UTC))
    assert names(directory) == []
    disk.room = None
    FleetCA.create(directory, datetime.now(UTC))
    assert names(directory) == [CA_CERTIFICATE_FILE, CA_KEY_FILE]
    assert mode(directory / CA_KEY_FILE) == 0o600
    FleetCA.load(directory)
