"""
The C{--kex} filter of C{device list} and C{ctl ls}: devices by the kind of key exchange
their latest link negotiated, one meaning for both front ends.

An admin rolling the post-quantum agent out asks which devices still link classically (an
agent older than the hybrid key exchange, or a cryptography without ML-KEM on the device)
and which have not linked since groundcontrol began recording it (schema 008): those are
C{unknown}, not C{classical}, since nothing says how they would link.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterable
from typing import Literal

from accesstunnel.policy import isPostQuantum
from groundcontrol.store import Device

KexKind = Literal["post-quantum", "classical", "unknown"]

#: The values C{--kex} takes, in the order the help lists them.
KEX_KINDS: tuple[KexKind, ...] = ("post-quantum", "classical", "unknown")

KEX_HELP = (
    "only devices whose latest link's key exchange is of this kind: post-quantum "
    "(mlkem768x25519-sha256), classical (curve25519-sha256: an older agent, or no ML-KEM "
    "in the device's cryptography) or unknown (no link recorded since groundcontrol began "
    "recording it, schema 008); repeat for several"
)


def kexKind(kex: str | None) -> KexKind:
    """The kind of the key exchange named C{kex}; None (not recorded) is C{unknown}."""
    if kex is None:
        return "unknown"
    return "post-quantum" if isPostQuantum(kex) else "classical"


def addKexFilter(parser: argparse.ArgumentParser) -> None:
    """Give a listing's parser the C{--kex KIND} option (repeatable; C{kex} holds a list)."""
    parser.add_argument("--kex", action="append", choices=KEX_KINDS, metavar="KIND", help=KEX_HELP)


def withKex(devices: Iterable[Device], kinds: Collection[str] | None) -> list[Device]:
    """The C{devices} whose last link kex is one of C{kinds}; all of them if C{kinds} is None."""
    if kinds is None:
        return list(devices)
    return [d for d in devices if kexKind(d.lastLinkKex) in kinds]
