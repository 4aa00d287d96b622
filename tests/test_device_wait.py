"""
A channel opened to a device that dropped its link moments ago waits for it to
reconnect (groundcontrol.devicewait), in memory: the real front door, router and
registry, the real agent link classes, iosim pumps on a Clock.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import attrs
from twisted.conch.ssh import common, connection
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from agent import link as agentlink
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from agent.remoteforward import RemoteForwarder
from groundcontrol.datadir import DataDir
from groundcontrol.devicewait import (
    ALIVE_FILE,
    STOPPED_FILE,
    DeviceWaitPolicy,
    DeviceWaits,
    StopRecord,
)
from groundcontrol.metrics import Metrics
from groundcontrol.registry import Registry
from groundcontrol.sessions import SessionRegistry
from groundcontrol.sshserver import ServerSettings
from groundcontrol.store import Device
from groundcontrol.tap import Options, buildService
from groundcontrol.testing import (
    FakeOperator,
    InMemoryFleet,
    OperatorSession,
    ScriptedSession,
    echoScript,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)
from tests.test_store import T0, StoreTestCase, bothBackends

WAIT = 15.0
RECENT = 300.0


class DeviceWaitTestCase(SynchronousTestCase):
    """Device kiln7 enrolled and linked, alice granted it, bob not; waits of 15 s."""

    policy = DeviceWaitPolicy(maxWait=WAIT, recentWindow=RECENT)

    def setUp(self) -> None:
        self.fleet = InMemoryFleet(settings=ServerSettings(deviceWait=self.policy))
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.aliceKey = self.fleet.addOperator("alice")
        self.bobKey = self.fleet.addOperator("bob")
        self.fleet.grant("alice", "kiln7")
        self.sessions: list[ScriptedSession] = []
        self.agentPump = self.connectAgent()
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @property
    def waits(self) -> DeviceWaits:
        waits = self.fleet.registry.waits
        assert isinstance(waits, DeviceWaits)
        return waits

    def connectAgent(self, name: str = "kiln7") -> Any:
        """The real agent link, pinned to groundcontrol's host key; its pump."""
        settings = LinkSettings(
            name=name,
            deviceKey=self.deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        factory = AgentLinkFactory(
            settings,
            self.fleet.clock,  # type: ignore[arg-type]
            scriptedSessions(echoScript, self.sessions),
            refuseForwards,
        )
        return self.fleet.connect(factory)

    def dropAgent(self) -> None:
        self.fleet.network.cut(self.agentPump)
        self.fleet.flush()
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))

    def advance(self, seconds: float) -> None:
        self.fleet.clock.advance(seconds)
        self.fleet.flush()

    def operator(self, key: Any = None) -> tuple[FakeOperator, Any]:
        operator = FakeOperator("dev_kiln7", key or self.aliceKey, hostKey=self.fleet.hostKey)
        pump = self.fleet.connect(operator)
        self.assertIsNotNone(operator.connection, "operator did not log in")
        return operator, pump

    def open(self, key: Any = None) -> tuple[OperatorSession, Any]:
        operator, pump = self.operator(key)
        return self.fleet.session(operator), pump

    def assertUnanswered(self, session: OperatorSession) -> None:
        self.assertFalse(session.isOpen)
        self.assertIsNone(session.openFailure)

    def waitLines(self) -> list[tuple[str, str, str]]:
        return [
            (e["account"], e["waited"], e["outcome"])
            for e in self.events
            if e.get("log_format", "").startswith("{account} waited {waited}")
        ]


