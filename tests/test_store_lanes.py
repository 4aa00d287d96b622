"""
The store calls a person waits on go ahead of the fleet's queued bookkeeping.

In a reconnect storm the store's one worker thread has a backlog of agents' logins;
an operator's login (the key check), session routing (device, grant) and session
audit, and the control shell, use L{IStore.interactive} so that they do not wait behind
it. Each test queues the fleet's calls first, then shows the person's call answered
before any of them (the worker drains both queues, person's first; results are handed
back inline, so the order they arrive in is the order the calls ran in).
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
        # thread runner whose worker the test runs when it says.
        setup = openStoreBlocking(path, synchronousRunner)
        self.addCleanup(setup.close)
        self.operatorKey = newPublicKey()
        self.account = self.successResultOf(setup.addAccount("ada", [self.operatorKey], False, T0))
        self.pool = QueuedPool()
        self.store: SQLStore = openStoreBlocking(
            path, threadRunner(InlineReactor(), poolFactory=lambda **kw: self.pool)
        )
        self.addCleanup(self.pool.runAll)
        self.answered: list[str] = []

    def track(self, d: Deferred[Any], name: str) -> Deferred[Any]:
        """Note C{name} when C{d} fires, its result passed on."""

        def note(result: Any) -> Any:
            self.answered.append(name)
            return result

        return d.addBoth(note)

    def queueFleetBacklog(self, calls: int = 5) -> list[Deferred[Any]]:
        """The fleet's bookkeeping, queued before the person's call."""
        return [self.track(self.store.lastAuditId(), "fleet") for _ in range(calls)]

    def runWorker(self, person: Deferred[Any]) -> None:
        """Run the worker; the person's call is answered before any of the backlog."""
        self.track(person, "person")
        self.assertNoResult(person)
        self.pool.runAll()
        self.assertEqual(self.answered[0], "person")
        self.assertEqual(self.answered.count("fleet"), len(self.answered) - 1)

    def test_operatorKeyCheckGoesFirst(self) -> None:
        """An operator's key is looked up ahead of the fleet's queued calls."""
        checker = FleetKeyChecker(self.store)
        backlog = self.queueFleetBacklog()
        key = keys.Key.fromString(self.operatorKey)
        asked = checker.requestAvatarId(
            SSHPrivateKey(b"dev_kiln7", b"ssh-ed25519", key.blob(), None, None)
        )
        self.runWorker(asked)
        # Known key, no signature yet: the client is told to sign with it.
        self.failureResultOf(asked, ValidPublicKey)
        self.assertEqual(len(self.answered), 1 + len(backlog))

    def test_sessionRoutingGoesFirst(self) -> None:
        """A session open's device lookup is answered ahead of the fleet's queued calls."""
        router = SessionRouter(self.store, Registry(), Clock())
        backlog = self.queueFleetBacklog()
        routed = Deferred.fromCoroutine(router.reachableLink(self.account, "kiln7"))
        self.runWorker(routed)
        failure = self.failureResultOf(routed)
        self.assertIn("unknown device", str(failure.value))
        self.assertEqual(len(self.answered), 1 + len(backlog))

    def test_sessionAuditGoesFirst(self) -> None:
        """The session registry writes session.started ahead of the backlog."""
        sessions = SessionRegistry(self.store, Clock())
        backlog = self.queueFleetBacklog()
        written = sessions.store.audit("session.started", "ada", "kiln7", {}, T0)
        self.runWorker(written)
        self.assertEqual(self.successResultOf(written).event, "session.started")
        self.assertEqual(len(self.answered), 1 + len(backlog))

    def test_fleetCallsKeepTheirPlace(self) -> None:
        """The store itself (the realm's, the agents' requests') queues in order."""
        backlog = self.queueFleetBacklog(2)
        self.track(self.store.lastAuditId(), "later")
        self.pool.runAll()
        self.assertEqual(self.answered, ["fleet", "fleet", "later"])
        for d in backlog:
            self.successResultOf(d)
