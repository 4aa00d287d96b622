"""Tests for accesstunnel.keepalive: finding a silent peer with SSH-level pings."""

from __future__ import annotations

import itertools
import math
from typing import Any

from twisted.conch.ssh import common, connection, transport
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from accesstunnel import quickack
from accesstunnel.connection import TunnelConnection
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL, Keepalive, KeepaliveSweep
from accesstunnel.keys import fingerprint
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.sshserver import agentProbeAfter
from groundcontrol.testing import (
    InMemoryFleet,
    publicLine,
    refuseForwards,
    scriptedSessions,
)

INTERVAL = 10.0
COUNT = 3


class KeepaliveTests(SynchronousTestCase):
    """One Keepalive on a Clock, recording its pings and its verdict."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pings = 0
        self.deaths = 0
        self.keepalive = Keepalive(self.clock, self.ping, self.dead, INTERVAL, COUNT)

    def ping(self) -> None:
        self.pings += 1

    def dead(self) -> None:
        self.deaths += 1

    def test_pingAfterIntervalOfSilence(self) -> None:
        """A ping goes out once the peer has been silent for one interval, not before."""
        self.keepalive.start()
        self.clock.advance(INTERVAL - 0.5)
        self.assertEqual(self.pings, 0)
        self.clock.advance(0.5)
        self.assertEqual(self.pings, 1)
        self.assertEqual(self.deaths, 0)

    def test_noPingWhileTrafficFlows(self) -> None:
        """A peer that sends something more often than the interval is never pinged."""
        self.keepalive.start()
        for _ in range(100):
            self.clock.advance(INTERVAL / 2)
            self.keepalive.received()
        self.assertEqual((self.pings, self.deaths), (0, 0))

    def test_answeredPingSparesNextCheck(self) -> None:
        """
        A peer that only answers our pings is pinged every other interval: the answer
        (10 ms after the ping) counts as "heard since the last check" at the next
        check, even when every check runs 50 ms late (later than the answer took).
        """
        self.keepalive.start()
        for _ in range(40):
            (check,) = self.clock.getDelayedCalls()
            before = self.pings
            self.clock.advance(check.getTime() + 0.05 - self.clock.seconds())
            if self.pings > before:
                self.clock.advance(0.01)
                self.keepalive.received()
        self.assertEqual((self.pings, self.deaths), (20, 0))

    def test_deadAtExactlyIntervalTimesCount(self) -> None:
        """The peer is declared dead at interval*count seconds of silence, not a moment sooner."""
        self.keepalive.start()
        self.clock.advance(INTERVAL)
        self.clock.advance(INTERVAL)
        self.clock.advance(INTERVAL - 1)
        self.assertEqual(self.deaths, 0)
        self.clock.advance(1)
        self.assertEqual(self.deaths, 1)
        self.assertEqual(self.pings, COUNT - 1)

    def test_deadlineCountsFromLastReceipt(self) -> None:
        """
        Silence is measured from the last byte received, even when that is not on an
        interval boundary: heard from at t=5, dead at exactly t=5+interval*count.
        """
        self.keepalive.start()
        self.clock.advance(5)
        self.keepalive.received()
        self.clock.advance(INTERVAL * COUNT - 0.25)
        self.assertEqual(self.deaths, 0)
        self.clock.advance(0.25)
        self.assertEqual(self.deaths, 1)

    def test_atMostOneTimer(self) -> None:
        """However much traffic or time passes, at most one timer is pending."""
        self.keepalive.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for _ in range(50):
            self.keepalive.received()
            self.clock.advance(1.5)
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)
        for _ in range(COUNT * 4):
            self.clock.advance(INTERVAL / 3)
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)

    def test_deadOnceThenQuiet(self) -> None:
        """After declaring the peer dead the keepalive calls onDead once and schedules nothing."""
        self.keepalive.start()
        self.clock.advance(INTERVAL * COUNT)
        self.assertEqual(self.deaths, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(INTERVAL * COUNT * 10)
        self.assertEqual(self.deaths, 1)

    def test_stopCancels(self) -> None:
        """stop() cancels the pending timer: no ping and no verdict afterwards."""
        self.keepalive.start()
        self.clock.advance(INTERVAL)
        self.keepalive.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(INTERVAL * COUNT * 10)
        self.assertEqual((self.pings, self.deaths), (1, 0))
        self.keepalive.stop()  # idempotent

    def test_badSettingsRefused(self) -> None:
        """A non-positive interval or a count below one is a ValueError, not a busy loop."""
        for interval, count in ((0, 3), (-1, 3), (10, 0)):
            self.assertRaises(
                ValueError, Keepalive, self.clock, self.ping, self.dead, interval, count
            )

    def test_deadline(self) -> None:
        """The deadline is interval times count."""
        self.assertEqual(self.keepalive.deadline, INTERVAL * COUNT)


class _KeepaliveFleet:
    """Numbered keepalives on one clock (INTERVAL x COUNT), recording when each pings and dies."""

    def __init__(self, clock: Clock, **options: Any) -> None:
        self.clock = clock
        self.options = options
        self.pings: dict[int, list[float]] = {}
        self.deaths: dict[int, list[float]] = {}

    def keepalive(self, n: int) -> Keepalive:
        """Start keepalive number C{n}."""
        pings, deaths = self.pings[n], self.deaths[n] = [], []
        k = Keepalive(
            self.clock,
            lambda: pings.append(self.clock.seconds()),
            lambda: deaths.append(self.clock.seconds()),
            INTERVAL,
            COUNT,
            **self.options,
        )
        k.start()
        return k


class AlignedKeepaliveTests(SynchronousTestCase):
    """
    An active keepalive with C{align} (the agent's, align=1 s): its checks, and so its
    pings, fall on whole seconds of the clock, so a fleet's pings arrive together;
    the verdict is still exact.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.fleet = _KeepaliveFleet(self.clock, align=1.0)
        self.pings, self.deaths = self.fleet.pings, self.fleet.deaths
        self.keepalive = self.fleet.keepalive

    def test_fleetPingsTogether(self) -> None:
        """
        Ten keepalives started at different fractions of a second, their peers only
        answering (10 ms later): every ping goes out on a whole second (within the
        test's 10 ms step), all ten at the same instants.
        """
        links = []
        for n in range(10):
            self.clock.advance(0.09)
            links.append(self.keepalive(n))
        answered = [0] * 10
        for _ in range(int(600 / 0.01)):
            self.clock.advance(0.01)
            for n, k in enumerate(links):
                if len(self.pings[n]) > answered[n]:
                    answered[n] = len(self.pings[n])
                    k.received()
        allPings = [t for n in range(10) for t in self.pings[n]]
        self.assertTrue(all(0 <= t - math.floor(t) < 0.011 for t in allPings))
        seconds = {math.floor(t) for t in allPings}
        self.assertEqual(len(seconds), len(self.pings[0]))  # all ten ping together
        self.assertGreater(len(seconds), 600 / (2 * INTERVAL + 1) - 2)
        self.assertEqual(sum(map(len, self.deaths.values())), 0)

    def test_deadlineStillExact(self) -> None:
        """A peer silent since an odd moment is dead at exactly interval * count after it."""
        self.clock.advance(0.37)
        k = self.keepalive(0)
        self.clock.advance(3.21)
        k.received()
        last = self.clock.seconds()
        while self.clock.seconds() < last + INTERVAL * COUNT - 0.01:
            self.clock.advance(0.01)
        self.assertEqual(self.deaths[0], [])
        self.clock.advance(last + INTERVAL * COUNT - self.clock.seconds())
        self.assertEqual(len(self.deaths[0]), 1)
        self.assertAlmostEqual(self.deaths[0][0], last + INTERVAL * COUNT, delta=1e-6)
        self.assertEqual(len(self.pings[0]), COUNT - 1)

    def test_badAlignRefused(self) -> None:
        """align must be positive and at most the interval."""
        for align in (0.0, -1.0, INTERVAL + 1):
            with self.assertRaises(ValueError):
                Keepalive(self.clock, print, print, INTERVAL, COUNT, align=align)


#: Passive keepalives in these tests: probe after 25 s of silence, dead after 30.
PROBE_AFTER = 25.0


class PassiveKeepaliveTests(SynchronousTestCase):
    """
    A keepalive with C{probeAfter} (groundcontrol's on agent links): no ping while the
    peer is heard from, few wake-ups, and a silent peer still dead at interval * count.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.pings: list[float] = []
        self.deaths: list[float] = []
        self.checks: list[float] = []
        self.keepalive = Keepalive(
            self.clock,
            lambda: self.pings.append(self.clock.seconds()),
            lambda: self.deaths.append(self.clock.seconds()),
            INTERVAL,
            COUNT,
            probeAfter=PROBE_AFTER,
        )
        check = self.keepalive._check

        def countingCheck() -> None:
            self.checks.append(self.clock.seconds())
            check()

        self.keepalive._check = countingCheck  # type: ignore[method-assign]
        self.start = self.clock.seconds()
        self.keepalive.start()

    def test_noPingWhilePeerPings(self) -> None:
        """
        A peer whose own keepalive is heard every 2 intervals (what an agent's 15 s
        keepalive does) is never pinged, for hours, and never declared dead.
        """
        for _ in range(1000):
            self.clock.advance(2 * INTERVAL)
            self.keepalive.received()
        self.assertEqual((self.pings, self.deaths), ([], []))

    def test_wakesAtMostOncePerPeerPing(self) -> None:
        """
        While the peer pings every 2 intervals, the keepalive wakes at most once per
        peer ping (an active one wakes every interval), and never more than one timer.
        """
        for _ in range(100):
            self.clock.advance(2 * INTERVAL)
            self.keepalive.received()
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertLessEqual(len(self.checks), 100)
        self.assertGreater(len(self.checks), 0)

    def test_noPingWhileTrafficFlows(self) -> None:
        """
        Traffic more often than the interval: no ping, and a wake-up only when the
        silence could have reached probeAfter (every ~probeAfter seconds), not every interval.
        """
        for _ in range(200):
            self.clock.advance(INTERVAL / 2)
            self.keepalive.received()
        self.assertEqual(self.pings, [])
        self.assertLessEqual(len(self.checks), 200 * (INTERVAL / 2) / (PROBE_AFTER - INTERVAL / 2))
        self.assertGreater(min(b - a for a, b in itertools.pairwise(self.checks)), INTERVAL)

    def test_silentPeerProbedThenDead(self) -> None:
        """
        A peer silent from the start is probed once, at probeAfter seconds, and declared
        dead at exactly interval * count seconds, not a moment sooner.
        """
        self.clock.advance(PROBE_AFTER - 0.5)
        self.assertEqual(self.pings, [])
        self.clock.advance(0.5)
        self.assertEqual(self.pings, [self.start + PROBE_AFTER])
        self.clock.advance(INTERVAL * COUNT - PROBE_AFTER - 0.5)
        self.assertEqual(self.deaths, [])
        self.clock.advance(0.5)
        self.assertEqual(self.deaths, [self.start + INTERVAL * COUNT])
        self.assertEqual(len(self.pings), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peerGoesQuietDeadlineFromLastReceipt(self) -> None:
        """
        A peer that pinged and then went silent (at an odd moment) is probed probeAfter
        after its last packet and dropped exactly interval * count after it.
        """
        for _ in range(10):
            self.clock.advance(2 * INTERVAL)
            self.keepalive.received()
        self.clock.advance(7.25)
        self.keepalive.received()
        last = self.clock.seconds()
        for _ in range(int(INTERVAL * COUNT / 0.25) - 1):
            self.clock.advance(0.25)
        self.assertEqual(self.pings, [last + PROBE_AFTER])
        self.assertEqual(self.deaths, [])
        self.clock.advance(0.25)
        self.assertEqual(self.deaths, [last + INTERVAL * COUNT])

    def test_answeredProbeKeepsPeer(self) -> None:
        """A peer that only answers probes (sends nothing itself) stays up for hours."""
        for _ in range(500):
            self.clock.advance(PROBE_AFTER)
            self.assertEqual(len(self.pings), 1)
            self.pings.clear()
            self.clock.advance(1)
            self.keepalive.received()  # the answer, a second later
        self.assertEqual(self.deaths, [])

    def test_forwardJumpIsNoVerdict(self) -> None:
        """
        After a jump forward by a day, a live peer is not declared dead on the spot, and
        a dead one is found (count - 1) intervals after the jump, as for an active one.
        """
        self.clock.advance(86400)
        self.assertEqual((self.pings, self.deaths), ([], []))
        self.clock.advance(INTERVAL * (COUNT - 1) - 0.5)
        self.assertEqual(len(self.pings), 1)
        self.assertEqual(self.deaths, [])
        self.clock.advance(0.5)
        self.assertEqual(len(self.deaths), 1)

    def test_floatRemainderIsNoBusyLoop(self) -> None:
        """
        A receipt at a time whose float sum with probeAfter rounds below it does not
        make the keepalive reschedule itself for no time at all.
        """
        self.clock.advance(0.1)
        self.keepalive.received()
        for _ in range(30):
            self.clock.advance(PROBE_AFTER / 3 + 1e-9)
        self.assertLess(len(self.checks), 10)

    def test_probeAfterOutOfRangeRefused(self) -> None:
        """probeAfter below the interval or beyond the deadline is a ValueError."""
        for probeAfter in (INTERVAL - 1, INTERVAL * COUNT + 1):
            self.assertRaises(
                ValueError,
                Keepalive,
                self.clock,
                lambda: None,
                lambda: None,
                INTERVAL,
                COUNT,
                probeAfter,
            )


class SweepTests(SynchronousTestCase):
    """
    Passive keepalives sharing one KeepaliveSweep (groundcontrol's agent links): one
    timer for all their quiet-link looks, a look never early and at most a granule
    late, and a silent peer still dead at exactly interval * count.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000.3)
        self.sweep = KeepaliveSweep(self.clock)
        self.fleet = _KeepaliveFleet(self.clock, probeAfter=PROBE_AFTER, sweep=self.sweep)
        self.pings, self.deaths = self.fleet.pings, self.fleet.deaths
        self.keepalive = self.fleet.keepalive

    def test_oneTimerForManyLinks(self) -> None:
        """
        1,000 links whose peers ping every 2 intervals, at times spread over the
        interval: never more than one timer pending, no ping, no verdict, for an hour.
        """
        links = [self.keepalive(n) for n in range(1000)]
        for step in range(int(3600 / 0.1)):
            self.clock.advance(0.1)
            for n in range(step % 200, 1000, 200):  # each link heard every 20 s
                links[n].received()
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(sum(map(len, self.pings.values())), 0)
        self.assertEqual(sum(map(len, self.deaths.values())), 0)

    def test_silentPeerProbedLateNeverEarlyDeadExactly(self) -> None:
        """
        A peer that goes silent at an odd moment is probed at probeAfter seconds of
        silence or less than a granule later, never sooner, and declared dead at
        exactly interval * count seconds after its last packet.
        """
        k = self.keepalive(0)
        for _ in range(5):
            self.clock.advance(2 * INTERVAL)
            k.received()
        self.clock.advance(3.7)
        k.received()
        last = self.clock.seconds()
        step = 0.05
        while not self.deaths[0]:
            self.clock.advance(step)
        (ping,) = self.pings[0]
        self.assertGreaterEqual(ping - last, PROBE_AFTER)
        self.assertLess(ping - last, PROBE_AFTER + self.sweep.granularity + step)
        self.assertAlmostEqual(self.deaths[0][0], last + INTERVAL * COUNT, delta=1e-6)

    def test_deadlineExactWithoutStepping(self) -> None:
        """The verdict is timed by the keepalive itself: at deadline - 1 ms, none yet."""
        k = self.keepalive(0)
        self.clock.advance(7.25)
        k.received()
        last = self.clock.seconds()
        self.clock.advance(PROBE_AFTER + 0.999)  # the look ran (late), the probe went out
        self.assertEqual(len(self.pings[0]), 1)
        self.clock.advance(last + INTERVAL * COUNT - 0.001 - self.clock.seconds())
        self.assertEqual(self.deaths[0], [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.deaths[0]), 1)

    def test_stoppedLinkSkipped(self) -> None:
        """A link stopped while its look waits in a bucket is neither pinged nor judged."""
        k = self.keepalive(0)
        other = self.keepalive(1)
        self.assertEqual(len(self.sweep), 2)
        k.stop()
        self.clock.pump([1.0] * int(INTERVAL * COUNT * 3))
        self.assertEqual((self.pings[0], self.deaths[0]), ([], []))
        self.assertEqual(len(self.deaths[1]), 1)  # the other, silent, was judged
        other.stop()
        self.assertEqual(len(self.sweep), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lateTimerRunsPassedBuckets(self) -> None:
        """A sweep timer that runs late (a busy reactor) runs every bucket it passed."""
        links = [self.keepalive(n) for n in range(3)]
        for k in links:
            self.clock.advance(1.0)
            k.received()
        self.clock.pump([0.0])  # nothing due
        # Jump past all three looks at once (Clock.advance runs what is due).
        self.clock.advance(PROBE_AFTER + 1)
        self.assertEqual([len(self.pings[n]) for n in range(3)], [1, 1, 1])

    def test_tooCoarseForDeadlineFallsBackToTimers(self) -> None:
        """
        When probeAfter plus the granule would pass the deadline (a keepalive of a few
        seconds), the keepalive ignores the sweep and probes at exactly probeAfter.
        """
        coarse = KeepaliveSweep(self.clock, granularity=10.0)
        pings: list[float] = []
        k = Keepalive(
            self.clock,
            lambda: pings.append(self.clock.seconds()),
            lambda: None,
            2.0,
            3,
            5.0,
            coarse,
        )
        start = self.clock.seconds()
        k.start()
        self.clock.advance(5.0)
        self.assertEqual(pings, [start + 5.0])
        self.assertEqual(len(coarse), 0)

    def test_badGranularityRefused(self) -> None:
        """A non-positive granularity is a ValueError."""
        self.assertRaises(ValueError, KeepaliveSweep, self.clock, 0)


class GroundControlKeepaliveTests(SynchronousTestCase):
    """
    groundcontrol's keepalive on a real agent link (in memory, default settings on
    both ends): it sends nothing while the agent pings, and still drops a silent link.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.deviceKey = self.fleet.enrollDevice("kiln7")

    def connectAgent(self, keepaliveInterval: float = DEFAULT_INTERVAL) -> Any:
        settings = LinkSettings(
            name="kiln7",
            deviceKey=self.deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
            keepaliveInterval=keepaliveInterval,
        )
        factory = AgentLinkFactory(
            settings,
            self.fleet.clock,  # type: ignore[arg-type]
            scriptedSessions(),
            refuseForwards,
        )
        pump = self.fleet.connect(factory)
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        return pump

    def countKeepalives(self, conn: Any) -> list[float]:
        """Record when C{conn} sends a keepalive@openssh.com request."""
        sent: list[float] = []
        send = conn.sendGlobalRequest

        def counting(request: bytes, data: bytes, wantReply: int = 0) -> Any:
            if request == b"keepalive@openssh.com":
                sent.append(self.fleet.clock.seconds())
            return send(request, data, wantReply)

        conn.sendGlobalRequest = counting
        return sent

    def advance(self, seconds: int, step: float = 1.0) -> None:
        for _ in range(int(seconds / step)):
            self.fleet.clock.advance(step)
            self.fleet.flush()

    def test_noPingWhileAgentPings(self) -> None:
        """
        Over two hours of an idle link, groundcontrol sends no keepalive (the agent's
        own, every 30 s, are answered), the agent's are all answered, and the link stays.
        """
        pump = self.connectAgent()
        self.assertEqual(len(self.fleet.factory.sweep), 1)  # the link's look, no timer of its own
        fromServer = self.countKeepalives(pump.server.service)
        fromAgent = self.countKeepalives(pump.client.service)
        self.advance(2 * 3600)
        self.assertEqual(fromServer, [])
        # Every 15 s here: in memory the answer comes back at the very same clock
        # time as the check that pinged. Over a real network it comes back after
        # it and spares the next check: every 30 s.
        self.assertEqual(len(fromAgent), 2 * 3600 // DEFAULT_INTERVAL)
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        self.assertFalse(pump.serverIO.disconnecting or pump.clientIO.disconnecting)

    def test_quietAgentProbedAndKept(self) -> None:
        """
        An agent that sends no keepalives of its own is probed after agentProbeAfter
        seconds of silence (37.5 s by default; at most the sweep's one-second granule
        later), answers at once, and stays connected.
        """
        pump = self.connectAgent(keepaliveInterval=1e9)
        fromServer = self.countKeepalives(pump.server.service)
        self.advance(3600, step=0.5)
        probeAfter = agentProbeAfter(DEFAULT_INTERVAL, DEFAULT_COUNT)
        self.assertEqual(probeAfter, 37.5)
        gaps = [b - a for a, b in itertools.pairwise(fromServer)]
        self.assertGreater(len(gaps), 3600 // (probeAfter + 1) - 2)
        self.assertGreaterEqual(min(gaps), probeAfter)
        self.assertLessEqual(max(gaps), probeAfter + 1)
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))

    def test_silentLinkDroppedInTime(self) -> None:
        """
        A link on which nothing arrives any more (frozen agent, blackhole) is dropped
        by groundcontrol exactly interval * count seconds after the last packet.
        """
        pump = self.connectAgent()
        self.advance(100)
        self.fleet.network.pumps.remove(pump)  # nothing moves any more
        last = pump.server.keepalive.lastReceived
        deadline = DEFAULT_INTERVAL * DEFAULT_COUNT
        self.fleet.clock.advance(last + deadline - 0.5 - self.fleet.clock.seconds())
        self.assertFalse(pump.serverIO.disconnecting)
        self.fleet.clock.advance(0.5)
        self.assertTrue(pump.serverIO.disconnecting)

    def test_operatorsStillPinged(self) -> None:
        """
        An operator connection (OpenSSH sends no keepalives by default) is still pinged
        after one interval of silence.
        """
        key = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        operator = self.fleet.operator("dev_kiln7", key)
        assert operator.connection is not None
        (pump,) = [p for p in self.fleet.network.pumps if p.client is operator.connection.transport]
        self.assertEqual(len(self.fleet.factory.sweep), 0)  # operators: the keepalive's own timer
        fromServer = self.countKeepalives(pump.server.service)
        self.advance(int(DEFAULT_INTERVAL) + 1)
        self.assertEqual(len(fromServer), 1)


class _OptionsSocket:
    """Stands in for a server connection's TCP socket: records the options set on it."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class QuickAckAfterLoginTests(SynchronousTestCase):
    """
    groundcontrol asks for quick ACKs during a connection's first reads (for the OpenSSH
    client's key exchange, accesstunnel.quickack); on an agent link it stops at login,
    so an idle agent's keepalive costs no setsockopt and no bare ACK segment.
    """

    def setUp(self) -> None:
        if quickack.TCP_QUICKACK is None:
            raise SkipTest("no TCP_QUICKACK on this platform")
        self.sockets: list[_OptionsSocket] = []

        def recordingSocket(transport: Any) -> Any:
            self.sockets.append(_OptionsSocket())
            return self.sockets[-1]

        self.patch(quickack, "tcpSocketOf", recordingSocket)
        self.fleet = InMemoryFleet()

    def test_agentLinkStopsAtLogin(self) -> None:
        """Reads on an agent link after login (its keepalives) set no socket option."""
        deviceKey = self.fleet.enrollDevice("kiln7")
        factory = AgentLinkFactory(
            LinkSettings(
                name="kiln7",
                deviceKey=deviceKey,
                serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
            ),
            self.fleet.clock,  # type: ignore[arg-type]
            scriptedSessions(),
            refuseForwards,
        )
        pump = self.fleet.connect(factory)
        (sock,) = self.sockets
        self.assertTrue(sock.options, "quick ACKs during the handshake")
        self.assertEqual(pump.server._quickAcksLeft, 0)
        atLogin = len(sock.options)
        for _ in range(10 * int(DEFAULT_INTERVAL)):
            self.fleet.clock.advance(1)
            self.fleet.flush()
        self.assertGreater(pump.server.keepalive.lastReceived, 9 * DEFAULT_INTERVAL)
        self.assertEqual(len(sock.options), atLogin)

    def test_operatorKeepsQuickAcks(self) -> None:
        """An operator connection still quick-ACKs its first reads after login."""
        self.fleet.enrollDevice("kiln7")
        key = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        self.fleet.operator("dev_kiln7", key)
        (sock,) = self.sockets
        self.assertGreater(len(sock.options), 0)
        (pump,) = self.fleet.network.pumps
        self.assertGreater(pump.server._quickAcksLeft, 0)


class _Recorder:
    """A transport that records the packets it is asked to send."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.packets.append((messageType, payload))


class _Connection(TunnelConnection):
    """
    A connection whose global requests are recorded: b'slow' ones are answered later,
    b'fired' ones with a Deferred that has already fired (as an avatar's coroutine does),
    b'boom' ones raise; the rest are refused at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[bytes] = []
        self.slow: list[defer.Deferred[Any]] = []

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        self.asked.append(requestType)
        if requestType == b"slow":
            self.slow.append(defer.Deferred())
            return self.slow[-1]
        if requestType == b"fired":
            return defer.succeed((1, b"ready"))
        if requestType == b"boom":
            raise RuntimeError("handler bug")
        return 0


def globalRequest(name: bytes, wantReply: bool = True) -> bytes:
    return common.NS(name) + (b"\x01" if wantReply else b"\x00")


KEEPALIVE_REQUEST = globalRequest(b"keepalive@openssh.com")
FAILURE = (connection.MSG_REQUEST_FAILURE, b"")
IGNORE = (transport.MSG_IGNORE, common.NS(b""))


class KeepaliveReplyTests(SynchronousTestCase):
    """
    Global requests whose answer is ready at once (the peer's keepalive@openssh.com,
    any request a handler answers synchronously) are answered at once, with no
    Deferred of ours; behind a reply that is pending they keep their place in line.
    """

    def setUp(self) -> None:
        self.conn = _Connection()
        self.transport = _Recorder()
        self.conn.transport = self.transport  # type: ignore[assignment]

    def test_answeredAtOnce(self) -> None:
        """A keepalive with want-reply is put to the handler and refused at once."""
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(self.transport.packets, [FAILURE])
        self.assertEqual(self.conn.asked, [b"keepalive@openssh.com"])
        self.assertEqual(len(self.conn._pendingReplies), 0)

    def test_firedDeferredAnsweredAtOnce(self) -> None:
        """
        A handler that returns a Deferred which has already fired (an avatar's
        coroutine that did not wait) is answered at once, with its data.
        """
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"fired"))
        self.assertEqual(self.transport.packets, [(connection.MSG_REQUEST_SUCCESS, b"ready")])
        self.assertEqual(len(self.conn._pendingReplies), 0)

    def test_noReplyWanted(self) -> None:
        """A keepalive without want-reply is answered with nothing."""
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"keepalive@openssh.com", wantReply=False))
        self.assertEqual(self.transport.packets, [])

    def test_handlerErrorIsRefusal(self) -> None:
        """A handler that raises gets the peer a refusal (and a logged failure), in order."""
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"boom"))
        self.conn.slow[0].callback(1)
        self.assertEqual(self.transport.packets, [(connection.MSG_REQUEST_SUCCESS, b""), FAILURE])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_keepsItsPlaceBehindPendingReply(self) -> None:
        """
        A keepalive behind a request answered later is answered after it (RFC 4254 4:
        replies in request order), and the next keepalive, with nothing pending, at once.
        """
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"fired"))
        self.assertEqual(self.transport.packets, [IGNORE])
        self.conn.slow[0].callback((1, b"late"))
        self.assertEqual(
            self.transport.packets,
            [
                IGNORE,
                (connection.MSG_REQUEST_SUCCESS, b"late"),
                FAILURE,
                (connection.MSG_REQUEST_SUCCESS, b"ready"),
            ],
        )
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(len(self.transport.packets), 5)
        self.assertEqual(len(self.conn._pendingReplies), 0)

    def test_orderAmongSeveral(self) -> None:
        """slow, keepalive, slow, keepalive: answered in exactly that order as they settle."""
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.conn.slow[1].callback((1, b"second"))
        self.assertEqual(self.transport.packets, [IGNORE, IGNORE])
        self.conn.slow[0].callback((1, b"first"))
        self.assertEqual(
            self.transport.packets,
            [
                IGNORE,
                IGNORE,
                (connection.MSG_REQUEST_SUCCESS, b"first"),
                FAILURE,
                (connection.MSG_REQUEST_SUCCESS, b"second"),
                FAILURE,
            ],
        )

    def test_stoppedConnectionSilent(self) -> None:
        """After the service stopped, a keepalive is not answered."""
        self.conn.stopped = True
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(self.transport.packets, [])

    def test_pendingAnswerAfterStopIsDropped(self) -> None:
        """A reply that settles after the service stopped is not sent, nor what queued behind it."""
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.conn.stopped = True
        self.conn.slow[0].callback(1)
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(self.transport.packets, [IGNORE])  # the one before the stop

    def test_keepaliveBehindPendingReplyGetsIgnoreAtOnce(self) -> None:
        """
        A keepalive whose answer waits behind a pending reply is met at once with an
        SSH_MSG_IGNORE, proof of life for the peer's deadline; its answer keeps its place.
        """
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(self.transport.packets, [IGNORE])
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(self.transport.packets, [IGNORE, IGNORE])  # one for each
        self.conn.slow[0].callback(1)
        self.assertEqual(
            self.transport.packets,
            [IGNORE, IGNORE, (connection.MSG_REQUEST_SUCCESS, b""), FAILURE, FAILURE],
        )

    def test_onlyKeepalivesGetIgnore(self) -> None:
        """
        Other requests behind a pending reply wait in silence, and a keepalive whose
        answer goes out at once, or that wants none, gets no SSH_MSG_IGNORE.
        """
        self.conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"fired"))
        self.conn.ssh_GLOBAL_REQUEST(globalRequest(b"keepalive@openssh.com", wantReply=False))
        self.assertEqual(self.transport.packets, [FAILURE])


