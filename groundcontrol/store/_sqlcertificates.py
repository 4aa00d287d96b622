"""The SQL store's certificates: the ones groundcontrol issued to devices, and their state."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from ._dialect import Row
from ._errors import AlreadyExists, StoreError
from ._records import Certificate, CertificateState
from ._sqlcore import StoreCore

_CERTIFICATE_COLUMNS = (
    "serial_number, device_name, fingerprint, not_before, not_after, issued_at, revoked_at"
)


def _certificate(row: Row) -> Certificate:
    return Certificate(
        serialNumber=row["serial_number"],
        deviceName=row["device_name"],
        fingerprint=row["fingerprint"],
        notBefore=row["not_before"],
        notAfter=row["not_after"],
        issuedAt=row["issued_at"],
        revokedAt=row["revoked_at"],
    )


class CertificateRows(StoreCore):
    """L{IStore}'s certificates: recording an issued one, its state, a device's list."""

    def recordCertificate(
        self,
        deviceName: str,
        serialNumber: str,
        fingerprint: str,
        notBefore: float,
        notAfter: float,
        now: float,
    ) -> Deferred[Certificate]:
        return self._run(
            self._recordCertificate, deviceName, serialNumber, fingerprint, notBefore, notAfter, now
        )

    def _recordCertificate(
        self,
        deviceName: str,
        serialNumber: str,
        fingerprint: str,
        notBefore: float,
        notAfter: float,
        now: float,
    ) -> Certificate:
        if not serialNumber or not isinstance(serialNumber, str):
            raise StoreError("a certificate serial number is a non-empty string")
        if notAfter <= notBefore:
            raise StoreError("a certificate must end after it starts")
        with self._write() as c:
            device = self._deviceNamed(c, deviceName)
            if device.state != "approved":
                raise StoreError(f"device {deviceName!r} is {device.state}; no certificate")
            if device.fingerprint != fingerprint:
                raise StoreError(
                    f"device {deviceName!r} has key {device.fingerprint}, not {fingerprint}"
                )
            if c.execute(
                "SELECT 1 FROM certificates WHERE serial_number = ?", (serialNumber,)
            ).fetchone():
                raise AlreadyExists(f"certificate serial {serialNumber} was already issued")
            c.execute(
                f"INSERT INTO certificates ({_CERTIFICATE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (serialNumber, deviceName, fingerprint, notBefore, notAfter, now),
            )
            self._insertAudit(
                c,
                "certificate.issued",
                None,
                deviceName,
                {"serialNumber": serialNumber, "fingerprint": fingerprint, "notAfter": notAfter},
                now,
            )
        return Certificate(serialNumber, deviceName, fingerprint, notBefore, notAfter, now, None)

    def certificateState(self, serialNumber: str, now: float) -> Deferred[CertificateState]:
        return self._run(self._certificateState, serialNumber, now)

    def _certificateState(self, serialNumber: str, now: float) -> CertificateState:
        rows = self._read(
            "SELECT not_after, revoked_at FROM certificates WHERE serial_number = ?",
            (serialNumber,),
        )
        if not rows:
            return "unknown"
        if rows[0]["revoked_at"] is not None:
            return "revoked"
        if rows[0]["not_after"] <= now:
            return "expired"
        return "valid"

    def listCertificates(self, deviceName: str) -> Deferred[list[Certificate]]:
        return self._run(self._listCertificates, deviceName)

    def _listCertificates(self, deviceName: str) -> list[Certificate]:
        rows = self._read(
            f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE device_name = ? "
            "ORDER BY issued_at, serial_number",
            (deviceName,),
        )
        return [_certificate(r) for r in rows]
