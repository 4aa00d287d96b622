"""
Why a tls:// or wss:// link failed, in words an operator can act on.

OpenSSL's words reached the agent's log as they came: C{[('SSL routines', '',
'certificate verify failed')]} for a self-signed server certificate and for one from a CA
the device does not trust alike, C{tlsv1 alert unknown ca} for a server that did not take
the device's certificate, C{wrong version number} for a port that does not speak TLS, and
service_identity's C{VerificationError(errors=[DNSMismatch(...)])} for a certificate made
out to another name; over wss:// autobahn made them C{SSL error: ... (in )}, or dropped the
reason altogether (C{peer dropped the TCP connection ...}). Each becomes one reason with
what to check, and OpenSSL's own words at its end in brackets (C{[OpenSSL: ...]}) for
whoever searches for them.

A certificate that fails its check for its dates is named by L{tlsdates} (and the device's
clock by C{agent.clocksense}); one that fails for its issuer is named here, at the same
moment (L{trustNamed}, called by tlsdates' alert callback).
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import error

from accesstunnel.layers import transportLayers

__all__ = [
    "CertificateTrustError",
    "connectionUnder",
    "handshakeUnfinished",
    "openSSLWords",
    "tlsFailureText",
    "trustNamed",
    "webSocketRefusalText",
]

#: The end of every text here that carries OpenSSL's own words.
OPENSSL_WORDS = "[OpenSSL: {words}]"

#: Where the agent's trust comes from (agent/tap.py: the config file's tls-ca wins over
#: --tls-ca), said after a certificate it does not trust.
TRUST_SOURCE = (
    "the agent trusts the CA file set by tls-ca in its config file or by "
    "--tls-ca, or the system's CAs when neither is set"
)

#: OpenSSL's reasons (lower case) for bytes that are not TLS where a TLS record was due.
_NOT_TLS = (
    "wrong version number",
    "packet length too long",
    "record layer failure",
    "unknown protocol",
    "http request",
    "record too long",
)

#: Alerts the server sends about the device's certificate, and what each means.
_CLIENT_CERTIFICATE_ALERTS = {
    "alert certificate required": (
        "the server wants a client certificate and this device has none to give it yet "
        "(is this groundcontrol's tls:// or wss:// port? A device gets its fleet certificate "
        "once approved)"
    ),
    "alert unknown ca": (
        "the server does not trust the CA that issued this device's certificate (is this the "
        "groundcontrol that issued it?)"
    ),
    "alert bad certificate": "the server refused this device's certificate",
    "alert certificate unknown": "the server refused this device's certificate",
    "alert certificate revoked": (
        "the server says this device's certificate is revoked (an admin must approve the "
        "device again)"
    ),
    "alert certificate expired": "the server says this device's certificate has expired",
    # groundcontrol's own refusal of a device certificate (revoked, or from another CA)
    # reaches the agent as this: its verify callback says no, and OpenSSL calls that internal.
    "alert internal error": (
        "the server broke off the TLS handshake (groundcontrol does when it refuses this "
        "device's certificate: revoked?)"
    ),
}


#: OpenSSL's verify errors that mean no trusted CA vouches for the chain: unable to get the
#: issuer (2, 20), self-signed leaf (18) or root (19), unable to verify the leaf (21).
_ISSUER_NOT_TRUSTED = frozenset({2, 18, 19, 20, 21})


class CertificateTrustError(SSL.Error):
    """
    The server's certificate failed its check for its issuer (self-signed, or from a CA the
    device does not trust). In pyOpenSSL's shape, as L{tlsdates.CertificateDatesError} is;
    C{str()} is the text alone.
    """

    def __init__(self, text: str) -> None:
        super().__init__([("SSL routines", "", text)])
        self.text = text

    def __str__(self) -> str:
        return self.text


def _name(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "no subject"


def trustNamed(connection: SSL.Connection, chain: list[x509.Certificate]) -> str | None:
    """
    Why C{chain} (the server's, its own certificate first) is not trusted by C{connection}'s
    trust store, or C{None} when it is (the check failed for another reason: the dates, the
    name).
    """
    if not chain:
        return None
    store = connection.get_context().get_cert_store()
    if store is None:
        return None
    leaf, rest = chain[0], chain[1:]
    try:
        crypto.X509StoreContext(
            store,
            crypto.X509.from_cryptography(leaf),
            [crypto.X509.from_cryptography(c) for c in rest],
        ).verify_certificate()
    except crypto.X509StoreContextError as e:
        words, code = str(e), e.errors[0] if e.errors else None
    else:
        return None
    top = chain[-1]
    if code not in _ISSUER_NOT_TRUSTED:  # a check of the chain itself (a signature, ...)
        what = f"the server's certificate ({_name(leaf)}) did not pass OpenSSL's check"
        return f"{what} {OPENSSL_WORDS.format(words=words)}"
    if len(chain) == 1 and leaf.issuer == leaf.subject:
        what = f"the server's certificate ({_name(leaf)}) is self-signed"
    else:
        what = (
            f"the server's certificate ({_name(leaf)}) was issued by "
            f"{top.issuer.rfc4514_string()}, a CA this device does not trust"
        )
    return f"{what} ({TRUST_SOURCE}) {OPENSSL_WORDS.format(words=words)}"


def _certificateNames(connection: Any) -> list[str]:
    """The DNS names and addresses the server's certificate is for, if there is one."""
    chain = None
    if connection is not None:
        try:
            chain = connection.get_peer_cert_chain(as_cryptography=True)
        except SSL.Error:
            chain = None
    if not chain:
        return []
    try:
        names = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [_name(chain[0])]
    return [str(n) for n in names.get_values_for_type(x509.DNSName)] + [
        str(a) for a in names.get_values_for_type(x509.IPAddress)
    ]


def _mismatchText(e: Any, connection: Any) -> str:
    """service_identity's VerificationError: the name dialled, and the certificate's names."""
    dialled = []
    for mismatch in getattr(e, "errors", []):
        identity = getattr(mismatch, "mismatched_id", None)
        value = getattr(identity, "hostname", None) or getattr(identity, "ip", None)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if value is not None:
            dialled.append(str(value))
    names = _certificateNames(connection)
    forWhat = f"for {', '.join(names)}" if names else "for another name"
    notWhat = f", not {', '.join(dialled)}" if dialled else ""
    kinds = ", ".join(type(m).__name__ for m in getattr(e, "errors", [])) or "mismatch"
    return (
        f"the server's certificate is {forWhat}{notWhat} (is the address right, or is "
        f"another server on that port?) [service_identity: {kinds}]"
    )


def openSSLWords(e: SSL.Error) -> str:
    """OpenSSL's reason, without pyOpenSSL's list of (library, function, reason)."""
    try:
        reasons = [str(entry[2]) for entry in e.args[0] if entry[2]]
    except (IndexError, TypeError):
        reasons = []
    return "; ".join(reasons) or str(e)


def connectionUnder(transport: Any) -> Any:
    """
    The pyOpenSSL connection under C{transport}, or C{None}: the first layer down the chain
    whose handle is a TLS connection (a WebSocket's transport, an SSH link's).
    """
    for layer in transportLayers(transport):
        try:
            handle = layer.getHandle()
        except AttributeError:  # no handle, or a TCP socket already closed
            continue
        if isinstance(handle, SSL.Connection):
            return handle
    return None


def handshakeUnfinished(connection: Any) -> bool:
    """Whether the TLS C{connection} (pyOpenSSL) ended before the server sent a certificate."""
    if connection is None:
        return False
    try:
        return not connection.get_peer_cert_chain()
    except SSL.Error:
        return True


def tlsFailureText(e: BaseException, connection: Any = None) -> str | None:
    """
    Why the TLS under a link failed, in an operator's words with OpenSSL's at the end;
    C{None} when C{e} is no TLS failure (the caller says it as it is). C{connection}: the
    pyOpenSSL connection, when known, for the names in the server's certificate and whether
    the handshake got as far as it.
    """
    from accesstunnel.transports.tlsdates import CertificateDatesError  # it imports this

    if isinstance(e, CertificateTrustError | CertificateDatesError):
        return str(e)  # already in words (and the clock note reads the dates' words)
    if isinstance(e, VerificationError):
        return _mismatchText(e, connection)
    if isinstance(e, SSL.Error):
        words = openSSLWords(e)
        lower = words.lower()
        end = OPENSSL_WORDS.format(words=words)
        for alert, meaning in _CLIENT_CERTIFICATE_ALERTS.items():
            if alert in lower:
                return f"{meaning} {end}"
        if any(sign in lower for sign in _NOT_TLS):
            return (
                "the server does not speak TLS on that port (a plain TCP or HTTP server? "
                f"ssh:// and ws:// ports are not TLS ones) {end}"
            )
        if "unsupported protocol" in lower or "alert protocol version" in lower:
            return f"the server and this device have no TLS version in common (1.2 or later) {end}"
        if "alert handshake failure" in lower:
            return (
                "the server refused the TLS handshake (no cipher in common, or it wants a "
                f"client certificate) {end}"
            )
        if "certificate verify failed" in lower:  # not named by tlsdates or trustNamed
            return f"certificate verify failed: the server's certificate did not verify {end}"
        return f"the TLS handshake failed {end}"
    if (
        isinstance(e, error.ConnectionLost | error.ConnectionDone)
        and not isinstance(e, error.ConnectionAborted)  # this end's own doing
        and handshakeUnfinished(connection)
    ):
        return (
            "the server closed the connection during the TLS handshake (is it a TLS port? a "
            "proxy or firewall that cuts TLS does this too)"
        )
    return None


#: autobahn's reason for a server that answered the WebSocket request with another status.
_UPGRADE_FAILED = re.compile(r"WebSocket connection upgrade failed \[(\d+)\]: ?([^\"()]*)")


def webSocketRefusalText(reason: str) -> str | None:
    """
    What an HTTP status that autobahn got instead of a WebSocket means, or C{None} when
    C{reason} (autobahn's) is not about one.
    """
    match = _UPGRADE_FAILED.search(reason)
    if match is None:
        return None
    status, words = int(match[1]), match[2].strip()
    said = f"HTTP {status} {words}".rstrip()
    if status == 404:
        return f"the server has no WebSocket at that path ({said}): is the path right?"
    if status == 426:
        return (
            f"the server, or a proxy on the way, would not upgrade to a WebSocket ({said}): "
            "a proxy or load balancer that does not pass WebSocket?"
        )
    if status in (401, 403, 407):
        return f"the server, or a proxy on the way, refused the WebSocket ({said})"
    if status >= 500:
        return (
            f"the server, or a load balancer in front of it, failed the WebSocket request "
            f"({said}): is groundcontrol behind it running?"
        )
    return (
        f"the server answered {said}, not a WebSocket (a web server or a captive portal, not "
        "groundcontrol?)"
    )
