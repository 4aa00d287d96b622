"""
TLS for the agent link: the server's context (fleet client certificates optional) and the
agent's (service-identity checks, its fleet certificate when it has one).

Why optional client certificates: a brand-new device has no certificate yet and must still
reach groundcontrol to queue as pending; so the TLS layer asks for a certificate, refuses one
that does not verify (wrong CA, expired, revoked), and lets the SSH layer decide what a
connection without one may do. The verified certificate reaches the SSH layer as the
transport's C{getPeerCertificate()} (see L{peerCertificate}).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

from accesstunnel.keys import certificateSerial
from accesstunnel.layers import transportLayers
from accesstunnel.transports.tlsdates import NamingCertificateDates

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "TLSConfigError",
    "clientCreator",
    "peerCertificate",
    "serverContextFactory",
]

_log = Logger()

#: Nothing older than TLS 1.2 is offered or accepted.
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """A certificate, key or CA file is missing or unusable."""


@attrs.frozen
class ServerTLS:
    """
    What groundcontrol's C{tls://} and C{wss://} listeners need.

    @ivar certificateFile: PEM server certificate, optionally followed by its chain.
    @ivar keyFile: PEM private key of the server certificate.
    @ivar clientCAFile: the fleet CA (C{DATA/ca/ca.crt}); client certificates are verified
        against it. C{None}: client certificates are not requested at all.
    @ivar isRevoked: called with a verified client certificate's serial number (lower-case
        hex, as L{groundcontrol.pki} prints it); C{True} refuses the handshake. It runs inside
        the handshake, so it must answer from memory (a set the server keeps current).
    """

    certificateFile: Path = attrs.field(converter=Path)
    keyFile: Path = attrs.field(converter=Path)
    clientCAFile: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    isRevoked: Callable[[str], bool] | None = attrs.field(default=None, eq=False)


@attrs.frozen
class ClientTLS:
    """
    What the agent needs to dial C{tls://} and C{wss://}.

    @ivar caFile: a pinned CA (private deployments); C{None} trusts the system roots.
    @ivar clientCertificateFile: the device's fleet certificate (PEM); presented when the
        file exists, so a device that has none yet still connects (and waits as pending).
    @ivar clientKeyFile: the device's private key: an OpenSSH key file (the device's one
        key, see L{groundcontrol.pki}) or PEM.
    """

    caFile: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    clientCertificateFile: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    clientKeyFile: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def _certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(path, what))
    except ValueError as e:
        raise TLSConfigError(f"{what} {path} is not a PEM certificate: {e}") from None
    return certificates


def loadPrivateKey(path: Path) -> crypto.PKey:
    """
    A private key from an OpenSSH or PEM file, as pyOpenSSL wants it.

    The device's TLS key is its SSH key (one secret per device), which the agent stores in
    OpenSSH format; TLS libraries only read PEM/DER, hence the conversion.
    """
    data = _read(path, "private key")
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key: Any = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
        return crypto.PKey.from_cryptography_key(key)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{path} is not a usable unencrypted private key: {e}") from None


def _openSSLCertificate(certificate: x509.Certificate) -> ssl.Certificate:
    return ssl.Certificate(crypto.X509.from_cryptography(certificate))


def _trustRoot(caFile: Path) -> Any:
    return ssl.trustRootFromCertificates(
        [_openSSLCertificate(c) for c in _certificates(caFile, "CA file")]
    )


class _OptionalClientCertificateOptions(ssl.CertificateOptions):
    """
    L{CertificateOptions} that verify a client certificate if one is sent, without requiring
    one (Twisted sets FAIL_IF_NO_PEER_CERT whenever it verifies), and check revocation.
    """

    def __init__(self, isRevoked: Callable[[str], bool] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._isRevoked = isRevoked
        self._adjusted = False

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        if not self._adjusted:
            self._adjusted = True
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, self._verify)
        return context

    def _verify(
        self, connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            _log.info(
                "refused a client certificate: {error} (depth {depth})",
                error=crypto.X509StoreContextError.__name__ if errno else "unverified",
                errno=errno,
                depth=depth,
            )
            return False
        if depth == 0 and self._isRevoked is not None:
            serial = certificateSerial(certificate.get_serial_number())
            if self._isRevoked(serial):
                _log.warn("refused revoked client certificate {serial}", serial=serial)
                return False
        return True


def serverContextFactory(settings: ServerTLS) -> ssl.CertificateOptions:
    """The context factory of a C{tls://} or C{wss://} listener."""
    chain = _certificates(settings.certificateFile, "server certificate")
    if not chain:
        raise TLSConfigError(f"no certificate in {settings.certificateFile}")
    key = loadPrivateKey(settings.keyFile)
    options: dict[str, Any] = {
        "privateKey": key,
        "certificate": crypto.X509.from_cryptography(chain[0]),
        "extraCertChain": [crypto.X509.from_cryptography(c) for c in chain[1:]],
        "raiseMinimumTo": MINIMUM_TLS,
    }
    if settings.clientCAFile is None:
        return ssl.CertificateOptions(**options)
    return _OptionalClientCertificateOptions(
        settings.isRevoked, trustRoot=_trustRoot(settings.clientCAFile), **options
    )


def wouldPresentCertificate(settings: ClientTLS | None) -> bool:
    """Whether a connection with C{settings} would offer a client certificate now."""
    return settings is not None and _usableCertificate(settings) is not None


def _usableCertificate(settings: ClientTLS, checkExpiry: bool = True) -> x509.Certificate | None:
    """
    The device certificate to present, if there is one and it has not expired: an
    expired certificate is refused by the server, and a device offline past expiry must
    still be able to come back (as pending, by its key).
    """
    certFile, keyFile = settings.clientCertificateFile, settings.clientKeyFile
    if certFile is None or keyFile is None or not certFile.exists():
        return None
    certificates = _certificates(certFile, "client certificate")
    if not certificates:
        return None
    if checkExpiry and certificates[0].not_valid_after_utc <= datetime.now(UTC):
        return None
    return certificates[0]


def clientCreator(
    hostname: str,
    settings: ClientTLS | None,
    presentCertificate: bool = True,
    presentExpired: bool = False,
) -> IOpenSSLClientConnectionCreator:
    """
    The agent's TLS options for C{hostname}: the server is verified by name with
    service-identity (an IP literal by address) against the pinned CA or the system roots.

    Built for each attempt, so a certificate renewed on disk is presented at the next
    connection without a restart.
    """
    settings = settings or ClientTLS()
    trustRoot = _trustRoot(settings.caFile) if settings.caFile is not None else None
    clientCertificate = None
    certificate = (
        _usableCertificate(settings, checkExpiry=not presentExpired) if presentCertificate else None
    )
    if certificate is not None:
        assert settings.clientKeyFile is not None
        clientCertificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            _openSSLCertificate(certificate), ssl.KeyPair(loadPrivateKey(settings.clientKeyFile))
        )
    # A server certificate that fails the check for its dates says them (tlsdates).
    return NamingCertificateDates(
        ssl.optionsForClientTLS(
            hostname,
            trustRoot=trustRoot,
            clientCertificate=clientCertificate,
            extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS},
        )
    )


def peerCertificate(transport: Any) -> x509.Certificate | None:
    """
    The client certificate that TLS verified on the connection under C{transport}, if any.

    Walks down the transport chain (SSH's transport may be a WebSocket adapter over TLS), so
    the SSH layer can ask without knowing which transport it runs on. C{None} when the link
    has no TLS or the peer sent no certificate.
    """
    for layer in transportLayers(transport):
        getter = getattr(layer, "getPeerCertificate", None)
        if getter is not None:
            try:
                certificate = getter()
            except SSL.Error:
                return None
            if certificate is None:
                return None
            if isinstance(certificate, crypto.X509):
                return certificate.to_cryptography()
            return certificate  # type: ignore[no-any-return]
    return None
