"""
Two clocks: one that times things (timers, silences, how long a link lasted) and one that
tells the date (certificate validity, times shown to people).

Twisted's reactors time C{callLater} with the wall clock (C{reactor.seconds} is
C{time.time}), and a wall clock steps: a device without a real-time clock boots in 1970 or
at fake-hwclock's last saved time and NTP then moves it by hours or years, a dead RTC battery
does the same, and so does C{date -s}. A step forward fires every pending timer at once; a
step back holds every pending timer back by the step, so a link that dies after it goes
unnoticed (no keepalive probe) for as long as the step.

The agent therefore times on the monotonic clock (L{useMonotonicTimers}, from
L{agent.tap.makeService}, under twistd and C{tunnel-agentd} alike) and keeps the wall clock
beside it (L{wallClock}) for what is a date. Code that takes a reactor as its clock asks
L{wallClock} for the date and L{elapsedClock} for durations; with a C{task.Clock} in tests
both are the Clock unless the test gives it a wall clock of its own
(C{clock.wallSeconds = ...}).

groundcontrol keeps the wall clock as its reactor's clock (its store's times are the
reactor's seconds: dates) and has every pending timer moved by a step of that clock
(L{accesstunnel.stepwatch.watchClockSteps}, which says why this and not the agent's way);
what it measures in memory (keepalive silence, key renewal ages, pre-auth ages, penalties)
it measures on L{elapsedClock}, the monotonic clock there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: The attribute of a timer clock (a reactor, a C{task.Clock}) that holds its wall clock,
#: when its C{seconds} is not the wall clock.
WALL_CLOCK_ATTRIBUTE = "wallSeconds"

#: The attribute of a timer clock that times with the wall clock (groundcontrol's reactor,
#: or a C{task.Clock} standing in for it in a test) that holds a clock that does not step.
ELAPSED_CLOCK_ATTRIBUTE = "elapsedSeconds"


def useMonotonicTimers(
    reactor: Any,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> None:
    """
    Make C{reactor} time its calls with C{monotonic} (its C{seconds}), and keep C{wall}
    as its wall clock (L{wallClock}).

    Works on any of Twisted's reactors, not yet running or running: a call already
    scheduled keeps its delay (moved onto the new clock; each C{DelayedCall} holds the
    clock it was made with). Call it once, before the services start.
    """
    if getattr(reactor, WALL_CLOCK_ATTRIBUTE, None) is not None:
        return
    shift = monotonic() - reactor.seconds()
    # ReactorBase's lists of timed calls: every reactor of Twisted's keeps them (asyncio's
    # too: it asks its loop to wake it when the first of them is due).
    for call in [*reactor._pendingTimedCalls, *reactor._newTimedCalls]:
        call.time += shift  # the same shift for all: the heap's order holds
        call.seconds = monotonic
    reactor.seconds = monotonic
    setattr(reactor, WALL_CLOCK_ATTRIBUTE, wall)


def wallClock(clock: Any) -> Callable[[], float]:
    """
    The date as C{clock} knows it (epoch seconds): its wall clock if it has one apart from
    its timers (L{useMonotonicTimers}), else its C{seconds}.
    """
    wall: Callable[[], float] | None = getattr(clock, WALL_CLOCK_ATTRIBUTE, None)
    return wall if wall is not None else clock.seconds


def elapsedClock(clock: Any) -> Callable[[], float]:
    """
    A clock for durations that goes with the timer clock C{clock}: the one it names
    (L{ELAPSED_CLOCK_ATTRIBUTE}, a test's), the monotonic clock if C{clock} times with the
    wall clock (a reactor left as Twisted makes it), else C{clock}'s own C{seconds} (a
    reactor after L{useMonotonicTimers}; a C{task.Clock} in tests).
    """
    elapsed: Callable[[], float] | None = getattr(clock, ELAPSED_CLOCK_ATTRIBUTE, None)
    if elapsed is not None:
        return elapsed
    seconds: Callable[[], float] = clock.seconds
    return time.monotonic if seconds is time.time else seconds


__all__ = [
    "ELAPSED_CLOCK_ATTRIBUTE",
    "WALL_CLOCK_ATTRIBUTE",
    "elapsedClock",
    "useMonotonicTimers",
    "wallClock",
]
