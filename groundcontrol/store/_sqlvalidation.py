"""
Checks shared by the SQL store's parts on what callers hand it: keys, device names, serials.

An SSH key, a device name or a serial comes from an account, an agent's login, a token
redemption or a claim; each part refuses or cleans it the same way with these.
"""

from __future__ import annotations

import unicodedata

from twisted.conch.ssh import keys

import accesstunnel.keys
from accesstunnel.names import isValidDeviceName

from ._errors import InvalidName, StoreError

_SERIAL_MAX = 128


def _parseKey(publicKey: str) -> tuple[str, str]:
    """Return C{(normalised one-line key, fingerprint)}; the comment is dropped."""
    try:
        key = keys.Key.fromString(publicKey.strip().encode("ascii"))
    except (keys.BadKeyError, UnicodeEncodeError, ValueError) as e:
        raise StoreError(f"not an SSH public key: {e}") from None
    if not key.isPublic():
        raise StoreError("expected a public key, got a private key")
    return key.toString("OPENSSH").decode("ascii"), accesstunnel.keys.fingerprint(key)


def _checkKey(publicKey: str, fingerprint: str) -> str:
    """Return the normalised key line, refusing a fingerprint that is not the key's own."""
    line, actual = _parseKey(publicKey)
    if actual != fingerprint:
        raise StoreError(f"fingerprint {fingerprint} does not match the key ({actual})")
    return line


def _checkDeviceName(name: str) -> None:
    if not isValidDeviceName(name):
        raise InvalidName(f"invalid device name {name!r}: must match [a-z0-9][a-z0-9-]{{0,62}}")


def cleanSerial(serial: str | None) -> str | None:
    """
    A device-reported serial as stored: control and format characters removed, at most
    128 characters, None if nothing is left.

    The serial comes from the device and is printed by the CLI and the control shell, so it
    must not be able to drive a terminal, nor be long enough to bloat every listing.
    """
    if serial is None:
        return None
    cleaned = "".join(c for c in str(serial) if not unicodedata.category(c).startswith("C"))
    cleaned = cleaned.strip()[:_SERIAL_MAX]
    return cleaned or None