class _Avatar:
    """An avatar that records the global requests put to it."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        self.asked.append(requestType)
        return defer.succeed(0)


class ServerDispatchTests(SynchronousTestCase):
    """On a server, TunnelConnection puts global requests to the avatar, as Conch does."""

    def test_keepaliveToAvatarWithoutLogEvent(self) -> None:
        """
        A keepalive reaches the avatar and is refused at once, and no log event is
        emitted for it (Conch's dispatch emits a debug event per request).
        """
        conn = TunnelConnection()
        recorder = _Recorder()
        recorder.avatar = _Avatar()  # type: ignore[attr-defined]
        conn.transport = recorder  # type: ignore[assignment]
        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        conn.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST)
        self.assertEqual(recorder.avatar.asked, [b"keepalive@openssh.com"])  # type: ignore[attr-defined]
        self.assertEqual(recorder.packets, [FAILURE])
        self.assertEqual(events, [])

    def test_clientDispatchToGlobalMethods(self) -> None:
        """Without an avatar (the client end), global_NAME methods answer, '-' read as '_'."""

        class Client(TunnelConnection):
            def global_x_y(self, data: bytes) -> Any:
                return 1, data

        conn = Client()
        conn.transport = _Recorder()  # type: ignore[assignment]
        conn.ssh_GLOBAL_REQUEST(globalRequest(b"x-y") + b"payload")
        conn.ssh_GLOBAL_REQUEST(globalRequest(b"unknown"))
        self.assertEqual(
            conn.transport.packets,  # type: ignore[attr-defined]
            [(connection.MSG_REQUEST_SUCCESS, b"payload"), FAILURE],
        )


class AnsweringPeerTests(SynchronousTestCase):
    """
    An active keepalive whose peer sends nothing but the answers to its pings, each
    C{delay} seconds after the ping: the link is alive and must never be declared dead,
    whatever the interval, count and alignment the agent's options allow.

    Pinging only when nothing came since the previous check (every other check for such
    a peer) is safe only while two checks fit well inside the deadline; with a short
    interval against the alignment (1 s and align 1 s: a late check puts the next up to
    2 s later, against a 3 s deadline) or a count of 2, the ping the next check would
    send comes too late.
    """

    def answered(
        self, interval: float, count: int, delay: float, align: float | None
    ) -> tuple[int, int]:
        """Pings sent and deaths over 200 intervals; the clock starts at an odd fraction."""
        clock = Clock()
        clock.advance(1_000_000.37)
        pings: list[float] = []
        deaths: list[float] = []
        keepalive = Keepalive(
            clock,
            lambda: pings.append(clock.seconds()),
            lambda: deaths.append(0.0),
            interval,
            count,
            align=align,
        )
        keepalive.start()
        answered = 0
        step = min(delay, interval) / 10
        end = clock.seconds() + 200 * interval
        while clock.seconds() < end and not deaths:
            clock.advance(step)
            while answered < len(pings) and pings[answered] + delay <= clock.seconds():
                answered += 1
                keepalive.received()
        return len(pings), len(deaths)

    def test_shortIntervalAligned(self) -> None:
        """The agent with --keepalive-interval 1 (align 1 s), a peer answering in 10 ms."""
        pings, deaths = self.answered(1.0, 3, 0.01, align=1.0)
        self.assertEqual(deaths, 0)
        self.assertGreater(pings, 60)

    def test_shortIntervalAlignedSlowAnswers(self) -> None:
        """
        The agent with --keepalive-interval 1 (align 1 s) and a groundcontrol answering in
        0.8 s (a loaded machine): alive throughout, pinged every other check. The timers
        here run up to 0.08 s late, as a reactor's do a little: aligned from when they ran,
        the checks were 2 s apart, a ping could leave at 2.5 s of silence, and the link was
        declared dead after a few pings (with answers from 0.55 s on).
        """
        pings, deaths = self.answered(1.0, 3, 0.8, align=1.0)
        self.assertEqual(deaths, 0)
        self.assertLessEqual(pings, 200 / 2 + 2)

    def test_countOfTwo(self) -> None:
        """--keepalive-count 2, a peer answering in 2 s (a slow path): alive throughout."""
        for align in (None, 1.0):
            _, deaths = self.answered(15.0, 2, 2.0, align=align)
            self.assertEqual(deaths, 0, f"align={align}")

    def test_defaultsStillEveryOtherInterval(self) -> None:
        """With the defaults (15 s x 3, align 1 s) an answering peer is pinged every other check."""
        pings, deaths = self.answered(DEFAULT_INTERVAL, DEFAULT_COUNT, 0.05, align=1.0)
        self.assertEqual(deaths, 0)
        self.assertLess(pings, 200 / 2 + 2)


class PingBehindSlowReplyTests(SynchronousTestCase):
    """
    The agent's keepalive (1 s x 3, as the e2e tests run it) pings a groundcontrol that is
    alive but whose answers wait behind a reply that waits for its store (an agent's hello,
    pairing code or certificate request). Every packet groundcontrol sends reaches the agent
    at once. Without SSH_MSG_IGNORE for the waiting pings the agent had only its own
    request's pending answer to go by, and declared the live link dead after 3 s.
    """

    def test_liveServerNotDeclaredDead(self) -> None:
        clock = Clock()
        clock.advance(1_000_000.37)
        server = _Connection()
        recorder = _Recorder()
        server.transport = recorder  # type: ignore[assignment]
        deaths: list[float] = []
        agent = Keepalive(
            clock,
            lambda: server.ssh_GLOBAL_REQUEST(KEEPALIVE_REQUEST),
            lambda: deaths.append(clock.seconds()),
            1.0,
            3,
            align=1.0,
        )
        delivered = 0

        def deliver() -> None:
            nonlocal delivered
            if len(recorder.packets) > delivered:
                delivered = len(recorder.packets)
                agent.received()

        agent.start()
        server.ssh_GLOBAL_REQUEST(globalRequest(b"slow"))  # the store takes 10 s
        for _ in range(1000):
            clock.advance(0.01)
            deliver()
        self.assertEqual(deaths, [])
        server.slow[0].callback(1)
        deliver()
        ignores = recorder.packets.count(IGNORE)
        self.assertGreater(ignores, 0)
        # Every ping answered in order once the store answered, after the IGNOREs.
        self.assertEqual(recorder.packets[ignores], (connection.MSG_REQUEST_SUCCESS, b""))
        self.assertEqual(recorder.packets.count(FAILURE), ignores)
