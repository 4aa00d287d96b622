"""Tests for groundcontrol.pki: the fleet CA, device and server certificates, renewal."""

from __future__ import annotations

import os
import stat
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.conch.ssh import keys
from twisted.internet import protocol, ssl
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from accesstunnel.timetext import isoTime
from groundcontrol import pki

NOW = datetime(2031, 5, 17, 12, 0, tzinfo=UTC)


def newDeviceKey() -> keys.Key:
    """A device key as the agent makes it: a Conch ed25519 key."""
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def openSSHLine(key: keys.Key) -> str:
    """The public half as the one-line OpenSSH form the store keeps."""
    return key.public().toString("OPENSSH").decode("ascii")


def openSSLFingerprint(pem: bytes) -> str:
    """The certificate's SHA-256 fingerprint as OpenSSL computes and prints it."""
    return crypto.load_certificate(crypto.FILETYPE_PEM, pem).digest("sha256").decode("ascii")


class CATestCase(SynchronousTestCase):
    """Gives each test a fresh CA in a temporary directory."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.directory)
        self.ca = pki.FleetCA.create(self.directory / "ca", NOW)

    def issue(self, key: keys.Key | None = None, **kwargs: object) -> pki.IssuedCertificate:
        """Issue a device certificate for kiln7 (serial SN-1) on C{key} or a fresh key."""
        arguments: dict[str, object] = {
            "deviceName": "kiln7",
            "serial": "SN-1",
            "publicKey": openSSHLine(key or newDeviceKey()),
            "now": NOW,
        }
        arguments.update(kwargs)
        return pki.issueDeviceCertificate(self.ca, **arguments)  # type: ignore[arg-type]


def _rmtree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


class FleetCATests(CATestCase):
    """Creating and loading the CA."""

    def test_createWritesPrivateKeyAndCACertificate(self) -> None:
        """
        C{create} writes an Ed25519 C{ca.key} readable by the owner only and a self-signed
        C{ca.crt} marked as a CA for ten years.
        """
        keyPath = self.directory / "ca" / pki.CA_KEY_FILE
        self.assertEqual(stat.S_IMODE(keyPath.stat().st_mode), 0o600)
        key = serialization.load_pem_private_key(keyPath.read_bytes(), None)
        self.assertIsInstance(key, ed25519.Ed25519PrivateKey)
        certificate = x509.load_pem_x509_certificate(
            (self.directory / "ca" / pki.CA_CERTIFICATE_FILE).read_bytes()
        )
        self.assertEqual(certificate.issuer, certificate.subject)
        certificate.verify_directly_issued_by(certificate)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertTrue(usage.crl_sign)
        lifetime = certificate.not_valid_after_utc - NOW
        self.assertGreaterEqual(lifetime, timedelta(days=3650))
        self.assertLess(lifetime, timedelta(days=3660))

    def test_loadReturnsTheSameCA(self) -> None:
        """A loaded CA verifies certificates issued by the one that created the files."""
        loaded = pki.FleetCA.load(self.directory / "ca")
        self.assertEqual(loaded.certificatePEM, self.ca.certificatePEM)
        pem = self.issue().pem
        self.assertEqual(pki.verifyDeviceCertificate(loaded, pem, NOW).deviceName, "kiln7")

    def test_createNeverOverwrites(self) -> None:
        """A second C{create} in the same directory fails and leaves the first CA intact."""
        keyPath = self.directory / "ca" / pki.CA_KEY_FILE
        before = (
            keyPath.read_bytes(),
            (self.directory / "ca" / pki.CA_CERTIFICATE_FILE).read_bytes(),
        )
        self.assertRaises(pki.CAExists, pki.FleetCA.create, self.directory / "ca", NOW)
        after = keyPath.read_bytes(), (self.directory / "ca" / pki.CA_CERTIFICATE_FILE).read_bytes()
        self.assertEqual(before, after)

    def test_createRefusesAnExistingKeyAlone(self) -> None:
        """
        A stray C{ca.key} (without a certificate) is not replaced either: it may be the only
        copy of a key a backup restore lost the certificate of.
        """
        directory = self.directory / "stray"
        directory.mkdir()
        (directory / pki.CA_KEY_FILE).write_bytes(b"precious")
        self.assertRaises(pki.CAExists, pki.FleetCA.create, directory, NOW)
        self.assertEqual((directory / pki.CA_KEY_FILE).read_bytes(), b"precious")
        self.assertFalse((directory / pki.CA_CERTIFICATE_FILE).exists())

    def test_loadMissing(self) -> None:
        """Loading from a directory with no CA says to run init."""
        error = self.assertRaises(pki.CANotFound, pki.FleetCA.load, self.directory / "nothing")
        self.assertIn("groundcontrol init", str(error))

    def test_loadHalfMissing(self) -> None:
        """A CA with one of its two files missing is reported as corrupt, naming the file."""
        (self.directory / "ca" / pki.CA_CERTIFICATE_FILE).unlink()
        error = self.assertRaises(pki.CorruptCA, pki.FleetCA.load, self.directory / "ca")
        self.assertIn(pki.CA_CERTIFICATE_FILE, str(error))

    def test_loadCorruptFiles(self) -> None:
        """Garbage in either file is a L{pki.CorruptCA}, not a crash deep in cryptography."""
        for name in (pki.CA_KEY_FILE, pki.CA_CERTIFICATE_FILE):
            directory = self.directory / ("corrupt-" + name)
            pki.FleetCA.create(directory, NOW)
            (directory / name).write_bytes(b"-----BEGIN garbage-----\n")
            self.assertRaises(pki.CorruptCA, pki.FleetCA.load, directory)

    def test_loadMismatchedFiles(self) -> None:
        """A certificate that belongs to another CA's key is refused."""
        other = self.directory / "other"
        pki.FleetCA.create(other, NOW)
        (self.directory / "ca" / pki.CA_CERTIFICATE_FILE).write_bytes(
            (other / pki.CA_CERTIFICATE_FILE).read_bytes()
        )
        error = self.assertRaises(pki.CorruptCA, pki.FleetCA.load, self.directory / "ca")
        self.assertIn("does not belong", str(error))

    def test_loadRefusesAKeyOthersCanRead(self) -> None:
        """Like sshd with host keys, a CA key readable by group or others is refused."""
        os.chmod(self.directory / "ca" / pki.CA_KEY_FILE, 0o640)
        error = self.assertRaises(pki.CorruptCA, pki.FleetCA.load, self.directory / "ca")
        self.assertIn("chmod 600", str(error))

    def test_naiveTimeRefused(self) -> None:
        """A naive datetime is refused: guessing its time zone would shift every expiry."""
        self.assertRaises(
            ValueError, pki.FleetCA.create, self.directory / "naive", datetime(2031, 1, 1)
        )


