"""
The SQL store's devices and pending requests: an agent's login, approval, revocation, expiry.

A device's key decides what its login records: an approved device's link, or a pending
request (new, re-key, re-approval) within the pending limits. Approving a request makes or
re-binds the device (claims and tokens approve through L{DeviceRows} too); rejecting or
expiring one drops it and its claim code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from twisted.internet.defer import Deferred

from accesstunnel.addresses import sourceNetwork

from ._dialect import Cursor, Row
from ._errors import (
    AlreadyExists,
    AmbiguousRequest,
    PendingLimitReached,
    RekeyNeedsKey,
    UnknownDevice,
)
from ._records import (
    Device,
    EnrollmentRequest,
    LastLink,
    LinkCertificate,
    LinkRecord,
    PendingLimits,
)
from ._sqlcore import _DEVICE_SELECT, StoreCore, _device
from ._sqlvalidation import _checkDeviceName, _checkKey, cleanSerial

_DEVICE_INSERT_COLUMNS = (
    "name, state, fingerprint, public_key, serial, approved_at, approved_by, last_seen, "
    "created_at, owner_account_id, lease_until"
)
_REQUEST_COLUMNS = (
    "fingerprint, requested_name, public_key, serial, source, first_seen, last_seen, kind"
)


def _request(row: Row) -> EnrollmentRequest:
    return EnrollmentRequest(
        fingerprint=row["fingerprint"],
        requestedName=row["requested_name"],
        publicKey=row["public_key"],
        serial=row["serial"],
        source=row["source"],
        firstSeen=row["first_seen"],
        lastSeen=row["last_seen"],
        kind=row["kind"],
    )


def _sameForAnyDevice(record: LinkRecord) -> Callable[[str], LinkRecord]:
    """A caller's decision that does not depend on which device the key turns out to be."""
    return lambda deviceName: record


def _replacesApprovedKey(device: Device | None, request: EnrollmentRequest) -> TypeGuard[Device]:
    """
    Whether approving C{request} takes an approved device's name from its key: a re-key,
    which L{SQLStore.approveDevice} does only for a request chosen by its fingerprint. A
    revoked device coming back with a new key, or a new name, is not.
    """
    return (
        device is not None
        and device.state == "approved"
        and device.fingerprint != request.fingerprint
    )


def sourceHost(source: str) -> str:
    """
    The host a C{host:port} source is counted as: C{[v6]:port} and C{v4:port} lose the
    port, and the host is taken as the limits take it (L{sourceNetwork}: an IPv6 address
    as its /64); anything else (a description) is taken whole.

    The per-host pending cap counts by host because one attacker has one host and many
    ports, and, on IPv6, many addresses in one /64.
    """
    if source.startswith("[") and "]" in source:
        return sourceNetwork(source[1 : source.index("]")])
    if source.count(":") == 1:
        return sourceNetwork(source.split(":", 1)[0])
    return sourceNetwork(source)


