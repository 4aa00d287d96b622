"""
The control shell's 'claim renew DEVICE --for D' and 'claim release DEVICE': the owner
of a claimed device (or an admin) extends or ends its lease while the device stays
approved (when the agent shows no pairing code). In memory: real agents, the real
front door and control shell (tests.test_enrollment's World), on a Clock.
"""

from __future__ import annotations

import json

from accesstunnel.timetext import isoTime
from groundcontrol.testing import resultNow
from tests.test_enrollment import HOUR, AgentUnderTest, EnrollmentTestCase

DAY = 24 * HOUR


class LeaseCommandTests(EnrollmentTestCase):
    """oven2 claimed by bob for an hour; carol another operator; root the admin."""

    def setUp(self) -> None:
        super().setUp()
        self.bob = self.world.operator("bob")
        self.carol = self.world.operator("carol")
        self.agent: AgentUnderTest = self.world.start("oven2")
        code = self.agent.status["pairing_code"]
        status, _, err = self.world.ctl(self.bob, f"claim {code} --for 1h")
        self.assertEqual(status, 0, err)
        self.world.poll()

    def lapse(self, seconds: float) -> None:
        """Let time pass and the fleet watcher sweep lapsed leases."""
        self.world.advance(seconds)
        self.world.poll()

    def test_ownerRenewsAndKeepsAccess(self) -> None:
        """
        The owner renews before the hour is up; past the old end (and a lease sweep) they
        still reach the device, until the new end; the agent showed no code meanwhile.
        """
        self.lapse(50 * 60)
        self.assertIsNone(self.agent.status["pairing_code"])  # approved: nothing to pair
        renewedAt = self.world.now
        status, out, err = self.world.ctl(self.bob, "claim renew oven2 --for 1d")
        self.assertEqual(status, 0, err)
        self.assertIn("renewed oven2: bob's until", out)
        self.lapse(2 * HOUR)
        self.assertTrue(self.world.reaches(self.bob, "oven2", self.agent))
        device = self.world.device("oven2")
        self.assertEqual((device.owner, device.leaseUntil), ("bob", renewedAt + DAY))
        self.lapse(DAY)
        self.assertIn("no grant", self.world.refusal(self.bob, "oven2"))
        self.assertIsNone(self.world.device("oven2").owner)  # claim.lapsed

    def test_renewAndReleaseJson(self) -> None:
        """
        --json gives the device's document as it stands after the change (as ls would): the
        renewed lease's owner and end, then no owner and no lease once released.
        """
        now = self.world.now
        status, out, err = self.world.ctl(self.bob, "claim renew dev_oven2 --for 2h --json")
        self.assertEqual(status, 0, err)
        renewed = json.loads(out)
        self.assertEqual(
            (renewed["name"], renewed["owner"], renewed["lease_until"]),
            ("oven2", "bob", isoTime(now + 2 * HOUR)),
        )
        self.assertIsNotNone(renewed["online"])
        status, out, err = self.world.ctl(self.bob, "claim release oven2 --json")
        released = json.loads(out)
        self.assertEqual(
            (status, released["name"], released["owner"], released["lease_until"]),
            (0, "oven2", None, None),
        )

    def test_releaseEndsAccessNow(self) -> None:
        """
        Released, the owner is refused at once (no wait for the lease's end); the device
        stays approved and routable for grants; the change is audited.
        """
        status, out, err = self.world.ctl(self.bob, "claim release oven2")
        self.assertEqual(status, 0, err)
        self.assertIn("released oven2", out)
        self.assertIn("no grant", self.world.refusal(self.bob, "oven2"))
        device = self.world.device("oven2")
        self.assertEqual((device.state, device.owner), ("approved", None))
        self.assertTrue(self.world.reaches(self.admin, "oven2", self.agent))
        events = [e.event for e in resultNow(self.world.fleet.store.auditSince(0, 1000))]
        self.assertEqual(events.count("claim.released"), 1)

    def test_othersRefusedAdminsMay(self) -> None:
        """
        Another operator may neither renew nor release: one who may not reach the device is
        told what an unknown name gets (who holds it is not theirs to learn), one granted
        it whose claim it is; an admin may do both.
        """
        for line in ("claim renew oven2 --for 1d", "claim release oven2"):
            status, _, err = self.world.ctl(self.carol, line)
            self.assertEqual(status, 1, line)
            self.assertIn("unknown device 'oven2', or you hold no claim on it or grant", err)
        self.world.ctl(self.admin, "grant carol oven2")
        for line in ("claim renew oven2 --for 1d", "claim release oven2"):
            status, _, err = self.world.ctl(self.carol, line)
            self.assertEqual(status, 1, line)
            self.assertIn("claimed by bob, not by you", err)
        self.assertEqual(self.world.ctl(self.admin, "claim renew oven2 --for 1d")[0], 0)
        self.assertEqual(self.world.device("oven2").owner, "bob")
        self.assertEqual(self.world.ctl(self.admin, "claim release oven2")[0], 0)
        self.assertIsNone(self.world.device("oven2").owner)

    def test_lapsedLeaseNotRenewed(self) -> None:
        """Once the lease has ended, renewing is refused with what to do instead."""
        self.world.advance(HOUR)
        status, _, err = self.world.ctl(self.bob, "claim renew oven2")
        self.assertEqual(status, 1)
        self.assertIn("has ended; claim it again", err)

    def test_usage(self) -> None:
        """renew/release need a device; a code takes none; bad durations and names refused."""
        for line in (
            "claim renew",
            "claim release",
            "claim K7QP-M2XD oven2",
            "claim renew oven2 --for soon",
            "claim renew Bad_Name",
        ):
            status, _, err = self.world.ctl(self.bob, line)
            self.assertEqual(status, 2, (line, err))
        status, _, err = self.world.ctl(self.bob, "claim renew nosuch")
        self.assertEqual(status, 1)
        self.assertIn("unknown device 'nosuch', or you hold no claim on it or grant for it", err)

    def test_renewAndReleaseNotified(self) -> None:
        """
        Who owns a device is fleet news: claim.renewed and claim.released reach the
        notifier (log, webhook) naming device and actor.
        """
        notifier = self.world.notifier
        self.world.ctl(self.bob, "claim renew oven2 --for 1d")
        self.world.poll()
        renewed = notifier.events[-1]
        self.assertEqual(
            (renewed.event, renewed.device, renewed.actor), ("claim.renewed", "oven2", "bob")
        )
        self.world.ctl(self.bob, "claim release oven2")
        self.world.poll()
        released = notifier.events[-1]
        self.assertEqual(
            (released.event, released.device, released.actor), ("claim.released", "oven2", "bob")
        )
