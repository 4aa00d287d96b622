"""
An enrollment request's notification says the board serial its agent reports: the fleet
watcher holds C{device.pending} and C{device.rekey-requested} until the hello's serial
comes through the feed, and sends it without one after the wait (an agent with no serial,
or one that drops before its hello), before an event that ends the request, or when it
stops. A re-key's also says whether that serial is the device's (C{serial_matches}); the
store's row carries the device's serial to compare with. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.fleetwatch import STOP_SERIAL_READ_WAIT, FleetWatcher
from groundcontrol.notify import FleetEvent, MultiNotifier, NotifierService, WebhookNotifier
from groundcontrol.registry import Registry
from groundcontrol.requestnotice import SERIAL_WAIT, HeldRequests
from groundcontrol.store import IStore
from tests.test_enrollment import RecordingNotifier, captureLog
from tests.test_notify import FakeClient
from tests.test_store import T0, StoreTestCase, bothBackends, fingerprint, newPublicKey

REKEY = "device.rekey-requested"
PENDING = "device.pending"


def rekeyEvent(key: str = "SHA256:new", deviceSerial: str | None = "SN-1") -> FleetEvent:
    detail = {"fingerprint": key, "kind": "rekey", "serial": None, "deviceSerial": deviceSerial}
    return FleetEvent(REKEY, "kiln7", None, T0, detail, id=7)


def pendingEvent(key: str = "SHA256:new", kind: str = "new") -> FleetEvent:
    detail = {"fingerprint": key, "kind": kind, "serial": None, "source": "192.0.2.1:5000"}
    return FleetEvent(PENDING, "oven2", None, T0, detail, id=5)


def serialChanged(key: str, serial: str | None) -> FleetEvent:
    detail = {"fingerprint": key, "serial": serial, "previous": None}
    return FleetEvent("device.serial-changed", "kiln7", None, T0 + 1, detail, id=8)


def said(event: FleetEvent) -> tuple[Any, ...]:
    """What a receiver reads of a re-key notification: its id, serial and whether it matches."""
    detail = event.toJSON()["detail"]
    return event.id, detail["serial"], detail["serial_matches"]


class HeldRequestsTests(SynchronousTestCase):
    """The notifications held for their serials, by key."""

    def test_serialCompletesIt(self) -> None:
        """The key's serial change releases its notification, matching or not."""
        held = HeldRequests()
        self.assertEqual(held.hold(rekeyEvent("k1"), T0), [])
        self.assertEqual(held.hold(rekeyEvent("k2"), T0), [])
        self.assertEqual(
            [said(e) for e in held.read(serialChanged("k1", "SN-1"))], [(7, "SN-1", "yes")]
        )
        self.assertEqual(
            [said(e) for e in held.read(serialChanged("k2", "SN-9"))], [(7, "SN-9", "no")]
        )
        self.assertEqual(len(held), 0)
        self.assertEqual(held.read(serialChanged("k1", "SN-1")), [])  # sent once

    def test_deviceWithoutSerial(self) -> None:
        """A device that never reported a serial cannot be compared: unknown."""
        held = HeldRequests()
        held.hold(rekeyEvent("k1", deviceSerial=None), T0)
        self.assertEqual(
            [said(e) for e in held.read(serialChanged("k1", "SN-1"))], [(7, "SN-1", "unknown")]
        )

    def test_dueAfterTheWait(self) -> None:
        """Without a serial it is sent once the wait is over: serial null, unknown."""
        held = HeldRequests()
        held.hold(rekeyEvent("k1"), T0)
        self.assertEqual(held.due(T0 + SERIAL_WAIT - 0.1), [])
        self.assertEqual([said(e) for e in held.due(T0 + SERIAL_WAIT)], [(7, None, "unknown")])
        self.assertEqual(held.due(T0 + 2 * SERIAL_WAIT), [])

    def test_laterEventOfTheKeyReleasesIt(self) -> None:
        """An approval (or rejection, expiry) of the key sends it first; other keys wait."""
        held = HeldRequests()
        held.hold(rekeyEvent("k1"), T0)
        held.hold(rekeyEvent("k2"), T0)
        approved = FleetEvent("device.approved", "kiln7", "root", T0 + 2, {"fingerprint": "k1"})
        self.assertEqual([said(e) for e in held.read(approved)], [(7, None, "unknown")])
        online = FleetEvent("device.online", "kiln7", None, T0 + 2, {"fingerprint": "k0"})
        self.assertEqual(held.read(online), [])
        self.assertEqual(len(held), 1)

    def test_drain(self) -> None:
        """Stopping sends every held notification, without serials."""
        held = HeldRequests()
        held.hold(rekeyEvent("k1"), T0)
        held.hold(rekeyEvent("k2"), T0)
        self.assertEqual([said(e) for e in held.drain()], [(7, None, "unknown")] * 2)
        self.assertEqual(held.drain(), [])

    def test_newDeviceSaysItsSerial(self) -> None:
        """
        A new device's request is held like a re-key's and sent with its serial: the same
        row id and detail, no C{serial_matches} (there is no device to compare with).
        """
        held = HeldRequests()
        self.assertEqual(held.hold(pendingEvent("k1"), T0), [])
        [sent] = held.read(serialChanged("k1", "SN-7"))
        self.assertEqual(
            (sent.id, sent.event, sent.toJSON()["detail"]),
            (
                5,
                PENDING,
                {"fingerprint": "k1", "kind": "new", "serial": "SN-7", "source": "192.0.2.1:5000"},
            ),
        )

    def test_newDeviceDueAfterTheWait(self) -> None:
        """A new device whose serial does not come is sent after the wait, serial null."""
        held = HeldRequests()
        held.hold(pendingEvent("k1"), T0)
        self.assertEqual(held.due(T0 + SERIAL_WAIT - 0.1), [])
        [sent] = held.due(T0 + SERIAL_WAIT)
        self.assertEqual((sent.id, sent.detail["serial"]), (5, None))

    def test_reapprovalHeldAndCompared(self) -> None:
        """
        A device asking again with its own key (its certificate ran out) is held like a
        re-key, its key among those whose serial is read from the store (its hello writes
        no row when the serial is the device's), and sent saying whether it matches.
        """
        held = HeldRequests()
        reapproval = attrs.evolve(
            pendingEvent("k1", kind="reapprove"),
            detail={**pendingEvent("k1").detail, "kind": "reapprove", "deviceSerial": "SN-1"},
        )
        self.assertEqual(held.hold(reapproval, T0), [])
        held.hold(pendingEvent("k2"), T0)
        self.assertEqual(held.awaitingStoredSerial(), {"k1"})
        self.assertEqual([said(e) for e in held.release("k1", "SN-1")], [(5, "SN-1", "yes")])
        self.assertEqual(held.awaitingStoredSerial(), set())

    def test_eventWithoutKeyNotHeld(self) -> None:
        """A row naming no key (written by hand, say) has nothing to wait for."""
        event = FleetEvent(REKEY, "kiln7", None, T0, {})
        self.assertEqual(HeldRequests().hold(event, T0), [event])


