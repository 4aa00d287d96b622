#!/usr/bin/env python3
"""
bench/stepwatch_micro.py: what groundcontrol's clock step watch (accesstunnel/stepwatch.py)
costs: a reading of the reactor's clock with and without it, a reactor iteration with
nothing due (C{runUntilCurrent} + C{timeout}, both read the clock) among 10,000 pending
timers, and moving 10,000 and 100,000 pending timers by one step.

    flock -x /tmp/bench.lock .venv/bin/python bench/stepwatch_micro.py

One thread, a reactor made here and never run (Twisted's SelectReactor: the timed-call heap
is ReactorBase's, the same in every reactor). Each figure is the median of 7 rounds.
Session 19's figures: bench/RESULTS.md, "Clock step watch".
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.selectreactor import SelectReactor

from accesstunnel.stepwatch import watchClockSteps

ROUNDS = 7


def median(measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(ROUNDS))


def perCall(function: Callable[[], Any], calls: int) -> float:
    """Seconds per call of C{function}, over C{calls} calls."""
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def reactorWith(timers: int, watched: bool) -> Any:
    """A reactor (never run) holding C{timers} pending calls, an hour to a day away."""
    reactor: Any = SelectReactor()
    if watched:
        watchClockSteps(reactor)
    for n in range(timers):
        reactor.callLater(3600 + n % 82800, print)
    reactor._insertNewDelayedCalls()
    return reactor


def iteration(reactor: Any) -> Callable[[], None]:
    def run() -> None:
        reactor.runUntilCurrent()
        reactor.timeout()

    return run


def moveCost(timers: int) -> float:
    """Seconds to move C{timers} pending calls by a step (one step, its log line included)."""
    reactor = reactorWith(timers, watched=True)
    watch = reactor.clockStepWatch
    start = time.perf_counter()
    watch._moveTimers(-3600.0)
    elapsed = time.perf_counter() - start
    reactor.waker.connectionLost(None)
    return elapsed


def nanoseconds(label: str, function: Callable[[], Any], calls: int) -> None:
    print(f"{label:<26} {median(lambda: perCall(function, calls)) * 1e9:6.0f} ns")


def main() -> None:
    plain = reactorWith(0, watched=False)
    watched = reactorWith(0, watched=True)
    nanoseconds("reading, time.time:", plain.seconds, 1_000_000)
    nanoseconds("reading, step watch:", watched.seconds, 1_000_000)
    for reactor in (plain, watched):
        reactor.waker.connectionLost(None)
    plain = reactorWith(10_000, watched=False)
    watched = reactorWith(10_000, watched=True)
    nanoseconds("iteration, 10k timers:", iteration(plain), 200_000)
    nanoseconds("iteration, watched:", iteration(watched), 200_000)
    for reactor in (plain, watched):
        reactor.waker.connectionLost(None)
    for timers in (10_000, 100_000):
        cost = statistics.median(moveCost(timers) for _ in range(ROUNDS))
        print(f"a step, {timers:>7,} timers:    {cost * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
