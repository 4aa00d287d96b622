"""Tests for groundcontrol.registry: which device links are routable now."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.registry import Registry


class FakeLink:
    """A device link that records being closed."""

    def __init__(self, deviceName: str, fingerprint: str) -> None:
        self.deviceName = deviceName
        self.fingerprint = fingerprint
        self.closedWith: list[str] = []

    def close(self, reason: str) -> None:
        self.closedWith.append(reason)


class RegistryTests(SynchronousTestCase):
    """Attach, replace, detach, pending and drop."""

    def setUp(self) -> None:
        self.registry = Registry()

    def test_attachMakesRoutable(self) -> None:
        """An attached link is the device's route."""
        link = FakeLink("kiln7", "SHA256:a")
        self.registry.attach(link)
        self.assertIs(self.registry.lookup("kiln7"), link)
        self.assertEqual(self.registry.connectedNames(), ["kiln7"])
        self.assertEqual(len(self.registry), 1)
        self.assertIsNone(self.registry.lookup("other"))

    def test_replaceClosesOld(self) -> None:
        """A reconnecting device replaces its old link, which is closed; the new one stays open."""
        old, new = FakeLink("kiln7", "SHA256:a"), FakeLink("kiln7", "SHA256:a")
        self.registry.attach(old)
        self.registry.attach(new)
        self.assertIs(self.registry.lookup("kiln7"), new)
        self.assertEqual(len(old.closedWith), 1)
        self.assertEqual(new.closedWith, [])

    def test_reattachSameLinkKeepsIt(self) -> None:
        """Attaching the registered link again does not close it."""
        link = FakeLink("kiln7", "SHA256:a")
        self.registry.attach(link)
        self.registry.attach(link)
        self.assertEqual(link.closedWith, [])
        self.assertIs(self.registry.lookup("kiln7"), link)

    def test_detachStaleKeepsNew(self) -> None:
        """When the replaced link finally goes, detaching it leaves the newer link routable."""
        old, new = FakeLink("kiln7", "SHA256:a"), FakeLink("kiln7", "SHA256:a")
        self.registry.attach(old)
        self.registry.attach(new)
        self.registry.detach(old)
        self.assertIs(self.registry.lookup("kiln7"), new)
        self.registry.detach(new)
        self.assertIsNone(self.registry.lookup("kiln7"))
        self.registry.detach(new)  # idempotent

    def test_pendingNeverRoutable(self) -> None:
        """A pending link is found by its key only, never by name."""
        link = FakeLink("kiln7", "SHA256:p")
        self.registry.attachPending(link)
        self.assertIsNone(self.registry.lookup("kiln7"))
        self.assertIs(self.registry.pendingFor("SHA256:p"), link)
        self.assertEqual(self.registry.connectedNames(), [])
        self.assertEqual(len(self.registry), 0)
        self.assertFalse(self.registry.drop("kiln7", "revoked"))
        self.assertEqual(link.closedWith, [])

    def test_pendingReplacedBySameKey(self) -> None:
        """A second pending link with the same key replaces and closes the first."""
        old, new = FakeLink("kiln7", "SHA256:p"), FakeLink("kiln7", "SHA256:p")
        self.registry.attachPending(old)
        self.registry.attachPending(new)
        self.assertIs(self.registry.pendingFor("SHA256:p"), new)
        self.assertEqual(len(old.closedWith), 1)
        self.registry.detach(old)
        self.assertIs(self.registry.pendingFor("SHA256:p"), new)

    def test_pendingDoesNotShadowRoutable(self) -> None:
        """A pending link asking for an approved device's name leaves that device's route alone."""
        approved = FakeLink("kiln7", "SHA256:a")
        impostor = FakeLink("kiln7", "SHA256:z")
        self.registry.attach(approved)
        self.registry.attachPending(impostor)
        self.assertIs(self.registry.lookup("kiln7"), approved)
        self.registry.detach(impostor)
        self.assertIs(self.registry.lookup("kiln7"), approved)
        self.assertEqual(approved.closedWith, [])

    def test_promotionMovesPendingToRoutable(self) -> None:
        """Attaching a pending link (approval) makes it routable and no longer pending."""
        link = FakeLink("kiln7", "SHA256:p")
        self.registry.attachPending(link)
        self.registry.attach(link)
        self.assertIs(self.registry.lookup("kiln7"), link)
        self.assertIsNone(self.registry.pendingFor("SHA256:p"))

    def test_drop(self) -> None:
        """drop closes a device's live link with the reason and forgets it."""
        link = FakeLink("kiln7", "SHA256:a")
        self.registry.attach(link)
        self.assertTrue(self.registry.drop("kiln7", "device revoked"))
        self.assertEqual(link.closedWith, ["device revoked"])
        self.assertIsNone(self.registry.lookup("kiln7"))
        self.assertFalse(self.registry.drop("kiln7", "device revoked"))
        self.registry.detach(link)  # the link's own logout afterwards is harmless
        self.assertEqual(link.closedWith, ["device revoked"])
