"""
Approving a re-key in the store: a request asking for an approved device's name with
another key replaces the device's key only when the approval names that key; by name
alone it is refused (RekeyNeedsKey), with what the admin needs to decide, and nothing
changes. A revoked device coming back with a new key, and a new name, approve by name as
before. On SQLite and PostgreSQL.
"""

from __future__ import annotations

from groundcontrol.documents import auditEventJSON
from groundcontrol.rekeyreview import refusalText
from groundcontrol.store import AmbiguousRequest, RekeyNeedsKey
from tests.test_store import T0, StoreTestCase, bothBackends, fingerprint, newPublicKey


@bothBackends
class RekeyApprovalTests(StoreTestCase):
    """approveDevice on a request for another key's device."""

    def approvedWithSerial(self, name: str, serial: str) -> str:
        """An approved device C{name} whose board reported C{serial}; return its key."""
        key = newPublicKey()
        self.contact(name, key, T0, serial=serial)
        self.successResultOf(self.store.approveDevice(name, "admin", T0))
        return key

    def test_byNameRefusedAndNothingChanges(self) -> None:
        """
        C{approve kiln7} with a stranger's request pending fails with RekeyNeedsKey, which
        carries the device (its key, serial, last seen) and the request (its key, serial,
        source, first seen) and names the command; the device keeps its key, the request
        stays pending, and nothing is audited.
        """
        oldKey = self.approvedWithSerial("kiln7", "SN-1")
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 5, serial="SN-2", source="203.0.113.9:4000")
        lastEvent = self.events()[-1].id

        refusal = self.failureOf(self.store.approveDevice("kiln7", "root", T0 + 6), RekeyNeedsKey)
        assert isinstance(refusal, RekeyNeedsKey)
        device, request = refusal.device, refusal.request
        self.assertEqual((device.name, device.fingerprint), ("kiln7", fingerprint(oldKey)))
        self.assertEqual((device.serial, device.lastSeen), ("SN-1", T0))
        self.assertEqual(
            (request.fingerprint, request.serial, request.source, request.firstSeen),
            (fingerprint(newKey), "SN-2", "203.0.113.9:4000", T0 + 5),
        )
        self.assertIn(f"approve kiln7 --key {fingerprint(newKey)}", str(refusal))
        kiln7 = self.successResultOf(self.store.deviceForKey(fingerprint(oldKey)))
        assert kiln7 is not None
        self.assertEqual((kiln7.name, kiln7.state), ("kiln7", "approved"))
        pending = self.successResultOf(self.store.listEnrollmentRequests())
        self.assertEqual(
            [(r.fingerprint, r.kind) for r in pending], [(fingerprint(newKey), "rekey")]
        )
        self.assertEqual(self.events(lastEvent), [])

    def test_byKeyReplacesAndAuditsBothKeys(self) -> None:
        """
        C{approve kiln7 --key NEW} replaces the key; device.approved (kind rekey) names the
        new key and the one it replaced, as the audit document gives them.
        """
        oldKey = self.approvedWithSerial("kiln7", "SN-1")
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 5, serial="SN-1")
        device = self.successResultOf(
            self.store.approveDevice("kiln7", "root", T0 + 6, fingerprint=fingerprint(newKey))
        )
        self.assertEqual(device.fingerprint, fingerprint(newKey))
        self.assertIsNone(self.successResultOf(self.store.deviceForKey(fingerprint(oldKey))))
        event = self.events()[-1]
        document = auditEventJSON(
            event.id, event.event, event.device, event.actor, event.at, event.detail
        )
        self.assertEqual((document["event"], document["actor"]), ("device.approved", "root"))
        self.assertEqual(document["detail"]["kind"], "rekey")
        self.assertEqual(document["detail"]["fingerprint"], fingerprint(newKey))
        self.assertEqual(document["detail"]["previous_fingerprint"], fingerprint(oldKey))

    def test_revokedDeviceNewKeyByName(self) -> None:
        """
        A revoked device coming back with a new key keeps the one-word approve: nobody's
        sessions go to a revoked device, so there is no identity to take.
        """
        oldKey = self.approvedWithSerial("kiln7", "SN-1")
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 1))
        newKey = newPublicKey()
        self.contact("kiln7", newKey, T0 + 5)
        device = self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 6))
        self.assertEqual((device.state, device.fingerprint), ("approved", fingerprint(newKey)))
        self.assertEqual(self.events()[-1].detail["previousFingerprint"], fingerprint(oldKey))

    def test_newNameAndOwnKeyByName(self) -> None:
        """
        A new name, and an approved device's own key back for re-approval, approve by name.
        """
        key = newPublicKey()
        self.contact("oven2", key, T0)
        self.successResultOf(self.store.approveDevice("oven2", "root", T0 + 1))
        self.successResultOf(
            self.store.recordCertificate("oven2", "1", fingerprint(key), T0, T0 + 100, T0)
        )
        self.assertEqual(self.contact("oven2", key, T0 + 200).kind, "reapprove")
        device = self.successResultOf(self.store.approveDevice("oven2", "root", T0 + 201))
        self.assertEqual((device.fingerprint, device.approvedAt), (fingerprint(key), T0 + 201))

    def test_severalRequestsStillAmbiguous(self) -> None:
        """
        Two keys asking for an approved name: approve (and reject) by name is refused,
        with the device's key and both requests' side by side, as the re-key refusal
        shows one: serials (whether each matches), sources, when each was seen. The
        store's error carries those facts; the front ends' words for it are refusalText's.
        """
        device = fingerprint(self.approvedWithSerial("kiln7", "SN-1"))
        first, second = newPublicKey(), newPublicKey()
        self.contact("kiln7", first, T0 + 1, serial="SN-1")
        self.contact("kiln7", second, T0 + 2, source="203.0.113.9:40000")
        expected = "\n".join(
            (
                "2 pending requests ask for 'kiln7'; choose one by fingerprint (--key SHA256:...):",
                f"  device's key   {device}  serial SN-1  last seen 2023-11-14T22:13:20Z "
                "(60 s ago)",
                f"  request's key  {fingerprint(first)}  serial SN-1 (matches: yes)  "
                "from 192.0.2.1:5000  first seen 2023-11-14T22:13:21Z (59 s ago)",
                f"  request's key  {fingerprint(second)}  serial - (matches: unknown)  "
                "from 203.0.113.9:40000  first seen 2023-11-14T22:13:22Z (58 s ago)",
            )
        )
        for refused in (
            self.store.approveDevice("kiln7", "root", T0 + 60),
            self.store.rejectRequest("kiln7", "root", T0 + 60),
        ):
            error = self.failureOf(refused, AmbiguousRequest)
            assert isinstance(error, AmbiguousRequest)
            self.assertEqual(refusalText(error), expected)
            assert error.device is not None
            self.assertEqual(
                (error.device.fingerprint, error.fingerprints, error.now),
                (device, (fingerprint(first), fingerprint(second)), T0 + 60),
            )
