"""
The SQL store's ways to enroll without an admin at hand: tokens, and claims with their leases.

A token enrolls a new device at once; a claim code, shown by the device, lets an operator
approve it and hold it on a lease. Both store only the secret's hash (L{hashSecret}), and
both approve through L{DeviceRows}.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from ._dialect import Cursor, Row
from ._errors import (
    AlreadyExists,
    ClaimCodeExpired,
    ClaimCodeInvalid,
    ClaimRefused,
    NameTaken,
    StoreError,
    TokenExhausted,
    TokenExpired,
    TokenInvalid,
    UnknownDevice,
)
from ._records import Account, Device, EnrollmentRequest, TokenRecord
from ._sqlcore import _DEVICE_SELECT, _device
from ._sqldevices import DeviceRows
from ._sqlvalidation import _checkDeviceName, _checkKey, cleanSerial

_SHA256_HEX_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_TOKEN_COLUMNS = "id, uses, uses_left, expires_at, created_at, created_by"


def _token(row: Row) -> TokenRecord:
    return TokenRecord(
        id=int(row["id"]),
        uses=int(row["uses"]),
        usesLeft=int(row["uses_left"]),
        expiresAt=row["expires_at"],
        createdAt=row["created_at"],
        createdBy=row["created_by"],
    )


def hashSecret(secret: str) -> str:
    """
    What the store keeps of an enrollment token or a pairing code: SHA-256 of its UTF-8, hex.

    The CLI (which makes tokens) and the server (which checks them) must hash alike; both
    call this. A plain hash suffices for tokens (32 random bytes); short pairing codes are
    protected by living minutes and being single use, not by the hash.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _checkHash(value: str, what: str) -> None:
    """Refuse anything but SHA-256 hex, so a raw token or code is never stored by mistake."""
    if not isinstance(value, str) or _SHA256_HEX_RE.match(value) is None:
        raise StoreError(f"{what} must be the SHA-256 of the secret as 64 lower-case hex digits")


