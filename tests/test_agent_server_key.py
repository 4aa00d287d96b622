"""
The agent's C{--server-key} (agent/identity.py ServerKeyPin.parse): groundcontrol's key line,
a file holding it, or its SHA256: fingerprint; a file that is missing or unreadable is said
to be so, in one line (README's systemd steps copy server-key.pub into /etc/tunnel-agent:
forgetting to was answered "cannot guess the type of b'/etc/tunnel-agent/server-key.pub'").
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from accesstunnel.keys import fingerprint
from agent.identity import IdentityError, ServerKeyPin


@pytest.fixture
def keyLine() -> str:
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    return key.public().toString("OPENSSH").decode("ascii")


def test_lineFileAndFingerprintPinTheSameKey(tmp_path: Path, keyLine: str) -> None:
    """The three spellings README names give the same pin."""
    pub = tmp_path / "server-key.pub"
    pub.write_text(keyLine + "\n")
    expected = fingerprint(keyLine)
    assert ServerKeyPin.parse(keyLine).fingerprint == expected
    assert ServerKeyPin.parse(str(pub)).fingerprint == expected
    assert ServerKeyPin.parse(expected).fingerprint == expected


@pytest.mark.parametrize("relative", [False, True])
def test_missingFileIsSaidToBeMissing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    """A path, or a bare .pub name, that does not exist: 'No such file', and what to give."""
    monkeypatch.chdir(tmp_path)
    path = "server-key.pub" if relative else str(tmp_path / "etc/tunnel-agent/server-key.pub")
    with pytest.raises(IdentityError) as raised:
        ServerKeyPin.parse(path)
    assert str(raised.value).startswith(
        f"--server-key {path}: cannot read it: No such file or directory ("
    )
    assert "groundcontrol server-key > FILE" in str(raised.value)


def test_unreadableFileIsAnIdentityError(
    tmp_path: Path, keyLine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A file the agent may not read (root-only, the agent run as another user): one line, not
    a PermissionError traceback. Simulated, as the tests run as root.
    """
    pub = tmp_path / "server-key.pub"
    pub.write_text(keyLine + "\n")

    def readText(path: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(Path, "read_text", readText)
    with pytest.raises(IdentityError, match=r"cannot read it: Permission denied"):
        ServerKeyPin.parse(str(pub))


def test_otherTextStillSaysWhatItTakes() -> None:
    """Text that is neither a key, a fingerprint nor a file name: the message as before."""
    with pytest.raises(IdentityError, match=r"must be a public key, a file holding one"):
        ServerKeyPin.parse("not-a-key")
