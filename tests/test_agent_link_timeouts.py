"""
Tests for the agent's two link deadlines (agent.link.AgentTransport).

A new link first waits for groundcontrol to start the key exchange (its handshake
limiter keeps a connection silent while it queues, for up to C{answerTimeout}), then
has C{handshakeTimeout} from groundcontrol's first KEXINIT to an authenticated link.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.testing import InMemoryFleet, publicLine, refuseForwards, scriptedSessions


class LinkDeadlineTests(SynchronousTestCase):
    """Waiting in groundcontrol's queue is not a failed handshake; a stalled handshake is."""

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.settings = LinkSettings(
            name="kiln7",
            deviceKey=self.fleet.enrollDevice("kiln7"),
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        self.factory = AgentLinkFactory(
            self.settings,
            self.fleet.clock,
            scriptedSessions(),
            refuseForwards,
        )
        self.address = IPv4Address("TCP", "127.0.0.1", 22)

    def connectAgent(self) -> tuple[Any, StringTransport]:
        """An agent connected to a server that has not said anything yet."""
        agent = self.factory.buildProtocol(self.address)
        wire = StringTransport()
        agent.makeConnection(wire)
        return agent, wire

    def serverGreeting(self) -> bytes:
        """What groundcontrol sends first once it takes the connection: version line, KEXINIT."""
        server = self.fleet.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        wire = StringTransport()
        server.makeConnection(wire)
        self.addCleanup(server.connectionLost, None)
        return wire.value()

    def test_queuedLinkWaitsPastTheHandshakeDeadline(self) -> None:
        """
        A server that stays silent (a connection waiting for a handshake slot) is
        given answerTimeout, not handshakeTimeout, before the agent drops it.
        """
        agent, wire = self.connectAgent()
        self.fleet.clock.advance(self.settings.handshakeTimeout + 1)
        self.assertFalse(wire.disconnected, "dropped while queued")
        self.fleet.clock.advance(self.settings.answerTimeout - self.settings.handshakeTimeout - 1.5)
        self.assertFalse(wire.disconnected)
        self.fleet.clock.advance(0.5)
        self.assertTrue(wire.disconnected)
        agent.connectionLost(None)
        self.assertEqual(self.factory.failedLinks, 1)

    def test_handshakeDeadlineCountsFromServersKexinit(self) -> None:
        """
        Once groundcontrol sends its KEXINIT (late, after a long queue), the link has
        handshakeTimeout from then to authenticate, and is dropped when it stalls.
        """
        agent, wire = self.connectAgent()
        queued = self.settings.answerTimeout - 10
        self.fleet.clock.advance(queued)
        agent.dataReceived(self.serverGreeting())
        self.assertFalse(wire.disconnected)
        self.fleet.clock.advance(self.settings.handshakeTimeout - 0.5)
        self.assertFalse(wire.disconnected, "dropped before handshakeTimeout from the KEXINIT")
        self.fleet.clock.advance(0.5)
        self.assertTrue(wire.disconnected)
        agent.connectionLost(None)
        self.assertEqual(self.factory.failedLinks, 1)
        self.assertEqual(self.fleet.clock.getDelayedCalls(), [])

    def test_linkUpCancelsTheDeadline(self) -> None:
        """A link that logs in leaves no deadline behind and is never dropped by it."""
        pump = self.fleet.connect(self.factory)
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        agent = pump.client
        self.assertFalse(agent._handshakeTimer.active())
        self.fleet.clock.advance(self.settings.answerTimeout + 1)
        self.fleet.flush()
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
