"""
groundcontrol's timers keep their delays through a step of its machine's wall clock
(accesstunnel/stepwatch.py), while the dates it stores stay the wall clock's.

Two kinds of clock stand in for the reactor: one of Twisted's reactors, made here and never
run (its own heap of timed calls, driven with C{runUntilCurrent} and C{timeout}), and a
L{SteppingClock}: a C{task.Clock} whose C{rightNow} is the monotonic clock and whose timers
are on a wall clock offset from it by the steps the test makes, on which the whole in-memory
groundcontrol (L{InMemoryFleet}) runs with a real agent link.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.clocks import elapsedClock, wallClock
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL
from accesstunnel.keys import fingerprint
from accesstunnel.rekey import RekeyLimit
from accesstunnel.stepwatch import ClockStepWatch, watchClockSteps
from accesstunnel.transports.limiter import HandshakeLimiter
from accesstunnel.transports.tor import UPLOAD_CHECK_INTERVAL, _UploadWatch
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.devicewait import DeviceNotBackError, DeviceWaitPolicy, DeviceWaits
from groundcontrol.flapping import FlapLimiter
from groundcontrol.metrics import Metrics, instrumentFactory
from groundcontrol.notify import FleetEvent
from groundcontrol.preauth import guardOf
from groundcontrol.recording import (
    Recording,
    RecordingPolicy,
    parseCast,
    recordingPath,
    synchronousRunner,
)
from groundcontrol.sessions import SessionRegistry, attachSessions
from groundcontrol.stormgc import CHECK_SECONDS, SETTLE_SECONDS, StormCollector
from groundcontrol.testing import (
    InMemoryFleet,
    newKey,
    openMemoryStore,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)
from tests.test_enrollment import EnrollmentTestCase
from tests.test_preauth import CLIENT_VERSION, RawClient
from tests.test_stormgc import FakeCollector
from tests.test_transports_limiter import Conn as LimiterConn
from tests.test_transports_limiter import FakePort, FakeSSHFactory

HOUR = 3600.0
DAY = 86400.0

#: The wall clock's date when the tests start (2027-01-15), far from the monotonic clock.
WALL_START = 1_800_000_000.0
MONOTONIC_START = 500.0


class ReactorStepTests(SynchronousTestCase):
    """L{watchClockSteps} on one of Twisted's reactors (made here, never run)."""

    def setUp(self) -> None:
        self.reactor: Any = SelectReactor()
        self.addCleanup(self.reactor.waker.connectionLost, None)
        self.wallNow = WALL_START
        self.monotonicNow = MONOTONIC_START
        self.reactor.seconds = lambda: self.wallNow  # Twisted's default: the wall clock
        self.ran: list[str] = []

    def watch(self) -> ClockStepWatch:
        return watchClockSteps(
            self.reactor, wall=lambda: self.wallNow, monotonic=lambda: self.monotonicNow
        )

    def elapse(self, seconds: float) -> None:
        """Real time passes: both clocks move on, and the reactor runs what is due."""
        self.wallNow += seconds
        self.monotonicNow += seconds
        self.reactor.runUntilCurrent()

    def test_stepBackKeepsDelays(self) -> None:
        """
        A keepalive look due in 10 s, in the heap or still new, runs 10 s later after the
        clock stepped back an hour, not an hour and 10 s later.
        """
        self.watch()
        self.reactor.callLater(10, self.ran.append, "look")
        self.reactor._insertNewDelayedCalls()  # in the heap, as after a reactor iteration
        self.reactor.callLater(12, self.ran.append, "new")
        self.wallNow -= HOUR
        self.elapse(9.5)
        self.assertEqual(self.ran, [])
        self.elapse(0.5)
        self.assertEqual(self.ran, ["look"])
        self.elapse(2)
        self.assertEqual(self.ran, ["look", "new"])

    def test_stepForwardFiresNothingEarly(self) -> None:
        """
        After a step forward of an hour, the reactor's run of due calls fires neither a
        30 s grace timer nor an hourly one (the run's own reading of the clock moves them
        first), and it may sleep the grace timer's remaining delay.
        """
        self.watch()
        self.reactor.callLater(30, self.ran.append, "grace")
        self.reactor.callLater(HOUR, self.ran.append, "hourly")
        self.reactor._insertNewDelayedCalls()
        self.elapse(10)
        self.wallNow += HOUR
        self.reactor.runUntilCurrent()
        self.assertEqual(self.ran, [])
        self.assertAlmostEqual(self.reactor.timeout(), 20.0)
        self.elapse(20)
        self.assertEqual(self.ran, ["grace"])
        self.elapse(HOUR - 30 - 1)
        self.assertEqual(self.ran, ["grace"])
        self.elapse(1)
        self.assertEqual(self.ran, ["grace", "hourly"])

    def test_sleepAfterStepBack(self) -> None:
        """
        A step back seen first by the reactor's question of how long it may sleep (the
        step came between its run of due calls and that question) is a sleep of the
        first timer's remaining delay, not of an hour more.
        """
        self.watch()
        self.reactor.callLater(10, self.ran.append, "look")
        self.reactor._insertNewDelayedCalls()
        self.wallNow -= HOUR
        self.assertAlmostEqual(self.reactor.timeout(), 10.0, places=5)

    def test_callMadeAfterTheStepIsNotMoved(self) -> None:
        """
        A call made after the step and before the reactor's next run (an I/O event's, as
        the reactor wakes up) is on the new clock already: it keeps its delay too.
        """
        self.watch()
        self.reactor.callLater(30, self.ran.append, "before")
        self.reactor._insertNewDelayedCalls()
        self.wallNow -= HOUR
        self.reactor.callLater(5, self.ran.append, "after")  # from a packet that woke it
        self.elapse(5)
        self.assertEqual(self.ran, ["after"])
        self.elapse(25)
        self.assertEqual(self.ran, ["after", "before"])

    def test_resetAfterTheStep(self) -> None:
        """
        A call made before the watch was installed and reset after a step is due its new
        delay after the reset (its clock is the watch's).
        """
        call = self.reactor.callLater(30, self.ran.append, "timeout")
        self.watch()
        self.wallNow -= HOUR
        call.reset(10)
        self.elapse(9.5)
        self.assertEqual(self.ran, [])
        self.elapse(0.5)
        self.assertEqual(self.ran, ["timeout"])

    def test_smallDifferenceMovesNothing(self) -> None:
        """
        Readings apart by less than the threshold move no timer, and add up: a second
        small step that makes the difference pass it moves them by the whole of it.
        """
        watch = self.watch()
        call = self.reactor.callLater(30, print)
        self.wallNow += 0.6
        self.reactor.runUntilCurrent()
        self.assertEqual((call.getTime(), watch.steps), (WALL_START + 30, 0))
        self.wallNow += 0.6
        self.reactor.runUntilCurrent()
        self.assertEqual(watch.steps, 1)
        self.assertAlmostEqual(call.getTime(), WALL_START + 31.2, places=5)

    def test_oneLineSaysTheStep(self) -> None:
        """One warning line says which way, how far, and how many timers (cancelled not)."""
        self.watch()
        self.reactor.callLater(10, print)
        self.reactor.callLater(20, print)
        self.reactor.callLater(30, print).cancel()
        with capturedLogs() as events:
            self.wallNow -= HOUR - 1e-6  # the monotonic clock read a moment later
            self.reactor.runUntilCurrent()
            self.wallNow += DAY - 1e-6
            self.reactor.runUntilCurrent()
            self.reactor.runUntilCurrent()
        lines = [e["log_format"].format(**e) for e in events if "stepped" in e["log_format"]]
        self.assertEqual(
            lines,
            [
                "the clock stepped back 1h00m00s; 2 timers keep their delays",
                "the clock stepped forward 1d00h00m; 2 timers keep their delays",
            ],
        )

    def test_datesStayTheWallClock(self) -> None:
        """
        The reactor's seconds (every date groundcontrol stores) is the wall clock, before
        and after a step; durations are measured on the monotonic clock.
        """
        self.watch()
        self.assertEqual(self.reactor.seconds(), WALL_START)
        self.wallNow -= HOUR
        self.assertEqual(self.reactor.seconds(), WALL_START - HOUR)
        self.assertEqual(wallClock(self.reactor)(), WALL_START - HOUR)
        self.assertEqual(elapsedClock(self.reactor)(), MONOTONIC_START)

    def test_otherThreadsMoveNothing(self) -> None:
        """
        A reading of the reactor's clock from another thread (a store's) after a step is
        the wall clock and moves no timer (the heap is the reactor thread's); the reactor
        thread's next reading does.
        """
        watch = self.watch()
        call = self.reactor.callLater(10, print)
        self.wallNow -= HOUR
        readings: list[float] = []
        reader = threading.Thread(target=lambda: readings.append(self.reactor.seconds()))
        reader.start()
        reader.join()
        self.assertEqual(
            (readings, call.getTime(), watch.steps), ([WALL_START - HOUR], WALL_START + 10, 0)
        )
        self.reactor.runUntilCurrent()
        self.assertEqual((call.getTime(), watch.steps), (WALL_START - HOUR + 10, 1))

    def test_onceOnly(self) -> None:
        """A second call returns the first watch; timers are moved once per step."""
        first = self.watch()
        self.assertIs(self.watch(), first)
        call = self.reactor.callLater(10, print)
        self.wallNow -= HOUR
        self.reactor.runUntilCurrent()
        self.assertEqual(call.getTime(), WALL_START - HOUR + 10)


