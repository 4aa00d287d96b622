"""IStore: the seam between groundcontrol and whatever database keeps its durable state.

Every method returns a Deferred so that no implementation can block the reactor, and every
method that changes state or compares against the clock takes ``now`` (epoch seconds) from
the caller, so tests drive time explicitly.
"""

# zope.interface methods are declared without self.
# ruff: noqa: N805

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IStore"]


class IStore(Interface):
    """
    Devices, operator accounts and their keys, grants, enrollment requests and the audit log.

    Errors arrive as failures of the returned Deferred, with the exceptions from
    L{groundcontrol.store} (L{StoreError} and its subclasses).
    """

    def interactive():
        """
        This store for calls a person waits on (an operator's login and session, the
        control shell): they run before calls still queued for the fleet's own
        bookkeeping, such as the logins of a reconnect storm.

        @return: an L{IStore} on the same data, through the same connection: closing
            this store closes it too.
        """

    # -- accounts ---------------------------------------------------------------

    def addAccount(name, publicKeys, isAdmin, now):
        """
        Create an operator account with the given OpenSSH public key lines.

        @return: Deferred firing with the new L{Account}; fails with L{AlreadyExists} if the
            name or any key is taken, L{StoreError} if a key does not parse.
        """

    def addAccountKey(name, publicKey, now):
        """
        Add another public key to an existing account.

        @return: Deferred firing with the L{Account}; L{UnknownAccount}, L{AlreadyExists}.
        """

    def accountForKey(fingerprint):
        """@return: Deferred firing with the L{Account} owning that key fingerprint, or None."""

    def listAccounts():
        """@return: Deferred firing with all L{Account}s, ordered by name."""

    # -- devices ----------------------------------------------------------------

    def deviceByName(name):
        """@return: Deferred firing with the L{Device} of that name (any state), or None."""

    def lastLink(name):
        """
        @return: Deferred firing with the L{LastLink} of the device of that name (how its
            latest accepted link authenticated, the last certificate it linked with), or
            None if there is no such device.
        """

    def deviceForKey(fingerprint):
        """@return: Deferred firing with the L{Device} bound to that key fingerprint, or None."""

    def listDevices():
        """@return: Deferred firing with all L{Device}s (approved and revoked), by name."""

    def listEnrollmentRequests():
        """@return: Deferred firing with all pending L{EnrollmentRequest}s, by name, first seen."""

    def recordContact(
        requestedName,
        publicKey,
        fingerprint,
        serial,
        source,
        now,
        limits=None,
        certificate=None,
        certificateRefused=False,
        link=None,
    ):
        """
        Record that an agent authenticated with C{publicKey} and asked to be C{requestedName}.

        The key decides, never the name: a key bound to an approved device yields that
        L{Device} (its C{lastSeen} set to C{now}) whatever name was asked for; a key bound
        to a revoked device yields that revoked L{Device}, which the caller must refuse.
        An approved device whose latest certificate has expired, and that nobody approved
        since, yields an L{EnrollmentRequest} of kind C{"reapprove"} (same key, its own
        name): it is pending, not routable, until C{approveDevice(name)} or a claim.
        Any other key becomes (or refreshes) an L{EnrollmentRequest}: C{kind="rekey"} if
        the name belongs to an existing device, else C{"new"}. A request never takes or
        shadows a device's name. The first appearance of a request is audited as
        C{device.rekey-requested} (kind rekey) or C{device.pending} (new, reapprove); a
        rekey's or reapprove's detail's C{deviceSerial} is the device's serial, which the
        request's is compared with when its agent reports one. A C{serial} of None keeps
        the one already known (see L{updateSerial}).

        For an approved L{Device} it yields, the same statement that sets C{lastSeen} records
        how the link authenticated (its L{lastLink}), as the caller decided: C{link}, called
        with the name of the device the key belongs to (known only here: once, inside the
        write and on the store's thread, so it must be pure and quick), returns the
        L{LinkRecord} to apply, and the store applies it as it is, judging nothing. By
        certificate, that L{LinkCertificate} becomes the device's last certificate (presented
        at C{now}); by key, the last certificate is kept; refused (the caller refuses the
        login), the device is only seen and how it last linked is left alone. Callers whose
        decision does not depend on the device may give it as C{certificate} (by that
        certificate; by key when None) or C{certificateRefused} instead of C{link}, not both.
        No link is recorded for a contact that yields anything else, and C{link} is not
        called then.

        @param source: C{host:port} of the peer; the host is kept apart for the per-host cap.
        @param limits: a L{PendingLimits}: refuse a contact that would add a new (or
            rekey) request beyond them, atomically with the insert. Refreshing a request or
            a re-approval is never refused.
        @return: Deferred firing with a L{Device} or an L{EnrollmentRequest}; fails with
            L{InvalidName} for a malformed name, L{PendingLimitReached} past C{limits}.
        """

    def countPending():
        """@return: Deferred firing with the number of pending enrollment requests."""

    def countPendingFrom(sourceHost, since):
        """
        @return: Deferred firing with the number of pending requests first seen from host
            C{sourceHost} (no port) at or after C{since}.
        """

    def updateSerial(fingerprint, serial, now=None):
        """
        Store the board serial the agent reported after login, on the device or pending
        request with that key (on the request only for a device's own key asking to be
        re-approved: the device keeps its approved serial until the approval takes the
        request's). Control characters are stripped, at most 128 characters kept.
        A change is audited as C{device.serial-changed} (at C{now}, else at the key's last
        contact; a re-approval's is a change from the serial its request last reported, else
        the device's).

        @return: Deferred firing with True, or False if no device or request has that key.
        """

    def approveDevice(name, actor, now, fingerprint=None):
        """
        Approve the pending request for C{name} (only the one with C{fingerprint}, if given).

        A request for a new name creates the device; a request for an existing device's
        name replaces that device's key (and re-approves it; the old key's certificates are
        revoked), but for an approved device only when the request is chosen by
        C{fingerprint}: anyone can ask for any name with a fresh key. A C{"reapprove"}
        request re-approves the device with its own key in one step. With no pending
        request, a revoked device is re-approved with its known key. Audited as
        C{device.approved} (detail C{kind}: new, rekey, reapprove, reinstate; a rekey's
        C{previousFingerprint} is the replaced key; a reapprove's C{deviceSerial} is the
        device's serial before, to compare with the request's C{serial}).

        @return: Deferred firing with the approved L{Device}; fails with
            L{AmbiguousRequest} (several requests, no fingerprint), L{RekeyNeedsKey} (the
            one request would replace an approved device's key and no fingerprint was
            given), L{UnknownDevice} (no such request or device), L{AlreadyExists} (already
            approved, nothing pending).
        """

    def revokeDevice(name, actor, now):
        """
        Make a device unroutable; its key stays recognised so it cannot re-enroll silently.
        Its certificates are marked revoked (listed in the C{device.revoked} audit detail);
        a pending re-approval and a claim code of its key are dropped.

        @return: Deferred firing with the revoked L{Device}; L{UnknownDevice}.
        """

    def touchDevice(name, now):
        """Set a device's C{lastSeen}. @return: Deferred firing with None; L{UnknownDevice}."""

    def rejectRequest(name, actor, now, fingerprint=None):
        """
        Remove the pending request for C{name} (only the one with C{fingerprint}, if given)
        and its key's claim code, audited as C{enrollment.rejected} (detail: the request's
        C{fingerprint}, C{kind}, C{serial}, C{source}, C{lastSeen}). The key is not barred:
        its agent, disconnected by the fleet watcher, may come back as a new request.

        @return: Deferred firing with the removed L{EnrollmentRequest}; fails with
            L{AmbiguousRequest} (several requests, no fingerprint), L{UnknownDevice} (none).
        """

    def staleRequests(seenBefore):
        """
        @return: Deferred firing with the pending L{EnrollmentRequest}s last seen before
            C{seenBefore}, oldest first (a filter in SQL: the fleet watcher asks every
            sweep, and almost always gets nothing).
        """

    def touchRequests(fingerprints, now):
        """
        Set the C{lastSeen} of the pending requests of these key fingerprints to C{now}:
        their agents are connected, so they are being seen.

        @return: Deferred firing with how many requests were updated.
        """

    def expireRequest(fingerprint, seenBefore, now):
        """
        Remove the pending request of key C{fingerprint} if it was last seen before
        C{seenBefore} (checked again here: its agent may have connected since
        L{staleRequests} listed it), with its claim code; audited as C{enrollment.expired},
        with the detail of C{enrollment.rejected} and no actor.

        @return: Deferred firing with the removed L{EnrollmentRequest}, or None if it was
            not removed (seen since, approved, or gone).
        """

    # -- certificates -----------------------------------------------------------

    def recordCertificate(deviceName, serialNumber, fingerprint, notBefore, notAfter, now):
        """
        Record a certificate the fleet CA issued to an approved device, for its current key
        (C{fingerprint} is the SSH C{SHA256:...} fingerprint the certificate binds). Audited
        as C{certificate.issued}; the device's C{certificateExpiresAt} follows.

        @return: Deferred firing with the L{Certificate}; L{UnknownDevice}, L{AlreadyExists}
            (serial reused), L{StoreError} (device not approved, or key mismatch).
        """

    def certificateState(serialNumber, now):
        """
        @return: Deferred firing with C{"valid"}, C{"revoked"}, C{"expired"} (C{not_after}
            <= C{now}) or C{"unknown"} (never recorded).
        """

    def listCertificates(deviceName):
        """@return: Deferred firing with the device's L{Certificate}s, oldest first."""

    # -- enrollment tokens ------------------------------------------------------

    def createToken(tokenHash, uses, expiresAt, actor, now):
        """
        Create an enrollment token from its SHA-256 (64 lower-case hex digits; the token
        itself is never stored). Audited as C{token.created}.

        @return: Deferred firing with the L{TokenRecord}; L{AlreadyExists}, L{StoreError}.
        """

    def listTokens():
        """@return: Deferred firing with every L{TokenRecord}, oldest first."""

    def redeemToken(tokenHash, fingerprint, publicKey, requestedName, serial, source, now):
        """
        Enroll a new device with a token, atomically: the token must exist, be unexpired,
        have a use left and not have been redeemed by this key before; the name must be
        free and the key unknown (tokens never re-key nor revive a device). Uses one use,
        creates the approved device (approved by C{token:ID}), drops the key's pending
        request. Audited as C{device.approved} with actor C{token:ID}.

        @return: Deferred firing with the new L{Device}; L{TokenInvalid} (unknown, or
            replayed by this key), L{TokenExpired}, L{TokenExhausted}, L{NameTaken},
            L{AlreadyExists} (key is already a device), L{InvalidName}, L{StoreError}.
        """

    # -- claims -----------------------------------------------------------------

    def registerClaimCode(codeHash, fingerprint, requestedName, expiresAt, now):
        """
        Register the pairing code (its SHA-256 hex) an agent shows, replacing any older code
        of that key. The key must have connected (a pending request or a device), since the
        claim takes the public key from there. Audited as C{claim.code-registered}.

        @return: Deferred firing with None; L{UnknownDevice}, L{AlreadyExists} (code in
            use: make another), L{InvalidName}, L{StoreError}.
        """

    def claimDevice(codeHash, account, leaseUntil, now):
        """
        Approve the device showing that code and make C{account} its owner until
        C{leaseUntil}, atomically; the code is used up. Works for a new device, a
        C{"reapprove"} of the same key, a renewal by the owner, or re-claiming a device
        that an earlier claim approved and whose lease lapsed. Audited as
        C{device.claimed} (detail: owner, leaseUntil, kind, serial as an approval's; a
        reapprove's also deviceSerial, the device's before the claim); this is also an
        approval.

        @return: Deferred firing with the L{Device}; L{ClaimCodeInvalid},
            L{ClaimCodeExpired}, L{NameTaken}, L{ClaimRefused} (revoked, admin-approved or
            owned by another account).
        """

    def lapsedLeases(now):
        """@return: Deferred firing with the owned L{Device}s whose lease ended by C{now}."""

    def endLease(name, now):
        """
        Clear a lapsed lease's owner, audited as C{claim.lapsed} (detail: owner).

        @return: Deferred firing with the L{Device}, or None if it has no lapsed lease
            (renewed since L{lapsedLeases} saw it); L{UnknownDevice}.
        """

    def renewLease(name, account, leaseUntil, now):
        """
        Move the end of device C{name}'s lease to C{leaseUntil}, for its owner or an admin
        (C{account}), while the lease lasts. Audited as C{claim.renewed} (detail: owner,
        leaseUntil, was).

        @return: Deferred firing with the L{Device}; L{UnknownDevice}, L{ClaimRefused} (not
            claimed, claimed by another account, lease already ended, revoked),
            L{StoreError} (C{leaseUntil} not in the future).
        """

    def releaseLease(name, account, now):
        """
        End device C{name}'s lease now, for its owner or an admin (C{account}): the owner
        loses access as at a lapse; the device stays approved and can be claimed again.
        Audited as C{claim.released} (detail: owner, leaseUntil).

        @return: Deferred firing with the L{Device}; L{UnknownDevice}, L{ClaimRefused} (as
            L{renewLease}).
        """

    # -- grants ---------------------------------------------------------------------

    def grant(
        accountName, selector, actor, now, expiresAt=None, loginUser=None, agentForwarding=False
    ):
        """
        Let an operator reach the devices C{selector} names: C{device:NAME} (or a bare
        C{NAME}), C{group:NAME} or C{tag:NAME}, until C{expiresAt} (epoch seconds) if
        given, with device sessions running as C{loginUser} if given (see L{loginUserFor}),
        and with ssh-agent forwarding if C{agentForwarding} (see L{agentForwardingAllowed}).
        Granting the same selector again replaces the expiry and login user. A device
        selector needs the device to exist; a group or tag may be granted before any
        device has it. Audited as C{grant.added}.

        @return: Deferred firing with the L{Grant}; L{UnknownAccount}, L{UnknownDevice},
            L{InvalidName} (selector or login user), L{StoreError} (expiry not in the future).
        """

    def ungrant(accountName, selector, actor, now):
        """
        Remove an operator's grant on a selector (a bare name is a device). Audited as
        C{grant.removed}.

        @return: Deferred firing with True if a grant was removed, False if there was none.
        """

    def listGrants(accountName=None):
        """@return: Deferred firing with the L{Grant}s (of one account), by account, selector."""

    def mayReach(account, deviceName, now):
        """
        Decide whether C{account} may open sessions to C{deviceName} at time C{now}.

        Admins reach every device; operators reach devices that an unexpired grant names
        (by the device, a group it is in, or a tag it has, set by an admin or reported by
        its agent), and devices they own by a claim while its lease lasts
        (C{leaseUntil > now}). This is authorisation only: the caller still checks that
        the device is approved.

        @return: Deferred firing with a bool.
        """

    def agentForwardingAllowed(account, deviceName, now):
        """
        @return: Deferred firing with whether C{account} may forward its ssh-agent to the
            device: admins always; operators when an unexpired grant naming the device (or
            its group or tag) allows it.
        """

    def loginUserFor(account, deviceName, now):
        """
        The user C{account}'s sessions on C{deviceName} run as: the login user of the most
        specific unexpired grant that reaches the device (device, then group, then tag);
        among equally specific grants one naming a user wins, then the first by name.
        None when that grant names no user, or no grant reaches the device (an admin's
        reach, or a claim's): the session runs as the agent's own user.

        @return: Deferred firing with a user name or None.
        """

    # -- tags and groups ------------------------------------------------------------

    def tagDevice(deviceName, add, remove, actor, now):
        """
        Add and remove admin tags on a device (the agent's reported tags are left alone).
        A change is audited as C{device.tagged} (detail: added, removed, tags).

        @return: Deferred firing with the L{Device}; L{UnknownDevice}, L{InvalidName}.
        """

    def reportTags(deviceName, tags, now):
        """
        Replace the tags the device's agent reported (from its hello). Malformed tags are
        dropped, at most 32 kept. A change is audited as C{device.tags-reported}.

        @return: Deferred firing with True if they changed; L{UnknownDevice}.
        """

    def addToGroup(groupName, deviceNames, actor, now):
        """
        Put devices into a group (created by its first member). Audited as C{group.added}
        (detail: group, devices newly added).

        @return: Deferred firing with the group's members, sorted; L{UnknownDevice},
            L{InvalidName}.
        """

    def removeFromGroup(groupName, deviceNames, actor, now):
        """
        Take devices out of a group; with no devices, empty (remove) the whole group.
        Audited as C{group.removed}.

        @return: Deferred firing with the names removed (empty: nothing was a member).
        """

    def listGroups():
        """@return: Deferred firing with C{{group: [device, ...]}}, sorted."""

    # -- audit ------------------------------------------------------------------

    def audit(event, actor, device, detail, now):
        """
        Append an event to the audit log. C{detail} is a JSON-serialisable dict.

        @return: Deferred firing with the stored L{AuditEvent}; its detail is C{detail}
            itself, not a copy read back.
        """

    def auditSince(afterId, limit=100):
        """
        Read the audit log after a known id, oldest first. The server polls this as its
        change feed (approvals and revocations made by the CLI in another process), so it is
        a primary-key range scan.

        @return: Deferred firing with a list of at most C{limit} L{AuditEvent}s.
        """

    def auditFeed(afterId, events, limit=100):
        """
        L{auditSince} for a reader that acts on some kinds of event only (the fleet watcher):
        the rows of other kinds (the sessions' two each, most of the log) are passed over
        in the database, never decoded. The page says how far the read went, past the rows
        it passed over, so the next read starts there and reads none of them again.

        @param events: the event names wanted (C{device.revoked}, ...).
        @return: Deferred firing with an L{AuditPage}: at most C{limit} events, and
            C{readTo}, the id to read after next time.
        """

    def latestDeviceEvent(device, events):
        """
        The newest audit event of device C{device} among the kinds C{events}, or None: for
        the device wait, whether its C{device.online}, C{device.offline} or
        C{device.flapping} says it is linked to some node now. A read of the audit log's
        device index from its newest row back.

        @return: Deferred firing with an L{AuditEvent}, or None.
        """

    def recentSessions(limit):
        """
        The latest C{limit} relayed sessions (all with C{limit} 0) by their start, newest
        last, from the session index over the audit log (schema 005): a read of C{limit}
        rows, however long the log.

        @return: Deferred firing with a list of L{SessionEvents}.
        """

    def sessionEvents(sessionId):
        """
        @return: Deferred firing with the L{SessionEvents} of one session, or C{None} if
            the audit log has none.
        """

    def pruneAudit(before, limit, now):
        """
        Remove up to C{limit} of the oldest audit rows, those written before C{before}, in
        one short write transaction (a retention sweep calls it again for the rest).

        Only a run of the oldest ids goes, up to the first row that is not old enough: the
        log keeps no holes, and the change feed, read by id after the newest id a reader
        saw, never skips or repeats a row it has not read (ids are never reused). A session
        index row whose events all went goes too; one whose started event went keeps its
        ended event. Certificates whose not-after is before C{before} go as well: a
        certificate past its not-after is refused whether or not it was revoked
        (L{groundcontrol.pki}), so the revocation list does not need it. When something
        went, one C{audit.pruned} row says how much and up to when.

        @return: Deferred firing with an L{AuditPruned}.
        """

    def lastAuditId():
        """
        @return: Deferred firing with the id of the newest audit event (0 if none), so a
            poller can start at "now" instead of replaying history.
        """

    def takeNotifierTurn():
        """
        Whether this node holds the fleet notifier's turn (L{groundcontrol.fleetturn}),
        taking it if no node does. PostgreSQL: a session-level advisory lock on this store's
        connection, released when the connection ends (a reconnect loses it; this says so);
        SQLite: always True, one node.

        @return: Deferred firing with a bool.
        """

    def leaveNotifierTurn():
        """Give the notifier's turn up, if held. @return: Deferred firing with None."""

    def notifiedTo():
        """
        @return: Deferred firing with the audit id up to which the fleet's notifications
            have gone (schema 009), or None if no node has written one.
        """

    def recordNotifiedTo(position, node, now):
        """
        Write the fleet's notified-up-to audit id, forward only: a lower C{position} than
        the one stored changes nothing (a node that lost its turn unknowingly cannot take
        it back). C{node} names the writer, for people reading the row.

        @return: Deferred firing with whether the row changed.
        """

    def close():
        """
        Release the database connection, for this store and its interactive views, for
        good. @return: Deferred firing with None.
        """