class WaitTests(DeviceWaitTestCase):
    """Waiting, and what ends a wait."""

    def test_reconnectWithinTheWaitOpensTheChannel(self) -> None:
        """
        A session opened 2 s after the link dropped gets no answer until the agent is
        back (5 s later); then it opens over the new link and runs, and one log line
        says how long it waited.
        """
        self.dropAgent()
        self.advance(2)
        session, _ = self.open()
        self.assertUnanswered(session)
        self.assertEqual(self.waits.waitingFor("kiln7"), 1)
        self.advance(5)
        self.assertUnanswered(session)
        self.agentPump = self.connectAgent()
        self.advance(0)  # the waiters get the link once its login has finished
        self.assertTrue(session.isOpen, session.openFailure)
        d = session.exec(b"hello")
        self.fleet.flush()
        self.successResultOf(d)
        self.assertEqual(bytes(session.output), b"hello\n")
        self.assertEqual(session.exitStatus, 0)
        self.assertEqual(len(self.waits), 0)
        self.assertEqual(self.waitLines(), [("alice", "5.0 s", "it did")])

    def test_notBackInTime(self) -> None:
        """
        A device not back within the wait is refused as offline, saying how long the
        channel waited, with the usual reason code; nothing is left waiting.
        """
        self.dropAgent()
        self.advance(3)
        session, _ = self.open()
        self.advance(WAIT - 0.1)
        self.assertUnanswered(session)
        self.advance(0.1)
        self.assertRegex(
            session.openFailureText,
            r"^device 'kiln7' is offline \(last seen \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, "
            r"18 s ago\); waited 15.0 s for it to reconnect$",
        )
        self.assertEqual(session.openFailure.args[1], connection.OPEN_CONNECT_FAILED)  # type: ignore[union-attr]
        self.assertEqual(len(self.waits), 0)
        self.assertEqual(self.waitLines(), [("alice", "15.0 s", "it did not")])
        # The device coming back later opens nothing for the refused channel.
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertEqual(self.sessions, [])

    def test_operatorLeavingForgetsTheWaiter(self) -> None:
        """
        An operator whose connection closes while waiting is forgotten at once: no
        waiter, no timer left, and the device's return opens nothing.
        """
        self.dropAgent()
        _, pump = self.open()
        self.assertEqual(len(self.waits), 1)
        self.fleet.network.cut(pump)
        self.fleet.flush()
        self.assertEqual(len(self.waits), 0)
        self.assertEqual(self.waits.waitingFor("kiln7"), 0)
        self.assertEqual(
            [c for c in self.fleet.clock.getDelayedCalls() if c.getTime() == self.fleet.now + WAIT],
            [],
        )
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertEqual(self.sessions, [])
        self.assertEqual(self.fleet.relayChannels(), [])
        self.assertEqual(self.waitLines(), [("alice", "0.0 s", "the operator left")])

    def test_grantRemovedDuringTheWait(self) -> None:
        """
        An operator whose grant is removed while the channel waits is refused once the
        device is back, as a channel opened then would be, and the device opens nothing:
        the grant was read as the wait began, and the channel opened on that.
        """
        self.dropAgent()
        session, _ = self.open()
        self.assertUnanswered(session)
        self.assertTrue(
            resultNow(self.fleet.store.ungrant("alice", "kiln7", "root", self.fleet.now))
        )
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertFalse(session.isOpen)
        self.assertEqual(
            session.openFailureText,
            "unknown device 'kiln7', or account 'alice' has no grant for it",
        )
        self.assertEqual(self.sessions, [])
        self.assertEqual(self.waitLines(), [("alice", "0.0 s", "it did")])

    def test_severalChannelsAllGetTheLink(self) -> None:
        """Two operators waiting for the same device both get their sessions when it is back."""
        self.dropAgent()
        first, _ = self.open()
        self.advance(1)
        second, _ = self.open()
        self.assertEqual(self.waits.waitingFor("kiln7"), 2)
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertTrue(first.isOpen, first.openFailure)
        self.assertTrue(second.isOpen, second.openFailure)
        self.assertEqual(len(self.sessions), 2)

    def test_forwardsAndProxyJumpWait(self) -> None:
        """
        A forward (-L: direct-tcpip as dev_kiln7) and a ProxyJump through ctl wait too:
        unanswered while the device is away, then answered by the device itself (whose
        scripted agent refuses forwards with its own words).
        """
        self.dropAgent()
        forward = FakeOperator("dev_kiln7", self.aliceKey, hostKey=self.fleet.hostKey)
        self.fleet.connect(forward)
        local = forward.openSession(channelType=b"direct-tcpip")
        jumper = FakeOperator("ctl", self.aliceKey, hostKey=self.fleet.hostKey)
        self.fleet.connect(jumper)
        assert jumper.connection is not None
        jump = OperatorSession(conn=jumper.connection)
        jump.name = b"direct-tcpip"
        jumper.connection.openChannel(
            jump,
            common.NS(b"dev_kiln7")
            + struct.pack(">L", 22)
            + common.NS(b"127.0.0.1")
            + struct.pack(">L", 50000),
        )
        self.fleet.flush()
        self.assertUnanswered(local)
        self.assertUnanswered(jump)
        self.assertEqual(self.waits.waitingFor("kiln7"), 2)
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertEqual(local.openFailureText, "forwarding is not scripted")
        self.assertEqual(jump.openFailureText, "forwarding is not scripted")

    def forwarder(self) -> MemoryReactorClock:
        """The agent's ssh -R listeners go to an in-memory reactor; it is returned."""
        listening = MemoryReactorClock()

        def onMemory(reactor: Any, conn: Any, **kwargs: Any) -> RemoteForwarder:
            return RemoteForwarder(listening, conn, **kwargs)

        self.patch(agentlink, "RemoteForwarder", onMemory)
        return listening

    def askForward(self, operator: FakeOperator, name: bytes = b"tcpip-forward") -> Any:
        assert operator.connection is not None
        request = common.NS(b"localhost") + struct.pack(">L", 8080)
        asked = operator.connection.sendGlobalRequest(name, request, wantReply=1)
        self.fleet.flush()
        return asked

    def test_remoteForwardWaits(self) -> None:
        """
        ssh -R (tcpip-forward) to a device that is reconnecting is held unanswered like
        a channel, then made on the device once it is back: it was refused at once ("remote
        port forwarding failed") while the session beside it waited and opened.
        """
        listening = self.forwarder()
        self.dropAgent()
        operator, _ = self.operator()
        asked = self.askForward(operator)
        self.assertNoResult(asked)
        self.assertEqual(self.waits.waitingFor("kiln7"), 1)
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.successResultOf(asked)
        self.assertEqual([port for port, *_ in listening.tcpServers], [8080])
        link = self.fleet.registry.lookup("kiln7")
        self.assertIsNotNone(link.remoteForwards.owner(b"localhost", 8080))
        self.assertEqual(self.waitLines(), [("alice", "0.0 s", "it did")])

    def test_keepaliveBehindAWaitingForwardIsMetAtOnce(self) -> None:
        """
        ssh's keepalive behind a -R that waits: its answer waits in line (answers go in
        order), and an SSH_MSG_IGNORE goes at once, which OpenSSH counts as an answer; both
        answers come once the device is back, the forward's first.
        """
        self.forwarder()
        self.dropAgent()
        operator, _ = self.operator()
        assert operator.connection is not None
        ignored: list[bytes] = []
        operator.connection.transport.ssh_IGNORE = ignored.append
        forward = self.askForward(operator)
        self.assertEqual(ignored, [])
        alive = operator.connection.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        self.fleet.flush()
        self.assertEqual(len(ignored), 1)
        self.assertNoResult(alive)
        answered: list[str] = []
        forward.addCallback(lambda _: answered.append("forward"))
        alive.addErrback(lambda _: answered.append("keepalive"))  # refused, as always
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertEqual(answered, ["forward", "keepalive"])

    def test_remoteForwardOfAnOperatorWhoLeft(self) -> None:
        """
        An operator who leaves while their -R waits leaves no waiter, and gets no forward on
        the device when it is back (nobody would own it or take it down); a device not back
        in time is refused; a cancel never waits.
        """
        listening = self.forwarder()
        self.dropAgent()
        operator, pump = self.operator()
        left = self.askForward(operator)
        self.fleet.network.cut(pump)
        self.failureResultOf(left)  # the operator's own ssh: its connection is gone
        self.assertEqual(self.waits.waitingFor("kiln7"), 0)  # given up when they left
        self.assertEqual(self.waitLines(), [("alice", "0.0 s", "the operator left")])
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertEqual(listening.tcpServers, [])
        self.dropAgent()
        operator, _ = self.operator()
        asked = self.askForward(operator)
        self.advance(WAIT)
        self.failureResultOf(asked)
        cancel = self.askForward(operator, b"cancel-tcpip-forward")  # never waits
        self.failureResultOf(cancel)
        self.assertEqual(self.waits.waitingFor("kiln7"), 0)

    def test_revokedWhileWaiting(self) -> None:
        """A device revoked while a channel waits for it is refused as revoked at the end."""
        self.dropAgent()
        session, _ = self.open()
        resultNow(self.fleet.store.revokeDevice("kiln7", "admin", self.fleet.now))
        self.advance(WAIT)
        self.assertEqual(session.openFailureText, "device 'kiln7' is revoked")


