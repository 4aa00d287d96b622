"""
Why something failed, in words that more words may follow.

Twisted ends many of its errors with a period (C{Connection was refused by other side:
111: Connection refused.}), so a line that went on after one read C{...refused.; stopping}
or C{(...refused.); trying again}. Every failure line that puts an error's text before
more of its own takes it from L{reasonText}.
"""

from __future__ import annotations

__all__ = ["reasonText"]


def reasonText(error: BaseException) -> str:
    """
    C{error}'s text without a closing period, or its type's name when it has no text;
    the system's words (C{Address already in use}) for an C{OSError} that has them.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().rstrip(".").rstrip()
    return text or type(error).__name__
