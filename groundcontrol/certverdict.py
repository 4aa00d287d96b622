"""
What a device's TLS client certificate says about its agent's login: the one rule.

An agent logs in with its enrolled SSH key; a fleet certificate its link presents over TLS
must vouch for that very key and device, or the login is refused (one device's certificate
never vouches for another's key). Three things read that decision: the realm's refusal, the
store's record of how the device last linked, and the log line. They all read the one
L{CertificateVerdict} made here, so they cannot disagree.

The verdict needs the device the key belongs to, which only the store's contact write finds
out (the key decides, not the name asked for). So the realm checks the certificate against the
fleet CA once (L{PresentedCertificate.check}), hands the store
L{PresentedCertificate.linkRecordFor} to apply in that write, and judges the device the write
returns with L{PresentedCertificate.verdictFor}: the same rule on the same device, and no store
call more than a login without a certificate makes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from groundcontrol.pki import CertificateError, DeviceCertificate, FleetCA, verifyDeviceCertificate
from groundcontrol.store import LinkCertificate, LinkRecord

__all__ = ["CertificateVerdict", "Finding", "PresentedCertificate"]


class Finding(Enum):
    """What a presented certificate turned out to be, for one login."""

    #: No certificate came with the link, or there is no fleet CA to judge one by: the
    #: login stands on its key alone.
    NONE = "none"
    #: The fleet CA does not vouch for it now: another CA's, expired, not yet valid, malformed.
    NOT_FLEETS = "not the fleet's"
    #: The fleet's, but it certifies another key than the one the agent proved.
    OTHER_KEY = "another key's"
    #: The fleet's, for this key, but naming another device than the one the key belongs to.
    OTHER_DEVICE = "another device's"
    #: The fleet's, for this key and this device.
    VOUCHES = "vouches"


#: The findings that refuse the login.
_REFUSING = frozenset({Finding.NOT_FLEETS, Finding.OTHER_KEY, Finding.OTHER_DEVICE})


@frozen
class CertificateVerdict:
    """What a link's certificate says about its login to one device, and what follows."""

    finding: Finding
    #: What the fleet CA vouched for, when it did (every finding but NONE and NOT_FLEETS).
    certificate: DeviceCertificate | None = None
    #: Why the fleet CA does not vouch for it (NOT_FLEETS only).
    error: CertificateError | None = None

    @property
    def refusal(self) -> str | None:
        """Why the login is refused, as the agent is told; None if the certificate allows it."""
        if self.finding is Finding.NOT_FLEETS:
            return f"bad device certificate: {self.error}"
        if self.finding in _REFUSING:
            return "the TLS certificate is not this device's"
        return None

    @property
    def vouching(self) -> DeviceCertificate | None:
        """The certificate that vouches for the login (the link's log line names it), if any."""
        return self.certificate if self.finding is Finding.VOUCHES else None

    @property
    def linkRecord(self) -> LinkRecord:
        """What the store records of the link: by this certificate, by key, or refused."""
        if self.finding in _REFUSING:
            return LinkRecord.refusedLink()
        vouching = self.vouching
        if vouching is None:
            return LinkRecord.byKey()
        return LinkRecord.byCertificate(
            LinkCertificate(
                serialNumber=vouching.serialNumber,
                fingerprint=vouching.certificateFingerprint,
                notAfter=vouching.notAfter.timestamp(),
                deviceName=vouching.deviceName,
            )
        )


@frozen
class PresentedCertificate:
    """
    A link's TLS client certificate as checked against the fleet CA, with the key its agent
    proved: all there is to know before the store says which device the key is.
    """

    #: What the CA vouches for; why not; or None (no certificate, or no CA to judge it).
    checked: DeviceCertificate | CertificateError | None
    keyFingerprint: str

    @classmethod
    def check(
        cls,
        certificate: x509.Certificate | None,
        ca: FleetCA | None,
        now: float,
        keyFingerprint: str,
    ) -> PresentedCertificate:
        """
        Check C{certificate} against C{ca} at C{now} (epoch seconds), once per login: the
        signature check is the costly part, the verdicts after it are comparisons.
        """
        if certificate is None or ca is None:
            return cls(None, keyFingerprint)
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        try:
            checked: DeviceCertificate | CertificateError = verifyDeviceCertificate(
                ca, pem, datetime.fromtimestamp(now, UTC)
            )
        except CertificateError as e:
            checked = e
        return cls(checked, keyFingerprint)

    def verdictFor(self, deviceName: str) -> CertificateVerdict:
        """The rule: what this certificate says about this login to device C{deviceName}."""
        checked = self.checked
        if checked is None:
            return CertificateVerdict(Finding.NONE)
        if isinstance(checked, CertificateError):
            return CertificateVerdict(Finding.NOT_FLEETS, error=checked)
        if checked.publicKeyFingerprint != self.keyFingerprint:
            return CertificateVerdict(Finding.OTHER_KEY, checked)
        if checked.deviceName != deviceName:
            return CertificateVerdict(Finding.OTHER_DEVICE, checked)
        return CertificateVerdict(Finding.VOUCHES, checked)

    def linkRecordFor(self, deviceName: str) -> LinkRecord:
        """What the store records of the link, once it knows the key is C{deviceName}'s."""
        return self.verdictFor(deviceName).linkRecord
