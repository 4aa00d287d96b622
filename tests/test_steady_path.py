"""
The steady path of our SSH transports (accesstunnel.fastpath.enterSteadyState): once a
connection is logged in and past its quick ACKs, every read goes to one method that does
what the layers above the packet loop did per read, and every packet to the fast layer's
own C{sendPacket}, which counts for the rekey layer. In memory: the real groundcontrol
front door and the real agent link over iosim, on a Clock.

Most tests replace the layers' own C{dataReceived} and C{sendPacket} with ones that
fail, so that what still works is proven to work on the steady path: the keepalive's
clock, the rekey byte limits both ways, the 2^31-packet limit, strict key exchange's
sequence numbers over a re-exchange, and the disconnect of a tampered packet. Last, the
channel data dispatch each keystroke goes through next (accesstunnel.connection).
"""

from __future__ import annotations

import struct
from typing import Any, cast

from twisted.conch.ssh import common, transport
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from accesstunnel import fastpath, quickack, writethrough
from accesstunnel.addresses import describeAddress
from accesstunnel.connection import TunnelConnection
from accesstunnel.keys import fingerprint
from accesstunnel.rekey import RekeyingTransportMixin, RekeyLimit
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, AgentTransport, LinkSettings
from groundcontrol.sshserver import GroundControlTransport, ServerSettings
from groundcontrol.testing import (
    FakeOperator,
    InMemoryFleet,
    OperatorSession,
    ScriptedSession,
    publicLine,
    refuseForwards,
    scriptedSessions,
)
from tests.test_rekey import NEVER, recordSent, script


def recordDisconnects(sshTransport: Any) -> list[int]:
    """Record the reason code of every disconnect C{sshTransport} sends from now on."""
    reasons: list[int] = []
    original = sshTransport.sendDisconnect

    def sendDisconnect(reason: int, desc: bytes) -> None:
        reasons.append(reason)
        original(reason, desc)

    sshTransport.sendDisconnect = sendDisconnect
    return reasons


class SteadyFleet(SynchronousTestCase):
    """kiln7 on the real agent link, operator alice with a C{cat} session open on it."""

    agentProtocol: type = AgentTransport

    def connect(self, server: RekeyLimit = NEVER, agent: RekeyLimit = NEVER) -> None:
        self.fleet = InMemoryFleet(settings=ServerSettings(rekeyLimit=server))
        deviceKey = self.fleet.enrollDevice("kiln7")
        aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        self.sessions: list[ScriptedSession] = []
        factory = AgentLinkFactory(
            LinkSettings(
                name="kiln7",
                deviceKey=deviceKey,
                serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
                rekeyLimit=agent,
            ),
            self.fleet.clock,  # type: ignore[arg-type]
            scriptedSessions(script, self.sessions),
            refuseForwards,
        )
        factory.protocol = self.agentProtocol  # type: ignore[assignment]
        self.linkPump = self.fleet.connect(factory)
        self.agentSide: Any = self.linkPump.client
        self.serverSide: Any = self.linkPump.server
        # The operator's client is Conch's: it needs the rekey mixin's NEWKEYS fix when
        # groundcontrol renews its keys (as in tests/test_rekey.py), and no limit of its own.
        self.operator = FakeOperator("dev_kiln7", aliceKey, hostKey=self.fleet.hostKey)
        self.operator.protocol = type(  # type: ignore[assignment]
            "RekeyableOperatorTransport",
            (RekeyingTransportMixin, FakeOperator.protocol),
            {"rekeySettings": lambda self: (NEVER, None)},
        )
        self.fleet.connect(self.operator)
        (self.operatorPump,) = [p for p in self.fleet.network.pumps if p is not self.linkPump]
        #: groundcontrol's end of the operator's connection.
        self.operatorSide: Any = self.operatorPump.server

    def openCat(self) -> OperatorSession:
        session = self.fleet.session(self.operator)
        self.assertTrue(session.isOpen, session.openFailure)
        d = session.exec(b"cat")
        self.fleet.flush()
        self.successResultOf(d)  # type: ignore[arg-type]
        return session

    def keystroke(self, session: OperatorSession, key: bytes = b"k") -> None:
        """The operator types C{key}; it comes back through the device's C{cat}."""
        before = len(session.output)
        session.write(key)
        self.fleet.flush()
        self.assertEqual(bytes(session.output[before:]), key)

    def withoutTheChain(self) -> None:
        """
        From now on, the chain of our transports' C{dataReceived} and C{sendPacket}
        (quick ACKs, keepalive, rekey, pre-login limits, packet layer) fails if entered.
        """
        for cls in (GroundControlTransport, AgentTransport):
            for name in ("dataReceived", "sendPacket"):

                def refuse(self: Any, *args: Any, _where: str = f"{cls.__name__}.{name}") -> None:
                    raise AssertionError(f"{_where} called on the steady path")

                # Not self.patch: its cleanup would leave the inherited method set on
                # the class itself, which keeps later transports off the steady path.
                assert name not in vars(cls)
                setattr(cls, name, refuse)
                self.addCleanup(delattr, cls, name)


