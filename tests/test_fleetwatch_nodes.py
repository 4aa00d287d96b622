"""
Several groundcontrol nodes on one PostgreSQL store: each audit row is notified once per
fleet, by the node holding the notifier's turn (L{groundcontrol.fleetturn}), and a stop, a
crash or a lost connection leaves the rest to whichever node takes the turn next. A single
SQLite node has no turn and notifies as before (tests/test_fleetwatch_stop.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.datadir import DataDir
from groundcontrol.feedhandover import FEED_HANDOVER_FILE
from groundcontrol.fleetturn import NOTIFY_PAGES_PER_POLL, NotifierTurn
from groundcontrol.fleetwatch import FEED_PAGE, FleetWatcher
from groundcontrol.notify import MultiNotifier, WebhookNotifier
from groundcontrol.registry import Registry
from groundcontrol.store import SQLStore
from groundcontrol.tap import Options, buildService
from groundcontrol.testing import openMemoryStore, resultNow
from tests.test_enrollment import RecordingNotifier
from tests.test_notify import FakeClient
from tests.test_store import T0, StoreTestCase, backendPid, bothBackends, newPublicKey

REVOKED = "device.revoked"


class _Node:
    """One groundcontrol node: its own store connection, fleet watcher and notifier."""

    def __init__(self, store: SQLStore, clock: Clock, name: str, webhook: bool) -> None:
        self.store = store
        self.recording = RecordingNotifier()
        self.client = FakeClient()
        self.webhook = WebhookNotifier("http://hooks.example/fleet", clock, self.client)
        notifier = MultiNotifier([self.recording, self.webhook] if webhook else [self.recording])
        self.watcher = FleetWatcher(
            store, Registry(), clock, notifier=notifier, turn=NotifierTurn(store, node=name)
        )

    def devices(self) -> list[str]:
        return [e.device for e in self.recording.events]

    def posted(self) -> list[int]:
        """The audit ids of the webhook's requests, in order."""
        import json

        return [json.loads(body)["id"] for _, body, _ in self.client.requests]

    def answerAll(self) -> None:
        for index, (_, _, d) in enumerate(self.client.requests):
            if not d.called:
                self.client.answer(index)


