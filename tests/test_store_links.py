"""
Tests for the store's record of device links (schemas 006, 008): how an approved device's
latest link authenticated, the last certificate it linked with and the key exchange it used,
written by recordContact in the statement that sets last_seen and read by lastLink, on SQLite
and PostgreSQL, and the upgrade of a version 5 (and 7) database that already holds devices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accesstunnel.keys import fingerprint
from groundcontrol.store import (
    Device,
    EnrollmentRequest,
    LastLink,
    LinkCertificate,
    LinkRecord,
    schemaUpgraders,
)
from tests.test_store import T0, StoreTestCase, bothBackends, newPublicKey

FINGERPRINT = ":".join(["AB"] * 32)


def certificateOf(deviceName: str) -> Callable[[str], LinkRecord]:
    """
    The realm's decision for a certificate naming C{deviceName} that vouches for the key:
    recorded for that device, refused for any other (as L{groundcontrol.certverdict} decides).
    """

    def decide(name: str) -> LinkRecord:
        if name != deviceName:
            return LinkRecord.refusedLink()
        return LinkRecord.byCertificate(presented(deviceName, "99"))

    return decide


def presented(deviceName: str = "kiln7", serialNumber: str = "0a1b2c") -> LinkCertificate:
    """A certificate a link presented, as the realm hands it to the store."""
    return LinkCertificate(
        serialNumber=serialNumber,
        fingerprint=FINGERPRINT,
        notAfter=T0 + 30 * 86400,
        deviceName=deviceName,
    )


@bothBackends
class LinkRecordTests(StoreTestCase):
    """recordContact keeps how a device linked, and the certificate it linked with."""

    def lastLink(self, name: str = "kiln7") -> LastLink | None:
        """What another reader (the CLI, another node) sees of the device's last link."""
        return self.successResultOf(self.openAnother().lastLink(name))

    def test_certificateLink(self) -> None:
        """
        A contact with a certificate for the device records it (serial, fingerprint, expiry,
        when) and says the link came by certificate; the contact is seen as before.
        """
        publicKey, _ = self.enroll("kiln7")
        self.assertEqual(self.lastLink(), LastLink(None, None, None))
        device = self.contact("kiln7", publicKey, T0 + 60, certificate=presented())
        self.assertIsInstance(device, Device)
        self.assertEqual(device.lastSeen, T0 + 60)
        self.assertEqual(self.lastLink(), LastLink("certificate", presented(), T0 + 60))

    def test_keyLinkKeepsTheLastCertificate(self) -> None:
        """
        A later link by the key alone says so, and keeps the certificate the device last
        linked with (and when); a newer certificate replaces it.
        """
        publicKey, _ = self.enroll("kiln7")
        self.contact("kiln7", publicKey, T0 + 60, certificate=presented())
        device = self.contact("kiln7", publicKey, T0 + 120)
        self.assertEqual(device.lastSeen, T0 + 120)
        self.assertEqual(self.lastLink(), LastLink("key", presented(), T0 + 60))
        renewed = presented(serialNumber="ff")
        self.contact("kiln7", publicKey, T0 + 180, certificate=renewed)
        self.assertEqual(self.lastLink(), LastLink("certificate", renewed, T0 + 180))

    def test_keyExchangeRecordedWithTheLink(self) -> None:
        """
        The key exchange the caller says a link negotiated is recorded with it, by key or by
        certificate, and replaced by the next link's (None: not known); a refused link leaves
        it as it was.
        """
        publicKey, _ = self.enroll("kiln7")
        self.contact(
            "kiln7", publicKey, T0 + 60, link=lambda _: LinkRecord(kex="curve25519-sha256")
        )
        self.assertEqual(self.lastLink(), LastLink("key", None, None, "curve25519-sha256"))
        pq = LinkRecord(presented(), kex="mlkem768x25519-sha256")
        self.contact("kiln7", publicKey, T0 + 120, link=lambda _: pq)
        self.assertEqual(
            self.lastLink(), LastLink("certificate", presented(), T0 + 120, "mlkem768x25519-sha256")
        )
        refused = LinkRecord(refused=True, kex="curve25519-sha256")
        self.contact("kiln7", publicKey, T0 + 180, link=lambda _: refused)
        self.assertEqual(self.lastLink().kex, "mlkem768x25519-sha256")  # type: ignore[union-attr]
        self.contact("kiln7", publicKey, T0 + 240)
        self.assertEqual(self.lastLink(), LastLink("key", presented(), T0 + 120, None))

    def test_keyExchangeListedWithTheDevice(self) -> None:
        """
        The device record carries its last link's key exchange (what device list --kex and
        ls --kex filter on) as lastLink has it: None before any link and after a link that
        did not say, kept by a refused link; in listDevices and deviceByName alike.
        """
        publicKey, _ = self.enroll("kiln7")
        self.enroll("oven3")
        reader = self.openAnother()

        def listed() -> dict[str, str | None]:
            return {d.name: d.lastLinkKex for d in self.successResultOf(reader.listDevices())}

        self.assertEqual(listed(), {"kiln7": None, "oven3": None})
        linked = self.contact(
            "kiln7", publicKey, T0 + 60, link=lambda _: LinkRecord(kex="curve25519-sha256")
        )
        self.assertEqual(linked.lastLinkKex, "curve25519-sha256")
        self.assertEqual(listed(), {"kiln7": "curve25519-sha256", "oven3": None})
        self.contact(
            "kiln7", publicKey, T0 + 120, link=lambda _: LinkRecord(kex="mlkem768x25519-sha256")
        )
        refused = LinkRecord(refused=True, kex="curve25519-sha256")
        self.contact("kiln7", publicKey, T0 + 180, link=lambda _: refused)
        device = self.successResultOf(reader.deviceByName("kiln7"))
        self.assertEqual(device.lastLinkKex, "mlkem768x25519-sha256")
        self.assertEqual(listed()["kiln7"], self.lastLink().kex)  # type: ignore[union-attr]
        self.contact("kiln7", publicKey, T0 + 240)
        self.assertEqual(listed(), {"kiln7": None, "oven3": None})

    def test_refusedCertificateLeavesTheRecord(self) -> None:
        """
        A link the caller refuses (its certificate names another device, or does not vouch
        for the key: the realm refuses those logins), told as a link refused for the key's
        device or as certificateRefused, changes neither how the device last linked nor its
        last certificate; the contact is still seen.
        """
        publicKey, _ = self.enroll("kiln7")
        self.contact("kiln7", publicKey, T0 + 60, certificate=presented())
        device = self.contact("kiln7", publicKey, T0 + 120, link=certificateOf("kiln8"))
        self.assertEqual(device.lastSeen, T0 + 120)
        self.assertEqual(self.lastLink(), LastLink("certificate", presented(), T0 + 60))
        device = self.contact("kiln7", publicKey, T0 + 180, certificateRefused=True)
        self.assertEqual(device.lastSeen, T0 + 180)
        self.assertEqual(self.lastLink(), LastLink("certificate", presented(), T0 + 60))

    def test_storeAppliesTheCallersDecision(self) -> None:
        """
        The store asks the caller's decision once, for the device the key belongs to (not
        the name the agent asked for), and records what it says as it is: it judges no
        certificate itself, so a certificate naming another device is recorded if the caller
        says so. Whether a certificate vouches for a device is decided in one place, the
        realm's verdict (L{groundcontrol.certverdict}), which the refusal reads too.
        """
        publicKey, _ = self.enroll("kiln7")
        asked: list[str] = []

        def decide(deviceName: str) -> LinkRecord:
            asked.append(deviceName)
            return LinkRecord.byCertificate(presented("kiln8", "99"))

        device = self.contact("oven3", publicKey, T0 + 60, link=decide)
        self.assertEqual((device.name, device.lastSeen), ("kiln7", T0 + 60))
        self.assertEqual(asked, ["kiln7"])
        self.assertEqual(
            self.lastLink(), LastLink("certificate", presented("kiln7", "99"), T0 + 60)
        )
        self.contact("kiln7", publicKey, T0 + 120, link=lambda deviceName: LinkRecord.byKey())
        self.assertEqual(self.lastLink(), LastLink("key", presented("kiln7", "99"), T0 + 60))

    def test_noDecisionAskedWithoutALink(self) -> None:
        """
        A contact that records no link asks for no decision: an unknown key (pending), a
        revoked device's key, an expired certificate's device (pending re-approval).
        """
        asked: list[str] = []

        def decide(deviceName: str) -> LinkRecord:
            asked.append(deviceName)
            return LinkRecord.byKey()

        self.assertIsInstance(
            self.contact("oven3", newPublicKey(), T0, link=decide), EnrollmentRequest
        )
        publicKey, device = self.enroll("kiln7")
        self.successResultOf(
            self.store.recordCertificate("kiln7", "01", device.fingerprint, T0, T0 + 10, T0)
        )
        answer = self.contact("kiln7", publicKey, T0 + 20, link=decide)
        self.assertIsInstance(answer, EnrollmentRequest)
        revokedKey, _ = self.enroll("kiln8")
        self.successResultOf(self.store.revokeDevice("kiln8", "admin", T0 + 30))
        revoked = self.contact("kiln8", revokedKey, T0 + 40, link=decide)
        self.assertEqual((revoked.name, revoked.state), ("kiln8", "revoked"))
        self.assertEqual(asked, [])

    def test_decisionGivenOnce(self) -> None:
        """A decision for the key's device and a device-independent one together are refused."""
        publicKey, _ = self.enroll("kiln7")
        for legacy in ({"certificate": presented()}, {"certificateRefused": True}):
            with self.assertRaises(TypeError):
                self.store.recordContact(
                    "kiln7",
                    publicKey,
                    fingerprint(publicKey),
                    None,
                    "192.0.2.1:5000",
                    T0,
                    link=certificateOf("kiln8"),
                    **legacy,
                )

    def test_pendingAndReapprovalRecordNoLink(self) -> None:
        """
        A contact that is not an accepted link records none: an unknown key (pending) and an
        approved device whose certificate expired (pending re-approval); once re-approved,
        its next link is recorded. An unknown name has no last link.
        """
        request = self.contact("oven3", newPublicKey(), T0, certificate=presented("oven3"))
        self.assertIsInstance(request, EnrollmentRequest)
        self.assertIsNone(self.lastLink("oven3"))
        publicKey, device = self.enroll("kiln7")
        self.successResultOf(
            self.store.recordCertificate("kiln7", "01", device.fingerprint, T0, T0 + 10, T0)
        )
        answer = self.contact("kiln7", publicKey, T0 + 20, certificate=presented())
        self.assertIsInstance(answer, EnrollmentRequest)
        self.assertEqual(self.lastLink(), LastLink(None, None, None))
        self.successResultOf(self.store.approveDevice("kiln7", "admin", T0 + 30))
        self.contact("kiln7", publicKey, T0 + 40, certificate=presented())
        self.assertEqual(self.lastLink(), LastLink("certificate", presented(), T0 + 40))


