"""Immutable records the store hands out: plain values, safe to share across threads."""

from __future__ import annotations

from typing import Any, Literal

from attrs import field, frozen

__all__ = ["Account", "AuditEvent", "Device", "EnrollmentRequest"]

DeviceState = Literal["approved", "revoked"]
RequestKind = Literal["new", "rekey"]


@frozen
class Account:
    """An operator: identified to the server by any of its keys, never by a password."""

    id: int
    name: str
    isAdmin: bool


@frozen
class Device:
    """
    A known device: the binding of a routing name to exactly one public key.

    Only an approved device is routable; a revoked one is kept so that its key stays
    recognised (and refused) instead of turning back into a fresh enrollment request.
    """

    name: str
    state: DeviceState
    fingerprint: str
    publicKey: str
    serial: str | None
    approvedAt: float
    approvedBy: str
    lastSeen: float | None
    createdAt: float


@frozen
class EnrollmentRequest:
    """
    An unknown key that connected and asked for a name. Never routable until approved.

    C{kind} is C{"rekey"} when the requested name already belongs to a device (a device
    re-installed with a new key, or an impostor): approving it replaces that device's key.
    """

    fingerprint: str
    requestedName: str
    publicKey: str
    serial: str | None
    source: str
    firstSeen: float
    lastSeen: float
    kind: RequestKind


@frozen
class AuditEvent:
    """One entry of the append-only audit log, which is also the server's change feed."""

    id: int
    at: float
    event: str
    actor: str | None
    device: str | None
    detail: dict[str, Any] = field(factory=dict, eq=True, hash=False)