@pytest.mark.usefixtures("postgresqlForClass")
class SeveralNodesTests(StoreTestCase):
    """Two nodes on one PostgreSQL store."""

    backend = "postgresql"

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(T0)

    def node(self, name: str, webhook: bool = False, start: bool = True) -> _Node:
        node = _Node(self.openAnother(), self.clock, name, webhook)
        if start:
            node.watcher.startService()  # the first poll: the applying cursor's start
            self.addCleanup(self.stop, node)
        return node

    def stop(self, node: _Node) -> None:
        if node.watcher.running:
            self.successResultOf(node.watcher.stopService())

    def poll(self, *nodes: _Node, times: int = 2) -> None:
        for _ in range(times):
            for node in nodes:
                self.successResultOf(node.watcher.poll())

    def row(self, device: str) -> int:
        return self.successResultOf(self.store.audit(REVOKED, "root", device, {}, T0 + 1)).id

    def test_eachRowNotifiedOnce(self) -> None:
        """
        Two nodes polling one store notify each row once between them, by one node: before,
        each node notified every row (the webhook had each event twice).
        """
        a, b = self.node("a"), self.node("b")
        self.poll(a, b)
        for device in ("kiln7", "oven2", "press3"):
            self.row(device)
        self.poll(a, b, times=3)
        self.assertEqual(a.devices() + b.devices(), ["kiln7", "oven2", "press3"])
        self.assertEqual(min(len(a.devices()), len(b.devices())), 0)

    def test_onePostPerRow(self) -> None:
        """Each node with its webhook: one POST per row, fleet-wide, with the row's id."""
        a, b = self.node("a", webhook=True), self.node("b", webhook=True)
        self.poll(a, b)
        ids = [self.row(device) for device in ("kiln7", "oven2")]
        self.poll(b, a, times=3)
        self.assertEqual(sorted(a.posted() + b.posted()), ids)

    def test_crashLeavesTheUndeliveredToTheNextNode(self) -> None:
        """
        The notifying node dies (its connection ends, the lock with it) with one row
        delivered and one whose POST is unanswered: the other node takes the turn at its
        next poll and POSTs the undelivered row (again: in flight at the crash) and the rows
        after; not the delivered one.
        """
        a = self.node("a", webhook=True)
        self.poll(a)
        b = self.node("b", webhook=True)
        first = self.row("kiln7")
        self.poll(a, b)
        a.answerAll()
        self.poll(a, b)
        inFlight = self.row("oven2")
        self.poll(a, b)
        self.assertEqual(a.posted(), [first, inFlight])  # the second never answered
        self.successResultOf(a.store.close())  # the crash: PostgreSQL ends its session
        a.watcher.running = False  # nothing of it runs any more
        after = self.row("press3")
        self.poll(b, times=3)
        self.assertEqual(b.posted(), [inFlight, after])

    def test_crashWhileHeldForItsSerial(self) -> None:
        """
        A new device's notification waits for its agent's serial; the notifying node dies
        meanwhile, after notifying a later row: the next node notifies the held one (with
        the serial its hello stored), and the later row again (in flight), not the earlier.
        """
        a = self.node("a")
        self.poll(a)
        b = self.node("b")
        self.row("kiln7")
        self.poll(a, b)
        self.contact("oven2", newPublicKey(), T0 + 2)  # device.pending, held for its serial
        self.row("press3")
        self.poll(a, b)
        self.assertEqual(a.devices(), ["kiln7", "press3"])
        self.successResultOf(a.store.close())
        a.watcher.running = False
        self.successResultOf(self.store.updateSerial(self.pendingKey("oven2"), "SN-9", T0 + 3))
        self.poll(b, times=3)
        self.assertEqual(sorted(b.devices()), ["oven2", "press3"])
        (pending,) = [e for e in b.recording.events if e.device == "oven2"]
        self.assertEqual(pending.detail["serial"], "SN-9")

    def pendingKey(self, name: str) -> str:
        (request,) = [
            r
            for r in self.successResultOf(self.store.listEnrollmentRequests())
            if r.requestedName == name
        ]
        return str(request.fingerprint)

    def test_stopHandsOverToTheOtherNode(self) -> None:
        """
        A stopping notifying node notifies the rows since its last poll, writes how far it
        got and gives the turn up; the other node notifies the rows after, none twice.
        """
        a = self.node("a")
        self.poll(a)
        b = self.node("b")
        self.row("kiln7")
        self.poll(a, b)
        self.row("oven2")  # after a's last poll
        self.successResultOf(a.watcher.stopService())
        self.row("press3")
        self.poll(b, times=3)
        self.assertEqual(a.devices(), ["kiln7", "oven2"])
        self.assertEqual(b.devices(), ["press3"])

    def test_nodeBackAfterBeingDownNotifiesNothingSent(self) -> None:
        """
        A node started after the others sent rows (down for a day) does not notify them
        again: with its own run/feed.json, it re-notified everything since its stop.
        """
        a = self.node("a")
        self.poll(a)
        self.row("kiln7")
        self.poll(a)
        b = self.node("b")
        self.row("oven2")
        self.poll(b, a, times=3)
        self.assertEqual(a.devices(), ["kiln7", "oven2"])
        self.assertEqual(b.devices(), [])

    def test_rowsWhileAllWereDownNotifiedByTheFirstBack(self) -> None:
        """
        Every node stopped; rows written meanwhile (the admin CLI) are notified by the first
        node back, from the fleet's position: none lost, none of before repeated.
        """
        a = self.node("a")
        self.poll(a)
        self.row("kiln7")
        self.poll(a)
        self.successResultOf(a.watcher.stopService())
        self.row("oven2")
        self.row("press3")
        again = self.node("a-restarted")
        self.poll(again, times=3)
        self.assertEqual(again.devices(), ["oven2", "press3"])

    def test_lostTurnNotifiesNothingMore(self) -> None:
        """
        A node whose connection was renewed (the server ended its session) has lost the
        turn: the other node takes it, and the first notifies nothing from then on.
        """
        a = self.node("a")
        self.poll(a)
        b = self.node("b")
        self.rawQuery("SELECT pg_terminate_backend(?)", (backendPid(a.store),))
        self.poll(b)  # takes the free turn
        self.poll(a, times=3)  # the first fails (reconnect); the turn is b's
        self.assertEqual(len(self.flushLoggedErrors()), 1)  # the ended session, logged
        self.row("kiln7")
        self.poll(a, b, times=3)
        self.assertEqual((a.devices(), b.devices()), ([], ["kiln7"]))

    def test_catchingUpIsBoundedPerPoll(self) -> None:
        """
        A backlog (all nodes down while many rows were written) is notified a few pages a
        poll, each row once, not all in one poll.
        """
        a = self.node("a")
        self.poll(a)
        self.successResultOf(a.watcher.stopService())
        total = NOTIFY_PAGES_PER_POLL * FEED_PAGE * 2 + 7
        for n in range(total):
            self.row(f"d{n}")
        again = self.node("a-restarted")
        self.poll(again, times=1)
        self.assertEqual(len(again.devices()), NOTIFY_PAGES_PER_POLL * FEED_PAGE)
        self.poll(again, times=3)
        self.assertEqual(again.devices(), [f"d{n}" for n in range(total)])


