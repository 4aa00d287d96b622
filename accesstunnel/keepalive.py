"""
SSH-level keepalives: find a peer that went silent.

TCP keepalive cannot see a frozen process or a path that silently drops
everything; only a request the peer must answer can. Both ends of the agent
link, and groundcontrol towards operators, run one L{Keepalive} per
connection.

The rule: when nothing has been received since the previous check (one
interval ago; like OpenSSH's ClientAliveInterval), send a
C{keepalive@openssh.com} global request (every SSH implementation answers an
unknown global request with success or failure, and either is proof of life).
When nothing has been received for C{interval * count} seconds, the peer is
dead. At most one timer is pending per connection, and an idle connection
wakes once per interval, no more.

A keepalive may also wait longer before it asks (C{probeAfter}, like OpenSSH's
ClientAliveInterval: a probe only after that much silence). groundcontrol
uses that on agent links: the agent pings on its own every other interval
(30 s), so its pings, answered, are the proof of life, and groundcontrol sends
nothing and wakes only about once per ping it receives; it still asks a link that goes
quiet, and still declares it dead after C{interval * count} seconds.

Passive keepalives of many connections may share one L{KeepaliveSweep}: the
look a passive keepalive takes when its peer was heard from lately (nothing to
do but look again later) then waits in a one-second bucket instead of a timer
of its own. On groundcontrol with 10,000 agent links that is ~333 looks a
second without a DelayedCall each (one heap push and pop in the reactor,
~14 Python comparisons each), and at most one wake-up a second for all of them.

Silence is measured on a clock that does not step (L{accesstunnel.clocks.elapsedClock}):
the monotonic clock under a reactor that times with the wall clock (groundcontrol's), the
reactor's own under one that does not (the agent's). Measured on the wall clock, a step
forward by less than the deadline (NTP stepping groundcontrol's clock by half a minute)
added the step to every link's silence and dropped most agent links at once: a reconnect
storm of the whole fleet.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock, wallClock

DEFAULT_INTERVAL = 15.0
DEFAULT_COUNT = 3
#: The share of an alignment slot an aligned check's due time may be past its slot
#: and still count as on it (L{Keepalive._nextInterval}).
ALIGN_TOLERANCE = 0.001


class KeepaliveSweep:
    """
    One timer for the quiet-link looks of many passive keepalives on one clock.

    A look filed for time T runs in the bucket of the first multiple of
    C{granularity} at or after T: never early, at most C{granularity} late. Only
    the looks that find the peer heard from lately go through the sweep; a
    probe's follow-up and the verdict are timed exactly by the keepalive itself,
    so a dead peer is still found at exactly C{interval * count} seconds.

    A stopped keepalive is not taken out of its bucket (that would cost a search
    per closed connection); its look is skipped when the bucket runs, at most
    C{probeAfter + granularity} seconds later.
    """

    def __init__(self, clock: IReactorTime, granularity: float = 1.0) -> None:
        if granularity <= 0:
            raise ValueError("sweep granularity must be positive")
        self._clock = clock
        # Slots on a clock that does not step: a look filed before a step of the wall clock
        # still runs its delay later (the timer is moved by the step, the slots need not be).
        self._now = elapsedClock(clock)
        self.granularity = granularity
        self._buckets: dict[int, list[Keepalive]] = {}
        self._slots: list[int] = []  # heap of the buckets' slot numbers
        self._timer: IDelayedCall | None = None
        self._timerSlot: int | None = None

    def file(self, keepalive: Keepalive, when: float) -> int:
        """
        Run C{keepalive}'s look at C{when} (seconds of L{accesstunnel.clocks.elapsedClock} of
        the sweep's clock) or at most a granule later; return its slot.
        """
        slot = math.ceil(when / self.granularity)
        bucket = self._buckets.get(slot)
        if bucket is None:
            self._buckets[slot] = bucket = []
            heapq.heappush(self._slots, slot)
            if self._timerSlot is None or slot < self._timerSlot:
                self._arm(slot)
        bucket.append(keepalive)
        return slot

    def fileIn(self, keepalive: Keepalive, delay: float) -> int:
        """L{file} C{keepalive}'s look C{delay} seconds from now (of the sweep's clock)."""
        return self.file(keepalive, self._now() + delay)

    def __len__(self) -> int:
        """Looks filed and not yet run (stopped keepalives' included)."""
        return sum(len(b) for b in self._buckets.values())

    def _arm(self, slot: int) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timerSlot = slot
        delay = max(slot * self.granularity - self._now(), 0.0)
        self._timer = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = self._timerSlot = None
        now = self._now()
        slots = self._slots
        # Everything due by now (a timer that ran late runs the buckets it passed).
        while slots and slots[0] * self.granularity <= now:
            slot = heapq.heappop(slots)
            for keepalive in self._buckets.pop(slot):
                keepalive._sweepLook(slot)
        if slots:
            self._arm(slots[0])


class Keepalive:
    """
    Watch one connection for silence.

    @ivar lastReceived: when the peer last sent anything (seconds of L{now}).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        sendPing: Callable[[], None],
        onDead: Callable[[], None],
        interval: float = DEFAULT_INTERVAL,
        count: int = DEFAULT_COUNT,
        probeAfter: float | None = None,
        sweep: KeepaliveSweep | None = None,
        align: float | None = None,
        elapsed: Callable[[], float] | None = None,
    ) -> None:
        """
        @param probeAfter: seconds of silence before the first ping (default:
            C{interval}, checked every interval). Longer makes the keepalive
            passive: it wakes when the silence would reach C{probeAfter}, not
            every interval, and pings only then (and every interval after
            that, until the deadline).
        @param sweep: where a passive keepalive files its quiet-link looks
            (shared by many connections); without one, or if C{probeAfter}
            plus the sweep's granularity passes the deadline, it sets a
            timer for each.
        @param align: an active keepalive's checks run at the first multiple of
            C{align} seconds of the clock at or after each interval (so the
            pings of a whole fleet on synchronised clocks arrive together and
            the server answers many in one wake-up); the deadline stays exact.
            The seconds are the wall clock's (L{accesstunnel.clocks.wallClock}),
            which is what fleets synchronise, whatever C{clock} times with.
        @param elapsed: the clock silence is measured on (default:
            L{accesstunnel.clocks.elapsedClock} of C{clock}, one that does not step).
        """
        if interval <= 0 or count < 1:
            raise ValueError("keepalive interval must be positive and count at least 1")
        if align is not None and not 0 < align <= interval:
            raise ValueError("keepalive align must be positive and at most the interval")
        self._align = align
        if probeAfter is not None and not interval <= probeAfter <= interval * count:
            raise ValueError("keepalive probeAfter must be between interval and interval * count")
        self._clock = clock
        #: The clock silence is measured on, for callers that do what L{received} does
        #: inline. Timers still run on C{clock}: only the delays given it come from here.
        self.now = elapsedClock(clock) if elapsed is None else elapsed
        self._wall = wallClock(clock)
        self._sendPing = sendPing
        self._onDead = onDead
        self.interval = interval
        self.count = count
        self.probeAfter = interval if probeAfter is None else probeAfter
        self._passive = self.probeAfter > interval
        # A sweep whose granule would push a look past the deadline (a keepalive of a
        # second or two) is not used: such a keepalive sets its own timers.
        fits = sweep is not None and self.probeAfter + sweep.granularity <= self.deadline
        self._sweep = sweep if self._passive and fits else None
        #: The sweep slot this keepalive's next look is filed in, if any.
        self._filed: int | None = None
        self.lastReceived = self.now()
        self._timer: IDelayedCall | None = None
        self._due = self.lastReceived
        self._lastCheck = self.lastReceived

    @property
    def deadline(self) -> float:
        """Seconds of silence after which the peer is declared dead."""
        return self.interval * self.count

    def start(self) -> None:
        """Begin watching; silence is counted from now."""
        self.lastReceived = self._lastCheck = self._due = self.now()
        if self._passive:
            self._look(self.probeAfter)
        else:
            self._schedule(self._nextInterval())

    def stop(self) -> None:
        """Stop watching (the connection is gone)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._filed = None

    def received(self) -> None:
        """The peer sent something. Called for every read: keep it cheap."""
        self.lastReceived = self.now()

    def _schedule(self, delay: float) -> None:
        self._due = self.now() + delay
        self._timer = self._clock.callLater(delay, self._check)

    def _nextInterval(self) -> float:
        """
        Seconds to the next interval check: one interval, or to the aligned time one
        interval after this check was due.

        From when it was due, not from when it ran: a timer runs a little after its time,
        and the aligned time one interval after that is the one after next when the
        interval is the alignment. With the agent's 1 s on 1 s alignment the checks were
        2 s apart, so a check that found the peer heard from 0.5 s before let the next
        ping go at 2.5 s of silence, half a second before the 3 s deadline: a live
        groundcontrol whose answer took 0.55 s (a loaded machine) was declared dead.
        """
        if self._align is None:
            return self.interval
        now = self._wall()
        late = max(self.now() - self._due, 0.0)
        # Less a millisecond a slot: when it was due is read on the clock silence is
        # measured on, which the wall clock may drift from (NTP slews by up to 0.5 ms a
        # second), and its float may land a hair after the slot it was set for.
        nextSlot = max(
            math.ceil((now - late + self.interval) / self._align - ALIGN_TOLERANCE),
            math.floor(now / self._align) + 1,  # a check that ran very late: the next slot
        )
        return nextSlot * self._align - now

    def _look(self, delay: float) -> None:
        """Look again in C{delay} seconds: through the sweep if any (perhaps a little later)."""
        if self._sweep is None:
            self._schedule(delay)
            return
        self._due = self.now() + delay
        self._filed = self._sweep.fileIn(self, delay)

    def _sweepLook(self, slot: int) -> None:
        """The sweep runs the look filed in C{slot} (unless stopped or refiled since)."""
        if self._filed != slot:
            return
        self._filed = None
        self._check()

    def _check(self) -> None:
        self._timer = None
        now = self.now()
        previousCheck, self._lastCheck = self._lastCheck, now
        if now < self.lastReceived:
            # The clock went back (a test's clock, or an elapsed clock given that steps):
            # count silence from now, not from the future.
            self.lastReceived = now
        if now - self._due >= self.deadline:
            # The check ran a whole deadline late: the process was stopped (or a test's
            # clock jumped forward). Silence we did not watch is no verdict: ask now, and
            # judge from the answer (dead after count - 1 more intervals without one).
            self.lastReceived = max(self.lastReceived, now - self.interval)
            previousCheck = self.lastReceived
        silence = now - self.lastReceived
        if silence >= self.deadline:
            self._log.info(
                "peer silent for {silence:.0f}s, declaring the connection dead",
                silence=silence,
            )
            self._onDead()
            return
        if silence < self.probeAfter and self._passive:
            # Heard from lately: nothing to ask. Wake when the silence would reach
            # probeAfter (traffic meanwhile only moves lastReceived, no timer).
            # At least a millisecond: a float remainder too small to move the
            # clock must not make a busy loop.
            self._look(max(self.probeAfter - silence, 0.001))
            return
        # Passive: silent for probeAfter (we are here only then). Active: nothing at
        # all since the last check (OpenSSH's ClientAliveInterval rule). The answer
        # to our own ping arrives after the check that sent it and spares the next
        # one: a peer that only answers is pinged every other interval, however
        # late the timer runs or slow the answer is. Unless the next check is too
        # late for that: its ping must leave half an interval for the answer before
        # the deadline (count 2, or a 1 s interval whose aligned check ran late
        # against a 3 s deadline, declared a live peer dead).
        nextCheck = self._nextInterval()
        if (
            self._passive
            or self.lastReceived <= previousCheck
            or silence + nextCheck + self.interval / 2 > self.deadline
        ):
            self._sendPing()
        # Wake at the next interval, or exactly at the deadline if that is
        # sooner, so a dead peer is found within interval * count.
        untilDeadline = self.lastReceived + self.deadline - now
        self._schedule(min(nextCheck, max(untilDeadline, 0.0)))


class KeepaliveTransportMixin:
    """
    For an SSH transport: watch the peer once the connection service runs.

    The transport calls L{watchPeer} when ssh-connection starts; every read
    counts as a sign of life; L{peerSilent} runs when the peer is dead (by
    default: abort the socket, since a dead peer will never read a polite
    close).
    """

    keepalive: Keepalive | None = None
    _keepaliveLog = Logger()
    #: The fast packet layer's steady path stores the time of every read for this
    #: layer (accesstunnel.fastpath.enterSteadyState).
    steadyCovers = frozenset({"dataReceived"})

    def watchPeer(
        self,
        conn: Any,
        clock: IReactorTime,
        interval: float,
        count: int,
        probeAfter: float | None = None,
        sweep: KeepaliveSweep | None = None,
        align: float | None = None,
    ) -> None:
        """
        Start pinging C{conn}'s peer with C{keepalive@openssh.com} when it is
        silent (for C{probeAfter} seconds, looking through C{sweep} while it
        is heard from: see L{Keepalive}).
        """

        def ping() -> None:
            d = conn.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
            if d is not None:
                d.addErrback(lambda f: None)  # a refusal is an answer too

        self.keepalive = Keepalive(
            clock, ping, self.peerSilent, interval, count, probeAfter, sweep, align
        )
        self.keepalive.start()

    def peerSilent(self) -> None:
        """The peer is dead: drop the connection without waiting for it."""
        self._keepaliveLog.info("no answer from the peer; dropping the connection")
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        keepalive = self.keepalive
        if keepalive is not None:
            keepalive.received()
        super().dataReceived(data)  # type: ignore[misc]

    def connectionLost(self, reason: Any = None) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        super().connectionLost(reason)  # type: ignore[misc]


__all__ = [
    "DEFAULT_COUNT",
    "DEFAULT_INTERVAL",
    "Keepalive",
    "KeepaliveSweep",
    "KeepaliveTransportMixin",
]