class NotWaitedForTests(DeviceWaitTestCase):
    """What fails at once, as before."""

    def test_longGoneFailsAtOnce(self) -> None:
        """A device offline for longer than the recent window is refused at once."""
        self.dropAgent()
        self.advance(RECENT + 1)
        session, _ = self.open()
        self.assertRegex(
            session.openFailureText, r"^device 'kiln7' is offline \(last seen .*, 5 min ago\)$"
        )
        self.assertEqual(len(self.waits), 0)
        self.assertEqual(self.waitLines(), [])

    def test_revokedUnknownAndNoGrantFailAtOnce(self) -> None:
        """Revoked, unknown and ungranted devices are refused at once, recent or not."""
        self.dropAgent()
        session, _ = self.open(self.bobKey)
        self.assertEqual(
            session.openFailureText, "unknown device 'kiln7', or account 'bob' has no grant for it"
        )
        resultNow(self.fleet.store.revokeDevice("kiln7", "admin", self.fleet.now))
        session, _ = self.open()
        self.assertEqual(session.openFailureText, "device 'kiln7' is revoked")
        self.assertEqual(len(self.waits), 0)

    def test_onlineDeviceNeverReachesTheWaits(self) -> None:
        """A channel to an online device opens without touching the waiting code."""

        class Untouchable:
            def __getattr__(self, name: str) -> Any:
                raise AssertionError(f"the waiting code was used: {name}")

        router = self.fleet.factory.portal.realm._router
        router.waits = Untouchable()
        session, _ = self.open()
        self.assertTrue(session.isOpen, session.openFailure)

    def test_noWaitWhenTurnedOff(self) -> None:
        """--device-wait 0 makes no waits: an offline device fails at once, as before."""
        fleet = InMemoryFleet(settings=ServerSettings(deviceWait=DeviceWaitPolicy(maxWait=0)))
        self.assertIsNone(fleet.registry.waits)


