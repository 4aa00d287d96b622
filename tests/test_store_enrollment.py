"""Tests for the store's device identity and enrollment: certificates, re-approval after
expiry, pending caps, serials, enrollment tokens and claims; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import secrets
import threading
from typing import Any

from groundcontrol.store import (
    Account,
    AlreadyExists,
    ClaimCodeExpired,
    ClaimCodeInvalid,
    ClaimRefused,
    Device,
    EnrollmentRequest,
    InvalidName,
    NameTaken,
    PendingLimitReached,
    PendingLimits,
    SQLStore,
    StoreError,
    TokenExhausted,
    TokenExpired,
    TokenInvalid,
    UnknownDevice,
    cleanSerial,
    sourceHost,
)
from tests.test_store import T0, StoreTestCase, bothBackends, fingerprint, newPublicKey

DAY = 86400.0


def sha256(secret: str) -> str:
    """What the server stores of a token or code: its SHA-256 in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


@bothBackends
class CertificateTests(StoreTestCase):
    """recordCertificate, certificateState and the device's certificate expiry."""

    def test_recordAndState(self) -> None:
        """A recorded certificate is valid until not_after, then expired; others unknown."""
        key, _ = self.enroll("kiln7")
        cert = self.successResultOf(
            self.store.recordCertificate("kiln7", "1f", fingerprint(key), T0, T0 + 30 * DAY, T0)
        )
        self.assertEqual(
            (cert.serialNumber, cert.notAfter, cert.revokedAt), ("1f", T0 + 30 * DAY, None)
        )
        state = self.store.certificateState
        self.assertEqual(self.successResultOf(state("1f", T0 + 1)), "valid")
        self.assertEqual(self.successResultOf(state("1f", T0 + 30 * DAY)), "expired")
        self.assertEqual(self.successResultOf(state("20", T0)), "unknown")
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(device and device.certificateExpiresAt, T0 + 30 * DAY)
        event = self.events()[-1]
        self.assertEqual((event.event, event.device), ("certificate.issued", "kiln7"))
        self.assertEqual(event.detail["serialNumber"], "1f")
        self.assertEqual(self.successResultOf(self.store.listCertificates("kiln7")), [cert])

    def test_latestCertificateWins(self) -> None:
        """certificateExpiresAt is the latest unrevoked not_after: a renewal moves it."""
        key, _ = self.enroll("kiln7")
        for serial, notAfter in [("1", T0 + 10), ("3", T0 + 30), ("2", T0 + 20)]:
            self.successResultOf(
                self.store.recordCertificate("kiln7", serial, fingerprint(key), T0, notAfter, T0)
            )
        devices = self.successResultOf(self.store.listDevices())
        self.assertEqual([d.certificateExpiresAt for d in devices], [T0 + 30])

    def test_refusals(self) -> None:
        """Unknown device, another key, a reused serial, a revoked device: all refused."""
        key, _ = self.enroll("kiln7")
        record = self.store.recordCertificate
        self.failureResultOf(record("ghost", "1", fingerprint(key), T0, T0 + 1, T0), UnknownDevice)
        self.failureResultOf(
            record("kiln7", "1", fingerprint(newPublicKey()), T0, T0 + 1, T0), StoreError
        )
        self.successResultOf(record("kiln7", "1", fingerprint(key), T0, T0 + 1, T0))
        self.failureResultOf(record("kiln7", "1", fingerprint(key), T0, T0 + 1, T0), AlreadyExists)
        self.failureResultOf(record("kiln7", "2", fingerprint(key), T0, T0, T0), StoreError)
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0))
        self.failureResultOf(record("kiln7", "3", fingerprint(key), T0, T0 + 1, T0), StoreError)

    def test_revokeRevokesCertificates(self) -> None:
        """Revoking a device marks its certificates revoked, and the audit event lists them."""
        key, _ = self.enroll("kiln7")
        for serial in ("a1", "a2"):
            self.successResultOf(
                self.store.recordCertificate("kiln7", serial, fingerprint(key), T0, T0 + DAY, T0)
            )
        device = self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 5))
        self.assertIsNone(device.certificateExpiresAt)
        for serial in ("a1", "a2"):
            self.assertEqual(
                self.successResultOf(self.store.certificateState(serial, T0 + 6)), "revoked"
            )
        event = self.events()[-1]
        self.assertEqual(event.event, "device.revoked")
        self.assertEqual(event.detail["revokedCertificates"], ["a1", "a2"])

    def test_rekeyRevokesOldKeysCertificates(self) -> None:
        """Approving a new key for a device revokes the certificates of the old key."""
        key, _ = self.enroll("kiln7")
        self.successResultOf(
            self.store.recordCertificate("kiln7", "old", fingerprint(key), T0, T0 + DAY, T0)
        )
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 1)
        device = self.successResultOf(
            self.store.approveDevice("kiln7", "root", T0 + 2, fingerprint=fingerprint(newKey))
        )
        self.assertIsNone(device.certificateExpiresAt)
        self.assertEqual(
            self.successResultOf(self.store.certificateState("old", T0 + 3)), "revoked"
        )


