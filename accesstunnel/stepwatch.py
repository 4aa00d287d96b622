"""
Keep a wall-clock reactor's timers on their delays through a step of the wall clock.

groundcontrol's reactor times its calls with the wall clock (Twisted's default,
C{reactor.seconds} is C{time.time}), because every date it stores or shows (rows, audit,
grants' and claims' expiry, last-seen, certificates) is the reactor's seconds. A step of that
clock (a VM resumed or migrated, chrony's C{makestep}, C{date -s}, a wrong RTC fixed by NTP)
moved every pending timer by the step: a step back held back every keepalive look, pre-auth
grace timer, rekey timer, fleet-watcher poll, prune and webhook retry by the step (a frozen
agent went unnoticed for an hour), a step forward fired them all at once.

Two designs were weighed. (a) The agent's (L{accesstunnel.clocks.useMonotonicTimers}):
time the reactor on the monotonic clock and read every date through
L{accesstunnel.clocks.wallClock}; about 130 reads of the clock under C{groundcontrol/} and
C{accesstunnel/}, each of which must be sorted into date or duration, where one missed
date stores 1970 in a row, today and in every change to come. (b) This module: the reactor
keeps the wall clock, so every date stays right without touching a reader, and its timers
are moved by the step when one is seen. (b) was chosen: one module, no reader to sort, and
a mistake in it delays timers, never corrupts stored dates. What it leaves to the readers:
a duration or deadline a reader keeps in memory as wall-clock seconds (not as a timer) sees
the step; those use L{accesstunnel.clocks.elapsedClock}, which this module points at the
monotonic clock (the keepalive sweep, the pre-auth grace verdict, ...).

L{watchClockSteps} replaces the reactor's C{seconds} with L{ClockStepWatch.seconds}: the
wall clock, read together with the monotonic clock. When the wall clock has moved more than
L{STEP_THRESHOLD} apart from the monotonic clock since the last step, every pending
C{DelayedCall} of the reactor (the heap C{_pendingTimedCalls} and the new C{_newTimedCalls},
as C{useMonotonicTimers} moves them) is moved by the step, before the reading is returned,
so each keeps its remaining delay; one line says so ("the clock stepped back 1h00m00s; 412
timers keep their delays"). The same shift for all keeps the heap's order. Every reader of
the reactor's time consults it: the reactor's own timed-call run (C{runUntilCurrent} reads
C{seconds} before it pops a due call), C{callLater}, C{DelayedCall.reset}, and C{timeout}
(how long the reactor may sleep), which reads the clock once more first: Twisted's reads the
first call's time before the clock, and would take a time from before a step its own reading
saw (a step back: a sleep of an hour). So a step forward fires nothing early (the run's
first reading sees the step and moves the calls first), and a call made after the step, from
an I/O event before the run, is already on the new clock and is not moved. Not covered: a
step that happens within a run of due calls and is seen by one of them (a C{callLater}): the
rest of that run compares with the run's own reading, so after a step back the calls due
within the step's length after that reading run in it, early. The window is the run's
length, microseconds against the seconds the reactor sleeps.

Only the reactor's thread moves timers (the heap is the reactor thread's); a thread that
reads the reactor's clock gets the wall clock and moves nothing. The cost when the clock
does not step: one C{time.monotonic} call and a subtraction per reading, and one reading
more per reactor wake-up (bench/RESULTS.md, "Clock step watch"). The monotonic clock stops
while the machine is suspended and the wall clock does not: after a resume, timers keep the
delays they had when it was suspended, as the agent's do. The threshold leaves alone the
wall clock's readings taken a moment apart from the monotonic one's, and slewing (NTP's
C{adjtime} slews both clocks alike).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from accesstunnel.clocks import ELAPSED_CLOCK_ATTRIBUTE
from accesstunnel.durations import spokenDuration

__all__ = ["STEP_THRESHOLD", "ClockStepWatch", "pendingCalls", "watchClockSteps"]

#: A wall clock that moved this many seconds more or less than the monotonic clock since the
#: last step has stepped. Far above the microseconds between the two readings, far below any
#: timer's meaning (keepalive deadlines are tens of seconds).
STEP_THRESHOLD = 1.0

#: The attribute of a reactor that holds its L{ClockStepWatch}.
WATCH_ATTRIBUTE = "clockStepWatch"


class ClockStepWatch:
    """
    The wall clock of a reactor whose pending timers are moved by each step of it.

    @ivar steps: how many steps were seen (for tests and metrics).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        threshold: float = STEP_THRESHOLD,
    ) -> None:
        self._reactor = reactor
        self._wall = wall
        self._monotonic = monotonic
        self._threshold = threshold
        self._offset = wall() - monotonic()
        #: The reactor's thread (the one that installs the watch): only its readings move
        #: timers; a reading from another thread (a store's, a writer's) is only a reading.
        self._thread = threading.get_ident()
        self.steps = 0

    def seconds(self) -> float:
        """The wall clock; when it has stepped, the reactor's timers are moved first."""
        wall = self._wall()
        step = wall - self._monotonic() - self._offset
        if (step > self._threshold or step < -self._threshold) and (
            threading.get_ident() == self._thread
        ):
            self._moveTimers(step)
        return wall

    def _moveTimers(self, step: float) -> None:
        self._offset += step
        self.steps += 1
        calls = pendingCalls(self._reactor)
        for call in calls:
            call.time += step  # the same shift for all: the heap's order holds
        kept = sum(1 for call in calls if not call.cancelled)
        self._log.warn(
            "the clock stepped {direction} {size}; {count} timers keep their delays",
            direction="forward" if step > 0 else "back",
            size=spokenDuration(round(abs(step), 1)),  # 3599.99999 s is 1h00m00s
            count=kept,
            step=step,
        )