@bothBackends
class NotifierTurnStoreTests(StoreTestCase):
    """The store's notifier turn and the fleet's notified position (schema 009)."""

    def test_positionOnlyForward(self) -> None:
        self.assertIsNone(self.successResultOf(self.store.notifiedTo()))
        self.assertTrue(self.successResultOf(self.store.recordNotifiedTo(5, "a", T0)))
        self.assertFalse(self.successResultOf(self.store.recordNotifiedTo(3, "b", T0)))
        self.assertEqual(self.successResultOf(self.openAnother().notifiedTo()), 5)

    def test_oneNodeAtATime(self) -> None:
        """PostgreSQL: one connection holds the turn until it gives it up; SQLite: always."""
        a, b = self.store, self.openAnother()
        alone = self.backend == "sqlite"
        self.assertTrue(self.successResultOf(a.takeNotifierTurn()))
        self.assertTrue(self.successResultOf(a.takeNotifierTurn()))  # held, asked again
        self.assertEqual(self.successResultOf(b.takeNotifierTurn()), alone)
        self.successResultOf(a.leaveNotifierTurn())
        self.assertTrue(self.successResultOf(b.takeNotifierTurn()))
        self.assertEqual(self.successResultOf(a.takeNotifierTurn()), alone)


@pytest.mark.usefixtures("postgresqlForClass")
class NotifierTurnPostgreSQLTests(StoreTestCase):
    backend = "postgresql"

    def test_freedWhenTheConnectionEnds(self) -> None:
        """A node's connection ends (crash, kill, lost network): its turn is free."""
        a, b = self.store, self.openAnother()
        self.assertTrue(self.successResultOf(a.takeNotifierTurn()))
        self.assertFalse(self.successResultOf(b.takeNotifierTurn()))
        self.rawQuery("SELECT pg_terminate_backend(?)", (backendPid(a),))
        self.assertTrue(self.successResultOf(b.takeNotifierTurn()))

    def test_heldTurnsSessionEndsSoonWhenTheNodeIsGone(self) -> None:
        """
        While it holds the turn, the node's session is ended by PostgreSQL after 30 s without
        a statement (a hung process) and its dead peer found within about 25 s (TCP), not
        the defaults' hours: the lock goes with it. Given up, the idle limit goes too.
        """

        def setting(name: str) -> str:
            return str(self.store._read(f"SHOW {name}")[0][name])

        self.assertTrue(self.successResultOf(self.store.takeNotifierTurn()))
        self.assertEqual(setting("idle_session_timeout"), "30s")
        self.assertIn(setting("tcp_user_timeout"), ("25000", "25s"))  # ms, as the server spells it
        self.successResultOf(self.store.leaveNotifierTurn())
        self.assertEqual(setting("idle_session_timeout"), "0")

    def test_oneTurnPerSchema(self) -> None:
        """Two fleets' stores in two schemas of one database each have a turn of their own."""
        assert self.postgresql is not None
        other = self.successResultOf(_open(self.postgresql.newDatabase()))
        self.addCleanup(other.close)
        self.assertTrue(self.successResultOf(self.store.takeNotifierTurn()))
        self.assertTrue(self.successResultOf(other.takeNotifierTurn()))