@bothBackends
class ReapprovalTests(StoreTestCase):
    """A device offline past its certificate's expiry comes back pending, with its own key."""

    def expiredDevice(self) -> str:
        """An approved device whose only certificate ran out at T0 + 100; return its key."""
        key, _ = self.enroll("kiln7", T0)
        self.successResultOf(
            self.store.recordCertificate("kiln7", "1", fingerprint(key), T0, T0 + 100, T0)
        )
        return key

    def test_beforeExpiryRoutes(self) -> None:
        """Within the certificate's life, contact yields the device as usual."""
        key = self.expiredDevice()
        self.assertIsInstance(self.contact("kiln7", key, T0 + 99), Device)

    def test_neverCertifiedIsNotReapproval(self) -> None:
        """A device that never had a certificate is not 'expired'."""
        key, _ = self.enroll("kiln7", T0)
        self.assertIsInstance(self.contact("kiln7", key, T0 + 365 * DAY), Device)

    def test_expiredComesBackPendingThenOneStepApproval(self) -> None:
        """
        After expiry the key yields a 'reapprove' request (audited device.pending) whatever
        name it asks for; approveDevice(name) re-approves it; then it routes again.
        """
        key = self.expiredDevice()
        start = self.successResultOf(self.store.lastAuditId())
        request = self.contact("other-name", key, T0 + 200, serial="SN9")
        self.assertIsInstance(request, EnrollmentRequest)
        self.assertEqual(
            (request.kind, request.requestedName, request.fingerprint),
            ("reapprove", "kiln7", fingerprint(key)),
        )
        (pending,) = self.events(start)
        self.assertEqual((pending.event, pending.detail["kind"]), ("device.pending", "reapprove"))
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [request])
        self.assertIsInstance(self.contact("kiln7", key, T0 + 201), EnrollmentRequest)

        device = self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 300))
        self.assertEqual((device.fingerprint, device.approvedAt), (fingerprint(key), T0 + 300))
        self.assertEqual(device.serial, "SN9")
        approved = self.events()[-1]
        self.assertEqual(
            (approved.event, approved.detail["kind"]), ("device.approved", "reapprove")
        )
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        self.assertIsInstance(self.contact("kiln7", key, T0 + 301), Device)

    def test_revokeDropsReapproval(self) -> None:
        """Revoking a device waiting for re-approval drops the request: it stays revoked."""
        key = self.expiredDevice()
        self.contact("kiln7", key, T0 + 200)
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 201))
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        result = self.contact("kiln7", key, T0 + 202)
        self.assertEqual((result.name, result.state), ("kiln7", "revoked"))


