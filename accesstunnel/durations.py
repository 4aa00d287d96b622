"""
Durations as people write them: ``30s``, ``15m``, ``8h``, ``7d``, ``2w``.

Used wherever a lifetime is given on a command line (grants, claims, tokens),
so that every command spells them the same way.
"""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\A(\d{1,9})([smhdw])\Z")


def parseDuration(text: str) -> int:
    """Seconds in C{text}; ValueError with the accepted forms otherwise."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"bad duration {text!r}: use a whole number and a unit, e.g. 30m, 8h, 7d, 2w"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    return seconds
