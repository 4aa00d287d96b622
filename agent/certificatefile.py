"""
The device's fleet certificate on disk: the file it is kept in, and its dates.

Apart from L{agent.enrollment}, which requests and stores it, so that L{agent.clocksense}
can read when it was issued (the latest time known to have passed) without importing the
enrollment, which says its pairing code's expiry through L{agent.clocksense}. The dates are
read from the DER by hand rather than with C{cryptography.x509}, which the agent needs for
nothing else (0.8 MiB of modules on the device; bench/RESULTS.md, "Agent footprint").
"""

from __future__ import annotations

import binascii
from datetime import UTC, datetime

#: The device's fleet certificate, in its state directory.
CERTIFICATE_FILE = "device.crt"


def _derItem(der: bytes, offset: int, tags: tuple[int, ...]) -> tuple[int, int, int]:
    """(tag, start, end) of the contents of the DER item at C{offset}, one of C{tags}."""
    if offset + 2 > len(der) or der[offset] not in tags:
        raise ValueError("not the certificate structure expected")
    tag, length, start = der[offset], der[offset + 1], offset + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or start + size > len(der):
            raise ValueError("bad DER length")
        length, start = int.from_bytes(der[start : start + size], "big"), start + size
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _derTime(der: bytes, offset: int) -> tuple[float, int]:
    """An X.509 Time (UTCTime or GeneralizedTime, UTC) at C{offset}: (epoch seconds, end)."""
    tag, start, end = _derItem(der, offset, (0x17, 0x18))
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: 1950-2049 (RFC 5280, 4.1.2.5.1)
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    if len(text) != 15 or text[-1] != "Z" or not text[:-1].isdigit():
        raise ValueError(f"unexpected certificate time {text!r}")
    when = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    return when.timestamp(), end


def certificateLifetime(pem: bytes) -> tuple[float, float]:
    """
    (notBefore, notAfter) of a PEM certificate, as epoch seconds; ValueError if it is not
    one. Read from the DER (the certificate's validity: its fifth or sixth field) rather
    than with C{cryptography.x509}, which the agent needs for nothing else (0.8 MiB of
    modules on the device; bench/RESULTS.md, "Agent footprint").
    """
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    _, found, rest = pem.partition(begin)
    if not found or end not in rest:
        raise ValueError("no PEM certificate")
    try:
        der = binascii.a2b_base64(rest.partition(end)[0])
    except binascii.Error as e:
        raise ValueError(f"bad PEM certificate: {e}") from None
    _, start, _ = _derItem(der, 0, (0x30,))  # Certificate
    _, offset, _ = _derItem(der, start, (0x30,))  # TBSCertificate
    if der[offset : offset + 1] == b"\xa0":  # [0] version
        offset = _derItem(der, offset, (0xA0,))[2]
    for tags in ((0x02,), (0x30,), (0x30,)):  # serialNumber, signature, issuer
        offset = _derItem(der, offset, tags)[2]
    _, offset, validityEnd = _derItem(der, offset, (0x30,))
    try:
        notBefore, offset = _derTime(der, offset)
        notAfter, offset = _derTime(der, offset)
    except UnicodeDecodeError:
        raise ValueError("bad certificate time") from None
    if offset != validityEnd:
        raise ValueError("bad certificate validity")
    return notBefore, notAfter
