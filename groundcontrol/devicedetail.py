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
from typing import Any

import attrs

from accesstunnel.policy import isPostQuantum
from accesstunnel.timetext import absoluteTime, isoTime, whenText
from groundcontrol.documents import deviceJSON, grantJSON, requestJSON, serialMatches
from groundcontrol.store import Device, EnrollmentRequest, Grant, LastLink

__all__ = [
    "ONLINE_KEYS",
    "DeviceDetail",
    "LiveLink",
    "clean",
    "detailJSON",
    "detailText",
    "grantsCovering",
    "liveLink",
    "onlineJSON",
    "pendingState",
    "requestsFor",
    "serialText",
    "tagsText",
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
    #: The clock's reading the times are shown against (C{3 min ago}, C{in 6 d}).
    now: float = attrs.field(kw_only=True)
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


#: The keys only the running server can fill in (L{onlineJSON}): the admin CLI's
#: documents leave them out.
ONLINE_KEYS = ("online", "online_since", "online_from", "transport", "agent_version")


def onlineJSON(online: LiveLink | None) -> dict[str, Any]:
    """
    A device's live link as the keys of its document (C{ls}, C{show}): C{online}, and
    since when, from which address, over which transport, with which agent version (null
    while offline). Flat, so C{jq 'select(.online) | .transport'} reads it.
    """
    return {
        "online": online is not None,
        "online_since": None if online is None else isoTime(online.since),
        "online_from": None if online is None else online.source,
        "transport": None if online is None else online.transport,
        "agent_version": None if online is None else online.version,
    }


def detailJSON(detail: DeviceDetail) -> dict[str, Any]:
    """
    The document C{--json} prints: the device's document (a name only requests ask for:
    its latest request's), how it last linked, the requests for its name, and, where known,
    its live link (L{ONLINE_KEYS}) and the grants that cover it (C{grants}).
    """
    base = (
        deviceJSON(detail.device) if detail.device is not None else requestJSON(detail.requests[0])
    )
    link = detail.lastLink
    last = None if link is None else link.certificate
    document: dict[str, Any] = {
        **base,
        "last_link_auth": None if link is None else link.auth,
        "last_link_kex": None if link is None else link.kex,
        "last_link_post_quantum": None
        if link is None or link.kex is None
        else isPostQuantum(link.kex),
        "last_certificate": None
        if last is None or link is None
        else {
            "serial_number": last.serialNumber,
            "fingerprint": last.fingerprint,
            "not_after": isoTime(last.notAfter),
            "presented_at": isoTime(link.certificateAt),
        },
        "pending_requests": [requestJSON(r, detail.device) for r in detail.requests],
    }
    if detail.linksKnown:
        document.update(onlineJSON(detail.online))
    if detail.grants is not None:
        document["grants"] = [grantJSON(g, detail.now) for g in detail.grants]
    return document


# -- text ----------------------------------------------------------------------------


def detailText(detail: DeviceDetail) -> str:
    """The device as aligned C{label  value} lines."""
    lines = _lines(detail)
    width = max(len(label) for label, _ in lines)
    return "".join(f"{label.ljust(width)}  {value}".rstrip() + "\n" for label, value in lines)


def _lines(detail: DeviceDetail) -> list[tuple[str, str]]:
    d, now = detail.device, detail.now
    if d is None:
        kind = detail.requests[0].kind
        lines = [("name", clean(detail.name)), ("state", pendingState(kind))]
    else:
        lines = [("name", clean(d.name)), ("state", d.state)]
    lines += _onlineLines(detail)
    if d is not None:
        lines += _deviceLines(d, now)
        lines += _lastLinkLines(detail.lastLink, now)
    lines += [("pending request", _requestLine(r, d, now)) for r in detail.requests]
    if detail.grants is not None:
        lines += [("grant", _grantLine(g, now)) for g in detail.grants] or [("grants", "none")]
    return lines


def _onlineLines(detail: DeviceDetail) -> list[tuple[str, str]]:
    if not detail.linksKnown:
        return []
    online = detail.online
    if online is None:
        return [("online", "no")]
    where = f"since {whenText(online.since, detail.now)} from {clean(online.source or '?')}"
    if online.transport:
        where += f" over {clean(online.transport)}"
    return [("online", where), ("agent version", clean(online.version or "-"))]


def _deviceLines(d: Device, now: float) -> list[tuple[str, str]]:
    return [
        ("key", d.fingerprint),
        ("serial", clean(d.serial or "-")),
        ("approved", f"{absoluteTime(d.approvedAt)} by {clean(d.approvedBy)}"),
        ("last seen", whenText(d.lastSeen, now, absent="never")),
        (
            "owner",
            "-" if d.owner is None else f"{clean(d.owner)} until {whenText(d.leaseUntil, now)}",
        ),
        ("certificate expires", whenText(d.certificateExpiresAt, now)),
        ("tags", " ".join(d.tags) or "-"),
        ("reported tags", clean(" ".join(d.reportedTags)) or "-"),
        ("groups", " ".join(d.groups) or "-"),
    ]


def _lastLinkLines(link: LastLink | None, now: float) -> list[tuple[str, str]]:
    auth = None if link is None else link.auth
    lines = [("last link by", auth or "not recorded"), ("last link kex", _kexText(link))]
    last = None if link is None else link.certificate
    if link is None or last is None:
        return [*lines, ("last certificate", "none presented")]
    return [
        *lines,
        ("last certificate", last.serialNumber),
        ("  SHA-256", last.fingerprint),
        ("  valid until", whenText(last.notAfter, now)),
        ("  presented", whenText(link.certificateAt, now)),
    ]


def _kexText(link: LastLink | None) -> str:
    """The last link's key exchange, and whether it is post-quantum (older agents' is not)."""
    kex = None if link is None else link.kex
    if kex is None:
        return "not recorded"
    if isPostQuantum(kex):
        return f"{clean(kex)} (post-quantum)"
    return f"{clean(kex)} (not post-quantum: an agent from before the hybrid key exchange?)"


def pendingState(kind: str) -> str:
    """How a request of C{kind} reads in a table: C{pending}, C{pending-rekey}, ..."""
    return f"pending-{kind}" if kind in ("rekey", "reapprove") else "pending"


def _requestLine(r: EnrollmentRequest, device: Device | None, now: float) -> str:
    return (
        f"{pendingState(r.kind)} key {r.fingerprint}, serial {serialText(r, device)}, "
        f"from {clean(r.source)}, last seen {whenText(r.lastSeen, now)}"
    )


def serialText(r: EnrollmentRequest, device: Device | None) -> str:
    """
    A request's serial and, when it asks for C{device}'s name with another key, whether it
    is the device's (C{SN-2 (matches: no)}), as --json's C{serial_matches} says: a re-key
    whose serial does not match stands out without asking for JSON.
    """
    matches = serialMatches(r, device)
    return clean(r.serial or "-") + ("" if matches is None else f" (matches: {matches})")


def _grantLine(g: Grant, now: float) -> str:
    text = f"{clean(g.account)} by {g.selector}"
    if g.loginUser:
        text += f" as {clean(g.loginUser)}"
    if g.expiresAt is not None:
        text += f" until {whenText(g.expiresAt, now)}"
    return text


def tagsText(device: Device) -> str:
    """What C{tag} says: C{kiln7: tags lab site-berlin; reported by the agent -}."""
    return (
        f"{clean(device.name)}: tags {' '.join(device.tags) or '-'}; "
        f"reported by the agent {clean(' '.join(device.reportedTags)) or '-'}"
    )


def clean(text: str) -> str:
    """Replace control and format characters: device-supplied text must not drive the tty."""
    return "".join("?" if unicodedata.category(c).startswith("C") else c for c in text)
