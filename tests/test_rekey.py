"""
Key re-exchange on our transports (accesstunnel.rekey), in memory: the real
groundcontrol front door and the real agent link over iosim, on a Clock.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.conch.ssh import transport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from accesstunnel.rekey import (
    DEFAULT_REKEY_BYTES,
    DEFAULT_REKEY_SECONDS,
    RekeyingTransportMixin,
    RekeyLimit,
    parseRekeyLimit,
)
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.sshserver import ServerSettings
from groundcontrol.testing import (
    FakeOperator,
    InMemoryFleet,
    OperatorSession,
    Script,
    ScriptedSession,
    echoScript,
    publicLine,
    refuseForwards,
    scriptedSessions,
)

MiB = 1 << 20
NEVER = RekeyLimit(bytes=0, seconds=0)


def script(command: bytes | None) -> Script | None:
    if command == b"stream":
        return Script(stream=8 * MiB)
    return echoScript(command)


def recordSent(sshTransport: Any) -> list[int]:
    """Record the message type of every packet C{sshTransport} sends from now on."""
    sent: list[int] = []
    original = sshTransport.sendPacket

    def sendPacket(messageType: int, payload: bytes) -> None:
        sent.append(messageType)
        original(messageType, payload)

    sshTransport.sendPacket = sendPacket
    return sent


class ParseTests(SynchronousTestCase):
    """--rekey-limit takes OpenSSH's RekeyLimit spelling."""

    def test_forms(self) -> None:
        """SIZE alone keeps the default time; SIZE TIME and SIZE,TIME set both; none disables."""
        self.assertEqual(parseRekeyLimit("1G"), RekeyLimit(1 << 30, DEFAULT_REKEY_SECONDS))
        self.assertEqual(parseRekeyLimit("64M 30m"), RekeyLimit(64 * MiB, 1800))
        self.assertEqual(parseRekeyLimit("512k,1h"), RekeyLimit(512 << 10, 3600))
        self.assertEqual(parseRekeyLimit("none none"), NEVER)
        self.assertEqual(parseRekeyLimit("default 10s"), RekeyLimit(DEFAULT_REKEY_BYTES, 10))
        self.assertEqual(RekeyLimit(), RekeyLimit(1 << 30, 3600))

    def test_refusals(self) -> None:
        """Garbage, tiny sizes and extra words are refused with the accepted form."""
        for text in ("", "lots", "1T", "100", "1G 1h 2", "1G soon", "-1G"):
            with self.assertRaises(ValueError, msg=text):
                parseRekeyLimit(text)