class CapTests(DeviceWaitTestCase):
    """Waiters are bounded per device and in all, with a clear refusal."""

    policy = DeviceWaitPolicy(
        maxWait=WAIT, recentWindow=RECENT, maxWaiters=3, maxWaitersPerDevice=2
    )

    def test_perDeviceCap(self) -> None:
        """The third channel waiting for one device is refused at once, naming the cap."""
        self.dropAgent()
        self.open()
        self.open()
        third, _ = self.open()
        self.assertRegex(
            third.openFailureText,
            r"^device 'kiln7' is offline \(last seen .*\); not waiting for it to reconnect: "
            r"2 channels wait for it already \(at most 2\)$",
        )
        self.assertEqual(third.openFailure.args[1], connection.OPEN_RESOURCE_SHORTAGE)  # type: ignore[union-attr]
        self.assertEqual(self.waits.waitingFor("kiln7"), 2)

    def test_overallCap(self) -> None:
        """Past the cap for all devices, a channel to another device is refused at once."""
        self.fleet.enrollDevice("oven2")
        self.fleet.grant("alice", "oven2")
        self.dropAgent()
        self.open()
        self.open()
        operator = FakeOperator("dev_oven2", self.aliceKey, hostKey=self.fleet.hostKey)
        self.fleet.connect(operator)
        self.assertEqual(self.fleet.session(operator).openFailure, None)
        self.assertEqual(len(self.waits), 3)
        operator = FakeOperator("dev_oven2", self.aliceKey, hostKey=self.fleet.hostKey)
        self.fleet.connect(operator)
        fourth = self.fleet.session(operator)
        self.assertIn(
            "not waiting for it to reconnect: 3 channels wait for devices already (at most 3)",
            fourth.openFailureText,
        )

    def test_capFreedWhenWaitsEnd(self) -> None:
        """A wait that ended (timed out) frees its place."""
        self.dropAgent()
        self.open()
        self.open()
        self.advance(WAIT)
        self.assertEqual(len(self.waits), 0)
        session, _ = self.open()
        self.assertUnanswered(session)


class SharedStoreTests(DeviceWaitTestCase):
    """With a store shared by several nodes, a device back on another node is no reason to wait."""

    policy = DeviceWaitPolicy(maxWait=WAIT, recentWindow=RECENT, sharedStorePoll=2.0)

    def test_backOnAnotherNode(self) -> None:
        """
        The device logging in to another node (its lastSeen moves past the wait's start,
        and no link attaches here by the next read) ends the wait within two reads.
        """
        self.dropAgent()
        session, _ = self.open()
        self.advance(1)
        # Another node records the agent's login in the shared store.
        line = publicLine(self.deviceKey)
        resultNow(
            self.fleet.store.recordContact(
                "kiln7", line, fingerprint(line), None, "other-node", self.fleet.now
            )
        )
        self.advance(1)  # first read: a newer login; this node may be about to attach it
        self.assertUnanswered(session)
        self.advance(2)  # second read: still not here
        self.assertRegex(
            session.openFailureText,
            r"^device 'kiln7' is offline \(last seen .*, 3 s ago\); waited 4.0 s for it to "
            r"reconnect: its agent logged in elsewhere \(another groundcontrol node routes it\) "
            r"or was refused$",
        )
        self.assertEqual(len(self.waits), 0)
        self.assertEqual(self.waitLines(), [("alice", "4.0 s", "it logged in elsewhere")])

    def test_backHereBetweenReads(self) -> None:
        """A login recorded here attaches here: the channel opens, however the reads fall."""
        self.dropAgent()
        session, _ = self.open()
        self.advance(1.5)
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertTrue(session.isOpen, session.openFailure)
        self.advance(10)
        self.assertTrue(session.isOpen)
        self.assertEqual(len(self.waits), 0)

    def test_noReadsWithoutWaiters(self) -> None:
        """The store is read only while a channel waits."""
        self.dropAgent()
        _, pump = self.open()
        self.fleet.network.cut(pump)
        self.fleet.flush()
        reads: list[str] = []
        store = self.waits._store
        assert store is not None
        original = store.deviceByName
        store.deviceByName = lambda name: reads.append(name) or original(name)  # type: ignore[method-assign]
        self.advance(10)
        self.assertEqual(reads, [])


