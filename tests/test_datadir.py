"""
The data directory (groundcontrol/datadir.py) when the store is elsewhere (C{--store}): the
server starts from a directory that holds no SQLite file, and does not make one. And one the
running user cannot search: the server and the CLI say so in one line.
"""

from __future__ import annotations

import errno
import io
import os
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.cli import main
from groundcontrol.datadir import DataDir, HostKeyError
from groundcontrol.tap import Options, buildService, openStore


class StoreElsewhereTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.dataDir = DataDir(self.tmp / "gc")
        self.url = f"sqlite://{self.tmp / 'shared.sqlite3'}"

    def build(self) -> None:
        """Assemble the server as C{twistd groundcontrol --data DIR --store URL} would."""
        options = Options()
        options.parseOptions(
            ["--data", str(self.dataDir.path), "--store", self.url, "--listen", "tcp:0"]
        )
        config, reactor = options.toConfig(), MemoryReactorClock()
        store = openStore(config, reactor)  # what buildService opens without one given
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        buildService(config, reactor, store)

    def test_serverStartsWithoutSQLiteFile(self) -> None:
        """
        Initialised with --store, the data directory has the host key and the CA but no
        SQLite file, and the server starts from it without asking for one or making one.
        """
        self.dataDir.ensureInitialised(self.url)
        self.assertFalse(self.dataDir.databasePath.exists())
        self.build()
        self.assertFalse(self.dataDir.databasePath.exists())

    def test_notInitialisedNamesStore(self) -> None:
        """Without init (no host key), the server still refuses; its hint keeps the --store."""
        options = Options()
        options.parseOptions(["--data", str(self.dataDir.path), "--store", self.url])
        with self.assertRaises(usage.UsageError) as caught:
            buildService(options.toConfig(), MemoryReactorClock())
        self.assertIn("--store URL init", str(caught.exception))


class UnsearchableDirectoryTests(SynchronousTestCase):
    """
    A data directory made by C{init} as root (0700) and used by another user before the
    C{chown -R} of README's systemd steps: every path in it fails with EACCES. Simulated by
    making C{Path.stat} fail there, as the tests run as root, whom modes do not stop.
    """

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        DataDir(self.data).ensureInitialised()
        self.keyPath = DataDir(self.data).hostKeyPath
        realStat = Path.stat

        def stat(path: Path, *args: Any, **kwargs: Any) -> os.stat_result:
            if path.parent == self.data:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return realStat(path, *args, **kwargs)

        self.patch(Path, "stat", stat)

    def test_isInitialisedSaysItCannotRead(self) -> None:
        """The directory cannot be searched: neither 'initialised' nor 'not', but why."""
        with self.assertRaises(HostKeyError) as caught:
            DataDir(self.data).isInitialised()
        self.assertEqual(str(caught.exception), f"cannot read {self.keyPath}: Permission denied")

    def test_serverSaysItCannotRead(self) -> None:
        """groundcontrol stops with README's one line, not a PermissionError traceback."""
        options = Options()
        options.parseOptions(["--data", str(self.data), "--listen", "tcp:0"])
        with self.assertRaises(usage.UsageError) as caught:
            buildService(options.toConfig(), MemoryReactorClock())
        self.assertEqual(str(caught.exception), f"cannot read {self.keyPath}: Permission denied")

    def test_cliSaysItCannotRead(self) -> None:
        """A CLI command run as that user: one line and status 1, no traceback."""
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(["--data", str(self.data), "device", "list"])
        self.assertEqual(status, 1)
        self.assertEqual(
            err.getvalue(),
            f"groundcontrol: error: cannot read {self.keyPath}: Permission denied\n",
        )
