"""
Tests that groundcontrol makes an accepted device link auditable: the link's one log line
says how the device authenticated (its fleet certificate or its key) and, for a certificate,
which one (serial, SHA-256 fingerprint, subject, expiry), at warn when it is due for renewal;
the store keeps the last certificate a device linked with, in the write the login already
made.

The links are real groundcontrol logins in memory (L{InMemoryFleet}); the TLS layer's
verified client certificate, which L{accesstunnel.transports.tls.peerCertificate} reads from
a real TLS connection (tests/test_transports_tls.py), is handed to the front door directly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from accesstunnel import hybridkex
from accesstunnel.keys import fingerprint
from accesstunnel.timetext import isoTime
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol import pki, sshserver
from groundcontrol.certverdict import CertificateVerdict, Finding, PresentedCertificate
from groundcontrol.enrollment import CertificatePolicy
from groundcontrol.store import IStore, LastLink, LinkCertificate
from groundcontrol.testing import (
    InMemoryFleet,
    newKey,
    openMemoryStore,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)
from tests.test_pki import openSSLFingerprint

T0 = 1_900_000_000.0
DAY = 86400.0


class CountingStore:
    """The store, with the name of every method groundcontrol calls on it, in order."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: list[str] = []

    def interactive(self) -> CountingStore:
        return self

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not callable(method):
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted


