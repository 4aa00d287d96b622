"""
Log observers for groundcontrol: the level filter (debug events are dropped by default) and JSON.

The level filter, shared with tunnel-agent, is L{accesstunnel.logfilter}
(re-exported here): by default groundcontrol writes events of level info and
above. Conch logs debug events for every keepalive it answers and every key
exchange, and with 10,000 agent links writing them was a quarter of
groundcontrol's idle CPU. ``--log-level debug`` writes them again.

The filter applies to twistd's own observer (``-l FILE``, ``--syslog``, or
standard output with ``-n``, see L{accesstunnel.logfilter.LogObserverService}),
and to the JSON factories below, for ``twistd --logger``:

``twistd --logger groundcontrol.logging.jsonLogger -n groundcontrol ...``

twistd's ``--logger`` names a log observer factory and passes it no options,
so this module offers ready-made factories. L{jsonLogger} writes one JSON
object per line to standard output (JSON Lines, no record separator), with
twisted.logger's structured fields (C{log_format}, C{log_namespace},
C{log_level}, C{log_time}, and each event's own keys such as C{device} or
C{account}), which log shippers read without parsing text. Another
``--logger`` factory is used as it is, unfiltered.
"""

from __future__ import annotations

import sys
from typing import IO

from constantly import NamedConstant
from twisted.logger import FileLogObserver, FilteringLogObserver, jsonFileLogObserver

from accesstunnel.logfilter import (
    DEFAULT_LEVEL,
    LEVELS,
    MinimumLevel,
    filtered,
    parseLevel,
    twistdObserver,
)

#: The level the JSON factories filter at; set by groundcontrol's makeService
#: (twistd calls a --logger factory after makeService).
_threshold = MinimumLevel(parseLevel(DEFAULT_LEVEL))


def setLevel(level: NamedConstant) -> None:
    """Filter the ``--logger`` factories of this module at C{level} from now on."""
    _threshold.level = level


def jsonObserver(out: IO[str], recordSeparator: str = "") -> FileLogObserver:
    """A JSON observer writing to C{out}; JSON Lines unless a separator is given."""
    return jsonFileLogObserver(out, recordSeparator=recordSeparator)


def jsonLogger() -> FilteringLogObserver:
    """The factory for ``twistd --logger``: JSON Lines to standard output, ``--log-level`` up."""
    return filtered(jsonObserver(sys.stdout), _threshold)


def jsonSeqLogger() -> FilteringLogObserver:
    """JSON text sequences (RFC 7464: each record starts with 0x1E), for readers of that form."""
    return filtered(jsonObserver(sys.stdout, recordSeparator="\x1e"), _threshold)


__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "MinimumLevel",
    "filtered",
    "jsonLogger",
    "jsonObserver",
    "jsonSeqLogger",
    "parseLevel",
    "setLevel",
    "twistdObserver",
]
