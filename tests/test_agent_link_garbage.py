"""
A lost link leaves the agent no cyclic garbage.

An agent on a small device may lose and re-dial its one link many times a day. Each old
link (its transport, the connection service, the keepalive, the steady path's
shortcuts, the ciphers and buffers) must be freed by reference counting the moment it
is lost, not kept in reference cycles until the cyclic collector runs. The same
property for groundcontrol's side is tests/test_login_garbage.py; its helpers and its
rules for the in-memory doubles (which must let go as TCP does) apply here too.

Each test runs the real agent link (L{agent.link.AgentLinkFactory}) against an in-memory
groundcontrol with scripted sessions on the device, warms up once, then runs its
connection N times with the collector off: every agent transport is freed before the
collection, and the collection finds nothing. What each lost link used to leave in
cycles: what groundcontrol's transport lets go of (accesstunnel.letgo), Conch's
C{instance} (the client's requested service, kept for good), the link's C{ready}
Deferred, whose result was the transport itself, the ssh -R forwarder (it and the
connection referred to each other), and the JSON the agent writes when a link comes up
(its status file, the failover's working address: the json module's Python encoder,
used for C{indent} and by C{json.dump}, is closures that refer to each other).

An ssh -L forward's channel and its window credit (agent._flow.InputCredit) referred to
each other: the closed channel now detaches its credit.

The device side of real sessions (agent.session) runs processes: their tests give the
channels an in-memory pipe child (tests.test_agent_pull.PipeChild) that ends when the test
says, after the channel has hung it up. Two cycles kept a lost link's session channels: their
table of request handlers, bound methods (now looked up by name), and, for a channel waiting
for the link when it was lost (its pipe held by agent.session's pull, or its output queued),
the link's line of waiting channels (accesstunnel.linkflow now lets go of it when the link
stops). The channel holds an InputCredit as a forward does and detaches it when closed
(tests/test_agent_session.py checks that).
"""

from __future__ import annotations

import signal
import struct
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from twisted.conch.ssh.common import NS
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ProcessTerminated
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer, providedBy

from accesstunnel.addresses import Connector
from accesstunnel.keys import fingerprint
from agent._process import READ_SIZE
from agent.enrollment import CERTIFICATE_FILE, Enrollment
from agent.failover import FailoverEndpoint
from agent.forward import ForwardChannel
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings, linkService
from agent.remoteforward import TCPIP_FORWARD
from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.enrollment import CertificatePolicy
from groundcontrol.pki import FleetCA
from groundcontrol.testing import (
    FakeOperator,
    InMemoryFleet,
    OperatorSession,
    publicLine,
    refuseForwards,
    scriptedSessions,
)
from tests.test_agent_forwarding import ListeningReactor, forwardRequest
from tests.test_agent_pull import PipeChild
from tests.test_agent_session import FakeSpawner
from tests.test_login_garbage import (
    AFTER_THE_SWEEP,
    assertLeavesNoGarbage,
    lose,
    withoutTheLogBuffer,
)

#: ClientService's delay before it dials a lost link again: longer than C{settle} runs.
REDIAL = 2 * AFTER_THE_SWEEP


