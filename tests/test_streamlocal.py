"""
ssh -L to a UNIX socket on the device (OpenSSH's direct-streamlocal@openssh.com), as sshd
serves it: groundcontrol relays the channel (groundcontrol.router), the agent connects to
the socket first and answers then (agent.forward.StreamLocalChannel). In memory: the
in-memory fleet with the real agent link, and a MemoryReactor for the agent's connect.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet.error import ConnectError
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from agent.forward import StreamLocalChannel
from groundcontrol.router import DIRECT_STREAMLOCAL, SessionPolicy
from groundcontrol.sshserver import ServerSettings
from groundcontrol.testing import FakeOperator, InMemoryFleet, resultNow
from tests.test_agent_session import RecordingConnection
from tests.test_relay import RelayTestCase

#: What OpenSSH's client sends: the path, then a reserved string and uint32.
PAYLOAD = common.NS(b"/run/app.sock") + common.NS(b"") + b"\0\0\0\0"


class AgentTests(SynchronousTestCase):
    """The agent connects to the socket named, then gives the channel."""

    def test_connectsThenSplices(self) -> None:
        """The open is answered after the connect; bytes then go both ways."""
        memory = MemoryReactor()
        d = StreamLocalChannel.open(memory, PAYLOAD, remoteWindow=1 << 20, remoteMaxPacket=32768)
        self.assertNoResult(d)
        path, factory, _, _ = memory.unixClients[0]
        self.assertEqual(path, "/run/app.sock")
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        channel = self.successResultOf(d)
        RecordingConnection().attach(channel)
        channel.dataReceived(b"ping")
        self.assertEqual(transport.value(), b"ping")

    def test_malformedOrMissingIsRefused(self) -> None:
        """An empty or truncated path, or a socket that cannot be reached: connect failed."""
        for bad in [common.NS(b""), b"\0\0\0\x09/run", b""]:
            failure = self.failureResultOf(StreamLocalChannel.open(MemoryReactor(), bad))
            self.assertEqual(failure.value.data, connection.OPEN_CONNECT_FAILED)
        memory = MemoryReactor()
        d = StreamLocalChannel.open(memory, PAYLOAD)
        _, factory, _, _ = memory.unixClients[0]
        factory.clientConnectionFailed(None, ConnectError("no such file"))
        failure = self.failureResultOf(d, ConchError)
        self.assertIn("connect to /run/app.sock failed", failure.value.value)


class RelayedTests(RelayTestCase):
    """groundcontrol passes the channel on, unless forwarding or the grant says no."""

    def streamLocalAgent(self) -> list[bytes]:
        """An agent whose stream-local opens are recorded, then refused with a known text."""
        seen: list[bytes] = []

        def streamLocal(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
            seen.append(data)
            raise ConchError("scripted socket", connection.OPEN_CONNECT_FAILED)

        factory = self.agentFactory()
        factory.streamLocalFactory = streamLocal
        self.fleet.connect(factory)
        return seen

    def openStreamLocal(self, operator: FakeOperator | None = None) -> Any:
        session = (operator or self.operator()).openSession(channelType=DIRECT_STREAMLOCAL)
        self.fleet.flush()
        return session

    def test_reachesTheDevice(self) -> None:
        """The open is passed on to the agent, whose answer the operator gets."""
        seen = self.streamLocalAgent()
        session = self.openStreamLocal()
        self.assertEqual(len(seen), 1)
        self.assertFalse(session.isOpen)
        self.assertEqual(session.openFailureText, "scripted socket")

    def test_agentWithoutItRefusesUnknown(self) -> None:
        """An agent link built without a stream-local factory refuses the type as unknown."""
        self.connectAgent()
        session = self.openStreamLocal()
        self.assertFalse(session.isOpen)
        self.assertEqual(session.openFailure.args[1], connection.OPEN_UNKNOWN_CHANNEL_TYPE)  # type: ignore[union-attr]

    def test_notUnderNoPortForwarding(self) -> None:
        """--no-port-forwarding refuses it, as it refuses ssh -L to a port."""
        self.fleet = InMemoryFleet(
            settings=ServerSettings(sessions=SessionPolicy(permitLocalForwarding=False))
        )
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        seen = self.streamLocalAgent()
        session = self.openStreamLocal()
        self.assertEqual(seen, [])
        self.assertIn("port forwarding is not permitted", session.openFailureText)

    def test_notForAnotherLoginUser(self) -> None:
        """
        A grant that runs the operator's sessions as pi: refused, since the agent (root)
        would reach sockets whose mode keeps pi out.
        """
        resultNow(self.fleet.store.grant("alice", "kiln7", "test", self.fleet.now, loginUser="pi"))
        seen = self.streamLocalAgent()
        session = self.openStreamLocal()
        self.assertEqual(seen, [])
        self.assertIn("your sessions there run as 'pi'", session.openFailureText)