class SteadyStateTests(SteadyFleet):
    """Which transports take the steady path, and when."""

    def test_loggedInTransportsAreSteady(self) -> None:
        """
        Both ends of the agent link and groundcontrol's end of an operator's connection
        (no TCP socket here, so no quick ACKs) are steady once logged in, and a
        keystroke's round trip then runs without any of the layers' own methods.
        """
        self.connect()
        for side in (self.agentSide, self.serverSide, self.operatorSide):
            self.assertTrue(side.steady)
            self.assertEqual(side.dataReceived, side._fpSteadyRead)
        session = self.openCat()
        self.withoutTheChain()
        for key in (b"a", b"b", b"\r"):
            self.keystroke(session, key)
        self.assertTrue(self.serverSide.steady)

    def test_notBeforeLogin(self) -> None:
        """
        A connection that has not logged in (nor finished its first key exchange) keeps
        the whole chain: the pre-login limits still see every read.
        """
        self.connect()
        sshTransport: Any = self.fleet.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 40000))
        sshTransport.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 1)))
        self.assertFalse(sshTransport.enterSteadyState())
        self.assertFalse(sshTransport.steady)
        self.assertNotIn("dataReceived", vars(sshTransport))
        # Keys but no login: still not.
        sshTransport._fpIn = self.serverSide._fpIn
        self.assertFalse(sshTransport.enterSteadyState())
        sshTransport.connectionLost(None)

    def test_aLayerWithItsOwnReadKeepsTheChain(self) -> None:
        """
        A transport class that adds its own C{dataReceived} above the packet layer (work
        the steady path does not know of) is never steady, and its reads reach it.
        """
        reads: list[int] = []

        class Watching(AgentTransport):
            def dataReceived(self, data: bytes) -> None:
                reads.append(len(data))
                super().dataReceived(data)

        self.agentProtocol = Watching
        self.connect()
        self.assertFalse(self.agentSide.steady)
        self.assertTrue(self.serverSide.steady)
        before = len(reads)
        self.keystroke(self.openCat())
        self.assertGreater(len(reads), before)

    def test_anInstanceShadowKeepsTheChain(self) -> None:
        """A C{sendPacket} already shadowed on the instance (a test's recorder) is kept."""
        self.connect()
        self.serverSide.steady = False
        del self.serverSide.dataReceived
        del self.serverSide.sendPacket
        sent = recordSent(self.serverSide)
        self.assertFalse(self.serverSide.enterSteadyState())
        self.keystroke(self.openCat())
        self.assertIn(94, sent)

    def test_aLayerBelowThatCallsTheChainIsRepointed(self) -> None:
        """
        A layer under the transport that kept the transport's C{dataReceived} (the
        handshake limiter once it steps aside, Twisted's endpoint wrapper under the
        agent) calls the steady read once the transport is steady.
        """
        enter = fastpath.FastPathMixin.enterSteadyState
        self.patch(fastpath.FastPathMixin, "enterSteadyState", lambda self: False)
        self.connect()
        self.assertFalse(self.serverSide.steady)
        below: Any = self.serverSide.transport
        below.dataReceived = self.serverSide.dataReceived
        self.assertTrue(enter(self.serverSide))
        self.assertEqual(below.dataReceived, self.serverSide._fpSteadyRead)
        self.keystroke(self.openCat())


