"""
Grants and enrollment tokens as tables: one rendering for ``groundcontrol grants`` /
``groundcontrol token list`` and the control shell's ``grants`` / ``tokens``.

The two used to list the same records with different columns (the control shell had
no creator, the CLI no agent forwarding) and different times (``2026-11-25 22:36:31``
against ``2026-11-25T22:36:31Z``). Both now print these tables, with the times as
``show`` / ``device show`` print theirs (L{groundcontrol.devicedetail.formatTime}).
Their C{--json} stays each its own: scripts read those keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from groundcontrol.devicedetail import clean, formatTime
from groundcontrol.store import Grant, TokenRecord

GRANT_COLUMNS = ("USER", "SELECTOR", "LOGIN", "AGENT_FWD", "EXPIRES", "STATE", "BY")
TOKEN_COLUMNS = ("ID", "STATE", "USES_LEFT", "EXPIRES", "CREATED", "BY")


def grantState(grant: Grant, now: float) -> str:
    """C{expired} once its expiry has passed, else C{active}."""
    return "expired" if grant.expiresAt is not None and grant.expiresAt <= now else "active"


def tokenState(token: TokenRecord, now: float) -> str:
    """C{expired}, C{used up} (no uses left) or C{active}."""
    if token.expiresAt <= now:
        return "expired"
    return "used up" if token.usesLeft == 0 else "active"


def grantsTable(grants: Iterable[Grant], now: float) -> str:
    """The grants, one a line under L{GRANT_COLUMNS}; an expiry of C{never} has none."""
    return table(
        GRANT_COLUMNS,
        [
            (
                g.account,
                g.selector,
                g.loginUser or "-",
                "yes" if g.agentForwarding else "no",
                formatTime(g.expiresAt),
                grantState(g, now),
                g.createdBy,
            )
            for g in grants
        ],
    )


def tokensTable(tokens: Iterable[TokenRecord], now: float) -> str:
    """The tokens (never the secrets: the store has only hashes), under L{TOKEN_COLUMNS}."""
    return table(
        TOKEN_COLUMNS,
        [
            (
                str(t.id),
                tokenState(t, now),
                f"{t.usesLeft}/{t.uses}",
                formatTime(t.expiresAt),
                formatTime(t.createdAt),
                t.createdBy,
            )
            for t in tokens
        ],
    )


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """
    Left-aligned columns two spaces apart, trailing blanks cut, a newline after each
    line; cells are L{clean}ed (account names and actors come from people).
    """
    lines = [list(header)] + [[clean(cell) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


__all__ = [
    "GRANT_COLUMNS",
    "TOKEN_COLUMNS",
    "grantState",
    "grantsTable",
    "table",
    "tokenState",
    "tokensTable",
]
