"""
End-to-end tests of the relay, entirely in memory: a Conch operator client, the real
groundcontrol front door (auth, router, relay, registry, fleet watcher, SQLite store) and
the real agent link classes (agent.link) serving scripted sessions, joined by
twisted.test.iosim pumps on a Clock. No reactor, no sockets.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.channel import DEFAULT_MAX_PACKET, DEFAULT_WINDOW
from accesstunnel.keys import fingerprint
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.relay import RELAY_FAILURE_STATUS
from groundcontrol.router import SessionRouter, describeLastSeen
from groundcontrol.testing import (
    FakeOperator,
    InMemoryFleet,
    OperatorSession,
    Script,
    ScriptedSession,
    echoScript,
    newKey,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)

#: What groundcontrol may hold for one direction of one session: the receive window it
#: offers, plus a packet in flight.
ONE_WINDOW = DEFAULT_WINDOW + DEFAULT_MAX_PACKET

MiB = 1024 * 1024


def script(command: bytes | None) -> Script | None:
    """The scripts of these tests, on top of echoScript."""
    if command == b"big":
        return Script(stream=64 * MiB)
    if command == b"medium":
        return Script(stdout=b"<", stream=6 * MiB, stderr=b"warming up\n", status=3)
    if command == b"sleep":
        return Script(stdout=b"started\n", hold=True)
    return echoScript(command)


def operatorRequests(device: ScriptedSession) -> list[tuple[bytes, bytes, bool]]:
    """The requests the device saw from the operator: without groundcontrol's own."""
    return [r for r in device.requests if not r[0].endswith(b"@accesstunnel")]


class RelayTestCase(SynchronousTestCase):
    """A fleet with device kiln7 enrolled, operator alice granted it, bob not."""

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.aliceKey = self.fleet.addOperator("alice")
        self.bobKey = self.fleet.addOperator("bob")
        self.fleet.grant("alice", "kiln7")
        self.sessions: list[ScriptedSession] = []

    def agentFactory(
        self,
        name: str = "kiln7",
        key: Any = None,
        serverKey: Any = None,
        sessions: list[ScriptedSession] | None = None,
    ) -> AgentLinkFactory:
        """The real agent link factory, pinned to groundcontrol's host key."""
        pinned = serverKey if serverKey is not None else self.fleet.hostKey
        settings = LinkSettings(
            name=name,
            deviceKey=key if key is not None else self.deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(pinned))),
        )
        return AgentLinkFactory(
            settings,
            self.fleet.clock,  # type: ignore[arg-type]
            scriptedSessions(script, self.sessions if sessions is None else sessions),
            refuseForwards,
        )

    def connectAgent(self, **kwargs: Any) -> Any:
        factory = self.agentFactory(**kwargs)
        return factory, self.fleet.connect(factory)

    def operator(self, username: str = "dev_kiln7", key: Any = None) -> FakeOperator:
        operator = self.fleet.operator(username, key if key is not None else self.aliceKey)
        self.assertIsNotNone(operator.connection, "operator did not log in")
        return operator

    def openSession(self, operator: FakeOperator | None = None, **kwargs: Any) -> OperatorSession:
        session = self.fleet.session(operator or self.operator(), **kwargs)
        self.assertTrue(session.isOpen, session.openFailure)
        return session

    def runCommand(self, session: OperatorSession, command: bytes) -> Any:
        d = session.exec(command)
        self.fleet.flush()
        return d