def pendingCalls(reactor: Any) -> list[Any]:
    """
    Every C{DelayedCall} C{reactor} holds, cancelled ones included: a reactor's heap and
    its calls not yet in it (C{ReactorBase}'s lists, every reactor of Twisted's keeps them;
    asyncio's too), or a C{task.Clock}'s calls (tests run groundcontrol on one).
    """
    if hasattr(reactor, "_pendingTimedCalls"):
        return [*reactor._pendingTimedCalls, *reactor._newTimedCalls]
    return list(reactor.calls)


def _readingFirst(watch: ClockStepWatch, timeout: Callable[[], float | None]) -> Any:
    """
    The reactor's C{timeout} (how long it may sleep), after a reading of the clock: Twisted's
    reads the first call's time before the clock, so a step its own reading saw would leave
    it that call's time from before the step (a step back: a sleep of an hour).
    """

    def timeoutAfterAReading() -> float | None:
        watch.seconds()
        return timeout()

    return timeoutAfterAReading


def watchClockSteps(
    reactor: Any,
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    threshold: float = STEP_THRESHOLD,
) -> ClockStepWatch:
    """
    Keep C{reactor}'s timers (on the wall clock, C{wall}) on their delays through steps of
    C{wall} (module docstring); durations go on measuring with C{monotonic}
    (L{accesstunnel.clocks.elapsedClock} of the reactor). Call it once, before the
    services start; a second call returns the first watch.
    """
    existing: ClockStepWatch | None = getattr(reactor, WATCH_ATTRIBUTE, None)
    if existing is not None:
        return existing
    watch = ClockStepWatch(reactor, wall, monotonic, threshold)
    for call in pendingCalls(reactor):
        call.seconds = watch.seconds  # a reset() of a call made before sees steps too
    reactor.seconds = watch.seconds
    if hasattr(reactor, "timeout"):
        reactor.timeout = _readingFirst(watch, reactor.timeout)
    setattr(reactor, ELAPSED_CLOCK_ATTRIBUTE, monotonic)
    setattr(reactor, WATCH_ATTRIBUTE, watch)
    return watch
