"""The fleet CA: creating and loading it, issuing and checking device and server certificates.

A device's certificate is the fleet's signed statement "this public key belongs to device NAME
with board serial S, until T". The key in it is the device's SSH key: the device keeps ONE
private key, which authenticates it on plain SSH links and signs its TLS handshakes on TLS
links, so there is never a second secret to lose, back up or rotate on an unattended box.

Everything here is a pure function over C{cryptography}: no reactor, no store, no clock of its
own (callers pass C{now}, a timezone-aware C{datetime}; with a Twisted clock that is
C{datetime.fromtimestamp(clock.seconds(), UTC)}). Revocation is not decided here: the store
knows which serial numbers are revoked, and callers check L{DeviceCertificate.serialNumber}
against it after L{verifyDeviceCertificate} has said the certificate itself is genuine.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeAlias

from attrs import frozen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.name import _ASN1Type  # NameAttribute's only string-type switch
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.conch.ssh import keys

from accesstunnel.keys import certificateSerial, fingerprint
from accesstunnel.names import isValidDeviceName
from accesstunnel.statefiles import createAtomically
from accesstunnel.timetext import isoTime

__all__ = [
    "CA_CERTIFICATE_FILE",
    "CA_KEY_FILE",
    "DEVICE_DNS_SUFFIX",
    "BadSignature",
    "CAError",
    "CAExists",
    "CANotFound",
    "CertificateError",
    "CertificateExpired",
    "CertificateNotYetValid",
    "CorruptCA",
    "DeviceCertificate",
    "FleetCA",
    "IssuedCertificate",
    "MalformedCertificate",
    "NotADeviceCertificate",
    "WrongIssuer",
    "certificateFingerprint",
    "deviceDNSName",
    "issueDeviceCertificate",
    "issueServerCertificate",
    "renewalTime",
    "shouldRenew",
    "verifyDeviceCertificate",
]

CA_KEY_FILE = "ca.key"
CA_CERTIFICATE_FILE = "ca.crt"

#: Device certificates name the device in a dNSName SAN under this suffix. Many TLS tools
#: (openssl, browsers, service-identity) ignore the subject CN and only read SANs, so the name
#: belongs there too; ``.invalid`` is reserved (RFC 6761) and never resolves, so a device
#: certificate can never be mistaken for, or used as, the certificate of a real host. It is
#: the CN that is authoritative; the SAN must agree with it.
DEVICE_DNS_SUFFIX = ".devices.accesstunnel.invalid"

DEFAULT_DEVICE_LIFETIME = timedelta(days=30)
DEFAULT_SERVER_LIFETIME = timedelta(days=365)
CA_LIFETIME = timedelta(days=3652)

#: Certificates start this long before the moment of issue, so a verifier whose clock is a
#: little behind the issuer's (several groundcontrol nodes, a device's NTP still settling)
#: does not reject a certificate issued a second ago as "not yet valid".
BACKDATE = timedelta(minutes=5)

#: Smallest RSA device or server key accepted; anything shorter is breakable or close to it.
MIN_RSA_BITS = 2048

#: X.520 caps serialNumber at 64 characters.
_MAX_BOARD_SERIAL = 64
#: Characters allowed in an ASN.1 PrintableString; other serials are encoded as UTF8String.
_PRINTABLE_STRING = re.compile(r"\A[A-Za-z0-9 '()+,\-./:=?]*\Z")

PublicKey: TypeAlias = ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey: TypeAlias = (
    ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
)


# --- errors ---------------------------------------------------------------------------------


class CAError(Exception):
    """The fleet CA cannot be created or loaded."""


class CANotFound(CAError):  # noqa: N818 - reads as a state, like the store's errors
    """There is no fleet CA in the directory (``groundcontrol init`` has not made one)."""


class CAExists(CAError):  # noqa: N818
    """A fleet CA is already there; creating another would orphan every issued certificate."""


class CorruptCA(CAError):  # noqa: N818
    """The CA files exist but are unreadable, unparseable, unsafe or do not belong together."""


class CertificateError(Exception):
    """A device certificate is not acceptable; the subclass says why."""


class MalformedCertificate(CertificateError):  # noqa: N818
    """Not a single well-formed PEM X.509 certificate of the shape this CA issues."""


class WrongIssuer(CertificateError):  # noqa: N818
    """Issued by some other CA (or claims to be)."""


class BadSignature(CertificateError):  # noqa: N818
    """Names our CA as issuer but the signature does not verify: forged or tampered."""


class CertificateExpired(CertificateError):  # noqa: N818
    """Past its notAfter."""


class CertificateNotYetValid(CertificateError):  # noqa: N818
    """Before its notBefore."""


class NotADeviceCertificate(CertificateError):  # noqa: N818
    """Genuine, but not a device certificate (a server or CA certificate of the same CA)."""


# --- values ---------------------------------------------------------------------------------


@frozen
class IssuedCertificate:
    """
    A certificate just issued, with what the store records about it.

    @ivar pem: the certificate, PEM-encoded, to hand to the device.
    @ivar serialNumber: the certificate's serial number in lower-case hex, the handle for
        revocation.
    @ivar fingerprint: the OpenSSH fingerprint (``SHA256:...``) of the certified public key,
        the same string the store keys devices by.
    """

    pem: bytes
    serialNumber: str
    notBefore: datetime
    notAfter: datetime
    fingerprint: str


@frozen
class DeviceCertificate:
    """
    What a verified device certificate says.

    @ivar deviceName: the device's routing name (without ``dev_``).
    @ivar serial: the board serial number the certificate binds, or C{None}.
    @ivar publicKeyFingerprint: the OpenSSH fingerprint of the certified key; the caller must
        check that the peer proved possession of this key (TLS does, for a client certificate).
    @ivar serialNumber: the certificate's serial number in lower-case hex.
    @ivar certificateFingerprint: the SHA-256 fingerprint of the certificate itself, as
        L{certificateFingerprint} writes it: what an operator compares with the file on the
        device, since one key may be certified many times (every renewal).
    """

    deviceName: str
    serial: str | None
    publicKeyFingerprint: str
    notBefore: datetime
    notAfter: datetime
    serialNumber: str
    certificateFingerprint: str


# --- the CA ---------------------------------------------------------------------------------


@frozen
class FleetCA:
    """
    The fleet's certificate authority: a private key and its self-signed certificate.

    The key file is created once and never overwritten: every certificate in the field chains
    to it, and replacing it silently would lock the whole fleet out at the next handshake.
    """

    certificate: x509.Certificate
    privateKey: PrivateKey

    @property
    def certificatePEM(self) -> bytes:
        """The CA certificate in PEM: the trust root devices and TLS peers are given."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(
        cls,
        directory: Path,
        now: datetime,
        commonName: str = "Access Tunnel fleet CA",
    ) -> FleetCA:
        """
        Make a new CA in C{directory}: C{ca.key} (0600) and C{ca.crt}.

        @raise CAExists: if either file is already there. The key is opened with C{O_EXCL}, so
            two concurrent C{init}s cannot both win.
        """
        now = _utc(now)
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        keyPath = directory / CA_KEY_FILE
        certPath = directory / CA_CERTIFICATE_FILE
        if certPath.exists():
            raise CAExists(f"{certPath} already exists; refusing to replace the fleet CA")

        privateKey = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
        publicKey = privateKey.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(publicKey)
            .serial_number(_randomSerial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _keyUsage(keyCertSign=True, crlSign=True, digitalSignature=False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
            .sign(privateKey, None)
        )

        keyPEM = privateKey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _writeExclusive(keyPath, keyPEM, 0o600)
        except FileExistsError:
            raise CAExists(f"{keyPath} already exists; refusing to replace the fleet CA") from None
        try:
            _writeExclusive(certPath, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        except BaseException:
            # Without its certificate the key we just made is useless and would block the
            # next init: it is ours (O_EXCL), so take it back.
            keyPath.unlink(missing_ok=True)
            raise
        return cls(certificate=certificate, privateKey=privateKey)

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        """
        Load the CA from C{directory}.

        @raise CANotFound: if neither file is there.
        @raise CorruptCA: if one is missing, either is unparseable, the key is readable by
            group or others (as sshd refuses such host keys), the certificate is not a CA
            certificate, or the key and certificate do not belong together.
        """
        directory = Path(directory)
        keyPath = directory / CA_KEY_FILE
        certPath = directory / CA_CERTIFICATE_FILE
        haveKey, haveCert = keyPath.exists(), certPath.exists()
        if not haveKey and not haveCert:
            raise CANotFound(f"no fleet CA in {directory} (run 'groundcontrol init')")
        if not haveKey:
            raise CorruptCA(f"{certPath} exists but {keyPath} is missing")
        if not haveCert:
            raise CorruptCA(f"{keyPath} exists but {certPath} is missing")

        try:
            mode = keyPath.stat().st_mode & 0o777
            keyBytes = keyPath.read_bytes()
            certBytes = certPath.read_bytes()
        except OSError as e:
            raise CorruptCA(f"cannot read the fleet CA in {directory}: {e}") from None
        if mode & 0o077:
            raise CorruptCA(
                f"{keyPath} is accessible to group or others (mode {mode:04o}); chmod 600 it"
            )
        try:
            privateKey = serialization.load_pem_private_key(keyBytes, password=None)
        except (ValueError, TypeError) as e:
            raise CorruptCA(f"{keyPath} is not an unencrypted PEM private key: {e}") from None
        if not isinstance(
            privateKey,
            ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey
            | rsa.RSAPrivateKey
            | ec.EllipticCurvePrivateKey,
        ):
            raise CorruptCA(f"{keyPath} holds an unsupported key type")
        try:
            certificate = x509.load_pem_x509_certificate(certBytes)
        except ValueError as e:
            raise CorruptCA(f"{certPath} is not a PEM certificate: {e}") from None
        if _publicBytes(certificate.public_key()) != _publicBytes(privateKey.public_key()):
            raise CorruptCA(f"{certPath} does not belong to {keyPath}")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except (x509.ExtensionNotFound, ValueError):
            raise CorruptCA(f"{certPath} is not a CA certificate") from None
        if not constraints.value.ca:
            raise CorruptCA(f"{certPath} is not a CA certificate")
        return cls(certificate=certificate, privateKey=privateKey)


# --- issuing --------------------------------------------------------------------------------


def deviceDNSName(deviceName: str) -> str:
    """The dNSName SAN a device certificate carries: C{NAME} + L{DEVICE_DNS_SUFFIX}."""
    return deviceName + DEVICE_DNS_SUFFIX


def issueDeviceCertificate(
    ca: FleetCA,
    deviceName: str,
    serial: str | None,
    publicKey: PublicKey | keys.Key | str | bytes,
    now: datetime,
    lifetime: timedelta = DEFAULT_DEVICE_LIFETIME,
) -> IssuedCertificate:
    """
    Certify that C{publicKey} belongs to device C{deviceName} (board C{serial}) for C{lifetime}.

    The certificate is a TLS client certificate (extendedKeyUsage clientAuth only), so it can
    never serve as a server certificate or sign other certificates.

    @param publicKey: the device's SSH key: an Ed25519 or RSA (>= 2048 bits) key object, a
        Conch L{keys.Key}, or an OpenSSH public key line.
    @raise ValueError: for an invalid device name or serial, or an unsupported key.
    """
    if not isValidDeviceName(deviceName):
        raise ValueError(f"invalid device name {deviceName!r}")
    key = _devicePublicKey(publicKey)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, deviceName)]
    if serial is not None:
        attributes.append(_boardSerialAttribute(serial))
    builder = _leafBuilder(ca, x509.Name(attributes), key, now, lifetime).add_extension(
        x509.SubjectAlternativeName([x509.DNSName(deviceDNSName(deviceName))]), critical=False
    )
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    return _sign(ca, builder, key)