class SessionTests(RelayTestCase):
    """Requests, data, EOF, exit status and close pass through unchanged and in order."""

    def setUp(self) -> None:
        super().setUp()
        self.connectAgent()

    def test_execRoundTrip(self) -> None:
        """An exec reaches the device; its output, exit-status, EOF and close come back in order."""
        session = self.openSession()
        d = self.runCommand(session, b"uname -a")
        self.successResultOf(d)
        self.assertEqual(bytes(session.output), b"uname -a\n")
        self.assertEqual(session.events, [("data", 9), ("exit-status", 0), ("eof",), ("close",)])
        (device,) = self.sessions
        self.assertEqual(operatorRequests(device), [(b"exec", common.NS(b"uname -a"), True)])

    def test_exitStatusAndStderr(self) -> None:
        """A non-zero exit status and stderr reach the operator."""
        session = self.openSession()
        self.runCommand(session, b"false")
        self.assertEqual(session.exitStatus, 1)
        session = self.openSession()
        session.releaseWindow()
        self.runCommand(session, b"medium")
        self.assertEqual(bytes(session.stderr), b"warming up\n")
        self.assertEqual(len(session.output), 6 * MiB + 1)
        self.assertEqual(session.events[-3:], [("exit-status", 3), ("eof",), ("close",)])

    def test_stdinAndEOF(self) -> None:
        """The operator's stdin and EOF reach the device; the echo comes back before the exit."""
        session = self.openSession()
        self.successResultOf(self.runCommand(session, b"cat"))
        session.write(b"hello ")
        session.write(b"world")
        self.fleet.flush()
        self.assertEqual(bytes(session.output), b"hello world")
        self.assertFalse(session.isClosed)
        session.sendEOF()
        self.fleet.flush()
        (device,) = self.sessions
        self.assertTrue(device.gotEOF)
        self.assertEqual(bytes(device.input), b"hello world")
        self.assertEqual(session.events[-3:], [("exit-status", 0), ("eof",), ("close",)])

    def test_wantReplyHonoured(self) -> None:
        """
        want-reply passes through unchanged: the device sees the operator's flag, a refusal
        comes back as a failure, and requests without reply get no answer.
        """
        session = self.openSession()
        pty = common.NS(b"xterm") + struct.pack(">4L", 80, 24, 0, 0) + common.NS(b"\0")
        ptyReply = session.request(b"pty-req", pty, wantReply=True)
        assert ptyReply is not None
        self.assertIsNone(session.request(b"env", common.NS(b"LANG") + common.NS(b"C"), False))
        self.fleet.flush()
        self.successResultOf(ptyReply)
        self.failureResultOf(self.runCommand(session, b"refuse"), ConchError)
        unknown = session.request(b"x-unknown@example.com", b"")
        assert unknown is not None
        self.fleet.flush()
        self.failureResultOf(unknown, ConchError)
        (device,) = self.sessions
        self.assertEqual(
            [(kind, wantReply) for kind, _, wantReply in operatorRequests(device)],
            [
                (b"pty-req", True),
                (b"env", False),
                (b"exec", True),
                (b"x-unknown@example.com", True),
            ],
        )
        self.assertEqual(operatorRequests(device)[0][1], pty)

    def test_manySessionsOneLink(self) -> None:
        """Several sessions share the device's one link, each with its own output."""
        operator = self.operator()
        sessions = [self.openSession(operator) for _ in range(5)]
        for i, session in enumerate(sessions):
            session.exec(b"job %d" % i)
        self.fleet.flush()
        for i, session in enumerate(sessions):
            self.assertEqual(bytes(session.output), b"job %d\n" % i)
            self.assertEqual(session.exitStatus, 0)
        self.assertEqual(len(self.fleet.registry), 1)

    def test_channelsCleanedUp(self) -> None:
        """Once sessions end, groundcontrol holds no relay channels for them."""
        session = self.openSession()
        self.runCommand(session, b"done")
        self.assertTrue(session.isClosed)
        self.assertEqual(self.fleet.relayChannels(), [])