class QuickAckThenSteadyTests(SteadyFleet):
    """An operator's connection turns steady when its quick ACKs are over."""

    def setUp(self) -> None:
        if quickack.TCP_QUICKACK is None:
            raise SkipTest("no TCP_QUICKACK on this platform")
        self.options: list[Any] = []

        class Socket:
            def __init__(self, options: list[Any]) -> None:
                self.options = options

            def setsockopt(self, *option: Any) -> None:
                self.options.append(option)

        self.patch(quickack, "tcpSocketOf", lambda transport: Socket(self.options))

    def test_steadyAfterTheLastQuickAck(self) -> None:
        """
        While quick ACKs are left the operator's connection keeps the chain (each read
        sets the option); after the last one it is steady and sets nothing more.
        """
        self.connect()
        self.assertTrue(self.serverSide.steady)  # an agent link stops them at login
        session = self.openCat()
        while self.operatorSide._quickAcksLeft:
            self.assertFalse(self.operatorSide.steady)
            self.keystroke(session)
        self.assertTrue(self.operatorSide.steady)
        setAtTheEnd = len(self.options)
        self.withoutTheChain()
        for _ in range(5):
            self.keystroke(session)
        self.assertEqual(len(self.options), setAtTheEnd)


class SteadyBehaviourTests(SteadyFleet):
    """What the layers did per read and per packet still happens on the steady path."""

    def test_keepaliveSeesEveryRead(self) -> None:
        """Every read stores the time for the keepalive, on both ends of each hop."""
        self.connect()
        session = self.openCat()
        self.withoutTheChain()
        self.fleet.clock.advance(7)
        self.keystroke(session)
        now = self.fleet.clock.seconds()
        for side in (self.operatorSide, self.serverSide, self.agentSide):
            self.assertEqual(side.keepalive.lastReceived, now)

    def test_theCodecIsAskedOncePerPacket(self) -> None:
        """
        The steady read stops at the end of its buffer without asking the codec again
        (it would only say it needs more): reads of whole packets ask it once per
        packet on every end of both hops. Read a byte at a time, every packet still
        arrives whole: the codec is asked whenever bytes remain.
        """
        self.connect()
        session = self.openCat()
        self.withoutTheChain()
        sides = (self.operatorSide, self.serverSide, self.agentSide)
        asked = [0, 0, 0]
        for i, side in enumerate(sides):
            codec = side._fpIn
            real = codec.open

            def counted(*args: Any, _i: int = i, _real: Any = real) -> Any:
                asked[_i] += 1
                return _real(*args)

            codec.open = counted
        before = [side.incomingPacketSequence for side in sides]
        self.keystroke(session)
        packets = [side.incomingPacketSequence - b for side, b in zip(sides, before, strict=True)]
        self.assertTrue(all(packets))
        self.assertEqual(asked, packets)
        steady = self.agentSide.dataReceived
        reads: list[int] = []

        def byteByByte(data: bytes) -> None:
            reads.append(len(data))
            for i in range(len(data)):
                steady(data[i : i + 1])

        for holder in (self.agentSide, self.agentSide.transport.protocol):
            if vars(holder).get("dataReceived") == steady:
                holder.dataReceived = byteByByte
        self.keystroke(session, b"split")
        self.assertTrue(reads)

    def test_readBytesCountTowardsTheLimit(self) -> None:
        """
        The bytes read count towards the rekey limit: one byte short of it, the
        agent renews the keys when the next keystroke reaches it, and the session
        goes on.
        """
        self.connect()
        session = self.openCat()
        self.withoutTheChain()
        kexinits: list[str] = []
        for name, side in (("agent", self.agentSide), ("groundcontrol", self.serverSide)):
            original = side.sendPacket

            def sendPacket(
                messageType: int, payload: bytes, _n: str = name, _o: Any = original
            ) -> None:
                if messageType == transport.MSG_KEXINIT:
                    kexinits.append(_n)
                _o(messageType, payload)

            side.sendPacket = sendPacket
        self.agentSide._rekeyBytesLimit = self.agentSide._rekeyBytes + 1
        before = self.agentSide.keyExchanges
        session.write(b"k")
        self.fleet.flush()
        self.assertEqual(kexinits, ["agent", "groundcontrol"])
        self.assertEqual(self.agentSide.keyExchanges, before + 1)
        self.assertEqual(self.serverSide.keyExchanges, before + 1)
        self.keystroke(session)

    def test_sentBytesCountTowardsTheLimit(self) -> None:
        """
        Packets sent count towards the rekey limit, held ones included: a connection
        layer packet past it starts a key exchange at once (before any read), a
        transport message does not.
        """
        self.connect()
        self.openCat()
        self.withoutTheChain()
        side = self.serverSide
        side._rekeyBytesLimit = side._rekeyBytes + 10
        side.sendPacket(transport.MSG_IGNORE, b"x" * 20)
        self.assertEqual(side._keyExchangeState, side._KEY_EXCHANGE_NONE)
        side.service.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=0)
        self.assertNotEqual(side._keyExchangeState, side._KEY_EXCHANGE_NONE)
        # Held during the exchange: counted all the same.
        held = side._rekeyBytes
        side.service.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=0)
        self.assertEqual(len(side._blockedByKeyExchange), 1)
        self.assertGreater(side._rekeyBytes, held)
        self.fleet.flush()
        self.assertEqual(side.keyExchanges, 2)
        self.assertEqual(self.agentSide.keyExchanges, 2)

    def test_streamWithSmallLimits(self) -> None:
        """
        With a 1 MiB limit on groundcontrol and the agent, 8 MiB streamed from the
        device renews the keys of the link and of the operator's connection again and
        again, every byte arriving, without any layer's own methods.
        """
        limit = RekeyLimit(bytes=1 << 20, seconds=0)
        self.connect(server=limit, agent=limit)
        session = self.fleet.session(self.operator)
        session.releaseWindow()
        self.withoutTheChain()
        d = session.exec(b"stream")
        self.fleet.flush()
        self.successResultOf(d)  # type: ignore[arg-type]
        self.assertEqual(len(session.output), 8 << 20)
        self.assertEqual(session.events[-3:], [("exit-status", 0), ("eof",), ("close",)])
        self.assertGreater(self.agentSide.keyExchanges, 3)
        self.assertEqual(self.agentSide.keyExchanges, self.serverSide.keyExchanges)
        self.assertGreater(self.operatorSide.keyExchanges, 3)

    def test_packetLimitAndStrictKexSequenceNumbers(self) -> None:
        """
        2^31 packets under one key start a key exchange on the steady path too, and
        with strict key exchange both sequence numbers start again from zero after it.
        """
        self.connect()
        session = self.openCat()
        self.withoutTheChain()
        self.assertTrue(self.agentSide.strictKex)
        self.agentSide.outgoingPacketSequence = (1 << 31) - 1
        self.serverSide.incomingPacketSequence = (1 << 31) - 1
        before = self.agentSide.keyExchanges
        self.agentSide.service.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=0)
        self.assertNotEqual(self.agentSide._keyExchangeState, self.agentSide._KEY_EXCHANGE_NONE)
        self.fleet.flush()
        self.assertEqual(self.agentSide.keyExchanges, before + 1)
        self.assertLess(self.agentSide.outgoingPacketSequence, 10)
        self.assertEqual(
            self.agentSide.outgoingPacketSequence, self.serverSide.incomingPacketSequence
        )
        self.keystroke(session)

    def test_tamperedPacketDisconnects(self) -> None:
        """A flipped bit in a packet on the steady path ends the link with a MAC error."""
        self.connect()
        session = self.openCat()
        self.withoutTheChain()
        errors = recordDisconnects(self.serverSide)
        self.agentSide.service.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=0)
        io = self.linkPump.clientIO
        wire = bytearray(b"".join(io.stream))
        wire[10] ^= 0x01
        io.stream = [bytes(wire)]
        self.fleet.flush()
        self.assertEqual(errors, [transport.DISCONNECT_MAC_ERROR])
        self.assertTrue(self.linkPump.serverIO.disconnected)
        self.assertTrue(session.isClosed)  # the operator's session ends with the link


