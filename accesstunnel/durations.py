"""
Durations as people write them: ``30s``, ``15m``, ``8h``, ``7d``, ``2w``.

Used wherever a lifetime is given on a command line (grants, claims, tokens),
so that every command spells them the same way; and how long something lasted,
as the logs say it (L{spokenDuration}).
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


def spokenDuration(seconds: float) -> str:
    """C{41.3 s}, C{12m05s}, C{3h02m07s}, C{9d04h13m}: how long, as people read it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h{m:02d}m"
    if hours:
        return f"{hours}h{m:02d}m{s:02d}s"
    return f"{minutes}m{s:02d}s"