class LinkRekeyTests(SynchronousTestCase):
    """
    A fleet with device kiln7 on the real agent link and operator alice; each test
    sets the limits of groundcontrol and the agent.
    """

    def connect(self, server: RekeyLimit, agent: RekeyLimit) -> None:
        # These limits renew the keys many times a second (of a clock that stands
        # still): groundcontrol's bound on the agent's re-exchanges is off.
        self.fleet = InMemoryFleet(settings=ServerSettings(rekeyLimit=server, peerRekeyBurst=0))
        deviceKey = self.fleet.enrollDevice("kiln7")
        aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        self.sessions: list[ScriptedSession] = []
        settings = LinkSettings(
            name="kiln7",
            deviceKey=deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
            rekeyLimit=agent,
        )
        factory = AgentLinkFactory(
            settings,
            self.fleet.clock,
            scriptedSessions(script, self.sessions),
            refuseForwards,
        )
        pump = self.fleet.connect(factory)
        self.agentSide: Any = pump.client
        self.serverSide: Any = pump.server
        self.linkService = self.agentSide.service
        self.assertEqual(self.agentSide.keyExchanges, 1)
        # The operator's client is a Conch client too: it needs the mixin's
        # NEWKEYS fix when groundcontrol rekeys its connection, and no limit of its own.
        operator = FakeOperator("dev_kiln7", aliceKey, hostKey=self.fleet.hostKey)
        operator.protocol = cast(
            Any,
            type(
                "RekeyableOperatorTransport",
                (RekeyingTransportMixin, FakeOperator.protocol),
                {"rekeySettings": lambda self: (NEVER, None)},
            ),
        )
        self.fleet.connect(operator)
        self.operator = operator
        self.assertIsNotNone(operator.connection)

    def stream(self) -> OperatorSession:
        """Run a session streaming 8 MiB from the device to the operator, to its end."""
        session = self.fleet.session(self.operator)
        self.assertTrue(session.isOpen, session.openFailure)
        session.releaseWindow()
        d = session.exec(b"stream")
        self.fleet.flush()
        self.successResultOf(d)  # type: ignore[arg-type]
        return session

    def assertStreamed(self, session: OperatorSession) -> None:
        self.assertEqual(len(session.output), 8 * MiB)
        self.assertEqual(session.events[-3:], [("exit-status", 0), ("eof",), ("close",)])

    def test_agentStartsRekeyAfterBytes(self) -> None:
        """
        The agent sends a second KEXINIT once its byte limit is passed, the
        link keeps its connection service (no second login), and the
        session's data, exit status and close all arrive.
        """
        self.connect(server=NEVER, agent=RekeyLimit(bytes=2 * MiB, seconds=0))
        sent = recordSent(self.agentSide)
        session = self.stream()
        self.assertStreamed(session)
        kexinits = sent.count(transport.MSG_KEXINIT)
        self.assertGreaterEqual(kexinits, 3)  # 8 MiB past a 2 MiB limit
        self.assertEqual(self.agentSide.keyExchanges, 1 + kexinits)
        self.assertEqual(self.serverSide.keyExchanges, self.agentSide.keyExchanges)
        self.assertIs(self.agentSide.service, self.linkService)
        self.assertNotIn(transport.MSG_SERVICE_REQUEST, sent)
        # The link still carries new sessions after the re-exchanges.
        again = self.fleet.session(self.operator)
        d = again.exec(b"hello")
        self.fleet.flush()
        self.successResultOf(d)  # type: ignore[arg-type]
        self.assertEqual(bytes(again.output), b"hello\n")

    def test_serverStartsRekeyAfterBytes(self) -> None:
        """
        groundcontrol renews the keys of the agent link (and of the operator's
        connection) past its limit; the agent answers without restarting
        ssh-userauth, which Conch's client would otherwise do after every NEWKEYS.
        """
        self.connect(server=RekeyLimit(bytes=2 * MiB, seconds=0), agent=NEVER)
        agentSent = recordSent(self.agentSide)
        serverSent = recordSent(self.serverSide)
        session = self.stream()
        self.assertStreamed(session)
        self.assertGreaterEqual(serverSent.count(transport.MSG_KEXINIT), 3)
        self.assertGreaterEqual(self.agentSide.keyExchanges, 4)
        self.assertIs(self.agentSide.service, self.linkService)
        self.assertNotIn(transport.MSG_SERVICE_REQUEST, agentSent)
        operatorSide: Any = self.fleet.network.pumps[-1].client
        self.assertGreaterEqual(operatorSide.keyExchanges, 4)

    def test_noRekeyBelowTheLimit(self) -> None:
        """Below the byte limit and before the time limit, there is one key exchange only."""
        self.connect(server=RekeyLimit(bytes=64 * MiB), agent=RekeyLimit(bytes=64 * MiB))
        self.assertStreamed(self.stream())
        self.assertEqual(self.agentSide.keyExchanges, 1)
        self.assertEqual(self.serverSide.keyExchanges, 1)

    def test_timeLimit(self) -> None:
        """
        With a time limit alone, the agent renews the keys each time it passes
        on an idle link, with one pending timer per connection, and the timer
        stops with the connection.
        """
        self.connect(server=NEVER, agent=RekeyLimit(bytes=0, seconds=600))
        clock = self.fleet.clock

        def timers() -> list[Any]:
            return [
                c
                for c in clock.getDelayedCalls()
                if getattr(c.func, "__self__", None) is self.agentSide
                and c.func.__name__ == "_rekeyTimeUp"
            ]

        def advance(seconds: int) -> None:
            for _ in range(seconds):  # keepalives answered as the time goes by
                clock.advance(1)
                self.fleet.flush()

        self.assertEqual(len(timers()), 1)
        for expected in (2, 3):
            advance(599)
            self.assertEqual(self.agentSide.keyExchanges, expected - 1)
            advance(1)
            self.assertEqual(self.agentSide.keyExchanges, expected)
            self.assertEqual(len(timers()), 1)
        self.assertIs(self.agentSide.service, self.linkService)
        self.agentSide.transport.loseConnection()
        self.fleet.flush()
        self.assertEqual(timers(), [])

    def test_timeLimitThroughWallClockStep(self) -> None:
        """
        groundcontrol times with the wall clock: a step forward past its time limit fires
        the link's timer early, and the keys are not renewed then (10,000 links would
        renew at once) but when the limit has passed on a clock that does not step.
        """
        self.connect(server=RekeyLimit(bytes=0, seconds=600), agent=NEVER)
        clock = self.fleet.clock
        # A clock that does not step, in step with the fleet's so far (the keys' time).
        monotonic = Clock()
        monotonic.advance(clock.seconds())
        clock.elapsedSeconds = monotonic.seconds  # type: ignore[attr-defined]

        def advance(seconds: int, step: bool = False) -> None:
            for _ in range(seconds):
                clock.advance(1)
                if not step:
                    monotonic.advance(1)
                self.fleet.flush()

        advance(100)
        advance(3600, step=True)  # NTP steps groundcontrol's clock an hour forward
        self.assertEqual(self.serverSide.keyExchanges, 1)
        advance(499)
        self.assertEqual(self.serverSide.keyExchanges, 1)
        advance(2)
        self.assertEqual(self.serverSide.keyExchanges, 2)
        self.assertIs(self.agentSide.service, self.linkService)

    def test_noSecondKexinitWhileExchanging(self) -> None:
        """
        While a key exchange is running, passing the limit again sends nothing
        (Conch raises if KEXINIT is sent twice): a tiny limit on both ends at
        once still streams everything.
        """
        tiny = RekeyLimit(bytes=64 << 10, seconds=0)
        self.connect(server=tiny, agent=tiny)
        self.assertStreamed(self.stream())
        self.assertGreater(self.agentSide.keyExchanges, 50)
        self.assertEqual(self.agentSide.keyExchanges, self.serverSide.keyExchanges)
