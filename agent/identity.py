"""
The device's own key pair and the server key it trusts.

The private key is generated on the device on first start and never leaves
it: groundcontrol learns only the public half, and an admin approves the
device by that key. The server is trusted by a pinned host key given on the
command line (the key itself, or its SHA256 fingerprint as ssh-keygen -l
prints it), never by trust-on-first-use.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import attrs
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.logger import Logger

from accesstunnel.keys import fingerprint
from accesstunnel.statefiles import createAtomically, writeAtomically

DEVICE_KEY_FILE = "device_ed25519_key"

_log = Logger()


#: The agent's exit status when its state directory is read-only and it has no key: the
#: systemd unit does not restart it on this status (RestartPreventExitStatus=), since a card
#: the kernel remounted read-only stays so until someone remounts it or reboots the device;
#: with C{Restart=always} the agent was started again every 5 s, for nothing, for ever.
READ_ONLY_EXIT_STATUS = 73  # EX_CANTCREAT, sysexits.h


class IdentityError(Exception):
    """The state directory or a key in it is unusable."""


class ReadOnlyStateError(IdentityError):
    """
    The device has no key yet, and its state directory is on a read-only file system: the
    agent exits with L{READ_ONLY_EXIT_STATUS}.
    """


def loadOrCreateDeviceKey(stateDir: Path) -> keys.Key:
    """
    Return the device key from C{stateDir}, creating both if missing.

    @raise IdentityError: the key cannot be read, or a new one cannot be written (a full
        disk): nothing half-written is left, so a start with room makes the key.
    """
    try:
        stateDir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.EROFS:
            what = f"cannot make the state directory {stateDir}"
            raise ReadOnlyStateError(_readOnlyText(what)) from None
        raise IdentityError(f"cannot make the state directory {stateDir}: {e.strerror}") from None
    path = stateDir / DEVICE_KEY_FILE
    key = _readDeviceKey(path)
    if key is None:
        key = _createDeviceKey(path)
    _writePublicKeyIfMissing(stateDir / (DEVICE_KEY_FILE + ".pub"), key)
    return key


def _readDeviceKey(path: Path) -> keys.Key | None:
    """The key at C{path}; None if there is none yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(f"cannot use device key {path}: {e}") from None
    if not data:
        # An empty file is a key that was never written: agents before statefiles created
        # the file and then wrote it, so a full disk left it empty and every start after
        # failed here. No link was ever made with it; make the key now.
        _log.warn("device key {path} is empty (never written); making a new one", path=str(path))
        try:
            path.unlink()
        except OSError as e:
            if e.errno == errno.EROFS:
                what = f"cannot replace the empty device key {path}"
                raise ReadOnlyStateError(_readOnlyText(what)) from None
            raise IdentityError(f"cannot remove the empty device key {path}: {e}") from None
        return None
    try:
        return keys.Key.fromString(data)
    except (keys.BadKeyError, ValueError) as e:
        raise IdentityError(f"cannot use device key {path}: {e}") from None


def _readOnlyText(what: str) -> str:
    return (
        f"{what}: read-only file system (a card the kernel remounted read-only after errors, "
        "or a read-only root); the agent has no key and cannot link. Once the directory is "
        "writable, start the agent again (systemctl restart tunnel-agent): systemd does not "
        "restart it until then"
    )


def _createDeviceKey(path: Path) -> keys.Key:
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    try:
        created = createAtomically(path, key.toString("OPENSSH"), mode=0o600)
    except OSError as e:
        if e.errno == errno.EROFS:
            what = f"cannot write a new device key to {path}"
            raise ReadOnlyStateError(_readOnlyText(what)) from None
        raise IdentityError(
            f"cannot write a new device key to {path}: {e.strerror} (nothing was left "
            "half-written; the agent makes its key when it starts with room on that disk)"
        ) from None
    if not created:
        # Another start raced us; its key wins.
        return keys.Key.fromString(path.read_bytes())
    return key


def _writePublicKeyIfMissing(path: Path, key: keys.Key) -> None:
    """The public half, for people on the device; the agent itself never reads it."""
    if path.exists():
        return
    line = key.public().toString("OPENSSH") + b"\n"
    try:
        writeAtomically(path, line)
    except OSError as e:
        _log.warn(
            "cannot write {path}: {error}; the agent runs without it and writes it at its "
            "next start",
            path=str(path),
            error=e.strerror,
        )


def _namesAFile(text: str) -> bool:
    """
    Whether C{--server-key}'s value can only mean a file (a path, or a C{.pub} name), so that
    a missing one is said to be missing, not "cannot guess the type" of its name.
    """
    return text.startswith(("/", "./", "../", "~")) or text.endswith(".pub")


@attrs.frozen
class ServerKeyPin:
    """The one host key groundcontrol must present, by fingerprint."""

    fingerprint: str

    @classmethod
    def parse(cls, text: str) -> ServerKeyPin:
        """
        Accept ``SHA256:...``, an OpenSSH public key line, or the path of a
        file holding one.
        """
        text = text.strip()
        if text.startswith("SHA256:"):
            return cls(text.rstrip("="))
        candidate = text
        if not text.startswith(("ssh-", "rsa-", "ecdsa-")) and (
            os.path.exists(text) or _namesAFile(text)
        ):
            try:
                candidate = Path(text).read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) else "not text"
                raise IdentityError(
                    f"--server-key {text}: cannot read it: {reason} (give groundcontrol's key "
                    "line, a file holding it: groundcontrol server-key > FILE, or its SHA256: "
                    "fingerprint)"
                ) from None
        try:
            return cls(fingerprint(candidate))
        except (keys.BadKeyError, ValueError, UnicodeEncodeError) as e:
            raise IdentityError(
                f"--server-key must be a public key, a file holding one, or a SHA256: "
                f"fingerprint; got {text[:60]!r} ({e})"
            ) from None

    def matches(self, hostKeyBlob: bytes) -> bool:
        """Whether the key the server presented is the pinned one."""
        try:
            return fingerprint(keys.Key.fromString(hostKeyBlob)) == self.fingerprint
        except (keys.BadKeyError, ValueError):
            return False