class InteractiveYieldTests(SteadyFleet):
    """
    A small channel-data packet (a keystroke, its echo) gives up the CPU once written, on
    every hop, so that the process it woke runs ahead of the rest of this turn; nothing
    else does (accesstunnel.writethrough).
    """

    def yields(self) -> list[Any]:
        """From now on, who gives up the CPU (the transport sending), in order."""
        sending: list[Any] = []
        for side in (self.serverSide, self.agentSide, self.operatorSide):
            # The steady path's sendPacket is the packet layer's, bound on the instance.
            send = side.sendPacket

            def sendPacket(
                messageType: int, payload: bytes, _side: Any = side, _send: Any = send
            ) -> None:
                sending.append(_side)
                try:
                    _send(messageType, payload)
                finally:
                    sending.pop()

            side.sendPacket = sendPacket
        yields: list[Any] = []
        self.patch(writethrough, "yieldAfterSend", lambda: yields.append(sending[-1]))
        return yields

    def test_aKeystrokeYieldsOnEveryHop(self) -> None:
        """
        groundcontrol sending the keystroke on the link, the agent sending its echo
        back, groundcontrol sending the echo to the operator: each yields once.
        """
        self.connect()
        session = self.openCat()
        yields = self.yields()
        self.keystroke(session)
        self.assertEqual(yields, [self.serverSide, self.agentSide, self.operatorSide])

    def test_nothingElseYields(self) -> None:
        """
        A keepalive and its answer, a window adjustment, channel data above the limit and
        a packet held during a key exchange give nothing away: a busy server's
        bookkeeping and bulk keep their CPU.
        """
        self.connect()
        self.openCat()
        yields = self.yields()
        side = self.serverSide
        answered = side.service.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        self.fleet.flush()
        self.failureResultOf(answered)  # the agent's answer: REQUEST_FAILURE, as OpenSSH's
        side.sendPacket(MSG_CHANNEL_WINDOW_ADJUST, struct.pack(">2L", 0, 1))
        big = b"x" * (writethrough.YIELD_AFTER_SEND_LIMIT + 1)
        side.sendPacket(MSG_CHANNEL_DATA, struct.pack(">L", 0) + NS(big))
        self.assertEqual(yields, [])
        side.sendKexInit()
        side.sendPacket(MSG_CHANNEL_DATA, struct.pack(">L", 0) + NS(b"k"))
        self.assertEqual(len(side._blockedByKeyExchange), 1)
        self.assertEqual(yields, [])


