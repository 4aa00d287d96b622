"""
Tests for accesstunnel.transports.limiter: the bound on concurrent unauthenticated
handshakes, and the queue that holds connections beyond it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.limiter import (
    MAX_VERSION_LINE,
    MAX_WAITING_BYTES,
    HandshakeLimiter,
    isAgentVersion,
)
from groundcontrol.testing import FakeOperator, InMemoryFleet


class FakeSSH(protocol.Protocol):
    """Authenticates on b"login" the way Conch does: sets avatar, then writes success."""

    def connectionMade(self) -> None:
        self.factory.made += 1  # type: ignore[attr-defined]
        self.received = b""
        self.transport.write(b"SSH-2.0-fake\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if data == b"login":
            self.avatar = object()
            self.transport.write(b"success")  # type: ignore[union-attr]


class FakeSSHFactory(protocol.Factory):
    protocol = FakeSSH
    made = 0
    settings = "the SSH factory's settings"


class FakePort:
    """A listening port: whether it reads (accepts) is all the limiter changes."""

    connected = True
    disconnecting = False

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Conn:
    """One accepted connection: the limiter's protocol and the transport under it."""

    def __init__(self, limiter: HandshakeLimiter, host: str, port: FakePort | None) -> None:
        address = IPv4Address("TCP", host, 40000)
        self.protocol = limiter.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.transport.server = port  # type: ignore[attr-defined]
        self.protocol.makeConnection(self.transport)

    @property
    def ssh(self) -> FakeSSH | None:
        """The SSH protocol, once the connection has its slot."""
        return self.protocol.wrappedProtocol  # type: ignore[no-any-return]

    @property
    def started(self) -> bool:
        """The SSH protocol was built and spoke (its version line went out)."""
        return self.transport.value().startswith(b"SSH-2.0-")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def paused(self) -> bool:
        return self.transport.producerState == "paused"

    def login(self) -> None:
        self.protocol.dataReceived(b"login")

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionError("gone")))


class LimiterTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.ssh = FakeSSHFactory()
        self.clock = Clock()
        self.port = FakePort()

    def limiter(self, **kwargs: Any) -> HandshakeLimiter:
        kwargs.setdefault("maxPending", 2)
        kwargs.setdefault("maxPerSource", 2)
        kwargs.setdefault("clock", self.clock)
        # One pool, no version line awaited: what these tests pin; the split between
        # agents and operators is tested in ClassTestCase and below.
        kwargs.setdefault("operatorReserve", 0)
        return HandshakeLimiter(self.ssh, **kwargs)

    def connect(self, limiter: HandshakeLimiter, host: str = "192.0.2.1") -> Conn:
        return Conn(limiter, host, self.port)


