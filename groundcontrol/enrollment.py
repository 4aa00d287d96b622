"""
groundcontrol's side of the agent's enrollment requests, on the device link.

An agent sends, as SSH global requests carrying JSON:

  - ``hello``: its version and board serial; the answer says whether it is
    approved (and under which name) or pending;
  - ``enroll``: an enrollment token, redeemed atomically in the store;
  - ``claim-code``: the pairing code it shows, so an operator can claim it;
  - ``certificate``: a new fleet certificate for its key (approved only).

Every answer is a JSON object with ``ok``; refusals carry an ``error`` text
the agent logs. The routing name always comes from the store's record of
the key, never from what the agent asks for.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from accesstunnel.enrollmessages import (
    CERTIFICATE,
    CLAIM_CODE,
    ENROLL,
    HELLO,
    decodeMessage,
    encodeMessage,
)
from accesstunnel.timetext import isoTime
from groundcontrol.pki import FleetCA, issueDeviceCertificate
from groundcontrol.store import IStore, StoreError, hashSecret

#: How long a pairing code registered by an agent stays claimable.
CLAIM_CODE_LIFETIME = 600.0


def normaliseCode(code: str) -> str:
    """Pairing codes compare case- and separator-insensitively (K7QP-M2XD = k7qpm2xd)."""
    return "".join(c for c in code.upper() if c.isalnum())


def encodeReply(payload: dict[str, Any]) -> tuple[int, bytes]:
    """A successful global-request answer carrying C{payload}."""
    return 1, encodeMessage(payload)


def decodeRequest(data: bytes) -> dict[str, Any]:
    """A request body as a dict; anything malformed as an empty one."""
    try:
        return decodeMessage(data)
    except ValueError:
        return {}


@attrs.frozen
class CertificatePolicy:
    """Which CA signs device certificates, and for how long."""

    ca: FleetCA
    lifetime: timedelta = timedelta(days=30)


class AgentRequests:
    """Answer one agent's enrollment requests."""

    _log = Logger()

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        certificates: CertificatePolicy | None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._certificates = certificates

    #: The global requests L{handle} answers; any other is refused.
    handled = frozenset((HELLO, ENROLL, CLAIM_CODE, CERTIFICATE))

    async def handle(self, avatar: Any, requestType: bytes, data: bytes) -> Any:
        """Dispatch one request from C{avatar}'s agent; 0 for unknown ones."""
        if requestType not in self.handled:
            return 0  # keepalive@openssh.com and the like: a refusal is the answer
        request = decodeRequest(data)
        try:
            if requestType == HELLO:
                return await self._hello(avatar, request)
            if requestType == ENROLL:
                return await self._enroll(avatar, request)
            if requestType == CLAIM_CODE:
                return await self._claimCode(avatar, request)
            if requestType == CERTIFICATE:
                return await self._certificate(avatar)
        except StoreError as e:
            return encodeReply({"ok": False, "error": str(e)})
        return 0

    async def _hello(self, avatar: Any, request: dict[str, Any]) -> Any:
        login = avatar.login
        serial = str(request.get("serial") or "")[:128] or None
        if serial is not None:
            await self._store.updateSerial(login.keyFingerprint, serial, self._clock.seconds())
        if avatar.link is not None:
            avatar.link.details = {
                "version": str(request.get("version", ""))[:32],
                "serial": serial or "",
                "transport": str(request.get("transport", ""))[:16],
            }
        tags = request.get("tags")
        if isinstance(tags, list):
            # Kept for a pending device too: reported once it is approved.
            avatar.reportedTags = [str(t) for t in tags[:64]]
        if avatar.deviceName is not None:
            await self.reportTags(avatar)
            device = await self._store.deviceByName(avatar.deviceName)
            # No unrevoked, unexpired certificate on record for its key: whatever the
            # agent holds (a revoked one, say) it should ask for a new one now.
            needsCertificate = device is None or device.certificateExpiresAt is None
            return encodeReply(
                {
                    "ok": True,
                    "state": "approved",
                    "name": avatar.deviceName,
                    "needsCertificate": needsCertificate,
                }
            )
        # Not the request's kind: "rekey" (the name asked for is another key's device)
        # would tell anyone with a fresh key which device names exist. The kind is the
        # admins' to see (ctl pending); its own key's expiry ("reapprove") it may know.
        state = "reapprove" if avatar.pendingKind == "reapprove" else "pending"
        return encodeReply({"ok": True, "state": state})

    async def reportTags(self, avatar: Any) -> None:
        """Store the tags the agent reported in its hello, for an approved device."""
        tags = getattr(avatar, "reportedTags", None)
        if avatar.deviceName is not None and tags is not None:
            await self._store.reportTags(avatar.deviceName, tags, self._clock.seconds())

    async def _enroll(self, avatar: Any, request: dict[str, Any]) -> Any:
        if avatar.deviceName is not None:
            return encodeReply({"ok": True, "name": avatar.deviceName})
        token = request.get("token")
        if not isinstance(token, str) or not token:
            return encodeReply({"ok": False, "error": "no token given"})
        login = avatar.login
        # The serial the agent reported in its hello: the new device record (and so its
        # certificate) binds it, as an approval of a pending request does.
        details = avatar.link.details if avatar.link is not None else {}
        device = await self._store.redeemToken(
            hashSecret(token),
            login.keyFingerprint,
            login.publicKey,
            login.requestedName,
            details.get("serial") or None,
            avatar.source,
            self._clock.seconds(),
        )
        self._log.info("device {device} enrolled with a token", device=device.name)
        avatar.promote(device.name, notify=False)
        return encodeReply({"ok": True, "name": device.name})

    async def _claimCode(self, avatar: Any, request: dict[str, Any]) -> Any:
        if avatar.deviceName is not None:
            return encodeReply({"ok": False, "error": "already approved"})
        code = normaliseCode(str(request.get("code", "")))
        if not 8 <= len(code) <= 32:
            return encodeReply({"ok": False, "error": "a pairing code has 8 to 32 characters"})
        now = self._clock.seconds()
        login = avatar.login
        await self._store.registerClaimCode(
            hashSecret(code),
            login.keyFingerprint,
            login.requestedName,
            now + CLAIM_CODE_LIFETIME,
            now,
        )
        return encodeReply({"ok": True, "expires": now + CLAIM_CODE_LIFETIME})

    async def _certificate(self, avatar: Any) -> Any:
        if avatar.deviceName is None:
            return encodeReply({"ok": False, "error": "not approved"})
        if self._certificates is None:
            return encodeReply({"ok": False, "error": "this server has no fleet CA"})
        device = await self._store.deviceByName(avatar.deviceName)
        if device is None or device.state != "approved":
            return encodeReply({"ok": False, "error": "not approved"})
        now = self._clock.seconds()
        issued = issueDeviceCertificate(
            self._certificates.ca,
            device.name,
            device.serial,
            device.publicKey,
            datetime.fromtimestamp(now, UTC),
            self._certificates.lifetime,
        )
        await self._store.recordCertificate(
            device.name,
            issued.serialNumber,
            issued.fingerprint,
            issued.notBefore.timestamp(),
            issued.notAfter.timestamp(),
            now,
        )
        self._log.info(
            "issued certificate {serial} to {device} until {notAfter}",
            serial=issued.serialNumber,
            device=device.name,
            notAfter=isoTime(issued.notAfter),
        )
        return encodeReply(
            {
                "ok": True,
                "certificate": issued.pem.decode("ascii"),
                "ca": self._certificates.ca.certificatePEM.decode("ascii"),
            }
        )
