"""
What a stopping fleet watcher does with the audit rows it has not notified yet: it reads the
feed once more, and leaves where it got to (and the notifications it held for serials when
the store did not answer in time) to the next start, in run/feed.json
(L{groundcontrol.feedhandover}). Every row is notified once: by the stop, or by the start.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.datadir import DataDir
from groundcontrol.feedhandover import (
    FEED_HANDOVER_FILE,
    FeedHandOver,
    readHandOver,
    writeHandOver,
)
from groundcontrol.fleetwatch import STOP_SERIAL_READ_WAIT, FleetWatcher
from groundcontrol.registry import Registry
from groundcontrol.requestnotice import SERIAL_WAIT
from groundcontrol.tap import Options, buildService
from groundcontrol.testing import openMemoryStore, resultNow
from tests.test_enrollment import captureLog
from tests.test_request_notice import PENDING, WatcherTestCase, pendingEvent
from tests.test_store import T0, bothBackends

REVOKED = "device.revoked"


class _Answering:
    """The store, with the reads named in C{holding} held until the test answers them."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.holding: set[str] = set()
        self._waiting: list[tuple[Deferred[Any], Any]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if name not in self.holding:
            return method

        def held(*args: Any, **kwargs: Any) -> Deferred[Any]:
            read: Deferred[Any] = Deferred()
            self._waiting.append((read, lambda: method(*args, **kwargs)))
            return read

        return held

    def answer(self) -> None:
        """Answer the reads held so far (those not cancelled), with what the store holds now."""
        self.holding.clear()
        waiting, self._waiting = self._waiting, []
        for read, reading in waiting:
            if not read.called:
                reading().chainDeferred(read)


class StopTestCase(WatcherTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.file = Path(self.mktemp()) / "run" / FEED_HANDOVER_FILE
        self.answering = _Answering(self.store)

    def startedWatcher(self, handOver: bool = True) -> FleetWatcher:
        """A started watcher (its first poll done) on the store, and the hand-over file."""
        store: Any = self.answering
        watcher = FleetWatcher(
            store,
            Registry(),
            self.clock,
            notifier=self.notifier,
            handOverFile=self.file if handOver else None,
        )
        watcher.startService()
        return watcher

    def row(self, device: str, event: str = REVOKED) -> int:
        """An audit row the watcher notifies (the admin CLI's, another node's); its id."""
        return self.successResultOf(self.store.audit(event, "root", device, {}, T0 + 1)).id

    def notified(self) -> list[tuple[str, str]]:
        return self.notifier.kinds()


@bothBackends
class FeedAtStopTests(StopTestCase):
    """The rows written after the last poll."""

    def test_rowAfterTheLastPollNotifiedAtStop(self) -> None:
        """
        A row written after the last poll is notified by the stop (the webhook, stopped
        after the watcher, waits for it): the watcher reads the feed once more. It was
        left in the audit log, unnotified, and the next start began after it.
        """
        watcher = self.startedWatcher(handOver=False)
        self.row("kiln7")
        self.successResultOf(watcher.stopService())
        self.assertEqual(self.notified(), [(REVOKED, "kiln7")])

    def test_rowAfterTheStopNotifiedByTheNextStart(self) -> None:
        """
        A row written after the stop's read (by a connection still open while groundcontrol
        stops, by the CLI while it is down) is notified by the next start, once; the rows
        the stop notified are not notified again. Without the hand-over the next start began
        at the newest row, and never notified it.
        """
        watcher = self.startedWatcher()
        self.row("kiln7")
        self.successResultOf(watcher.stopService())
        self.assertTrue(self.file.exists())
        self.row("oven2")
        again = self.startedWatcher()
        self.assertFalse(self.file.exists())  # taken: a crash from here starts at the newest
        self.poll(again)
        self.assertEqual(self.notified(), [(REVOKED, "kiln7"), (REVOKED, "oven2")])
        self.poll(again)
        self.assertEqual(len(self.notified()), 2)

    def test_startedAgain(self) -> None:
        """
        A watcher stopped and started again (the same service) reads on from what its stop
        left, once; before the start cleared it, it notified nothing more.
        """
        watcher = self.startedWatcher()
        self.row("kiln7")
        self.successResultOf(watcher.stopService())
        self.row("oven2")
        watcher.startService()
        self.poll(watcher)
        self.assertEqual(self.notified(), [(REVOKED, "kiln7"), (REVOKED, "oven2")])
        self.assertFalse(self.file.exists())

    def test_startThatDoesNotPollKeepsIt(self) -> None:
        """
        A watcher stopped before its first poll took the position (the store did not answer
        it) leaves the file as it was: the start after that one resumes from it.
        """
        readTo = self.row("kiln7")
        writeHandOver(self.file, FeedHandOver(readTo))
        self.row("oven2")
        self.answering.holding.add("lastAuditId")
        stopped = self.startedWatcher().stopService()
        self.clock.advance(STOP_SERIAL_READ_WAIT)
        self.successResultOf(stopped)
        self.answering.answer()  # its first poll goes on, stopped: it leaves the file
        self.assertEqual(json.loads(self.file.read_text())["readTo"], readTo)
        self.poll(self.startedWatcher())
        self.assertEqual(self.notified(), [(REVOKED, "oven2")])

    def test_positionPastTheNewestRowIgnored(self) -> None:
        """
        A position past the store's newest row (another store, one restored from a backup)
        is not waited for: the watcher starts at the newest row, and says why.
        """
        writeHandOver(self.file, FeedHandOver(self.row("kiln7") + 50))
        with capturedLogs() as events:
            watcher = self.startedWatcher()
        self.row("oven2")
        self.poll(watcher)
        self.assertEqual(self.notified(), [(REVOKED, "oven2")])
        said = [formatEvent(e) for e in events]
        self.assertTrue(any("another store? starting at the newest row" in s for s in said))
        self.assertFalse(self.file.exists())

    def test_pollThatOutlivesTheStopNotifiesNothing(self) -> None:
        """
        A poll whose feed read answers after the stop's bound notifies nothing: the stop
        left those rows to the next start, which notifies them, once. Before, the late poll
        notified them too.
        """
        watcher = self.startedWatcher()
        self.row("kiln7")
        self.answering.holding.add("auditFeed")
        self.clock.advance(watcher._interval)  # the loop's poll: its read does not answer
        stopped = watcher.stopService()
        self.clock.advance(STOP_SERIAL_READ_WAIT)
        self.successResultOf(stopped)
        self.answering.answer()
        self.assertEqual(self.notified(), [])
        self.poll(self.startedWatcher())
        self.assertEqual(self.notified(), [(REVOKED, "kiln7")])


@bothBackends
class HeldAtStopTests(StopTestCase):
    """The notifications held for serials when the store does not answer the stop in time."""

    def heldWatcher(self) -> FleetWatcher:
        watcher = self.startedWatcher()
        self.key = self.newKey("oven2")
        self.rowId = self.events()[-1].id
        self.poll(watcher)
        self.assertEqual(len(watcher._heldRequests), 1)
        return watcher

    def test_leftToTheNextStart(self) -> None:
        """
        The store does not answer within L{STOP_SERIAL_READ_WAIT}: the held notification
        goes to the next start, not out without its serial; the next start sends it with the
        serial the hello stored meanwhile, once. Before, it went at the stop, serial null.
        """
        watcher = self.heldWatcher()
        logged = captureLog(watcher)
        self.answering.holding.update({"auditFeed", "listEnrollmentRequests"})
        self.hello(self.key, "SN-7")
        stopped = watcher.stopService()
        self.clock.advance(STOP_SERIAL_READ_WAIT)
        self.successResultOf(stopped)
        self.assertEqual(self.notified(), [])
        readTo = json.loads(self.file.read_text())["readTo"]
        self.assertEqual(
            logged,
            [
                f"fleet watcher stopping: the store did not answer within 1.0 s; the audit "
                f"rows after id {readTo} and 1 notification(s) held for serials are left "
                f"to the next start ({self.file})"
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.answering.answer()
        self.assertEqual(self.notified(), [])
        again = self.startedWatcher()
        self.poll(again)
        self.assertEqual(
            [(e.event, e.id, e.detail["serial"]) for e in self.notifier.events],
            [(PENDING, self.rowId, "SN-7")],
        )
        self.clock.advance(SERIAL_WAIT)
        self.poll(again)
        self.assertEqual(len(self.notifier.events), 1)

    def test_keepsWhatIsLeftOfItsWait(self) -> None:
        """
        A held notification handed over keeps what was left of its wait, not a new one:
        without a serial it goes out when that is over, serial null.
        """
        watcher = self.heldWatcher()
        self.clock.advance(SERIAL_WAIT - 3)
        self.answering.holding.update({"auditFeed", "listEnrollmentRequests"})
        stopped = watcher.stopService()
        self.clock.advance(STOP_SERIAL_READ_WAIT)
        self.successResultOf(stopped)
        self.answering.answer()
        again = self.startedWatcher()
        self.clock.advance(2 - 0.1)  # held at 0, due at 10; stopped at 7, handed over at 8
        self.poll(again)
        self.assertEqual(self.notified(), [])
        self.clock.advance(0.1)
        self.poll(again)
        self.assertEqual([e.detail["serial"] for e in self.notifier.events], [None])

    def test_storeThatAnswersSendsItAtStop(self) -> None:
        """The store answers: the stop sends it, with the serial stored by then (no hand-over)."""
        watcher = self.heldWatcher()
        self.hello(self.key, "SN-7")
        self.successResultOf(watcher.stopService())
        self.assertEqual([e.detail["serial"] for e in self.notifier.events], ["SN-7"])
        self.assertEqual(json.loads(self.file.read_text())["held"], [])

    def test_documentRoundTrip(self) -> None:
        """A held notification reads back from the file as it was written."""
        event = pendingEvent()
        writeHandOver(self.file, FeedHandOver(4, [(event, 2.5)]))
        with capturedLogs() as events:
            self.assertEqual(readHandOver(self.file), FeedHandOver(4, ((event, 2.5),)))
        self.assertEqual(list(events), [])


class GroundcontrolRestartTests(SynchronousTestCase):
    """groundcontrol's services (L{buildService}) leave the feed to the next start."""

    def build(self, data: Path, store: Any) -> Any:
        options = Options()
        options.parseOptions(["--data", str(data), "--listen", "tcp:0:interface=127.0.0.1"])
        return buildService(options.toConfig(), MemoryReactorClock(), store=store)

    def test_rowWrittenWhileStoppedNotifiedByTheNextStart(self) -> None:
        """
        A row written while groundcontrol is stopped (the admin CLI's) is notified (logged,
        and posted with a webhook) by its next start, from DATA/run/feed.json; before, the
        start began at the newest row and it never was.
        """
        data = Path(self.mktemp())
        DataDir(data).ensureInitialised()
        store = openMemoryStore()
        first = self.build(data, store)
        first.startService()
        self.successResultOf(first.stopService())
        self.assertTrue((data / "run" / FEED_HANDOVER_FILE).exists())
        resultNow(store.audit(REVOKED, "root", "kiln7", {}, T0))
        again = self.build(data, store)
        with capturedLogs() as events:
            again.startService()
            (watcher,) = [s for s in again if isinstance(s, FleetWatcher)]
            resultNow(watcher.poll())
        said = [formatEvent(e) for e in events]
        self.assertIn("fleet event device.revoked for kiln7", said)
        self.assertFalse((data / "run" / FEED_HANDOVER_FILE).exists())
        self.successResultOf(again.stopService())