class MalformedMessageTests(SteadyFleet):
    """
    Messages a logged-in peer can send that broke groundcontrol's transport on the
    steady path (found by tests/test_fuzz_steady.py): each now ends that connection with
    a protocol error, and nothing else. And the same exception raised by a bug of ours
    instead, which is logged as the failure it is.
    """

    def steadyLogEvents(self) -> list[dict[str, Any]]:
        """What the steady read logs from now on, kept here instead of logged."""
        events: list[dict[str, Any]] = []
        self.patch(
            fastpath.FastPathMixin, "_fpLog", Logger(observer=cast(ILogObserver, events.append))
        )
        return events

    def test_truncatedChannelMessageFromTheDevice(self) -> None:
        """
        A CHANNEL_CLOSE two bytes long (its handler unpacks four) from the device drops
        the link with a protocol error instead of a struct.error out of the read; the
        operator's connection stays up.
        """
        self.connect()
        session = self.openCat()
        reasons = recordDisconnects(self.serverSide)
        self.agentSide.sendPacket(MSG_CHANNEL_CLOSE, b"\0\0")
        self.fleet.flush()
        self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
        self.assertTrue(self.linkPump.serverIO.disconnected)
        self.assertTrue(session.isClosed)
        self.assertFalse(self.operatorPump.serverIO.disconnecting)

    def test_emptyDebugFromAnOperator(self) -> None:
        """
        An empty DEBUG message (Conch's handler raises TypeError on it) from a logged-in
        operator drops that operator with a protocol error; the device link goes on. The
        one log line (an info, no failure) names the message and where Conch raised. The
        same for a re-exchange's KEXINIT cut after its name-lists (Conch's server
        handler raises TypeError on the missing flag), though our C{ssh_KEXINIT} called
        Conch's (accesstunnel.handlerfault).
        """
        for messageType, cut, function in (
            (transport.MSG_DEBUG, lambda client: b"", "ssh_DEBUG"),
            (transport.MSG_KEXINIT, lambda client: client.ourKexInitPayload[1:-5], "ssh_KEXINIT"),
        ):
            self.connect()
            self.openCat()
            events = self.steadyLogEvents()
            reasons = recordDisconnects(self.operatorSide)
            client = self.operatorPump.client
            client.sendPacket(messageType, cut(client))
            self.fleet.flush()
            self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
            self.assertTrue(self.operatorPump.serverIO.disconnected)
            self.assertFalse(self.linkPump.serverIO.disconnecting)
            [event] = events
            self.assertNotIn("log_failure", event)
            self.assertEqual(event["log_level"], LogLevel.info)
            self.assertEqual(
                (event["messageNum"], event["module"], event["function"]),
                (messageType, "twisted.conch.ssh.transport", function),
            )

    def test_aBugOfOursIsAFailure(self) -> None:
        """
        A TypeError raised in our own handler code (here accesstunnel.connection's
        CHANNEL_DATA handler calling a channel's C{dataReceived} with the wrong
        arguments) is no malformed message: it is logged as a failure, traceback and
        all, naming the message and the function, and the connection ends as the
        application's doing, not the peer's protocol error. The device link goes on.
        The same when our handler hands the data to a Conch function that wants
        something else (C{common.MP}, which raises TypeError on bytes): placed at our
        call, though Conch raised it (accesstunnel.handlerfault).
        """
        for bug in (lambda: None, common.MP):
            self.connect()
            session = self.openCat()
            events = self.steadyLogEvents()
            own = session.conn.channelsToRemoteChannel[session]
            relay = self.operatorSide.service.channels[own]
            relay.dataReceived = bug
            reasons = recordDisconnects(self.operatorSide)
            session.write(b"k")
            self.fleet.flush()
            self.assertEqual(reasons, [transport.DISCONNECT_BY_APPLICATION])
            self.assertTrue(self.operatorPump.serverIO.disconnected)
            self.assertFalse(self.linkPump.serverIO.disconnecting)
            [event] = events
            self.assertEqual(event["log_failure"].type, TypeError)
            self.assertEqual(
                (event["messageNum"], event["module"], event["function"]),
                (MSG_CHANNEL_DATA, "accesstunnel.connection", "ssh_CHANNEL_DATA"),
            )

    def test_answerToAnOpenChannelsOpen(self) -> None:
        """
        An OPEN_FAILURE or OPEN_CONFIRMATION naming a channel that is open already is
        refused with a protocol error: Conch's handlers forgot the open channel (its end
        then raised KeyError when the connection was lost) or re-pointed it.
        """
        for messageType, body in (
            (MSG_CHANNEL_OPEN_FAILURE, struct.pack(">L", 2) + NS(b"no") + NS(b"")),
            (MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">3L", 77, 1 << 20, 1 << 15)),
        ):
            self.connect()
            session = self.openCat()
            own = session.conn.channelsToRemoteChannel[session]
            reasons = recordDisconnects(self.operatorSide)
            self.operatorPump.client.sendPacket(messageType, struct.pack(">L", own) + body)
            self.fleet.flush()
            self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
            self.assertTrue(self.operatorPump.serverIO.disconnected)
            self.assertTrue(session.isClosed)
            self.assertFalse(self.linkPump.serverIO.disconnecting)


