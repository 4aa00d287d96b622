"""
Tests for what flows from the device back to the operator: ssh -R, ssh -A and ssh -X on the agent.

(agent.remoteforward, agent.agentforward, agent.x11, their requests in
agent.session and agent.link.) Most tests run in memory: a reactor that
listens in memory, a fake link recording the channels the agent opens and
what each sends, and a fake spawner. A few use real loopback sockets, a real
UNIX socket, real children and the real xauth, because what they prove (the
address really bound, the socket's mode, the child's environment, the
cookie in .Xauthority) only exists there.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import stat
import struct
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from twisted.conch.ssh import common, connection
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from accesstunnel.channel import ENDPOINT_WINDOW
from agent import agentforward, x11
from agent.agentforward import AgentForwarding
from agent.link import AgentConnection
from agent.remoteforward import RemoteForwarder, loopbackFor
from agent.session import SessionChannel, SessionEnvironment
from tests.test_agent_session import FakeChild, exitStatus, peerClosed

NS = common.NS


def uint32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}L", *values)


def forwardRequest(address: bytes, port: int) -> bytes:
    return NS(address) + uint32(port)


def x11Request(
    cookie: bytes = b"0123456789abcdef0123456789abcdef",
    screen: int = 0,
    single: bool = False,
) -> bytes:
    return (
        (b"\x01" if single else b"\x00") + NS(b"MIT-MAGIC-COOKIE-1") + NS(cookie) + uint32(screen)
    )


class FakeListeningPort:
    """A listening port that remembers being stopped."""

    def __init__(self, address: Any, factory: Any) -> None:
        self.address = address
        self.factory = factory
        self.stopped = False

    def getHost(self) -> Any:
        return self.address

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped = True
        return defer.succeed(None)


class ListeningReactor(MemoryReactorClock):
    """
    Listens in memory: port 0 gets a port number, C{busy} (interface, port)
    pairs refuse like EADDRINUSE, and every port can be checked for being stopped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[tuple[str, int]] = set()
        self.ports: list[FakeListeningPort] = []
        self._nextPort = 40000

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if (interface, port) in self.busy:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))
        if port == 0:
            port, self._nextPort = self._nextPort, self._nextPort + 1
        self.tcpServers.append((port, factory, backlog, interface))
        address: Any = (IPv6Address if ":" in interface else IPv4Address)("TCP", interface, port)
        listening = FakeListeningPort(address, factory)
        self.ports.append(listening)
        return listening

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        self.unixServers.append((address, factory, backlog, mode, wantPID))
        listening = FakeListeningPort(UNIXAddress(address), factory)
        self.ports.append(listening)
        return listening


