"""
SSH_CLIENT and SSH_CONNECTION on the device, as sshd sets them: groundcontrol tells the
agent where the operator's connection came from (groundcontrol.clientaddress), the agent
puts it in the child's environment (agent.session). In memory: the in-memory fleet with
the real agent link, and the agent's session channel with a fake spawner.
"""

from __future__ import annotations

import struct

from twisted.conch.error import ConchError
from twisted.conch.ssh import common
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.clientaddress import CLIENT_ADDRESS_REQUEST, clientAddressPayload
from groundcontrol.testing import FakeOperator
from tests.test_agent_session import FakeSpawner, RecordingConnection
from tests.test_relay import RelayTestCase, operatorRequests

NS = common.NS


def ends(clientHost: bytes, clientPort: int, serverHost: bytes, serverPort: int) -> bytes:
    return (
        NS(clientHost)
        + struct.pack(">L", clientPort)
        + NS(serverHost)
        + struct.pack(">L", serverPort)
    )


class _Transport:
    def __init__(self, peer: object, host: object) -> None:
        self._peer, self._host = peer, host

    def getPeer(self) -> object:
        return self._peer

    def getHost(self) -> object:
        return self._host


class _Connection:
    def __init__(self, peer: object, host: object) -> None:
        self.transport = _Transport(peer, host)


class PayloadTests(SynchronousTestCase):
    """What groundcontrol says of the operator's connection."""

    def test_ipv4(self) -> None:
        """The operator's address and port, then groundcontrol's listener's."""
        conn = _Connection(
            IPv4Address("TCP", "198.51.100.7", 50123), IPv4Address("TCP", "192.0.2.1", 22)
        )
        self.assertEqual(clientAddressPayload(conn), ends(b"198.51.100.7", 50123, b"192.0.2.1", 22))

    def test_ipv4MappedAsIPv4(self) -> None:
        """An IPv4 client of a dual-stack [::] listener is told as the IPv4 address it is."""
        conn = _Connection(
            IPv6Address("TCP", "::ffff:198.51.100.7", 50123), IPv6Address("TCP", "2001:db8::1", 22)
        )
        self.assertEqual(
            clientAddressPayload(conn), ends(b"198.51.100.7", 50123, b"2001:db8::1", 22)
        )

    def test_noIPAddressNoPayload(self) -> None:
        """A connection on a UNIX socket (no address, no port) gives the device nothing."""
        conn = _Connection(UNIXAddress(None), UNIXAddress(b"/run/gc.sock"))
        self.assertIsNone(clientAddressPayload(conn))
        self.assertIsNone(clientAddressPayload(None))


class RelayedTests(RelayTestCase):
    """groundcontrol tells the device, first; the operator cannot."""

    def setUp(self) -> None:
        super().setUp()
        self.connectAgent()

    def test_deviceToldBeforeTheOperatorsRequests(self) -> None:
        """The device session's first request is the operator's address (no reply wanted)."""
        operator = FakeOperator("dev_kiln7", self.aliceKey, hostKey=self.fleet.hostKey)
        self.fleet.network.connect(self.fleet.factory, operator, clientHost="198.51.100.7")
        session = self.openSession(operator)
        self.successResultOf(self.runCommand(session, b"uname -a"))
        (device,) = self.sessions
        kind, payload, wantReply = device.requests[0]
        self.assertEqual((kind, wantReply), (CLIENT_ADDRESS_REQUEST, False))
        port = struct.unpack(">L", payload[len(NS(b"198.51.100.7")) :][:4])[0]
        self.assertEqual(payload, ends(b"198.51.100.7", port, b"127.0.0.1", 22))
        self.assertEqual([r[0] for r in device.requests[1:]], [b"exec"])

    def test_operatorCannotSayIt(self) -> None:
        """The operator's own client-address request is refused and never reaches the device."""
        session = self.openSession()
        forged = session.request(CLIENT_ADDRESS_REQUEST, ends(b"10.0.0.1", 1, b"10.0.0.2", 2))
        assert forged is not None
        self.fleet.flush()
        self.failureResultOf(forged, ConchError)
        (device,) = self.sessions
        self.assertEqual(operatorRequests(device), [])
        self.assertEqual([r[0] for r in device.requests], [CLIENT_ADDRESS_REQUEST])


class AgentTests(SynchronousTestCase):
    """The agent puts what groundcontrol said into the child's environment."""

    def setUp(self) -> None:
        self.spawner = FakeSpawner()
        environment = SessionEnvironment(home="/nonexistent-home", defaultPath="/bin")
        self.channel = RecordingConnection().attach(
            SessionChannel(environment, Clock(), spawn=self.spawner)
        )

    def ask(self, payload: bytes) -> object:
        return self.channel.requestReceivedWithReply(CLIENT_ADDRESS_REQUEST, payload, False)

    def test_childGetsBothVariables(self) -> None:
        """SSH_CLIENT is 'client port serverport', SSH_CONNECTION adds the server's address."""
        self.assertTrue(self.ask(ends(b"2001:db8::7", 50123, b"192.0.2.1", 2222)))
        self.assertTrue(self.channel.requestReceivedWithReply(b"exec", NS(b"env"), True))
        environment = self.spawner.calls[-1]["environment"]
        self.assertEqual(environment["SSH_CLIENT"], "2001:db8::7 50123 2222")
        self.assertEqual(environment["SSH_CONNECTION"], "2001:db8::7 50123 192.0.2.1 2222")

    def test_withoutItNeither(self) -> None:
        """An older groundcontrol says nothing: the child has neither variable."""
        self.assertTrue(self.channel.requestReceivedWithReply(b"exec", NS(b"env"), True))
        environment = self.spawner.calls[-1]["environment"]
        self.assertNotIn("SSH_CLIENT", environment)
        self.assertNotIn("SSH_CONNECTION", environment)

    def test_refusals(self) -> None:
        """Anything but two IP addresses and ports is refused, and so is it once started."""
        for bad in [
            ends(b"1.2.3.4 evil", 1, b"192.0.2.1", 22),
            ends(b"example.com", 1, b"192.0.2.1", 22),
            ends(b"198.51.100.7", 70000, b"192.0.2.1", 22),
            ends(b"198.51.100.7", 1, b"192.0.2.1", 22) + b"x",
            NS(b"198.51.100.7"),
        ]:
            self.assertFalse(self.ask(bad), bad)
        self.assertTrue(self.channel.requestReceivedWithReply(b"exec", NS(b"env"), True))
        self.assertFalse(self.ask(ends(b"198.51.100.7", 1, b"192.0.2.1", 22)))
        self.assertNotIn("SSH_CLIENT", self.spawner.calls[-1]["environment"])