class LinkCertificateTests(SynchronousTestCase):
    """What groundcontrol logs and stores about the credential of an accepted link."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        base = Path(self.mktemp())
        base.mkdir()
        self.ca = pki.FleetCA.create(base / "ca", self.utc(T0 - 400 * DAY))
        #: The certificate the next link presents over TLS (None: no TLS certificate).
        self.presented: x509.Certificate | None = None
        self.patch(sshserver, "peerCertificate", lambda transport: self.presented)
        #: The certificate rule as shipped (L{ruleReads} changes it).
        self.judge = PresentedCertificate.verdictFor
        self.newFleet()

    def newFleet(self) -> None:
        """A groundcontrol with a fresh store in which kiln7 is approved, not yet linked."""
        self.store = CountingStore(openMemoryStore())
        self.fleet = InMemoryFleet(
            store=cast(IStore, self.store),
            clock=self.clock,
            certificates=CertificatePolicy(self.ca),
        )
        self.key = self.fleet.enrollDevice("kiln7")

    def utc(self, t: float) -> datetime:
        return datetime.fromtimestamp(t, UTC)

    def issue(self, name: str = "kiln7", age: float = 0.0) -> pki.IssuedCertificate:
        """A 30-day certificate for kiln7's key naming C{name}, issued C{age} seconds ago."""
        return pki.issueDeviceCertificate(
            self.ca, name, None, publicLine(self.key), self.utc(self.clock.seconds() - age)
        )

    def link(self, certificate: pki.IssuedCertificate | None) -> list[dict[str, Any]]:
        """Link kiln7 presenting C{certificate}; return what groundcontrol logged meanwhile."""
        self.presented = (
            None if certificate is None else x509.load_pem_x509_certificate(certificate.pem)
        )
        with capturedLogs() as events:
            self.agent, self.pump = self.fleet.agent("kiln7", self.key)
        return list(events)

    def connected(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The one line groundcontrol logged for the accepted link."""
        lines = [e for e in events if e.get("log_format", "").startswith("device {device} conn")]
        self.assertEqual(len(lines), 1, [e.get("log_format") for e in events])
        return lines[0]

    def test_certificateLinkLogged(self) -> None:
        """
        A link that presents kiln7's certificate is accepted with one info line naming how
        it authenticated and which certificate: serial, SHA-256 fingerprint (OpenSSL's),
        subject and expiry.
        """
        issued = self.issue()
        line = self.connected(self.link(issued))
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual(line["device"], "kiln7")
        self.assertEqual(line["auth"], "certificate")
        self.assertEqual(line["certificateSerial"], issued.serialNumber)
        self.assertEqual(line["certificateFingerprint"], openSSLFingerprint(issued.pem))
        self.assertEqual(line["certificateSubject"], "kiln7")
        self.assertEqual(line["certificateNotAfter"], isoTime(issued.notAfter))
        self.assertIn(f"valid until {isoTime(issued.notAfter)})", formatEvent(line))
        self.assertEqual(line["fingerprint"], issued.fingerprint)
        self.assertNotIn("nearExpiry", line)
        self.assertIsNotNone(self.agent.connection, "the link was not accepted")

    def test_keyLinkLogged(self) -> None:
        """A link with no certificate is accepted with one info line saying: by its key."""
        line = self.connected(self.link(None))
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual(line["auth"], "key")
        self.assertEqual(line["fingerprint"], self.issue().fingerprint)
        self.assertNotIn("certificateSerial", line)

    def test_certificateDueForRenewalWarned(self) -> None:
        """
        A certificate past its renewal time (pki.shouldRenew: a third of its life left; an
        agent renews over its link then) makes the line a warning with the days left; one
        just short of it does not.
        """
        line = self.connected(self.link(self.issue(age=21 * DAY)))
        self.assertEqual(line["log_level"], LogLevel.warn)
        self.assertTrue(line["nearExpiry"])
        self.assertEqual(line["daysLeft"], "9.0")
        self.assertEqual(line["auth"], "certificate")
        self.pump.clientIO.loseConnection()
        self.fleet.flush()
        line = self.connected(self.link(self.issue(age=19 * DAY)))
        self.assertEqual(line["log_level"], LogLevel.info)

    def test_storeKeepsTheLastCertificate(self) -> None:
        """
        After a certificate link the store shows how kiln7 linked and with which
        certificate; a later key-only link says "key" and keeps that certificate.
        """
        issued = self.issue()
        self.link(issued)
        device = resultNow(self.fleet.store.lastLink("kiln7"))
        self.assertEqual(device.auth, "certificate")
        self.assertEqual(
            device.certificate,
            LinkCertificate(
                serialNumber=issued.serialNumber,
                fingerprint=openSSLFingerprint(issued.pem),
                notAfter=issued.notAfter.timestamp(),
                deviceName="kiln7",
            ),
        )
        self.assertEqual(device.certificateAt, T0)
        self.pump.clientIO.loseConnection()
        self.fleet.flush()
        self.clock.advance(60)
        self.link(None)
        later = resultNow(self.fleet.store.lastLink("kiln7"))
        self.assertEqual(later, LastLink("key", device.certificate, T0, "curve25519-sha256"))

    def test_classicalKeyExchangeSaid(self) -> None:
        """
        A link over curve25519-sha256 (Conch's client, as agents older than the hybrid link)
        says its key exchange in its one line, not post-quantum, and the store keeps it
        with the link (device show); so devices still running such agents can be found.
        """
        line = self.connected(self.link(None))
        self.assertEqual((line["kex"], line["postQuantum"]), ("curve25519-sha256", False))
        self.assertTrue(
            formatEvent(line).endswith(
                "(no certificate), key exchange curve25519-sha256 (not post-quantum)"
            ),
            formatEvent(line),
        )
        self.assertEqual(resultNow(self.fleet.store.lastLink("kiln7")).kex, "curve25519-sha256")

    def test_postQuantumKeyExchangeSaid(self) -> None:
        """
        Today's agent (its real link, mlkem768x25519-sha256 where cryptography can) is said
        and stored as post-quantum, in the certificate link's line too.
        """
        if not hybridkex.AVAILABLE:
            raise SkipTest("this cryptography cannot do ML-KEM: the agent offers curve25519")
        issued = self.issue()
        self.presented = x509.load_pem_x509_certificate(issued.pem)
        settings = LinkSettings(
            name="kiln7",
            deviceKey=self.key,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        factory = AgentLinkFactory(settings, self.clock, scriptedSessions(), refuseForwards)  # type: ignore[arg-type]
        with capturedLogs() as events:
            self.fleet.connect(factory)
        line = self.connected(list(events))
        self.assertEqual((line["auth"], line["kex"]), ("certificate", "mlkem768x25519-sha256"))
        self.assertTrue(line["postQuantum"])
        self.assertIn(", key exchange mlkem768x25519-sha256", formatEvent(line))
        self.assertNotIn("not post-quantum", formatEvent(line))
        last = resultNow(self.fleet.store.lastLink("kiln7"))
        self.assertEqual((last.auth, last.kex), ("certificate", "mlkem768x25519-sha256"))

    def test_noExtraStoreCall(self) -> None:
        """
        A certificate link makes exactly the store calls a key-only link makes (the
        certificate rides in recordContact), and still gets its certificate recorded. Each
        is the first link of a fresh fleet, so the fleet's own bookkeeping is the same.
        """
        self.store.calls.clear()
        self.link(None)
        keyOnly = list(self.store.calls)
        self.assertIn("recordContact", keyOnly)
        self.newFleet()
        self.store.calls.clear()
        self.link(self.issue())
        self.assertEqual(self.store.calls, keyOnly)
        self.assertEqual(resultNow(self.fleet.store.lastLink("kiln7")).auth, "certificate")

    def test_certificatesThatDoNotVouchRefusedAndNotRecorded(self) -> None:
        """
        A certificate that does not vouch for kiln7's key is refused at the login, as before,
        with no "connected" line, and leaves the store's record of kiln7's last link alone
        (neither "certificate" nor "key"): one naming kiln8, one naming kiln7 for another
        key, one that is not valid now (TLS let it through on a clock that differs).
        """
        self.link(self.issue())
        before = resultNow(self.fleet.store.lastLink("kiln7"))
        self.assertEqual(before.auth, "certificate")
        otherKey = pki.issueDeviceCertificate(
            self.ca, "kiln7", None, publicLine(newKey()), self.utc(self.clock.seconds())
        )
        refusals = {
            "kiln8's": (self.issue(name="kiln8"), "presented the certificate of {other}"),
            "another key's": (otherKey, None),
            "expired": (self.issue(age=31 * DAY), None),
        }
        for case, (certificate, warning) in refusals.items():
            self.pump.clientIO.loseConnection()
            self.fleet.flush()
            self.clock.advance(60)
            events = self.link(certificate)
            formats = [e.get("log_format", "") for e in events]
            if warning is not None:
                self.assertTrue([f for f in formats if warning in f], case)
            self.assertFalse([f for f in formats if f.startswith("device {device} conn")], case)
            self.assertIsNone(self.agent.connection, case)
            self.assertEqual(resultNow(self.fleet.store.lastLink("kiln7")), before, case)

    def ruleReads(self, finding: Finding, instead: Finding) -> None:
        """Change the certificate rule, for this test: what it finds as C{finding} is C{instead}."""
        judge = self.judge

        def changed(presented: PresentedCertificate, deviceName: str) -> CertificateVerdict:
            verdict = judge(presented, deviceName)
            if verdict.finding is finding:
                return CertificateVerdict(instead, verdict.certificate)
            return verdict

        self.patch(PresentedCertificate, "verdictFor", changed)

    def test_refusalAndRecordReadOneVerdict(self) -> None:
        """
        The login's refusal and the store's record of its link follow one verdict
        (L{groundcontrol.certverdict}), not a rule each. Were the rule to let kiln7's key in
        with its certificate naming kiln8, the login would be accepted and recorded with that
        certificate; were it to refuse kiln7's own certificate, the login would be refused
        and its link left unrecorded. (While the store kept its own copy of the name rule,
        the first link was accepted and its certificate silently not recorded.)
        """
        self.ruleReads(Finding.OTHER_DEVICE, Finding.VOUCHES)
        kiln8s = self.issue(name="kiln8")
        line = self.connected(self.link(kiln8s))
        self.assertEqual((line["device"], line["certificateSubject"]), ("kiln7", "kiln8"))
        self.assertIsNotNone(self.agent.connection)
        recorded = resultNow(self.fleet.store.lastLink("kiln7"))
        self.assertEqual(recorded.auth, "certificate")
        self.assertEqual(recorded.certificate.serialNumber, kiln8s.serialNumber)

        self.ruleReads(Finding.VOUCHES, Finding.OTHER_DEVICE)
        self.pump.clientIO.loseConnection()
        self.fleet.flush()
        self.clock.advance(60)
        events = self.link(self.issue())
        formats = [e.get("log_format", "") for e in events]
        self.assertFalse([f for f in formats if f.startswith("device {device} conn")])
        self.assertIsNone(self.agent.connection)
        self.assertEqual(resultNow(self.fleet.store.lastLink("kiln7")), recorded)