class FakeLink:
    """
    Stands in for the agent's connection: records the channels the agent
    opens (with their payloads) and, per channel, what each sends.
    """

    stopped = False
    transport: Any = object()
    #: No link's back-pressure under it (TunnelConnection.linkFlow): output is never held.
    linkFlow = None

    def __init__(self) -> None:
        self.opened: list[tuple[Any, bytes]] = []
        self.sent: dict[Any, list[tuple[Any, ...]]] = defaultdict(list)
        self.adjusted: dict[Any, int] = defaultdict(int)
        self.channelsToRemoteChannel: dict[Any, int] = {}
        self.localChannelID = 10
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def _changed(self) -> None:
        if self._waiters:
            reactor.callLater(0, self._wake)

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            if waiter[0]():
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def when(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        """Fires once C{predicate} holds after something happened (real-reactor tests)."""
        if predicate():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((predicate, d))
        return d

    def attach(self, channel: Any, id: int = 7) -> Any:
        """A channel groundcontrol opened (a session), open now."""
        channel.conn = self
        channel.id = id
        self.channelsToRemoteChannel[channel] = 100 + id
        channel.channelOpen(b"")
        return channel

    def openChannel(self, channel: Any, extra: bytes = b"") -> None:
        channel.id = self.localChannelID
        self.localChannelID += 1
        self.opened.append((channel, extra))
        self._changed()

    def confirm(self, channel: Any, window: int = 1 << 20, maxPacket: int = 32768) -> None:
        """groundcontrol confirms a channel the agent opened."""
        self.channelsToRemoteChannel[channel] = 100 + channel.id
        channel.remoteWindowLeft = window
        channel.remoteMaxPacket = maxPacket
        channel.channelOpen(b"")

    def sendData(self, channel: Any, data: bytes) -> None:
        self.sent[channel].append(("data", bytes(data)))
        self._changed()

    def sendExtendedData(self, channel: Any, dataType: int, data: bytes) -> None:
        self.sent[channel].append(("ext", dataType, bytes(data)))

    def sendRequest(self, channel: Any, requestType: bytes, data: bytes, wantReply: bool = False):
        self.sent[channel].append(("request", requestType, data))
        return defer.succeed(True) if wantReply else None

    def sendEOF(self, channel: Any) -> None:
        self.sent[channel].append(("eof",))
        self._changed()

    def sendClose(self, channel: Any) -> None:
        channel.localClosed = True
        self.sent[channel].append(("close",))
        self._changed()

    def adjustWindow(self, channel: Any, count: int) -> None:
        self.adjusted[channel] += count
        channel.localWindowLeft += count

    def data(self, channel: Any) -> bytes:
        return b"".join(e[1] for e in self.sent[channel] if e[0] == "data")

    def kinds(self, channel: Any) -> list[Any]:
        return [e[0] for e in self.sent[channel]]


def accept(factory: Any, peer: Any) -> tuple[Any, StringTransport]:
    """A connection to a listener, as the reactor would make it."""
    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


class RemoteForwardTests(SynchronousTestCase):
    """tcpip-forward and cancel-tcpip-forward, in memory."""

    def setUp(self) -> None:
        self.reactor = ListeningReactor()
        self.link = FakeLink()
        self.forwarder = RemoteForwarder(self.reactor, self.link)

    def test_loopbackOnly(self) -> None:
        """Whatever address is asked, the listener is on loopback (GatewayPorts no)."""
        for address in (b"", b"localhost", b"127.0.0.1", b"0.0.0.0", b"*", b"192.0.2.7"):
            self.assertTrue(self.forwarder.forward(forwardRequest(address, 8000)), address)
            self.assertEqual(self.reactor.tcpServers[-1][3], "127.0.0.1", address)
        for address in (b"::", b"::1", b"[::1]"):
            self.assertTrue(self.forwarder.forward(forwardRequest(address, 8000)), address)
            self.assertEqual(self.reactor.tcpServers[-1][3], "::1", address)
        self.assertEqual(loopbackFor("example.com"), "127.0.0.1")

    def test_portZeroRepliesWithPort(self) -> None:
        """Port 0 binds a free port and the success reply carries it (RFC 4254 7.1)."""
        result = self.forwarder.forward(forwardRequest(b"localhost", 0))
        self.assertEqual(result, (True, uint32(40000)))
        self.assertIs(self.forwarder.forward(forwardRequest(b"localhost", 8022)), True)

    def test_refusals(self) -> None:
        """A port that cannot be had, a privileged port for non-root, or garbage: failure."""
        self.reactor.busy.add(("127.0.0.1", 8080))
        self.assertFalse(self.forwarder.forward(forwardRequest(b"", 8080)))
        self.assertFalse(self.forwarder.forward(forwardRequest(b"", 80)))
        root = RemoteForwarder(self.reactor, self.link, allowPrivilegedPorts=True)
        self.assertTrue(root.forward(forwardRequest(b"", 80)))
        for garbage in (b"", NS(b"x"), NS(b"x") + uint32(70000), NS(b"\xff") + uint32(1), b"\0\0"):
            self.assertFalse(self.forwarder.forward(garbage), garbage)
        capped = RemoteForwarder(self.reactor, self.link, maxListeners=1)
        self.assertTrue(capped.forward(forwardRequest(b"", 9001)))
        self.assertFalse(capped.forward(forwardRequest(b"", 9002)))

    def test_connectionOpensForwardedTCPIP(self) -> None:
        """
        A connection opens forwarded-tcpip with (address as named, port bound,
        originator, originator port); the socket is not read until the open is
        confirmed; then bytes flow both ways and its close closes the channel.
        """
        self.forwarder.forward(forwardRequest(b"localhost", 0))
        factory = self.reactor.tcpServers[0][1]
        proto, transport = accept(factory, IPv4Address("TCP", "127.0.0.1", 51515))
        [(channel, payload)] = self.link.opened
        self.assertEqual(channel.name, b"forwarded-tcpip")
        self.assertEqual(
            payload, NS(b"localhost") + uint32(40000) + NS(b"127.0.0.1") + uint32(51515)
        )
        self.assertEqual(transport.producerState, "paused")
        self.link.confirm(channel)
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"from the device")
        self.assertEqual(self.link.data(channel), b"from the device")
        channel.localWindowLeft -= 5
        channel.dataReceived(b"hello")
        self.assertEqual(transport.value(), b"hello")
        proto.readConnectionLost()
        proto.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.link.kinds(channel)[-2:], ["eof", "close"])

    def test_flowControl(self) -> None:
        """
        The socket is paused while the operator's window is shut and the output
        queue is full; window credit is held while the socket's buffer is full.
        """
        self.forwarder.forward(forwardRequest(b"", 8000))
        proto, transport = accept(self.reactor.tcpServers[0][1], IPv4Address("TCP", "127.0.0.1", 1))
        channel = self.link.opened[0][0]
        self.link.confirm(channel, window=0)
        channel.highWater = 1000
        proto.dataReceived(b"x" * 2000)
        self.assertEqual(transport.producerState, "paused")
        channel.addWindowBytes(1 << 20)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(self.link.data(channel)), 2000)
        transport.producer.pauseProducing()  # the device-side socket's buffer is full
        channel.localWindowLeft -= channel.localWindowSize // 2
        channel.dataReceived(b"y" * (channel.localWindowSize // 2))
        self.assertEqual(self.link.adjusted[channel], 0)
        transport.producer.resumeProducing()
        self.assertEqual(self.link.adjusted[channel], channel.localWindowSize // 2)

    def test_refusedOpenClosesSocket(self) -> None:
        """If groundcontrol refuses the channel (no such operator), the connection is closed."""
        self.forwarder.forward(forwardRequest(b"", 8000))
        _, transport = accept(self.reactor.tcpServers[0][1], IPv4Address("TCP", "127.0.0.1", 1))
        channel = self.link.opened[0][0]
        channel.openFailed(Failure(Exception("administratively prohibited")).value)
        self.assertTrue(transport.disconnecting)

    def test_cancelClosesListener(self) -> None:
        """cancel-tcpip-forward stops the listener it names (by the port bound); others fail."""
        self.forwarder.forward(forwardRequest(b"localhost", 0))
        self.forwarder.forward(forwardRequest(b"localhost", 8000))
        allocated, fixed = self.reactor.ports
        self.assertFalse(self.forwarder.cancel(forwardRequest(b"localhost", 0)))
        self.assertFalse(self.forwarder.cancel(forwardRequest(b"127.0.0.1", 8000)))
        self.assertTrue(self.forwarder.cancel(forwardRequest(b"localhost", 40000)))
        self.assertTrue(allocated.stopped)
        self.assertFalse(fixed.stopped)
        self.assertFalse(self.forwarder.cancel(forwardRequest(b"localhost", 40000)))
        self.assertFalse(self.forwarder.cancel(b"garbage"))


class _Transport:
    """The SSH transport under an AgentConnection: records packets."""

    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, kind: int, data: bytes) -> None:
        self.packets.append((kind, data))


class _Factory:
    enrollment = None

    def __init__(self, clock: Any) -> None:
        self.clock = clock


class LinkDispatchTests(SynchronousTestCase):
    """AgentConnection passes the global requests on and closes listeners with the link."""

    def test_globalRequestsAndLinkLoss(self) -> None:
        """
        tcpip-forward over the wire is answered with the port bound; the
        listener and its open channels close when the link is lost.
        """
        memory = ListeningReactor()
        conn = AgentConnection(_Factory(memory))  # type: ignore[arg-type]
        conn.transport = _Transport()  # type: ignore[assignment]
        conn.ssh_GLOBAL_REQUEST(NS(b"tcpip-forward") + b"\x01" + forwardRequest(b"", 0))
        self.assertEqual(conn.transport.packets, [(connection.MSG_REQUEST_SUCCESS, uint32(40000))])
        memory.busy.add(("127.0.0.1", 8080))
        conn.ssh_GLOBAL_REQUEST(NS(b"tcpip-forward") + b"\x01" + forwardRequest(b"", 8080))
        conn.ssh_GLOBAL_REQUEST(NS(b"keepalive@openssh.com") + b"\x01")
        self.assertEqual(conn.transport.packets[1][0], connection.MSG_REQUEST_FAILURE)
        self.assertEqual(conn.transport.packets[2][0], connection.MSG_REQUEST_FAILURE)
        _, pending = accept(memory.tcpServers[0][1], IPv4Address("TCP", "127.0.0.1", 1))
        conn.serviceStopped()
        self.assertTrue(memory.ports[0].stopped)
        self.assertTrue(pending.disconnecting, "a channel still opening closes its socket")

    def test_channelOnTheWire(self) -> None:
        """
        Through the real connection code: the accepted connection's
        CHANNEL_OPEN carries the forwarded-tcpip payload; after the
        confirmation its bytes go out as CHANNEL_DATA on the peer's channel.
        """
        memory = ListeningReactor()
        conn = AgentConnection(_Factory(memory))  # type: ignore[arg-type]
        conn.transport = _Transport()  # type: ignore[assignment]
        conn.ssh_GLOBAL_REQUEST(NS(b"tcpip-forward") + b"\x00" + forwardRequest(b"localhost", 0))
        proto, transport = accept(memory.tcpServers[0][1], IPv4Address("TCP", "127.0.0.1", 777))
        kind, body = conn.transport.packets[-1]
        self.assertEqual(kind, connection.MSG_CHANNEL_OPEN)
        name, rest = common.getNS(body)
        localID, window, _ = struct.unpack(">3L", rest[:12])
        self.assertEqual(window, ENDPOINT_WINDOW)
        self.assertEqual(name, b"forwarded-tcpip")
        self.assertEqual(
            rest[12:], NS(b"localhost") + uint32(40000) + NS(b"127.0.0.1") + uint32(777)
        )
        conn.ssh_CHANNEL_OPEN_CONFIRMATION(struct.pack(">4L", localID, 55, 1 << 20, 32768))
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"hi")
        self.assertEqual(
            conn.transport.packets[-1], (connection.MSG_CHANNEL_DATA, uint32(55) + NS(b"hi"))
        )
        conn.serviceStopped()
        self.assertTrue(transport.disconnecting)


class RemoteForwardLoopbackTests(TestCase):
    """A real listener on 127.0.0.1."""

    async def test_realListener(self) -> None:
        """
        "0.0.0.0" port 0 really binds 127.0.0.1 on a free port, reported in the
        reply; a real client's connection opens forwarded-tcpip with its
        address; bytes flow both ways; after cancel, connections are refused.
        """
        link = FakeLink()
        forwarder = RemoteForwarder(reactor, link)
        self.addCleanup(forwarder.stopAll)
        _, reply = forwarder.forward(forwardRequest(b"0.0.0.0", 0))  # type: ignore[misc]
        (port,) = struct.unpack(">L", reply)
        [(key, listening)] = forwarder.listeners.items()
        self.assertEqual(key, (b"0.0.0.0", port))
        self.assertEqual(listening.getHost().host, "127.0.0.1")
        client = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(client.close)
        client.setblocking(False)
        await link.when(lambda: bool(link.opened))
        channel, payload = link.opened[0]
        self.assertEqual(
            payload,
            NS(b"0.0.0.0") + uint32(port) + NS(b"127.0.0.1") + uint32(client.getsockname()[1]),
        )
        link.confirm(channel)
        client.send(b"ping")
        await link.when(lambda: link.data(channel) == b"ping")
        channel.localWindowLeft -= 4
        channel.dataReceived(b"pong")
        received = defer.Deferred()

        def poll() -> None:
            try:
                received.callback(client.recv(10))
            except BlockingIOError:
                reactor.callLater(0.01, poll)

        poll()
        self.assertEqual(await received, b"pong")
        self.assertTrue(forwarder.cancel(forwardRequest(b"0.0.0.0", port)))
        await task.deferLater(reactor, 0, lambda: None)  # the port closes on the next turn
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()
        peerClosed(channel)


class Spawned:
    """One child started through the fake spawner."""

    def __init__(self, call: dict[str, Any], protocol: Any, child: FakeChild) -> None:
        self.call = call
        self.protocol = protocol
        self.child = child


class Spawner:
    """Records every child a session starts (xauth and the session's own)."""

    def __init__(self) -> None:
        self.spawned: list[Spawned] = []

    def __call__(self, reactor, protocol, executable, args, environment, path, uid, gid, terminal):
        child = FakeChild()
        call = dict(
            executable=executable, args=args, environment=environment, path=path, uid=uid, gid=gid
        )
        self.spawned.append(Spawned(call, protocol, child))
        protocol.makeConnection(child)
        return child


class _Session(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ListeningReactor()
        self.link = FakeLink()
        self.spawner = Spawner()
        self.environment = SessionEnvironment(
            home=self.mktemp(), xauthPaths=("/nonexistent/xauth", "/bin/true")
        )
        self.session = self.newSession(self.environment)

    def newSession(self, environment: SessionEnvironment) -> SessionChannel:
        return self.link.attach(
            SessionChannel(
                environment,
                self.reactor,
                spawn=self.spawner,
                remoteWindow=1 << 20,
                remoteMaxPacket=32768,
            )
        )

    def request(self, name: bytes, data: bytes = b"", session: Any = None) -> Any:
        return (session or self.session).requestReceivedWithReply(name, data, True)


class AgentForwardingTests(_Session):
    """auth-agent-req@openssh.com, in memory (the directory is real)."""

    def test_socketDirectoryAndEnvironment(self) -> None:
        """
        The request makes a fresh 0700 directory and listens in it (socket mode
        0600); the child gets SSH_AUTH_SOCK; the session's end removes both.
        """
        self.assertTrue(self.request(b"auth-agent-req@openssh.com"))
        [(path, _, _, mode, _)] = self.reactor.unixServers
        directory = os.path.dirname(path)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(mode, 0o600)
        self.assertTrue(self.request(b"exec", NS(b"ssh-add -l")))
        self.assertEqual(self.spawner.spawned[0].call["environment"]["SSH_AUTH_SOCK"], path)
        peerClosed(self.session)
        self.assertTrue(self.reactor.ports[0].stopped)
        self.assertFalse(os.path.exists(directory))

    def test_connectionOpensAuthAgentChannel(self) -> None:
        """Each connection opens auth-agent@openssh.com with the session's channel id as payload."""
        self.request(b"auth-agent-req@openssh.com")
        self.addCleanup(peerClosed, self.session)
        factory = self.reactor.unixServers[0][1]
        proto, _ = accept(factory, UNIXAddress(None))
        [(channel, payload)] = self.link.opened
        self.assertEqual(channel.name, b"auth-agent@openssh.com")
        self.assertEqual(payload, uint32(self.session.id))
        self.link.confirm(channel)
        proto.dataReceived(b"\0\0\0\x01\x0b")  # SSH2_AGENTC_REQUEST_IDENTITIES
        self.assertEqual(self.link.data(channel), b"\0\0\0\x01\x0b")

    def test_ownedBySessionUser(self) -> None:
        """When the session runs as another user, the directory and socket belong to that user."""
        if os.geteuid() != 0:
            self.skipTest("needs root to give files away")
        nobody = pwd.getpwnam("nobody")
        session = self.newSession(SessionEnvironment(pw=nobody, home="/"))
        self.assertTrue(self.request(b"auth-agent-req@openssh.com", session=session))
        directory = os.path.dirname(self.reactor.unixServers[0][0])
        self.assertEqual(os.stat(directory).st_uid, nobody.pw_uid)
        peerClosed(session)
        self.assertFalse(os.path.exists(directory))

    def test_onlyBeforeTheChildAndOnce(self) -> None:
        """Refused after shell/exec, a second time, or with a payload."""
        self.assertFalse(self.request(b"auth-agent-req@openssh.com", b"junk"))
        self.assertTrue(self.request(b"auth-agent-req@openssh.com"))
        self.assertFalse(self.request(b"auth-agent-req@openssh.com"))
        peerClosed(self.session)
        other = self.newSession(self.environment)
        self.assertTrue(self.request(b"exec", NS(b"true"), session=other))
        self.assertFalse(self.request(b"auth-agent-req@openssh.com", session=other))


class AgentSocketAsRootTests(SynchronousTestCase):
    """
    The agent runs as root and gives the socket and its directory to the session's user:
    nothing it does by path may follow what that user can put there.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()
        os.mkdir(self.root)
        self.reactor = SocketFileReactor()

    def forwarding(self, uid: int | None = None) -> AgentForwarding:
        return AgentForwarding(self.reactor, FakeLink(), 7, uid=uid, gid=uid, tempRoot=self.root)

    def test_socketGivenAwayBeforeItsDirectory(self) -> None:
        """
        The socket is chowned while the directory is still only ours, then the directory,
        neither following a link (the other order let the user swap the socket for a link
        to any file, which root's chown by path then gave them).
        """
        calls: list[tuple[str, int, bool]] = []
        self.patch(
            agentforward.os,
            "chown",
            lambda p, uid, gid, follow_symlinks=True: calls.append((p, uid, follow_symlinks)),
        )
        forwarding = self.forwarding(uid=4242)
        path = forwarding.start()
        self.assertEqual(calls, [(path, 4242, False), (os.path.dirname(path), 4242, False)])

    def test_swappedDirectoryNotFollowed(self) -> None:
        """
        The user moved the directory away and put a link to another directory there: the
        session's end removes nothing through it, and says so.
        """
        forwarding = self.forwarding()
        path = forwarding.start()
        directory = os.path.dirname(path)
        victim = os.path.join(self.root, "victim")
        os.mkdir(victim)
        precious = os.path.join(victim, os.path.basename(path))
        open(precious, "w").close()
        os.rename(directory, directory + ".moved")
        os.symlink(victim, directory)
        events: list[dict[str, Any]] = []
        self.patch(AgentForwarding, "log", Logger(observer=events.append))
        self.successResultOf(forwarding.stop())
        self.assertTrue(os.path.exists(precious))
        self.assertTrue(os.path.islink(directory))
        self.assertEqual([e["log_format"] for e in events], ["could not remove {dir}: {why}"])

    def test_removedAsBefore(self) -> None:
        """Left alone, the socket and its directory go at the session's end."""
        forwarding = self.forwarding()
        directory = os.path.dirname(forwarding.start())
        self.successResultOf(forwarding.stop())
        self.assertFalse(os.path.exists(directory))


class SocketFileReactor(ListeningReactor):
    """Listens in memory, leaving a file where the socket would be (as a real bind does)."""

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        open(address, "w").close()
        return super().listenUNIX(address, factory, backlog, mode, wantPID)


class X11ForwardingTests(_Session):
    """x11-req, in memory: the display, the cookie fed to xauth, the channels."""

    def finishXauth(self, status: int = 0) -> Spawned:
        xauth = self.spawner.spawned[-1]
        self.assertEqual(xauth.call["args"], [b"xauth", b"-q", b"-"])
        xauth.protocol.processEnded(exitStatus(status))
        return xauth

    def test_displayAndCookie(self) -> None:
        """
        x11-req listens on 127.0.0.1:6010 (and ::1), runs xauth as the session
        user with the cookie for unix:10, answers once xauth succeeded, and
        the child gets DISPLAY=localhost:10.SCREEN.
        """
        d = self.request(b"x11-req", x11Request(screen=2))
        self.assertNoResult(d)
        self.assertEqual(
            [(port, interface) for port, _, _, interface in self.reactor.tcpServers],
            [(6010, "127.0.0.1"), (6010, "::1")],
        )
        xauth = self.finishXauth(0)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(xauth.call["executable"], b"/bin/true")
        self.assertEqual(xauth.call["environment"]["HOME"], self.environment.homeDirectory)
        cookie = "0123456789abcdef0123456789abcdef"
        self.assertEqual(
            b"".join(xauth.child.stdin).decode(),
            "remove unix:10\n"
            f"add unix:10 MIT-MAGIC-COOKIE-1 {cookie}\n"
            f"add localhost/unix:10 MIT-MAGIC-COOKIE-1 {cookie}\n",
        )
        self.assertTrue(xauth.child.stdinClosed)
        self.assertTrue(self.request(b"shell"))
        self.assertEqual(self.spawner.spawned[-1].call["environment"]["DISPLAY"], "localhost:10.2")
        peerClosed(self.session)
        self.assertTrue(all(port.stopped for port in self.reactor.ports))

    def test_laterRequestsAndDataWait(self) -> None:
        """
        While xauth runs, the shell request, stdin data and EOF that follow wait:
        the replies go out in order and the data reaches the shell's stdin.
        """
        replies: list[tuple[str, bool]] = []
        self.request(b"x11-req", x11Request()).addCallback(lambda ok: replies.append(("x11", ok)))
        shell = self.request(b"exec", NS(b"cat"))
        shell.addCallback(lambda ok: replies.append(("exec", ok)))
        self.session.localWindowLeft -= 5
        self.session.dataReceived(b"typed")
        self.session.eofReceived()
        self.assertEqual(len(self.spawner.spawned), 1)  # xauth only
        self.finishXauth(0)
        self.assertEqual(replies, [("x11", True), ("exec", True)])
        child = self.spawner.spawned[-1].child
        self.assertEqual(child.stdin, [b"typed"])
        self.assertTrue(child.stdinClosed)

    def test_xauthMissingOrFailing(self) -> None:
        """No xauth on the device refuses x11-req; xauth failing refuses it, freeing the display."""
        missing = self.newSession(SessionEnvironment(xauthPaths=("/nonexistent/xauth",)))
        self.assertFalse(self.request(b"x11-req", x11Request(), session=missing))
        self.assertEqual(self.reactor.tcpServers, [])
        d = self.request(b"x11-req", x11Request())
        self.finishXauth(1)
        self.assertFalse(self.successResultOf(d))
        self.assertTrue(all(port.stopped for port in self.reactor.ports))
        self.assertTrue(self.request(b"exec", NS(b"true")))
        self.assertNotIn("DISPLAY", self.spawner.spawned[-1].call["environment"])

    def test_takenDisplaySkipped(self) -> None:
        """A display taken on 127.0.0.1 or ::1 is skipped for the next one."""
        self.reactor.busy |= {("127.0.0.1", 6010), ("::1", 6011)}
        d = self.request(b"x11-req", x11Request())
        self.finishXauth(0)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.session._x11.number, 12)

    def test_connectionsOpenX11Channels(self) -> None:
        """
        Each connection opens an x11 channel: originator address and port, then
        the session's channel id; with single-connection the display closes after one.
        """
        d = self.request(b"x11-req", x11Request(single=True))
        self.finishXauth(0)
        self.successResultOf(d)
        factory = self.reactor.tcpServers[0][1]
        accept(factory, IPv4Address("TCP", "127.0.0.1", 40404))
        [(channel, payload)] = self.link.opened
        self.assertEqual(channel.name, b"x11")
        self.assertEqual(payload, NS(b"127.0.0.1") + uint32(40404) + uint32(self.session.id))
        self.assertTrue(all(port.stopped for port in self.reactor.ports))

    def test_unsafeRequestsRefused(self) -> None:
        """Refused: a cookie or protocol that could inject xauth lines; x11-req after the child."""
        for data in (
            x11Request(cookie=b"00\nremove *"),
            x11Request(cookie=b"abc"),  # odd length
            b"\x00" + NS(b"MIT MAGIC") + NS(b"00") + uint32(0),
            x11Request() + b"x",
        ):
            self.assertRaises(ValueError, x11.X11Request.parse, data)
            self.assertFalse(self.request(b"x11-req", data))
        self.assertTrue(self.request(b"exec", NS(b"true")))
        self.assertFalse(self.request(b"x11-req", x11Request()))
        self.assertEqual(self.spawner.spawned[-1].call["args"][-1], b"true")


class RealChildTests(TestCase):
    """Real children, a real UNIX socket, the real xauth."""

    def session(self, environment: SessionEnvironment) -> tuple[SessionChannel, FakeLink]:
        link = FakeLink()
        channel = link.attach(
            SessionChannel(environment, reactor, remoteWindow=1 << 20, remoteMaxPacket=32768)
        )
        self.addCleanup(self.close, channel)
        return channel, link

    async def close(self, channel: SessionChannel) -> None:
        """The peer's close, as after the child exits: the session's listeners go."""
        if not channel._gone:
            peerClosed(channel)
        await channel.forwardingStopped

    async def test_agentSocketInChild(self) -> None:
        """
        The child sees SSH_AUTH_SOCK: a socket (0600) in a 0700 directory; a
        connection to it opens auth-agent@openssh.com; both go with the session.
        """
        home = self.mktemp()
        os.mkdir(home)
        channel, link = self.session(SessionEnvironment(home=home))
        self.assertTrue(channel.requestReceivedWithReply(b"auth-agent-req@openssh.com", b"", True))
        script = b'test -S "$SSH_AUTH_SOCK" && stat -c "%a" "$SSH_AUTH_SOCK" "${SSH_AUTH_SOCK%/*}"'
        self.assertTrue(channel.requestReceivedWithReply(b"exec", NS(script), True))
        await link.when(lambda: ("close",) in link.sent[channel])
        self.assertEqual(link.data(channel).split(), [b"600", b"700"])
        path = channel._forwardVariables["SSH_AUTH_SOCK"]
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        await link.when(lambda: bool(link.opened))
        agentChannel, payload = link.opened[0]
        self.assertEqual((agentChannel.name, payload), (b"auth-agent@openssh.com", uint32(7)))
        agentChannel.openFailed(Exception("test over"))
        await self.close(channel)
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    async def test_xauthInstallsCookie(self) -> None:
        """With the real xauth, the child has DISPLAY and its .Xauthority holds the cookie."""
        if shutil.which("xauth") is None:
            self.skipTest("xauth not installed (apt-get install xauth)")
        home = os.path.realpath(self.mktemp())
        os.mkdir(home)
        channel, link = self.session(SessionEnvironment(home=home))
        cookie = b"00112233445566778899aabbccddeeff"
        ok = await channel.requestReceivedWithReply(b"x11-req", x11Request(cookie=cookie), True)
        self.assertTrue(ok)
        script = b'echo "D=$DISPLAY"; xauth list'
        self.assertTrue(channel.requestReceivedWithReply(b"exec", NS(script), True))
        await link.when(lambda: ("close",) in link.sent[channel])
        output = link.data(channel).decode()
        number = channel._forwardVariables["DISPLAY"].split(":")[1].split(".")[0]
        self.assertIn(f"D=localhost:{number}.0", output)
        self.assertEqual(output.count(cookie.decode()), 2, output)
        self.assertIn(f":{number}  MIT-MAGIC-COOKIE-1  {cookie.decode()}", output)
