"""
What an admin is shown to decide a re-key: whether a request's serial matches the device's
(documents.serialMatches, the C{serial_matches} of C{pending} and C{device list}) and the
refusal of an approve by name alone (rekeyreview.rekeyRefusal), and of an approve or
reject by name alone when several keys ask for it (rekeyreview.refusalText).
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.documents import requestJSON, serialMatches
from groundcontrol.rekeyreview import refusalText, rekeyRefusal
from groundcontrol.store import (
    AmbiguousRequest,
    Device,
    EnrollmentRequest,
    RekeyNeedsKey,
    UnknownDevice,
)

T0 = 1_700_000_000.0

DEVICE = Device(
    name="kiln7",
    state="approved",
    fingerprint="SHA256:old",
    publicKey="ssh-ed25519 AAAA",
    serial="SN-1",
    approvedAt=T0,
    approvedBy="root",
    lastSeen=T0 + 60,
    createdAt=T0,
)

REQUEST = EnrollmentRequest(
    fingerprint="SHA256:new",
    requestedName="kiln7",
    publicKey="ssh-ed25519 BBBB",
    serial="SN-1",
    source="203.0.113.9:4000",
    firstSeen=T0 + 3600,
    lastSeen=T0 + 3600,
    kind="rekey",
)


class SerialMatchesTests(SynchronousTestCase):
    """yes, no, unknown for another key's request for a device; None otherwise."""

    def test_values(self) -> None:
        self.assertEqual(serialMatches(REQUEST, DEVICE), "yes")
        self.assertEqual(serialMatches(attrs.evolve(REQUEST, serial="SN-2"), DEVICE), "no")
        self.assertEqual(serialMatches(attrs.evolve(REQUEST, serial=None), DEVICE), "unknown")
        self.assertEqual(serialMatches(REQUEST, attrs.evolve(DEVICE, serial=None)), "unknown")

    def test_noneWithoutADevice(self) -> None:
        """A new name's request: no comparison."""
        self.assertIsNone(serialMatches(attrs.evolve(REQUEST, kind="new"), None))

    def test_reapprovalCompared(self) -> None:
        """
        A device's own key back after its certificate ran out (reapprove) is compared too:
        no is its key on another board (a copied state directory).
        """
        own = attrs.evolve(REQUEST, fingerprint=DEVICE.fingerprint, kind="reapprove")
        self.assertEqual(serialMatches(own, DEVICE), "yes")
        self.assertEqual(serialMatches(attrs.evolve(own, serial="SN-2"), DEVICE), "no")
        self.assertEqual(serialMatches(attrs.evolve(own, serial=None), DEVICE), "unknown")

    def test_requestDocument(self) -> None:
        """The request document carries it: null when no device is given."""
        self.assertEqual(requestJSON(REQUEST, DEVICE)["serial_matches"], "yes")
        self.assertIsNone(requestJSON(REQUEST)["serial_matches"])


class RekeyRefusalTests(SynchronousTestCase):
    """The text C{approve} and C{device approve} print for a re-key asked by name."""

    def test_text(self) -> None:
        """Both keys side by side, the risk in words, and the two commands that decide."""
        refusal = RekeyNeedsKey(DEVICE, attrs.evolve(REQUEST, serial="SN-2"))
        text = rekeyRefusal(refusal, T0 + 3660, "groundcontrol --data /d device ")
        self.assertEqual(
            text.splitlines(),
            [
                "kiln7 is an approved device with another key: not approved.",
                "  device's key   SHA256:old  serial SN-1  "
                "last seen 2023-11-14T22:14:20Z (60 min ago)",
                "  request's key  SHA256:new  serial SN-2 (matches: no)  "
                "from 203.0.113.9:4000  first seen 2023-11-14T23:13:20Z (60 s ago)",
                "Approving it gives kiln7's name, its operators' sessions and their forwarded "
                "agents to the machine",
                "holding the request's key. Anyone can ask for any name with a new key, and a "
                "serial is what the agent says.",
                "If kiln7 was re-installed or its board replaced, approve its new key:",
                "  groundcontrol --data /d device approve kiln7 --key SHA256:new",
                "If not, turn the request away:",
                "  groundcontrol --data /d device reject kiln7 --key SHA256:new",
            ],
        )

    def test_deviceTextInert(self) -> None:
        """A serial and a source are the device's to spell: no control character is printed."""
        request = attrs.evolve(REQUEST, serial="\x1b]52;c;eA==\x07\n", source="x\x9b2J")
        text = rekeyRefusal(RekeyNeedsKey(DEVICE, request), T0, "")
        self.assertFalse([c for c in text if c != "\n" and not c.isprintable()], text)
        self.assertEqual(len(text.splitlines()), 9)


class AmbiguousRefusalTests(SynchronousTestCase):
    """
    The text C{approve} and C{reject} print (control shell and CLI) when several keys ask
    for a name: the store's error carries the facts, refusalText lays them out.
    """

    def test_newName(self) -> None:
        """
        No device yet: the requests' keys, one a line, under what to do. The store's own
        text (for a log) is one line.
        """
        other = attrs.evolve(REQUEST, fingerprint="SHA256:other", serial=None, kind="new")
        refusal = AmbiguousRequest(
            "kiln7", [attrs.evolve(REQUEST, kind="new"), other], None, T0 + 3660
        )
        self.assertEqual(
            str(refusal),
            "2 pending requests ask for 'kiln7'; choose one by fingerprint: SHA256:new, "
            "SHA256:other",
        )
        self.assertEqual(
            refusalText(refusal).splitlines(),
            [
                "2 pending requests ask for 'kiln7'; choose one by fingerprint (--key SHA256:...):",
                "  request's key  SHA256:new  serial SN-1  from 203.0.113.9:4000  "
                "first seen 2023-11-14T23:13:20Z (60 s ago)",
                "  request's key  SHA256:other  serial -  from 203.0.113.9:4000  "
                "first seen 2023-11-14T23:13:20Z (60 s ago)",
            ],
        )

    def test_approvedName(self) -> None:
        """An approved device's name: its key first, as the re-key refusal shows it."""
        refusal = AmbiguousRequest("kiln7", [REQUEST, REQUEST], DEVICE, T0 + 3660)
        lines = refusalText(refusal).splitlines()
        self.assertEqual(
            lines[1],
            "  device's key   SHA256:old  serial SN-1  last seen 2023-11-14T22:14:20Z (60 min ago)",
        )
        self.assertEqual(
            rekeyRefusal(RekeyNeedsKey(DEVICE, REQUEST), T0 + 3660).splitlines()[1:3], lines[1:3]
        )

    def test_otherErrors(self) -> None:
        """Any other error is printed as its own text."""
        self.assertEqual(refusalText(UnknownDevice("no device 'x'")), "no device 'x'")
