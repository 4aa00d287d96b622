"""
Grants and enrollment tokens for people: one table and one confirmation line each for
``groundcontrol grants`` / ``token list`` / ``grant`` / ``token create`` and the control
shell's ``grants`` / ``tokens`` / ``grant`` / ``tokens create``.

The two used to list the same records with different columns (the control shell had
no creator, the CLI no agent forwarding) and different times (``2026-11-25 22:36:31``
against ``2026-11-25T22:36:31Z``), and to confirm a grant in different words. Both now
print these, with times from L{accesstunnel.timetext}; their C{--json} is
L{groundcontrol.documents}'.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from accesstunnel.timetext import absoluteTime, whenText
from groundcontrol.devicedetail import clean
from groundcontrol.documents import grantState, tokenState
from groundcontrol.store import Grant, TokenRecord

GRANT_COLUMNS = ("USER", "SELECTOR", "LOGIN", "AGENT_FWD", "EXPIRES", "STATE", "BY")
TOKEN_COLUMNS = ("ID", "STATE", "USES_LEFT", "EXPIRES", "CREATED", "BY")


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
                absoluteTime(g.expiresAt, "never"),
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
                absoluteTime(t.expiresAt),
                absoluteTime(t.createdAt),
                t.createdBy,
            )
            for t in tokens
        ],
    )


def grantedText(grant: Grant, now: float) -> str:
    """
    What C{grant} says it did: C{granted alice access to tag:lab as pi with agent
    forwarding until 2026-11-25T22:36:31Z (in 8 h)}.
    """
    text = f"granted {clean(grant.account)} access to {grant.selector}"
    if grant.loginUser:
        text += f" as {clean(grant.loginUser)}"
    if grant.agentForwarding:
        text += " with agent forwarding"
    if grant.expiresAt is not None:
        text += f" until {whenText(grant.expiresAt, now)}"
    return text


def ungrantedText(user: str, selector: str, removed: bool) -> str:
    """What C{ungrant} says: the grant it removed, or (an error) that there was none."""
    if removed:
        return f"removed {clean(user)}'s grant for {selector}"
    return f"{clean(user)} has no grant for {selector}"


def tokenCreatedText(token: TokenRecord, now: float) -> str:
    """What C{token create} says beside the token (on stderr: the token alone is stdout)."""
    return (
        f"enrollment token {token.id}: {token.uses} use(s), expires "
        f"{whenText(token.expiresAt, now)}; shown only now, agents take it with --token"
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
    "grantedText",
    "grantsTable",
    "table",
    "tokenCreatedText",
    "tokensTable",
    "ungrantedText",
]
