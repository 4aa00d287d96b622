"""
A server certificate that failed the agent's check for its dates says what they are.

OpenSSL says only "certificate verify failed" when the server's certificate is not valid
at the time this device's clock reads, and the clock note (L{agent.clocksense}) can then
only say what the clock says. With the certificate's own dates beside it ("the server's
certificate is valid from X to Y; this device's clock says Z") the operator sees at once
whether the clock or the certificate is wrong.

OpenSSL sends a fatal alert when the check fails; at that moment the chain the server sent
is known, and if a certificate in it is not valid now, the connection fails with
L{CertificateDatesError} (through the TLS protocol's C{failVerification}, as Twisted's own
host-name check does) instead of the bare OpenSSL error; if its dates are right and its issuer
is not trusted (self-signed, or a CA this device does not know), with
L{tlsreasons.CertificateTrustError} saying which.
"""

from __future__ import annotations

import weakref
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from accesstunnel.timetext import isoTime
from accesstunnel.transports.tlsreasons import CertificateTrustError, trustNamed

__all__ = [
    "CERTIFICATE_DATES",
    "CertificateDatesError",
    "NamingCertificateDates",
    "datesNamed",
]

_log = Logger()

#: OpenSSL's words for a certificate that did not verify, which this text goes on from.
CERTIFICATE_CHECK_FAILED = "certificate verify failed"

#: What the text says of the dates (L{agent.clocksense} looks for it).
CERTIFICATE_DATES = "is valid from"

#: The alert level OpenSSL gives a failed handshake (TLS's "fatal").
_FATAL = 2


class CertificateDatesError(SSL.Error):
    """
    The server's certificate chain failed its check and one of its certificates is not
    valid now: the text names that certificate's dates. In pyOpenSSL's shape (a list of
    (library, function, reason)), so what reads an C{SSL.Error}'s reason (autobahn's
    "SSL error: ...") reads this text; C{str()} is the text alone.
    """

    def __init__(self, text: str) -> None:
        super().__init__([("SSL routines", "", text)])
        self.text = text

    def __str__(self) -> str:
        return self.text


def datesNamed(chain: list[x509.Certificate], now: datetime) -> str | None:
    """
    The failure's text if a certificate in C{chain} (the server's first) is not valid at
    C{now}, else C{None}: the check failed for another reason (issuer, name, signature).
    """
    for depth, certificate in enumerate(chain):
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if start <= now <= end:
            continue
        which = (
            "the server's certificate"
            if depth == 0
            else f"the certificate {certificate.subject.rfc4514_string()} in the server's chain"
        )
        return (
            f"{CERTIFICATE_CHECK_FAILED}: {which} {CERTIFICATE_DATES} "
            f"{isoTime(start.timestamp())} to {isoTime(end.timestamp())}"
        )
    return None


@implementer(IOpenSSLClientConnectionCreator)
class NamingCertificateDates:
    """
    C{creator}'s client connections, whose failed certificate check names the dates of a
    certificate that is not valid now (L{CertificateDatesError}).
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self._creator = creator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        # Weak: the connection keeps this callback, and the TLS protocol the connection.
        protocolRef = weakref.ref(tlsProtocol)

        def alertSent(connection: SSL.Connection, where: int, alert: int) -> None:
            if where & SSL.SSL_CB_WRITE_ALERT != SSL.SSL_CB_WRITE_ALERT or alert >> 8 != _FATAL:
                return
            try:
                chain = connection.get_peer_cert_chain(as_cryptography=True) or []
                failure: SSL.Error | None = None
                text = datesNamed(chain, datetime.now(UTC))
                if text is not None:
                    failure = CertificateDatesError(text)
                elif (trust := trustNamed(connection, chain)) is not None:
                    failure = CertificateTrustError(trust)  # self-signed, or an unknown CA
                tlsProtocol = protocolRef()
                if failure is not None and tlsProtocol is not None:
                    tlsProtocol.failVerification(Failure(failure))
            except Exception:  # an exception in an OpenSSL callback would be lost
                _log.failure("while naming the server certificate's dates")

        connection.set_info_callback(alertSent)
        return connection
