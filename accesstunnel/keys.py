"""SSH key fingerprints, spelled the way OpenSSH prints them, and certificate serials.

Both ends name keys by fingerprint (the store keys devices and accounts by it, operators
compare it with ``ssh-keygen -lf``), so there must be exactly one way to compute it. The
same goes for a device certificate's serial, which groundcontrol's store, its revocation
check and its link line, and the agent's link line, all name.
"""

from __future__ import annotations

from twisted.conch.ssh import keys

__all__ = ["certificateSerial", "fingerprint"]


def fingerprint(key: str | bytes | keys.Key) -> str:
    """
    Return the OpenSSH-style fingerprint of a public (or private) key: ``SHA256:<base64>``.

    OpenSSH drops the base64 ``=`` padding; Twisted keeps it, so it is stripped here to make
    the result match ``ssh-keygen -lf`` byte for byte.

    @param key: an OpenSSH one-line public key (C{str} or C{bytes}) or a parsed L{keys.Key}.
    @raise keys.BadKeyError: if C{key} is a string that is not a key.
    """
    if isinstance(key, keys.Key):
        parsed = key
    else:
        parsed = keys.Key.fromString(key.encode("ascii") if isinstance(key, str) else key)
    digest = parsed.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + digest.rstrip("=")


def certificateSerial(serial: int) -> str:
    """A certificate's serial number as the fleet names it: 32 lowercase hex digits."""
    return f"{serial:032x}"