class LinkedElsewhereTests(DeviceWaitTestCase):
    """
    With a store shared by several nodes, a device linked to another node as the wait
    begins is not waited for: the audit log's online and offline events say so at once.
    """

    policy = DeviceWaitPolicy(maxWait=WAIT, recentWindow=RECENT, sharedStorePoll=2.0)

    def otherNodeLinks(self, event: str = "device.online", **detail: Any) -> None:
        """Another node records kiln7's login and its online (or other) event."""
        line = publicLine(self.deviceKey)
        now = self.fleet.now
        resultNow(
            self.fleet.store.recordContact("kiln7", line, fingerprint(line), None, "other", now)
        )
        resultNow(self.fleet.store.audit(event, None, "kiln7", {"source": "other", **detail}, now))

    def assertAnsweredAsElsewhere(self, session: OperatorSession) -> None:
        self.assertRegex(
            session.openFailureText or "",
            r"^device 'kiln7' is offline \(last seen .*\); waited 0.0 s for it to reconnect: "
            r"its agent logged in elsewhere \(another groundcontrol node routes it\) or was "
            r"refused$",
        )
        self.assertEqual(len(self.waits), 0)

    def test_alreadyOnAnotherNode(self) -> None:
        """
        kiln7 dropped here and linked to another node before the channel: it is answered
        at once, as when it logs in elsewhere during the wait (same refusal, same log line),
        where it was waited for in vain (15 s: its login, before the wait, moved no poll).
        """
        self.dropAgent()
        self.advance(1)
        self.otherNodeLinks()
        self.advance(1)
        session, _ = self.open()
        self.assertAnsweredAsElsewhere(session)
        self.assertEqual(self.waitLines(), [("alice", "0.0 s", "it logged in elsewhere")])

    def test_flappingSummaryOnline(self) -> None:
        """Another node's flapping summary that ends online says the same; offline does not."""
        self.dropAgent()
        self.otherNodeLinks("device.flapping", online=False)
        session, _ = self.open()
        self.assertUnanswered(session)
        self.advance(WAIT)
        self.otherNodeLinks("device.flapping", online=True)
        session, _ = self.open()
        self.assertAnsweredAsElsewhere(session)

    def test_onlineEventFromBeforeARestart(self) -> None:
        """
        While groundcontrol has run less than the window, an online event older than its
        start may be its own, from before a kill (no offline event): the device is waited
        for. Once it has run longer, that event is believed.
        """
        self.dropAgent()
        self.otherNodeLinks()
        self.advance(1)
        self.waits.startedAt = self.fleet.now  # started (again) after that event
        session, _ = self.open()
        self.assertUnanswered(session)
        self.advance(RECENT + 1)
        resultNow(self.fleet.store.touchDevice("kiln7", self.fleet.now))  # seen recently
        session, _ = self.open()
        self.assertAnsweredAsElsewhere(session)

    def test_flappingHereIsWaitedFor(self) -> None:
        """
        kiln7 flaps here: offline and online recorded, the next offline only counted, so
        the log's latest is this node's online while kiln7 is away. It is waited for, and
        the channel opens when it is back.
        """
        self.advance(61)  # past the window of the setUp's online event
        self.dropAgent()  # recorded: a new window
        self.agentPump = self.connectAgent()
        self.advance(0)  # recorded
        self.dropAgent()  # counted
        session, _ = self.open()
        self.assertUnanswered(session)
        self.agentPump = self.connectAgent()
        self.advance(0)
        self.assertTrue(session.isOpen, session.openFailure)


@bothBackends
class LatestDeviceEventTests(StoreTestCase):
    """IStore.latestDeviceEvent, which the device wait reads, on SQLite and PostgreSQL."""

    def test_newestOfTheKinds(self) -> None:
        """The newest event of the device among the kinds asked; None when it has none."""
        for event, device in (
            ("device.online", "kiln7"),
            ("device.offline", "kiln7"),
            ("session.started", "kiln7"),
            ("device.online", "mill4"),
        ):
            self.successResultOf(self.store.audit(event, None, device, {"n": 1}, T0))
        kinds = ("device.online", "device.offline", "device.flapping")
        other = self.openAnother()  # another node
        latest = self.successResultOf(other.latestDeviceEvent("kiln7", kinds))
        assert latest is not None
        self.assertEqual(
            (latest.event, latest.device, latest.detail), ("device.offline", "kiln7", {"n": 1})
        )
        self.assertIsNone(self.successResultOf(other.latestDeviceEvent("oven2", kinds)))
        self.assertIsNone(self.successResultOf(other.latestDeviceEvent("kiln7", ())))


