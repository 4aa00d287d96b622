"""
The clock jumping (issue 8 faults): keepalives, the login grace time, per-source
penalties and expiries all read the injected clock; what each does when it jumps.
SECURITY.md ("Faults: the clock jumps") states the expected behaviour asserted here.

The reactor's clock is the wall clock (twisted.python.runtime.seconds is time.time), so
a step of the system clock is a jump of the injected clock; task.Clock stands in for it,
its timers jumping with it: what each piece does when a jump reaches it unmoved (a reactor
without the step watch). groundcontrol's reactor moves its pending timers by a step
(accesstunnel/stepwatch.py, tests/test_clock_step_watch.py), and the agent times everything
on the monotonic clock: tests/test_clock_steps.py steps a wall clock of its own.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keepalive import Keepalive
from groundcontrol.testing import InMemoryFleet, resultNow

INTERVAL = 10.0
COUNT = 3


class KeepaliveJumpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.pings = 0
        self.deaths = 0

        def ping() -> None:
            self.pings += 1

        def dead() -> None:
            self.deaths += 1

        self.keepalive = Keepalive(self.clock, ping, dead, INTERVAL, COUNT)
        self.keepalive.start()

    def test_forwardJumpIsNoVerdict(self) -> None:
        """
        A jump forward by a day does not declare a live peer dead: the late check pings,
        and the peer's answer keeps the connection.
        """
        self.clock.advance(86400)
        self.assertEqual((self.pings, self.deaths), (1, 0))
        self.keepalive.received()  # the answer
        for _ in range(10):
            self.clock.advance(INTERVAL / 2)
            self.keepalive.received()
        self.assertEqual(self.deaths, 0)

    def test_forwardJumpDeadPeerStillFound(self) -> None:
        """A dead peer is found within (count - 1) intervals after the jump's ping."""
        self.clock.advance(86400)
        self.assertEqual(self.deaths, 0)
        self.clock.advance(INTERVAL * (COUNT - 1))
        self.assertEqual(self.deaths, 1)

    def test_backwardJump(self) -> None:
        """
        After the clock goes back an hour, silence is counted from the jump, not from
        the future: once the pending check runs (Twisted schedules by the wall clock, so
        it runs an hour late), a dead peer is found within interval * count.
        """
        self.clock.advance(5)
        self.keepalive.received()
        self.clock.rightNow -= 3600
        self.clock.advance(3600 + INTERVAL)  # the pending check finally runs
        self.assertEqual(self.deaths, 0)
        self.clock.advance(INTERVAL * COUNT)
        self.assertEqual(self.deaths, 1)


class ExpiryJumpTests(SynchronousTestCase):
    """Expiries compare against the clock: a jump forward ends them early (fail closed)."""

    def test_grantExpiresOnForwardJump(self) -> None:
        """A grant for an hour is gone after the clock jumps forward a day."""
        fleet = InMemoryFleet()
        fleet.clock.advance(1_700_000_000)
        fleet.addOperator("bob")
        fleet.enrollDevice("kiln7")
        resultNow(fleet.store.grant("bob", "kiln7", "test", fleet.now, expiresAt=fleet.now + 3600))
        bob = next(a for a in resultNow(fleet.store.listAccounts()) if a.name == "bob")
        self.assertTrue(resultNow(fleet.store.mayReach(bob, "kiln7", fleet.now)))
        fleet.clock.advance(86400)
        self.assertFalse(resultNow(fleet.store.mayReach(bob, "kiln7", fleet.now)))

    def test_graceTimerOnForwardJump(self) -> None:
        """
        Where the grace timer jumps with the clock (no step watch), it fires at once after a
        forward jump: the client is dropped. groundcontrol's does not
        (tests/test_clock_step_watch.py test_stepForwardFiresNoTimerEarly).
        """
        from tests.test_preauth import CLIENT_VERSION, RawClient

        fleet = InMemoryFleet()
        client = RawClient(fleet, "127.0.0.5")
        client.send(CLIENT_VERSION)
        fleet.clock.advance(86400)
        self.assertTrue(client.dropped)
