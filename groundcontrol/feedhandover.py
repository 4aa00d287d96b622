"""
C{DATA/run/feed.json}: where a stopping fleet watcher left the audit feed, for its next start.

The fleet watcher notifies the audit log's rows as it polls them. A stop ends the polls,
and a start used to begin at the newest row: a row written after the stop's last read (by a
connection still open while groundcontrol stops, by the admin CLI or another node while it
is down) stayed in the audit log and was never notified. So the stop writes how far it read
(C{readTo}), and the notifications it still held for their agents' serials when the store
did not answer in time (L{groundcontrol.requestnotice}: sent without the serial, they would
have lost it for good), with what was left of their wait. The next start reads on from
there, so each row is notified once, by the stop or by the start.

Read as the watcher starts (not when it is built: a start refused after the build keeps it)
and removed once its first poll has taken the position; a kill or a crash writes none, and
the start after it begins at the newest row, as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from accesstunnel.statefiles import writeAtomically
from groundcontrol.notify import FleetEvent

__all__ = ["FEED_HANDOVER_FILE", "FeedHandOver", "readHandOver", "removeHandOver", "writeHandOver"]

FEED_HANDOVER_FILE = "feed.json"

_log = Logger()


@attrs.frozen
class FeedHandOver:
    """
    @ivar readTo: the audit id up to which every watched row was notified (or is in C{held}).
    @ivar held: the notifications held for their serials, each with the seconds of its wait
        that were left.
    """

    readTo: int
    held: Sequence[tuple[FleetEvent, float]] = ()


def _eventDocument(event: FleetEvent, wait: float) -> dict[str, Any]:
    return {
        "event": event.event,
        "device": event.device,
        "actor": event.actor,
        "at": event.at,
        "detail": dict(event.detail),
        "id": event.id,
        "wait": wait,
    }


def _heldEvent(document: Any) -> tuple[FleetEvent, float]:
    """One held notification read back; a C{ValueError} for anything else."""
    if not isinstance(document, dict):
        raise ValueError("a held notification is not an object")
    event, device, actor = document["event"], document["device"], document["actor"]
    at, detail, rowId, wait = document["at"], document["detail"], document["id"], document["wait"]
    if not (isinstance(event, str) and isinstance(device, str) and isinstance(detail, dict)):
        raise ValueError("a held notification's event, device or detail is not what it was")
    if actor is not None and not isinstance(actor, str):
        raise ValueError("a held notification's actor is not a string")
    for number in (at, wait):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError("a held notification's time or wait is not a number")
    if rowId is not None and (isinstance(rowId, bool) or not isinstance(rowId, int)):
        raise ValueError("a held notification's id is not an integer")
    return FleetEvent(event, device, actor, float(at), detail, rowId), max(0.0, float(wait))


def writeHandOver(path: Path, handOver: FeedHandOver) -> None:
    """Write C{handOver} to C{path} (whole, or not at all); raises C{OSError}."""
    document = {
        "readTo": handOver.readTo,
        "held": [_eventDocument(event, wait) for event, wait in handOver.held],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(document, default=str, sort_keys=True).encode() + b"\n"
    writeAtomically(path, data, mode=0o600)


def readHandOver(path: Path) -> FeedHandOver | None:
    """What C{path} says; None if there is none, or (with a warning) if it cannot be read."""
    try:
        document = json.loads(path.read_bytes())
        readTo = document["readTo"]
        if isinstance(readTo, bool) or not isinstance(readTo, int) or readTo < 0:
            raise ValueError("readTo is not an audit id")
        held = tuple(_heldEvent(held) for held in document["held"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        _log.warn(
            "ignoring {path}: {error}; the fleet watcher starts at the newest audit row",
            path=str(path),
            error=str(e),
        )
        return None
    return FeedHandOver(readTo, held)


def removeHandOver(path: Path) -> None:
    """Remove C{path}, once its position is taken (a crash after must not resume from it)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        _log.warn("could not remove {path}: {error}", path=str(path), error=str(e))
