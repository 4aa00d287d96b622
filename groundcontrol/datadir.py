"""The groundcontrol data directory: where each file lives and how the directory is set up.

One place for the layout, so the CLI (which creates and edits it) and the server (which
runs from it) cannot disagree about paths or permissions.
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

from attrs import field, frozen
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from accesstunnel.statefiles import createAtomically, writeAtomically
from groundcontrol.pki import CAExists, FleetCA
from groundcontrol.store import migrateStore

__all__ = ["DataDir", "HostKeyError", "InitResult", "NotInitialised"]


def _isFile(path: Path) -> bool:
    """
    Whether C{path} is a regular file, as C{Path.is_file}, except that a file that cannot be
    looked at (its directory not searchable: C{EACCES}) raises L{HostKeyError} naming it.
    """
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise HostKeyError(f"cannot read {path}: {e.strerror}") from None


class NotInitialised(Exception):  # noqa: N818 - reads as a state, like the store's errors
    """The data directory has not been set up with C{groundcontrol init}."""


class HostKeyError(Exception):
    """The host key file exists but cannot be read or parsed."""


@frozen
class InitResult:
    """What L{DataDir.ensureInitialised} had to create (False: it was already there)."""

    createdDirectory: bool
    createdHostKey: bool
    schemaVersion: int


@frozen
class DataDir:
    """
    A groundcontrol data directory.

    Layout: C{ssh_host_ed25519_key} (+ C{.pub}) is the server's SSH host key, which agents
    pin; C{groundcontrol.sqlite3} is the store, unless C{--store} names one elsewhere (the
    PostgreSQL database several nodes share): then there is no SQLite file here at all. The
    directory is private (0700) and the private key 0600, as OpenSSH expects of its own
    host keys.

    The methods taking C{store} take the C{--store} URL, or None for the SQLite file here.
    """

    path: Path = field(converter=Path)

    @property
    def hostKeyPath(self) -> Path:
        return self.path / "ssh_host_ed25519_key"

    @property
    def hostPublicKeyPath(self) -> Path:
        return self.path / "ssh_host_ed25519_key.pub"

    @property
    def databasePath(self) -> Path:
        return self.path / "groundcontrol.sqlite3"

    def isInitialised(self, store: str | None = None) -> bool:
        """
        Whether C{init} has run: the host key exists, and so does the SQLite file here when
        it is the store (a store elsewhere is checked by opening it).

        @raise HostKeyError: the directory cannot be searched (a data directory made by
            C{init} as root, run as the service's user before the C{chown -R}): whether the
            key is there cannot be told, and the reader is told that, not shown a traceback.
        """
        return _isFile(self.hostKeyPath) and (store is not None or _isFile(self.databasePath))

    def ensureInitialised(self, store: str | None = None) -> InitResult:
        """
        Create whatever is missing: the directory, the host key, the migrated store (the
        SQLite file here, or C{store}).

        Blocking; meant for C{init} and for start-up before the reactor runs. An existing
        host key is never replaced: agents have pinned it, and a new one would lock out the
        whole fleet.
        """
        createdDirectory = not self.path.exists()
        if createdDirectory:
            self.path.mkdir(mode=0o700, parents=True)
            os.chmod(self.path, 0o700)  # mkdir's mode is filtered by the umask
        createdHostKey = not self.hostKeyPath.exists() and self._writeNewHostKey()
        if not self.hostPublicKeyPath.exists():
            line = self.hostPublicKeyLine() + "\n"
            writeAtomically(self.hostPublicKeyPath, line.encode(), mode=0o666)  # umask decides
        self._ensureFleetCA()
        version = migrateStore(str(self.databasePath) if store is None else store)
        return InitResult(createdDirectory, createdHostKey, version)

    def _writeNewHostKey(self) -> bool:
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        # Created whole or not at all (a full disk or a power cut leaves no empty key to be
        # pinned); if another init raced us, its key is kept rather than overwritten.
        return createAtomically(self.hostKeyPath, key.toString("OPENSSH"), mode=0o600)

    @property
    def caDirectory(self) -> Path:
        """The fleet CA: C{ca.key} (0600) and C{ca.crt}, which devices and TLS peers trust."""
        return self.path / "ca"

    def _ensureFleetCA(self) -> None:
        try:
            FleetCA.create(self.caDirectory, datetime.now(UTC))
        except CAExists:
            FleetCA.load(self.caDirectory)  # an existing CA is kept; just check it is usable

    def loadFleetCA(self) -> FleetCA:
        """The fleet CA; L{pki.CANotFound} before C{init}, L{pki.CorruptCA} if damaged."""
        return FleetCA.load(self.caDirectory)

    def loadHostKeys(self) -> dict[bytes, keys.Key]:
        """
        Return the private host keys by SSH key type (e.g. C{b"ssh-ed25519"}).

        Suits C{SSHFactory.privateKeys}; C{publicKeys} is C{{t: k.public() for ...}}.

        @raise NotInitialised: there is no host key yet.
        @raise HostKeyError: the file is unreadable or not a private key.
        """
        try:
            data = self.hostKeyPath.read_bytes()
        except FileNotFoundError:
            raise NotInitialised(f"{self.path} is not initialised (no host key)") from None
        except OSError as e:
            raise HostKeyError(f"cannot read {self.hostKeyPath}: {e.strerror}") from None
        try:
            key = keys.Key.fromString(data)
        except (keys.BadKeyError, ValueError) as e:
            raise HostKeyError(f"{self.hostKeyPath} is not an SSH private key: {e}") from None
        if key.isPublic():
            raise HostKeyError(f"{self.hostKeyPath} holds a public key, not a private one")
        return {key.sshType(): key}

    def hostPublicKeyLine(self) -> str:
        """The host public key as one OpenSSH line: what agents pin with C{--server-key}."""
        (key,) = self.loadHostKeys().values()
        return key.public().toString("OPENSSH").decode("ascii")
