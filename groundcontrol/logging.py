"""
JSON logs on request: ``twistd --logger groundcontrol.logging.jsonLogger -n groundcontrol ...``.

twistd's ``--logger`` names a log observer factory and passes it no options,
so this module offers ready-made factories. L{jsonLogger} writes one JSON
object per line to standard output (JSON Lines, no record separator), with
twisted.logger's structured fields (C{log_format}, C{log_namespace},
C{log_level}, C{log_time}, and each event's own keys such as C{device} or
C{account}), which log shippers read without parsing text.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import FileLogObserver, jsonFileLogObserver


def jsonObserver(out: IO[str], recordSeparator: str = "") -> FileLogObserver:
    """A JSON observer writing to C{out}; JSON Lines unless a separator is given."""
    return jsonFileLogObserver(out, recordSeparator=recordSeparator)


def jsonLogger() -> FileLogObserver:
    """The factory for ``twistd --logger``: JSON Lines to standard output."""
    return jsonObserver(sys.stdout)


def jsonSeqLogger() -> FileLogObserver:
    """JSON text sequences (RFC 7464: each record starts with 0x1E), for readers of that form."""
    return jsonObserver(sys.stdout, recordSeparator="\x1e")


__all__ = ["jsonLogger", "jsonObserver", "jsonSeqLogger"]