class ProtocolStateTests(SteadyFleet):
    """
    Messages that are well formed but out of place after login (found by
    tests/test_fuzz_steady.py): groundcontrol no longer acts on them.
    """

    def test_serviceRequestAfterLoginIsUnimplemented(self) -> None:
        """
        A logged-in operator asking for ssh-userauth again gets UNIMPLEMENTED (with the
        request's sequence number), as from OpenSSH's sshd: its connection service and
        sessions go on, where Conch replaced the service and closed every channel.
        """
        self.connect()
        session = self.openCat()
        service = self.operatorSide.service
        unimplemented: list[int] = []
        client = self.operatorPump.client
        self.patch(client, "receiveUnimplemented", unimplemented.append)
        sequence = client.outgoingPacketSequence
        client.sendPacket(transport.MSG_SERVICE_REQUEST, NS(b"ssh-userauth"))
        self.fleet.flush()
        self.assertEqual(unimplemented, [sequence])
        self.assertIs(self.operatorSide.service, service)
        self.assertFalse(session.isClosed)
        self.keystroke(session)

    def test_keyExchangeMessageOutsideAnExchange(self) -> None:
        """
        A key exchange method's message with no exchange running ends the connection
        with a protocol error (Conch answered it from the last exchange, sent NEWKEYS and
        switched its keys alone): from an operator, and from the device on the link.
        """
        self.connect()
        self.openCat()
        reasons = recordDisconnects(self.operatorSide)
        self.operatorPump.client.sendPacket(30, NS(b"\x01" * 32))
        self.fleet.flush()
        self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
        self.assertTrue(self.operatorPump.serverIO.disconnected)
        self.assertFalse(self.linkPump.serverIO.disconnecting)
        reasons = recordDisconnects(self.serverSide)
        self.agentSide.sendPacket(31, NS(b"\x01" * 32))
        self.fleet.flush()
        self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
        self.assertTrue(self.linkPump.serverIO.disconnected)

    def kexinitThrice(self, sender: Any, receiver: Any) -> tuple[list[int], list[dict[str, Any]]]:
        """
        C{sender} sends its last KEXINIT three times in a row behind its own transport's
        back, hearing nothing of the answers but a disconnect (as a hostile peer would,
        and as tests/test_fuzz_steady.py's fuzzing peer does): C{receiver}'s disconnect
        reasons, and what the packet layer logged.
        """
        events: list[dict[str, Any]] = []
        self.patch(
            fastpath.FastPathMixin, "_fpLog", Logger(observer=cast(ILogObserver, events.append))
        )
        hear = sender.dispatchMessage

        def hearOnlyDisconnect(messageNum: int, payload: bytes) -> None:
            if messageNum == transport.MSG_DISCONNECT:
                hear(messageNum, payload)

        sender.dispatchMessage = hearOnlyDisconnect
        reasons = recordDisconnects(receiver)
        for _ in range(3):
            sender.sendPacket(transport.MSG_KEXINIT, sender.ourKexInitPayload[1:])
        self.fleet.flush()
        return reasons, events

    def assertKexinitAgainLogged(self, events: list[dict[str, Any]], receiver: Any) -> None:
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertIn("sent KEXINIT again during a key exchange", event["log_format"])
        self.assertEqual(event["peer"], describeAddress(receiver.transport.getPeer()))

    def test_kexinitAgainDuringAnExchange(self) -> None:
        """
        A peer's KEXINIT while the exchange its previous one began runs (before its
        NEWKEYS) ends the connection with a protocol error and one info line: from an
        operator (found by tests/test_fuzz_steady.py: Conch negotiated again at the
        second and raised RuntimeError out of groundcontrol's read at the third, 'Cannot
        send KEXINIT while key exchange state is _KEY_EXCHANGE_PROGRESSING'), and from the
        device on the link. Either way the other connection goes on.
        """
        self.connect()
        self.openCat()
        reasons, events = self.kexinitThrice(self.operatorPump.client, self.operatorSide)
        self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
        self.assertTrue(self.operatorPump.serverIO.disconnected)
        self.assertKexinitAgainLogged(events, self.operatorSide)
        self.assertFalse(self.linkPump.serverIO.disconnecting)

        self.connect()
        session = self.openCat()
        reasons, events = self.kexinitThrice(self.agentSide, self.serverSide)
        self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
        self.assertTrue(self.linkPump.serverIO.disconnected)
        self.assertKexinitAgainLogged(events, self.serverSide)
        self.assertTrue(session.isClosed)
        self.assertFalse(self.operatorPump.serverIO.disconnecting)

    def test_agentRefusesKexinitAgain(self) -> None:
        """
        The agent's end of the link, a client: groundcontrol's KEXINIT again during the
        exchange its previous one began ends the link with a protocol error and one info
        line, where Conch's client sent a second key exchange init at the second and
        raised RuntimeError out of the agent's read at the third.
        """
        self.connect()
        session = self.openCat()
        reasons, events = self.kexinitThrice(self.serverSide, self.agentSide)
        self.assertEqual(reasons, [transport.DISCONNECT_PROTOCOL_ERROR])
        self.assertTrue(self.linkPump.clientIO.disconnected)
        self.assertKexinitAgainLogged(events, self.agentSide)
        self.assertEqual(
            self.agentSide._endingBecause, "the agent disconnected: KEXINIT during a key exchange"
        )
        self.assertTrue(session.isClosed)

    def test_renewalsGoOn(self) -> None:
        """
        Key exchanges one after the other, started by either end (and both at once) are
        not KEXINITs out of place: each NEWKEYS ends one, the next KEXINIT starts another.
        """
        self.connect()
        session = self.openCat()
        sides = (self.agentSide, self.serverSide)
        for starters in ([self.agentSide], [self.serverSide], sides, [self.agentSide]):
            before = [side.keyExchanges for side in sides]
            for starter in starters:
                self.assertTrue(starter.renewKeys("test"))
            self.fleet.flush()
            self.assertEqual([side.keyExchanges for side in sides], [n + 1 for n in before])
            self.keystroke(session)
        self.assertFalse(self.linkPump.serverIO.disconnecting)


