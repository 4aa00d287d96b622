"""
In-memory doubles of Access Tunnel's own protocols, shipped for tests (as treq ships
C{treq.testing}).

Everything here runs without a reactor and without sockets: connections are
L{twisted.test.iosim} pumps over L{FakeTransport}s, time is a L{Clock}, and the store
answers synchronously. The pieces:

  - L{Network}: wires any server factory to any client factory in memory and pumps all
    connections until nothing moves; L{Network.cut} drops a connection like a dead link.
  - L{ScriptedSession} / L{scriptedSessions}: the device side of a session channel, acting
    out a L{Script} (output, stderr, exit status, echo, a bounded stream of bytes) instead
    of running a process. L{scriptedSessions} has the C{sessionFactory} signature of
    L{agent.link.AgentLinkFactory}, so the real agent link can serve scripted sessions.
  - L{FakeAgentFactory}: a minimal agent (SSH client logging in as C{agent+NAME}) for
    tests of groundcontrol that should not depend on the agent package.
  - L{FakeOperator} / L{OperatorSession}: a Conch client standing in for an operator's
    ssh; it records what the session receives and can hold its receive window shut.
  - L{InMemoryFleet}: a real groundcontrol front door, store, registry and fleet watcher,
    with helpers to add operators and devices and to connect operators and agents.

This module must not import the agent package: groundcontrol's tests may use the real
agent link (they pass its factory to L{InMemoryFleet.connect}), but groundcontrol itself
never needs it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any, TypeVar, cast

import attrs
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import error
from twisted.conch.ssh import common, connection, keys, transport, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from accesstunnel import policy
from accesstunnel.channel import FlowChannel
from accesstunnel.connection import TunnelConnection
from accesstunnel.keys import fingerprint
from groundcontrol.enrollment import CertificatePolicy
from groundcontrol.fleetwatch import FleetWatcher
from groundcontrol.notify import Notifier
from groundcontrol.relay import RelayChannel
from groundcontrol.sshserver import ServerSettings, buildFrontDoor
from groundcontrol.store import IStore, SQLiteStore, connect, migrate, synchronousRunner

_T = TypeVar("_T")

#: Output is produced in pieces of this size by a streaming L{Script}.
STREAM_CHUNK = 64 * 1024


def newKey() -> keys.Key:
    """A fresh Ed25519 private key."""
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def publicLine(key: keys.Key) -> str:
    """The OpenSSH one-line public key of C{key}."""
    return key.public().toString("OPENSSH").decode("ascii")


def resultNow(d: defer.Deferred[_T]) -> _T:
    """
    The result of a Deferred that has already fired (the synchronous store's answers);
    raise its exception if it failed.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the Deferred has not fired; use a synchronous store runner")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


def openMemoryStore() -> SQLiteStore:
    """A migrated SQLite store in memory, answering synchronously."""
    conn = connect(":memory:")
    migrate(conn)
    return SQLiteStore(conn, synchronousRunner)


class HeldAuditStore:
    """
    A store whose C{audit} writes of the events in C{hold} wait for the test: each one is
    queued in L{held} as C{(event, detail, Deferred)} and reaches the wrapped store only
    on L{release}, or fails on L{fail} (a locked database, a full disk). Everything else
    is the wrapped store's.
    """

    def __init__(self, store: IStore, hold: frozenset[str]) -> None:
        self._store: Any = store
        self.hold = hold
        self.held: list[tuple[str, dict[str, Any], defer.Deferred[Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def interactive(self) -> HeldAuditStore:
        """Held too: the sessions' audit goes through the interactive view."""
        return self

    def audit(
        self, event: str, actor: str | None, device: str | None, detail: Any, now: float
    ) -> defer.Deferred[Any]:
        if event not in self.hold:
            return self._store.audit(event, actor, device, detail, now)
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((event, detail, d))

        def write(_: Any) -> defer.Deferred[Any]:
            return self._store.audit(event, actor, device, detail, now)

        d.addCallback(write)
        return d

    def release(self) -> None:
        """Let the oldest held write reach the store."""
        self.held.pop(0)[2].callback(None)

    def fail(self, error: Exception) -> None:
        """Fail the oldest held write with C{error}."""
        self.held.pop(0)[2].errback(error)


# -- the network -----------------------------------------------------------------------


class Network:
    """Every in-memory connection of a test, pumped together."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self._ports = itertools.count(40000)

    def connect(
        self,
        serverFactory: protocol.Factory,
        clientFactory: protocol.ClientFactory,
        clientHost: str = "127.0.0.1",
    ) -> iosim.IOPump:
        """Connect a new client to the server and pump until both are quiet."""
        if not serverFactory.numPorts:
            serverFactory.doStart()  # what a listening port does first
        serverAddress = IPv4Address("TCP", "127.0.0.1", 22)
        family = IPv6Address if ":" in clientHost else IPv4Address
        clientAddress = family("TCP", clientHost, next(self._ports))
        server = serverFactory.buildProtocol(cast(IAddress, clientAddress))
        client = clientFactory.buildProtocol(cast(IAddress, serverAddress))
        serverIO = iosim.FakeTransport(
            server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress
        )
        clientIO = iosim.FakeTransport(
            client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress
        )
        pump = iosim.connect(server, serverIO, client, clientIO, greet=False, clock=self.clock)
        self.pumps.append(pump)
        self.flush()
        return pump

    def flush(self, limit: int = 100_000) -> None:
        """Move bytes on every connection until none moves."""
        for _ in range(limit):
            moved = False
            for pump in list(self.pumps):
                if pump.pump():
                    moved = True
            if not moved:
                break
        else:
            raise AssertionError("the in-memory network never went quiet")
        self.pumps = [
            p for p in self.pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)
        ]

    def cut(self, pump: iosim.IOPump) -> None:
        """Drop a connection: both ends see it lost; bytes in flight are discarded."""
        pump.clientIO.stream.clear()
        pump.serverIO.stream.clear()
        pump.clientIO.disconnecting = True
        pump.serverIO.disconnecting = True
        pump.clientIO.disconnected = pump.serverIO.disconnected = True
        pump.serverIO.reportDisconnect()
        pump.clientIO.reportDisconnect()
        self.flush()

    def bufferedBytes(self) -> int:
        """Bytes written to in-memory transports and not yet delivered."""
        return sum(
            len(chunk) for p in self.pumps for io in (p.clientIO, p.serverIO) for chunk in io.stream
        )


# -- shared client pieces ----------------------------------------------------------------


class _KeyUserAuth(userauth.SSHUserAuthClient):
    """Public-key authentication with one key, offered once."""

    def __init__(self, user: bytes, instance: Any, key: keys.Key) -> None:
        super().__init__(user, instance)
        self._key = key
        self._offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self._offered:
            return None
        self._offered = True
        return self._key.public()

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self._key)

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None

    def getGenericAnswers(self, name: bytes, instruction: bytes, questions: Any) -> Any:
        return defer.fail(NotImplementedError("keys only"))


class _PinningClientTransport(transport.SSHClientTransport):
    """
    A Conch client transport restricted to the client policy (Conch's client cannot do
    the ML-KEM exchange) that accepts only the factory's expected host key, if any.
    """

    factory: Any

    def connectionMade(self) -> None:
        policy.applyClientPolicy(self)
        super().connectionMade()

    def verifyHostKey(self, hostKey: bytes, fp: bytes) -> defer.Deferred[Any]:
        expected = self.factory.hostKey
        if expected is None or keys.Key.fromString(hostKey) == expected.public():
            return defer.succeed(True)
        return defer.fail(ValueError("unexpected host key"))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.factory.disconnectReason = description.decode("utf-8", "replace")
        super().receiveError(reasonCode, description)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost = True
        super().connectionLost(reason)


# -- the agent side ------------------------------------------------------------------------


@attrs.frozen
class Script:
    """
    What a scripted session does once started (by C{exec}, C{shell} or C{subsystem}).

    It writes C{stdout} and C{stderr}; with C{stream}, it then produces that many bytes of
    output in L{STREAM_CHUNK} pieces, pausing whenever its channel says so. With C{echo} it
    sends back whatever it receives and ends at EOF; otherwise it ends as soon as its
    output is queued, unless C{hold}. Ending sends exit-status C{status}, EOF and close, in
    that order after the output.
    """

    stdout: bytes = b""
    stderr: bytes = b""
    status: int = 0
    stream: int = 0
    echo: bool = False
    hold: bool = False


def echoScript(command: bytes | None) -> Script | None:
    """
    The default script: C{cat} echoes stdin until EOF; C{false} exits 1; C{refuse} is
    refused; anything else prints the command and exits 0.
    """
    if command == b"cat":
        return Script(echo=True)
    if command == b"false":
        return Script(status=1)
    if command == b"refuse":
        return None
    return Script(stdout=(command or b"shell") + b"\n")


class ScriptedSession(FlowChannel):
    """
    The device side of a session channel acting out a L{Script}.

    @ivar requests: every channel request received, as (type, data, wantReply).
    @ivar input: every byte of stdin received.
    @ivar holdInput: while true, received bytes are not credited back (a child that does
        not read its stdin); L{releaseInput} credits them.
    """

    name = b"session"

    def __init__(
        self,
        script: Callable[[bytes | None], Script | None],
        clock: IReactorTime,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._scriptFor = script
        self._clock: Any = clock
        self.script: Script | None = None
        self.requests: list[tuple[bytes, bytes, bool]] = []
        self.input = bytearray()
        self.holdInput = False
        self._held = 0
        self.gotEOF = False
        self.isClosed = False
        self.finished = False
        self._streamLeft = 0
        self._paused = False
        self.produced = 0

    def requestReceivedWithReply(self, requestType: bytes, data: bytes, wantReply: bool) -> bool:
        self.requests.append((requestType, data, wantReply))
        if requestType == b"exec":
            return self._start(common.getNS(data)[0])
        if requestType == b"shell":
            return self._start(None)
        if requestType == b"subsystem":
            return self._start(b"subsystem " + common.getNS(data)[0])
        return requestType in (b"pty-req", b"env", b"window-change", b"signal", b"break")

    def _start(self, command: bytes | None) -> bool:
        if self.script is not None:
            return False
        script = self._scriptFor(command)
        if script is None:
            return False
        self.script = script
        # Like a real child, the script runs after the request has been answered.
        self._clock.callLater(0, self._run, script)
        return True

    def _run(self, script: Script) -> None:
        if self.localClosed:
            return
        self.write(script.stdout)
        if script.stderr:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, script.stderr)
        self._streamLeft = script.stream
        self._produce()
        if not (script.echo or script.hold or self._streamLeft):
            self.finish(script.status)

    def _produce(self) -> None:
        while self._streamLeft and not self._paused and not self.finished:
            n = min(STREAM_CHUNK, self._streamLeft)
            self._streamLeft -= n
            self.produced += n
            self.write(b"x" * n)
        script = self.script
        done = script is not None and script.stream and not self._streamLeft
        if done and script is not None and not (script.hold or script.echo):
            self.finish(script.status)

    def outputPaused(self) -> None:
        self._paused = True

    def outputResumed(self) -> None:
        self._paused = False
        self._produce()

    def dataReceived(self, data: bytes) -> None:
        self.input += data
        if self.script is not None and self.script.echo:
            self.write(data)
        if self.holdInput:
            self._held += len(data)
        else:
            self.consumed(len(data))

    def releaseInput(self) -> None:
        """Credit back everything held and stop holding."""
        self.holdInput = False
        held, self._held = self._held, 0
        self.consumed(held)
        self.flushWindow()

    def eofReceived(self) -> None:
        self.gotEOF = True
        if self.script is not None and self.script.echo:
            self.finish(self.script.status)

    def finish(self, status: int) -> None:
        """End the session: exit-status, EOF and close, after all output."""
        if self.finished:
            return
        self.finished = True
        self.sendRequestInOrder(b"exit-status", struct.pack(">L", status))
        self.writeEOF()
        self.loseConnection()

    def closed(self) -> None:
        super().closed()
        self.isClosed = True


def scriptedSessions(
    script: Callable[[bytes | None], Script | None] = echoScript,
    record: list[ScriptedSession] | None = None,
    clock: IReactorTime | None = None,
) -> Callable[..., ScriptedSession]:
    """
    A session factory with the signature of L{agent.link.AgentLinkFactory}'s
    C{sessionFactory}: every session acts out C{script(command)} and is appended to
    C{record}. Scripts run on C{clock}, by default the clock of the connection's factory.
    """

    def sessionFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> ScriptedSession:
        session = ScriptedSession(
            script,
            clock if clock is not None else conn.factory.clock,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            conn=conn,
        )
        if record is not None:
            record.append(session)
        return session

    return sessionFactory


def refuseForwards(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
    """A forward factory that refuses every direct-tcpip channel."""
    raise error.ConchError("forwarding is not scripted", connection.OPEN_CONNECT_FAILED)


class FakeAgentConnection(TunnelConnection):
    """The agent's ssh-connection: serves scripted sessions on the channels opened to it."""

    def __init__(self, factory: FakeAgentFactory) -> None:
        super().__init__()
        self.factory = factory

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.factory.connection = self

    def channel_session(self, windowSize: int, maxPacket: int, data: bytes) -> Any:
        return self.factory.sessionFactory(self, windowSize, maxPacket, data)

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        return 0


class _FakeAgentTransport(_PinningClientTransport):
    def connectionSecure(self) -> None:
        if self.service is not None:
            return  # a key re-exchange: the running service stays (as accesstunnel.rekey's)
        conn = FakeAgentConnection(self.factory)
        user = f"agent+{self.factory.name}".encode()
        self.requestService(_KeyUserAuth(user, conn, self.factory.deviceKey))


class FakeAgentFactory(protocol.ClientFactory):
    """
    A minimal device agent: logs in as C{agent+NAME} with C{deviceKey} and serves
    scripted sessions. C{connection} is set once the link is authenticated.
    """

    protocol = _FakeAgentTransport

    def __init__(
        self,
        name: str,
        deviceKey: keys.Key,
        sessionFactory: Callable[..., Any] | None = None,
        hostKey: keys.Key | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.name = name
        self.clock: Any = clock if clock is not None else Clock()
        self.deviceKey = deviceKey
        self.sessionFactory = sessionFactory or scriptedSessions()
        self.hostKey = hostKey
        self.connection: FakeAgentConnection | None = None
        self.disconnectReason: str | None = None
        self.lost = False


# -- the operator side ---------------------------------------------------------------------


class OperatorSession(SSHChannel):
    """
    An operator's session channel, recording what it receives.

    @ivar openFailure: the L{error.ConchError} groundcontrol refused the channel with.
    @ivar holdWindow: while true, the receive window is never re-opened (an operator
        whose terminal does not read); L{releaseWindow} opens it again.
    """

    name = b"session"
    conn: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.isOpen = False
        self.openFailure: error.ConchError | None = None
        self.output = bytearray()
        self.stderr = bytearray()
        self.exitStatus: int | None = None
        self.exitSignal: bytes | None = None
        self.gotEOF = False
        self.isClosed = False
        self.holdWindow = False
        #: Everything received, in order: ("data", n), ("stderr", n), ("exit-status", s),
        #: ("eof",), ("close",).
        self.events: list[tuple[Any, ...]] = []

    @property
    def openFailureText(self) -> str:
        """The refusal text, as the operator's ssh prints it."""
        assert self.openFailure is not None
        text = self.openFailure.args[0]
        return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)

    def channelOpen(self, specificData: bytes) -> None:
        self.isOpen = True

    def openFailed(self, reason: Any) -> None:
        self.openFailure = reason

    def dataReceived(self, data: bytes) -> None:
        self.output += data
        self._note("data", len(data))

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.stderr += data
        self._note("stderr", len(data))

    def _note(self, kind: str, n: int) -> None:
        if self.events and self.events[-1][0] == kind:
            self.events[-1] = (kind, self.events[-1][1] + n)
        else:
            self.events.append((kind, n))

    def request_exit_status(self, data: bytes) -> int:
        (self.exitStatus,) = struct.unpack(">L", data[:4])
        self.events.append(("exit-status", self.exitStatus))
        return 1

    def request_exit_signal(self, data: bytes) -> int:
        self.exitSignal = common.getNS(data)[0]
        self.events.append(("exit-signal", self.exitSignal))
        return 1

    def eofReceived(self) -> None:
        self.gotEOF = True
        self.events.append(("eof",))

    def closed(self) -> None:
        self.isClosed = True
        self.events.append(("close",))

    def request(
        self, requestType: bytes, data: bytes = b"", wantReply: bool = True
    ) -> defer.Deferred[Any] | None:
        """Send a channel request; with C{wantReply}, a Deferred of the answer."""
        return self.conn.sendRequest(self, requestType, data, wantReply=wantReply)

    def exec(self, command: bytes, wantReply: bool = True) -> defer.Deferred[Any] | None:
        """Ask for C{command} to be run."""
        return self.request(b"exec", common.NS(command), wantReply)

    def sendEOF(self) -> None:
        """Close stdin."""
        self.conn.sendEOF(self)

    def releaseWindow(self) -> None:
        """Stop holding the window and give back all of it."""
        self.holdWindow = False
        missing = self.localWindowSize - self.localWindowLeft
        if missing:
            self.conn.adjustWindow(self, missing)


class OperatorConnection(connection.SSHConnection):
    """Conch's own ssh-connection, except that it honours L{OperatorSession.holdWindow}."""

    def __init__(self, factory: FakeOperator) -> None:
        super().__init__()
        self.factory = factory

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.factory.connection = self

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        if getattr(channel, "holdWindow", False):
            return
        super().adjustWindow(channel, bytesToAdd)


class _OperatorTransport(_PinningClientTransport):
    def connectionSecure(self) -> None:
        if self.service is not None:
            return  # a key re-exchange: the running service stays (as accesstunnel.rekey's)
        conn = OperatorConnection(self.factory)
        self.requestService(_KeyUserAuth(self.factory.username.encode(), conn, self.factory.key))


class FakeOperator(protocol.ClientFactory):
    """
    An operator's ssh client, logging in as C{username} with C{key}.
    C{connection} is set once logged in.
    """

    protocol = _OperatorTransport

    def __init__(self, username: str, key: keys.Key, hostKey: keys.Key | None = None) -> None:
        self.username = username
        self.key = key
        self.hostKey = hostKey
        self.connection: OperatorConnection | None = None
        self.disconnectReason: str | None = None
        self.lost = False

    def openSession(self, localWindow: int = 0, channelType: bytes = b"session") -> OperatorSession:
        """Open a session channel (flush the network to have it answered)."""
        if self.connection is None:
            raise RuntimeError(f"operator {self.username} is not logged in")
        session = OperatorSession(localWindow=localWindow, conn=self.connection)
        session.name = channelType
        self.connection.openChannel(session)
        return session


# -- a whole groundcontrol ---------------------------------------------------------------


class InMemoryFleet:
    """
    A real groundcontrol (front door, registry, router, relay, fleet watcher) over an
    in-memory store, reached through an in-memory L{Network}.

    With C{certificates} approved agents are issued fleet certificates over their link;
    C{notifier} receives the fleet events the watcher sees (a log notifier by default).
    """

    def __init__(
        self,
        store: IStore | None = None,
        clock: Clock | None = None,
        hostKey: keys.Key | None = None,
        settings: ServerSettings | None = None,
        certificates: CertificatePolicy | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.clock: Any = clock if clock is not None else Clock()
        self.store: Any = store if store is not None else openMemoryStore()
        self.hostKey = hostKey if hostKey is not None else newKey()
        self.factory, self.registry = buildFrontDoor(
            self.store, self.hostKey, self.clock, settings, certificates=certificates
        )
        self.watcher = FleetWatcher(self.store, self.registry, self.clock, notifier=notifier)
        resultNow(self.watcher.poll())  # start the audit feed at "now"
        self.network = Network(self.clock)

    @property
    def now(self) -> float:
        return self.clock.seconds()

    def flush(self) -> None:
        """Pump every connection until nothing moves."""
        self.network.flush()

    def connect(self, clientFactory: protocol.ClientFactory) -> iosim.IOPump:
        """Connect any client (an agent link factory, a L{FakeOperator}) to groundcontrol."""
        return self.network.connect(self.factory, clientFactory)

    # -- fleet state --

    def addOperator(self, name: str, admin: bool = False) -> keys.Key:
        """Create an operator account and return its key."""
        key = newKey()
        resultNow(self.store.addAccount(name, [publicLine(key)], admin, self.now))
        return key

    def enrollDevice(self, name: str, key: keys.Key | None = None) -> keys.Key:
        """Create an approved device with C{key} (a new one by default) and return the key."""
        key = key if key is not None else newKey()
        line = publicLine(key)
        resultNow(self.store.recordContact(name, line, fingerprint(line), None, "test", self.now))
        resultNow(self.store.approveDevice(name, "test", self.now))
        return key

    def grant(self, account: str, device: str) -> None:
        resultNow(self.store.grant(account, device, "test", self.now))

    def pollFleet(self) -> None:
        """Let the fleet watcher apply what changed in the store."""
        resultNow(self.watcher.poll())

    # -- peers --

    def agent(
        self,
        name: str,
        key: keys.Key,
        sessionFactory: Callable[..., Any] | None = None,
    ) -> tuple[FakeAgentFactory, iosim.IOPump]:
        """Connect a L{FakeAgentFactory} for device C{name}."""
        factory = FakeAgentFactory(name, key, sessionFactory, self.hostKey, self.clock)
        return factory, self.connect(factory)

    def operator(self, username: str, key: keys.Key) -> FakeOperator:
        """Connect and log in an operator as C{username}."""
        operator = FakeOperator(username, key, hostKey=self.hostKey)
        self.connect(operator)
        return operator

    def session(self, operator: FakeOperator, localWindow: int = 0) -> OperatorSession:
        """Open a session for C{operator} and let groundcontrol answer it."""
        session = operator.openSession(localWindow)
        self.flush()
        return session

    # -- measurements --

    def relayChannels(self) -> list[RelayChannel]:
        """Every relay channel open in groundcontrol now."""
        found = []
        for pump in self.network.pumps:
            sshTransport = pump.server
            conn = getattr(sshTransport, "service", None)
            for channel in getattr(conn, "channels", {}).values():
                if isinstance(channel, RelayChannel):
                    found.append(channel)
        return found

    def bufferedInGroundControl(self) -> int:
        """Bytes groundcontrol holds: relay queues plus undelivered transport output."""
        queued = sum(c.queuedBytes for c in self.relayChannels())
        undelivered = sum(len(chunk) for p in self.network.pumps for chunk in p.serverIO.stream)
        return queued + undelivered


__all__ = [
    "STREAM_CHUNK",
    "FakeAgentConnection",
    "FakeAgentFactory",
    "FakeOperator",
    "HeldAuditStore",
    "InMemoryFleet",
    "Network",
    "OperatorConnection",
    "OperatorSession",
    "Script",
    "ScriptedSession",
    "echoScript",
    "newKey",
    "openMemoryStore",
    "publicLine",
    "refuseForwards",
    "resultNow",
    "scriptedSessions",
]