class WatcherTestCase(StoreTestCase):
    """A fleet watcher on the store, on a clock, telling a recording notifier."""

    #: Made by each subclass's setUp once the store holds what comes before the test.
    watcher: FleetWatcher

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(T0)
        self.notifier = RecordingNotifier()

    def newWatcher(self) -> FleetWatcher:
        watcher = FleetWatcher(self.store, Registry(), self.clock, notifier=self.notifier)
        self.poll(watcher)  # the first poll starts at the newest id
        return watcher

    def poll(self, watcher: FleetWatcher | None = None) -> None:
        self.successResultOf((watcher or self.watcher).poll())

    def newKey(self, name: str, now: float = T0 + 5) -> str:
        """A new key logs in asking for C{name} (no serial yet, as at a login); its key."""
        key = newPublicKey()
        self.contact(name, key, now)
        return fingerprint(key)

    def hello(self, key: str, serial: str) -> None:
        """The agent's hello reports C{serial} (what enrollment's _hello stores)."""
        self.assertTrue(self.successResultOf(self.store.updateSerial(key, serial, T0 + 6)))


@bothBackends
class RekeyNotificationTests(WatcherTestCase):
    """The fleet watcher's notification of a re-key request, from the store's rows."""

    def setUp(self) -> None:
        super().setUp()
        self.contact("kiln7", newPublicKey(), T0, serial="SN-1")
        self.successResultOf(self.store.approveDevice("kiln7", "root", T0))
        self.watcher = self.newWatcher()

    def stranger(self) -> str:
        """A new key asking for kiln7."""
        return self.newKey("kiln7")

    def rekeys(self) -> list[tuple[Any, ...]]:
        return [said(e) for e in self.notifier.events if e.event == REKEY]

    def test_rowCarriesTheDeviceSerial(self) -> None:
        """The re-key row names the device's serial (C{device_serial} as read out)."""
        key = self.stranger()
        row = self.events()[-1]
        self.assertEqual((row.event, row.detail["fingerprint"]), (REKEY, key))
        self.assertEqual(row.detail["deviceSerial"], "SN-1")

    def test_sameBoard(self) -> None:
        """
        Nothing is sent at the login; the hello's serial, the device's, sends it: the
        re-key row's id, the serial, serial_matches yes, the device's serial.
        """
        key = self.stranger()
        rowId = self.events()[-1].id
        self.poll()
        self.assertEqual(self.notifier.events, [])
        self.hello(key, "SN-1")
        self.poll()
        self.assertEqual(self.rekeys(), [(rowId, "SN-1", "yes")])
        document = self.notifier.events[-1].toJSON()
        self.assertEqual(document["detail"]["device_serial"], "SN-1")
        self.assertEqual(document["detail"]["fingerprint"], key)
        self.assertEqual([e.event for e in self.notifier.events], [REKEY])  # not the serial's

    def test_anotherBoard(self) -> None:
        """Another serial: serial_matches no."""
        key = self.stranger()
        self.poll()
        self.hello(key, "SN-2")
        self.poll()
        self.assertEqual([r[1:] for r in self.rekeys()], [("SN-2", "no")])

    def test_noHello(self) -> None:
        """
        An agent that never reports a serial (an old one, a board without one, one that
        dropped at once) is notified after the wait: serial null, serial_matches unknown.
        """
        self.stranger()
        self.poll()
        self.clock.advance(SERIAL_WAIT - 1)
        self.poll()
        self.assertEqual(self.rekeys(), [])
        self.clock.advance(1)
        self.poll()
        self.assertEqual([r[1:] for r in self.rekeys()], [(None, "unknown")])
        self.clock.advance(SERIAL_WAIT)
        self.poll()
        self.assertEqual(len(self.rekeys()), 1)

    def test_approvedBeforeTheSerial(self) -> None:
        """An approval read before any serial sends the request's notification first."""
        key = self.stranger()
        self.poll()
        self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 6, fingerprint=key))
        self.poll()
        self.assertEqual([e.event for e in self.notifier.events], [REKEY, "device.approved"])
        self.assertEqual([r[1:] for r in self.rekeys()], [(None, "unknown")])

    def test_stopSendsTheStoredSerial(self) -> None:
        """
        A hello that landed after the last poll is not lost at the stop: the watcher reads
        the request's stored serial once more before it sends what it holds (it sent serial
        null, unknown).
        """
        key = self.stranger()
        rowId = self.events()[-1].id
        self.poll()
        self.hello(key, "SN-2")
        self.successResultOf(self.watcher.stopService())
        self.assertEqual(self.rekeys(), [(rowId, "SN-2", "no")])

    def test_stopSendsItOnce(self) -> None:
        """
        A watcher that stops sends what it holds; the next one (a restart) starts after it
        and does not send it again when the serial comes.
        """
        key = self.stranger()
        self.watcher.startService()
        self.poll()
        self.watcher.stopService()
        self.assertEqual([r[1:] for r in self.rekeys()], [(None, "unknown")])
        again = self.newWatcher()
        self.hello(key, "SN-1")
        self.poll(again)
        self.assertEqual(len(self.rekeys()), 1)