class SteppingClock(Clock):
    """
    A C{task.Clock} that times on a wall clock: C{rightNow} (what C{advance} moves) is the
    monotonic clock, the wall clock is it plus an offset that L{step} changes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rightNow = MONOTONIC_START
        self.offset = WALL_START - MONOTONIC_START
        self.watch = watchClockSteps(self, wall=self.wall, monotonic=self.monotonic)

    def wall(self) -> float:
        return self.rightNow + self.offset

    def monotonic(self) -> float:
        return self.rightNow

    def step(self, seconds: float) -> None:
        """Step the wall clock (C{date -s}, chrony's makestep) by C{seconds}."""
        self.offset += seconds

    def advance(self, amount: float) -> None:
        """
        Time passes, then the due calls run, as a reactor's run does: the clock is read
        (a step seen, the calls moved) before any call's time (C{Clock.advance} reads the
        first call's time first).
        """
        self.rightNow += amount
        self.seconds()
        super().advance(0)


class FleetStepTests(SynchronousTestCase):
    """The in-memory groundcontrol, with a real agent link, through steps of its clock."""

    def setUp(self) -> None:
        self.clock = SteppingClock()
        self.fleet = InMemoryFleet(clock=self.clock)
        self.deviceKey = self.fleet.enrollDevice("kiln7")

    def connectAgent(self, rekeyLimit: RekeyLimit | None = None) -> Any:
        settings = LinkSettings(
            name="kiln7",
            deviceKey=self.deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
            **({} if rekeyLimit is None else {"rekeyLimit": rekeyLimit}),
        )
        factory = AgentLinkFactory(settings, self.clock, scriptedSessions(), refuseForwards)  # type: ignore[arg-type]
        pump = self.fleet.connect(factory)
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        return pump

    def elapse(self, seconds: float, step: float = 1.0) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.fleet.flush()

    def remainingDelays(self) -> list[float]:
        now = self.clock.seconds()
        return sorted(round(call.getTime() - now, 6) for call in self.clock.getDelayedCalls())

    def test_frozenAgentFoundAfterStepBack(self) -> None:
        """
        After the clock stepped back an hour, an agent that freezes (nothing arrives any
        more) is dropped within the keepalive deadline (interval x count, 45 s) of its
        last packet, plus the sweep's one-second granule: not an hour late.
        """
        pump = self.connectAgent()
        self.elapse(100)
        self.clock.step(-HOUR)
        self.elapse(5)
        self.fleet.network.pumps.remove(pump)  # frozen: nothing moves any more
        lastHeard = pump.server.keepalive.lastReceived  # on the monotonic clock
        deadline = DEFAULT_INTERVAL * DEFAULT_COUNT
        self.clock.advance(lastHeard + deadline - 0.5 - self.clock.monotonic())
        self.assertFalse(pump.serverIO.disconnecting)
        self.elapse(2)
        self.assertTrue(pump.serverIO.disconnecting, "the frozen agent's link was dropped")

    def test_stepForwardFiresNoTimerEarly(self) -> None:
        """
        A step forward of an hour leaves every pending timer (the link's keepalive and
        rekey timers, a client's login grace timer, the fleet's hourly ones) its remaining
        delay, and the link and a client still logging in both stay.
        """
        pump = self.connectAgent()
        self.elapse(10)
        client = RawClient(self.fleet, "127.0.0.5")
        client.send(CLIENT_VERSION)
        before = self.remainingDelays()
        self.clock.step(+HOUR)
        self.assertEqual(self.remainingDelays(), before)
        self.clock.advance(0)
        self.fleet.flush()
        self.assertFalse(client.dropped, "the login grace timer did not fire at the step")
        self.assertFalse(pump.serverIO.disconnecting or pump.clientIO.disconnecting)
        self.elapse(self.fleet.factory.settings.loginGraceTime)
        self.assertTrue(client.dropped, "the grace timer fired after its own delay")
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))

    def test_agentRekeysAfterStepBack(self) -> None:
        """
        An agent that renews its link's keys (every 10 min here) after the clock stepped
        back an hour is not taken for one renewing too often (10 at once, then one per
        0.25 s): its link stays. Counted on the wall clock, the step was an hour owed.
        """
        pump = self.connectAgent(rekeyLimit=RekeyLimit(bytes=0, seconds=600))
        self.elapse(601)
        self.assertEqual(pump.client.keyExchanges, 2)
        self.clock.step(-HOUR)
        self.elapse(600)
        self.assertFalse(pump.serverIO.disconnecting, "the link stayed")
        self.assertEqual(pump.client.keyExchanges, 3)

    def test_durationsThroughStepForward(self) -> None:
        """
        How long the link and an operator's session lasted (the log lines, the offline
        event's connectedFor, which webhooks get) is 10 s and 8 s through a step forward
        of an hour, not an hour more; the session's row keeps its wall dates.
        """
        attachSessions(self.fleet.registry, SessionRegistry(self.fleet.store, self.clock))
        key = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        pump = self.connectAgent()
        alice = self.fleet.operator("dev_kiln7", key)
        with capturedLogs() as events:
            session = self.fleet.session(alice)
            session.exec(b"cat")  # echoes until its end: open as long as the operator
            self.elapse(2)
            self.clock.step(+HOUR)
            self.elapse(6)
            session.loseConnection()
            self.fleet.flush()
            self.elapse(2)
            self.fleet.network.cut(pump)
        said = [e for e in events if "log_format" in e]
        (ended,) = [e for e in said if "duration" in e]
        self.assertAlmostEqual(ended["duration"], 8.0, places=3)
        (gone,) = [e for e in said if "connectedFor" in e and "lasted" in e]
        self.assertEqual(gone["connectedFor"], 10.0)
        (offline,) = [
            e
            for e in resultNow(self.fleet.store.auditSince(0, 1000))
            if e.event == "device.offline"
        ]
        self.assertEqual(offline.detail["connectedFor"], 10.0)

    def test_deviceWaitThroughStepForward(self) -> None:
        """
        A channel waiting 15 s for its device, an hour's step forward in the middle, ends
        15 s after it began and says it waited 15 s (the timer and the text alike).
        """
        waits = DeviceWaits(DeviceWaitPolicy(maxWait=15.0), self.fleet.registry, self.clock)
        waiting = waits.wait("kiln7")
        self.clock.advance(5)
        self.clock.step(+HOUR)
        self.clock.advance(9.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.1)
        failure = self.failureResultOf(waiting, DeviceNotBackError)
        self.assertAlmostEqual(failure.value.args[0], 15.0, places=3)

    def test_graceVerdictAfterStepForward(self) -> None:
        """
        A client that gives up after 2 s, an hour's step forward in between, is not counted
        as having run out the login grace time (30 s): the verdict's duration is measured on
        the monotonic clock.
        """
        penalties = guardOf(self.fleet.factory).penalties
        counted: list[str] = []
        self.patch(penalties, "failed", lambda source, why: counted.append(why))
        client = RawClient(self.fleet, "127.0.0.6")
        client.send(CLIENT_VERSION)
        self.clock.advance(1)
        self.clock.step(+HOUR)
        self.clock.advance(1)
        client.lose()
        self.assertEqual(counted, [])

    def test_storedDatesAreTheNewWallDates(self) -> None:
        """
        After a step back of a day, what groundcontrol stores (an agent's login: the
        device's last-seen date; the audit's rows) carries the stepped wall clock's date,
        not the monotonic clock's (1970) nor the date before the step.
        """
        self.elapse(10)
        self.clock.step(-DAY)
        self.connectAgent()
        now = self.clock.wall()
        (device,) = resultNow(self.fleet.store.listDevices())
        self.assertIsNotNone(device.lastSeen)
        self.assertLess(abs(device.lastSeen - now), 1.0)
        resultNow(self.fleet.store.revokeDevice("kiln7", "alice", self.fleet.now))
        rows = resultNow(self.fleet.store.auditSince(0, limit=1000))
        self.assertLess(abs(rows[-1].at - now), 1.0)


