"""
Revoked certificate serials, kept in memory for the TLS handshake.

The TLS layer asks "is this client certificate revoked?" in the middle of a
handshake, where there is no time for a database round trip. This set is
loaded from the store at start-up and refreshed for a device whenever the
change feed reports it revoked or re-keyed, so the answer is always local.
"""

from __future__ import annotations

from twisted.logger import Logger

from groundcontrol.store import IStore


class RevokedCertificates:
    """The serial numbers (lower-case hex) of every revoked device certificate."""

    _log = Logger()

    def __init__(self, store: IStore) -> None:
        self._store = store
        self._serials: set[str] = set()

    def __contains__(self, serialNumber: object) -> bool:
        return isinstance(serialNumber, str) and serialNumber.lower() in self._serials

    def isRevoked(self, serialNumber: str) -> bool:
        """For L{accesstunnel.transports.tls.ServerTLS.isRevoked}."""
        return serialNumber in self

    async def load(self) -> None:
        """Read every device's revoked certificates."""
        for device in await self._store.listDevices():
            await self.refresh(device.name)
        self._log.info("{count} revoked certificates known", count=len(self._serials))

    async def refresh(self, deviceName: str) -> None:
        """Re-read one device's certificates (after a revocation or a re-key)."""
        for certificate in await self._store.listCertificates(deviceName):
            if certificate.revokedAt is not None:
                self._serials.add(certificate.serialNumber.lower())