class DeviceCertificateTests(CATestCase):
    """Issuing and verifying device certificates."""

    def test_roundTrip(self) -> None:
        """A certificate issued for kiln7 verifies and reports name, serial, key and times."""
        key = newDeviceKey()
        issued = self.issue(key)
        result = pki.verifyDeviceCertificate(self.ca, issued.pem, NOW)
        self.assertEqual(
            result,
            pki.DeviceCertificate(
                deviceName="kiln7",
                serial="SN-1",
                publicKeyFingerprint=fingerprint(key),
                notBefore=issued.notBefore,
                notAfter=issued.notAfter,
                serialNumber=issued.serialNumber,
                certificateFingerprint=openSSLFingerprint(issued.pem),
            ),
        )
        self.assertEqual(issued.fingerprint, fingerprint(key))
        self.assertEqual(issued.notAfter, NOW + timedelta(days=30))
        self.assertLessEqual(issued.notBefore, NOW)

    def test_certificateFingerprint(self) -> None:
        """
        The certificate's own fingerprint is OpenSSL's SHA-256 one (what ``openssl x509
        -fingerprint -sha256`` prints for device.crt), and tells a renewal apart: the same
        key certified again has another.
        """
        key = newDeviceKey()
        first, renewed = self.issue(key), self.issue(key)
        verified = [pki.verifyDeviceCertificate(self.ca, c.pem, NOW) for c in (first, renewed)]
        self.assertEqual(verified[0].certificateFingerprint, openSSLFingerprint(first.pem))
        self.assertRegex(verified[0].certificateFingerprint, r"\A([0-9A-F]{2}:){31}[0-9A-F]{2}\Z")
        self.assertNotEqual(verified[0].certificateFingerprint, verified[1].certificateFingerprint)

    def test_certificateContents(self) -> None:
        """
        The certificate carries CN=name, serialNumber=board serial, the device SAN, clientAuth
        only, is not a CA, and has a random 128-bit serial number.
        """
        issued = self.issue()
        certificate = x509.load_pem_x509_certificate(issued.pem)
        subject = certificate.subject
        self.assertEqual(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "kiln7")
        self.assertEqual(subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value, "SN-1")
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.DNSName), ["kiln7.devices.accesstunnel.invalid"]
        )
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertFalse(constraints.value.ca)
        self.assertEqual(int(issued.serialNumber, 16), certificate.serial_number)
        self.assertEqual(len(issued.serialNumber), 32)
        self.assertNotEqual(issued.serialNumber, self.issue().serialNumber)

    def test_withoutSerial(self) -> None:
        """A device with no known board serial gets a certificate without the attribute."""
        result = pki.verifyDeviceCertificate(self.ca, self.issue(serial=None).pem, NOW)
        self.assertIsNone(result.serial)

    def test_oddBoardSerial(self) -> None:
        """
        DMI serials may hold characters PrintableString forbids; they survive the round trip
        (encoded as UTF8String), while control characters and overlong serials are refused.
        """
        result = pki.verifyDeviceCertificate(self.ca, self.issue(serial="To_Be#Filled").pem, NOW)
        self.assertEqual(result.serial, "To_Be#Filled")
        self.assertRaises(ValueError, self.issue, serial="evil\nserial")
        self.assertRaises(ValueError, self.issue, serial="x" * 65)
        self.assertRaises(ValueError, self.issue, serial="")

    def test_openSSHKeyInCertificate(self) -> None:
        """
        The device's OpenSSH ed25519 key is the key in its certificate: the fingerprint of the
        key in the certificate equals the one ssh-keygen would print for the device key, for
        every form the key can be passed in.
        """
        key = newDeviceKey()
        for form in (openSSHLine(key), openSSHLine(key).encode("ascii"), key, key.public()):
            issued = pki.issueDeviceCertificate(self.ca, "kiln7", None, form, NOW)
            certificate = x509.load_pem_x509_certificate(issued.pem)
            embedded = keys.Key.fromString(
                certificate.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                )
            )
            self.assertEqual(fingerprint(embedded), fingerprint(key))

    def test_rsaDeviceKey(self) -> None:
        """A device with an RSA key (older images) gets a certificate for that key too."""
        key = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        issued = self.issue(key)
        result = pki.verifyDeviceCertificate(self.ca, issued.pem, NOW)
        self.assertEqual(result.publicKeyFingerprint, fingerprint(key))

    def test_weakOrUnsupportedKeysRefused(self) -> None:
        """Short RSA keys and non-keys are refused at issue time."""
        short = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=1024))
        self.assertRaises(ValueError, self.issue, short)
        self.assertRaises(ValueError, self.issue, publicKey="ssh-ed25519 notakey")

    def test_invalidDeviceNameRefused(self) -> None:
        """Only well-formed device names are certified."""
        for name in ("Kiln7", "dev_kiln7", "-kiln", "", "a" * 64):
            self.assertRaises(ValueError, self.issue, deviceName=name)

    def test_tamperedRejected(self) -> None:
        """A certificate whose signed content was altered fails with L{pki.BadSignature}."""
        certificate = x509.load_pem_x509_certificate(self.issue().pem)
        der = bytearray(certificate.public_bytes(serialization.Encoding.DER))
        index = der.index(b"kiln7")
        der[index : index + 5] = b"kiln8"
        tampered = x509.load_der_x509_certificate(bytes(der)).public_bytes(
            serialization.Encoding.PEM
        )
        self.assertRaises(pki.BadSignature, pki.verifyDeviceCertificate, self.ca, tampered, NOW)

    def test_otherCARejected(self) -> None:
        """A certificate from another CA is refused, even if that CA has the same name."""
        other = pki.FleetCA.create(self.directory / "other", NOW)
        pem = pki.issueDeviceCertificate(other, "kiln7", None, openSSHLine(newDeviceKey()), NOW)
        self.assertRaises(pki.BadSignature, pki.verifyDeviceCertificate, self.ca, pem.pem, NOW)
        renamed = pki.FleetCA.create(self.directory / "renamed", NOW, commonName="Someone else")
        pem = pki.issueDeviceCertificate(renamed, "kiln7", None, openSSHLine(newDeviceKey()), NOW)
        self.assertRaises(pki.WrongIssuer, pki.verifyDeviceCertificate, self.ca, pem.pem, NOW)

    def test_expiredRejected(self) -> None:
        """
        A certificate is valid through its notAfter and refused a second later; the reason
        (which the refusal's log line gives) writes the time as every log line does.
        """
        issued = self.issue()
        pki.verifyDeviceCertificate(self.ca, issued.pem, issued.notAfter)
        error = self.assertRaises(
            pki.CertificateExpired,
            pki.verifyDeviceCertificate,
            self.ca,
            issued.pem,
            issued.notAfter + timedelta(seconds=1),
        )
        self.assertEqual(str(error), f"expired at {isoTime(issued.notAfter)}")

    def test_notYetValidRejected(self) -> None:
        """
        A certificate is refused before its notBefore, which is a few minutes before issue so
        that a verifier whose clock is slightly behind still accepts it.
        """
        issued = self.issue()
        pki.verifyDeviceCertificate(self.ca, issued.pem, NOW - timedelta(minutes=1))
        error = self.assertRaises(
            pki.CertificateNotYetValid,
            pki.verifyDeviceCertificate,
            self.ca,
            issued.pem,
            issued.notBefore - timedelta(seconds=1),
        )
        self.assertEqual(str(error), f"not valid before {isoTime(issued.notBefore)}")

    def test_malformedRejected(self) -> None:
        """Garbage, empty input and two concatenated certificates are malformed."""
        pem = self.issue().pem
        for bad in (b"", b"hello", pem[:100], pem + pem, "caf\u00e9"):
            self.assertRaises(
                pki.MalformedCertificate, pki.verifyDeviceCertificate, self.ca, bad, NOW
            )

    def test_serverCertificateIsNotADeviceCertificate(self) -> None:
        """
        A server certificate from the same CA cannot be replayed as a device credential, even
        when it is issued for a host name that looks like a device name.
        """
        issued = pki.issueServerCertificate(
            self.ca, ["kiln7"], ed25519.Ed25519PrivateKey.generate(), NOW
        )
        self.assertRaises(
            pki.NotADeviceCertificate, pki.verifyDeviceCertificate, self.ca, issued.pem, NOW
        )
        self.assertRaises(
            pki.NotADeviceCertificate,
            pki.verifyDeviceCertificate,
            self.ca,
            self.ca.certificatePEM,
            NOW,
        )

    def test_lifetimeCappedByCA(self) -> None:
        """No certificate outlives the CA that signed it."""
        issued = self.issue(lifetime=timedelta(days=365 * 20))
        self.assertEqual(issued.notAfter, self.ca.certificate.not_valid_after_utc)


