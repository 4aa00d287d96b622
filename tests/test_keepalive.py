"""Tests for accesstunnel.keepalive: finding a silent peer with SSH-level pings."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keepalive import Keepalive

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