class BoundTests(LimiterTestCase):
    """At most maxPending handshakes run; beyond that connections wait, they are not closed."""

    def test_waitsBeyondTheBound(self) -> None:
        """
        The third concurrent handshake is neither closed nor started: no SSH protocol is
        built for it and its reading is paused until a slot frees.
        """
        limiter = self.limiter()
        self.connect(limiter, "192.0.2.1")
        self.connect(limiter, "192.0.2.2")
        third = self.connect(limiter, "192.0.2.3")
        self.assertFalse(third.closed)
        self.assertFalse(third.started)
        self.assertTrue(third.paused)
        self.assertEqual(third.transport.value(), b"")
        self.assertEqual(self.ssh.made, 2)
        self.assertEqual((limiter.pending, limiter.waiting, limiter.refused), (2, 1, 0))

    def test_pausesPortsAtTheBound(self) -> None:
        """
        With no waiting room (maxWaiting=0) the listening ports stop accepting the moment
        every slot is taken, so the kernel's backlog holds further connections.
        """
        limiter = self.limiter(maxWaiting=0)
        self.connect(limiter, "192.0.2.1")
        self.assertTrue(self.port.reading)
        self.connect(limiter, "192.0.2.2")
        self.assertFalse(self.port.reading)
        self.assertEqual(limiter.pauses, 1)

    def test_pausesPortsWhenTheWaitingRoomIsFull(self) -> None:
        """
        With a waiting room the ports keep accepting (so the kernel drops no SYN) until
        maxWaiting connections wait, then pause.
        """
        limiter = self.limiter(maxWaiting=2)
        for n in range(3):
            self.connect(limiter, f"192.0.2.{n}")
        self.assertTrue(self.port.reading)
        self.connect(limiter, "192.0.2.10")
        self.assertFalse(self.port.reading)

    def test_resumesWhenAHandshakeCompletes(self) -> None:
        """
        A login frees its slot: the oldest waiting connection starts (SSH protocol built,
        reading resumed) and, with nobody waiting any more, the ports accept again.
        """
        limiter = self.limiter(maxWaiting=0)
        first = self.connect(limiter, "192.0.2.1")
        self.connect(limiter, "192.0.2.2")
        third = self.connect(limiter, "192.0.2.3")
        self.assertFalse(self.port.reading)
        first.login()
        self.assertTrue(third.started)
        self.assertFalse(third.paused)
        self.assertTrue(third.transport.value().startswith(b"SSH-2.0-"))
        self.assertFalse(self.port.reading)  # third holds the freed slot: still full
        third.login()
        self.assertTrue(self.port.reading)
        self.assertEqual((limiter.pending, limiter.waiting), (1, 0))

    def test_resumesWhenAHandshakeFails(self) -> None:
        """A connection lost before login frees its slot for the next waiting one."""
        limiter = self.limiter(maxWaiting=0)
        first = self.connect(limiter, "192.0.2.1")
        self.connect(limiter, "192.0.2.2")
        third = self.connect(limiter, "192.0.2.3")
        first.lose()
        self.assertTrue(third.started)
        self.assertEqual((limiter.pending, limiter.waiting), (2, 0))
        third.lose()
        self.assertTrue(self.port.reading)
        self.assertEqual(limiter.pending, 1)

    def test_waitingConnectionLostLeaksNoSlot(self) -> None:
        """
        A waiting connection that dies before its turn leaves the room at once: it is never
        started, and when every other handshake ends nothing is counted any more.
        """
        limiter = self.limiter(maxWaiting=0)
        first = self.connect(limiter, "192.0.2.1")
        second = self.connect(limiter, "192.0.2.2")
        third = self.connect(limiter, "192.0.2.3")
        third.lose()
        self.assertEqual(limiter.waiting, 0)
        first.lose()
        second.login()
        self.assertFalse(third.started)
        self.assertEqual((limiter.pending, limiter.waiting), (0, 0))
        self.assertEqual(limiter.agents._perSource, {})
        self.assertEqual(limiter.agents._queues, {})
        self.assertTrue(self.port.reading)

    def test_startedLossLeaksNoSlot(self) -> None:
        """Every started connection lost before login gives its slot back, exactly once."""
        limiter = self.limiter(maxPending=3, maxPerSource=3)
        conns = [self.connect(limiter, "192.0.2.1") for _ in range(5)]
        for c in conns:
            c.lose()
            c.lose()  # a second report changes nothing
        self.assertEqual((limiter.pending, limiter.waiting), (0, 0))
        self.assertEqual(limiter.agents._perSource, {})

    def test_authenticatedConnectionsDoNotCount(self) -> None:
        """
        Once a connection has logged in, its slot is free: a fleet of connected agents and
        operators never blocks new handshakes.
        """
        limiter = self.limiter()
        first = self.connect(limiter, "192.0.2.1")
        self.connect(limiter, "192.0.2.2")
        first.login()
        self.assertEqual(limiter.pending, 1)
        third = self.connect(limiter, "192.0.2.3")
        self.assertTrue(third.started)
        self.assertEqual(limiter.pending, 2)

    def test_loggedInLossDoesNotReleaseTwice(self) -> None:
        """A logged-in connection closing later leaves the count alone."""
        limiter = self.limiter()
        first = self.connect(limiter, "192.0.2.1")
        first.login()
        first.lose()
        self.assertEqual(limiter.pending, 0)

    def test_loggedInConnectionBypassesTheWrapper(self) -> None:
        """
        Once logged in, reads go straight to the SSH protocol and its writes straight to
        the socket (the limiter's frames leave a keystroke's path); bytes still flow both
        ways, and the loss still goes through the limiter to the SSH protocol.
        """
        limiter = self.limiter()
        first = self.connect(limiter)
        ssh = first.ssh
        assert ssh is not None
        first.login()
        self.assertEqual(first.protocol.dataReceived, ssh.dataReceived)
        self.assertEqual(first.protocol.write, first.transport.write)
        self.assertEqual(first.protocol.writeSequence, first.transport.writeSequence)
        first.protocol.dataReceived(b"after")
        self.assertEqual(ssh.received, b"loginafter")
        ssh.transport.write(b"+out")  # type: ignore[union-attr]
        ssh.transport.writeSequence([b"+seq"])  # type: ignore[union-attr]
        self.assertTrue(first.transport.value().endswith(b"success+out+seq"))
        lost: list[Failure] = []
        ssh.connectionLost = lost.append  # type: ignore[method-assign]
        first.lose()
        self.assertEqual(len(lost), 1)
        self.assertIsNone(first.ssh)
        self.assertEqual(limiter.pending, 0)
        self.assertNotIn(first.protocol, limiter.protocols)

    def test_handshakeKeepsTheWrapper(self) -> None:
        """Before the login, reads and writes go through the limiter (it watches for it)."""
        limiter = self.limiter()
        first = self.connect(limiter)
        self.assertNotIn("dataReceived", vars(first.protocol))
        self.assertNotIn("write", vars(first.protocol))

    def test_dataSentWhileWaitingIsDeliveredInOrder(self) -> None:
        """
        Bytes a waiting connection sends anyway (a transport that cannot pause) are kept
        and reach the SSH protocol, in order, when it starts.
        """
        limiter = self.limiter(maxPending=1)
        first = self.connect(limiter, "192.0.2.1")
        second = self.connect(limiter, "192.0.2.2")
        second.protocol.dataReceived(b"SSH-2.0-client\r\n")
        second.protocol.dataReceived(b"kexinit")
        first.lose()
        assert second.ssh is not None
        self.assertEqual(second.ssh.received, b"SSH-2.0-client\r\nkexinit")

    def test_waitingConnectionMayNotBufferWithoutLimit(self) -> None:
        """A waiting connection that sends more than a handshake's worth is aborted."""
        limiter = self.limiter(maxPending=1)
        self.connect(limiter, "192.0.2.1")
        second = self.connect(limiter, "192.0.2.2")
        second.protocol.dataReceived(b"x" * (MAX_WAITING_BYTES + 1))
        self.assertTrue(second.transport.disconnected)

    def test_endOfEpisodeLogsCounts(self) -> None:
        """One line when the limit is reached, one with the counts when it is over."""
        limiter = self.limiter(maxPending=1, maxPerSource=1, maxWaitingPerSource=1)
        events: list[dict[str, Any]] = []
        limiter._log = Logger(observer=events.append)  # type: ignore[misc]
        first = self.connect(limiter, "192.0.2.1")
        second = self.connect(limiter, "192.0.2.1")
        self.connect(limiter, "192.0.2.1")  # refused: one already waits from there
        first.login()  # the second starts
        self.assertEqual(len(events), 1)
        del events[:]
        second.login()
        (end,) = events
        self.assertIn("handshakes below the limit again; ", end["log_format"])
        self.assertEqual((end["refused"], end["queued"], end["most"]), (1, 1, 1))

    def test_stoppedPortIsNotResumed(self) -> None:
        """A port that stopped listening while paused is left alone, and forgotten."""
        limiter = self.limiter(maxPending=1, maxWaiting=0)
        first = self.connect(limiter, "192.0.2.1")
        self.port.disconnecting = True
        first.login()
        self.assertFalse(self.port.reading)
        self.assertEqual(limiter._ports, set())

    def test_portFoundThroughWrappers(self) -> None:
        """
        Under TLS or WebSocket the limiter's transport is another protocol: the listening
        port is found on the TCP transport beneath, and paused.
        """
        limiter = self.limiter(maxPending=1, maxWaiting=0)
        outer = WrappingFactory(limiter)
        address = IPv4Address("TCP", "192.0.2.1", 40000)
        wrapper = outer.buildProtocol(address)
        assert isinstance(wrapper, ProtocolWrapper)
        tcp = StringTransport(peerAddress=address)
        tcp.server = self.port  # type: ignore[attr-defined]
        wrapper.makeConnection(tcp)
        self.assertFalse(self.port.reading)

    def test_factoryAttributesPassThrough(self) -> None:
        """Code holding the wrapper can still read the SSH factory's attributes."""
        self.assertEqual(self.limiter().settings, "the SSH factory's settings")

    def test_badLimits(self) -> None:
        """A limit below one, or a negative waiting room, is a configuration error."""
        self.assertRaises(ValueError, HandshakeLimiter, self.ssh, 0)
        self.assertRaises(ValueError, HandshakeLimiter, self.ssh, maxWaiting=-1)


class PerSourceTests(LimiterTestCase):
    """One address gets maxPerSource handshakes at once and a bounded share of the room."""

    def test_overTheSourceBoundWaitsWhileOthersStart(self) -> None:
        """
        A source at its bound waits (held, not closed) while other sources still start
        at once: total slots are free, so the ports keep accepting.
        """
        limiter = self.limiter(maxPending=10, maxPerSource=1, maxWaiting=0)
        self.connect(limiter, "192.0.2.1")
        again = self.connect(limiter, "192.0.2.1")
        other = self.connect(limiter, "192.0.2.2")
        self.assertFalse(again.closed)
        self.assertFalse(again.started)
        self.assertTrue(other.started)
        self.assertTrue(self.port.reading)

    def test_sourceWaiterStartsWhenItsSourceFrees(self) -> None:
        """The held connection starts when its own source's handshake ends."""
        limiter = self.limiter(maxPending=10, maxPerSource=1)
        first = self.connect(limiter, "192.0.2.1")
        again = self.connect(limiter, "192.0.2.1")
        first.login()
        self.assertTrue(again.started)

    def test_closedBeyondTheSourceWaitingShare(self) -> None:
        """
        Beyond maxWaitingPerSource held connections, a source's further connections are
        closed at once (one address cannot pin descriptors without limit); other sources
        still get in.
        """
        limiter = self.limiter(maxPending=10, maxPerSource=1, maxWaitingPerSource=2)
        self.connect(limiter, "192.0.2.1")
        held = [self.connect(limiter, "192.0.2.1") for _ in range(2)]
        refused = self.connect(limiter, "192.0.2.1")
        self.assertTrue(refused.closed)
        self.assertFalse(refused.started)
        self.assertFalse(any(c.closed for c in held))
        self.assertEqual(limiter.refused, 1)
        refused.lose()
        self.assertEqual(limiter.waiting, 2)
        self.assertTrue(self.connect(limiter, "192.0.2.2").started)

    def test_refusalsCountedSinceStart(self) -> None:
        """
        refusedConnections counts every connection closed at accept since the limiter
        started (what groundcontrol_connections_refused_total reads), where the episode's
        count starts again when the limiter has room again.
        """
        limiter = self.limiter(maxPending=10, maxPerSource=1, maxWaitingPerSource=1)
        for _ in range(2):
            first = self.connect(limiter, "192.0.2.1")
            held = self.connect(limiter, "192.0.2.1")
            self.connect(limiter, "192.0.2.1").lose()
            held.lose()
            first.lose()
            self.assertEqual(limiter.refused, 0)  # the episode ended
        self.assertEqual(limiter.refusedConnections, 2)

    def test_ipv6SourceIsItsSlash64(self) -> None:
        """Addresses of one IPv6 /64 count as one source (one host typically holds it)."""
        limiter = self.limiter(maxPending=10, maxPerSource=1)
        conns = []
        for host in ("2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"):
            address = IPv6Address("TCP", host, 40000)
            p = limiter.buildProtocol(address)
            t = StringTransport(peerAddress=address)
            p.makeConnection(t)
            conns.append(p)
        self.assertEqual([c.wrappedProtocol is not None for c in conns], [True, False, True])