@bothBackends
class NewDeviceNotificationTests(WatcherTestCase):
    """The fleet watcher's notification of a new device's request, from the store's rows."""

    def setUp(self) -> None:
        super().setUp()
        self.watcher = self.newWatcher()

    def newDevice(self) -> str:
        """A new key asking for oven2, a name no device has."""
        return self.newKey("oven2")

    def sent(self) -> list[tuple[Any, ...]]:
        return [(e.event, e.id, e.detail.get("serial")) for e in self.notifier.events]

    def test_sentWithItsSerial(self) -> None:
        """
        Nothing is sent at the login; the hello's serial sends the pending row's
        notification, under its id, saying the serial; the serial's row is not sent.
        """
        key = self.newDevice()
        rowId = self.events()[-1].id
        self.poll()
        self.assertEqual(self.notifier.events, [])
        self.hello(key, "SN-7")
        self.poll()
        self.assertEqual(self.sent(), [(PENDING, rowId, "SN-7")])
        self.assertEqual(self.notifier.events[0].detail["fingerprint"], key)
        self.assertNotIn("serial_matches", self.notifier.events[0].toJSON()["detail"])

    def test_noHello(self) -> None:
        """Without a serial it is sent once, after the wait, serial null."""
        self.newDevice()
        self.poll()
        self.clock.advance(SERIAL_WAIT - 1)
        self.poll()
        self.assertEqual(self.notifier.events, [])
        self.clock.advance(1)
        self.poll()
        self.clock.advance(SERIAL_WAIT)
        self.poll()
        self.assertEqual([(e, s) for e, _, s in self.sent()], [(PENDING, None)])

    def test_stopSendsTheStoredSerial(self) -> None:
        """A hello since the last poll: the stop sends the serial its request stored."""
        key = self.newDevice()
        rowId = self.events()[-1].id
        self.poll()
        self.hello(key, "SN-7")
        self.successResultOf(self.watcher.stopService())
        self.assertEqual(self.sent(), [(PENDING, rowId, "SN-7")])

    def test_approvedBeforeTheSerial(self) -> None:
        """An approval read before any serial sends the pending notification first."""
        key = self.newDevice()
        self.poll()
        self.successResultOf(self.store.approveDevice("oven2", "root", T0 + 6, fingerprint=key))
        self.poll()
        self.assertEqual([e.event for e in self.notifier.events], [PENDING, "device.approved"])