class RefusalTests(RelayTestCase):
    """An operator whose channel cannot be routed sees OPEN_FAILURE with the reason."""

    def refusal(self, username: str, key: Any = None) -> OperatorSession:
        session = self.fleet.session(self.operator(username, key))
        self.assertFalse(session.isOpen)
        self.assertIsNotNone(session.openFailure)
        return session

    def test_unknownDevice(self) -> None:
        """A device that does not exist is refused by name, with both possible causes."""
        self.connectAgent()
        session = self.refusal("dev_nosuch")
        self.assertEqual(
            session.openFailureText,
            "unknown device 'nosuch', or account 'alice' has no grant for it",
        )
        self.assertEqual(session.openFailure.args[1], connection.OPEN_ADMINISTRATIVELY_PROHIBITED)  # type: ignore[union-attr]

    def test_unknownDeviceToAnAdmin(self) -> None:
        """An admin reaches every device, so is told plainly that the name is unknown."""
        adminKey = self.fleet.addOperator("root2", admin=True)
        session = self.refusal("dev_nosuch", adminKey)
        self.assertEqual(session.openFailureText, "unknown device 'nosuch'")

    def test_existenceNotRevealed(self) -> None:
        """
        An operator cannot tell a device that exists (approved, revoked or pending) from a
        name that does not, unless a grant of theirs reaches it: the words are the same.
        """
        self.connectAgent()
        self.fleet.enrollDevice("mill4")
        resultNow(self.fleet.store.revokeDevice("mill4", "admin", self.fleet.now))
        self.connectAgent(name="oven2", key=newKey())
        texts = {
            name: self.refusal(f"dev_{name}", self.bobKey).openFailureText.replace(name, "NAME")
            for name in ("kiln7", "mill4", "oven2", "nosuch")
        }
        self.assertEqual(
            set(texts.values()), {"unknown device 'NAME', or account 'bob' has no grant for it"}
        )
        self.assertEqual(self.sessions, [])

    def test_refusalLoggedWithItsCause(self) -> None:
        """The log tells an admin what the operator is not told: which check failed."""
        events: list[dict[str, Any]] = []
        self.patch(SessionRouter, "_log", Logger(observer=events.append))
        self.connectAgent()
        self.refusal("dev_kiln7", self.bobKey)
        self.refusal("dev_nosuch", self.bobKey)
        refused = [
            (e["account"], e["device"], e["reason"])
            for e in events
            if e.get("log_format", "").startswith("refused {account}")
        ]
        self.assertEqual(
            refused, [("bob", "kiln7", "no grant"), ("bob", "nosuch", "unknown device")]
        )

    def test_malformedName(self) -> None:
        """A malformed device name is refused with the naming rule."""
        session = self.refusal("dev_Bad_Name")
        self.assertIn("malformed device name 'Bad_Name'", session.openFailureText)
        session = self.refusal("root")
        self.assertIn("unknown user 'root'", session.openFailureText)

    def test_notGranted(self) -> None:
        """An operator without a grant is refused even though the device is online."""
        self.connectAgent()
        session = self.refusal("dev_kiln7", self.bobKey)
        self.assertEqual(
            session.openFailureText, "unknown device 'kiln7', or account 'bob' has no grant for it"
        )
        self.assertEqual(self.sessions, [])

    def test_offline(self) -> None:
        """A known device with no link is reported offline, with when it was last seen."""
        session = self.refusal("dev_kiln7")
        self.assertRegex(
            session.openFailureText,
            r"^device 'kiln7' is offline \(last seen \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, "
            r"\d+ (s|min|h|d) ago\)$",
        )
        self.assertEqual(session.openFailure.args[1], connection.OPEN_CONNECT_FAILED)  # type: ignore[union-attr]

    def test_lastSeenWords(self) -> None:
        """When an offline device was last seen: always a time ago, never 'now'."""
        t = 1_795_000_000.0
        self.assertEqual(describeLastSeen(t, t), "last seen 2026-11-18T11:06:40Z, 0 s ago")
        self.assertEqual(describeLastSeen(t, t + 0.4), "last seen 2026-11-18T11:06:40Z, 0 s ago")
        self.assertEqual(describeLastSeen(t, t + 300), "last seen 2026-11-18T11:06:40Z, 5 min ago")
        self.assertEqual(describeLastSeen(None, t), "it has never connected")

    def test_revoked(self) -> None:
        """A revoked device is refused as revoked."""
        resultNow(self.fleet.store.revokeDevice("kiln7", "admin", self.fleet.now))
        session = self.refusal("dev_kiln7")
        self.assertEqual(session.openFailureText, "device 'kiln7' is revoked")

    def test_controlShell(self) -> None:
        """ctl opens the control shell, served by groundcontrol itself, not a device."""
        session = self.openSession(self.operator("ctl"))
        self.successResultOf(self.runCommand(session, b"whoami"))
        self.fleet.flush()
        self.assertIn(b"alice", bytes(session.output))
        self.assertEqual(session.exitStatus, 0)
        self.assertEqual(self.sessions, [])