class FairnessTests(LimiterTestCase):
    """Who gets a freed slot: a quiet source before a storming one."""

    def test_quietSourceGoesFirst(self) -> None:
        """
        An operator connecting amid a storm from other sources (their connections already
        waiting) gets the next free slot, ahead of them.
        """
        limiter = self.limiter(maxPending=2, maxPerSource=2)
        storm = [self.connect(limiter, "192.0.2.1") for _ in range(2)]
        waiting = [self.connect(limiter, "192.0.2.1") for _ in range(5)]
        operator = self.connect(limiter, "198.51.100.7")
        self.assertFalse(operator.started)
        storm[0].login()
        self.assertTrue(operator.started)
        self.assertFalse(any(c.started for c in waiting))

    def test_roundRobinBetweenBusySources(self) -> None:
        """
        Two sources that both bring many connections share the slots in turn, not first
        come first served (the second would wait behind all of the first's).
        """
        limiter = self.limiter(maxPending=1, maxPerSource=1)
        first = self.connect(limiter, "192.0.2.1")
        a = [self.connect(limiter, "192.0.2.1") for _ in range(3)]
        b = [self.connect(limiter, "192.0.2.2") for _ in range(3)]
        order = []
        current = first
        for _ in range(6):
            current.login()
            (current,) = [c for c in a + b if c.started and c not in order]
            order.append(current)
        sources = ["a" if c in a else "b" for c in order]
        self.assertEqual(sources, ["b", "a", "b", "a", "b", "a"])

    def test_firstComeFirstServedWithinASource(self) -> None:
        """Connections from one source start in the order they arrived."""
        limiter = self.limiter(maxPending=1, maxPerSource=1)
        first = self.connect(limiter, "192.0.2.1")
        later = [self.connect(limiter, "192.0.2.1") for _ in range(3)]
        first.login()
        self.assertEqual([c.started for c in later], [True, False, False])
        later[0].lose()
        self.assertEqual([c.started for c in later], [True, True, False])