class EnrollmentRows(DeviceRows):
    """L{IStore}'s enrollment tokens, claim codes and the leases claims hold."""

    def createToken(
        self, tokenHash: str, uses: int, expiresAt: float, actor: str, now: float
    ) -> Deferred[TokenRecord]:
        return self._run(self._createToken, tokenHash, uses, expiresAt, actor, now)

    def _createToken(
        self, tokenHash: str, uses: int, expiresAt: float, actor: str, now: float
    ) -> TokenRecord:
        _checkHash(tokenHash, "a token hash")
        if not isinstance(uses, int) or uses < 1:
            raise StoreError(f"a token needs at least one use, not {uses!r}")
        if expiresAt <= now:
            raise StoreError("a token must expire in the future")
        with self._write() as c:
            if c.execute("SELECT 1 FROM tokens WHERE token_hash = ?", (tokenHash,)).fetchone():
                raise AlreadyExists("that token already exists")
            row = c.execute(
                "INSERT INTO tokens (token_hash, uses, uses_left, expires_at, created_at, "
                f"created_by) VALUES (?, ?, ?, ?, ?, ?) RETURNING {_TOKEN_COLUMNS}",
                (tokenHash, uses, uses, expiresAt, now, actor),
            ).fetchone()
            token = _token(row)
            self._insertAudit(
                c,
                "token.created",
                actor,
                None,
                {"token": token.id, "uses": uses, "expiresAt": expiresAt},
                now,
            )
        return token

    def listTokens(self) -> Deferred[list[TokenRecord]]:
        return self._run(self._listTokens)

    def _listTokens(self) -> list[TokenRecord]:
        return [_token(r) for r in self._read(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY id")]

    def redeemToken(
        self,
        tokenHash: str,
        fingerprint: str,
        publicKey: str,
        requestedName: str,
        serial: str | None,
        source: str,
        now: float,
    ) -> Deferred[Device]:
        return self._run(
            self._redeemToken, tokenHash, fingerprint, publicKey, requestedName, serial, source, now
        )

    def _redeemToken(
        self,
        tokenHash: str,
        fingerprint: str,
        publicKey: str,
        requestedName: str,
        serial: str | None,
        source: str,
        now: float,
    ) -> Device:
        _checkDeviceName(requestedName)
        line = _checkKey(publicKey, fingerprint)
        serial = cleanSerial(serial)
        with self._write() as c:
            token = c.execute(
                f"SELECT id, uses_left, expires_at FROM tokens WHERE token_hash = ?"
                f"{self.dialect.forUpdate}",
                (tokenHash,),
            ).fetchone()
            if token is None:
                raise TokenInvalid("no such enrollment token")
            tokenId = int(token["id"])
            if token["expires_at"] <= now:
                raise TokenExpired(f"enrollment token {tokenId} has expired")
            if c.execute(
                "SELECT 1 FROM token_redemptions WHERE token_id = ? AND fingerprint = ?",
                (tokenId, fingerprint),
            ).fetchone():
                raise TokenInvalid(f"this key has already redeemed enrollment token {tokenId}")
            known = self._deviceRow(c, "d.fingerprint = ?", fingerprint)
            if known is not None:
                raise AlreadyExists(
                    f"this key is already device {known.name!r} ({known.state}); "
                    "tokens only enroll new devices"
                )
            if self._deviceExists(c, requestedName):
                raise NameTaken(
                    f"device {requestedName!r} exists with another key; "
                    "a token cannot re-key it (ask an admin)"
                )
            # Conditional: even without the row lock, two redeemers cannot both take the last.
            c.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ? AND uses_left > 0",
                (tokenId,),
            )
            if c.rowcount != 1:
                raise TokenExhausted(f"enrollment token {tokenId} has no uses left")
            c.execute(
                "INSERT INTO token_redemptions (token_id, fingerprint, device_name, redeemed_at) "
                "VALUES (?, ?, ?, ?)",
                (tokenId, fingerprint, requestedName, now),
            )
            actor = f"token:{tokenId}"
            self._insertDevice(c, requestedName, fingerprint, line, serial, actor, now, now)
            c.execute("DELETE FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,))
            self._insertAudit(
                c,
                "device.approved",
                actor,
                requestedName,
                {
                    "fingerprint": fingerprint,
                    "serial": serial,
                    "kind": "token",
                    "token": tokenId,
                    "source": source,
                },
                now,
            )
            return self._deviceNamed(c, requestedName)

    # -- claims ---------------------------------------------------------------------

    def registerClaimCode(
        self,
        codeHash: str,
        fingerprint: str,
        requestedName: str,
        expiresAt: float,
        now: float,
    ) -> Deferred[None]:
        return self._run(
            self._registerClaimCode, codeHash, fingerprint, requestedName, expiresAt, now
        )

    def _registerClaimCode(
        self,
        codeHash: str,
        fingerprint: str,
        requestedName: str,
        expiresAt: float,
        now: float,
    ) -> None:
        _checkHash(codeHash, "a claim code hash")
        _checkDeviceName(requestedName)
        if expiresAt <= now:
            raise StoreError("a claim code must expire in the future")
        with self._write() as c:
            # The claim takes the key from the request (or the device) the agent's login
            # recorded: a code is only ever registered for a key that has connected.
            if not (
                c.execute(
                    "SELECT 1 FROM enrollment_requests WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
                or c.execute(
                    "SELECT 1 FROM devices WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
            ):
                raise UnknownDevice(f"no device or pending request has key {fingerprint}")
            c.execute(
                "DELETE FROM claim_codes WHERE fingerprint = ? OR expires_at <= ?",
                (fingerprint, now),
            )
            if c.execute("SELECT 1 FROM claim_codes WHERE code_hash = ?", (codeHash,)).fetchone():
                raise AlreadyExists("that claim code is in use; make another")
            c.execute(
                "INSERT INTO claim_codes (code_hash, fingerprint, requested_name, expires_at, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (codeHash, fingerprint, requestedName, expiresAt, now),
            )
            # The hash of a short code is easy to invert: it stays out of the audit log.
            self._insertAudit(
                c,
                "claim.code-registered",
                None,
                requestedName,
                {"fingerprint": fingerprint, "expiresAt": expiresAt},
                now,
            )

    def claimDevice(
        self, codeHash: str, account: Account, leaseUntil: float, now: float
    ) -> Deferred[Device]:
        return self._run(self._claimDevice, codeHash, account, leaseUntil, now)

    def _claimDevice(
        self, codeHash: str, account: Account, leaseUntil: float, now: float
    ) -> Device:
        if leaseUntil <= now:
            raise StoreError("a claim's lease must end in the future")
        with self._write() as c:
            code = c.execute(
                "SELECT fingerprint, requested_name, expires_at FROM claim_codes "
                "WHERE code_hash = ?",
                (codeHash,),
            ).fetchone()
            if code is None:
                raise ClaimCodeInvalid("no such claim code (it may have been used or replaced)")
            if code["expires_at"] <= now:
                raise ClaimCodeExpired("the claim code has expired; show a new one")
            fingerprint = code["fingerprint"]
            c.execute("DELETE FROM claim_codes WHERE code_hash = ?", (codeHash,))
            actor = f"claim:{account.name}"
            owner = (account.id, leaseUntil)
            device = self._deviceRow(c, "d.fingerprint = ?", fingerprint)
            request = self._requestFor(c, fingerprint)

            if device is None:
                if request is None:
                    raise ClaimCodeInvalid("the device is no longer waiting to be claimed")
                name = code["requested_name"]
                request = attrs.evolve(request, requestedName=name)
                if self._deviceExists(c, name):
                    raise NameTaken(
                        f"device {name!r} exists with another key; a claim cannot re-key it"
                    )
                claimed = self._approveRequest(c, request, None, actor, now, owner)
                kind = "new"
            else:
                kind = self._claimableKind(device, request, account, now)
                if request is not None:
                    claimed = self._approveRequest(c, request, device, actor, now, owner)
                else:
                    c.execute(
                        "UPDATE devices SET owner_account_id = ?, lease_until = ? WHERE name = ?",
                        (account.id, leaseUntil, device.name),
                    )
                    claimed = self._deviceNamed(c, device.name)
            detail: dict[str, Any] = {
                "owner": account.name,
                "leaseUntil": leaseUntil,
                "fingerprint": fingerprint,
                "kind": kind,
                # As an approval's: what the request's agent reported, else the device's.
                "serial": claimed.serial if request is None else request.serial,
            }
            if kind == "reapprove" and device is not None:
                detail["deviceSerial"] = device.serial
            self._insertAudit(c, "device.claimed", account.name, claimed.name, detail, now)
            return claimed

    @staticmethod
    def _claimableKind(
        device: Device, request: EnrollmentRequest | None, account: Account, now: float
    ) -> str:
        """
        Decide whether a known device may be claimed, and as what.

        A claim proves someone can read the device's screen or logs; that is enough to take
        a device nobody vouched for, not one an admin approved or another operator holds.
        """
        if device.state != "approved":
            raise ClaimRefused(f"device {device.name!r} is revoked; only an admin can reinstate it")
        if request is not None and request.kind == "reapprove":
            if device.owner not in (None, account.name) and (device.leaseUntil or 0) > now:
                raise ClaimRefused(f"device {device.name!r} is owned by {device.owner}")
            return "reapprove"
        if device.owner == account.name:
            return "renew"
        if device.approvedBy.startswith("claim:") and (
            device.owner is None or (device.leaseUntil or 0) <= now
        ):
            return "reclaim"
        raise ClaimRefused(
            f"device {device.name!r} is already approved"
            + (f" and owned by {device.owner}" if device.owner else "")
            + "; ask an admin for a grant"
        )

    def lapsedLeases(self, now: float) -> Deferred[list[Device]]:
        return self._run(self._lapsedLeases, now)

    def _lapsedLeases(self, now: float) -> list[Device]:
        rows = self._read(
            f"{_DEVICE_SELECT} WHERE d.owner_account_id IS NOT NULL AND d.lease_until <= ? "
            "ORDER BY d.lease_until, d.name",
            (now,),
        )
        return [_device(r) for r in rows]

    def endLease(self, name: str, now: float) -> Deferred[Device | None]:
        return self._run(self._endLease, name, now)

    def _endLease(self, name: str, now: float) -> Device | None:
        with self._write() as c:
            device = self._deviceNamed(c, name)
            if device.owner is None or device.leaseUntil is None or device.leaseUntil > now:
                return None  # no lease, or renewed since lapsedLeases saw it
            c.execute(
                "UPDATE devices SET owner_account_id = NULL, lease_until = NULL WHERE name = ?",
                (name,),
            )
            self._insertAudit(
                c,
                "claim.lapsed",
                None,
                name,
                {"owner": device.owner, "leaseUntil": device.leaseUntil},
                now,
            )
            return self._deviceNamed(c, name)

    def renewLease(
        self, name: str, account: Account, leaseUntil: float, now: float
    ) -> Deferred[Device]:
        return self._run(self._renewLease, name, account, leaseUntil, now)

    def _renewLease(self, name: str, account: Account, leaseUntil: float, now: float) -> Device:
        if leaseUntil <= now:
            raise StoreError("a claim's lease must end in the future")
        with self._write() as c:
            device = self._leaseHeldBy(c, name, account, now)
            c.execute("UPDATE devices SET lease_until = ? WHERE name = ?", (leaseUntil, name))
            self._insertAudit(
                c,
                "claim.renewed",
                account.name,
                name,
                {"owner": device.owner, "leaseUntil": leaseUntil, "was": device.leaseUntil},
                now,
            )
            return self._deviceNamed(c, name)

    def releaseLease(self, name: str, account: Account, now: float) -> Deferred[Device]:
        return self._run(self._releaseLease, name, account, now)

    def _releaseLease(self, name: str, account: Account, now: float) -> Device:
        with self._write() as c:
            device = self._leaseHeldBy(c, name, account, now)
            c.execute(
                "UPDATE devices SET owner_account_id = NULL, lease_until = NULL WHERE name = ?",
                (name,),
            )
            self._insertAudit(
                c,
                "claim.released",
                account.name,
                name,
                {"owner": device.owner, "leaseUntil": device.leaseUntil},
                now,
            )
            return self._deviceNamed(c, name)

    def _leaseHeldBy(self, c: Cursor, name: str, account: Account, now: float) -> Device:
        """The device C{name} if it has a live lease C{account} may change, else why not."""
        device = self._deviceNamed(c, name)
        if device.state != "approved":
            raise ClaimRefused(f"device {name!r} is {device.state}")
        if device.owner is None or device.leaseUntil is None:
            raise ClaimRefused(f"device {name!r} is not claimed by anyone")
        if device.owner != account.name and not account.isAdmin:
            raise ClaimRefused(f"device {name!r} is claimed by {device.owner}, not by you")
        if device.leaseUntil <= now:
            raise ClaimRefused(
                f"the lease of {device.owner} on {name!r} has ended; "
                "claim it again with the code the device shows"
            )
        return device
