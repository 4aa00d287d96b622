"""
Whose fault an exception out of an SSH message handler is: the peer's payload, or our code.

The steady read (accesstunnel.fastpath) ends a logged-in connection whose peer sent a
message its handler cannot parse, with one log line: a peer must not be able to fill
the log with tracebacks. The same exception types (TypeError, ValueError) also come from
a bug in a handler of ours, which one line saying "malformed" would hide, making our bug
look like a hostile peer. This module tells them apart by where the exception was
raised, so the read can log a bug as a failure (with its traceback) and say where in
both cases.
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

#: What a message handler raises on a payload it cannot parse (struct on a short
#: field, C{ord} or indexing past the end, a decode), wherever it is raised.
MALFORMED = (struct.error, IndexError, TypeError, ValueError)
#: Of those, the ones that are a parse of the peer's bytes wherever they were raised:
#: a field cut short, an index past the end, bytes that do not decode.
_PARSE_ERRORS = (struct.error, IndexError, UnicodeDecodeError)
#: Our own packages: a TypeError or ValueError raised in one of their frames is a bug
#: of ours (a call with the wrong arguments, a value we made wrong), not a payload; our
#: parsers raise the parse errors above, or catch their own ValueError (as
#: accesstunnel.enrollmessages' callers do).
OWN_PACKAGES = frozenset(["accesstunnel", "groundcontrol", "agent"])


@attrs.frozen
class HandlerFault:
    """Where an exception out of a message handler was raised, and whose fault it is."""

    #: The module, function and line of the innermost frame the exception passed
    #: through (for an exception raised by a builtin, the frame that called it).
    module: str
    function: str
    line: int
    #: A bug of ours (log a failure), rather than the peer's malformed payload.
    ours: bool

    def where(self) -> dict[str, Any]:
        """C{module}, C{function} and C{line}, as a log event's fields."""
        return {"module": self.module, "function": self.function, "line": self.line}


def classify(error: BaseException) -> HandlerFault:
    """
    Where C{error} (one of L{MALFORMED}, caught from a message handler) was raised, and
    whether it is a bug of ours: a TypeError or ValueError (not a decode) whose
    innermost frame is in one of L{OWN_PACKAGES}. A TypeError that Conch's own parser
    raises on a short payload (C{ord} of an empty slice in C{ssh_DEBUG}) is the peer's;
    so is one that our code provokes by passing Conch a wrong value, the case this
    cannot see (only the innermost frame is looked at).
    """
    tb = error.__traceback__
    if tb is None:
        return HandlerFault(module="?", function="?", line=0, ours=False)
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "?"))
    ours = not isinstance(error, _PARSE_ERRORS) and module.partition(".")[0] in OWN_PACKAGES
    return HandlerFault(
        module=module, function=tb.tb_frame.f_code.co_name, line=tb.tb_lineno, ours=ours
    )