class RenewalTests(SynchronousTestCase):
    """The renewal threshold: a third of the lifetime left."""

    def test_boundaries(self) -> None:
        """For a 30-day certificate, renewal is due at exactly 10 days left, not a second before."""
        notBefore = NOW
        notAfter = NOW + timedelta(days=30)
        due = notAfter - timedelta(days=10)
        self.assertEqual(pki.renewalTime(notBefore, notAfter), due)
        self.assertFalse(pki.shouldRenew(notBefore, notAfter, notBefore))
        self.assertFalse(pki.shouldRenew(notBefore, notAfter, due - timedelta(microseconds=1)))
        self.assertTrue(pki.shouldRenew(notBefore, notAfter, due))
        self.assertTrue(pki.shouldRenew(notBefore, notAfter, notAfter))
        self.assertTrue(pki.shouldRenew(notBefore, notAfter, notAfter + timedelta(days=1)))

    def test_unevenLifetime(self) -> None:
        """
        With a lifetime not divisible by three, renewal is due at the first instant at which a
        third or less remains, and the renewal time and C{shouldRenew} agree.
        """
        notBefore = NOW
        notAfter = NOW + timedelta(microseconds=10)
        due = pki.renewalTime(notBefore, notAfter)
        self.assertTrue(pki.shouldRenew(notBefore, notAfter, due))
        self.assertFalse(pki.shouldRenew(notBefore, notAfter, due - timedelta(microseconds=1)))
        self.assertLessEqual((notAfter - due) * 3, notAfter - notBefore)


