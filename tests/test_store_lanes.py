"""
The store calls a person waits on go ahead of the fleet's queued bookkeeping.

In a reconnect storm the store's one worker thread has a backlog of agents' logins;
an operator's login (the key check), session routing (device, grant) and session
audit, and the control shell, use L{IStore.interactive} so that they do not wait behind
it. Each test queues the fleet's calls first, then shows the person's call answered
after as many worker turns as it makes calls, with the fleet's still queued.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.credentials import SSHPrivateKey
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.auth import FleetKeyChecker
from groundcontrol.registry import Registry
from groundcontrol.router import SessionRouter
from groundcontrol.sessions import SessionRegistry
from groundcontrol.store import SQLStore, openStoreBlocking, synchronousRunner, threadRunner
from tests.test_store import T0, InlineReactor, QueuedPool, newPublicKey


class LaneTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = str(Path(directory) / "store.sqlite3")
        # Accounts, devices and grants set up inline, then the same file through a
        # thread runner whose worker turns the test runs one by one.
        setup = openStoreBlocking(path, synchronousRunner)
        self.addCleanup(setup.close)
        self.operatorKey = newPublicKey()
        self.account = self.successResultOf(setup.addAccount("ada", [self.operatorKey], False, T0))
        self.pool = QueuedPool()
        self.store: SQLStore = openStoreBlocking(
            path, threadRunner(InlineReactor(), poolFactory=lambda **kw: self.pool)
        )
        self.addCleanup(self.pool.runAll)

    def queueFleetBacklog(self, calls: int = 5) -> list[Deferred[Any]]:
        """The fleet's bookkeeping, queued before the person's call."""
        return [self.store.lastAuditId() for _ in range(calls)]

    def assertStillQueued(self, backlog: list[Deferred[Any]]) -> None:
        for d in backlog:
            self.assertNoResult(d)

    def test_operatorKeyCheckGoesFirst(self) -> None:
        """An operator's key is looked up in one turn of the worker, backlog or not."""
        checker = FleetKeyChecker(self.store)
        backlog = self.queueFleetBacklog()
        key = keys.Key.fromString(self.operatorKey)
        asked = checker.requestAvatarId(
            SSHPrivateKey(b"dev_kiln7", b"ssh-ed25519", key.blob(), None, None)
        )
        self.pool.runOne()
        # Known key, no signature yet: the client is told to sign with it.
        self.failureResultOf(asked, ValidPublicKey)
        self.assertStillQueued(backlog)

    def test_sessionRoutingGoesFirst(self) -> None:
        """A session open's device lookup is answered in one turn, backlog or not."""
        router = SessionRouter(self.store, Registry(), Clock())
        backlog = self.queueFleetBacklog()
        routed = Deferred.fromCoroutine(router.reachableLink(self.account, "kiln7"))
        self.pool.runOne()
        failure = self.failureResultOf(routed)
        self.assertIn("unknown device", str(failure.value))
        self.assertStillQueued(backlog)

    def test_sessionAuditGoesFirst(self) -> None:
        """The session registry writes session.started ahead of the backlog."""
        sessions = SessionRegistry(self.store, Clock())
        backlog = self.queueFleetBacklog()
        written = sessions.store.audit("session.started", "ada", "kiln7", {}, T0)
        self.pool.runOne()
        self.assertEqual(self.successResultOf(written).event, "session.started")
        self.assertStillQueued(backlog)

    def test_fleetCallsKeepTheirPlace(self) -> None:
        """The store itself (the realm's, the agents' requests') queues in order."""
        backlog = self.queueFleetBacklog(2)
        later = self.store.lastAuditId()
        self.pool.runOne()
        self.successResultOf(backlog[0])
        self.assertNoResult(later)
