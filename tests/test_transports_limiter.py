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

from accesstunnel.transports.limiter import MAX_WAITING_BYTES, HandshakeLimiter
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
        self.assertEqual(limiter._perSource, {})
        self.assertEqual(limiter._queues, {})
        self.assertTrue(self.port.reading)

    def test_startedLossLeaksNoSlot(self) -> None:
        """Every started connection lost before login gives its slot back, exactly once."""
        limiter = self.limiter(maxPending=3, maxPerSource=3)
        conns = [self.connect(limiter, "192.0.2.1") for _ in range(5)]
        for c in conns:
            c.lose()
            c.lose()  # a second report changes nothing
        self.assertEqual((limiter.pending, limiter.waiting), (0, 0))
        self.assertEqual(limiter._perSource, {})

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
