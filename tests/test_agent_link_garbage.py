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
C{instance} (the client's requested service, kept for good), and the link's C{ready}
Deferred, whose result was the transport itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from agent.enrollment import CERTIFICATE_FILE, Enrollment
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
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
from tests.test_login_garbage import (
    AFTER_THE_SWEEP,
    assertLeavesNoGarbage,
    lose,
    withoutTheLogBuffer,
)


class AgentLinkGarbageTests(SynchronousTestCase):
    """The agent's links, logged in, used and lost, are freed by reference counting."""

    def setUp(self) -> None:
        withoutTheLogBuffer(self)
        self.clock = Clock()
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

    def openSession(self, command: bytes) -> OperatorSession:
        """An operator logs in and runs C{command} on the device (their client is kept)."""
        operator = FakeOperator("dev_kiln7", self.operatorKey, hostKey=self.fleet.hostKey)
        self.operators.append(operator)
        self.fleet.connect(operator)
        session = self.fleet.session(operator)
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
