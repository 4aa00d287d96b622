"""
Tests for renewing and releasing a claim's lease (renewLease, releaseLease): who may,
when, and what is audited; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib

from groundcontrol.store import ClaimRefused, StoreError, UnknownDevice
from tests.test_store import T0, StoreTestCase, bothBackends, fingerprint, newPublicKey

DAY = 86400.0


@bothBackends
class LeaseTests(StoreTestCase):
    """kiln7 claimed by alice until T0 + DAY; bob an operator; root an admin."""

    def setUp(self) -> None:
        super().setUp()
        add = self.store.addAccount
        self.alice = self.successResultOf(add("alice", [newPublicKey()], False, T0))
        self.bob = self.successResultOf(add("bob", [newPublicKey()], False, T0))
        self.root = self.successResultOf(add("root", [newPublicKey()], True, T0))
        key = newPublicKey()
        self.contact("kiln7", key, T0)
        codeHash = hashlib.sha256(b"K7QPM2XD").hexdigest()
        self.successResultOf(
            self.store.registerClaimCode(codeHash, fingerprint(key), "kiln7", T0 + 300, T0)
        )
        self.successResultOf(self.store.claimDevice(codeHash, self.alice, T0 + DAY, T0 + 1))

    def device(self) -> object:
        return self.successResultOf(self.store.deviceByName("kiln7"))

    def test_ownerRenews(self) -> None:
        """
        The owner moves the lease's end while it lasts; claim.renewed is audited with the
        old and new ends; the owner reaches the device until the new end.
        """
        device = self.successResultOf(
            self.store.renewLease("kiln7", self.alice, T0 + 30 * DAY, T0 + DAY - 1)
        )
        self.assertEqual((device.owner, device.leaseUntil), ("alice", T0 + 30 * DAY))
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.device), ("claim.renewed", "alice", "kiln7")
        )
        self.assertEqual(
            event.detail, {"owner": "alice", "leaseUntil": T0 + 30 * DAY, "was": T0 + DAY}
        )
        reach = self.store.mayReach
        self.assertTrue(self.successResultOf(reach(self.alice, "kiln7", T0 + 2 * DAY)))
        self.assertEqual(self.successResultOf(self.store.lapsedLeases(T0 + 2 * DAY)), [])

    def test_adminRenewsOthersRefused(self) -> None:
        """An admin may renew alice's lease (she stays the owner); bob may not; nothing changes."""
        device = self.successResultOf(self.store.renewLease("kiln7", self.root, T0 + 9, T0 + 2))
        self.assertEqual((device.owner, device.leaseUntil), ("alice", T0 + 9))
        before = len(self.events())
        refused = self.failureOf(
            self.store.renewLease("kiln7", self.bob, T0 + DAY, T0 + 3), ClaimRefused
        )
        self.assertIn("claimed by alice, not by you", str(refused))
        self.failureOf(self.store.releaseLease("kiln7", self.bob, T0 + 3), ClaimRefused)
        self.assertEqual(len(self.events()), before)
        self.assertEqual(self.device().leaseUntil, T0 + 9)

    def test_lapsedOrUnclaimedRefused(self) -> None:
        """
        A lease that has ended cannot be renewed (a new code claims it again), nor can a
        device nobody claimed, an unknown one, or a lease end not in the future.
        """
        self.failureOf(
            self.store.renewLease("kiln7", self.alice, T0 + 2 * DAY, T0 + DAY), ClaimRefused
        )
        self.failureOf(self.store.renewLease("kiln7", self.alice, T0 + 5, T0 + 5), StoreError)
        self.enroll("mill4")  # admin-approved, no owner
        refused = self.failureOf(
            self.store.renewLease("mill4", self.root, T0 + DAY, T0 + 5), ClaimRefused
        )
        self.assertIn("not claimed by anyone", str(refused))
        self.failureOf(self.store.renewLease("ghost", self.root, T0 + DAY, T0 + 5), UnknownDevice)
        self.failureOf(self.store.releaseLease("ghost", self.root, T0 + 5), UnknownDevice)

    def test_revokedRefused(self) -> None:
        """A revoked device's lease is neither renewed nor released."""
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 2))
        self.failureOf(self.store.renewLease("kiln7", self.alice, T0 + DAY, T0 + 3), ClaimRefused)
        self.failureOf(self.store.releaseLease("kiln7", self.alice, T0 + 3), ClaimRefused)

    def test_ownerReleases(self) -> None:
        """
        Releasing ends the lease now (claim.released): the owner loses access, the device
        stays approved, and nothing is left to lapse or to release twice.
        """
        device = self.successResultOf(self.store.releaseLease("kiln7", self.alice, T0 + 5))
        self.assertEqual((device.state, device.owner, device.leaseUntil), ("approved", None, None))
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.device, event.detail),
            ("claim.released", "alice", "kiln7", {"owner": "alice", "leaseUntil": T0 + DAY}),
        )
        self.assertFalse(self.successResultOf(self.store.mayReach(self.alice, "kiln7", T0 + 6)))
        self.assertEqual(self.successResultOf(self.store.lapsedLeases(T0 + 2 * DAY)), [])
        self.failureOf(self.store.releaseLease("kiln7", self.alice, T0 + 7), ClaimRefused)

    def test_adminReleases(self) -> None:
        """An admin may end an operator's lease; the event names the admin and the owner."""
        self.successResultOf(self.store.releaseLease("kiln7", self.root, T0 + 5))
        event = self.events()[-1]
        self.assertEqual((event.actor, event.detail["owner"]), ("root", "alice"))
