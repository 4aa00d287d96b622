"""Tests for groundcontrol.flapping: online/offline events a flapping device cannot flood."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.flapping import FlapLimiter
from groundcontrol.notify import FleetEvent
from groundcontrol.testing import InMemoryFleet, newKey, openMemoryStore, resultNow

T0 = 1_700_000_000.0


class RecordingNotifier:
    """A notifier double: keeps every fleet event it is given."""

    def __init__(self) -> None:
        self.events: list[FleetEvent] = []

    def notify(self, event: FleetEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[tuple[str, str]]:
        """Online, offline and flapping events only (enrollment is notified too)."""
        return [(e.event, e.device) for e in self.events if e.event.split(".")[1] in _LINK]


_LINK = {"online", "offline", "flapping"}


class FlapLimiterTests(SynchronousTestCase):
    """The limiter alone, on a Clock and an in-memory store."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = openMemoryStore()
        self.limiter = FlapLimiter(self.store, self.clock, window=60.0)

    def events(self) -> list[Any]:
        return resultNow(self.store.auditSince(0, 1000))

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(e.event, e.device) for e in self.events()]

    def flap(self, device: str, times: int, source: str = "192.0.2.1:1") -> None:
        """C{times} offline/online pairs, a second apart."""
        for _ in range(times):
            self.clock.advance(1)
            self.limiter.offline(device, {})
            self.clock.advance(1)
            self.limiter.online(device, {"source": source})

    def test_quietDeviceRecordsEveryTransition(self) -> None:
        """A device that changes less than once a window has each transition recorded."""
        self.limiter.online("kiln7", {"source": "192.0.2.1:1"})
        self.clock.advance(61)
        self.limiter.offline("kiln7", {"connectedFor": 61})
        self.clock.advance(61)
        self.limiter.online("kiln7", {})
        self.assertEqual(
            self.kinds(),
            [("device.online", "kiln7"), ("device.offline", "kiln7"), ("device.online", "kiln7")],
        )
        self.assertEqual(self.events()[0].detail, {"source": "192.0.2.1:1"})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flappingIsCountedAndSummarised(self) -> None:
        """
        Within a minute one online/offline pair is recorded; the other transitions are
        counted and summarised once, when the window ends, with the state it ended in.
        """
        self.limiter.online("kiln7", {"source": "192.0.2.1:1"})
        self.flap("kiln7", 10, source="192.0.2.2:2")
        self.limiter.offline("kiln7", {})
        self.assertEqual(self.kinds(), [("device.online", "kiln7"), ("device.offline", "kiln7")])
        self.clock.advance(59 - 20)  # window started at T0: ends at T0 + 60
        self.assertEqual(len(self.events()), 2)
        self.clock.advance(1)
        summary = self.events()[-1]
        self.assertEqual((summary.event, summary.device), ("device.flapping", "kiln7"))
        self.assertEqual(summary.detail["flaps"], 20)  # 21 transitions after the online, 1 kept
        self.assertFalse(summary.detail["online"])
        self.assertEqual(summary.detail["since"], T0)
        self.assertEqual(summary.detail["sources"], ["192.0.2.1:1", "192.0.2.2:2"])
        self.assertEqual(summary.at, T0 + 60)

        # The next window records a pair again.
        self.limiter.online("kiln7", {})
        self.limiter.offline("kiln7", {})
        self.assertEqual([k for k, _ in self.kinds()[-2:]], ["device.online", "device.offline"])

    def test_boundedWhateverTheRate(self) -> None:
        """A thousand flaps a minute for ten minutes make at most three events a minute."""
        self.limiter.online("kiln7", {})
        for _ in range(10):
            for _ in range(1000):
                self.clock.advance(0.03)
                self.limiter.offline("kiln7", {})
                self.limiter.online("kiln7", {})
        self.clock.advance(60)
        kinds = [k for k, _ in self.kinds()]
        self.assertLessEqual(len(kinds), 3 * 11)
        flaps = sum(e.detail["flaps"] for e in self.events() if e.event == "device.flapping")
        recorded = sum(1 for k in kinds if k != "device.flapping")
        self.assertEqual(flaps + recorded, 1 + 2 * 10_000)

    def test_devicesAreIndependent(self) -> None:
        """One device flapping does not silence another's transitions."""
        self.limiter.online("kiln7", {})
        self.flap("kiln7", 5)
        self.limiter.online("oven2", {})
        self.limiter.offline("oven2", {})
        self.assertIn(("device.online", "oven2"), self.kinds())
        self.assertIn(("device.offline", "oven2"), self.kinds())

    def test_offlineOnlyAfterOnline(self) -> None:
        """An offline for a device never announced online is not recorded: events pair up."""
        self.limiter.offline("kiln7", {})
        self.assertEqual(self.kinds(), [])

    def test_stopCancelsSummaries(self) -> None:
        """stop() leaves no delayed call behind."""
        self.limiter.online("kiln7", {})
        self.flap("kiln7", 3)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.limiter.stop()
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])


