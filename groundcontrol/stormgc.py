"""
Python's cyclic garbage collector during a reconnect storm.

CPython runs a full collection whenever the objects that survived its young
collections since the last one outnumber a quarter of the rest. While
thousands of agents log in at once, that is every one or two seconds, and each
full pass visits every tracked object of every link already up: with 10,000
links (about 550,000 objects) one pass held the reactor for 100-330 ms, and
a storm had some twenty of them (bench/RESULTS.md, "Operator setup during a
reconnect storm"). Each is a stall for every operator session and login.

While connections wait for a handshake slot (the limiter's queue: a storm is
the only time it is not empty), L{StormCollector} once a second runs a full
collection, which visits only what is not frozen yet, the last second's
objects, and frees the cycles among them that are garbage already; then it
moves everything out of the collector's sight (C{gc.freeze}). So no full
pass visits more than a second's worth. Young collections go on as usual, and
reference counting frees everything that is not in a cycle, frozen or not.
Cycles that span a freeze (a login that waited for its slot, say) are kept
until the storm is over: when nothing has waited for L{SETTLE_SECONDS},
everything is handed back (C{gc.unfreeze}) and one full collection frees
them, once.

Outside a storm nothing changes: the collector runs as CPython sets it.

What it costs, after 10,000 logins: the collection at the end is one stall of
~0.5 s (over ~550,000 objects) rather than some twenty of 0.1-0.3 s; the RSS
per idle agent is 0.3-0.6 KiB above what it is without freezing (freezing
without the collection before it kept every cycle to the end: 1.5-2.3 KiB).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock

#: How often the limiter's queue is looked at, and objects frozen during a storm.
CHECK_SECONDS = 1.0

#: Seconds without any connection waiting before the storm counts as over.
SETTLE_SECONDS = 5.0


class Collector(Protocol):
    """The parts of the C{gc} module this uses (tests pass a double)."""

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def collect(self) -> int: ...

    def get_freeze_count(self) -> int: ...


class StormCollector(Service):
    """Freeze the heap once a second while connections wait; collect once after."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        waiting: Callable[[], int],
        collector: Collector = gc,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        # The quiet period is a duration: a step of the wall clock back must not stretch it
        # (the heap stayed frozen for as long), nor a step forward end it.
        self._elapsed = elapsedClock(clock)
        self._waiting = waiting
        self._gc = collector
        self._timer = timer
        self._loop: LoopingCall | None = None
        #: True from the first check that finds connections waiting until the
        #: collection after the storm.
        self.inStorm = False
        self._lastWaiting = 0.0
        #: Whether the last check found connections waiting.
        self._wasWaiting = False
        #: The collections of the newest objects in this storm: how many, their time
        #: in all and the longest (seconds), and the objects they freed.
        self._collections = 0
        self._collectTime = 0.0
        self._longest = 0.0
        self._freed = 0

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(CHECK_SECONDS, now=False)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.inStorm:
            self._gc.unfreeze()  # nothing stays out of the collector's sight
            self.inStorm = False
        return super().stopService()

    def check(self) -> None:
        """Once a second: collect the new and freeze while connections wait; all once settled."""
        now = self._elapsed()
        if self._waiting():
            if not self.inStorm:
                self.inStorm = True
                self._log.info(
                    "connections wait for a handshake slot: full garbage collections "
                    "deferred until they are all in"
                )
            self._lastWaiting = now
            self._wasWaiting = True
            self._collectNewAndFreeze()
            return
        if not self.inStorm:
            return
        if self._wasWaiting:
            self._wasWaiting = False
            self._log.info(
                "no connection waits for a handshake slot: so far in this storm "
                "{collections} collections of the newest objects took {ms:.0f} ms in all "
                "(the longest {longest:.0f} ms) and freed {freed}",
                collections=self._collections,
                ms=self._collectTime * 1000,
                longest=self._longest * 1000,
                freed=self._freed,
            )
        if now - self._lastWaiting < SETTLE_SECONDS:
            self._collectNewAndFreeze()
            return
        self._collectAfterStorm()

    def _collectNewAndFreeze(self) -> None:
        """Free the last second's dead cycles (a pass over it alone), then freeze all."""
        started = self._timer()
        self._freed += self._gc.collect()
        took = self._timer() - started
        self._collections += 1
        self._collectTime += took
        self._longest = max(self._longest, took)
        self._gc.freeze()

    def _collectAfterStorm(self) -> None:
        frozen = self._gc.get_freeze_count()
        self._gc.unfreeze()
        started = self._timer()
        collected = self._gc.collect()
        self.inStorm = False
        self._collections = self._freed = 0
        self._collectTime = self._longest = 0.0
        self._log.info(
            "handshake queue empty for {settle:.0f} s: one full garbage collection over "
            "{frozen} objects took {ms:.0f} ms and freed {collected}",
            settle=SETTLE_SECONDS,
            frozen=frozen,
            ms=(self._timer() - started) * 1000,
            collected=collected,
        )


__all__ = ["CHECK_SECONDS", "SETTLE_SECONDS", "Collector", "StormCollector"]
