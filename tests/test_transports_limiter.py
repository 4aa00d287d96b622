"""Tests for accesstunnel.transports.limiter: the bound on concurrent unauthenticated handshakes."""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.limiter import HandshakeLimiter


class FakeSSH(protocol.Protocol):
    """Authenticates on b"login" the way Conch does: sets avatar, then writes success."""

    def connectionMade(self) -> None:
        self.factory.made += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if data == b"login":
            self.avatar = object()
            self.transport.write(b"success")  # type: ignore[union-attr]


class FakeSSHFactory(protocol.Factory):
    protocol = FakeSSH
    made = 0
    settings = "the SSH factory's settings"


def connection(
    limiter: HandshakeLimiter, host: str = "192.0.2.1"
) -> tuple[protocol.Protocol, StringTransport]:
    address = IPv4Address("TCP", host, 40000)
    p = limiter.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    p.makeConnection(transport)
    return p, transport


class HandshakeLimiterTests(SynchronousTestCase):
    """Beyond the bound new connections are closed; authenticated ones stop counting."""

    def setUp(self) -> None:
        self.ssh = FakeSSHFactory()
        self.limiter = HandshakeLimiter(self.ssh, maxPending=2, maxPerSource=2)

    def test_refusesBeyondTheBound(self) -> None:
        """The third concurrent handshake is closed at once and never reaches SSH."""
        connection(self.limiter, "192.0.2.1")
        connection(self.limiter, "192.0.2.2")
        _, third = connection(self.limiter, "192.0.2.3")
        self.assertTrue(third.disconnecting)
        self.assertEqual(self.ssh.made, 2)
        self.assertEqual(self.limiter.refused, 1)

    def test_authenticatedConnectionsDoNotCount(self) -> None:
        """
        Once a connection has logged in, its slot is free: a fleet of connected agents and
        operators never blocks new handshakes.
        """
        first, _ = connection(self.limiter, "192.0.2.1")
        connection(self.limiter, "192.0.2.2")
        first.dataReceived(b"login")
        self.assertEqual(self.limiter.pending, 1)
        _, third = connection(self.limiter, "192.0.2.3")
        self.assertFalse(third.disconnecting)
        self.assertEqual(self.limiter.pending, 2)

    def test_closedHandshakesFreeTheirSlot(self) -> None:
        """A connection that goes away before login frees its slot."""
        first, _ = connection(self.limiter, "192.0.2.1")
        connection(self.limiter, "192.0.2.2")
        first.connectionLost(Failure(ConnectionError("gone")))
        _, third = connection(self.limiter, "192.0.2.3")
        self.assertFalse(third.disconnecting)
        self.assertEqual(self.limiter.refused, 0)

    def test_perSource(self) -> None:
        """One address cannot take every slot."""
        limiter = HandshakeLimiter(self.ssh, maxPending=10, maxPerSource=1)
        connection(limiter, "192.0.2.1")
        _, again = connection(limiter, "192.0.2.1")
        _, other = connection(limiter, "192.0.2.2")
        self.assertTrue(again.disconnecting)
        self.assertFalse(other.disconnecting)

    def test_loggedInLossDoesNotReleaseTwice(self) -> None:
        """A logged-in connection closing later leaves the count alone."""
        first, _ = connection(self.limiter, "192.0.2.1")
        first.dataReceived(b"login")
        first.connectionLost(Failure(ConnectionError("bye")))
        self.assertEqual(self.limiter.pending, 0)

    def test_factoryAttributesPassThrough(self) -> None:
        """Code holding the wrapper can still read the SSH factory's attributes."""
        self.assertEqual(self.limiter.settings, "the SSH factory's settings")

    def test_badLimits(self) -> None:
        """A limit below one is a configuration error."""
        self.assertRaises(ValueError, HandshakeLimiter, self.ssh, 0)