@bothBackends
class ReapprovalNotificationTests(WatcherTestCase):
    """
    A device back after its certificate ran out (C{device.pending} kind reapprove, its own
    key): its notification says the serial its agent reports and whether it is the
    device's, as a re-key's does, and so does its approval (C{device.approved}).
    """

    def setUp(self) -> None:
        super().setUp()
        publicKey = newPublicKey()
        self.key = fingerprint(publicKey)
        self.publicKey = publicKey
        self.contact("kiln7", publicKey, T0, serial="SN-1")
        self.successResultOf(self.store.approveDevice("kiln7", "root", T0))
        self.successResultOf(self.store.recordCertificate("kiln7", "1", self.key, T0, T0 + 1, T0))
        self.watcher = self.newWatcher()

    def comesBack(self) -> int:
        """The device's key logs in after its certificate ran out; the pending row's id."""
        self.contact("kiln7", self.publicKey, T0 + 5)
        row = self.events()[-1]
        self.assertEqual((row.event, row.detail["kind"]), (PENDING, "reapprove"))
        return int(row.id)

    def pending(self) -> list[tuple[Any, ...]]:
        return [said(e) for e in self.notifier.events if e.event == PENDING]

    def test_rowCarriesTheDeviceSerial(self) -> None:
        """The re-approval row names the device's serial (C{device_serial} as read out)."""
        self.comesBack()
        self.assertEqual(self.events()[-1].detail["deviceSerial"], "SN-1")

    def test_sameBoard(self) -> None:
        """
        Nothing is sent at the login; the hello's serial, the device's (which writes no
        serial change), sends it: the row's id, the serial, serial_matches yes.
        """
        rowId = self.comesBack()
        self.poll()
        self.assertEqual(self.notifier.events, [])
        before = self.successResultOf(self.store.lastAuditId())
        self.hello(self.key, "SN-1")
        self.assertEqual(self.events(before), [])  # no serial change
        self.poll()
        self.assertEqual(self.pending(), [(rowId, "SN-1", "yes")])
        self.assertEqual(self.notifier.events[-1].toJSON()["detail"]["device_serial"], "SN-1")

    def test_anotherBoard(self) -> None:
        """
        The device's key on another board (its state copied): serial_matches no. The
        serial is the request's: the device keeps the one it was approved with (the hello
        overwrote it, so nothing after could tell the two apart).
        """
        rowId = self.comesBack()
        self.poll()
        self.hello(self.key, "SN-2")
        self.poll()
        self.assertEqual(self.pending(), [(rowId, "SN-2", "no")])
        self.assertEqual([e.event for e in self.notifier.events], [PENDING])
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        (request,) = self.successResultOf(self.store.listEnrollmentRequests())
        self.assertEqual((device.serial, request.serial), ("SN-1", "SN-2"))
        (changed,) = [e for e in self.events() if e.event == "device.serial-changed"]
        self.assertEqual((changed.detail["serial"], changed.detail["previous"]), ("SN-2", "SN-1"))

    def test_stopSendsTheStoredSerial(self) -> None:
        """A hello since the last poll: the stop sends the serial its request stored."""
        rowId = self.comesBack()
        self.poll()
        self.hello(self.key, "SN-1")
        self.successResultOf(self.watcher.stopService())
        self.assertEqual(self.pending(), [(rowId, "SN-1", "yes")])

    def test_noHello(self) -> None:
        """No serial reported within the wait: serial null, unknown, once."""
        self.comesBack()
        self.poll()
        self.clock.advance(SERIAL_WAIT)
        self.poll()
        self.clock.advance(SERIAL_WAIT)
        self.poll()
        self.assertEqual([r[1:] for r in self.pending()], [(None, "unknown")])

    def test_approvalSaysTheSerial(self) -> None:
        """The re-approval's C{device.approved} says the serial its agent reported."""
        self.comesBack()
        self.hello(self.key, "SN-1")
        self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 7))
        self.poll()
        approved = self.notifier.events[-1]
        self.assertEqual(
            (approved.event, approved.detail["kind"], approved.detail["serial"]),
            ("device.approved", "reapprove", "SN-1"),
        )
        self.assertEqual(said(approved), (approved.id, "SN-1", "yes"))
        self.assertEqual([r[1:] for r in self.pending()], [("SN-1", "yes")])

    def test_approvalOfAnotherBoard(self) -> None:
        """
        Approved from another board: C{device.approved} says its serial, the device's before
        (C{device_serial}, in the audit row too) and C{serial_matches} no; the device then
        has the serial the approval took.
        """
        self.comesBack()
        self.hello(self.key, "SN-2")
        self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 7))
        self.poll()
        approved = self.notifier.events[-1]
        self.assertEqual(approved.event, "device.approved")
        self.assertEqual(said(approved), (approved.id, "SN-2", "no"))
        self.assertEqual(approved.toJSON()["detail"]["device_serial"], "SN-1")
        row = self.events()[-1]
        self.assertEqual((row.detail["serial"], row.detail["deviceSerial"]), ("SN-2", "SN-1"))
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(device.serial, "SN-2")

    def test_claimSaysTheSerial(self) -> None:
        """
        Claimed with a pairing code instead (C{device.claimed}, kind reapprove): the same
        three as an approval (it said none), in the audit row the serial and the device's.
        """
        self.comesBack()
        self.hello(self.key, "SN-2")
        alice = self.successResultOf(self.store.addAccount("alice", [newPublicKey()], False, T0))
        codeHash = hashlib.sha256(b"1234-5678").hexdigest()
        self.successResultOf(
            self.store.registerClaimCode(codeHash, self.key, "kiln7", T0 + 300, T0 + 6)
        )
        self.successResultOf(self.store.claimDevice(codeHash, alice, T0 + 3600, T0 + 7))
        self.poll()
        claimed = self.notifier.events[-1]
        self.assertEqual((claimed.event, claimed.detail["kind"]), ("device.claimed", "reapprove"))
        self.assertEqual(said(claimed), (claimed.id, "SN-2", "no"))
        self.assertEqual(claimed.toJSON()["detail"]["device_serial"], "SN-1")
        row = self.events()[-1]
        self.assertEqual((row.detail["serial"], row.detail["deviceSerial"]), ("SN-2", "SN-1"))
        self.assertEqual([r[1:] for r in self.pending()], [("SN-2", "no")])

    def test_reinstatedSaysTheSerial(self) -> None:
        """A revoked device approved again (kind reinstate) says the device's serial."""
        self.successResultOf(self.store.revokeDevice("kiln7", "root", T0 + 1))
        self.successResultOf(self.store.approveDevice("kiln7", "root", T0 + 2))
        self.poll()
        approved = self.notifier.events[-1]
        self.assertEqual(
            (approved.event, approved.detail["kind"], approved.detail["serial"]),
            ("device.approved", "reinstate", "SN-1"),
        )


