"""Immutable records the store hands out: plain values, safe to share across threads."""

from __future__ import annotations

from typing import Any, Literal

from attrs import field, frozen

__all__ = [
    "AUDIT_PRUNED",
    "SESSION_ENDED",
    "SESSION_STARTED",
    "Account",
    "AuditEvent",
    "AuditPage",
    "AuditPruned",
    "Certificate",
    "CertificateState",
    "Device",
    "EnrollmentRequest",
    "Grant",
    "LastLink",
    "LinkAuth",
    "LinkCertificate",
    "LinkRecord",
    "PendingLimits",
    "SessionEvents",
    "TokenRecord",
]

#: The audit events of a relayed session; their detail carries the session id under
#: "session". The store keeps its session index (schema 005) from them.
SESSION_STARTED = "session.started"
SESSION_ENDED = "session.ended"
#: The audit row a retention sweep writes when it removed something (L{AuditPruned}).
AUDIT_PRUNED = "audit.pruned"

DeviceState = Literal["approved", "revoked"]
RequestKind = Literal["new", "rekey", "reapprove"]
CertificateState = Literal["valid", "revoked", "expired", "unknown"]
#: How a device's link authenticated: its fleet certificate (TLS, then its key), or its key.
LinkAuth = Literal["certificate", "key"]


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
    # Defaults keep records built by older callers valid.
    owner: str | None = None
    """The account that claimed the device, while its lease lasts (cleared by endLease)."""
    leaseUntil: float | None = None
    """When the owner's claim lapses (epoch seconds); None without an owner."""
    certificateExpiresAt: float | None = None
    """
    The latest C{not_after} of the unrevoked certificates issued for the device's current
    key; None if it has none. May lie in the past: that is how an expired device shows.
    """
    tags: tuple[str, ...] = ()
    """Tags an admin set (C{tag DEVICE +t}), sorted."""
    reportedTags: tuple[str, ...] = ()
    """Tags the agent reported from its own config in its hello, sorted."""
    groups: tuple[str, ...] = ()
    """The groups the device is a member of, sorted."""
    lastLinkKex: str | None = None
    """
    The key exchange its latest link negotiated (C{mlkem768x25519-sha256}); None until the
    device links (or has not since schema 008). The one part of L{LastLink} a device carries:
    listings filter the fleet by it (C{device list --kex}, C{ls --kex}) and print it.
    """

    @property
    def allTags(self) -> tuple[str, ...]:
        """Admin and reported tags together (both match a C{tag:} grant), sorted."""
        return tuple(sorted(set(self.tags) | set(self.reportedTags)))


@frozen
class EnrollmentRequest:
    """
    An unknown key that connected and asked for a name. Never routable until approved.

    C{kind} is C{"rekey"} when the requested name already belongs to a device (a device
    re-installed with a new key, or an impostor): approving it replaces that device's key.
    It is C{"reapprove"} for an approved device that came back after its certificate
    expired: same key, same name, waiting for an admin (or a claim) to confirm it again.
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


@frozen
class AuditPage:
    """
    One read of the change feed for some kinds of event: those events, oldest first, and
    the id the read covered up to (rows of other kinds included), where the next one starts.
    """

    events: tuple[AuditEvent, ...]
    readTo: int


@frozen
class AuditPruned:
    """
    What one retention sweep (L{IStore.pruneAudit}) removed: audit rows up to C{throughId}
    (all older than the age), the session index rows that pointed only at them, and the
    certificates that expired before the cut-off. All zero: nothing was old enough.
    """

    auditRows: int
    sessions: int
    certificates: int
    throughId: int


@frozen
class SessionEvents:
    """
    One relayed session as the audit log has it: its C{session.started} and
    C{session.ended} events (either may be missing: a session still open, or an event
    whose write failed).
    """

    id: str
    started: AuditEvent | None
    ended: AuditEvent | None


@frozen
class Certificate:
    """
    A certificate the fleet CA issued: the store keeps its validity, never its bytes.

    C{fingerprint} is the SSH fingerprint (C{SHA256:...}) of the device key it certifies.
    """

    serialNumber: str
    deviceName: str
    fingerprint: str
    notBefore: float
    notAfter: float
    issuedAt: float
    revokedAt: float | None


@frozen
class LinkCertificate:
    """
    The fleet certificate a device's link presented, as an operator audits it.

    Unlike L{Certificate} (what the CA issued) this is what a device used: the certificate's
    serial number (lower-case hex), its own SHA-256 fingerprint (upper-case hex pairs joined by
    colons, as C{openssl x509 -fingerprint -sha256} prints it), its expiry and the device it
    names.
    """

    serialNumber: str
    fingerprint: str
    notAfter: float
    deviceName: str


@frozen
class LinkRecord:
    """
    What the store records of an approved device's contact, as the caller decided it (the
    realm: L{groundcontrol.certverdict}); the store applies it and judges nothing.

    The link came by C{certificate} (a L{LinkCertificate} that vouches for this device's
    key), or by the key alone when that is None; or, C{refused}, the caller refuses the login
    (its certificate does not vouch for it): the device is only seen, and how it last linked
    is left as it was. Build one with L{byKey}, L{byCertificate} or L{refusedLink}; C{kex}
    (the key exchange the link negotiated, C{mlkem768x25519-sha256}) is recorded with it,
    or None if the caller does not know it.
    """

    certificate: LinkCertificate | None = None
    refused: bool = False
    kex: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.refused and self.certificate is not None:
            raise ValueError("a refused link records no certificate")

    @classmethod
    def byKey(cls) -> LinkRecord:
        return cls()

    @classmethod
    def byCertificate(cls, certificate: LinkCertificate) -> LinkRecord:
        return cls(certificate=certificate)

    @classmethod
    def refusedLink(cls) -> LinkRecord:
        return cls(refused=True)


@frozen
class LastLink:
    """
    How a device's latest accepted link authenticated, and the last certificate it linked
    with: kept apart from L{Device}, which every session open reads, since only an operator
    auditing the device asks for it (all but the key exchange, which L{Device} carries too).
    """

    #: None until the device links (or has not since schema 006).
    auth: LinkAuth | None
    #: The certificate of the latest link that presented one; None if none did.
    certificate: LinkCertificate | None
    #: When a link last presented C{certificate}.
    certificateAt: float | None
    #: The key exchange the latest link negotiated (C{mlkem768x25519-sha256}); None until
    #: the device links (or has not since schema 008).
    kex: str | None = None


@frozen
class TokenRecord:
    """
    An enrollment token as the store knows it: its use count and expiry, never the token.

    Only the SHA-256 of the token is stored, so a copy of the database cannot enroll devices.
    """

    id: int
    uses: int
    usesLeft: int
    expiresAt: float
    createdAt: float
    createdBy: str


@frozen
class PendingLimits:
    """
    Caps on enrollment requests, checked when an unknown key would add a new one.

    Unknown keys may connect before anyone vouches for them, so without caps anyone could
    fill the approval queue (and the operators' notifications). C{perHost} counts requests
    first seen from one source host within the last C{window} seconds.
    """

    total: int = 100
    perHost: int = 10
    window: float = 3600.0


@frozen
class Grant:
    """
    An operator's access to the devices a selector names, perhaps until C{expiresAt}.

    C{selector} is C{device:NAME}, C{group:NAME} or C{tag:NAME}; C{loginUser}, if set, is
    the user the device session runs as (when the agent runs as root).
    """

    account: str
    selector: str
    loginUser: str | None
    expiresAt: float | None
    createdAt: float
    createdBy: str
    #: Whether the grant lets the operator forward their ssh-agent (ssh -A).
    agentForwarding: bool = False
