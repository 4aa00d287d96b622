"""
The data directory (groundcontrol/datadir.py) when the store is elsewhere (C{--store}): the
server starts from a directory that holds no SQLite file, and does not make one.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.datadir import DataDir
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