@bothBackends
class UpgradeTo006Tests(StoreTestCase):
    """A version 5 database's devices gain empty link records, then fill them as they link."""

    def test_existingDevicesUpgraded(self) -> None:
        """
        A device approved under version 5 is read after the upgrade with no link recorded
        (not guessed), keeps everything else, and records its next link.
        """
        if self.backend == "postgresql":
            assert self.postgresql is not None
            self.url = self.postgresql.newDatabase()
        else:
            self.path = self.url = str(Path(self.mktemp() + ".sqlite3").absolute())
        self.assertEqual(self.rawMigrate(upTo=5), 5)
        publicKey = newPublicKey()
        self.rawQuery(
            "INSERT INTO devices (name, state, fingerprint, public_key, serial, approved_at, "
            "approved_by, last_seen, created_at) VALUES (?, 'approved', ?, ?, NULL, ?, 'admin', "
            "?, ?)",
            ("kiln7", fingerprint(publicKey), publicKey, T0, T0, T0),
        )
        self.assertEqual(self.rawMigrate(), schemaUpgraders()[-1][0])
        self.assertGreaterEqual(schemaUpgraders()[-1][0], 6)
        self.store = self.openAnother()
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        assert device is not None
        self.assertEqual(
            (device.state, device.approvedBy, device.lastSeen), ("approved", "admin", T0)
        )
        self.assertEqual(
            self.successResultOf(self.store.lastLink("kiln7")), LastLink(None, None, None)
        )
        self.contact("kiln7", publicKey, T0 + 5, certificate=presented())
        self.assertEqual(
            self.successResultOf(self.store.lastLink("kiln7")),
            LastLink("certificate", presented(), T0 + 5),
        )