class WorthWaitingTests(SynchronousTestCase):
    """Which offline devices are waited for: seen recently, or groundcontrol restarted."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_000_000)
        self.waits = DeviceWaits(
            DeviceWaitPolicy(maxWait=WAIT, recentWindow=RECENT), Registry(), self.clock
        )

    def device(self, lastSeen: float | None) -> Device:
        return Device("kiln7", "approved", "fp", "key", None, 0.0, "test", lastSeen, 0.0)

    def test_seenRecently(self) -> None:
        """Seen within the window: waited for; longer ago, or never: not."""
        now = self.clock.seconds() + 1000  # groundcontrol has run longer than the window
        self.assertTrue(self.waits.worthWaiting(self.device(now - RECENT), now))
        self.assertFalse(self.waits.worthWaiting(self.device(now - RECENT - 1), now))
        self.assertFalse(self.waits.worthWaiting(self.device(None), now))

    def test_groundcontrolRestarted(self) -> None:
        """
        While groundcontrol has run less than the window, a device seen within the window
        before it started (online when it stopped) is waited for, though seen longer ago
        than the window; once it has run longer, no more.
        """
        started = self.clock.seconds()
        seen = started - 200  # groundcontrol was down for 200 s
        self.assertTrue(self.waits.worthWaiting(self.device(seen), started + 250))
        self.assertTrue(self.waits.worthWaiting(self.device(seen), started + RECENT))
        self.assertFalse(self.waits.worthWaiting(self.device(seen), started + RECENT + 1))
        self.assertFalse(self.waits.worthWaiting(self.device(started - RECENT - 1), started + 10))


class OptionsTests(SynchronousTestCase):
    """What --device-wait and its neighbours on the command line become."""

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.data.mkdir()
        DataDir(self.data).ensureInitialised()

    def options(self, *extra: str) -> Options:
        options = Options()
        options.parseOptions(["--data", str(self.data), *extra])
        return options

    def waitsOf(self, *extra: str) -> DeviceWaits | None:
        """The waits of groundcontrol built with C{extra} options, on a fake reactor."""
        top = buildService(self.options(*extra).toConfig(), MemoryReactorClock())
        waits = top.registry.waits  # type: ignore[attr-defined]
        assert waits is None or isinstance(waits, DeviceWaits)
        return waits

    def test_defaults(self) -> None:
        """By default: 15 s for devices seen within 5 min, 1000 waits, 20 per device."""
        waits = self.waitsOf()
        assert waits is not None
        self.assertEqual(
            waits.policy,
            DeviceWaitPolicy(
                maxWait=15.0,
                recentWindow=300.0,
                maxWaiters=1000,
                maxWaitersPerDevice=20,
                sharedStorePoll=None,
            ),
        )

    def test_given(self) -> None:
        """Every option reaches the policy."""
        waits = self.waitsOf(
            "--device-wait",
            "40",
            "--device-wait-recent",
            "1h",
            "--max-device-waits",
            "50",
            "--max-device-waits-per-device",
            "5",
        )
        assert waits is not None
        self.assertEqual(waits.policy, DeviceWaitPolicy(40.0, 3600.0, 50, 5, None))

    def test_offByZero(self) -> None:
        """--device-wait 0: nothing waits, an offline device is refused at once."""
        self.assertIsNone(self.waitsOf("--device-wait", "0"))

    def test_sharedStoreIsRead(self) -> None:
        """With a PostgreSQL store (several nodes), the store is read while channels wait."""
        config = self.options("--store", "postgresql://gc@db.invalid/gc").toConfig()
        assert config.settings.deviceWait is not None
        self.assertEqual(config.settings.deviceWait.sharedStorePoll, 2.0)

    def test_refused(self) -> None:
        """A negative or not finite wait, a bad window and caps below 1 are usage errors."""
        for extra in (
            ("--device-wait", "-1"),
            ("--device-wait", "nan"),
            ("--device-wait", "inf"),
            ("--device-wait-recent", "soon"),
            ("--max-device-waits", "0"),
            ("--max-device-waits-per-device", "0"),
        ):
            with self.assertRaises(usage.UsageError, msg=extra):
                self.options(*extra)


class StopRecordTests(SynchronousTestCase):
    """DATA/run/stopped.json: when groundcontrol stopped, for the waits after its restart."""

    def setUp(self) -> None:
        self.run = Path(self.mktemp()) / "run"
        self.clock = Clock()
        self.clock.advance(1_795_000_000)

    def waits(self) -> DeviceWaits:
        return DeviceWaits(
            DeviceWaitPolicy(maxWait=WAIT, recentWindow=RECENT), Registry(), self.clock
        )

    def test_stopThenStart(self) -> None:
        """The stop's time is written as groundcontrol stops, read (and removed) as it starts."""
        record = StopRecord(self.waits(), self.run, self.clock)
        record.startService()
        self.clock.advance(60)
        aliveAt = self.clock.seconds()  # its alive.json: a minute in
        self.clock.advance(30)
        record.stopService()
        stoppedAt = self.clock.seconds()
        self.clock.advance(3600)  # down for an hour
        waits = self.waits()
        StopRecord(waits, self.run, self.clock).startService()
        self.assertEqual(waits.lastStop, stoppedAt)
        self.assertFalse((self.run / STOPPED_FILE).exists())
        again = self.waits()
        StopRecord(again, self.run, self.clock).startService()
        # Killed at once next time: no stale stop record, the older alive.json instead.
        self.assertEqual(again.lastStop, aliveAt)

    def test_unreadableRecordIgnored(self) -> None:
        """A record that is not what it should be is ignored and removed."""
        self.run.mkdir(parents=True)
        for text in ("{", '{"stoppedAt": "soon"}', "[]", '{"stoppedAt": true}'):
            (self.run / STOPPED_FILE).write_text(text)
            waits = self.waits()
            StopRecord(waits, self.run, self.clock).startService()
            self.assertIsNone(waits.lastStop, text)
            self.assertFalse((self.run / STOPPED_FILE).exists())

    def test_devicesOnlineAtTheStopAreWaitedFor(self) -> None:
        """
        After an hour's stop, while groundcontrol has run less than the window, a device
        seen as it stopped (its link ended then) is waited for; one gone before is not.
        """
        waits = self.waits()
        started = self.clock.seconds()
        waits.lastStop = started - 3600
        online = Device("kiln7", "approved", "fp", "key", None, 0.0, "test", started - 3599, 0.0)
        gone = attrs.evolve(online, lastSeen=started - 3600 - RECENT - 1)
        self.assertTrue(waits.worthWaiting(online, started + 60))
        self.assertFalse(waits.worthWaiting(gone, started + 60))
        self.assertFalse(waits.worthWaiting(online, started + RECENT + 1))

    def recorded(self) -> Path:
        """A data directory whose run/stopped.json says groundcontrol stopped at 1795000000.5."""
        data = Path(self.mktemp())
        data.mkdir()
        DataDir(data).ensureInitialised()
        (data / "run").mkdir(exist_ok=True)
        (data / "run" / STOPPED_FILE).write_text('{"stoppedAt": 1795000000.5}\n')
        return data

    def test_builtByTheTap(self) -> None:
        """
        groundcontrol's service reads the record of its data directory as it starts (its
        first child, started before the listeners), not as it is built.
        """
        data = self.recorded()
        options = Options()
        options.parseOptions(["--data", str(data)])
        top = buildService(options.toConfig(), MemoryReactorClock())
        waits = top.registry.waits  # type: ignore[attr-defined]
        self.assertIsNone(waits.lastStop)
        first = next(iter(top))
        self.assertIsInstance(first, StopRecord)
        first.startService()
        self.assertEqual(waits.lastStop, 1795000000.5)

    def test_startThatFailsKeepsTheRecord(self) -> None:
        """
        A start refused after the service was built (a --tls-cert that cannot be read)
        leaves the record for the start after the fix: the record was read as the service
        was built, and that next start did not wait for the devices online at the stop.
        """
        data = self.recorded()
        options = Options()
        missing = data / "missing"
        options.parseOptions(
            [
                *("--data", str(data), "--listen", "tls://127.0.0.1:0"),
                *("--tls-cert", str(missing / "gc.crt"), "--tls-key", str(missing / "gc.key")),
            ]
        )
        with self.assertRaises(usage.UsageError):
            buildService(options.toConfig(), MemoryReactorClock())
        self.assertTrue((data / "run" / STOPPED_FILE).exists())