class FleetOnlineOfflineTests(SynchronousTestCase):
    """Agents connecting and dropping on a whole in-memory groundcontrol."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.notifier = RecordingNotifier()
        self.fleet = InMemoryFleet(clock=self.clock, notifier=self.notifier)
        self.key = self.fleet.enrollDevice("kiln7")

    def online(self) -> tuple[Any, Any]:
        factory, pump = self.fleet.agent("kiln7", self.key)
        self.assertIsNotNone(factory.connection)
        return factory, pump

    def test_onlineAndOfflineNotified(self) -> None:
        """A device connecting and dropping is audited and reaches the notifier (webhook)."""
        _, pump = self.online()
        self.clock.advance(5)
        self.fleet.network.cut(pump)
        self.fleet.pollFleet()
        online = [e for e in self.notifier.events if e.event == "device.online"]
        offline = [e for e in self.notifier.events if e.event == "device.offline"]
        self.assertEqual([e.device for e in online + offline], ["kiln7", "kiln7"])
        self.assertEqual(online[0].detail["fingerprint"].split(":")[0], "SHA256")
        self.assertEqual(offline[0].detail["connectedFor"], 5)

    def test_offlineConnectedForToATenthOfASecond(self) -> None:
        """device.offline's connected_for is seconds to 0.1 s, not the clock's every digit."""
        _, pump = self.online()
        self.clock.advance(23.138279676437378)
        self.fleet.network.cut(pump)
        self.fleet.pollFleet()
        (offline,) = [e for e in self.notifier.events if e.event == "device.offline"]
        self.assertEqual(offline.detail["connectedFor"], 23.1)

    def test_deviceApprovedWhileConnectedGoesOnline(self) -> None:
        """
        A pending device approved while its link is up is online from that
        moment: device.online then, and device.offline when it drops.
        """
        key = newKey()
        _, pump = self.fleet.agent("oven2", key)
        self.fleet.pollFleet()
        self.assertEqual([e for e in self.notifier.events if e.event == "device.online"], [])
        resultNow(self.fleet.store.approveDevice("oven2", "admin", self.fleet.now))
        self.fleet.pollFleet()
        self.clock.advance(3)
        self.fleet.network.cut(pump)
        self.fleet.pollFleet()
        kinds = [(e.event, e.device) for e in self.notifier.events if e.device == "oven2"]
        self.assertIn(("device.online", "oven2"), kinds)
        self.assertIn(("device.offline", "oven2"), kinds)
        self.assertLess(
            kinds.index(("device.online", "oven2")), kinds.index(("device.offline", "oven2"))
        )

    def test_flappingLinkNotifiedOncePlusSummary(self) -> None:
        """
        A link that drops and comes back six times in a minute gives one online, one
        offline and, after the minute, one device.flapping with the count: not twelve.
        """
        for _ in range(6):
            _, pump = self.online()
            self.clock.advance(2)
            self.fleet.network.cut(pump)
            self.clock.advance(2)
        self.fleet.pollFleet()
        self.assertEqual(
            self.notifier.kinds(), [("device.online", "kiln7"), ("device.offline", "kiln7")]
        )
        self.clock.advance(60)
        self.fleet.flush()
        self.fleet.pollFleet()
        self.assertEqual(len(self.notifier.kinds()), 3)
        summary = self.notifier.events[-1]
        self.assertEqual((summary.event, summary.device), ("device.flapping", "kiln7"))
        self.assertEqual(summary.detail["flaps"], 10)
        self.assertFalse(summary.detail["online"])

    def test_replacedLinkIsNoTransition(self) -> None:
        """A device reconnecting while its old link still looks alive is neither offline
        nor online again: the route never went away."""
        self.online()
        self.online()  # replaces the first link, which is closed
        self.clock.advance(2)
        self.fleet.flush()
        self.fleet.pollFleet()
        self.assertEqual(self.notifier.kinds(), [("device.online", "kiln7")])