class DeviceRows(StoreCore):
    """L{IStore}'s devices and the requests waiting for an admin's (or a claim's) approval."""

    def deviceByName(self, name: str) -> Deferred[Device | None]:
        return self._run(self._deviceByName, name)

    def _deviceByName(self, name: str) -> Device | None:
        return self._deviceRow(self._cursor(), "d.name = ?", name)

    def lastLink(self, name: str) -> Deferred[LastLink | None]:
        return self._run(self._lastLink, name)

    def _lastLink(self, name: str) -> LastLink | None:
        c = self._cursor()
        row = c.execute(
            "SELECT last_link_auth, last_certificate_serial, last_certificate_fingerprint, "
            "last_certificate_not_after, last_certificate_at, last_link_kex "
            "FROM devices WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        certificate = None
        if row["last_certificate_serial"] is not None:
            certificate = LinkCertificate(
                serialNumber=row["last_certificate_serial"],
                fingerprint=row["last_certificate_fingerprint"],
                notAfter=row["last_certificate_not_after"],
                deviceName=name,
            )
        return LastLink(
            row["last_link_auth"], certificate, row["last_certificate_at"], row["last_link_kex"]
        )

    def deviceForKey(self, fingerprint: str) -> Deferred[Device | None]:
        return self._run(self._deviceForKey, fingerprint)

    def _deviceForKey(self, fingerprint: str) -> Device | None:
        return self._deviceRow(self._cursor(), "d.fingerprint = ?", fingerprint)

    def listDevices(self) -> Deferred[list[Device]]:
        return self._run(self._listDevices)

    def _listDevices(self) -> list[Device]:
        c = self._cursor()
        rows = c.execute(f"{_DEVICE_SELECT} ORDER BY d.name").fetchall()
        return self._withMemberships(c, [_device(r) for r in rows])

    def listEnrollmentRequests(self) -> Deferred[list[EnrollmentRequest]]:
        return self._run(self._listEnrollmentRequests)

    def _listEnrollmentRequests(self) -> list[EnrollmentRequest]:
        rows = self._read(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests "
            "ORDER BY requested_name, first_seen, fingerprint"
        )
        return [_request(r) for r in rows]

    def countPending(self) -> Deferred[int]:
        return self._run(self._countPending)

    def _countPending(self) -> int:
        return self._countPendingIn(self._cursor(), None, 0.0)

    def countPendingFrom(self, sourceHost: str, since: float) -> Deferred[int]:
        return self._run(self._countPendingFrom, sourceHost, since)

    def _countPendingFrom(self, host: str, since: float) -> int:
        return self._countPendingIn(self._cursor(), host, since)

    @staticmethod
    def _countPendingIn(c: Cursor, host: str | None, since: float) -> int:
        if host is None:
            row = c.execute("SELECT COUNT(*) AS n FROM enrollment_requests").fetchone()
        else:
            row = c.execute(
                "SELECT COUNT(*) AS n FROM enrollment_requests "
                "WHERE source_host = ? AND first_seen >= ?",
                (host, since),
            ).fetchone()
        return int(row["n"])

    def recordContact(
        self,
        requestedName: str,
        publicKey: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
        limits: PendingLimits | None = None,
        certificate: LinkCertificate | None = None,
        certificateRefused: bool = False,
        link: Callable[[str], LinkRecord] | None = None,
    ) -> Deferred[Device | EnrollmentRequest]:
        if link is None:
            link = _sameForAnyDevice(
                LinkRecord.refusedLink() if certificateRefused else LinkRecord(certificate)
            )
        elif certificate is not None or certificateRefused:
            raise TypeError("recordContact takes a link, or a certificate decision, not both")
        return self._run(
            self._recordContact,
            requestedName,
            publicKey,
            fingerprint,
            serial,
            source,
            now,
            limits,
            link,
        )

    def _recordContact(
        self,
        requestedName: str,
        publicKey: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
        limits: PendingLimits | None,
        link: Callable[[str], LinkRecord],
    ) -> Device | EnrollmentRequest:
        serial = cleanSerial(serial)
        with self._write() as c:
            device = self._deviceRow(c, "d.fingerprint = ?", fingerprint)
            if device is not None:
                # The key decides; requestedName is only a claim and is ignored here.
                if device.state != "approved":
                    return device
                if self._needsReapproval(device, now):
                    c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, device.name))
                    return self._upsertRequest(
                        c,
                        device.name,
                        device.publicKey,
                        fingerprint,
                        serial,
                        source,
                        now,
                        "reapprove",
                        None,
                    )
                # Only here is it known which device the key is: the caller says what its
                # link records for that device (its certificate's verdict), as it is.
                record = link(device.name)
                if record.refused:
                    # The caller refuses this login: seen, but no link to record.
                    c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, device.name))
                else:
                    self._recordLink(c, device.name, now, record)
                return self._deviceNamed(c, device.name)

            # Unknown key: only now is the claimed name worth validating and storing.
            _checkDeviceName(requestedName)
            line = _checkKey(publicKey, fingerprint)
            kind = "rekey" if self._deviceExists(c, requestedName) else "new"
            return self._upsertRequest(
                c, requestedName, line, fingerprint, serial, source, now, kind, limits
            )

    @staticmethod
    def _recordLink(c: Cursor, name: str, now: float, record: LinkRecord) -> None:
        """
        An approved device's link is accepted: its last contact, how it authenticated, the
        certificate it presented and the key exchange it negotiated, in the one statement a
        contact always cost.
        """
        certificate = record.certificate
        if certificate is None:
            c.execute(
                "UPDATE devices SET last_seen = ?, last_link_auth = 'key', last_link_kex = ? "
                "WHERE name = ?",
                (now, record.kex, name),
            )
        else:
            c.execute(
                "UPDATE devices SET last_seen = ?, last_link_auth = 'certificate', "
                "last_certificate_serial = ?, last_certificate_fingerprint = ?, "
                "last_certificate_not_after = ?, last_certificate_at = ?, last_link_kex = ? "
                "WHERE name = ?",
                (
                    now,
                    certificate.serialNumber,
                    certificate.fingerprint,
                    certificate.notAfter,
                    now,
                    record.kex,
                    name,
                ),
            )

    @staticmethod
    def _needsReapproval(device: Device, now: float) -> bool:
        """
        An approved device whose certificate ran out and that nobody approved since.

        Comparing with C{approvedAt} is what lets a one-step re-approval (or a claim) end
        the condition without touching the expired certificate's record.
        """
        expiresAt = device.certificateExpiresAt
        return expiresAt is not None and expiresAt <= now and device.approvedAt < expiresAt

    def _upsertRequest(
        self,
        c: Cursor,
        requestedName: str,
        line: str,
        fingerprint: str,
        serial: str | None,
        source: str,
        now: float,
        kind: str,
        limits: PendingLimits | None,
    ) -> EnrollmentRequest:
        existing = c.execute(
            "SELECT 1 FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        if existing is None:
            host = sourceHost(source)
            if limits is not None:
                self._checkLimits(c, limits, host, now)
            c.execute(
                f"INSERT INTO enrollment_requests ({_REQUEST_COLUMNS}, source_host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fingerprint, requestedName, line, serial, source, now, now, kind, host),
            )
            detail = {"fingerprint": fingerprint, "kind": kind, "serial": serial, "source": source}
            if kind in ("rekey", "reapprove"):
                # The serial the request's must match to be the same board: its notification
                # says whether it does once the agent's hello reports one (fleetwatch).
                detail["deviceSerial"] = c.execute(
                    "SELECT serial FROM devices WHERE name = ?", (requestedName,)
                ).fetchone()["serial"]
            self._insertAudit(
                c,
                "device.rekey-requested" if kind == "rekey" else "device.pending",
                None,
                requestedName,
                detail,
                now,
            )
        else:
            c.execute(
                "UPDATE enrollment_requests SET requested_name = ?, serial = COALESCE(?, serial), "
                "source = ?, last_seen = ?, kind = ? WHERE fingerprint = ?",
                (requestedName, serial, source, now, kind, fingerprint),
            )
        request = self._requestFor(c, fingerprint)
        assert request is not None
        return request

    @staticmethod
    def _requestFor(c: Cursor, fingerprint: str) -> EnrollmentRequest | None:
        row = c.execute(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return _request(row) if row is not None else None

    def _checkLimits(self, c: Cursor, limits: PendingLimits, host: str, now: float) -> None:
        if self._countPendingIn(c, None, 0.0) >= limits.total:
            raise PendingLimitReached(
                f"too many devices are waiting for approval ({limits.total}); try again later"
            )
        if self._countPendingIn(c, host, now - limits.window) >= limits.perHost:
            raise PendingLimitReached(
                f"too many new devices from {host} ({limits.perHost} per "
                f"{limits.window:g} s); try again later"
            )

    def updateSerial(
        self, fingerprint: str, serial: str | None, now: float | None = None
    ) -> Deferred[bool]:
        return self._run(self._updateSerial, fingerprint, serial, now)

    def _updateSerial(self, fingerprint: str, serial: str | None, now: float | None) -> bool:
        serial = cleanSerial(serial)
        with self._write() as c:
            row = c.execute(
                "SELECT name, serial FROM devices WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            table = "devices"
            if row is None:
                row = c.execute(
                    "SELECT requested_name AS name, serial FROM enrollment_requests "
                    "WHERE fingerprint = ?",
                    (fingerprint,),
                ).fetchone()
                table = "enrollment_requests"
            if row is None:
                return False
            previous = row["serial"]
            if table == "devices":
                reapproval = c.execute(
                    "SELECT serial FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
                if reapproval is not None:
                    # A device asking to be re-approved with its own key: the serial goes on
                    # its request only, as a new key's does (its notification, the approval
                    # take it there). The device keeps the serial it was approved with until
                    # the request is approved, so the two can be compared (serial_matches).
                    table = "enrollment_requests"
                    c.execute(
                        "UPDATE enrollment_requests SET serial = ? WHERE fingerprint = ?",
                        (serial, fingerprint),
                    )
                    if reapproval["serial"] is not None:
                        previous = reapproval["serial"]
            if previous != serial:
                c.execute(
                    f"UPDATE {table} SET serial = ? WHERE fingerprint = ?", (serial, fingerprint)
                )
                # Without a clock argument the audit time is the key's last recorded
                # contact: the serial is reported right after that login.
                if now is not None:
                    when = now
                elif table == "devices":
                    when = c.execute(
                        "SELECT COALESCE(last_seen, approved_at) AS t FROM devices "
                        "WHERE fingerprint = ?",
                        (fingerprint,),
                    ).fetchone()["t"]
                else:
                    when = c.execute(
                        "SELECT last_seen AS t FROM enrollment_requests WHERE fingerprint = ?",
                        (fingerprint,),
                    ).fetchone()["t"]
                self._insertAudit(
                    c,
                    "device.serial-changed",
                    None,
                    row["name"],
                    {"fingerprint": fingerprint, "serial": serial, "previous": previous},
                    when,
                )
            return True

    def approveDevice(
        self, name: str, actor: str, now: float, fingerprint: str | None = None
    ) -> Deferred[Device]:
        return self._run(self._approveDevice, name, actor, now, fingerprint)

    def _approveDevice(self, name: str, actor: str, now: float, fingerprint: str | None) -> Device:
        with self._write() as c:
            requests = self._requestsNamed(c, name, fingerprint)
            device = self._deviceRow(c, "d.name = ?", name)

            if len(requests) > 1:
                raise AmbiguousRequest(name, requests, device, now)
            if requests:
                request = requests[0]
                if fingerprint is None and _replacesApprovedKey(device, request):
                    raise RekeyNeedsKey(device, request)
                return self._approveRequest(c, request, device, actor, now)
            if device is None:
                raise UnknownDevice(f"no device or pending request named {name!r}")
            if fingerprint is not None and fingerprint != device.fingerprint:
                raise UnknownDevice(f"no pending request for {name!r} with key {fingerprint}")
            if device.state == "approved":
                raise AlreadyExists(f"device {name!r} is already approved; nothing is pending")
            c.execute(
                "UPDATE devices SET state = 'approved', approved_at = ?, approved_by = ? "
                "WHERE name = ?",
                (now, actor, name),
            )
            self._insertAudit(
                c,
                "device.approved",
                actor,
                name,
                {"fingerprint": device.fingerprint, "kind": "reinstate", "serial": device.serial},
                now,
            )
            return self._deviceNamed(c, name)

    @staticmethod
    def _requestsNamed(c: Cursor, name: str, fingerprint: str | None) -> list[EnrollmentRequest]:
        """The requests asking for C{name} (only the one of key C{fingerprint}, if given)."""
        sql = f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE requested_name = ?"
        args: tuple[str, ...] = (name,)
        if fingerprint is not None:
            sql += " AND fingerprint = ?"
            args += (fingerprint,)
        return [_request(r) for r in c.execute(sql + " ORDER BY first_seen", args)]

    def _approveRequest(
        self,
        c: Cursor,
        request: EnrollmentRequest,
        device: Device | None,
        actor: str,
        now: float,
        owner: tuple[int, float] | None = None,
    ) -> Device:
        """
        Turn one request into the device's binding. Whether it is new, a re-key or a
        re-approval is decided from the devices table now, not from the request's kind
        recorded at contact time. Audits C{device.approved} unless C{owner} (a claim, whose
        caller audits C{device.claimed}) is given.
        """
        name = request.requestedName
        detail: dict[str, Any] = {"fingerprint": request.fingerprint, "serial": request.serial}
        ownerId, leaseUntil = owner if owner is not None else (None, None)
        if device is None:
            self._insertDevice(
                c,
                name,
                request.fingerprint,
                request.publicKey,
                request.serial,
                actor,
                now,
                request.lastSeen,
                ownerId,
                leaseUntil,
            )
            detail["kind"] = "new"
        elif device.fingerprint == request.fingerprint:
            c.execute(
                "UPDATE devices SET state = 'approved', serial = COALESCE(?, serial), "
                "approved_at = ?, approved_by = ?, last_seen = ? WHERE name = ?",
                (request.serial, now, actor, request.lastSeen, name),
            )
            detail["kind"] = "reapprove"
            # The serial the device was approved with, for the one its key reports now
            # (serial_matches in the notification: no, the key on another board).
            detail["deviceSerial"] = device.serial
        else:
            c.execute(
                "UPDATE devices SET state = 'approved', fingerprint = ?, public_key = ?, "
                "serial = ?, approved_at = ?, approved_by = ?, last_seen = ?, "
                "owner_account_id = NULL, lease_until = NULL WHERE name = ?",
                (
                    request.fingerprint,
                    request.publicKey,
                    request.serial,
                    now,
                    actor,
                    request.lastSeen,
                    name,
                ),
            )
            # The old key's certificates certify a key that is no longer this device's.
            detail["revokedCertificates"] = self._revokeCertificates(
                c, name, now, device.fingerprint
            )
            detail["kind"] = "rekey"
            detail["previousFingerprint"] = device.fingerprint
        if owner is not None:
            c.execute(
                "UPDATE devices SET owner_account_id = ?, lease_until = ? WHERE name = ?",
                (ownerId, leaseUntil, name),
            )
        c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (request.fingerprint,))
        if owner is None:
            self._insertAudit(c, "device.approved", actor, name, detail, now)
        return self._deviceNamed(c, name)

    @staticmethod
    def _insertDevice(
        c: Cursor,
        name: str,
        fingerprint: str,
        line: str,
        serial: str | None,
        actor: str,
        now: float,
        lastSeen: float | None,
        ownerId: int | None = None,
        leaseUntil: float | None = None,
    ) -> None:
        c.execute(
            f"INSERT INTO devices ({_DEVICE_INSERT_COLUMNS}) "
            "VALUES (?, 'approved', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, fingerprint, line, serial, now, actor, lastSeen, now, ownerId, leaseUntil),
        )
        # Other keys still asking for this name now ask for a taken one: they are re-keys.
        c.execute(
            "UPDATE enrollment_requests SET kind = 'rekey' "
            "WHERE requested_name = ? AND kind = 'new'",
            (name,),
        )

    def revokeDevice(self, name: str, actor: str, now: float) -> Deferred[Device]:
        return self._run(self._revokeDevice, name, actor, now)

    def _revokeDevice(self, name: str, actor: str, now: float) -> Device:
        with self._write() as c:
            device = self._deviceNamed(c, name)
            c.execute("UPDATE devices SET state = 'revoked' WHERE name = ?", (name,))
            revoked = self._revokeCertificates(c, name, now)
            # A pending re-approval of this key would otherwise undo the revocation.
            c.execute(
                "DELETE FROM enrollment_requests WHERE fingerprint = ?", (device.fingerprint,)
            )
            c.execute("DELETE FROM claim_codes WHERE fingerprint = ?", (device.fingerprint,))
            self._insertAudit(
                c,
                "device.revoked",
                actor,
                name,
                {"fingerprint": device.fingerprint, "revokedCertificates": revoked},
                now,
            )
            return self._deviceNamed(c, name)

    @staticmethod
    def _revokeCertificates(
        c: Cursor, name: str, now: float, fingerprint: str | None = None
    ) -> list[str]:
        where = "device_name = ? AND revoked_at IS NULL"
        args: tuple[Any, ...] = (name,)
        if fingerprint is not None:
            where += " AND fingerprint = ?"
            args += (fingerprint,)
        rows = c.execute(
            f"UPDATE certificates SET revoked_at = ? WHERE {where} RETURNING serial_number",
            (now, *args),
        ).fetchall()
        return sorted(r["serial_number"] for r in rows)

    def touchDevice(self, name: str, now: float) -> Deferred[None]:
        return self._run(self._touchDevice, name, now)

    def _touchDevice(self, name: str, now: float) -> None:
        with self._write() as c:
            c.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, name))
            if c.rowcount == 0:
                raise UnknownDevice(f"no device named {name!r}")

    # -- pending requests: rejected by an admin, expired when not seen ------------------

    def rejectRequest(
        self, name: str, actor: str, now: float, fingerprint: str | None = None
    ) -> Deferred[EnrollmentRequest]:
        return self._run(self._rejectRequest, name, actor, now, fingerprint)

    def _rejectRequest(
        self, name: str, actor: str, now: float, fingerprint: str | None
    ) -> EnrollmentRequest:
        with self._write() as c:
            requests = self._requestsNamed(c, name, fingerprint)
            if len(requests) > 1:
                device = self._deviceRow(c, "d.name = ?", name)
                raise AmbiguousRequest(name, requests, device, now)
            if not requests:
                withKey = "" if fingerprint is None else f" with key {fingerprint}"
                raise UnknownDevice(f"no pending request for {name!r}{withKey}")
            (request,) = requests
            self._dropRequest(c, request, "enrollment.rejected", actor, now)
            return request

    def staleRequests(self, seenBefore: float) -> Deferred[list[EnrollmentRequest]]:
        return self._run(self._staleRequests, seenBefore)

    def _staleRequests(self, seenBefore: float) -> list[EnrollmentRequest]:
        rows = self._read(
            f"SELECT {_REQUEST_COLUMNS} FROM enrollment_requests WHERE last_seen < ? "
            "ORDER BY last_seen, fingerprint",
            (seenBefore,),
        )
        return [_request(r) for r in rows]

    def touchRequests(self, fingerprints: Sequence[str], now: float) -> Deferred[int]:
        return self._run(self._touchRequests, list(fingerprints), now)

    def _touchRequests(self, fingerprints: list[str], now: float) -> int:
        if not fingerprints:
            return 0
        with self._write() as c:
            c.execute(
                "UPDATE enrollment_requests SET last_seen = ? "
                f"WHERE fingerprint IN ({', '.join('?' * len(fingerprints))})",
                (now, *fingerprints),
            )
            return int(c.rowcount)

    def expireRequest(
        self, fingerprint: str, seenBefore: float, now: float
    ) -> Deferred[EnrollmentRequest | None]:
        return self._run(self._expireRequest, fingerprint, seenBefore, now)

    def _expireRequest(
        self, fingerprint: str, seenBefore: float, now: float
    ) -> EnrollmentRequest | None:
        with self._write() as c:
            request = self._requestFor(c, fingerprint)
            if request is None or request.lastSeen >= seenBefore:
                return None  # approved, rejected or seen since staleRequests listed it
            self._dropRequest(c, request, "enrollment.expired", None, now)
            return request

    def _dropRequest(
        self, c: Cursor, request: EnrollmentRequest, event: str, actor: str | None, now: float
    ) -> None:
        """
        Remove a pending request and its key's claim code, audited as C{event}: the
        request as it was (the fleet watcher closes its agent's link if one is connected).
        """
        c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (request.fingerprint,))
        c.execute("DELETE FROM claim_codes WHERE fingerprint = ?", (request.fingerprint,))
        detail = {
            "fingerprint": request.fingerprint,
            "kind": request.kind,
            "serial": request.serial,
            "source": request.source,
            "lastSeen": request.lastSeen,
        }
        self._insertAudit(c, event, actor, request.requestedName, detail, now)
