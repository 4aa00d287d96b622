"""
The audit log as people and scripts read it: C{groundcontrol audit} and C{ctl audit}.

Until these, the log was read only by the fleet watcher, webhooks and C{sessions --all};
a person wanting "who approved kiln7, and when" opened the database. The store keeps each
row as it was written (camelCase detail keys and epoch times, in rows from before the JSON
vocabulary and in new ones alike: the writers are unchanged), and every row is converted
as it is read out (L{groundcontrol.documents.auditEventJSON}), so old rows read as new ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from accesstunnel.timetext import absoluteTime
from groundcontrol.accesslists import table
from groundcontrol.documents import auditDetailJSON, auditEventJSON
from groundcontrol.store import AuditEvent, IStore

__all__ = ["AUDIT_COLUMNS", "addAuditOptions", "auditDocuments", "auditTable", "recentAudit"]

AUDIT_COLUMNS = ("ID", "AT", "EVENT", "DEVICE", "ACTOR", "DETAIL")


def addAuditOptions(parser: argparse.ArgumentParser) -> None:
    """
    C{--limit N} and C{--after ID}, for both front ends' C{audit}: one spelling of their
    synopsis, help and refusals (C{ctl audit --help} once read C{--limit LIMIT}).
    """
    parser.add_argument(
        "--limit", type=_positiveInt, default=50, metavar="N", help="at most N events (50)"
    )
    parser.add_argument(
        "--after",
        type=_wholeNumber,
        metavar="ID",
        help="the events after this id (the last one seen, to read on from there)",
    )


def _wholeNumber(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def _positiveInt(text: str) -> int:
    value = _wholeNumber(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


async def recentAudit(store: IStore, limit: int, after: int | None = None) -> list[AuditEvent]:
    """
    Up to C{limit} audit events, oldest first: those after the id C{after}, or without it
    the latest (the ids above the newest one less C{limit}: a read of C{limit} rows by
    primary key, however long the log).
    """
    if after is None:
        after = max(0, await store.lastAuditId() - limit)
    return list(await store.auditSince(after, limit))


def auditDocuments(events: Sequence[AuditEvent]) -> list[dict[str, Any]]:
    """What C{audit --json} prints: each event's document."""
    return [auditEventJSON(e.id, e.event, e.device, e.actor, e.at, e.detail) for e in events]


def _detailText(detail: dict[str, Any]) -> str:
    """C{key=value} pairs in the vocabulary's spelling; a list as C{a,b}, none as C{-}."""
    pairs = []
    for key, value in auditDetailJSON(detail).items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        pairs.append(f"{key}={'-' if value is None else value}")
    return " ".join(pairs)


def auditTable(events: Sequence[AuditEvent]) -> str:
    """The events as a table for people (cells cleaned: devices name themselves)."""
    return table(
        AUDIT_COLUMNS,
        [
            (
                str(e.id),
                absoluteTime(e.at),
                e.event,
                e.device or "-",
                e.actor or "-",
                _detailText(e.detail),
            )
            for e in events
        ],
    )
