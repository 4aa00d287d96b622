"""
The control shell's ``show DEVICE``: one device in detail (state, live link, last link and
certificate, owner, tags, groups; for admins the pending requests for its name and the
grants that cover it), for exactly the devices the caller may see in ``ls``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from groundcontrol.store import LinkCertificate
from groundcontrol.testing import newKey, publicLine, resultNow
from tests.test_access import T0, AccessFleet

CERTIFICATE_FINGERPRINT = ":".join(["5E"] * 32)


def fields(out: str) -> dict[str, str]:
    """
    show's C{label  value} lines by label (labels have single spaces, the gap two); a
    repeated label's values (C{grant}, C{pending request}) joined by C{"; "}.
    """
    shown: dict[str, str] = {}
    for line in out.splitlines():
        label, value = re.split(r" {2,}", line.strip(), maxsplit=1)
        shown[label] = f"{shown[label]}; {value}" if label in shown else value
    return shown


class ShowTests(SynchronousTestCase):
    """
    The AccessFleet (lab1 tagged lab, lab2 reporting lab, plain3; all online), plus kiln7:
    approved, offline, last linked with a certificate.
    """

    def setUp(self) -> None:
        self.world = AccessFleet()
        store = self.world.fleet.store
        self.kilnKey = publicLine(newKey())
        resultNow(
            store.recordContact("kiln7", self.kilnKey, fingerprint(self.kilnKey), None, "x", T0)
        )
        resultNow(store.approveDevice("kiln7", "root", T0))
        certificate = LinkCertificate("0a1b2c3d", CERTIFICATE_FINGERPRINT, T0 + 86400, "kiln7")
        resultNow(
            store.recordContact(
                "kiln7",
                self.kilnKey,
                fingerprint(self.kilnKey),
                None,
                "198.51.100.7:40000",
                T0 + 60,
                certificate=certificate,
            )
        )

    def assertShows(self, out: str, expected: dict[str, str]) -> None:
        shown = fields(out)
        self.assertEqual({label: shown.get(label) for label in expected}, expected, out)

    def show(self, who: str, line: str) -> tuple[int | None, str, str]:
        key = self.world.root if who == "root" else self.world.bob
        return self.world.ctl(key, f"show {line}")

    def test_adminSeesAnOnlineDevice(self) -> None:
        """
        An admin's show of an online device says since when, from where and over which
        transport it is online, its agent's version, its tags, and the grants that cover it
        (none, then bob's tag grant).
        """
        status, out, err = self.show("root", "lab1")
        self.assertEqual(status, 0, err)
        self.assertShows(
            out, {"name": "lab1", "state": "approved", "tags": "lab", "grants": "none"}
        )
        self.assertTrue(fields(out)["online"].startswith("since 2023-11-14T22:13:20Z (now) from "))
        # What the agent's hello reported (the in-memory agent sends none).
        link: Any = self.world.fleet.registry.lookup("lab1")
        link.details = {"transport": "tls", "version": "1.4"}
        _status, out, _ = self.show("root", "lab1")
        self.assertTrue(fields(out)["online"].endswith(" over tls"), out)
        self.assertShows(out, {"agent version": "1.4"})
        self.world.ctl(self.world.root, "grant bob tag:lab --as pi")
        self.world.ctl(self.world.root, "grant bob plain3")
        status, out, _ = self.show("root", "dev_lab1")
        self.assertEqual(status, 0)
        self.assertShows(out, {"grant": "bob by tag:lab as pi"})

    def test_adminSeesTheLastCertificate(self) -> None:
        """
        An offline device shows 'online no', when it was last seen, and the certificate
        it last linked with: serial, SHA-256 fingerprint, expiry and when it was presented.
        """
        status, out, err = self.show("root", "kiln7")
        self.assertEqual(status, 0, err)
        self.assertShows(
            out,
            {
                "online": "no",
                "last seen": "2023-11-14T22:14:20Z (in 60 s)",
                "key": fingerprint(self.kilnKey),
                "last link by": "certificate",
                "last certificate": "0a1b2c3d",
                "SHA-256": CERTIFICATE_FINGERPRINT,
                "valid until": "2023-11-15T22:13:20Z (in 24 h)",
                "presented": "2023-11-14T22:14:20Z (in 60 s)",
            },
        )

    def test_json(self) -> None:
        """
        show --json gives the CLI's device show document plus the live link and, for an
        admin, the grants; an operator's has no grants.
        """
        self.world.ctl(self.world.root, "grant bob kiln7")
        status, out, err = self.show("root", "kiln7 --json")
        self.assertEqual(status, 0, err)
        shown = json.loads(out)
        self.assertEqual(
            (shown["name"], shown["state"], shown["last_link_auth"], shown["online"]),
            ("kiln7", "approved", "certificate", False),
        )
        self.assertEqual(
            shown["last_certificate"],
            {
                "serial_number": "0a1b2c3d",
                "fingerprint": CERTIFICATE_FINGERPRINT,
                "not_after": "2023-11-15T22:13:20Z",
                "presented_at": "2023-11-14T22:14:20Z",
            },
        )
        self.assertEqual(
            [(g["user"], g["selector"]) for g in shown["grants"]], [("bob", "device:kiln7")]
        )
        self.assertEqual(shown["pending_requests"], [])

        status, out, err = self.show("bob", "kiln7 --json")
        self.assertEqual(status, 0, err)
        self.assertNotIn("grants", json.loads(out))
        status, out, err = self.show("root", "lab1 --json")
        self.assertEqual(json.loads(out)["online_since"], "2023-11-14T22:13:20Z")  # T0

    def test_operatorSeesWhatTheyMayReach(self) -> None:
        """
        An operator sees a device a grant lets them reach, without the grants or the
        requests for its name: admin detail.
        """
        self.world.ctl(self.world.root, "grant bob tag:lab")
        status, out, err = self.show("bob", "lab2")
        self.assertEqual(status, 0, err)
        shown = fields(out)
        self.assertEqual(shown["reported tags"], "lab")
        self.assertTrue(shown["online"].startswith("since "))
        self.assertFalse({"grant", "grants"} & shown.keys(), out)
        self.assertEqual(self.world.ls(self.world.bob), ["lab1", "lab2"])

    def test_operatorUnreachableReadsAsUnknown(self) -> None:
        """
        A device an operator may not reach (no grant; or revoked though granted) gets the
        answer a name no device has: show does not reveal which names exist.
        """
        self.world.ctl(self.world.root, "grant bob kiln7")
        self.assertEqual(self.world.ctl(self.world.root, "revoke kiln7")[0], 0)
        ghost = self.show("bob", "ghost")
        self.assertEqual(ghost, (1, "", "show: no device named 'ghost'\n"))
        for name in ("plain3", "kiln7"):
            status, out, err = self.show("bob", name)
            self.assertEqual((status, out, err.replace(name, "ghost")), ghost, name)

    def test_adminSeesRevokedAndPending(self) -> None:
        """
        An admin sees a revoked device as revoked, a name only requests ask for as pending,
        and a new key asking for an approved device's name among that device's detail.
        """
        self.world.ctl(self.world.root, "revoke kiln7")
        status, out, err = self.show("root", "kiln7")
        self.assertEqual(status, 0, err)
        self.assertShows(out, {"state": "revoked"})

        store = self.world.fleet.store
        lab1 = resultNow(store.deviceByName("lab1"))
        assert lab1 is not None
        resultNow(store.updateSerial(lab1.fingerprint, "SN-1", T0))
        for name in ("oven3", "lab1"):
            line = publicLine(newKey())
            resultNow(store.recordContact(name, line, fingerprint(line), "SN-9", "203.0.113.5", T0))
        status, out, err = self.show("root", "oven3")
        self.assertEqual(status, 0, err)
        self.assertEqual(fields(out)["state"], "pending")
        self.assertRegex(
            out, r"(?m)^pending request +pending key SHA256:\S+, serial SN-9, from 203"
        )
        status, out, _ = self.show("root", "lab1")
        self.assertEqual(fields(out)["state"], "approved")
        self.assertRegex(
            fields(out)["pending request"],
            r"^pending-rekey key SHA256:\S+, serial SN-9 \(matches: no\), from 203",
        )
        shown = json.loads(self.show("root", "oven3 --json")[1])
        self.assertEqual(
            (shown["state"], shown["kind"], shown["serial"]), ("pending", "new", "SN-9")
        )
        self.assertEqual(self.show("bob", "oven3")[0], 1)

    def test_unknownAndMalformedNames(self) -> None:
        """An unknown name is an error (status 1); a malformed one a usage error (status 2)."""
        self.assertEqual(self.show("root", "ghost"), (1, "", "show: no device named 'ghost'\n"))
        status, _, err = self.show("root", "'Bad Name!'")
        self.assertEqual(status, 2)
        self.assertIn("malformed device name", err)
        status, _, err = self.show("root", "")
        self.assertEqual(status, 2)
        self.assertIn("required: device", err)

    def test_helpListsShow(self) -> None:
        """help lists show, for operators too."""
        status, out, _ = self.world.ctl(self.world.bob, "help")
        self.assertEqual(status, 0)
        self.assertRegex(out, r"(?m)^show +one device in detail")