class Notifications:
    """A notifier that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[FleetEvent] = []

    def notify(self, event: FleetEvent) -> None:
        self.events.append(event)


class FleetWatcherStepTests(SynchronousTestCase):
    """
    The fleet watcher's own deadlines (the next lease check, a held notification's wait)
    are durations: a step of the clock neither holds them back nor brings them forward.
    """

    def setUp(self) -> None:
        self.clock = SteppingClock()
        self.notifications = Notifications()
        self.fleet = InMemoryFleet(clock=self.clock, notifier=self.notifications)
        self.store = self.fleet.store

    def pollFor(self, seconds: int) -> None:
        """The watcher polls every second for C{seconds} (as its loop does)."""
        for _ in range(seconds):
            self.clock.advance(1)
            self.fleet.pollFleet()

    def pendingKey(self, name: str) -> str:
        """A new key asks for C{name} (as its agent's login does); its fingerprint."""
        line = publicLine(newKey())
        resultNow(
            self.store.recordContact(name, line, fingerprint(line), None, "test", self.fleet.now)
        )
        return fingerprint(line)

    def test_leaseLapsesAfterStepBack(self) -> None:
        """
        After the clock stepped back an hour, a claim whose lease ends a minute later (on
        the new clock) is ended within the lease check's 30 s after that: the checks go on
        every 30 s, not an hour later.
        """
        self.pollFor(5)  # a lease check ran: the next is due in 30 s
        self.clock.step(-HOUR)
        self.fleet.addOperator("bob")
        code = "ab" * 32
        resultNow(
            self.store.registerClaimCode(
                code, self.pendingKey("kiln8"), "kiln8", self.fleet.now + 600, self.fleet.now
            )
        )
        bob = next(a for a in resultNow(self.store.listAccounts()) if a.name == "bob")
        resultNow(self.store.claimDevice(code, bob, self.fleet.now + 60, self.fleet.now))
        self.pollFor(60 + 31)
        (device,) = resultNow(self.store.listDevices())
        self.assertIsNone(device.owner, "the lapsed lease was ended")

    def test_heldNotificationAfterStepBack(self) -> None:
        """
        A new device's notification, held for its serial (10 s) when its agent says no
        hello, goes out 10 s later even though the clock stepped back an hour meanwhile.
        """
        self.pendingKey("kiln9")
        self.fleet.pollFleet()
        self.assertEqual(self.notifications.events, [])
        self.clock.step(-HOUR)
        self.pollFor(10)
        self.assertEqual([e.event for e in self.notifications.events], ["device.pending"])

    def test_heldNotificationAfterStepForward(self) -> None:
        """... and is not sent at once when the clock steps forward an hour."""
        self.pendingKey("kiln9")
        self.fleet.pollFleet()
        self.clock.step(+HOUR)
        self.pollFor(1)
        self.assertEqual(self.notifications.events, [])
        self.pollFor(9)
        self.assertEqual([e.event for e in self.notifications.events], ["device.pending"])


class FlapLimiterStepTests(SynchronousTestCase):
    """A device's flap window (60 s) is a duration: a step of the clock does not stretch it."""

    def setUp(self) -> None:
        self.clock = SteppingClock()
        self.store = openMemoryStore()
        self.limiter = FlapLimiter(self.store, self.clock, window=60.0)

    def kinds(self) -> list[str]:
        return [e.event for e in resultNow(self.store.auditSince(0, 1000))]

    def test_windowEndsAfterStepBack(self) -> None:
        """
        A device that flaps across a step back of an hour is summarised when its minute
        ends, with the window's start date as the clock said it then, and its transitions
        are recorded again in the next minute (not an hour of them counted as flaps).
        """
        started = self.clock.wall()
        self.limiter.online("kiln7", {})
        self.clock.advance(1)
        self.limiter.offline("kiln7", {})
        self.clock.advance(1)
        self.limiter.online("kiln7", {})  # suppressed: the summary is due at the minute's end
        self.clock.step(-HOUR)
        self.clock.advance(57.9)
        self.assertEqual(self.kinds(), ["device.online", "device.offline"])
        self.clock.advance(0.2)  # the minute is over (the dates' floats are not exact)
        self.assertEqual(self.kinds(), ["device.online", "device.offline", "device.flapping"])
        (summary,) = [e for e in resultNow(self.store.auditSince(0, 1000)) if e.detail]
        self.assertEqual((summary.detail["since"], summary.at), (started, self.clock.wall()))
        self.clock.advance(1)
        self.limiter.offline("kiln7", {})
        self.assertEqual(self.kinds()[-1], "device.offline")

    def test_quietDeviceAfterStepBack(self) -> None:
        """
        A device online before a step back of an hour, offline and online again a minute
        after it, has both transitions recorded: its window was over, not an hour long.
        """
        self.limiter.online("kiln7", {})
        self.clock.step(-HOUR)
        self.clock.advance(61)
        self.limiter.offline("kiln7", {})
        self.clock.advance(1)
        self.limiter.online("kiln7", {})
        self.assertEqual(self.kinds(), ["device.online", "device.offline", "device.online"])


class RecordingStepTests(SynchronousTestCase):
    """A session recording's event times are seconds since its start, whatever the clock did."""

    def test_eventTimesThroughSteps(self) -> None:
        """
        Output 1 s, 2 s and 3 s into the session, a step back of an hour and a step forward
        of a day in between, is at 1, 2 and 3 s in the cast (not 1, 1, 1 for an hour of
        steps back, nor a day's gap); the header's date is the wall clock's at the start.
        """
        clock = SteppingClock()
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        path = recordingPath(directory, "abcdefghij", clock.seconds())
        recording = Recording.start(
            path, 80, 24, "xterm", clock, synchronousRunner, RecordingPolicy(directory=directory)
        )
        for text, step in (("a", -HOUR), ("b", +DAY), ("c", 0.0)):
            clock.advance(1)
            recording.output(text.encode())
            clock.step(step)
        self.successResultOf(recording.close())
        cast = parseCast(path.read_bytes())
        self.assertEqual(
            [(t, text) for t, _, text in cast.events], [(1.0, "a"), (2.0, "b"), (3.0, "c")]
        )
        self.assertEqual(cast.header["timestamp"], int(WALL_START))


class ClaimGuessStepTests(EnrollmentTestCase):
    """
    ``ctl claim``'s bound on wrong pairing codes (10 at once, then one a minute) is a rate:
    a step of groundcontrol's clock back does not count as codes owed.
    """

    def test_claimAfterStepBack(self) -> None:
        """
        An operator who mistyped a code, then claims with the right one after the clock
        stepped back an hour, claims the device (counted on the wall clock, the hour was
        60 wrong codes owed: refused for an hour).
        """
        clock = self.world.clock
        wall = SteppingWall(clock)
        watchClockSteps(clock, wall=wall, monotonic=lambda: clock.rightNow)
        mallory = self.world.operator("mallory")
        agent = self.world.start("oven2")
        status, _, err = self.world.ctl(mallory, "claim AAAA-0000")
        self.assertEqual(status, 1, err)
        wall.offset -= HOUR
        status, _, err = self.world.ctl(mallory, f"claim {agent.status['pairing_code']}")
        self.assertEqual((status, err), (0, ""))


class SteppingWall:
    """A wall clock: a Clock's C{rightNow} (the monotonic clock) plus steps."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.offset = 0.0

    def __call__(self) -> float:
        return self._clock.rightNow + self.offset


class StormCollectorStepTests(SynchronousTestCase):
    """The storm collector's quiet period (5 s with no connection waiting) is a duration."""

    def test_quietPeriodThroughStepBack(self) -> None:
        """
        A storm that ends just before the clock steps back an hour gets its full collection
        5 s later, not an hour later (the heap frozen all that time).
        """
        clock = SteppingClock()
        waiting = [10]
        collector = FakeCollector()
        storm = StormCollector(clock, lambda: waiting[0], collector)
        storm.startService()
        self.addCleanup(storm.stopService)
        clock.advance(CHECK_SECONDS * 2)
        waiting[0] = 0
        clock.step(-HOUR)
        for _ in range(round(SETTLE_SECONDS / CHECK_SECONDS)):
            clock.advance(CHECK_SECONDS)
        self.assertEqual(collector.calls[-2:], ["unfreeze", "collect"])
        self.assertFalse(storm.inStorm)


class HandshakeWaitStepTests(SynchronousTestCase):
    """The handshake limiter's longest wait (its end-of-episode line) is a duration."""

    def test_longestWaitThroughStepForward(self) -> None:
        """
        A connection that waited 2 s for a handshake slot, the clock stepped forward an hour
        meanwhile, is said to have waited 2.0 s, not 3602.
        """
        clock = SteppingClock()
        limiter = HandshakeLimiter(
            FakeSSHFactory(), maxPending=1, maxPerSource=1, clock=clock, operatorReserve=0
        )
        events: list[dict[str, Any]] = []
        limiter._log = Logger(observer=events.append)  # type: ignore[misc]
        port = FakePort()
        first = LimiterConn(limiter, "192.0.2.1", port)
        second = LimiterConn(limiter, "192.0.2.2", port)
        clock.advance(1)
        clock.step(+HOUR)
        clock.advance(1)
        first.login()
        second.login()
        (end,) = [e for e in events if "below the limit again" in e["log_format"]]
        self.assertEqual(end["longest"], 2.0)


class HandshakeDurationStepTests(SynchronousTestCase):
    """groundcontrol_handshake_seconds measures a login on the monotonic clock."""

    def test_handshakeThroughStepForward(self) -> None:
        """
        An operator's login that took 2 s, the clock stepped forward an hour while its key
        was checked, is observed as 2 s (it was 3602 s: the histogram's top bucket).
        """
        clock = SteppingClock()
        fleet = InMemoryFleet(clock=clock)
        metrics = Metrics()
        instrumentFactory(fleet.factory, metrics)
        key = fleet.addOperator("alice")
        login = fleet.factory.portal.login
        steps = [+HOUR]

        def slowLogin(*args: Any, **kwargs: Any) -> Any:
            while steps:  # once: the key is asked about, then signed with
                clock.advance(1)
                clock.step(steps.pop())
                clock.advance(1)
            return login(*args, **kwargs)

        fleet.factory.portal.login = slowLogin
        fleet.operator("alice", key)
        sample = metrics.registry.get_sample_value
        self.assertEqual(sample("groundcontrol_handshake_seconds_count", {"peer": "operator"}), 1)
        self.assertEqual(sample("groundcontrol_handshake_seconds_sum", {"peer": "operator"}), 2)


class _BootstrappingTor:
    """A tor control protocol still bootstrapping: every question gets the same answer."""

    def get_info(self, *keys: str) -> dict[str, str]:
        return {"status/bootstrap-phase": 'NOTICE BOOTSTRAP PROGRESS=45 TAG=x SUMMARY="Asking"'}


class TorUploadWaitStepTests(SynchronousTestCase):
    """How long tor has had to upload an onion service's descriptor is a duration."""

    def test_uploadWaitThroughStepForward(self) -> None:
        """
        A minute after the publish began, the clock stepped forward an hour in between,
        the line says 60 s (it said 3660 s).
        """
        clock = SteppingClock()
        with capturedLogs() as events:
            watch = _UploadWatch(clock, _BootstrappingTor(), "tor", lambda _: None)
            self.addCleanup(watch.stop)
            clock.advance(1)
            clock.step(+HOUR)
            clock.advance(UPLOAD_CHECK_INTERVAL - 1)
        (line,) = [e for e in events if "descriptor after" in e.get("log_format", "")]
        self.assertEqual(round(line["seconds"]), 60)