class _Transport:
    """What a connection service sends, and its disconnects."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []
        self.disconnects: list[int] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.packets.append((messageType, payload))

    def sendDisconnect(self, reason: int, description: bytes) -> None:
        self.disconnects.append(reason)


class ChannelDataTests(SynchronousTestCase):
    """
    The channel data dispatch every keystroke goes through (TunnelConnection's
    ssh_CHANNEL_DATA, with its window checks written out): each refusal still happens.
    """

    def setUp(self) -> None:
        self.conn = TunnelConnection()
        self.transport = _Transport()
        self.conn.transport = self.transport
        self.received: list[bytes] = []
        channel = SSHChannel(localWindow=1000, localMaxPacket=100, conn=self.conn)
        channel.dataReceived = self.received.append  # type: ignore[method-assign]
        channel.id = 0  # type: ignore[assignment]
        self.conn.channels[0] = channel
        self.conn.channelsToRemoteChannel[channel] = 5
        self.channel = channel

    def data(self, claimed: int, data: bytes, channel: int = 0) -> None:
        self.conn.ssh_CHANNEL_DATA(struct.pack(">2L", channel, claimed) + data)

    def test_accepted(self) -> None:
        """Data within the window and packet size is delivered and taken off the window."""
        self.data(3, b"abc")
        self.assertEqual(self.received, [b"abc"])
        self.assertEqual(self.channel.localWindowLeft, 997)
        self.assertEqual(self.transport.packets, [])

    def test_windowReopenedPastHalf(self) -> None:
        """A channel that does not manage its window gets it re-opened past half, as Conch's."""
        for _ in range(6):
            self.data(100, b"x" * 100)
        self.assertEqual(self.channel.localWindowLeft, 1000)
        (adjust,) = [p for p in self.transport.packets if p[0] == MSG_CHANNEL_WINDOW_ADJUST]
        self.assertEqual(adjust[1], struct.pack(">2L", 5, 600))

    def test_refusals(self) -> None:
        """More than the packet size, more than the window, or less than claimed: the
        channel is closed and nothing delivered."""
        for claimed, data, left in ((101, b"x" * 101, 1000), (50, b"x" * 50, 40), (9, b"x", 1000)):
            self.setUp()
            self.channel.localWindowLeft = left
            self.data(claimed, data)
            self.assertEqual(self.received, [])
            self.assertEqual([p[0] for p in self.transport.packets], [MSG_CHANNEL_CLOSE])

    def test_unknownChannelDisconnects(self) -> None:
        """Data for a channel that does not exist ends the connection (protocol error)."""
        self.data(3, b"abc", channel=7)
        self.assertEqual(self.received, [])
        self.assertEqual(self.transport.disconnects, [transport.DISCONNECT_PROTOCOL_ERROR])
