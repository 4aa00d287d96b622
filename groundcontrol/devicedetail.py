"""
One device in detail, as the admin CLI's ``device show`` and the control shell's ``show``
print it: one renderer, so the server's view and the operators' view never drift apart.

The callers gather the records (the CLI synchronously, the shell through the store's
Deferreds and the node's registry) into a L{DeviceDetail}; this module turns that into text
lines or a JSON document. Device-supplied text (serials, reported tags, sources) is cleaned
here: it must not drive the reader's terminal.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import attrs

from groundcontrol.store import Device, EnrollmentRequest, Grant, LastLink

__all__ = [
    "DeviceDetail",
    "LiveLink",
    "clean",
    "detailJSON",
    "detailText",
    "deviceJSON",
    "formatTime",
    "grantsCovering",
    "liveLink",
    "requestJSON",
    "requestsFor",
]


@attrs.frozen
class LiveLink:
    """The device's link now, as the registry of the node that answers knows it."""

    since: float
    source: str | None
    transport: str | None
    version: str | None


@attrs.frozen
class DeviceDetail:
    """Everything one device's detail shows; what a caller cannot know it leaves out."""

    name: str
    #: The device record; None for a name only pending requests ask for.
    device: Device | None
    lastLink: LastLink | None
    #: Enrollment requests asking for the name (admins only; empty otherwise).
    requests: tuple[EnrollmentRequest, ...] = ()
    #: Whether C{online} is known: the CLI runs without the server's registry.
    linksKnown: bool = False
    online: LiveLink | None = None
    #: The unexpired grants that cover the device (admins only); None: not shown.
    grants: tuple[Grant, ...] | None = None


def liveLink(link: Any) -> LiveLink | None:
    """What a registry's live link (L{groundcontrol.avatars.DeviceLink}) says about itself."""
    if link is None:
        return None
    details = getattr(link, "details", {})
    return LiveLink(
        since=getattr(link, "connectedAt", 0.0),
        source=getattr(getattr(link, "avatar", None), "source", None),
        transport=details.get("transport") or None,
        version=details.get("version") or None,
    )


def requestsFor(requests: Iterable[EnrollmentRequest], name: str) -> tuple[EnrollmentRequest, ...]:
    """The pending requests asking for C{name}, latest first."""
    return tuple(
        sorted(
            (r for r in requests if r.requestedName == name),
            key=lambda r: r.lastSeen,
            reverse=True,
        )
    )


def grantsCovering(grants: Iterable[Grant], device: Device, now: float) -> tuple[Grant, ...]:
    """
    The unexpired grants naming the device, one of its groups or one of its tags (admin or
    reported): the rule the store's C{mayReach} applies, over the whole list of grants.
    """
    selectors = {f"device:{device.name}"}
    selectors.update(f"group:{group}" for group in device.groups)
    selectors.update(f"tag:{tag}" for tag in device.allTags)
    return tuple(
        g for g in grants if g.selector in selectors and (g.expiresAt is None or g.expiresAt > now)
    )


# -- JSON ----------------------------------------------------------------------------


def deviceJSON(d: Device) -> dict[str, Any]:
    """A device as C{device list --json} gives it (with the keys a pending entry has)."""
    return {
        "name": d.name,
        "state": d.state,
        "fingerprint": d.fingerprint,
        "serial": d.serial,
        "lastSeen": d.lastSeen,
        "source": None,
        "kind": None,
        "approvedAt": d.approvedAt,
        "approvedBy": d.approvedBy,
        "firstSeen": None,
        "owner": d.owner,
        "leaseUntil": d.leaseUntil,
        "certificateExpiresAt": d.certificateExpiresAt,
        "tags": list(d.tags),
        "reportedTags": list(d.reportedTags),
        "groups": list(d.groups),
    }


def requestJSON(r: EnrollmentRequest) -> dict[str, Any]:
    """A pending request as C{device list --json} gives it: the keys a device has."""
    return {
        "name": r.requestedName,
        "state": "pending",
        "fingerprint": r.fingerprint,
        "serial": r.serial,
        "lastSeen": r.lastSeen,
        "source": r.source,
        "kind": r.kind,
        "approvedAt": None,
        "approvedBy": None,
        "firstSeen": r.firstSeen,
        "owner": None,
        "leaseUntil": None,
        "certificateExpiresAt": None,
        "tags": [],
        "reportedTags": [],
        "groups": [],
    }