class FlowControlTests(RelayTestCase):
    """groundcontrol holds about one window per direction, whatever the speeds."""

    def setUp(self) -> None:
        super().setUp()
        self.connectAgent()

    def assertBounded(self) -> None:
        for channel in self.fleet.relayChannels():
            self.assertLessEqual(channel.queuedBytes, ONE_WINDOW, channel.label)
        self.assertLessEqual(self.fleet.bufferedInGroundControl(), ONE_WINDOW)

    def test_operatorNeverReads(self) -> None:
        """
        The device writes 64 MiB to an operator that never re-opens its window: what
        groundcontrol buffers stays within one window, the device is paused, and a second
        session on the same link still round-trips. Once the operator reads, every byte
        arrives, then the exit status.
        """
        operator = self.operator()
        stalled = self.openSession(operator)
        stalled.holdWindow = True
        self.successResultOf(self.runCommand(stalled, b"big"))
        (device,) = self.sessions
        self.assertLess(len(stalled.output), 64 * MiB)
        self.assertLessEqual(len(stalled.output), stalled.localWindowSize)
        self.assertGreater(self.fleet.bufferedInGroundControl(), 0)
        self.assertBounded()
        # The device is paused rather than queueing 64 MiB.
        self.assertLess(device.produced, 8 * MiB)

        other = self.openSession(operator)
        self.runCommand(other, b"cat")
        other.write(b"ping")
        other.sendEOF()
        self.fleet.flush()
        self.assertEqual(bytes(other.output), b"ping")
        self.assertEqual(other.exitStatus, 0)
        self.assertBounded()

        stalled.releaseWindow()
        self.fleet.flush()
        self.assertEqual(len(stalled.output), 64 * MiB)
        self.assertEqual(stalled.events[-3:], [("exit-status", 0), ("eof",), ("close",)])
        self.assertEqual(self.fleet.bufferedInGroundControl(), 0)

    def test_deviceNeverReads(self) -> None:
        """
        The operator sends 16 MiB of stdin to a device that does not read it: groundcontrol
        buffers at most one window; once the device reads, all of it arrives.
        """
        session = self.openSession()
        self.runCommand(session, b"sleep")
        (device,) = self.sessions
        device.holdInput = True
        session.write(b"i" * (16 * MiB))
        self.fleet.flush()
        self.assertLess(len(device.input), 16 * MiB)
        self.assertBounded()
        device.releaseInput()
        self.fleet.flush()
        self.assertEqual(len(device.input), 16 * MiB)
        self.assertBounded()


