"""
Tests for groundcontrol.certverdict: the one decision about what a link's TLS client
certificate says about its agent's login, for each kind of certificate, and what the
refusal, the store's record and the log line read from it.

Real certificates from a real fleet CA (L{groundcontrol.pki}), no network, no reactor.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from groundcontrol import pki
from groundcontrol.certverdict import CertificateVerdict, Finding, PresentedCertificate
from groundcontrol.store import LinkCertificate, LinkRecord
from groundcontrol.testing import newKey, publicLine
from tests.test_pki import openSSLFingerprint

T0 = 1_900_000_000.0
DAY = 86400.0


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class CertificateVerdictTests(SynchronousTestCase):
    """What a presented certificate says about kiln7's login, case by case."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        self.ca = pki.FleetCA.create(base / "ca", utc(T0 - 400 * DAY))
        self.key = publicLine(newKey())
        self.keyFingerprint = fingerprint(self.key)

    def issue(
        self,
        name: str = "kiln7",
        key: str | None = None,
        age: float = 0.0,
        ca: pki.FleetCA | None = None,
    ) -> pki.IssuedCertificate:
        """A 30-day certificate naming C{name} for C{key} (kiln7's), issued C{age} ago."""
        return pki.issueDeviceCertificate(ca or self.ca, name, None, key or self.key, utc(T0 - age))

    def presented(
        self, issued: pki.IssuedCertificate | None, ca: pki.FleetCA | None = None
    ) -> PresentedCertificate:
        """What kiln7's login presented, checked now by C{ca} (this fleet's by default)."""
        certificate = None if issued is None else x509.load_pem_x509_certificate(issued.pem)
        return PresentedCertificate.check(certificate, ca or self.ca, T0, self.keyFingerprint)

    def assertRefused(self, verdict: CertificateVerdict, finding: Finding) -> None:
        """The verdict refuses the login and records no link."""
        self.assertIs(verdict.finding, finding)
        self.assertIsNotNone(verdict.refusal)
        self.assertIsNone(verdict.vouching)
        self.assertEqual(verdict.linkRecord, LinkRecord.refusedLink())

    def test_vouches(self) -> None:
        """
        The fleet's certificate for kiln7's key, naming kiln7, vouches for kiln7's login: no
        refusal, the login carries it (for the log line), the store records the link by it.
        """
        issued = self.issue()
        verdict = self.presented(issued).verdictFor("kiln7")
        self.assertIs(verdict.finding, Finding.VOUCHES)
        self.assertIsNone(verdict.refusal)
        assert verdict.vouching is not None
        self.assertEqual(verdict.vouching.serialNumber, issued.serialNumber)
        self.assertEqual(
            verdict.linkRecord,
            LinkRecord.byCertificate(
                LinkCertificate(
                    serialNumber=issued.serialNumber,
                    fingerprint=openSSLFingerprint(issued.pem),
                    notAfter=issued.notAfter.timestamp(),
                    deviceName="kiln7",
                )
            ),
        )

    def test_noneIsTheKeyAlone(self) -> None:
        """No certificate: the login stands on its key; nothing refused, recorded by key."""
        verdict = self.presented(None).verdictFor("kiln7")
        self.assertEqual(verdict, CertificateVerdict(Finding.NONE))
        self.assertIsNone(verdict.refusal)
        self.assertIsNone(verdict.vouching)
        self.assertEqual(verdict.linkRecord, LinkRecord.byKey())

    def test_noCAConfigured(self) -> None:
        """
        With no fleet CA to judge it by, a presented certificate (even another device's) is
        not judged: the login is by its key, as with none.
        """
        certificate = x509.load_pem_x509_certificate(self.issue(name="kiln8").pem)
        presented = PresentedCertificate.check(certificate, None, T0, self.keyFingerprint)
        verdict = presented.verdictFor("kiln7")
        self.assertEqual(verdict, CertificateVerdict(Finding.NONE))
        self.assertEqual(verdict.linkRecord, LinkRecord.byKey())

    def test_otherDevice(self) -> None:
        """
        The fleet's certificate for kiln7's very key but naming kiln8 does not vouch for
        kiln7: refused, no link recorded; the verdict names kiln8 (the warning does).
        """
        verdict = self.presented(self.issue(name="kiln8")).verdictFor("kiln7")
        self.assertRefused(verdict, Finding.OTHER_DEVICE)
        self.assertEqual(verdict.refusal, "the TLS certificate is not this device's")
        assert verdict.certificate is not None
        self.assertEqual(verdict.certificate.deviceName, "kiln8")

    def test_otherKey(self) -> None:
        """
        The fleet's certificate naming kiln7 but for another key does not vouch for the key
        kiln7 logged in with: refused, whichever device the key is.
        """
        presented = self.presented(self.issue(key=publicLine(newKey())))
        for device in ("kiln7", "kiln8"):
            verdict = presented.verdictFor(device)
            self.assertRefused(verdict, Finding.OTHER_KEY)
            self.assertEqual(verdict.refusal, "the TLS certificate is not this device's")

    def test_expired(self) -> None:
        """An expired certificate is not the fleet's now: refused, saying why."""
        verdict = self.presented(self.issue(age=31 * DAY)).verdictFor("kiln7")
        self.assertRefused(verdict, Finding.NOT_FLEETS)
        self.assertIsInstance(verdict.error, pki.CertificateExpired)
        self.assertEqual(verdict.refusal, f"bad device certificate: {verdict.error}")

    def test_anotherCAs(self) -> None:
        """A certificate another CA issued, for this key and name, is not the fleet's."""
        base = Path(self.mktemp())
        base.mkdir()
        other = pki.FleetCA.create(base / "ca", utc(T0 - 400 * DAY), "another CA")
        verdict = self.presented(self.issue(ca=other)).verdictFor("kiln7")
        self.assertRefused(verdict, Finding.NOT_FLEETS)
        self.assertIsInstance(verdict.error, pki.WrongIssuer)

    def test_verdictDependsOnTheDeviceOnly(self) -> None:
        """
        One check serves the whole login: the same presented certificate vouches for the
        device it names and for no other, and what the store is handed
        (L{PresentedCertificate.linkRecordFor}) is the very verdict the refusal reads.
        """
        presented = self.presented(self.issue())
        self.assertIs(presented.verdictFor("kiln7").finding, Finding.VOUCHES)
        self.assertIs(presented.verdictFor("kiln8").finding, Finding.OTHER_DEVICE)
        cases = [
            self.presented(None),
            presented,
            self.presented(self.issue(name="kiln8")),
            self.presented(self.issue(key=publicLine(newKey()))),
            self.presented(self.issue(age=31 * DAY)),
        ]
        for case in cases:
            for device in ("kiln7", "kiln8"):
                verdict = case.verdictFor(device)
                self.assertEqual(case.linkRecordFor(device), verdict.linkRecord)
                self.assertEqual(verdict.linkRecord.refused, verdict.refusal is not None)

    def test_refusedLinkHasNoCertificate(self) -> None:
        """A link record cannot be both refused and by a certificate."""
        certificate = LinkCertificate("01", "AB", T0, "kiln7")
        with self.assertRaises(ValueError):
            LinkRecord(certificate=certificate, refused=True)
