"""
Whose fault an exception out of an SSH message handler is: the peer's payload, or our code.

The steady read (accesstunnel.fastpath) ends a logged-in connection whose peer sent a
message its handler cannot parse, with one log line: a peer must not be able to fill
the log with tracebacks. The same exception types (TypeError, ValueError) also come from
a bug in a handler of ours, which one line saying "malformed" would hide, making our bug
look like a hostile peer. This module tells them apart by where the exception was
raised, so the read can log a bug as a failure (with its traceback) and say where in
both cases.

Where is more than the innermost frame: the innermost frame of our own code, and what it
called. An exception raised in our frame (or in a builtin it called) is ours. One raised
in code our frame called is ours too (a wrong value we passed to Conch's C{write} or
C{NS}, or to the standard library), unless what our frame called is Conch's dispatch of
the peer's message (C{dispatchMessage}, C{packetReceived}, an C{ssh_*} handler): then it
is Conch's parser refusing the peer's payload (C{ord} of an empty slice in C{ssh_DEBUG},
or in C{ssh_KEXINIT}, which our C{ssh_KEXINIT} reaches through C{super()}). The innermost
frame alone would call a wrong value of ours that Conch or the standard library refused
the peer's; the innermost of our frames alone would call Conch's parser refusing the
peer's payload ours. A peer's value that our code passes on unchecked to a library that
refuses it is ours too: our parsers check what they take (or catch their own ValueError),
so that is a check missing, worth its traceback.
"""

from __future__ import annotations

import struct
from types import FrameType, TracebackType
from typing import Any

import attrs

#: What a message handler raises on a payload it cannot parse (struct on a short
#: field, C{ord} or indexing past the end, a decode), wherever it is raised.
MALFORMED = (struct.error, IndexError, TypeError, ValueError)
#: Of those, the ones that are a parse of the peer's bytes wherever they were raised:
#: a field cut short, an index past the end, bytes that do not decode.
_PARSE_ERRORS = (struct.error, IndexError, UnicodeDecodeError)
#: Our own packages: a TypeError or ValueError raised in one of their frames, or in what
#: one of their frames called other than Conch's dispatch, is a bug of ours (a call with
#: the wrong arguments, a value we made wrong), not a payload; our parsers raise the parse
#: errors above, or catch their own ValueError (as accesstunnel.enrollmessages' callers do).
OWN_PACKAGES = frozenset(["accesstunnel", "groundcontrol", "agent"])
#: Conch's functions that take a received message from its transport to its handler:
#: called from our code, what they raise is Conch's parse of the peer's payload.
_CONCH_DISPATCH = frozenset(["dispatchMessage", "packetReceived"])


@attrs.frozen
class HandlerFault:
    """Where an exception out of a message handler was raised, and whose fault it is."""

    #: The module, function and line of the innermost frame the exception passed
    #: through (for an exception raised by a builtin, the frame that called it); for a
    #: bug of ours raised in code we called, our line that made the call.
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
    whether it is a bug of ours: a TypeError or ValueError (not a decode) raised in the
    innermost of our frames, or in code it called other than Conch's dispatch of the
    peer's message (the module docstring says why).
    """
    frames: list[TracebackType] = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if not frames:
        return HandlerFault(module="?", function="?", line=0, ours=False)
    innermost = frames[-1]
    ourLast = next((t for t in reversed(frames) if _isOurs(t.tb_frame)), None)
    if isinstance(error, _PARSE_ERRORS) or ourLast is None:
        return _fault(innermost, ours=False)
    if ourLast is innermost:
        return _fault(innermost, ours=True)
    called = ourLast.tb_next
    assert called is not None
    if _dispatchesPeerMessage(called.tb_frame):
        return _fault(innermost, ours=False)
    return _fault(ourLast, ours=True)


def _module(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", "?"))


def _isOurs(frame: FrameType) -> bool:
    return _module(frame).partition(".")[0] in OWN_PACKAGES


def _dispatchesPeerMessage(frame: FrameType) -> bool:
    """Whether C{frame} is Conch's dispatch of a received message or its handler."""
    name = frame.f_code.co_name
    return _module(frame).startswith("twisted.conch.") and (
        name.startswith("ssh_") or name in _CONCH_DISPATCH
    )


def _fault(tb: TracebackType, ours: bool) -> HandlerFault:
    frame = tb.tb_frame
    return HandlerFault(
        module=_module(frame), function=frame.f_code.co_name, line=tb.tb_lineno, ours=ours
    )