class ServerCertificateTests(CATestCase):
    """Server certificates for private deployments."""

    def test_namesAndAddresses(self) -> None:
        """DNS names become dNSName SANs and IP literals iPAddress SANs; usage is serverAuth."""
        issued = pki.issueServerCertificate(
            self.ca,
            ["gc.example.test", "127.0.0.1", "::1"],
            ed25519.Ed25519PrivateKey.generate(),
            NOW,
        )
        certificate = x509.load_pem_x509_certificate(issued.pem)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["gc.example.test"])
        self.assertEqual(
            [str(a) for a in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1", "::1"]
        )
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
        certificate.verify_directly_issued_by(self.ca.certificate)

    def test_badHostnamesRefused(self) -> None:
        """No names, or a name that is neither a host name nor an address, is refused."""
        key = ed25519.Ed25519PrivateKey.generate()
        self.assertRaises(ValueError, pki.issueServerCertificate, self.ca, [], key, NOW)
        for bad in ("", "a b", "x" * 64 + ".test", "-bad.test"):
            self.assertRaises(ValueError, pki.issueServerCertificate, self.ca, [bad], key, NOW)


class TLSTests(CATestCase):
    """The certificates work in a real (in-memory) TLS handshake."""

    def setUp(self) -> None:
        # OpenSSL checks validity against the wall clock, so this CA is issued for now.
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.directory)
        self.now = datetime.now(UTC)
        self.ca = pki.FleetCA.create(self.directory / "ca", self.now)
        serverKey = ed25519.Ed25519PrivateKey.generate()
        issued = pki.issueServerCertificate(
            self.ca, ["groundcontrol.test", "127.0.0.1"], serverKey, self.now
        )
        self.serverCertificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate.loadPEM(issued.pem),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(serverKey)),
        )
        self.trustRoot = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(self.ca.certificatePEM)]
        )

    def deviceCertificate(
        self, deviceKey: keys.Key, ca: pki.FleetCA | None = None
    ) -> ssl.PrivateCertificate:
        """
        The device's TLS client credential: its certificate plus its OpenSSH private key, the
        same file the agent authenticates with on SSH links.
        """
        issued = pki.issueDeviceCertificate(
            ca or self.ca, "kiln7", "SN-1", openSSHLine(deviceKey), self.now
        )
        privateKey = serialization.load_ssh_private_key(
            deviceKey.toString("OPENSSH", subtype="v1"), None
        )
        return ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate.loadPEM(issued.pem),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(privateKey)),  # type: ignore[arg-type]
        )

    def handshake(
        self, clientCertificate: ssl.PrivateCertificate
    ) -> tuple[TLSMemoryBIOProtocol, TLSMemoryBIOProtocol]:
        """Run a mutual-TLS handshake in memory; return the (client, server) TLS protocols."""
        serverOptions = ssl.CertificateOptions(
            privateKey=self.serverCertificate.privateKey.original,
            certificate=self.serverCertificate.original,
            trustRoot=self.trustRoot,
        )
        clientOptions = ssl.optionsForClientTLS(
            "groundcontrol.test", trustRoot=self.trustRoot, clientCertificate=clientCertificate
        )
        received: list[bytes] = []

        lost: list[Failure] = []

        class Receiver(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                lost.append(reason)

        class Sender(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"SSH-2.0-agent\r\n")  # type: ignore[union-attr]

        # TLS transports batch small writes until the next reactor turn: give them the
        # pump's clock, or they would wait for a global reactor that never runs.
        clock = Clock()
        serverFactory = TLSMemoryBIOFactory(
            serverOptions, False, protocol.Factory.forProtocol(Receiver), clock=clock
        )
        clientFactory = TLSMemoryBIOFactory(
            clientOptions, True, protocol.Factory.forProtocol(Sender), clock=clock
        )
        client = clientFactory.buildProtocol(iosim.FakeAddress())
        server = serverFactory.buildProtocol(iosim.FakeAddress())
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=clock,
        )
        pump.flush()
        self.received = b"".join(received)
        self.serverLost = lost
        return client, server

    def test_mutualTLSWithDeviceCertificate(self) -> None:
        """
        A device presenting its fleet certificate with its OpenSSH key completes a mutual TLS
        handshake with a server trusting the fleet CA; the server sees the certificate, and
        verifying it yields the fingerprint of the device's SSH key.
        """
        deviceKey = newDeviceKey()
        _client, server = self.handshake(self.deviceCertificate(deviceKey))
        self.assertEqual(self.received, b"SSH-2.0-agent\r\n")
        peer = server.getPeerCertificate()
        pem = peer.to_cryptography().public_bytes(serialization.Encoding.PEM)
        result = pki.verifyDeviceCertificate(self.ca, pem, self.now)
        self.assertEqual(result.deviceName, "kiln7")
        self.assertEqual(result.publicKeyFingerprint, fingerprint(deviceKey))

    def test_rsaDeviceKeyHandshake(self) -> None:
        """An RSA device key signs the TLS handshake as well as an ed25519 one does."""
        deviceKey = keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        _client, _server = self.handshake(self.deviceCertificate(deviceKey))
        self.assertEqual(self.received, b"SSH-2.0-agent\r\n")

    def test_otherCAClientCertificateRefused(self) -> None:
        """A client certificate from another CA fails the handshake: no data gets through."""
        other = pki.FleetCA.create(self.directory / "other", self.now, commonName="Other CA")
        _client, _server = self.handshake(self.deviceCertificate(newDeviceKey(), ca=other))
        self.assertEqual(self.received, b"")
        [reason] = self.serverLost
        reason.trap(SSL.Error)
        self.assertIn("certificate verify failed", str(reason.value))
