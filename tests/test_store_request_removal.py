"""
Tests for removing pending enrollment requests from the store: an admin's rejection
(rejectRequest) and the expiry of requests nobody has seen (staleRequests, touchRequests,
expireRequest); what is audited, and that the key may ask again; on SQLite and PostgreSQL.
"""

from __future__ import annotations

from groundcontrol.documents import auditEventJSON
from groundcontrol.store import (
    AmbiguousRequest,
    EnrollmentRequest,
    PendingLimitReached,
    PendingLimits,
    UnknownDevice,
    hashSecret,
)
from tests.test_store import T0, StoreTestCase, bothBackends, fingerprint, newPublicKey

DAY = 86400.0


@bothBackends
class RejectRequestTests(StoreTestCase):
    """An admin turns a pending request away by name, or by name and key."""

    def test_rejectRemovesAndAudits(self) -> None:
        """
        The request is gone, with its key's claim code; enrollment.rejected names the admin
        and carries the request as it was; the same key may then ask again, as new.
        """
        key = newPublicKey()
        self.contact("kiln7", key, T0, serial="SN-1", source="198.51.100.7:4000")
        self.successResultOf(
            self.store.registerClaimCode(
                hashSecret("K7QPM2XD"), fingerprint(key), "kiln7", T0 + 600, T0
            )
        )
        rejected = self.successResultOf(self.store.rejectRequest("kiln7", "root", T0 + 5))
        self.assertEqual((rejected.fingerprint, rejected.serial), (fingerprint(key), "SN-1"))
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        self.assertEqual(self.rawQuery("SELECT COUNT(*) FROM claim_codes"), [(0,)])
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.device, event.at),
            ("enrollment.rejected", "root", "kiln7", T0 + 5),
        )
        self.assertEqual(
            event.detail,
            {
                "fingerprint": fingerprint(key),
                "kind": "new",
                "serial": "SN-1",
                "source": "198.51.100.7:4000",
                "lastSeen": T0,
            },
        )
        again = self.contact("kiln7", key, T0 + 10)
        self.assertIsInstance(again, EnrollmentRequest)
        self.assertEqual(again.firstSeen, T0 + 10)
        self.assertEqual(self.events()[-1].event, "device.pending")

    def test_severalNeedAKey(self) -> None:
        """
        Two keys ask for one name: rejecting by name alone removes nothing and lists both;
        with --key only that one goes. A key that does not ask for the name is unknown.
        """
        first, second = newPublicKey(), newPublicKey()
        self.contact("kiln7", first)
        self.contact("kiln7", second, T0 + 1)
        before = len(self.events())
        ambiguous = self.failureOf(self.store.rejectRequest("kiln7", "root", T0), AmbiguousRequest)
        self.assertEqual(ambiguous.fingerprints, (fingerprint(first), fingerprint(second)))
        self.assertEqual(len(self.events()), before)
        self.failureOf(
            self.store.rejectRequest("oven2", "root", T0, fingerprint=fingerprint(first)),
            UnknownDevice,
        )
        self.successResultOf(
            self.store.rejectRequest("kiln7", "root", T0, fingerprint=fingerprint(second))
        )
        (left,) = self.successResultOf(self.store.listEnrollmentRequests())
        self.assertEqual(left.fingerprint, fingerprint(first))

    def test_devicesAreNotRequests(self) -> None:
        """An approved device has no request to reject: it stays approved (revoke is for it)."""
        self.enroll("kiln7")
        unknown = self.failureOf(self.store.rejectRequest("kiln7", "root", T0), UnknownDevice)
        self.assertIn("no pending request for 'kiln7'", str(unknown))
        self.assertEqual(self.successResultOf(self.store.deviceByName("kiln7")).state, "approved")

    def test_rejectedDetailInTheVocabulary(self) -> None:
        """The audit row read out (webhook, audit --json) says last_seen, as ISO with a Z."""
        self.contact("kiln7", newPublicKey())
        self.successResultOf(self.store.rejectRequest("kiln7", "root", T0 + 5))
        row = self.events()[-1]
        document = auditEventJSON(row.id, row.event, row.device, row.actor, row.at, row.detail)
        self.assertEqual(document["detail"]["last_seen"], "2023-11-14T22:13:20Z")


