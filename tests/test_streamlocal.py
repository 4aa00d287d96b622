"""
UNIX socket forwarding as sshd serves it. ssh -L to a socket on the device (OpenSSH's
direct-streamlocal@openssh.com): groundcontrol relays the channel (groundcontrol.router),
the agent connects to the socket first and answers then (agent.forward.StreamLocalChannel).
ssh -R from a socket path on the device (streamlocal-forward@openssh.com): groundcontrol
passes it on for its owner (groundcontrol.forwarding), the agent listens there
(agent.remoteforward). In memory: the in-memory fleet with the real agent link, and
memory reactors for the agent's connects and listeners.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet.address import UNIXAddress
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from agent.forward import StreamLocalChannel
from agent.remoteforward import CANCEL_SOCKET_FORWARD, SOCKET_FORWARD, RemoteForwarder
from groundcontrol.forwarding import SOCKET, forwardName
from groundcontrol.router import DIRECT_STREAMLOCAL, SessionPolicy
from groundcontrol.sshserver import ServerSettings
from groundcontrol.testing import FakeOperator, InMemoryFleet, resultNow
from tests.test_adversarial import _ForwardsWorld
from tests.test_agent_forwarding import FakeLink, ListeningReactor, accept
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


def socketRequest(path: bytes) -> bytes:
    return common.NS(path)


class _BusyPathReactor(ListeningReactor):
    """A path that exists already refuses like bind(2) (sshd: StreamLocalBindUnlink no)."""

    def listenUNIX(self, address: str, factory: Any, *args: Any, **kwargs: Any) -> Any:
        if address == "/run/taken.sock":
            raise CannotListenError(None, address, OSError(errno.EADDRINUSE, "in use"))
        return super().listenUNIX(address, factory, *args, **kwargs)


class AgentSocketForwardTests(SynchronousTestCase):
    """ssh -R from a UNIX socket path on the device: the agent's listener, in memory."""

    def setUp(self) -> None:
        self.reactor = _BusyPathReactor()
        self.link = FakeLink()
        self.forwarder = RemoteForwarder(self.reactor, self.link)

    def test_listensForItsOwnerOnly(self) -> None:
        """
        The socket is made with mode 0600 (sshd's StreamLocalBindMask 0177); a connection
        to it opens forwarded-streamlocal@openssh.com with the path and a reserved string.
        """
        self.assertIs(self.forwarder.forwardSocket(socketRequest(b"/run/gpg.sock")), True)
        path, factory, _, mode, wantPID = self.reactor.unixServers[0]
        self.assertEqual((path, mode, wantPID), ("/run/gpg.sock", 0o600, False))
        accept(factory, UNIXAddress(None))
        [(channel, payload)] = self.link.opened
        self.assertEqual(channel.name, b"forwarded-streamlocal@openssh.com")
        self.assertEqual(payload, common.NS(b"/run/gpg.sock") + common.NS(b""))

    def test_refusals(self) -> None:
        """A path that exists, an empty or truncated path, or one past the cap: failure."""
        self.assertFalse(self.forwarder.forwardSocket(socketRequest(b"/run/taken.sock")))
        for garbage in (b"", socketRequest(b""), b"\0\0\0\x09/run"):
            self.assertFalse(self.forwarder.forwardSocket(garbage), garbage)
        capped = RemoteForwarder(self.reactor, self.link, maxListeners=1)
        self.assertTrue(capped.forward(common.NS(b"") + b"\0\0\x23\x29"))
        self.assertFalse(capped.forwardSocket(socketRequest(b"/run/a.sock")))

    def test_cancelAndLinkLoss(self) -> None:
        """The cancel stops the listener it names (others fail); the link's loss, all."""
        self.forwarder.forwardSocket(socketRequest(b"/run/a.sock"))
        self.forwarder.forwardSocket(socketRequest(b"/run/b.sock"))
        first, second = self.reactor.ports
        self.assertFalse(self.forwarder.cancelSocket(socketRequest(b"/run/c.sock")))
        self.assertTrue(self.forwarder.cancelSocket(socketRequest(b"/run/a.sock")))
        self.assertEqual((first.stopped, second.stopped), (True, False))
        self.assertFalse(self.forwarder.cancelSocket(socketRequest(b"/run/a.sock")))
        self.forwarder.stopAll()
        self.assertTrue(second.stopped)


class RoutedSocketForwardTests(_ForwardsWorld):
    """groundcontrol passes ssh -R from a socket path on, for its owner alone."""

    bobGrant = "--as pi"

    def setUp(self) -> None:
        super().setUp()
        agentFactory = next(
            pump.client.factory
            for pump in self.world.fleet.network.pumps
            if getattr(pump.client.factory, "name", None) == "lab1"
        )
        forwarder = RemoteForwarder(self.reactor, agentFactory.connection)
        answers = {
            SOCKET_FORWARD: forwarder.forwardSocket,
            CANCEL_SOCKET_FORWARD: forwarder.cancelSocket,
        }
        agentFactory.connection.gotGlobalRequest = lambda kind, data: answers.get(
            kind, lambda _: 0
        )(data)

    def test_ownerForwardsAndCancels(self) -> None:
        """carol's forward reaches the device; her cancel (not another's) takes it down."""
        carol = self.world.fleet.operator("dev_lab1", self.carol)
        self.world.fleet.flush()
        assert carol.connection is not None
        request = socketRequest(b"/run/carol.sock")
        asked = carol.connection.sendGlobalRequest(SOCKET_FORWARD, request, wantReply=1)
        self.world.fleet.flush()
        self.successResultOf(asked)
        (listening,) = self.reactor.ports
        self.failureResultOf(self.ask(self.carol, CANCEL_SOCKET_FORWARD, request))
        self.assertFalse(listening.stopped)
        cancelled = carol.connection.sendGlobalRequest(CANCEL_SOCKET_FORWARD, request, wantReply=1)
        self.world.fleet.flush()
        self.successResultOf(cancelled)
        self.assertTrue(listening.stopped)

    def test_takenDownWhenTheOperatorLeaves(self) -> None:
        """carol's connection ends: groundcontrol cancels her socket forward on the device."""
        self.successResultOf(self.ask(self.carol, SOCKET_FORWARD, socketRequest(b"/run/c.sock")))
        (listening,) = self.reactor.ports
        self.world.fleet.network.cut(self.world.fleet.network.pumps[-1])
        self.world.fleet.flush()
        self.assertTrue(listening.stopped)

    def test_notForAnotherLoginUser(self) -> None:
        """bob's sessions run as pi: the agent (root) would make the socket as root; refused."""
        self.failureResultOf(
            self.ask(self.world.bob, SOCKET_FORWARD, socketRequest(b"/run/b.sock"))
        )
        self.assertEqual(self.reactor.ports, [])

    def test_namedInTheLogByItsPath(self) -> None:
        """The log names a socket forward by its path, a port forward as ADDRESS:PORT."""
        self.assertEqual(forwardName(b"/run/c.sock", SOCKET), "/run/c.sock")
        self.assertEqual(forwardName(b"localhost", 8080), "localhost:8080")
