"""
The JSON documents the admin CLI and the control shell print: one function per kind of
object, so the same device, grant or token reads the same from both.

The vocabulary: keys in snake_case; instants as ISO 8601 UTC strings with a C{Z}
(L{accesstunnel.timetext.isoTime}), null when absent; durations in seconds as numbers;
every key present in every document of its kind (null, not left out). What only the
running server knows (whether a device is online, whether a pending agent is connected)
is added by the control shell under its own key; the CLI, which has no registry, leaves
that key out rather than guess. L{jsonText} is the one writer both use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from accesstunnel.policy import isPostQuantum
from accesstunnel.timetext import isoTime
from groundcontrol.store import (
    Account,
    Compacted,
    Device,
    EnrollmentRequest,
    Grant,
    TokenRecord,
)

__all__ = [
    "SESSION_KEYS",
    "accountJSON",
    "auditDetailJSON",
    "auditEventJSON",
    "deviceJSON",
    "grantJSON",
    "grantState",
    "groupJSON",
    "groupRemovalJSON",
    "jsonText",
    "newTokenJSON",
    "rejectedRequestJSON",
    "requestJSON",
    "serialMatches",
    "serialsMatch",
    "sessionJSON",
    "storeCompactJSON",
    "tokenJSON",
    "tokenState",
    "ungrantJSON",
]


def jsonText(document: Any) -> str:
    """What C{--json} prints: the document indented, its keys sorted, a newline after."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def deviceJSON(d: Device) -> dict[str, Any]:
    """A device: C{device list}, C{ls}, and what C{approve}, C{revoke}, C{tag}, C{claim} print."""
    return {
        "name": d.name,
        "state": d.state,
        "fingerprint": d.fingerprint,
        "serial": d.serial,
        "last_seen": isoTime(d.lastSeen),
        "approved_at": isoTime(d.approvedAt),
        "approved_by": d.approvedBy,
        "owner": d.owner,
        "lease_until": isoTime(d.leaseUntil),
        "certificate_expires_at": isoTime(d.certificateExpiresAt),
        "tags": list(d.tags),
        "reported_tags": list(d.reportedTags),
        "groups": list(d.groups),
        "last_link_kex": d.lastLinkKex,
        "last_link_post_quantum": None if d.lastLinkKex is None else isPostQuantum(d.lastLinkKex),
    }


def serialMatches(r: EnrollmentRequest, device: Device | None) -> str | None:
    """
    For a request asking for C{device}'s name, with another key (a re-key, or a stranger)
    or with its own after its certificate ran out (a re-approval: C{no} is the device's
    key on another board, a copied state directory): whether the board serial it reported
    is the device's, C{yes} or C{no}; C{unknown} when either has none. None for a request
    that asks for no device's name. A hint, not proof: the serial is what the agent says.
    """
    if device is None:
        return None
    return serialsMatch(r.serial, device.serial)


def serialsMatch(serial: str | None, deviceSerial: str | None) -> str:
    """
    Whether a key's reported board C{serial} is C{deviceSerial}: C{yes} or C{no};
    C{unknown} when either has none (not reported, or never). What C{serial_matches}
    says wherever it appears: requests' documents, re-key and re-approval notifications.
    """
    if serial is None or deviceSerial is None:
        return "unknown"
    return "yes" if serial == deviceSerial else "no"


def requestJSON(r: EnrollmentRequest, device: Device | None = None) -> dict[str, Any]:
    """
    A pending enrollment request: C{pending}, and C{device list} after the devices. Its
    C{name}, C{state} (C{pending}), C{fingerprint}, C{serial} and C{last_seen} mean what a
    device's do, so a script can read both from one list. C{serial_matches} compares its
    serial with that of C{device}, the device of the name it asks for (L{serialMatches}):
    a re-key request whose serial does not match stands out.
    """
    return {
        "name": r.requestedName,
        "state": "pending",
        "kind": r.kind,
        "fingerprint": r.fingerprint,
        "serial": r.serial,
        "serial_matches": serialMatches(r, device),
        "source": r.source,
        "first_seen": isoTime(r.firstSeen),
        "last_seen": isoTime(r.lastSeen),
    }


def rejectedRequestJSON(r: EnrollmentRequest) -> dict[str, Any]:
    """What C{reject} prints: the request's document as it was, in C{state} C{rejected}."""
    return {**requestJSON(r), "state": "rejected"}


def grantState(grant: Grant, now: float) -> str:
    """C{expired} once its expiry has passed, else C{active}."""
    return "expired" if grant.expiresAt is not None and grant.expiresAt <= now else "active"


def grantJSON(g: Grant, now: float) -> dict[str, Any]:
    """A grant: C{grants}, the grants in a device's detail, and what C{grant} prints."""
    return {
        "user": g.account,
        "selector": g.selector,
        "login_user": g.loginUser,
        "agent_forwarding": g.agentForwarding,
        "expires_at": isoTime(g.expiresAt),
        "state": grantState(g, now),
        "created_at": isoTime(g.createdAt),
        "created_by": g.createdBy,
    }


def ungrantJSON(user: str, selector: str) -> dict[str, Any]:
    """What C{ungrant} prints: the grant that is gone (there is no record left to show)."""
    return {"user": user, "selector": selector, "removed": True}


def tokenState(token: TokenRecord, now: float) -> str:
    """C{expired}, C{used up} (no uses left) or C{active}."""
    if token.expiresAt <= now:
        return "expired"
    return "used up" if token.usesLeft == 0 else "active"