class LinkLifecycleTests(RelayTestCase):
    """What operators and devices see as links come, go and are replaced."""

    def test_linkLostMidSession(self) -> None:
        """
        When the device's link dies under a session, the operator gets a message on
        stderr, exit-status 255, EOF and close, in that order.
        """
        _, pump = self.connectAgent()
        session = self.openSession()
        self.runCommand(session, b"sleep")
        self.assertEqual(bytes(session.output), b"started\n")
        self.fleet.network.cut(pump)
        self.assertIn(b"connection to device kiln7 was lost", bytes(session.stderr))
        self.assertEqual(session.exitStatus, RELAY_FAILURE_STATUS)
        self.assertEqual(
            [e[0] for e in session.events],
            ["data", "stderr", "exit-status", "eof", "close"],
        )
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))
        self.assertEqual(self.fleet.relayChannels(), [])

    def test_reconnectReplacesOldLink(self) -> None:
        """A reconnecting device replaces its old link, which is closed; sessions use the new."""
        firstSessions: list[ScriptedSession] = []
        _, firstPump = self.connectAgent(sessions=firstSessions)
        oldLink = self.fleet.registry.lookup("kiln7")
        _, secondPump = self.connectAgent()
        newLink = self.fleet.registry.lookup("kiln7")
        self.assertIsNot(newLink, oldLink)
        self.assertTrue(firstPump.clientIO.disconnected, "old link not closed")
        self.assertFalse(secondPump.clientIO.disconnecting)
        session = self.openSession()
        self.runCommand(session, b"hi")
        self.assertEqual(session.exitStatus, 0)
        self.assertEqual(firstSessions, [])
        self.assertEqual(len(self.sessions), 1)
        # The old link's logout did not unregister the new one.
        self.assertIs(self.fleet.registry.lookup("kiln7"), newLink)

    def test_pinnedHostKeyMismatch(self) -> None:
        """An agent pinned to another host key refuses the link and counts a failed link."""
        factory, pump = self.connectAgent(serverKey=newKey())
        self.assertTrue(pump.clientIO.disconnected)
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))
        self.assertEqual(factory.failedLinks, 1)

    def test_pendingApprovedWithoutReconnect(self) -> None:
        """
        An unknown device waits as pending and is not routable; once approved in the
        store, the fleet watcher makes its live link routable without a reconnect.
        """
        newDeviceKey = newKey()
        _, pump = self.connectAgent(name="oven2", key=newDeviceKey)
        self.assertFalse(pump.clientIO.disconnected)
        self.assertIsNone(self.fleet.registry.lookup("oven2"))
        self.assertIsNotNone(self.fleet.registry.pendingFor(fingerprint(publicLine(newDeviceKey))))
        refused = self.fleet.session(self.operator("dev_oven2"))
        self.assertEqual(
            refused.openFailureText,
            "unknown device 'oven2', or account 'alice' has no grant for it",
        )

        resultNow(self.fleet.store.approveDevice("oven2", "admin", self.fleet.now))
        self.fleet.grant("alice", "oven2")
        self.fleet.pollFleet()
        self.assertIsNotNone(self.fleet.registry.lookup("oven2"))

        session = self.openSession(self.operator("dev_oven2"))
        self.runCommand(session, b"hello oven")
        self.assertEqual(bytes(session.output), b"hello oven\n")
        self.assertIn(pump, self.fleet.network.pumps)
        self.assertFalse(pump.clientIO.disconnected)

    def test_revocationClosesLiveLink(self) -> None:
        """
        Revoking a connected device in the store closes its live link at the next poll;
        its open session ends with status 255 and new sessions are refused.
        """
        _, pump = self.connectAgent()
        session = self.openSession()
        self.runCommand(session, b"sleep")
        resultNow(self.fleet.store.revokeDevice("kiln7", "admin", self.fleet.now))
        self.fleet.pollFleet()
        self.fleet.flush()
        self.assertTrue(pump.clientIO.disconnected)
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))
        self.assertEqual(session.exitStatus, RELAY_FAILURE_STATUS)
        self.assertTrue(session.isClosed)
        refused = self.fleet.session(self.operator())
        self.assertEqual(refused.openFailureText, "device 'kiln7' is revoked")

    def test_revokedDeviceCannotReconnect(self) -> None:
        """A revoked device's agent is refused at login and does not become routable."""
        resultNow(self.fleet.store.revokeDevice("kiln7", "admin", self.fleet.now))
        factory, pump = self.connectAgent()
        self.assertTrue(pump.clientIO.disconnected)
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))
        self.assertEqual(factory.failedLinks, 1)

    def test_credentialNotReplayableAsAnotherDevice(self) -> None:
        """An agent asking for another device's name with its own key is routed by its key."""
        self.fleet.enrollDevice("oven2")
        self.connectAgent(name="oven2")  # kiln7's key, claiming oven2
        self.assertIsNone(self.fleet.registry.lookup("oven2"))
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))


class FakeAgentTests(RelayTestCase):
    """The shipped fake agent double serves sessions like the real link does."""

    def test_fakeAgentRoundTrip(self) -> None:
        """groundcontrol.testing.FakeAgentFactory logs in and serves a scripted exec."""
        sessions: list[ScriptedSession] = []
        factory, _ = self.fleet.agent("kiln7", self.deviceKey, scriptedSessions(record=sessions))
        self.assertIsNotNone(factory.connection)
        session = self.openSession()
        self.runCommand(session, b"cat")
        session.write(b"abc")
        session.sendEOF()
        self.fleet.flush()
        self.assertEqual(bytes(session.output), b"abc")
        self.assertEqual(session.exitStatus, 0)
        self.assertEqual(len(sessions), 1)


