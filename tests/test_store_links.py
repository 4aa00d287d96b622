"""
Tests for the store's record of device links (schema 006): how an approved device's latest
link authenticated and the last certificate it linked with, written by recordContact in the
statement that sets last_seen and read by lastLink, on SQLite and PostgreSQL, and the
upgrade of a version 5 database that already holds devices.
"""

from __future__ import annotations

from pathlib import Path

from accesstunnel.keys import fingerprint
from groundcontrol.store import (
    Device,
    EnrollmentRequest,
    LastLink,
    LinkCertificate,
    schemaUpgraders,
)
from tests.test_store import T0, StoreTestCase, bothBackends, newPublicKey

FINGERPRINT = ":".join(["AB"] * 32)


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

    def test_refusedCertificateLeavesTheRecord(self) -> None:
        """
        A certificate naming another device, or one the caller says does not vouch for the
        key (certificateRefused: the realm refuses those logins), changes neither how the
        device last linked nor its last certificate; the contact is still seen.
        """
        publicKey, _ = self.enroll("kiln7")
        self.contact("kiln7", publicKey, T0 + 60, certificate=presented())
        device = self.contact("kiln7", publicKey, T0 + 120, certificate=presented("kiln8", "99"))
        self.assertEqual(device.lastSeen, T0 + 120)
        self.assertEqual(self.lastLink(), LastLink("certificate", presented(), T0 + 60))
        device = self.contact("kiln7", publicKey, T0 + 180, certificateRefused=True)
        self.assertEqual(device.lastSeen, T0 + 180)
        self.assertEqual(self.lastLink(), LastLink("certificate", presented(), T0 + 60))

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
        self.assertEqual(schemaUpgraders()[-1][0], 6)
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
