"""
Times as every interface writes them: one spelling for scripts, one absolute and one
relative spelling for people.

The admin CLI, the control shell, webhooks, the agent's status file and the log lines of
both programs used to write instants in five ways (epoch numbers, C{2026-11-25 22:36:31},
C{... UTC}, C{HH:MM:SS UTC}, ISO with C{+00:00}). Every instant now goes through this
module: L{isoTime} in JSON and log lines (a string with a C{Z}, or null), L{absoluteTime}
where a person reads a date, L{relativeTime} where they read how long ago or how soon, and
L{whenText} for both at once; L{parseIsoTime} reads L{isoTime}'s text back. It lives here,
not in groundcontrol, because the agent writes the same times and must not import the
server.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["absoluteTime", "isoTime", "parseIsoTime", "relativeTime", "whenText"]

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

#: Below each bound a span is counted in the unit beside it; past the last, in days.
_SPANS = ((120, 1, "s"), (120 * 60, 60, "min"), (48 * 3600, 3600, "h"))


def isoTime(t: float | datetime | None) -> str | None:
    """
    An instant for JSON and log lines: ISO 8601 in UTC to the second with a C{Z}
    (C{2026-11-27T09:30:00Z}), or None when there is none. C{t} is seconds since the
    epoch, or an aware datetime (a certificate's validity, as C{cryptography} gives it).
    """
    if t is None:
        return None
    if isinstance(t, datetime):
        t = t.timestamp()
    return datetime.fromtimestamp(int(t), UTC).strftime(_ISO_FORMAT)


def parseIsoTime(text: object) -> float | None:
    """
    Seconds since the epoch from L{isoTime}'s text; None for anything else (absent, a
    number, another spelling), so a reader of a file someone may have edited never fails.
    """
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, _ISO_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def absoluteTime(t: float | None, absent: str = "-") -> str:
    """
    An instant for people: the same text as in JSON (one spelling to read, grep and paste
    into C{date -d}), or C{absent} (C{-}; C{never} for an expiry) when there is none.
    """
    text = isoTime(t)
    return absent if text is None else text


def relativeTime(t: float | None, now: float, absent: str = "never") -> str:
    """
    How far C{t} is from C{now}: C{now}, C{42 s ago}, C{5 min ago}, C{3 h ago}, C{in 7 d};
    C{absent} when there is no C{t}. Whole units, rounded down, so an 8 h grant reads
    C{in 8 h} when it is made.
    """
    if t is None:
        return absent
    offset = int(t - now)
    span = abs(offset)
    if span < 1:
        return "now"
    for bound, unit, name in _SPANS:
        if span < bound:
            amount = f"{span // unit} {name}"
            break
    else:
        amount = f"{span // 86400} d"
    return f"in {amount}" if offset > 0 else f"{amount} ago"


def whenText(t: float | None, now: float, absent: str = "-") -> str:
    """
    Both at once for a line a person reads: C{2026-11-25T22:36:31Z (in 8 h)}, or
    C{absent} when there is no C{t}.
    """
    if t is None:
        return absent
    return f"{absoluteTime(t)} ({relativeTime(t, now)})"