@bothBackends
class ExpireRequestTests(StoreTestCase):
    """Requests not seen since a time are listed, and removed one by one if still stale."""

    def test_staleRequestsFilter(self) -> None:
        """Only requests last seen before the bound are listed, oldest first."""
        old, older, fresh = newPublicKey(), newPublicKey(), newPublicKey()
        self.contact("a1", old, T0 + 10)
        self.contact("b1", older, T0)
        self.contact("c1", fresh, T0 + 8 * DAY)
        stale = self.successResultOf(self.store.staleRequests(T0 + 7 * DAY))
        self.assertEqual([r.fingerprint for r in stale], [fingerprint(older), fingerprint(old)])
        self.assertEqual(self.successResultOf(self.store.staleRequests(T0)), [])

    def test_touchRequests(self) -> None:
        """Connected agents' requests are marked seen; others and approved devices are not."""
        a, b = newPublicKey(), newPublicKey()
        self.contact("a1", a)
        self.contact("b1", b)
        self.enroll("kiln7")
        touched = self.successResultOf(
            self.store.touchRequests([fingerprint(a), "SHA256:" + "x" * 43], T0 + DAY)
        )
        self.assertEqual(touched, 1)
        self.assertEqual(self.successResultOf(self.store.touchRequests([], T0 + DAY)), 0)
        seen = {
            r.requestedName: r.lastSeen
            for r in self.successResultOf(self.store.listEnrollmentRequests())
        }
        self.assertEqual(seen, {"a1": T0 + DAY, "b1": T0})

    def test_expireRemovesAndAudits(self) -> None:
        """
        A stale request is removed with its claim code, audited as enrollment.expired with
        no actor and the request as it was; expiring it again is a no-op (None).
        """
        key = newPublicKey()
        self.contact("kiln7", key, serial="SN-1")
        self.successResultOf(
            self.store.registerClaimCode(
                hashSecret("K7QPM2XD"), fingerprint(key), "kiln7", T0 + 600, T0
            )
        )
        now = T0 + 7 * DAY + 30
        expired = self.successResultOf(
            self.store.expireRequest(fingerprint(key), now - 7 * DAY, now)
        )
        self.assertEqual(expired.requestedName, "kiln7")
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        self.assertEqual(self.rawQuery("SELECT COUNT(*) FROM claim_codes"), [(0,)])
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.device, event.at),
            ("enrollment.expired", None, "kiln7", now),
        )
        self.assertEqual(event.detail["lastSeen"], T0)
        self.assertEqual(event.detail["fingerprint"], fingerprint(key))
        self.assertIsNone(
            self.successResultOf(self.store.expireRequest(fingerprint(key), now, now))
        )

    def test_expireSkipsSeenSince(self) -> None:
        """
        A request whose agent connected after staleRequests listed it (another node's sweep,
        a reconnect) is left alone, and nothing is audited.
        """
        key = newPublicKey()
        self.contact("kiln7", key)
        (stale,) = self.successResultOf(self.store.staleRequests(T0 + 1))
        self.contact("kiln7", key, T0 + 7 * DAY)  # reconnected meanwhile
        before = len(self.events())
        kept = self.store.expireRequest(stale.fingerprint, T0 + 1, T0 + 7 * DAY + 1)
        self.assertIsNone(self.successResultOf(kept))
        self.assertEqual(len(self.successResultOf(self.store.listEnrollmentRequests())), 1)
        self.assertEqual(len(self.events()), before)

    def test_expiryFreesTheCap(self) -> None:
        """
        A queue full of stale requests refuses a new key; once they expire the same key is
        let in (the caps count what is in the table).
        """
        limits = PendingLimits(total=3, perHost=10)
        for n in range(3):
            self.contact(f"x{n}", newPublicKey(), T0 + n, limits=limits)
        newcomer = newPublicKey()
        now = T0 + 8 * DAY
        self.failureOf(
            self.store.recordContact(
                "new1", newcomer, fingerprint(newcomer), None, "192.0.2.9:1", now, limits
            ),
            PendingLimitReached,
        )
        for request in self.successResultOf(self.store.staleRequests(now - 7 * DAY)):
            self.successResultOf(self.store.expireRequest(request.fingerprint, now - 7 * DAY, now))
        admitted = self.contact("new1", newcomer, now, limits=limits)
        self.assertIsInstance(admitted, EnrollmentRequest)