@bothBackends
class PendingCapTests(StoreTestCase):
    """countPending, countPendingFrom and the caps recordContact enforces atomically."""

    def test_counts(self) -> None:
        """Counts are of pending requests, by host (not port), first seen since a time."""
        self.contact("a", newPublicKey(), T0, source="192.0.2.1:1000")
        self.contact("b", newPublicKey(), T0 + 10, source="192.0.2.1:1001")
        self.contact("c", newPublicKey(), T0 + 20, source="[2001:db8::1]:22")
        self.contact("d", newPublicKey(), T0 + 30, source="[2001:db8::2:3]:22")  # same /64
        self.assertEqual(self.successResultOf(self.store.countPending()), 4)
        countFrom = self.store.countPendingFrom
        self.assertEqual(self.successResultOf(countFrom("192.0.2.1", T0)), 2)
        self.assertEqual(self.successResultOf(countFrom("192.0.2.1", T0 + 5)), 1)
        self.assertEqual(self.successResultOf(countFrom("2001:db8::/64", T0)), 2)
        self.assertEqual(self.successResultOf(countFrom("192.0.2.2", T0)), 0)

    def test_limits(self) -> None:
        """
        Past the per-host or total cap a new request is refused (and not stored); a known
        request still refreshes; the per-host window slides.
        """
        limits = PendingLimits(total=3, perHost=2, window=3600)
        first = newPublicKey()
        self.contact("a", first, T0, source="192.0.2.1:1", limits=limits)
        self.contact("b", newPublicKey(), T0, source="192.0.2.1:2", limits=limits)
        error = self.failureOf(
            self.store.recordContact(
                "c", (k := newPublicKey()), fingerprint(k), None, "192.0.2.1:3", T0 + 1, limits
            ),
            PendingLimitReached,
        )
        self.assertIn("192.0.2.1", str(error))
        self.contact("a", first, T0 + 2, source="192.0.2.1:4", limits=limits)
        self.contact("d", newPublicKey(), T0 + 3, source="198.51.100.1:1", limits=limits)
        error = self.failureOf(
            self.store.recordContact(
                "e", (k := newPublicKey()), fingerprint(k), None, "203.0.113.1:1", T0 + 4, limits
            ),
            PendingLimitReached,
        )
        self.assertIn("waiting for approval", str(error))
        self.assertEqual(self.successResultOf(self.store.countPending()), 3)
        self.assertEqual(
            [e.event for e in self.events()], ["device.pending"] * 3
        )  # refusals leave no trace

        roomy = PendingLimits(total=100, perHost=2, window=3600)
        self.contact("f", newPublicKey(), T0 + 3601, source="192.0.2.1:5", limits=roomy)

    def test_sourceHost(self) -> None:
        """
        sourceHost drops the port of host:port and [v6]:port, counts an IPv6 host by its
        /64 and an IPv4-mapped one as IPv4, and keeps anything else.
        """
        self.assertEqual(sourceHost("192.0.2.1:5000"), "192.0.2.1")
        self.assertEqual(sourceHost("[2001:db8::1:2]:22"), "2001:db8::/64")
        self.assertEqual(sourceHost("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(sourceHost("[::ffff:192.0.2.7]:22"), "192.0.2.7")
        self.assertEqual(sourceHost("unknown"), "unknown")


@bothBackends
class SerialTests(StoreTestCase):
    """updateSerial: the agent's board serial, cleaned, on its device or request."""

    def test_onRequestThenDevice(self) -> None:
        """
        The serial lands on the pending request, survives approval and contacts without a
        serial; a change on the device is audited once; unknown keys are a no-op.
        """
        key = newPublicKey()
        self.contact("kiln7", key, T0)
        self.assertTrue(
            self.successResultOf(self.store.updateSerial(fingerprint(key), "SN\x1b[2J1"))
        )
        (request,) = self.successResultOf(self.store.listEnrollmentRequests())
        self.assertEqual(request.serial, "SN[2J1")
        self.contact("kiln7", key, T0 + 1)  # the server passes serial=None at login
        device = self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 2))
        self.assertEqual(device.serial, "SN[2J1")

        start = self.successResultOf(self.store.lastAuditId())
        self.assertTrue(
            self.successResultOf(self.store.updateSerial(fingerprint(key), "X" * 500, T0 + 3))
        )
        self.assertTrue(
            self.successResultOf(self.store.updateSerial(fingerprint(key), "X" * 500, T0 + 4))
        )
        stored = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(stored and stored.serial, "X" * 128)
        (event,) = self.events(start)
        self.assertEqual(
            (event.event, event.at, event.device), ("device.serial-changed", T0 + 3, "kiln7")
        )
        self.assertFalse(
            self.successResultOf(self.store.updateSerial(fingerprint(newPublicKey()), "S"))
        )

    def test_cleanSerial(self) -> None:
        """Control and format characters go, whitespace ends go, empty becomes None."""
        self.assertEqual(cleanSerial("\x00ab\u202ec\n"), "abc")
        self.assertIsNone(cleanSerial("\x07 "))
        self.assertIsNone(cleanSerial(None))


