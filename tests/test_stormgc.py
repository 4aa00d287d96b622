"""
groundcontrol.stormgc: full garbage collections deferred while connections wait
for a handshake slot (a reconnect storm), and one collection once it has settled.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.datadir import DataDir
from groundcontrol.stormgc import CHECK_SECONDS, SETTLE_SECONDS, StormCollector
from groundcontrol.tap import Options, buildService


class FakeCollector:
    """The gc module's freeze/unfreeze/collect, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frozen = 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen += 1000

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")
        self.frozen = 0

    def collect(self) -> int:
        self.calls.append("collect")
        return 42

    def get_freeze_count(self) -> int:
        return self.frozen


class StormCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.waiting = 0
        self.gc = FakeCollector()
        self.collector = StormCollector(self.clock, lambda: self.waiting, self.gc)
        self.collector.startService()
        self.addCleanup(self.collector.stopService)

    def seconds(self, n: float) -> None:
        """Let C{n} seconds of checks run."""
        for _ in range(round(n / CHECK_SECONDS)):
            self.clock.advance(CHECK_SECONDS)

    def test_quietServerLeavesTheCollectorAlone(self) -> None:
        """Nothing waits for a handshake slot: no freeze, no collection, ever."""
        self.seconds(60)
        self.assertEqual(self.gc.calls, [])
        self.assertFalse(self.collector.inStorm)

    def test_freezesEverySecondWhileConnectionsWait(self) -> None:
        """
        While connections wait, every check collects what is not frozen yet (the last
        second's objects) and then freezes the heap; nothing is unfrozen.
        """
        self.waiting = 250
        self.seconds(3)
        self.assertEqual(self.gc.calls, ["collect", "freeze"] * 3)
        self.assertTrue(self.collector.inStorm)

    def test_collectsOnceAfterTheQueueSettles(self) -> None:
        """
        Once nothing has waited for SETTLE_SECONDS, everything is unfrozen and one
        full collection runs; after that the collector is left alone again.
        """
        self.waiting = 10
        self.seconds(2)
        self.waiting = 0
        self.seconds(SETTLE_SECONDS - CHECK_SECONDS)
        self.assertNotIn("unfreeze", self.gc.calls)  # still settling: still frozen
        self.assertEqual(self.gc.calls[-2:], ["collect", "freeze"])
        self.seconds(CHECK_SECONDS)
        self.assertEqual(self.gc.calls[-2:], ["unfreeze", "collect"])
        self.assertEqual(self.gc.calls.count("unfreeze"), 1)
        self.assertFalse(self.collector.inStorm)
        calls = len(self.gc.calls)
        self.seconds(60)
        self.assertEqual(len(self.gc.calls), calls)

    def test_queueAgainWhileSettlingWaitsAgain(self) -> None:
        """A connection waiting again while it settles starts the quiet period over."""
        self.waiting = 10
        self.seconds(1)
        self.waiting = 0
        self.seconds(SETTLE_SECONDS - CHECK_SECONDS)
        self.waiting = 1
        self.seconds(1)
        self.waiting = 0
        self.seconds(SETTLE_SECONDS - CHECK_SECONDS)
        self.assertNotIn("unfreeze", self.gc.calls)
        self.seconds(CHECK_SECONDS)
        self.assertEqual(self.gc.calls.count("unfreeze"), 1)

    def test_stoppingDuringAStormUnfreezes(self) -> None:
        """Stopped mid-storm (shutdown): nothing is left out of the collector's sight."""
        self.waiting = 10
        self.seconds(2)
        self.collector.stopService()
        self.assertEqual(self.gc.calls[-1], "unfreeze")
        self.assertFalse(self.collector.inStorm)

    def test_logsTheStormAndTheCollection(self) -> None:
        """
        The storm's start, the end of its queue (the collections of the newest objects
        so far: how many, how long, what they freed) and the collection after it (its
        size and time) are logged.
        """
        events: list[dict[str, Any]] = []
        self.collector._log = Logger(observer=cast(ILogObserver, events.append))
        self.waiting = 10
        self.seconds(2)
        self.waiting = 0
        self.seconds(SETTLE_SECONDS)
        self.assertEqual(len(events), 3)
        self.assertTrue(all(e["log_level"] == LogLevel.info for e in events))
        # Two checks in the storm collected and froze (42 freed each)...
        self.assertEqual((events[1]["collections"], events[1]["freed"]), (2, 84))
        # ...and four more while it settled; the fifth collected all.
        self.assertEqual((events[2]["frozen"], events[2]["collected"]), (6000, 42))


class RealCollectorTests(SynchronousTestCase):
    """With Python's own collector: what the storm keeps, and what the end frees."""

    def test_garbageCycleKeptDuringTheStormFreedAfter(self) -> None:
        """
        A reference cycle that became garbage during a storm survives full
        collections while frozen (they do not visit it) and is freed by the one
        collection after the storm.
        """
        self.addCleanup(gc.unfreeze)
        clock = Clock()
        waiting = [5]
        collector = StormCollector(clock, lambda: waiting[0])
        collector.startService()
        self.addCleanup(collector.stopService)

        class Node:
            other: Any = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        clock.advance(CHECK_SECONDS)  # frozen with the rest of the heap
        del a, b
        gc.collect()
        self.assertIsNotNone(gone(), "a frozen cycle is not collected")
        waiting[0] = 0
        for _ in range(round(SETTLE_SECONDS / CHECK_SECONDS) + 1):
            clock.advance(CHECK_SECONDS)
        self.assertFalse(collector.inStorm)
        self.assertIsNone(gone(), "the collection after the storm freed it")
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_cycleThatDiesWithinASecondIsFreedAtOnce(self) -> None:
        """
        A cycle that became garbage between two checks of a storm is freed by the
        next check's collection (it was not frozen yet), not kept to the storm's end.
        """
        self.addCleanup(gc.unfreeze)
        clock = Clock()
        collector = StormCollector(clock, lambda: 5)
        collector.startService()
        self.addCleanup(collector.stopService)
        clock.advance(CHECK_SECONDS)

        class Node:
            other: Any = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        clock.advance(CHECK_SECONDS)
        self.assertTrue(collector.inStorm)
        self.assertIsNone(gone(), "freed by the check's collection of the new objects")


class WiringTests(SynchronousTestCase):
    def test_groundcontrolWatchesItsHandshakeQueue(self) -> None:
        """groundcontrol runs a StormCollector reading the limiter's waiting count."""
        data = Path(self.mktemp())
        data.mkdir()
        DataDir(data).ensureInitialised()
        options = Options()
        options.parseOptions(["--data", str(data), "--listen", "tcp:0:interface=127.0.0.1"])
        top = buildService(options.toConfig(), MemoryReactorClock())
        (collector,) = [s for s in top if isinstance(s, StormCollector)]
        limiter = top.limiter  # type: ignore[attr-defined]
        self.assertEqual(collector._waiting(), 0)
        limiter.waiting = 7
        self.assertEqual(collector._waiting(), 7)