def detailJSON(detail: DeviceDetail) -> dict[str, Any]:
    """
    The document C{--json} prints: the device's C{device list} entry (a name only requests
    ask for: its latest request's), how it last linked, the requests for its name, and,
    where known, its live link and the grants that cover it.
    """
    base = (
        deviceJSON(detail.device) if detail.device is not None else requestJSON(detail.requests[0])
    )
    link = detail.lastLink
    last = None if link is None else link.certificate
    document: dict[str, Any] = {
        **base,
        "lastLinkAuth": None if link is None else link.auth,
        "lastCertificate": None
        if last is None or link is None
        else {
            "serialNumber": last.serialNumber,
            "fingerprint": last.fingerprint,
            "notAfter": last.notAfter,
            "presentedAt": link.certificateAt,
        },
        "pendingRequests": [requestJSON(r) for r in detail.requests],
    }
    if detail.linksKnown:
        online = detail.online
        document["online"] = None if online is None else attrs.asdict(online)
    if detail.grants is not None:
        document["grants"] = [
            {
                "account": g.account,
                "selector": g.selector,
                "loginUser": g.loginUser,
                "agentForwarding": g.agentForwarding,
                "expiresAt": g.expiresAt,
                "createdBy": g.createdBy,
            }
            for g in detail.grants
        ]
    return document


# -- text ----------------------------------------------------------------------------


def detailText(detail: DeviceDetail) -> str:
    """The device as aligned C{label  value} lines."""
    lines = _lines(detail)
    width = max(len(label) for label, _ in lines)
    return "".join(f"{label.ljust(width)}  {value}".rstrip() + "\n" for label, value in lines)


def _lines(detail: DeviceDetail) -> list[tuple[str, str]]:
    d = detail.device
    if d is None:
        kind = detail.requests[0].kind
        lines = [("name", clean(detail.name)), ("state", _pendingState(kind))]
    else:
        lines = [("name", clean(d.name)), ("state", d.state)]
    lines += _onlineLines(detail)
    if d is not None:
        lines += _deviceLines(d)
        lines += _lastLinkLines(detail.lastLink)
    lines += [("pending request", _requestLine(r)) for r in detail.requests]
    if detail.grants is not None:
        lines += [("grant", _grantLine(g)) for g in detail.grants] or [("grants", "none")]
    return lines


def _onlineLines(detail: DeviceDetail) -> list[tuple[str, str]]:
    if not detail.linksKnown:
        return []
    online = detail.online
    if online is None:
        return [("online", "no")]
    where = f"since {formatTime(online.since)} from {clean(online.source or '?')}"
    if online.transport:
        where += f" over {clean(online.transport)}"
    return [("online", where), ("agent version", clean(online.version or "-"))]


def _deviceLines(d: Device) -> list[tuple[str, str]]:
    return [
        ("key", d.fingerprint),
        ("serial", clean(d.serial or "-")),
        ("approved", f"{formatTime(d.approvedAt)} by {clean(d.approvedBy)}"),
        ("last seen", formatTime(d.lastSeen)),
        (
            "owner",
            "-" if d.owner is None else f"{clean(d.owner)} until {formatTime(d.leaseUntil)}",
        ),
        (
            "certificate expires",
            "-" if d.certificateExpiresAt is None else formatTime(d.certificateExpiresAt),
        ),
        ("tags", " ".join(d.tags) or "-"),
        ("reported tags", clean(" ".join(d.reportedTags)) or "-"),
        ("groups", " ".join(d.groups) or "-"),
    ]


def _lastLinkLines(link: LastLink | None) -> list[tuple[str, str]]:
    auth = None if link is None else link.auth
    lines = [("last link by", auth or "not recorded")]
    last = None if link is None else link.certificate
    if link is None or last is None:
        return [*lines, ("last certificate", "none presented")]
    return [
        *lines,
        ("last certificate", last.serialNumber),
        ("  SHA-256", last.fingerprint),
        ("  valid until", formatTime(last.notAfter)),
        ("  presented", formatTime(link.certificateAt)),
    ]


def _pendingState(kind: str) -> str:
    return f"pending-{kind}" if kind in ("rekey", "reapprove") else "pending"


def _requestLine(r: EnrollmentRequest) -> str:
    return (
        f"{_pendingState(r.kind)} key {r.fingerprint}, serial {clean(r.serial or '-')}, "
        f"from {clean(r.source)}, last seen {formatTime(r.lastSeen)}"
    )


def _grantLine(g: Grant) -> str:
    text = f"{clean(g.account)} by {g.selector}"
    if g.loginUser:
        text += f" as {clean(g.loginUser)}"
    if g.expiresAt is not None:
        text += f" until {formatTime(g.expiresAt)}"
    return text


def formatTime(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clean(text: str) -> str:
    """Replace control and format characters: device-supplied text must not drive the tty."""
    return "".join("?" if unicodedata.category(c).startswith("C") else c for c in text)