class EdgeTests(RelayTestCase):
    """Peers that leave at awkward moments, and channel types other than session."""

    def setUp(self) -> None:
        super().setUp()
        self.agent, self.agentPump = self.connectAgent()

    def connectOperator(self, username: str = "dev_kiln7") -> tuple[FakeOperator, Any]:
        operator = FakeOperator(username, self.aliceKey, hostKey=self.fleet.hostKey)
        pump = self.fleet.connect(operator)
        return operator, pump

    def test_operatorLeavesMidSession(self) -> None:
        """When an operator's connection drops, the device's session channel is closed."""
        operator, pump = self.connectOperator()
        session = self.fleet.session(operator)
        self.runCommand(session, b"sleep")
        (device,) = self.sessions
        self.fleet.network.cut(pump)
        self.assertTrue(device.isClosed)
        self.assertEqual(self.fleet.relayChannels(), [])

    def test_operatorLeavesWhileDeviceOpens(self) -> None:
        """
        An operator who leaves before the device confirmed the channel does not leave the
        device's channel open: it is closed as soon as the device confirms it.
        """
        operator, pump = self.connectOperator()
        operator.openSession()
        pump.pump()  # the open reaches groundcontrol, which asks the device
        self.assertEqual(self.sessions, [])
        self.fleet.network.cut(pump)  # the operator is gone before the device answers
        (device,) = self.sessions
        self.assertTrue(device.isClosed)
        self.assertEqual(self.fleet.relayChannels(), [])

    def test_linkLostWhileOpening(self) -> None:
        """If the device's link dies before it answers an open, the operator gets OPEN_FAILURE."""
        operator, pump = self.connectOperator()
        session = operator.openSession()
        pump.pump()  # groundcontrol has asked the device; the device has not seen it
        self.fleet.network.cut(self.agentPump)
        self.fleet.flush()
        self.assertFalse(session.isOpen)
        self.assertIn("link closed while opening", session.openFailureText)

    def test_deviceRefusalTextPassesThrough(self) -> None:
        """A channel the device refuses is refused to the operator with the device's words."""
        operator, _ = self.connectOperator()
        session = operator.openSession(channelType=b"direct-tcpip")
        # direct-tcpip carries host, port, originator, port.
        self.fleet.flush()
        self.assertFalse(session.isOpen)
        self.assertEqual(session.openFailureText, "forwarding is not scripted")
        self.assertEqual(session.openFailure.args[1], connection.OPEN_CONNECT_FAILED)  # type: ignore[union-attr]

    def test_unrelayedChannelType(self) -> None:
        """Channel types that are not relayed are refused without bothering the device."""
        operator, _ = self.connectOperator()
        session = operator.openSession(channelType=b"x11")
        self.fleet.flush()
        self.assertIn("is not relayed", session.openFailureText)
        self.assertEqual(session.openFailure.args[1], connection.OPEN_UNKNOWN_CHANNEL_TYPE)  # type: ignore[union-attr]

    def test_frozenAgentDropped(self) -> None:
        """
        An agent that stops answering (a frozen process: nothing arrives, no FIN) is found
        by groundcontrol's keepalive and its link dropped after interval*count seconds.
        """
        self.fleet.network.pumps.remove(self.agentPump)  # nothing moves on the link any more
        settings = self.fleet.factory.settings
        deadline = settings.keepaliveInterval * settings.keepaliveCount
        self.fleet.clock.advance(deadline - 1)
        self.assertFalse(self.agentPump.serverIO.disconnecting)
        self.fleet.clock.advance(1)
        self.assertTrue(self.agentPump.serverIO.disconnecting)
        self.fleet.network.pumps.append(self.agentPump)
        self.fleet.flush()
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))

    def test_idleLinkSurvivesKeepalives(self) -> None:
        """An idle but healthy link answers keepalives and stays routable for hours."""
        for _ in range(2 * 3600 // 5):
            self.fleet.clock.advance(5)
            self.fleet.flush()
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        session = self.openSession()
        self.runCommand(session, b"still here")
        self.assertEqual(session.exitStatus, 0)


class ObserverOrderTests(SynchronousTestCase):
    """The observer (recording, live watchers) is not on the path of the bytes."""

    def test_observerToldAfterThePeerHasTheBytes(self) -> None:
        """
        Data and extended data are handed to the other side first and only then to
        the observer, so that recording an interactive session's output does not
        delay its echo; the observer still sees every byte, in order.
        """
        events: list[tuple[str, bytes]] = []

        class Peer:
            def write(self, data: bytes) -> None:
                events.append(("peer", data))

            def writeExtended(self, dataType: int, data: bytes) -> None:
                events.append(("peer-ext", data))

        class Observer:
            def relayData(self, side: Any, data: bytes) -> None:
                events.append(("observer", data))

        from groundcontrol.relay import RelayChannel

        side = RelayChannel()
        side.peer = Peer()  # type: ignore[assignment]
        side.observer = Observer()
        side.dataReceived(b"k")
        side.extReceived(connection.EXTENDED_DATA_STDERR, b"e")
        self.assertEqual(
            events, [("peer", b"k"), ("observer", b"k"), ("peer-ext", b"e"), ("observer", b"e")]
        )
        self.assertEqual(side.bytesReceived, 2)