@attrs.define(eq=False)
class _FakeLink:
    """What the registry needs of a device's link to route to it."""

    deviceName: str
    fingerprint: str = "fp"
    avatar: Any = None
    conn: Any = None
    remoteForwards: Any = None
    connectedAt: float = 0.0

    def close(self, reason: str) -> None:
        pass


class AliveRecordTests(SynchronousTestCase):
    """
    DATA/run/alive.json: when groundcontrol last ran and the devices online then, so that
    after a kill (no stop record, no lastSeen set as the links ended) the devices online
    when it died are waited for as after a clean stop.
    """

    DAY = 86400.0

    def setUp(self) -> None:
        self.runDirectory = Path(self.mktemp()) / "run"
        self.clock = Clock()
        self.advance(1_795_000_000)
        self.now = self.clock.seconds()
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, *online: str, window: float = RECENT) -> tuple[DeviceWaits, StopRecord]:
        """A groundcontrol's waits and records, started, with devices C{online} linked."""
        registry = Registry()
        waits = DeviceWaits(
            DeviceWaitPolicy(maxWait=WAIT, recentWindow=window), registry, self.clock
        )
        for name in online:
            registry.attach(_FakeLink(name))
        record = StopRecord(waits, self.runDirectory, self.clock)
        record.startService()
        return waits, record

    def kill(self) -> None:
        """The running groundcontrol is killed: its timers never run again."""
        self.clock = Clock()
        self.advance(self.now)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.now = self.clock.seconds()

    def device(self, name: str, lastSeen: float) -> Device:
        return Device(name, "approved", "fp", "key", None, 0.0, "test", lastSeen, 0.0)

    def warnings(self) -> list[str]:
        return [
            e["log_format"]
            for e in self.events
            if e.get("log_level") is not None and e["log_level"].name == "warn"
        ]

    def test_killedAfterADayOnline(self) -> None:
        """
        kiln7, linked for a day (last seen as its link began), is online when groundcontrol
        is killed; groundcontrol starts again ten minutes later: kiln7 is waited for while
        it has run less than the window, as after a clean stop. mill4, gone a day before,
        is not. Without alive.json nothing says kiln7 was online at the kill.
        """
        linkedAt = self.clock.seconds()
        _, record = self.start("kiln7")
        self.advance(self.DAY)
        self.assertEqual(record.aliveInterval, 60.0)
        self.advance(60)  # one more write, then a kill: no stopService
        lastAlive = self.now
        self.kill()
        self.advance(600)
        waits, _ = self.start()
        self.assertEqual(waits.lastStop, lastAlive)
        self.assertEqual(waits.onlineAtStop, frozenset({"kiln7"}))
        now = waits.startedAt + 10
        self.assertTrue(waits.worthWaiting(self.device("kiln7", linkedAt), now))
        self.assertFalse(waits.worthWaiting(self.device("mill4", linkedAt), now))
        self.assertFalse(
            waits.worthWaiting(self.device("kiln7", linkedAt), waits.startedAt + RECENT + 1)
        )
        # Seen within the window before the last record (it went offline then): waited for.
        self.assertTrue(waits.worthWaiting(self.device("mill4", lastAlive - RECENT), now))

    def test_crashLoopRemembersTheDevicesNotBackYet(self) -> None:
        """
        A groundcontrol started after a kill names in its own record the devices it still
        waits for, not only those back: killed again, the next start waits for them too.
        Once it has run longer than the window, its record names only the devices online.
        """
        self.start("kiln7", "mill4")
        self.advance(60)
        self.kill()
        self.advance(600)  # down ten minutes
        self.start("mill4")  # mill4 is back, kiln7 not yet
        self.advance(60)
        self.kill()
        self.advance(5)
        third, _ = self.start()
        self.assertEqual(third.onlineAtStop, frozenset({"kiln7", "mill4"}))
        self.assertEqual(
            json.loads((self.runDirectory / ALIVE_FILE).read_text())["online"], ["kiln7", "mill4"]
        )
        self.advance(RECENT + 60)
        self.assertEqual(json.loads((self.runDirectory / ALIVE_FILE).read_text())["online"], [])

    def test_cleanStopAfterwardsCounts(self) -> None:
        """A clean stop, later than the last alive.json, is the time the next start goes by."""
        _, record = self.start("kiln7")
        self.advance(90)
        record.stopService()
        stoppedAt = self.clock.seconds()
        self.advance(3600)
        waits, _ = self.start()
        self.assertEqual(waits.lastStop, stoppedAt)
        self.assertEqual(waits.onlineAtStop, frozenset({"kiln7"}))

    def test_intervalAFifthOfTheWindow(self) -> None:
        """With a window shorter than five minutes the record is written a fifth of it apart."""
        _, record = self.start("kiln7", window=10.0)
        self.assertEqual(record.aliveInterval, 2.0)
        self.advance(2)
        self.assertEqual(
            json.loads((self.runDirectory / ALIVE_FILE).read_text()),
            {"aliveAt": self.clock.seconds(), "online": ["kiln7"]},
        )

    def test_recordFromTheFuture(self) -> None:
        """
        A record later than now (the clock stepped back since it was written) is taken as
        written at this start, with a log line; the devices it names are still waited for.
        """
        self.runDirectory.mkdir(parents=True)
        later = self.clock.seconds() + 3600
        (self.runDirectory / ALIVE_FILE).write_text(
            json.dumps({"aliveAt": later, "online": ["kiln7"]})
        )
        waits, _ = self.start()
        self.assertEqual(waits.onlineAtStop, frozenset({"kiln7"}))
        now = waits.startedAt + 10
        self.assertTrue(waits.worthWaiting(self.device("kiln7", later - self.DAY), now))
        # Seen within the window before this start, not before the record's time.
        self.assertTrue(waits.worthWaiting(self.device("mill4", waits.startedAt - RECENT), now))
        self.assertFalse(
            waits.worthWaiting(self.device("mill4", waits.startedAt - RECENT - 1), now)
        )
        (warning,) = self.warnings()
        self.assertIn("clock stepped back", warning)

    def test_unreadableRecordIgnored(self) -> None:
        """
        A record that is not what it should be is ignored with a log line, as if there
        were none (the start is all there is to go by), and replaced by the next write.
        """
        self.runDirectory.mkdir(parents=True)
        for text in (
            "{",
            "[]",
            '{"aliveAt": "soon", "online": []}',
            '{"aliveAt": true, "online": []}',
            '{"aliveAt": NaN, "online": []}',
            '{"aliveAt": 1795000000, "online": "kiln7"}',
            '{"aliveAt": 1795000000, "online": [7]}',
            '{"aliveAt": 1795000000}',
        ):
            self.events.clear()
            (self.runDirectory / ALIVE_FILE).write_text(text)
            waits, _ = self.start()
            self.assertIsNone(waits.lastStop, text)
            self.assertEqual(waits.onlineAtStop, frozenset(), text)
            self.assertEqual(len(self.warnings()), 1, text)
        self.advance(60)
        self.assertEqual(json.loads((self.runDirectory / ALIVE_FILE).read_text())["online"], [])

    def test_writeThatFailsIsLogged(self) -> None:
        """A record that cannot be written (run/ is not a directory) is a log line, each time."""
        self.runDirectory.parent.mkdir(parents=True)
        self.runDirectory.write_text("not a directory")
        self.start("kiln7")
        self.advance(60)
        self.advance(60)
        written = [w for w in self.warnings() if w.startswith("could not record the devices")]
        self.assertEqual(len(written), 2, self.warnings())


class MetricsTests(DeviceWaitTestCase):
    """groundcontrol_channels_waiting: the channels held for devices now."""

    def test_gauge(self) -> None:
        """The gauge counts the waiting channels at scrape time, and drops as they end."""
        metrics = Metrics()
        metrics.watch(self.fleet.registry, SessionRegistry(self.fleet.store, self.fleet.clock))

        def waiting() -> float | None:
            return metrics.registry.get_sample_value("groundcontrol_channels_waiting")

        self.assertEqual(waiting(), 0)
        self.dropAgent()
        self.open()
        self.open()
        self.assertEqual(waiting(), 2)
        self.advance(WAIT)
        self.assertEqual(waiting(), 0)
        off = Metrics()  # --device-wait 0: no waits, the gauge stays 0
        off.watch(Registry(), SessionRegistry(self.fleet.store, self.fleet.clock))
        self.assertEqual(off.registry.get_sample_value("groundcontrol_channels_waiting"), 0)