@bothBackends
class TokenTests(StoreTestCase):
    """Enrollment tokens: hashed, use-counted, expiring, single use per device key."""

    def newToken(self, uses: int = 1, expiresAt: float = T0 + DAY) -> tuple[str, int]:
        """Create a token; return its hash (what the server computes) and its id."""
        tokenHash = sha256(secrets.token_urlsafe(32))
        record = self.successResultOf(
            self.store.createToken(tokenHash, uses, expiresAt, "root", T0)
        )
        return tokenHash, record.id

    def redeem(self, tokenHash: str, name: str, key: str | None = None, now: float = T0 + 1) -> Any:
        """Redeem as an agent with C{key} (fresh by default) asking for C{name}."""
        key = key or newPublicKey()
        return self.store.redeemToken(
            tokenHash, fingerprint(key), key, name, "SN1", "192.0.2.1:5000", now
        )

    def usesLeft(self, tokenId: int) -> int:
        """The token's remaining uses, from listTokens."""
        (token,) = [t for t in self.successResultOf(self.store.listTokens()) if t.id == tokenId]
        return token.usesLeft

    def test_createAndList(self) -> None:
        """createToken stores the hash only, audits token.created; a raw token is refused."""
        tokenHash, tokenId = self.newToken(uses=3)
        (token,) = self.successResultOf(self.store.listTokens())
        self.assertEqual(
            (token.id, token.uses, token.usesLeft, token.expiresAt, token.createdBy),
            (tokenId, 3, 3, T0 + DAY, "root"),
        )
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.detail["token"]), ("token.created", "root", tokenId)
        )
        self.assertNotIn(tokenHash, repr(self.events()))
        raw = secrets.token_urlsafe(32)
        self.failureResultOf(self.store.createToken(raw, 1, T0 + 1, "root", T0), StoreError)
        self.failureResultOf(
            self.store.createToken(tokenHash, 1, T0 + 1, "root", T0), AlreadyExists
        )
        self.failureResultOf(self.store.createToken(sha256("x"), 0, T0 + 1, "root", T0), StoreError)
        self.failureResultOf(self.store.createToken(sha256("x"), 1, T0, "root", T0), StoreError)

    def test_redeem(self) -> None:
        """Redeeming creates the approved device (approved by token:ID) and uses one use."""
        tokenHash, tokenId = self.newToken(uses=2)
        key = newPublicKey()
        self.contact("kiln7", key, T0)  # it may have connected (and be pending) before
        device = self.successResultOf(self.redeem(tokenHash, "kiln7", key))
        self.assertEqual(
            (device.name, device.state, device.fingerprint, device.approvedBy, device.serial),
            ("kiln7", "approved", fingerprint(key), f"token:{tokenId}", "SN1"),
        )
        self.assertEqual(self.usesLeft(tokenId), 1)
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.device, event.detail["kind"]),
            ("device.approved", f"token:{tokenId}", "kiln7", "token"),
        )
        self.assertIsInstance(self.contact("kiln7", key, T0 + 2), Device)

    def test_replayRefused(self) -> None:
        """
        A key that redeemed a token cannot use it again: not while it is a device, and not
        after it lost the name to a re-key either, whatever uses are left.
        """
        tokenHash, tokenId = self.newToken(uses=5)
        key = newPublicKey()
        self.successResultOf(self.redeem(tokenHash, "kiln7", key))
        self.failureResultOf(self.redeem(tokenHash, "other", key), TokenInvalid)
        otherToken, _ = self.newToken()
        self.failureResultOf(self.redeem(otherToken, "other", key), AlreadyExists)
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 2)
        self.successResultOf(
            self.store.approveDevice("kiln7", "root", T0 + 3, fingerprint=fingerprint(newKey))
        )
        error = self.failureOf(self.redeem(tokenHash, "again", key, T0 + 4), TokenInvalid)
        self.assertIn("already redeemed", str(error))
        self.assertEqual(self.usesLeft(tokenId), 4)

    def test_invalidExpiredExhausted(self) -> None:
        """Unknown token, an expired one, a used-up one: each its own error, nothing used."""
        self.failureResultOf(self.redeem(sha256("nope"), "a"), TokenInvalid)
        expiring, expiringId = self.newToken(expiresAt=T0 + 10)
        self.failureResultOf(self.redeem(expiring, "a", now=T0 + 10), TokenExpired)
        self.assertEqual(self.usesLeft(expiringId), 1)
        once, _ = self.newToken(uses=1)
        self.successResultOf(self.redeem(once, "b"))
        self.failureResultOf(self.redeem(once, "c"), TokenExhausted)
        self.assertIsNone(self.successResultOf(self.store.deviceByName("c")))

    def test_nameTakenNeverRekeys(self) -> None:
        """A token never takes an existing device's name: NameTaken, and no use is spent."""
        _, before = self.enroll("kiln7")
        tokenHash, tokenId = self.newToken()
        self.failureResultOf(self.redeem(tokenHash, "kiln7"), NameTaken)
        self.assertEqual(self.usesLeft(tokenId), 1)
        self.assertEqual(self.successResultOf(self.store.deviceByName("kiln7")), before)
        self.failureResultOf(self.redeem(tokenHash, "Bad_Name"), InvalidName)

    def test_otherRequestsForTheNameBecomeRekeys(self) -> None:
        """Once a token takes a name, other keys pending for it are shown as re-keys."""
        self.contact("kiln7", newPublicKey(), T0)
        tokenHash, _ = self.newToken()
        self.successResultOf(self.redeem(tokenHash, "kiln7"))
        (request,) = self.successResultOf(self.store.listEnrollmentRequests())
        self.assertEqual(request.kind, "rekey")

    def test_lastUseRace(self) -> None:
        """
        Devices redeeming through separate connections at the same moment (two processes,
        or two nodes) never overspend: with one use left exactly one wins; with two uses
        and four contenders, exactly two.
        """
        for uses, contenders in [(1, 2), (1, 2), (2, 4)]:
            tokenHash, tokenId = self.newToken(uses=uses)
            stores = [self.openAnother() for _ in range(contenders)]
            outcomes = self.race(stores, tokenHash)
            winners = [o for o in outcomes if isinstance(o, Device)]
            losers = [o for o in outcomes if not isinstance(o, Device)]
            self.assertEqual(len(winners), uses, outcomes)
            self.assertTrue(all(isinstance(o, TokenExhausted) for o in losers), outcomes)
            self.assertEqual(self.usesLeft(tokenId), 0)

    def race(self, stores: list[SQLStore], tokenHash: str) -> list[Any]:
        """Redeem from every store in its own thread, released together; return outcomes."""
        keys = [newPublicKey() for _ in stores]
        names = [f"racer-{secrets.token_hex(4)}" for _ in stores]
        barrier = threading.Barrier(len(stores))
        outcomes: list[Any] = [None] * len(stores)

        def contend(i: int) -> None:
            barrier.wait()
            d = stores[i].redeemToken(
                tokenHash, fingerprint(keys[i]), keys[i], names[i], None, "192.0.2.1:1", T0 + 1
            )
            d.addCallbacks(
                lambda device: outcomes.__setitem__(i, device),
                lambda failure: outcomes.__setitem__(i, failure.value),
            )

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        return outcomes


