"""
The device's own key pair and the server key it trusts.

The private key is generated on the device on first start and never leaves
it: groundcontrol learns only the public half, and an admin approves the
device by that key. The server is trusted by a pinned host key given on the
command line (the key itself, or its SHA256 fingerprint as ssh-keygen -l
prints it), never by trust-on-first-use.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from accesstunnel.keys import fingerprint

DEVICE_KEY_FILE = "device_ed25519_key"


class IdentityError(Exception):
    """The state directory or a key in it is unusable."""


def loadOrCreateDeviceKey(stateDir: Path) -> keys.Key:
    """Return the device key from C{stateDir}, creating both if missing."""
    stateDir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = stateDir / DEVICE_KEY_FILE
    try:
        return keys.Key.fromString(path.read_bytes())
    except FileNotFoundError:
        pass
    except (OSError, keys.BadKeyError, ValueError) as e:
        raise IdentityError(f"cannot use device key {path}: {e}") from None
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another start raced us; its key wins.
        return keys.Key.fromString(path.read_bytes())
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("OPENSSH"))
    (stateDir / (DEVICE_KEY_FILE + ".pub")).write_text(
        key.public().toString("OPENSSH").decode("ascii") + "\n"
    )
    return key


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
        if not text.startswith(("ssh-", "rsa-", "ecdsa-")) and os.path.exists(text):
            candidate = Path(text).read_text().strip()
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