@bothBackends
class UpgradeTo008Tests(StoreTestCase):
    """A version 7 database's link records gain an empty key exchange, filled at the next link."""

    def test_linkRecordsUpgraded(self) -> None:
        """
        A device that linked by certificate under version 7 keeps its record after the
        upgrade, with no key exchange (not guessed), and its next link records one.
        """
        if self.backend == "postgresql":
            assert self.postgresql is not None
            self.url = self.postgresql.newDatabase()
        else:
            self.path = self.url = str(Path(self.mktemp() + ".sqlite3").absolute())
        self.assertEqual(self.rawMigrate(upTo=7), 7)
        publicKey = newPublicKey()
        self.rawQuery(
            "INSERT INTO devices (name, state, fingerprint, public_key, serial, approved_at, "
            "approved_by, last_seen, created_at, last_link_auth, last_certificate_serial, "
            "last_certificate_fingerprint, last_certificate_not_after, last_certificate_at) "
            "VALUES (?, 'approved', ?, ?, NULL, ?, 'admin', ?, ?, 'certificate', ?, ?, ?, ?)",
            (
                "kiln7",
                fingerprint(publicKey),
                publicKey,
                T0,
                T0,
                T0,
                "0a1b2c",
                FINGERPRINT,
                T0 + 30 * 86400,
                T0,
            ),
        )
        self.assertEqual(self.rawMigrate(), schemaUpgraders()[-1][0])
        self.assertGreaterEqual(schemaUpgraders()[-1][0], 8)
        self.store = self.openAnother()
        self.assertEqual(
            self.successResultOf(self.store.lastLink("kiln7")),
            LastLink("certificate", presented(), T0, None),
        )
        self.contact("kiln7", publicKey, T0 + 5, link=lambda _: LinkRecord(kex="curve25519-sha256"))
        self.assertEqual(
            self.successResultOf(self.openAnother().lastLink("kiln7")),
            LastLink("key", presented(), T0, "curve25519-sha256"),
        )