@bothBackends
class ClaimTests(StoreTestCase):
    """Claims: a pairing code makes a logged-in operator the device's owner for a lease."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.successResultOf(
            self.store.addAccount("alice", [newPublicKey()], False, T0)
        )
        self.bob = self.successResultOf(self.store.addAccount("bob", [newPublicKey()], False, T0))

    def pendingWithCode(
        self, name: str = "kiln7", key: str | None = None, now: float = T0
    ) -> tuple[str, str]:
        """An agent connects and registers a code valid 5 minutes; return (key, code hash)."""
        key = key or newPublicKey()
        self.contact(name, key, now)
        codeHash = sha256(secrets.token_hex(4))
        self.successResultOf(
            self.store.registerClaimCode(codeHash, fingerprint(key), name, now + 300, now)
        )
        return key, codeHash

    def claim(
        self, codeHash: str, account: Account, leaseUntil: float, now: float = T0 + 10
    ) -> Any:
        return self.store.claimDevice(codeHash, account, leaseUntil, now)

    def reach(self, account: Account, now: float, name: str = "kiln7") -> bool:
        return self.successResultOf(self.store.mayReach(account, name, now))

    def test_claimNew(self) -> None:
        """
        A claim approves the pending device with the claimer as owner until the lease ends;
        the owner may reach it until then; the code is single use.
        """
        key, codeHash = self.pendingWithCode()
        device = self.successResultOf(self.claim(codeHash, self.alice, T0 + 7 * DAY))
        self.assertEqual(
            (device.name, device.state, device.fingerprint, device.owner, device.leaseUntil),
            ("kiln7", "approved", fingerprint(key), "alice", T0 + 7 * DAY),
        )
        self.assertEqual(device.approvedBy, "claim:alice")
        self.assertEqual(self.successResultOf(self.store.listEnrollmentRequests()), [])
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.actor, event.device), ("device.claimed", "alice", "kiln7")
        )
        self.assertEqual((event.detail["owner"], event.detail["kind"]), ("alice", "new"))
        self.assertNotIn(codeHash, repr(self.events()))
        self.assertTrue(self.reach(self.alice, T0 + 7 * DAY - 1))
        self.assertFalse(self.reach(self.alice, T0 + 7 * DAY))
        self.assertFalse(self.reach(self.bob, T0 + 11))
        self.failureResultOf(self.claim(codeHash, self.bob, T0 + DAY), ClaimCodeInvalid)
        self.assertIsInstance(self.contact("kiln7", key, T0 + 12), Device)

    def test_codeExpiryAndReplacement(self) -> None:
        """Codes expire; a newer code replaces the key's older one; unknown keys get none."""
        key, first = self.pendingWithCode()
        self.failureResultOf(
            self.claim(first, self.alice, T0 + DAY, now=T0 + 300), ClaimCodeExpired
        )
        second = sha256("second")
        self.successResultOf(
            self.store.registerClaimCode(second, fingerprint(key), "kiln7", T0 + 900, T0 + 600)
        )
        self.failureResultOf(
            self.claim(first, self.alice, T0 + DAY, now=T0 + 601), ClaimCodeInvalid
        )
        self.successResultOf(self.claim(second, self.alice, T0 + DAY, now=T0 + 601))
        self.failureResultOf(
            self.store.registerClaimCode(sha256("x"), fingerprint(newPublicKey()), "a", T0 + 9, T0),
            UnknownDevice,
        )
        self.failureResultOf(
            self.store.registerClaimCode("1234", fingerprint(key), "kiln7", T0 + 9, T0), StoreError
        )

    def test_nameTaken(self) -> None:
        """A claim never re-keys: a pending key asking for an approved name gets NameTaken."""
        _, before = self.enroll("kiln7")
        _, codeHash = self.pendingWithCode("kiln7")
        self.failureResultOf(self.claim(codeHash, self.alice, T0 + DAY), NameTaken)
        self.assertEqual(self.successResultOf(self.store.deviceByName("kiln7")), before)

    def test_adminApprovedOrRevokedRefused(self) -> None:
        """An admin-approved device cannot be claimed, nor a revoked one re-approved so."""
        key, _ = self.enroll("kiln7")
        codeHash = sha256("c1")
        self.successResultOf(
            self.store.registerClaimCode(codeHash, fingerprint(key), "kiln7", T0 + 300, T0)
        )
        self.failureResultOf(self.claim(codeHash, self.alice, T0 + DAY), ClaimRefused)
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 1))
        self.successResultOf(
            self.store.registerClaimCode(codeHash, fingerprint(key), "kiln7", T0 + 300, T0 + 2)
        )
        self.failureResultOf(self.claim(codeHash, self.alice, T0 + DAY), ClaimRefused)

    def test_claimReapproval(self) -> None:
        """A device back after certificate expiry can be claimed: re-approved, same key."""
        key, _ = self.enroll("kiln7")
        self.successResultOf(
            self.store.recordCertificate("kiln7", "1", fingerprint(key), T0, T0 + 100, T0)
        )
        self.assertEqual(self.contact("kiln7", key, T0 + 200).kind, "reapprove")
        codeHash = sha256("c")
        self.successResultOf(
            self.store.registerClaimCode(codeHash, fingerprint(key), "kiln7", T0 + 500, T0 + 200)
        )
        device = self.successResultOf(self.claim(codeHash, self.alice, T0 + DAY, now=T0 + 201))
        self.assertEqual((device.fingerprint, device.owner), (fingerprint(key), "alice"))
        self.assertEqual(self.events()[-1].detail["kind"], "reapprove")
        self.assertIsInstance(self.contact("kiln7", key, T0 + 202), Device)

    def test_renewLapseAndReclaim(self) -> None:
        """
        The owner renews with a new code; another operator cannot take it meanwhile; the
        lease lapses (claim.lapsed names the owner); then the device may be claimed again.
        """
        key, codeHash = self.pendingWithCode()
        self.successResultOf(self.claim(codeHash, self.alice, T0 + 100))
        renewal = sha256("renew")
        self.successResultOf(
            self.store.registerClaimCode(renewal, fingerprint(key), "kiln7", T0 + 300, T0 + 50)
        )
        device = self.successResultOf(self.claim(renewal, self.alice, T0 + 200, now=T0 + 60))
        self.assertEqual(device.leaseUntil, T0 + 200)
        self.assertEqual(self.events()[-1].detail["kind"], "renew")

        theft = sha256("theft")
        self.successResultOf(
            self.store.registerClaimCode(theft, fingerprint(key), "kiln7", T0 + 300, T0 + 70)
        )
        self.failureResultOf(self.claim(theft, self.bob, T0 + 900, now=T0 + 71), ClaimRefused)

        self.assertEqual(self.successResultOf(self.store.lapsedLeases(T0 + 199)), [])
        (lapsed,) = self.successResultOf(self.store.lapsedLeases(T0 + 200))
        self.assertEqual((lapsed.name, lapsed.owner), ("kiln7", "alice"))
        ended = self.successResultOf(self.store.endLease("kiln7", T0 + 200))
        self.assertEqual((ended and ended.owner, ended and ended.leaseUntil), (None, None))
        event = self.events()[-1]
        self.assertEqual(
            (event.event, event.device, event.detail["owner"]), ("claim.lapsed", "kiln7", "alice")
        )
        self.assertIsNone(self.successResultOf(self.store.endLease("kiln7", T0 + 201)))
        self.assertEqual(self.successResultOf(self.store.lapsedLeases(T0 + 201)), [])
        self.assertFalse(self.reach(self.alice, T0 + 201))
        self.failureResultOf(self.store.endLease("ghost", T0), UnknownDevice)

        self.successResultOf(
            self.store.registerClaimCode(theft, fingerprint(key), "kiln7", T0 + 400, T0 + 300)
        )
        device = self.successResultOf(self.claim(theft, self.bob, T0 + 900, now=T0 + 301))
        self.assertEqual(device.owner, "bob")
        self.assertEqual(self.events()[-1].detail["kind"], "reclaim")

    def test_endLeaseSkipsRenewed(self) -> None:
        """endLease on a lease renewed since lapsedLeases saw it leaves it alone."""
        _, codeHash = self.pendingWithCode()
        self.successResultOf(self.claim(codeHash, self.alice, T0 + 100))
        self.assertIsNone(self.successResultOf(self.store.endLease("kiln7", T0 + 99)))
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(device and device.owner, "alice")
