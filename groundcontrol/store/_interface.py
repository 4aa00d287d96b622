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

    def deviceForKey(fingerprint):
        """@return: Deferred firing with the L{Device} bound to that key fingerprint, or None."""

    def listDevices():
        """@return: Deferred firing with all L{Device}s (approved and revoked), by name."""

    def listEnrollmentRequests():
        """@return: Deferred firing with all pending L{EnrollmentRequest}s, by name, first seen."""

    def recordContact(requestedName, publicKey, fingerprint, serial, source, now):
        """
        Record that an agent authenticated with C{publicKey} and asked to be C{requestedName}.

        The key decides, never the name: a key bound to an approved device yields that
        L{Device} (its C{lastSeen} set to C{now}) whatever name was asked for; a key bound
        to a revoked device yields that revoked L{Device}, which the caller must refuse.
        Any other key becomes (or refreshes) an L{EnrollmentRequest}: C{kind="rekey"} if
        the name belongs to an existing device, else C{"new"}. A request never takes or
        shadows a device's name. The first appearance of a request is audited as
        C{device.pending}.

        @return: Deferred firing with a L{Device} or an L{EnrollmentRequest}; fails with
            L{InvalidName} for a malformed name.
        """

    def approveDevice(name, actor, now, fingerprint=None):
        """
        Approve the pending request for C{name} (only the one with C{fingerprint}, if given).

        A request for a new name creates the device; a request for an existing device's
        name replaces that device's key (and re-approves it). With no pending request, a
        revoked device is re-approved with its known key. Audited as C{device.approved}.

        @return: Deferred firing with the approved L{Device}; fails with
            L{AmbiguousRequest} (several requests, no fingerprint), L{UnknownDevice} (no
            such request or device), L{AlreadyExists} (already approved, nothing pending).
        """

    def revokeDevice(name, actor, now):
        """
        Make a device unroutable; its key stays recognised so it cannot re-enroll silently.

        @return: Deferred firing with the revoked L{Device}; L{UnknownDevice}.
        """

    def touchDevice(name, now):
        """Set a device's C{lastSeen}. @return: Deferred firing with None; L{UnknownDevice}."""

    # -- grants -----------------------------------------------------------------

    def grant(accountName, deviceName, actor, now, expiresAt=None):
        """
        Let an operator reach a device, until C{expiresAt} (epoch seconds) if given.
        Granting again replaces the expiry.

        @return: Deferred firing with None; L{UnknownAccount}, L{UnknownDevice}.
        """

    def ungrant(accountName, deviceName, actor, now):
        """
        Remove an operator's grant on a device.

        @return: Deferred firing with True if a grant was removed, False if there was none.
        """

    def mayReach(account, deviceName, now):
        """
        Decide whether C{account} may open sessions to C{deviceName} at time C{now}.

        Admins reach every device; operators reach devices they hold an unexpired grant for.
        This is authorisation only: the caller still checks that the device is approved.

        @return: Deferred firing with a bool.
        """

    # -- audit ------------------------------------------------------------------

    def audit(event, actor, device, detail, now):
        """
        Append an event to the audit log. C{detail} is a JSON-serialisable dict.

        @return: Deferred firing with the stored L{AuditEvent}.
        """

    def auditSince(afterId, limit=100):
        """
        Read the audit log after a known id, oldest first. The server polls this as its
        change feed (approvals and revocations made by the CLI in another process), so it is
        a primary-key range scan.

        @return: Deferred firing with a list of at most C{limit} L{AuditEvent}s.
        """

    def lastAuditId():
        """
        @return: Deferred firing with the id of the newest audit event (0 if none), so a
            poller can start at "now" instead of replaying history.
        """

    def close():
        """Release the database connection. @return: Deferred firing with None."""
