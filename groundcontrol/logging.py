"""
Log observers for groundcontrol: a level filter (debug events are dropped by default) and JSON.

By default groundcontrol writes events of level info and above: Conch logs
debug events for every keepalive it answers and every key exchange, and with
10,000 agent links writing them was a quarter of groundcontrol's idle CPU.
``--log-level debug`` writes them again.

The filter applies to twistd's own observer (``-l FILE``, ``--syslog``, or
standard output with ``-n``): L{twistdObserver} makes the observer twistd
would make from its options, and groundcontrol's top service gives it,
filtered, to twistd's application as its L{ILogObserver} component, which
twistd's C{AppLogger} uses when no ``--logger`` is given. It applies too to
the JSON factories below, for ``twistd --logger``:

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
from collections.abc import Mapping
from typing import IO, Any

from constantly import NamedConstant
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    PredicateResult,
    jsonFileLogObserver,
)
from zope.interface import implementer

#: Level names for ``--log-level``, lowest first.
LEVELS = ("debug", "info", "warn", "error", "critical")
DEFAULT_LEVEL = "info"


def parseLevel(name: str) -> NamedConstant:
    """The L{LogLevel} called C{name}; ValueError for anything else."""
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {name!r}")
    return LogLevel.levelWithName(name)


@implementer(ILogFilterPredicate)
class MinimumLevel:
    """
    Drop events below C{level}. Events without a level (text written to
    standard output or error, legacy log.msg without one) are kept.
    """

    def __init__(self, level: NamedConstant = LogLevel.info) -> None:
        self.level = level

    def __call__(self, event: LogEvent) -> NamedConstant:
        level = event.get("log_level")
        if level is not None and level < self.level:
            return PredicateResult.no
        return PredicateResult.maybe


def filtered(observer: Any, level: NamedConstant | MinimumLevel) -> FilteringLogObserver:
    """C{observer} behind a filter that drops events below C{level}."""
    predicate = level if isinstance(level, MinimumLevel) else MinimumLevel(level)
    return FilteringLogObserver(observer, [predicate])


#: The level the JSON factories filter at; set by groundcontrol's makeService
#: (twistd calls a --logger factory after makeService).
_threshold = MinimumLevel(parseLevel(DEFAULT_LEVEL))


def setLevel(level: NamedConstant) -> None:
    """Filter the ``--logger`` factories of this module at C{level} from now on."""
    _threshold.level = level


def twistdObserver(serverOptions: Mapping[str, Any]) -> Any:
    """
    The observer twistd itself would make from its command line (C{serverOptions}:
    twistd's ServerOptions): ``-l FILE`` (rotated on SIGUSR1), ``--syslog``, or
    standard output with ``-n``. Unfiltered.
    """
    from twisted.scripts.twistd import _SomeApplicationRunner

    observer = _SomeApplicationRunner.loggerFactory(serverOptions)._getLogObserver()
    if not ILogObserver.providedBy(observer):
        # The syslog observer is a legacy one; twistd's AppLogger wraps it the same way.
        observer = LegacyLogObserverWrapper(observer)
    return observer


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