def issueServerCertificate(
    ca: FleetCA,
    hostnames: Iterable[str],
    key: PublicKey | PrivateKey | ec.EllipticCurvePublicKey,
    now: datetime,
    lifetime: timedelta = DEFAULT_SERVER_LIFETIME,
) -> IssuedCertificate:
    """
    Issue a TLS server certificate for groundcontrol's C{tls://} listener in a private
    deployment (or a test), where agents pin the fleet CA instead of trusting public roots.

    @param hostnames: DNS names and IP address literals (C{127.0.0.1}, C{::1}); each becomes a
        dNSName or iPAddress SAN, and the first one (if short enough) the subject CN.
    @param key: the server's key; a private key is accepted for convenience and only its
        public half is used.
    @raise ValueError: if there are no hostnames, one is not a plausible host name, or the key
        is unsupported.
    """
    names = list(hostnames)
    if not names:
        raise ValueError("a server certificate needs at least one host name")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(_checkHostname(name)))
    publicKey = _serverPublicKey(key)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, names[0])] if len(names[0]) <= 64 else []
    )
    builder = (
        _leafBuilder(ca, subject, publicKey, now, lifetime)
        .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return _sign(ca, builder, publicKey)


# --- verifying ------------------------------------------------------------------------------


def verifyDeviceCertificate(ca: FleetCA, pem: bytes | str, now: datetime) -> DeviceCertificate:
    """
    Check that C{pem} is a device certificate this CA issued and that it is valid at C{now}.

    This proves the binding (name, serial, key) is genuine and current; it does not prove the
    peer holds the key (the TLS handshake or SSH authentication does) and it does not know
    about revocation (the store does).

    @raise CertificateError: a subclass saying what is wrong.
    """
    now = _utc(now)
    if isinstance(pem, str):
        pem = pem.encode("ascii", "replace")
    if pem.count(b"-----BEGIN CERTIFICATE-----") != 1:
        raise MalformedCertificate("expected exactly one PEM certificate")
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise MalformedCertificate(f"unparseable certificate: {e}") from None

    if certificate.issuer != ca.certificate.subject:
        raise WrongIssuer(f"issued by {certificate.issuer.rfc4514_string()!r}, not this fleet CA")
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except InvalidSignature:
        raise BadSignature("the CA's signature on the certificate does not verify") from None
    except (ValueError, TypeError) as e:
        raise BadSignature(f"the certificate's signature cannot be checked: {e}") from None

    notBefore = certificate.not_valid_before_utc
    notAfter = certificate.not_valid_after_utc
    if now < notBefore:
        raise CertificateNotYetValid(f"not valid before {isoTime(notBefore)}")
    if now > notAfter:
        raise CertificateExpired(f"expired at {isoTime(notAfter)}")

    try:
        extensions = certificate.extensions
        usage = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise NotADeviceCertificate("missing extendedKeyUsage or basicConstraints") from None
    except ValueError as e:
        raise MalformedCertificate(f"bad extensions: {e}") from None
    if constraints.ca or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise NotADeviceCertificate("not a device (TLS client) certificate")

    deviceName = _singleAttribute(certificate.subject, NameOID.COMMON_NAME, "commonName")
    if deviceName is None or not isValidDeviceName(deviceName):
        raise NotADeviceCertificate("the subject is not a device name")
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None and san.get_values_for_type(x509.DNSName) != [deviceDNSName(deviceName)]:
        raise MalformedCertificate("the subjectAltName does not match the device name")
    serial = _singleAttribute(certificate.subject, NameOID.SERIAL_NUMBER, "serialNumber")

    publicKey = certificate.public_key()
    if not isinstance(publicKey, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise NotADeviceCertificate("the certified key is not an Ed25519 or RSA key")
    return DeviceCertificate(
        deviceName=deviceName,
        serial=serial,
        publicKeyFingerprint=fingerprint(keys.Key(publicKey)),
        notBefore=notBefore,
        notAfter=notAfter,
        serialNumber=certificateSerial(certificate.serial_number),
        certificateFingerprint=certificateFingerprint(certificate),
    )


def certificateFingerprint(certificate: x509.Certificate) -> str:
    """
    The SHA-256 fingerprint of C{certificate}'s DER encoding in upper-case hex pairs joined by
    colons: what C{openssl x509 -noout -fingerprint -sha256 -in device.crt} prints after
    C{sha256 Fingerprint=}, so an operator can match a logged certificate to a file.
    """
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


# --- renewal --------------------------------------------------------------------------------


def renewalTime(notBefore: datetime, notAfter: datetime) -> datetime:
    """
    When a certificate becomes due for renewal: once a third of its lifetime is left.

    Agents can schedule a timer for this instead of polling L{shouldRenew}.
    """
    return notAfter - (notAfter - notBefore) // 3


def shouldRenew(notBefore: datetime, notAfter: datetime, now: datetime) -> bool:
    """
    Whether a certificate should be renewed now: true once a third of its lifetime or less
    remains (10 days of a 30-day certificate), which leaves a device that is offline for a
    while several days of retries before it would come back as pending.
    """
    return now >= renewalTime(notBefore, notAfter)


# --- helpers --------------------------------------------------------------------------------


def _utc(now: datetime) -> datetime:
    """C{now} in UTC; a naive datetime is an error, since guessing its zone shifts expiries."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _randomSerial() -> int:
    """
    A random, positive 128-bit certificate serial (RFC 5280 allows up to 20 octets).

    Unpredictable serials stop an attacker from steering the bytes a CA signs.
    """
    while True:
        serial = int.from_bytes(os.urandom(16), "big")
        if serial:
            return serial


def _writeExclusive(path: Path, data: bytes, mode: int) -> None:
    """
    Write a new file with C{mode}, whole or not at all; C{FileExistsError} if it exists,
    never a replacement.
    """
    if not createAtomically(path, data, mode):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))


def _publicBytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _keyUsage(
    *, keyCertSign: bool = False, crlSign: bool = False, digitalSignature: bool = True
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digitalSignature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=keyCertSign,
        crl_sign=crlSign,
        encipher_only=False,
        decipher_only=False,
    )


def _strongEnough(key: rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    """The RSA key itself, or L{ValueError} when it is shorter than L{MIN_RSA_BITS}."""
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
    return key


def _devicePublicKey(publicKey: PublicKey | keys.Key | str | bytes) -> PublicKey:
    """Accept the device key in the forms callers hold it and reject what TLS cannot use."""
    if isinstance(publicKey, str | bytes):
        try:
            publicKey = keys.Key.fromString(
                publicKey.encode("ascii") if isinstance(publicKey, str) else publicKey
            )
        except (keys.BadKeyError, ValueError, UnicodeEncodeError) as e:
            raise ValueError(f"not an OpenSSH public key: {e}") from None
    if isinstance(publicKey, keys.Key):
        # Conch no longer exposes the wrapped key object; go through the OpenSSH encoding.
        publicKey = serialization.load_ssh_public_key(publicKey.public().toString("OPENSSH"))  # type: ignore[assignment]
    if isinstance(publicKey, ed25519.Ed25519PublicKey):
        return publicKey
    if isinstance(publicKey, rsa.RSAPublicKey):
        return _strongEnough(publicKey)
    raise ValueError(f"device keys must be Ed25519 or RSA, not {type(publicKey).__name__}")


def _serverPublicKey(
    key: PublicKey | PrivateKey | ec.EllipticCurvePublicKey,
) -> PublicKey | ec.EllipticCurvePublicKey:
    if isinstance(
        key,
        ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    ):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        return _strongEnough(key)
    raise ValueError(f"unsupported server key type {type(key).__name__}")


def _checkHostname(name: str) -> str:
    """A DNS name fit for a SAN: ASCII (IDNA A-labels), sane length, an optional ``*.``."""
    label = re.compile(r"\A(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
    bare = name[2:] if name.startswith("*.") else name
    bare = bare.rstrip(".")
    if not bare or len(bare) > 253 or not all(label.match(part) for part in bare.split(".")):
        raise ValueError(f"not a host name or IP address: {name!r}")
    return name.lower()


def _boardSerialAttribute(serial: str) -> x509.NameAttribute:
    """
    The board serial as the X.520 serialNumber attribute.

    It comes from device firmware (DMI, device tree, machine-id), so it is checked rather than
    trusted: no control characters, at most 64 characters. PrintableString where it fits
    (what X.520 prefers), UTF8String otherwise (``_`` or ``#`` appear in DMI serials).
    """
    if not serial or len(serial) > _MAX_BOARD_SERIAL or not serial.isprintable():
        raise ValueError(f"invalid board serial {serial[:80]!r}")
    if _PRINTABLE_STRING.match(serial):
        return x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)
    return x509.NameAttribute(NameOID.SERIAL_NUMBER, serial, _ASN1Type.UTF8String)


def _singleAttribute(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str | None:
    """The attribute's value if it occurs exactly once; two CNs would make the name ambiguous."""
    values = name.get_attributes_for_oid(oid)
    if not values:
        return None
    if len(values) > 1:
        raise MalformedCertificate(f"more than one {label} in the subject")
    value = values[0].value
    if not isinstance(value, str):
        raise MalformedCertificate(f"the {label} is not a string")
    return value


def _leafBuilder(
    ca: FleetCA,
    subject: x509.Name,
    publicKey: PublicKey | ec.EllipticCurvePublicKey,
    now: datetime,
    lifetime: timedelta,
) -> x509.CertificateBuilder:
    """The fields every certificate the CA issues shares; expiry is capped at the CA's own."""
    now = _utc(now)
    if lifetime <= timedelta(0):
        raise ValueError("lifetime must be positive")
    notAfter = min(now + lifetime, ca.certificate.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(publicKey)
        .serial_number(_randomSerial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(notAfter)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_keyUsage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.certificate.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )


def _signatureHash(key: PrivateKey) -> hashes.SHA256 | None:
    """EdDSA keys hash internally (C{None}); RSA and ECDSA CA keys sign SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _sign(
    ca: FleetCA,
    builder: x509.CertificateBuilder,
    publicKey: PublicKey | ec.EllipticCurvePublicKey,
) -> IssuedCertificate:
    certificate = builder.sign(ca.privateKey, _signatureHash(ca.privateKey))
    return IssuedCertificate(
        pem=certificate.public_bytes(serialization.Encoding.PEM),
        serialNumber=certificateSerial(certificate.serial_number),
        notBefore=certificate.not_valid_before_utc,
        notAfter=certificate.not_valid_after_utc,
        fingerprint=fingerprint(keys.Key(publicKey)),
    )
