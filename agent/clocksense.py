"""
Whether this device's clock looks set, said where a certificate check failed and where a
time it gave is shown to a person (the pairing code's expiry: L{unsetClockNote}).

A board without a real-time clock boots in 1970 (or at fake-hwclock's last saved time) and
keeps that time until NTP reaches a server; over C{tls://} and C{wss://} the agent then sees
every server certificate as not yet valid, and OpenSSL says only "certificate verify failed".
The agent's line about the failed address adds what the device's clock says and, when that is
before any time a clock can really read, that the clock is the likely cause. A server
certificate that is not valid now has its own dates named before that
(L{accesstunnel.transports.tlsdates}), so the line shows whether the clock or the certificate
is wrong. (The fix for the clock: C{ssh://} addresses need no certificate dates and keep
working; list one too.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from accesstunnel.timetext import isoTime
from agent.certificatefile import CERTIFICATE_FILE, certificateLifetime

#: No set clock reads earlier: this code was written later. systemd keeps the same kind of
#: floor (its build time, TIME_EPOCH) as the earliest time it lets the clock say at boot.
TIME_EPOCH = datetime(2026, 1, 1, tzinfo=UTC).timestamp()

#: What OpenSSL says when the peer's certificate did not verify (dates, issuer, signature).
CERTIFICATE_CHECK_FAILED = "certificate verify failed"

#: What follows it when the server certificate's own dates are named
#: (accesstunnel.transports.tlsdates, not imported: an ssh:// agent loads no TLS code).
CERTIFICATE_DATES = "is valid from"


def _earliestTrueTime(stateDir: Path | None) -> tuple[float, str]:
    """The latest time known to have passed, and what says so."""
    floor, source = TIME_EPOCH, "this agent was written"
    if stateDir is not None:
        try:
            notBefore, _ = certificateLifetime((stateDir / CERTIFICATE_FILE).read_bytes())
        except (OSError, ValueError):
            return floor, source
        if notBefore > floor:
            floor, source = notBefore, "this device's fleet certificate was issued"
    return floor, source


def clockLooksUnset(t: float, stateDir: Path | None = None) -> bool:
    """
    Whether C{t}, a time this device's clock read, is before the latest time known to have
    passed (L{TIME_EPOCH}, or the issue of the fleet certificate in C{stateDir}).
    """
    return t < _earliestTrueTime(stateDir)[0]


def unsetClockNote(now: float, stateDir: Path | None = None) -> str | None:
    """
    What to say beside a time this device's clock gave, which reads C{now}: None if it
    looks set; else that it looks unset (a board without a real-time clock, before NTP), so
    that only a span from now means anything: C{in 9 min} is right, C{1970-01-01T00:10:12Z}
    is not when it ends.
    """
    floor, source = _earliestTrueTime(stateDir)
    if now >= floor:
        return None
    return (
        f"this device's clock looks unset: it says {isoTime(now)}, before {source} "
        f"({isoTime(floor)})"
    )


def certificateClockNote(reason: str, now: float, stateDir: Path | None = None) -> str:
    """
    What to add to C{reason} (why an address could not be reached) about this device's
    clock, which reads C{now}: nothing unless a certificate failed its check. Before the
    latest time known to have passed (L{TIME_EPOCH}, or the issue of the device's fleet
    certificate in C{stateDir}), it says the clock is not set.
    """
    if CERTIFICATE_CHECK_FAILED not in reason:
        return ""
    floor, source = _earliestTrueTime(stateDir)
    if now < floor:
        return (
            f"; this device's clock says {isoTime(now)}, before {source} ({isoTime(floor)}): "
            "is the clock set? No server certificate can be checked until it is"
        )
    if CERTIFICATE_DATES in reason:  # the certificate's own dates are beside it
        return f"; this device's clock says {isoTime(now)}"
    return (
        f"; this device's clock says {isoTime(now)} "
        "(a server certificate not valid at that time fails this check too)"
    )


__all__ = [
    "CERTIFICATE_CHECK_FAILED",
    "CERTIFICATE_DATES",
    "TIME_EPOCH",
    "certificateClockNote",
    "clockLooksUnset",
    "unsetClockNote",
]