class _SlowRequestList:
    """
    A store whose request list answers when the test says (a read at the stop), and its
    audit feed too once C{feedToo} is set (the stop's last read of the feed).
    """

    def __init__(self, store: IStore) -> None:
        self._store = store
        self.feedToo = False
        self.reads: list[tuple[Deferred[Any], Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _held(self, read: Any) -> Deferred[Any]:
        held: Deferred[Any] = Deferred()
        self.reads.append((held, read))
        return held

    def listEnrollmentRequests(self) -> Deferred[Any]:
        return self._held(self._store.listEnrollmentRequests)

    def auditFeed(self, *args: Any) -> Deferred[Any]:
        if not self.feedToo:
            return self._store.auditFeed(*args)  # type: ignore[no-any-return]
        return self._held(lambda: self._store.auditFeed(*args))

    def answer(self) -> None:
        """Answer the reads held, and those they lead to, with what the store holds."""
        self.feedToo = False
        while self.reads:
            held, read = self.reads.pop(0)
            held.callback(self.successResultOf(read()))

    def successResultOf(self, d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        return results[0]


@bothBackends
class StopTests(WatcherTestCase):
    """
    What a stopping watcher does with what it holds: one read of the stored serials,
    bounded, and groundcontrol's webhook waits for what it then sends.
    """

    def setUp(self) -> None:
        super().setUp()
        self.slow = _SlowRequestList(self.store)

    def slowWatcher(self, notifier: Any) -> FleetWatcher:
        """A started watcher on the slow store, holding oven2's new key's notification."""
        store: Any = self.slow
        watcher = FleetWatcher(store, Registry(), self.clock, notifier=notifier)
        self.poll(watcher)
        self.key = self.newKey("oven2")
        self.rowId = self.events()[-1].id
        watcher.startService()  # its first poll reads the feed: the notification is held
        self.assertEqual(len(watcher._heldRequests), 1)
        return watcher

    def test_storeThatDoesNotAnswer(self) -> None:
        """
        A store that does not answer holds the stop for L{STOP_SERIAL_READ_WAIT}, no longer;
        then, for a watcher with no hand-over file to leave it in (groundcontrol's has one:
        tests/test_fleetwatch_stop.py), the notification goes without its serial, and a line
        says why.
        """
        watcher = self.slowWatcher(self.notifier)
        logged = captureLog(watcher)
        self.hello(self.key, "SN-7")
        self.slow.feedToo = True
        stopped = watcher.stopService()
        self.clock.advance(STOP_SERIAL_READ_WAIT - 0.1)
        self.assertNoResult(stopped)
        self.assertEqual(self.notifier.events, [])
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(
            [(e.id, e.detail["serial"]) for e in self.notifier.events], [(self.rowId, None)]
        )
        self.assertEqual(
            logged,
            [
                "fleet watcher stopping: the store did not answer within 1.0 s; the "
                "notifications held for serials were sent without them"
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_webhookWaitsForTheHandOver(self) -> None:
        """
        groundcontrol's services: the webhook (stopped after the watcher) posts what the
        watcher sends once its read has answered, with the serial; before, its drain found
        it idle and stopped it at once, and the notification was refused at the webhook.
        """
        client = FakeClient()
        clock: Any = self.clock
        webhook = WebhookNotifier("http://127.0.0.1:9/hook", clock, client)
        notifier = MultiNotifier([webhook])
        top = MultiService()
        NotifierService(notifier).setServiceParent(top)
        watcher = self.slowWatcher(notifier)
        watcher.setServiceParent(top)
        self.hello(self.key, "SN-7")
        self.slow.feedToo = True
        stopped = top.stopService()
        self.clock.advance(0.5)
        self.assertEqual(client.requests, [])
        self.slow.answer()
        (request,) = client.requests
        self.assertEqual(json.loads(request[1])["detail"]["serial"], "SN-7")
        self.assertNoResult(stopped)
        client.answer(0)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