def _open(url: str) -> Any:
    from groundcontrol.store import openStore, synchronousRunner

    return openStore(url, synchronousRunner)


@pytest.mark.usefixtures("postgresqlForClass")
class GroundcontrolNodesTests(StoreTestCase):
    """groundcontrol's services (L{buildService}) with a PostgreSQL store take turns."""

    backend = "postgresql"

    def build(self, data: Path, store: Any) -> Any:
        DataDir(data).ensureInitialised(self.url)
        options = Options()
        options.parseOptions(
            ["--data", str(data), "--store", self.url, "--listen", "tcp:0:interface=127.0.0.1"]
        )
        return buildService(options.toConfig(), MemoryReactorClock(), store=store)

    def stopNode(self, node: Any) -> None:
        self.successResultOf(node.stopService())

    def test_oneLogLinePerRowFleetWide(self) -> None:
        """Two nodes: a row's 'fleet event' line is logged once, by one of them."""
        nodes = [self.build(Path(self.mktemp()), self.openAnother()) for _ in range(2)]
        watchers = []
        for node in nodes:
            node.startService()
            self.addCleanup(self.stopNode, node)
            (watcher,) = [s for s in node if isinstance(s, FleetWatcher)]
            watchers.append(watcher)
        with capturedLogs() as events:
            for watcher in watchers * 2:
                self.successResultOf(watcher.poll())
            self.successResultOf(self.store.audit(REVOKED, "root", "kiln7", {}, T0))
            for watcher in watchers * 2:
                self.successResultOf(watcher.poll())
        said = [formatEvent(e) for e in events]
        self.assertEqual(said.count("fleet event device.revoked for kiln7"), 1)


class SoleSQLiteNodeTests(SynchronousTestCase):
    """groundcontrol on SQLite (one node) has no turn: it notifies, and hands over, as before."""

    def test_noTurnOnSQLite(self) -> None:
        """
        Its rows are notified without the store's notified position (left unwritten), and
        its stop leaves run/feed.json for its next start (L{groundcontrol.feedhandover}).
        """
        data = Path(self.mktemp())
        DataDir(data).ensureInitialised()
        store = openMemoryStore()
        options = Options()
        options.parseOptions(["--data", str(data), "--listen", "tcp:0:interface=127.0.0.1"])
        node = buildService(options.toConfig(), MemoryReactorClock(), store=store)
        node.startService()
        (watcher,) = [s for s in node if isinstance(s, FleetWatcher)]
        with capturedLogs() as events:
            resultNow(watcher.poll())
            resultNow(store.audit(REVOKED, "root", "kiln7", {}, T0))
            resultNow(watcher.poll())
        said = [formatEvent(e) for e in events]
        self.assertEqual(said.count("fleet event device.revoked for kiln7"), 1)
        self.successResultOf(node.stopService())
        self.assertIsNone(resultNow(store.notifiedTo()))
        self.assertTrue((data / "run" / FEED_HANDOVER_FILE).exists())