class TimeoutTests(LimiterTestCase):
    """A stalled handshake cannot hold a slot for ever."""

    def test_stalledHandshakeAbortedAfterTimeout(self) -> None:
        """
        A connection that neither logs in nor closes (its polite close never completes)
        is aborted handshakeTimeout seconds after it got its slot.
        """
        limiter = self.limiter(maxPending=1, handshakeTimeout=40)
        stalled = self.connect(limiter, "192.0.2.1")
        self.clock.advance(39)
        self.assertFalse(stalled.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(stalled.transport.disconnected)

    def test_waitingTimeDoesNotCount(self) -> None:
        """The timeout runs from the moment the slot is granted, not from the accept."""
        limiter = self.limiter(maxPending=1, handshakeTimeout=40)
        first = self.connect(limiter, "192.0.2.1")
        second = self.connect(limiter, "192.0.2.2")
        self.clock.advance(30)
        first.login()
        self.clock.advance(39)
        self.assertFalse(second.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(second.transport.disconnected)

    def test_loggedInConnectionIsNotAborted(self) -> None:
        """Logging in cancels the timeout."""
        limiter = self.limiter(maxPending=1, handshakeTimeout=40)
        first = self.connect(limiter, "192.0.2.1")
        first.login()
        self.clock.advance(100)
        self.assertFalse(first.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutDefaultsToTheLoginGraceTimePlusAMargin(self) -> None:
        """Without a timeout given, it is the SSH factory's login grace time plus 10 s."""
        fleet = InMemoryFleet()
        limiter = HandshakeLimiter(fleet.factory)
        self.assertEqual(limiter.handshakeTimeout, fleet.factory.settings.loginGraceTime + 10)
        self.assertIs(limiter._clock(), fleet.clock)


#: What our agent sends first (its own version line).
AGENT = b"SSH-2.0-AccessTunnelAgent_0.1.0 Twisted_26.10.0\r\n"
#: What agents deployed before it had a line of its own send (Conch's client as it is).
LEGACY_AGENT = b"SSH-2.0-Twisted_26.10.0\r\n"
#: What the OpenSSH client sends first.
OPERATOR = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


class ClassTestCase(LimiterTestCase):
    """
    The limiter as groundcontrol runs it: slots split between agents and operators, each
    connection put in a pool by its version line. With maxPending=4 and operatorReserve=1,
    agents have 3 slots and operators 1.
    """

    def limiter(self, **kwargs: Any) -> HandshakeLimiter:
        kwargs.setdefault("maxPending", 4)
        kwargs.setdefault("maxPerSource", 4)
        kwargs.setdefault("operatorReserve", 1)
        kwargs.setdefault("clock", self.clock)
        return HandshakeLimiter(self.ssh, **kwargs)

    def connect(  # type: ignore[override]
        self, limiter: HandshakeLimiter, host: str = "192.0.2.1", hello: bytes = AGENT
    ) -> Conn:
        conn = Conn(limiter, host, self.port)
        if hello:
            conn.protocol.dataReceived(hello)
        return conn

    def busy(self, limiter: HandshakeLimiter) -> list[Conn]:
        """Agents, each from its own address, on every agents' slot, and one more waiting."""
        return self.agents(limiter, limiter.agents.size + 1, first=200)

    def agents(
        self, limiter: HandshakeLimiter, count: int, host: str | None = None, first: int = 0
    ) -> list[Conn]:
        """C{count} agents, from C{host} or each from its own address (its own NAT)."""
        return [
            self.connect(limiter, host or f"10.{n // 250}.{n % 250}.1", AGENT)
            for n in range(first, first + count)
        ]


class VersionLineTests(ClassTestCase):
    """
    While agents wait, a connection takes a slot only once its version line says which
    pool it belongs to.
    """

    def test_startsAtOnceWhileNoAgentWaits(self) -> None:
        """
        With an agents' slot free and no agent waiting, a connection starts at once,
        before its version line, as an agent: a client that waits for the server's line
        first (ssh-keyscan) is not held, and no one waits because of it.
        """
        limiter = self.limiter()
        conn = self.connect(limiter, hello=b"")
        self.assertTrue(conn.started)
        self.assertEqual((limiter.agents.pending, limiter.waiting), (1, 0))

    def test_noSlotBeforeTheVersionLine(self) -> None:
        """
        With agents waiting, a connection that has sent nothing yet holds no slot and has
        no SSH protocol, but is read (not paused); its version line starts it at once.
        """
        limiter = self.limiter()
        self.busy(limiter)
        conn = self.connect(limiter, hello=b"")
        self.assertFalse(conn.started)
        self.assertFalse(conn.paused)
        self.assertEqual((limiter.pending, limiter.waiting), (3, 2))
        conn.protocol.dataReceived(OPERATOR)
        self.assertTrue(conn.started)
        self.assertEqual((limiter.operators.pending, limiter.waiting), (1, 1))

    def test_lineInPiecesDeliveredWhole(self) -> None:
        """
        A version line that comes in pieces, and what follows it in the same read, reach
        the SSH protocol whole and in order once it starts.
        """
        limiter = self.limiter()
        self.busy(limiter)
        conn = self.connect(limiter, hello=b"SSH-2.0-Open")
        self.assertFalse(conn.started)
        conn.protocol.dataReceived(b"SSH_9.2p1\r")
        self.assertFalse(conn.started)
        conn.protocol.dataReceived(b"\nkexinit")
        assert conn.ssh is not None
        self.assertEqual(conn.ssh.received, b"SSH-2.0-OpenSSH_9.2p1\r\nkexinit")
        self.assertEqual(limiter.operators.pending, 1)

    def test_agentAndOperatorLines(self) -> None:
        """
        Our agent's version line and Conch's (agents deployed before the agent had a line
        of its own) count in the agents' pool; OpenSSH's and other clients' in the
        operators', even when they mention Twisted or our agent after the software name.
        """
        limiter = self.limiter()
        self.busy(limiter)
        agent = self.connect(limiter, hello=AGENT)
        legacy = self.connect(limiter, "192.0.2.2", hello=LEGACY_AGENT)
        operator = self.connect(limiter, hello=OPERATOR)
        self.assertEqual((agent.started, agent.paused, operator.started), (False, True, True))
        self.assertEqual((legacy.started, legacy.paused), (False, True))
        self.assertEqual((limiter.agents.waiting, limiter.operators.pending), (3, 1))
        self.assertTrue(isAgentVersion(b"SSH-2.0-AccessTunnelAgent_0.2.0 Twisted_27.1.0"))
        self.assertTrue(isAgentVersion(b"SSH-2.0-Twisted_22.4.0"))
        self.assertFalse(isAgentVersion(b"SSH-2.0-OpenSSH_9.2p1 Twisted_26.10.0"))
        self.assertFalse(isAgentVersion(b"SSH-2.0-OpenSSH_9.2p1 AccessTunnelAgent_0.1.0"))
        self.assertFalse(isAgentVersion(b"SSH-2.0-PuTTY_Release_0.81"))

    def test_ourAgentIsRecognised(self) -> None:
        """
        The version line our agent's transport really sends is its own (not Conch's, which
        any Conch client sends) and counts as an agent's (were it not, a whole fleet would
        crowd into the operators' few slots); OpenSSH's does not. It is a valid SSH line:
        no space or dash in the software version, at most 255 bytes with CR LF.
        """
        from agent.link import AgentTransport, versionLine

        line = AgentTransport.ourVersionString
        self.assertTrue(line.startswith(b"SSH-2.0-AccessTunnelAgent_"), line)
        self.assertTrue(isAgentVersion(line))
        self.assertEqual(AGENT.split(b" ")[0], line.split(b" ")[0])
        self.assertFalse(isAgentVersion(OPERATOR.rstrip(b"\r\n")))
        odd = versionLine("1.0-rc1 +local", "27.0.0rc1")
        self.assertEqual(odd, b"SSH-2.0-AccessTunnelAgent_1.0_rc1__local Twisted_27.0.0rc1")
        self.assertLessEqual(len(line) + 2, MAX_VERSION_LINE)

    def test_silentConnectionCountsAsAnAgentAfterTheDeadline(self) -> None:
        """
        A connection that sends no version line within versionTimeout (2 s) is put in the
        agents' pool, here behind the agent already waiting: staying silent never reaches
        the operators' reserve.
        """
        limiter = self.limiter()
        self.busy(limiter)
        conn = self.connect(limiter, hello=b"")
        self.clock.advance(1.9)
        self.assertFalse(conn.paused)
        self.clock.advance(0.1)
        self.assertTrue(conn.paused)
        self.assertFalse(conn.started)
        self.assertEqual((limiter.agents.waiting, limiter.operators.pending), (2, 0))

    def test_silentConnectionStartsWhenASlotFrees(self) -> None:
        """
        A connection held for its version line starts, unread, as soon as it could start as
        a new connection would (an agents' slot free for its source, no agent waiting); a
        client that waits for the server's line first (ssh-keyscan, ssh-audit) does not sit
        out versionTimeout next to a free slot. Others still held keep waiting for theirs.
        """
        limiter = self.limiter(maxPerSource=2)
        first, _ = self.agents(limiter, 2, host="192.0.2.7")
        quiet = self.connect(limiter, "192.0.2.7", hello=b"")
        self.assertFalse(quiet.started)
        self.assertEqual(limiter.waiting, 1)
        first.login()
        self.assertTrue(quiet.started)
        self.assertFalse(quiet.paused)
        self.assertEqual((limiter.agents.pending, limiter.waiting), (2, 0))
        self.assertEqual((limiter._hello, dict(limiter._helloing)), ({}, {}))
        self.clock.advance(limiter.versionTimeout)  # its version timer went with it
        self.assertEqual(limiter.agents.pending, 2)

    def test_silentConnectionWaitsWhileAgentsWait(self) -> None:
        """
        While agents wait for a slot, a freed slot goes to them: a connection that has not
        said what it is does not jump their queue.
        """
        limiter = self.limiter()
        *started, waiting = self.busy(limiter)
        quiet = self.connect(limiter, hello=b"")
        started[0].login()
        self.assertTrue(waiting.started)
        self.assertFalse(quiet.started)
        self.assertEqual(limiter.waiting, 1)

    def test_overlongLineCountsAsAnAgent(self) -> None:
        """255 bytes without a line end is no SSH version line: the agents' pool, at once."""
        limiter = self.limiter()
        self.busy(limiter)
        conn = self.connect(limiter, hello=b"SSH-2.0-" + b"x" * (MAX_VERSION_LINE - 8))
        self.assertTrue(conn.paused)
        self.assertEqual((limiter.agents.waiting, limiter.operators.pending), (2, 0))

    def test_lostBeforeTheLineLeaksNothing(self) -> None:
        """A connection gone before its version line leaves no count and no timer behind."""
        limiter = self.limiter()
        self.busy(limiter)
        timers = len(self.clock.getDelayedCalls())
        conn = self.connect(limiter, hello=b"SSH-2.0-")
        conn.lose()
        self.assertEqual((limiter.pending, limiter.waiting), (3, 1))
        self.assertEqual(limiter._hello, {})
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)

    def test_sourceMayNotHoldUnboundedSilentConnections(self) -> None:
        """
        One source may have maxPerSource + maxWaitingPerSource connections awaiting their
        version line; further ones are closed at accept. Other sources are not affected.
        """
        limiter = self.limiter(maxPerSource=2, maxWaitingPerSource=3)
        self.busy(limiter)
        held = [self.connect(limiter, hello=b"") for _ in range(5)]
        refused = self.connect(limiter, hello=b"")
        self.assertTrue(refused.closed)
        self.assertFalse(any(c.closed for c in held))
        self.assertFalse(self.connect(limiter, "192.0.2.2", hello=b"").closed)

    def test_dataBeyondALineAndAKexinitWhileWaiting(self) -> None:
        """A waiting connection that sends more than a handshake's worth is aborted."""
        limiter = self.limiter()
        self.agents(limiter, 3)
        conn = self.connect(limiter, hello=AGENT + b"x" * MAX_WAITING_BYTES)
        self.assertTrue(conn.transport.disconnected)
        conn.lose()
        self.assertEqual(limiter.waiting, 0)


class OperatorReserveTests(ClassTestCase):
    """Operators have slots of their own that no crowd of agents can take."""

    def test_operatorFromTheCrowdsAddressStartsAtOnce(self) -> None:
        """
        An agent crowd from one address holds every agents' slot and ten more wait; an
        operator from that SAME address starts at once, ahead of all ten (the source
        address alone would put it behind them).
        """
        limiter = self.limiter()
        crowd = self.agents(limiter, 13, host="192.0.2.1")
        operator = self.connect(limiter, "192.0.2.1", OPERATOR)
        self.assertTrue(operator.started)
        self.assertEqual([c.started for c in crowd], [True] * 3 + [False] * 10)

    def test_operatorAheadOfAFleetOfOneDevicePerAddress(self) -> None:
        """
        Every device behind its own NAT: each agent is a quiet source, so quiet-first
        ordering alone would serve the operator after all of them. It starts at once.
        """
        limiter = self.limiter()
        fleet = self.agents(limiter, 50)
        operator = self.connect(limiter, "198.51.100.7", OPERATOR)
        self.assertTrue(operator.started)
        self.assertEqual(sum(c.started for c in fleet), 3)

    def test_agentsNeverTakeTheReserve(self) -> None:
        """
        With no operator about, agents still hold at most maxPending - operatorReserve
        slots; the reserved one stays free, and a freed agents' slot goes to the next agent.
        """
        limiter = self.limiter()
        fleet = self.agents(limiter, 5)
        self.assertEqual((limiter.agents.pending, limiter.operators.pending), (3, 0))
        fleet[0].login()
        self.assertEqual([c.started for c in fleet], [True] * 4 + [False])
        self.assertEqual(limiter.pending, 3)

    def test_liarsBoundedByTheReserveAndTheirShare(self) -> None:
        """
        Agents (or anyone) claiming to be OpenSSH from one address get at most half the
        reserve (operatorShare), from many addresses at most the reserve; the agents' pool
        is untouched by them, so agents keep starting at the same rate. (No lending here,
        operatorFloor = the reserve: LendingTests has the liars with lending.)
        """
        limiter = self.limiter(maxPending=8, operatorReserve=4, operatorFloor=4)
        fleet = self.agents(limiter, 6)
        liars = [self.connect(limiter, "203.0.113.1", OPERATOR) for _ in range(5)]
        self.assertEqual(sum(c.started for c in liars), 2)
        more = [self.connect(limiter, f"203.0.113.{n}", OPERATOR) for n in range(2, 6)]
        self.assertEqual(sum(c.started for c in more), 2)
        self.assertEqual((limiter.operators.pending, limiter.agents.pending), (4, 4))
        fleet[0].login()
        self.assertTrue(fleet[4].started)
        liars[0].login()
        self.assertEqual(sum(c.started for c in fleet), 5)

    def test_quietOperatorAheadOfLiarsInTheReserve(self) -> None:
        """
        With the reserve held by connections that only claim to be operators, a real
        operator from another address waits, and gets the next freed reserved slot ahead
        of the claimants that waited before it (quiet sources first, as in the agents' pool).
        """
        limiter = self.limiter(maxPending=8, operatorReserve=2)
        self.busy(limiter)
        first = [self.connect(limiter, f"203.0.113.{n}", OPERATOR) for n in (1, 2)]
        waiting = [self.connect(limiter, "203.0.113.1", OPERATOR) for _ in range(3)]
        operator = self.connect(limiter, "198.51.100.7", OPERATOR)
        self.assertFalse(operator.started)
        first[1].lose()
        self.assertTrue(operator.started)
        self.assertFalse(any(c.started for c in waiting))

    def test_waitingShareIsPerPool(self) -> None:
        """
        A source whose agents fill their waiting share (maxWaitingPerSource) can still
        bring an operator: each pool counts its own share.
        """
        limiter = self.limiter(maxWaitingPerSource=2)
        crowd = self.agents(limiter, 6, host="192.0.2.1")
        self.assertEqual([c.closed for c in crowd], [False] * 5 + [True])
        operator = self.connect(limiter, "192.0.2.1", OPERATOR)
        self.assertTrue(operator.started)

    def test_fullRoomRefusesAgentsWhileTheReserveIsFree(self) -> None:
        """
        The waiting room full and the agents' pool full, but the reserve free: the ports
        keep accepting so that an operator still gets in; an agent that would have to
        wait in the full room is closed (after its version line, before any key exchange).
        """
        limiter = self.limiter(maxWaiting=2)
        self.agents(limiter, 5)
        self.assertEqual(limiter.waiting, 2)
        self.assertTrue(self.port.reading)
        late = self.agents(limiter, 1, host="192.0.2.99")[0]
        self.assertTrue(late.closed)
        self.assertFalse(late.started)
        self.assertTrue(self.connect(limiter, "198.51.100.7", OPERATOR).started)

    def test_portsPauseWhenEveryPoolAndTheRoomAreFull(self) -> None:
        """
        Only when both pools are full and maxWaiting connections wait do the ports stop
        accepting; a login frees a slot and they accept again.
        """
        limiter = self.limiter(maxWaiting=1)
        self.agents(limiter, 4)
        self.assertTrue(self.port.reading)
        operator = self.connect(limiter, "198.51.100.7", OPERATOR)
        self.assertFalse(self.port.reading)
        operator.login()
        self.assertTrue(self.port.reading)

    def test_handshakeTimeoutFromTheSlot(self) -> None:
        """
        The handshake timeout runs from the slot grant, so the time spent awaiting the
        version line does not count; a stalled operator is aborted and its slot freed.
        """
        limiter = self.limiter(handshakeTimeout=40)
        self.busy(limiter)
        operator = self.connect(limiter, "198.51.100.7", hello=b"")
        self.clock.advance(1)
        operator.protocol.dataReceived(OPERATOR)
        self.clock.advance(39.9)
        self.assertFalse(operator.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(operator.transport.disconnected)
        operator.lose()
        self.assertEqual(limiter.operators.pending, 0)

    def test_noLeakWhateverTheOrder(self) -> None:
        """
        Connections of both kinds lost in every state (awaiting their line, waiting,
        in their handshake, logged in) leave every count at zero.
        """
        limiter = self.limiter()
        conns = self.agents(limiter, 6, host="192.0.2.1")
        conns += [self.connect(limiter, "192.0.2.1", OPERATOR) for _ in range(3)]
        conns += [self.connect(limiter, "192.0.2.1", hello=b"") for _ in range(2)]
        conns[0].login()
        for c in conns:
            c.lose()
        self.assertEqual((limiter.pending, limiter.waiting), (0, 0))
        for pool in limiter.pools.values():
            self.assertEqual((pool.pending, pool.waiting), (0, 0))
            self.assertEqual((pool._perSource, pool._queues), ({}, {}))
        self.assertEqual(limiter._hello, {})

    def test_defaultsAndBadReserve(self) -> None:
        """
        By default a quarter of the slots are reserved (16 of 64), one operator source may
        hold half of them; a reserve leaving agents no slot is a configuration error, and
        0 turns the split off (one pool, no version line awaited).
        """
        limiter = HandshakeLimiter(self.ssh)
        self.assertEqual(
            (limiter.operatorReserve, limiter.agents.size, limiter.operators.perSource),
            (16, 48, 8),
        )
        self.assertRaises(ValueError, HandshakeLimiter, self.ssh, 4, operatorReserve=4)
        self.assertRaises(ValueError, HandshakeLimiter, self.ssh, 4, operatorReserve=-1)
        self.assertEqual(HandshakeLimiter(self.ssh, 1).operatorReserve, 0)
        off = HandshakeLimiter(self.ssh, 4, operatorReserve=0, clock=self.clock)
        self.assertTrue(Conn(off, "192.0.2.1", None).started)


class LendingTests(ClassTestCase):
    """
    Reserved slots no operator uses are lent to agents, all but operatorFloor of them; a
    lent slot goes back to the reserve when its handshake ends. With maxPending=8 and
    operatorReserve=4 (floor 2 by default), agents have 4 slots of their own and may borrow 2.
    """

    def limiter(self, **kwargs: Any) -> HandshakeLimiter:
        kwargs.setdefault("maxPending", 8)
        kwargs.setdefault("operatorReserve", 4)
        return super().limiter(**kwargs)

    def storm(self, limiter: HandshakeLimiter, count: int = 10) -> list[Conn]:
        """C{count} agents, each from its own address: own slots, then borrowed, then wait."""
        return self.agents(limiter, count, first=100)

    def assertSlots(
        self, limiter: HandshakeLimiter, agents: int, borrowed: int, operators: int
    ) -> None:
        """Agents' handshakes (borrowed ones included), borrowed ones, operators' ones."""
        self.assertEqual(
            (
                limiter.agents.pending,
                limiter.agents.borrowed,
                limiter.operators.lent,
                limiter.operators.pending,
            ),
            (agents, borrowed, borrowed, operators),
        )

    def test_agentsBorrowIdleReserveSlots(self) -> None:
        """
        In a storm with no operator about, agents run on all but the floor: their own 4
        slots and 2 of the reserve's 4; the other 2 stay free, the rest of the storm waits.
        """
        limiter = self.limiter()
        self.assertEqual(limiter.operatorFloor, 2)
        fleet = self.storm(limiter)
        self.assertEqual([c.started for c in fleet], [True] * 6 + [False] * 4)
        self.assertSlots(limiter, agents=6, borrowed=2, operators=0)
        self.assertEqual(limiter.waiting, 4)
        self.assertFalse(limiter.operators.full)

    def test_operatorDuringAStormServedFromTheFloor(self) -> None:
        """
        Agents hold every slot they may (own and borrowed) and four more wait; operators,
        even from a storming agent's own address, start at once on the kept floor, ahead
        of the waiting agents, until the floor is used up.
        """
        limiter = self.limiter()
        fleet = self.storm(limiter)
        first = self.connect(limiter, "10.0.100.1", OPERATOR)
        second = self.connect(limiter, "198.51.100.7", OPERATOR)
        self.assertTrue(first.started)
        self.assertTrue(second.started)
        self.assertSlots(limiter, agents=6, borrowed=2, operators=2)
        self.assertEqual(sum(c.started for c in fleet), 6)

    def test_lentSlotGoesBackToTheReserveFirst(self) -> None:
        """
        With the floor used by two operators, a third waits. An agent on one of its own
        slots logs in: its slot goes to the next agent, the operator still waits. An agent
        on a borrowed slot logs in: that slot goes back to the reserve, and to the
        operator, not to an agent; agents keep borrowing nothing while the reserve has
        fewer than the floor free.
        """
        limiter = self.limiter()
        fleet = self.storm(limiter)
        self.connect(limiter, "198.51.100.7", OPERATOR)
        self.connect(limiter, "198.51.100.8", OPERATOR)
        third = self.connect(limiter, "198.51.100.9", OPERATOR)
        self.assertFalse(third.started)
        fleet[0].login()
        self.assertTrue(fleet[6].started)
        self.assertFalse(third.started)
        self.assertSlots(limiter, agents=6, borrowed=2, operators=2)
        borrower = fleet[4]
        self.assertTrue(borrower.protocol.borrowed)
        borrower.login()
        self.assertTrue(third.started)
        self.assertSlots(limiter, agents=5, borrowed=1, operators=3)
        self.assertEqual(sum(c.started for c in fleet), 7)

    def test_borrowedSlotReturnsHoweverItsHandshakeEnds(self) -> None:
        """
        A borrowed slot goes back to the reserve whether its agent logs in, goes away, or
        is aborted by the handshake timeout; with no operator about, a waiting agent
        borrows it again at once. When the storm is over nothing is left lent.
        """
        limiter = self.limiter(handshakeTimeout=40)
        fleet = self.storm(limiter, 9)
        fleet[4].login()
        self.assertSlots(limiter, agents=6, borrowed=2, operators=0)
        self.assertTrue(fleet[6].started)
        fleet[5].lose()
        self.assertTrue(fleet[7].started)
        self.assertSlots(limiter, agents=6, borrowed=2, operators=0)
        self.clock.advance(40)
        for conn in fleet:
            if conn.transport.disconnected:
                conn.lose()
        self.assertTrue(fleet[8].started)
        self.assertSlots(limiter, agents=1, borrowed=0, operators=0)
        fleet[8].login()
        self.assertSlots(limiter, agents=0, borrowed=0, operators=0)
        self.assertEqual((limiter.waiting, limiter.operators.inUse), (0, 0))

    def test_noLendingBeyondTheFloorWhileOperatorsLogIn(self) -> None:
        """
        Two operators in their handshakes use the floor's worth of the reserve: the
        borrowed slots that return meanwhile are not lent again (that would leave fewer
        than two reserved slots free), and agents borrow again as the operators log in.
        """
        limiter = self.limiter()
        fleet = self.storm(limiter)
        operators = [self.connect(limiter, f"198.51.100.{n}", OPERATOR) for n in (1, 2)]
        fleet[4].login()
        fleet[5].login()
        self.assertSlots(limiter, agents=4, borrowed=0, operators=2)
        self.assertFalse(fleet[6].started)
        operators[0].login()
        self.assertSlots(limiter, agents=5, borrowed=1, operators=1)
        operators[1].login()
        self.assertSlots(limiter, agents=6, borrowed=2, operators=0)
        self.assertEqual(sum(c.started for c in fleet), 8)

    def test_perSourceBoundCountsBorrowedSlots(self) -> None:
        """
        One source's handshakes, on own and borrowed slots together, stay within
        maxPerSource, and its waiting share (maxWaitingPerSource) still closes the rest;
        another source borrows what it left.
        """
        limiter = self.limiter(maxPerSource=5, maxWaitingPerSource=3)
        crowd = self.agents(limiter, 9, host="192.0.2.1")
        self.assertEqual([c.started for c in crowd], [True] * 5 + [False] * 4)
        self.assertEqual([c.closed for c in crowd], [False] * 8 + [True])
        self.assertSlots(limiter, agents=5, borrowed=1, operators=0)
        other = self.connect(limiter, "192.0.2.2")
        self.assertTrue(other.started)
        self.assertSlots(limiter, agents=6, borrowed=2, operators=0)

    def test_quietSourceFirstAmongBorrowers(self) -> None:
        """
        A slot that frees goes first to a source with nothing in progress, whether the
        next slot is the agents' own or borrowed: lending keeps the waiting room's order.
        """
        limiter = self.limiter(maxPerSource=6)
        crowd = self.agents(limiter, 12, host="192.0.2.1")
        quiet = self.connect(limiter, "192.0.2.2")
        self.assertFalse(quiet.started)
        crowd[5].login()
        self.assertTrue(quiet.started)
        self.assertTrue(quiet.protocol.borrowed)
        self.assertEqual(sum(c.started for c in crowd), 6)

    def test_liarsTakeOnlyWhatAgentsWouldBorrow(self) -> None:
        """
        Agents claiming to be OpenSSH from many addresses fill the reserve; the agents lose
        their borrowed slots as those return (a freed reserved slot goes to the waiting
        claimants), never their own: they keep at least their own 4.
        """
        limiter = self.limiter()
        fleet = self.storm(limiter)
        liars = [self.connect(limiter, f"203.0.113.{n}", OPERATOR) for n in range(1, 6)]
        self.assertEqual(sum(c.started for c in liars), 2)
        for conn in fleet[4:6]:
            conn.login()
        self.assertEqual(sum(c.started for c in liars), 4)
        self.assertSlots(limiter, agents=4, borrowed=0, operators=4)
        fleet[0].login()
        self.assertSlots(limiter, agents=4, borrowed=0, operators=4)

    def test_portsAcceptWhileTheFloorIsFree(self) -> None:
        """
        With the waiting room full, the ports keep accepting while the floor is free (an
        operator can still get in; agents that would overfill the room are closed), and
        pause once the operators use the floor too; a login resumes them.
        """
        limiter = self.limiter(maxWaiting=2)
        self.storm(limiter, 8)
        self.assertEqual(limiter.waiting, 2)
        self.assertTrue(self.port.reading)
        late = self.agents(limiter, 1, host="192.0.2.99")[0]
        self.assertTrue(late.closed)
        operators = [self.connect(limiter, f"198.51.100.{n}", OPERATOR) for n in (1, 2)]
        self.assertTrue(all(c.started for c in operators))
        self.assertFalse(self.port.reading)
        operators[0].login()
        self.assertTrue(self.port.reading)

    def test_noLeakWithLending(self) -> None:
        """
        Agents on own and borrowed slots, operators on the floor, waiting agents and
        operators, lost in any order, leave every count (lent and borrowed included) at 0.
        """
        limiter = self.limiter()
        conns = self.storm(limiter)
        conns += [self.connect(limiter, f"198.51.100.{n}", OPERATOR) for n in range(1, 5)]
        conns += [self.connect(limiter, "192.0.2.1", hello=b"")]
        conns[5].login()
        conns[-2].login()
        for c in reversed(conns):
            c.lose()
        self.assertSlots(limiter, agents=0, borrowed=0, operators=0)
        self.assertEqual((limiter.pending, limiter.waiting), (0, 0))
        for pool in limiter.pools.values():
            self.assertEqual((pool.waiting, pool._perSource, pool._queues), (0, {}, {}))

    def test_floorDefaultsAndBounds(self) -> None:
        """
        The floor is a quarter of the reserve, at least two, never more than the reserve
        (4 of 16 by default: agents run on 60 of 64 in a storm); a reserve of one or two
        is not lent at all; a floor of 0 lends the whole reserve; a floor outside the
        reserve is a configuration error.
        """
        self.assertEqual(HandshakeLimiter(self.ssh).operatorFloor, 4)
        for reserve, floor in ((1, 1), (2, 2), (3, 2), (8, 2), (16, 4), (40, 10)):
            limiter = HandshakeLimiter(self.ssh, 64, operatorReserve=reserve)
            self.assertEqual(limiter.operatorFloor, floor, reserve)
        limiter = self.limiter(operatorFloor=0)
        self.storm(limiter)
        self.assertSlots(limiter, agents=8, borrowed=4, operators=0)
        self.assertRaises(ValueError, self.limiter, operatorFloor=5)
        self.assertRaises(ValueError, self.limiter, operatorFloor=-1)


class _Mute(protocol.Protocol):
    """A client that connects and never says a word."""


class _MuteFactory(protocol.ClientFactory):
    protocol = _Mute


class RealSSHTests(SynchronousTestCase):
    """The limiter around groundcontrol's real front door, whole handshakes in memory."""

    def test_operatorWaitsThenLogsIn(self) -> None:
        """
        With the only slot held by a silent connection, a real SSH operator waits (its
        version line is kept, nothing is answered); when the silent one goes, the
        operator gets the slot, logs in, and the slot is free again.
        """
        fleet = InMemoryFleet()
        limiter = HandshakeLimiter(fleet.factory, maxPending=1, maxPerSource=1)
        key = fleet.addOperator("alice")
        silent = fleet.network.connect(limiter, _MuteFactory(), clientHost="192.0.2.9")
        operator = FakeOperator("alice", key, hostKey=fleet.hostKey)
        fleet.network.connect(limiter, operator)
        self.assertIsNone(operator.connection)
        self.assertEqual((limiter.pending, limiter.waiting), (1, 1))
        fleet.network.cut(silent)
        self.assertIsNotNone(operator.connection)
        self.assertEqual((limiter.pending, limiter.waiting), (0, 0))

    def test_graceTimeEndsAStalledHandshake(self) -> None:
        """
        A silent connection holding the slot is ended by the SSH login grace time (30 s),
        and the waiting operator then logs in: the queue moves without anyone leaving.
        """
        fleet = InMemoryFleet()
        limiter = HandshakeLimiter(fleet.factory, maxPending=1, maxPerSource=1)
        key = fleet.addOperator("alice")
        fleet.network.connect(limiter, _MuteFactory(), clientHost="192.0.2.9")
        operator = FakeOperator("alice", key, hostKey=fleet.hostKey)
        fleet.network.connect(limiter, operator)
        fleet.clock.advance(29)
        fleet.flush()
        self.assertIsNone(operator.connection)
        fleet.clock.advance(1)
        fleet.flush()
        self.assertIsNotNone(operator.connection)
        self.assertEqual(limiter.pending, 0)


class _StalledAgent(protocol.Protocol):
    """A client that sends our agent's version line and then nothing more."""

    def connectionMade(self) -> None:
        self.transport.write(AGENT)  # type: ignore[union-attr]


class _OpenSSHOperator(FakeOperator):
    """L{FakeOperator} sending the OpenSSH client's version line, as a real operator does."""

    def buildProtocol(self, addr: Any) -> Any:
        transport = super().buildProtocol(addr)
        transport.ourVersionString = OPERATOR.rstrip(b"\r\n")
        return transport


class RealSSHReserveTests(SynchronousTestCase):
    """The operators' reserve around groundcontrol's real front door, in memory."""

    def test_operatorLogsInAheadOfAgentsFromItsAddress(self) -> None:
        """
        Stalled agents from 192.0.2.9 hold both agents' slots and six more wait; a real
        SSH operator from the same address logs in at once, through the reserved slot,
        while the six still wait.
        """
        fleet = InMemoryFleet()
        limiter = HandshakeLimiter(fleet.factory, maxPending=3, operatorReserve=1)
        key = fleet.addOperator("alice")
        agents = protocol.ClientFactory.forProtocol(_StalledAgent)
        for _ in range(8):
            fleet.network.connect(limiter, agents, clientHost="192.0.2.9")
        self.assertEqual((limiter.agents.pending, limiter.agents.waiting), (2, 6))
        operator = _OpenSSHOperator("alice", key, hostKey=fleet.hostKey)
        fleet.network.connect(limiter, operator, clientHost="192.0.2.9")
        self.assertIsNotNone(operator.connection)
        self.assertEqual((limiter.agents.pending, limiter.agents.waiting), (2, 6))
        self.assertEqual(limiter.operators.pending, 0)

    def test_realAgentWaitsWhileTheOperatorTakesTheFloor(self) -> None:
        """
        With lending (8 slots, 4 reserved, floor 2): ten stalled agents from 192.0.2.9
        hold the agents' 4 slots and 2 borrowed ones. The real agent's link
        (L{agent.link.AgentTransport}, its own version line) from the same address is
        counted as an agent and waits, though the floor is free; an OpenSSH operator from
        there logs in at once on the floor. When the stalled agents go, the real agent's
        link comes up and nothing is left lent or in progress.
        """
        from accesstunnel.keys import fingerprint
        from agent.identity import ServerKeyPin
        from agent.link import AgentLinkFactory, LinkSettings
        from groundcontrol.testing import publicLine, refuseForwards

        fleet = InMemoryFleet()
        limiter = HandshakeLimiter(fleet.factory, maxPending=8, operatorReserve=4)
        key = fleet.addOperator("alice")
        deviceKey = fleet.enrollDevice("kiln7")
        stalled = protocol.ClientFactory.forProtocol(_StalledAgent)
        crowd = [fleet.network.connect(limiter, stalled, clientHost="192.0.2.9") for _ in range(10)]
        self.assertEqual((limiter.agents.pending, limiter.agents.borrowed), (6, 2))
        settings = LinkSettings(
            name="kiln7",
            deviceKey=deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(fleet.hostKey))),
        )
        agentFactory = AgentLinkFactory(settings, fleet.clock, lambda *a: None, refuseForwards)
        link = fleet.network.connect(limiter, agentFactory, clientHost="192.0.2.9")
        self.assertEqual((limiter.agents.waiting, limiter.operators.pending), (5, 0))
        operator = _OpenSSHOperator("alice", key, hostKey=fleet.hostKey)
        fleet.network.connect(limiter, operator, clientHost="192.0.2.9")
        self.assertIsNotNone(operator.connection)
        self.assertFalse(link.client.ready.called)
        for pump in crowd:
            fleet.network.cut(pump)
        self.assertTrue(link.client.ready.called)
        self.assertEqual((limiter.pending, limiter.waiting, limiter.operators.lent), (0, 0, 0))


class PenaltyExemptTests(SynchronousTestCase):
    """Sources exempt from groundcontrol's penalties (--penalty-exempt) keep the caps here."""

    def test_exemptSourceKeepsItsPerSourceCap(self) -> None:
        """
        The per-source cap bounds concurrency, it locks no one out, so an exempt NAT
        keeps it: of five stalled handshakes from an exempt address two run (the cap)
        and three wait; when those two go, two waiting ones start.
        """
        from groundcontrol.preauth import PenaltyPolicy, PreauthGuard, parseExemptNetwork

        fleet = InMemoryFleet()
        policy = PenaltyPolicy(exempt=(parseExemptNetwork("192.0.2.0/24"),))
        fleet.factory.preauthGuard = PreauthGuard(fleet.clock, penalties=policy)
        limiter = HandshakeLimiter(fleet.factory, maxPending=8, maxPerSource=2, operatorReserve=0)
        stalled = protocol.ClientFactory.forProtocol(_StalledAgent)
        pumps = [fleet.network.connect(limiter, stalled, clientHost="192.0.2.9") for _ in range(5)]
        self.assertTrue(fleet.factory.preauthGuard.penalties.exempt("192.0.2.9"))
        self.assertEqual((limiter.agents.pending, limiter.agents.waiting), (2, 3))
        for pump in pumps[:2]:
            fleet.network.cut(pump)
        self.assertEqual((limiter.agents.pending, limiter.agents.waiting), (2, 1))


class ListenBacklogTests(SynchronousTestCase):
    """The front door's listen backlog: where a storm waits that the server is not accepting."""

    def test_tcpListenersGetALargeBacklog(self) -> None:
        """
        ssh://, tls:// and tcp: endpoint strings listen with LISTEN_BACKLOG (Twisted's
        default of 50 overflows at once in a reconnect storm); a backlog given in the
        endpoint string is kept.
        """
        from twisted.internet.testing import MemoryReactor

        from accesstunnel.addresses import LISTEN_BACKLOG, serverListener

        reactor = MemoryReactor()
        for address in ("ssh://127.0.0.1:0", "tcp:0:interface=127.0.0.1", "tcp6:0"):
            endpoint = serverListener(reactor, address).endpoint
            self.assertEqual(endpoint._backlog, LISTEN_BACKLOG, address)  # type: ignore[attr-defined]
        endpoint = serverListener(reactor, "tcp:0:backlog=7").endpoint
        self.assertEqual(endpoint._backlog, 7)  # type: ignore[attr-defined]


class WebSocketTests(SynchronousTestCase):
    """Under the WebSocket transport (wss://, ws://) connections wait and start the same way."""

    def test_waitsAndStartsUnderWebSocket(self) -> None:
        """
        The second WebSocket connection gets no SSH protocol while the only slot is held;
        what its client sent meanwhile reaches the SSH protocol once the first goes.
        """
        from twisted.test import iosim

        from accesstunnel.transports.websocket import (
            WebSocketClientFactory,
            WebSocketServerFactory,
        )

        ssh = FakeSSHFactory()
        limiter = HandshakeLimiter(ssh, maxPending=1, clock=Clock())
        server = WebSocketServerFactory(limiter, "ws://127.0.0.1:80/tunnel", "/tunnel")
        pumps = []
        clients = []
        for _ in range(2):
            client = protocol.Factory.forProtocol(_Hello)
            ws = WebSocketClientFactory(client, "ws://127.0.0.1:80/tunnel")
            s, c = server.buildProtocol(iosim.FakeAddress()), ws.buildProtocol(iosim.FakeAddress())
            pump = iosim.connect(
                s, iosim.makeFakeServer(s), c, iosim.makeFakeClient(c), greet=False, clock=Clock()
            )
            pump.flush()
            pumps.append(pump)
            clients.append(client)
        self.assertEqual((ssh.made, limiter.pending, limiter.waiting), (1, 1, 1))
        second = [p for p in limiter.protocols if p.wrappedProtocol is None]
        self.assertEqual(len(second), 1)
        pumps[0].clientIO.loseConnection()
        for pump in pumps:
            pump.flush()
        self.assertEqual(ssh.made, 2)
        self.assertEqual(second[0].wrappedProtocol.received, b"SSH-2.0-client\r\n")


class _Hello(protocol.Protocol):
    """A client that sends its version line at once, as SSH clients do."""

    def connectionMade(self) -> None:
        self.transport.write(b"SSH-2.0-client\r\n")  # type: ignore[union-attr]