class AgentLinkGarbageTests(SynchronousTestCase):
    """The agent's links, logged in, used and lost, are freed by reference counting."""

    def setUp(self) -> None:
        withoutTheLogBuffer(self)
        #: The clock, and a reactor that listens in memory (for ssh -R on the device).
        self.clock = ListeningReactor()
        self.clock.advance(1_700_000_000)
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        ca = FleetCA.create(directory / "ca", datetime.fromtimestamp(self.clock.seconds(), UTC))
        self.fleet = InMemoryFleet(clock=self.clock, certificates=CertificatePolicy(ca))
        deviceKey = self.fleet.enrollDevice("kiln7")
        self.operatorKey = self.fleet.addOperator("ada")
        self.fleet.grant("ada", "kiln7")
        settings = LinkSettings(
            name="kiln7",
            deviceKey=deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        self.factory = AgentLinkFactory(settings, self.clock, scriptedSessions(), refuseForwards)
        build = self.factory.buildProtocol
        #: Every agent transport built, weakly.
        self.agents: list[weakref.ref[Any]] = []

        def buildProtocol(addr: Any) -> Any:
            agentTransport = build(addr)
            self.agents.append(weakref.ref(agentTransport))
            return agentTransport

        self.factory.buildProtocol = buildProtocol  # type: ignore[method-assign]
        #: The operators' clients, kept: their garbage is not the agent's.
        self.operators: list[Any] = []

    def link(self) -> iosim.IOPump:
        pump = self.fleet.connect(self.factory)
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        self.assertTrue(pump.client.steady)
        return pump

    def drop(self, pump: iosim.IOPump) -> None:
        """The link dies; the agent's in-memory transport lets go as TCP's does."""
        if pump.clientIO.producer is not None:
            pump.clientIO.producer.stopProducing()  # before the protocol hears, as TCP does
        lose(self.fleet, pump)
        pump.clientIO.protocol = None
        pump.clientIO.producer = None
        self.fleet.flush()
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))

    def settle(self) -> None:
        """Let the keepalives' timers pass, a second at a time."""
        for _ in range(int(AFTER_THE_SWEEP)):
            self.clock.advance(1)
            self.fleet.flush()

    def operator(self) -> FakeOperator:
        """An operator logged in for the device (their client is kept)."""
        operator = FakeOperator("dev_kiln7", self.operatorKey, hostKey=self.fleet.hostKey)
        self.operators.append(operator)
        self.fleet.connect(operator)
        return operator

    def openSession(self, command: bytes) -> OperatorSession:
        """An operator logs in and runs C{command} on the device."""
        session = self.fleet.session(self.operator())
        self.assertTrue(session.isOpen, session.openFailure)
        session.exec(command)
        self.fleet.flush()
        return session

    def assertNoGarbage(self, connection: Callable[[], None]) -> None:
        """Each run of C{connection} (one link, from dial to loss) leaves nothing, its
        agent transport included."""
        assertLeavesNoGarbage(self, self.fleet, connection, self.settle, self.agents)

    def test_linkUpAndLost(self) -> None:
        """The link logs in (routable, on the steady path), then is lost."""

        def connection() -> None:
            self.drop(self.link())

        self.assertNoGarbage(connection)

    def test_enrolledAgent(self) -> None:
        """
        The agent as it runs, with its enrollment: the hello on every link (the status
        file written each time), a fleet certificate issued over the first one, then
        links with it.
        """
        stateDir = Path(self.mktemp())
        stateDir.mkdir(parents=True)
        enrollment = Enrollment(
            stateDir, self.clock, requestedName="kiln7", serial="SN-1", version="0.1.0"
        )
        self.factory.enrollment = enrollment

        def connection() -> None:
            pump = self.link()
            self.assertEqual(enrollment.state, "approved")
            self.drop(pump)

        self.assertNoGarbage(connection)
        self.assertTrue((stateDir / CERTIFICATE_FILE).exists())

    def test_linkWithASessionThenLost(self) -> None:
        """
        An operator runs a command on the device over the link, the session ends, then
        the link is lost (the operator's connection with it).
        """

        def connection() -> None:
            pump = self.link()
            session = self.openSession(b"hello")
            self.clock.advance(0)
            self.fleet.flush()
            self.assertEqual(bytes(session.output), b"hello\n")
            self.drop(pump)

        self.assertNoGarbage(connection)

    def test_linkLostWithASessionOpen(self) -> None:
        """The link is lost while an operator's session on the device is still open."""

        def connection() -> None:
            pump = self.link()
            session = self.openSession(b"cat")
            self.drop(pump)
            self.assertTrue(session.isClosed)

        self.assertNoGarbage(connection)

    def agentSessions(self) -> list[FakeSpawner]:
        """
        Sessions on the device are the agent's own (L{SessionChannel}), each running an
        in-memory pipe child; the list returned gets each one's spawner (its child and the
        child's process protocol) as it starts.
        """
        started: list[FakeSpawner] = []

        def sessionFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
            spawner = FakeSpawner()
            spawner.child = PipeChild()
            spawner.child.pid = None  # type: ignore[assignment]  # nothing to signal
            started.append(spawner)
            return SessionChannel(
                SessionEnvironment(home="/nonexistent-home"),
                self.clock,
                spawn=spawner,
                remoteWindow=windowSize,
                remoteMaxPacket=maxPacket,
                conn=conn,
            )

        self.factory.sessionFactory = sessionFactory
        return started

    def agentSessionThenLost(self, waitsForTheLink: bool) -> None:
        """
        The agent runs C{cat} for an operator; with C{waitsForTheLink}, the link's socket
        is full when the child writes, so its pipe is held (agent.session's pull) and its
        channel waits in the link's line. Then the link is lost: the channel is closed and
        hangs its child up, and the child ends (as the reactor reports it).
        """
        started = self.agentSessions()

        def connection() -> None:
            pump = self.link()
            self.openSession(b"cat")
            spawner = started.pop()
            child = cast(PipeChild, spawner.child)
            if waitsForTheLink:
                pump.client.service.linkFlow.pauseProducing()  # the socket's buffer is full
                spawner.protocol.childDataReceived(1, b"a" * READ_SIZE)
                self.assertFalse(child.inReactor)  # held
            self.drop(pump)
            self.assertTrue(child.lost)
            # The child ends; the process transport tells its protocol and lets go of it.
            protocol, spawner.protocol = spawner.protocol, None
            protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))

        self.assertNoGarbage(connection)

    def test_linkLostWithAnAgentSessionOpen(self) -> None:
        """The link is lost while the agent's own session channel runs its child."""
        self.agentSessionThenLost(waitsForTheLink=False)

    def test_linkLostWhileASessionWaitsForIt(self) -> None:
        """The link is lost while a session's output waits for it."""
        self.agentSessionThenLost(waitsForTheLink=True)

    def test_linkWithARemoteForwardThenLost(self) -> None:
        """
        An operator's C{ssh -R}: the agent listens on the device (in memory) for the
        link, then the link is lost, and the listener with it.
        """

        def connection() -> None:
            pump = self.link()
            operatorConnection = self.operator().connection
            assert operatorConnection is not None
            forward = operatorConnection.sendGlobalRequest(
                TCPIP_FORWARD, forwardRequest(b"localhost", 0), wantReply=1
            )
            self.fleet.flush()
            self.successResultOf(forward)
            [listening] = self.clock.ports
            self.drop(pump)
            self.assertTrue(listening.stopped)
            # A reactor forgets a port that stopped listening; the in-memory one lists all.
            del self.clock.ports[:], self.clock.tcpServers[:]

        self.assertNoGarbage(connection)

    def test_linkWithALocalForwardThenLost(self) -> None:
        """
        An operator's C{ssh -L} through the device: the agent connects out (in memory)
        and splices the socket to the channel; then the link is lost, and the socket
        closes with it.
        """

        def forwardFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
            return ForwardChannel.open(
                self.clock, data, remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=conn
            )

        self.factory.forwardFactory = forwardFactory
        destination = NS(b"127.0.0.1") + struct.pack(">L", 8080)
        origin = NS(b"192.0.2.1") + struct.pack(">L", 5555)
        # The endpoint's wrapper provides its transport's interfaces: zope.interface's
        # declaration for them, a cycle (not ours), is held from the first connection on,
        # as in test_theAgentsServiceRedials.
        declarations: list[Any] = []

        def connection() -> None:
            pump = self.link()
            operatorConnection = self.operator().connection
            assert operatorConnection is not None
            forward = OperatorSession(conn=operatorConnection)
            forward.name = b"direct-tcpip"
            operatorConnection.openChannel(forward, destination + origin)
            self.fleet.flush()
            host, port, factory, _, _ = self.clock.tcpClients.pop()
            splice: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
            socket = StringTransport()
            splice.makeConnection(socket)
            declarations[:] = declarations or [providedBy(splice)]
            self.fleet.flush()
            forward.write(b"GET /\n")
            self.fleet.flush()
            self.assertEqual(socket.value(), b"GET /\n")
            self.drop(pump)
            self.assertTrue(socket.disconnecting)
            splice.connectionLost(Failure(ConnectionDone()))  # as TCP's, once closed
            del self.clock.connectors[:]

        self.assertNoGarbage(connection)

    def test_theAgentsServiceRedials(self) -> None:
        """
        The link as the agent keeps it: L{linkService} (Twisted's ClientService) through
        the failover endpoint, which records the address that worked each time a link
        comes up. Each lost link is dialled again (after a delay longer than C{settle}
        lets pass), and each is freed.
        """
        fleet, links = self.fleet, []

        @implementer(IStreamClientEndpoint)
        class InMemoryEndpoint:
            def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
                pump = fleet.connect(cast(protocol.ClientFactory, factory))
                links.append(pump)
                return succeed(pump.client)

        addresses = [Connector(InMemoryEndpoint(), lambda f: f, "memory:gc", "memory")]
        stateFile = Path(self.mktemp()) / "last-server.json"
        endpoint = FailoverEndpoint(self.clock, addresses, stateFile)
        service = linkService(endpoint, self.factory, self.clock, lambda attempt: REDIAL)
        service.startService()
        self.addCleanup(service.stopService)
        # The failover's watch provides its transport's interfaces (directlyProvides), and
        # zope.interface keeps one declaration per set of them, itself a cycle (not ours),
        # that the next link reuses until the collector frees it. Held here, as
        # test_login_garbage's bystander link holds the handshake limiter's.
        self.watchDeclaration = providedBy(links[-1].client)
        self.drop(links.pop())
        lost: list[weakref.ref[Any]] = []

        def connection() -> None:
            self.clock.advance(REDIAL)
            fleet.flush()
            self.assertIsNotNone(fleet.registry.lookup("kiln7"))
            lost.append(self.agents[-1])
            self.drop(links.pop())

        assertLeavesNoGarbage(self, fleet, connection, self.settle, lost)
        self.assertTrue(stateFile.exists())