def tokenJSON(t: TokenRecord, now: float) -> dict[str, Any]:
    """An enrollment token's record (never the secret: the store keeps only its hash)."""
    return {
        "id": t.id,
        "state": tokenState(t, now),
        "uses": t.uses,
        "uses_left": t.usesLeft,
        "expires_at": isoTime(t.expiresAt),
        "created_at": isoTime(t.createdAt),
        "created_by": t.createdBy,
    }


def newTokenJSON(t: TokenRecord, token: str, now: float) -> dict[str, Any]:
    """What C{token create} prints: the new token's record and, this once, the token."""
    return {**tokenJSON(t, now), "token": token}


def groupJSON(name: str, devices: Iterable[str]) -> dict[str, Any]:
    """A device group and its members."""
    return {"group": name, "devices": list(devices)}


def groupRemovalJSON(name: str, removed: Iterable[str]) -> dict[str, Any]:
    """What C{group remove} prints: the devices taken out of the group."""
    return {"group": name, "removed": list(removed)}


def storeCompactJSON(backend: str, store: str, done: Compacted | None) -> dict[str, Any]:
    """
    What C{store compact} prints: the store (its file, or its URL with any password
    hidden), whether it was compacted (C{done}; a PostgreSQL store has nothing to compact)
    and its size on disk in bytes before and after, null when it was not.
    """
    return {
        "backend": backend,
        "store": store,
        "compacted": done is not None,
        "bytes_before": None if done is None else done.bytesBefore,
        "bytes_after": None if done is None else done.bytesAfter,
        "bytes_given_back": None if done is None else done.bytesGivenBack,
    }


def accountJSON(account: Account) -> dict[str, Any]:
    """An operator account and its role (C{admin} or C{operator})."""
    return {"name": account.name, "role": "admin" if account.isAdmin else "operator"}


#: A session document's keys: the audit record's (L{groundcontrol.sessions.SessionRecord})
#: with C{state} (C{live}, C{ended}, C{unknown}) and C{status} (how it ended, in words).
SESSION_KEYS = (
    "id",
    "account",
    "device",
    "channel_type",
    "client",
    "key_fingerprint",
    "started_at",
    "ended_at",
    "pty",
    "term",
    "cols",
    "rows",
    "mode",
    "command",
    "bytes_in",
    "bytes_out",
    "exit_status",
    "exit_signal",
    "killed_by",
    "recording",
    "recording_error",
    "audit_error",
    "state",
    "status",
)


def sessionJSON(record: dict[str, Any]) -> dict[str, Any]:
    """
    A session from its audit record (epoch times, as the log keeps them): every key of
    L{SESSION_KEYS}, the times as ISO (a 0, an unrecorded time, as null).
    """
    document = {key: record.get(key) for key in SESSION_KEYS}
    for key in ("started_at", "ended_at"):
        document[key] = isoTime(record.get(key) or None)
    return document


#: Audit detail keys read out under another name than their snake_case spelling: the one
#: key that did not say what it was (C{claim.renewed}'s lease end before the renewal).
_RENAMED_DETAIL_KEYS = {"was": "previous_lease_until"}

#: Audit detail keys (as read out) whose values are instants: epoch numbers in the store.
_DETAIL_TIMES = frozenset(
    {
        "expires_at",
        "lease_until",
        "previous_lease_until",
        "not_after",
        "last_seen",
        "since",
        "started_at",
        "ended_at",
    }
)

#: Audit detail keys (as read out) whose values are durations in seconds, read out to 0.1 s
#: as new rows are written: rows stored before kept C{connected_for} as 23.138279676437378.
_DETAIL_DURATIONS = frozenset({"connected_for", "window"})

_CAPITAL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def _snakeCase(key: str) -> str:
    """C{leaseUntil} -> C{lease_until}; a key already in snake_case is kept."""
    return _RENAMED_DETAIL_KEYS.get(key) or _CAPITAL.sub(lambda m: "_" + m.group(1).lower(), key)


def auditDetailJSON(detail: Mapping[str, Any]) -> dict[str, Any]:
    """
    An audit event's detail as webhooks and logs give it: keys in snake_case, instants as
    ISO (a 0, an unrecorded time, as null). The store keeps the rows as they were written
    (C{leaseUntil}, C{expiresAt}: epoch numbers) and they are converted here, as they are
    read out, so rows written before the vocabulary read the same as new ones. Durations
    are seconds to 0.1 s. A time key whose value is not a number (already text) is passed
    on as it is.
    """
    document: dict[str, Any] = {}
    for key, value in detail.items():
        name = _snakeCase(key)
        if name in _DETAIL_TIMES and isinstance(value, int | float):
            value = isoTime(value or None)
        elif name in _DETAIL_DURATIONS and isinstance(value, int | float):
            value = round(value, 1)
        document[name] = value
    return document


def auditEventJSON(
    eventId: int | None,
    event: str,
    device: str | None,
    actor: str | None,
    at: float,
    detail: Mapping[str, Any],
) -> dict[str, Any]:
    """
    An audit event: what C{audit --json} prints and a webhook is sent (and the log's fleet
    event line carries). C{eventId} is its row's, increasing (a webhook receiver told the same
    event twice, a retry after an answer that was lost, sees the same id). C{device} is the
    device's name (for a pending device, the name it asked for); the detail's keys are those
    of the device or request documents where they mean the same (C{fingerprint},
    C{serial}, C{kind}, C{source}, C{owner}, C{lease_until}).
    """
    return {
        "id": eventId,
        "event": event,
        "device": device,
        "actor": actor,
        "at": isoTime(at),
        "detail": auditDetailJSON(detail),
    }
