"""
Tests for the agent's session and direct-tcpip channels (agent.session, agent.forward).

Most tests drive the channels in memory: a recording connection stands in for
the SSH connection and a fake spawner for the child. A few run real children
on the real reactor, because what they prove (a pty's size, a signal's exit,
a shell reading stdin to EOF) only exists in a real process; they wait on
Deferreds, never sleep.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from agent import _process, session
from agent.forward import ForwardChannel
from agent.session import SessionChannel, SessionEnvironment
from tests.ports import closedPort

NS = common.NS

#: The peer's window and packet size in tests that do not test flow control.
WINDOW = {"remoteWindow": 1 << 20, "remoteMaxPacket": 32768}


def uint32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}L", *values)


def ptyReq(term: bytes = b"xterm", cols: int = 80, rows: int = 24, modes: bytes = b"\0") -> bytes:
    return NS(term) + uint32(cols, rows, 0, 0) + NS(modes)


class RecordingConnection:
    """
    Stands in for the SSH connection: records, in order, everything a
    channel sends, and gives window credit back the way Conch does.
    """

    #: No link's back-pressure under it (TunnelConnection.linkFlow): output is never held.
    linkFlow = None

    def __init__(self) -> None:
        self.channelsToRemoteChannel: dict[Any, int] = {}
        self.events: list[tuple[Any, ...]] = []
        self.adjusted = 0
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def attach(self, channel: Any) -> Any:
        channel.conn = self
        channel.id = 0
        self.channelsToRemoteChannel[channel] = 0
        channel.channelOpen(b"")
        return channel

    def _record(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)
        if self._waiters:
            # A real connection never calls back into the channel from
            # sendData; neither may the test code woken by it.
            reactor.callLater(0, self._wake)

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            if waiter[0]():
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def when(self, predicate: Callable[[], bool]) -> defer.Deferred[None]:
        """Fires once C{predicate} holds after something was sent."""
        if predicate():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((predicate, d))
        return d

    def sendData(self, channel: Any, data: bytes) -> None:
        self._record(("data", bytes(data)))

    def sendExtendedData(self, channel: Any, dataType: int, data: bytes) -> None:
        self._record(("ext", dataType, bytes(data)))

    def sendRequest(self, channel: Any, requestType: bytes, data: bytes, wantReply: bool = False):
        self._record(("request", requestType, data))
        return defer.succeed(True) if wantReply else None

    def sendEOF(self, channel: Any) -> None:
        self._record(("eof",))

    def sendClose(self, channel: Any) -> None:
        channel.localClosed = True
        self._record(("close",))

    def adjustWindow(self, channel: Any, count: int) -> None:
        if not channel.localClosed:
            self.adjusted += count
            channel.localWindowLeft += count

    # -- views --

    def stdout(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    def stderr(self) -> bytes:
        return b"".join(e[2] for e in self.events if e[0] == "ext" and e[1] == 1)

    def kinds(self) -> list[Any]:
        return [e[0] if e[0] != "request" else e[1] for e in self.events]

    def isClosed(self) -> bool:
        return ("close",) in self.events


def peerClosed(channel: Any) -> None:
    """The peer closes the channel: what the connection does on CHANNEL_CLOSE."""
    channel.closeReceived()
    channel.remoteClosed = True
    channel.closed()


def deliver(channel: Any, data: bytes) -> None:
    """Channel data arriving as the connection delivers it (window used)."""
    channel.localWindowLeft -= len(data)
    channel.dataReceived(data)


class FakeChild:
    """An in-memory child process transport."""

    pid = 4242
    connected = True

    def __init__(self) -> None:
        self.stdin: list[bytes] = []
        self.stdinClosed = False
        self.paused = False
        self.producer: Any = None
        self.lost = False

    def write(self, data: bytes) -> None:
        self.stdin.append(data)

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def loseConnection(self) -> None:
        self.lost = True

    def fileno(self) -> int:
        return -1


class FakeSpawner:
    """Records how a session would start its child and returns a L{FakeChild}."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.child = FakeChild()

    def __call__(self, reactor, protocol, executable, args, environment, path, uid, gid, terminal):
        self.calls.append(
            dict(
                executable=executable,
                args=args,
                environment=environment,
                path=path,
                terminal=terminal,
            )
        )
        self.protocol = protocol
        protocol.makeConnection(self.child)
        return self.child


def exitStatus(code: int) -> Failure:
    if code == 0:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(code, None, code << 8))


class SessionInMemoryTests(SynchronousTestCase):
    """The session channel's protocol logic, with a fake child."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.conn = RecordingConnection()
        self.environment = SessionEnvironment(home="/nonexistent-home", defaultPath="/bin")
        self.channel = self.conn.attach(
            SessionChannel(
                self.environment,
                self.clock,
                spawn=self.spawner,
                remoteWindow=1 << 20,
                remoteMaxPacket=32768,
            )
        )
        self.signals: list[tuple[int | None, int]] = []
        self.leaderSignalled: list[bool] = []

        def signalGroup(pid: int | None, sig: int, orLeader: bool = True) -> bool:
            self.signals.append((pid, sig))
            self.leaderSignalled.append(orLeader)
            return True

        self.patch(_process, "signalGroup", signalGroup)

    def request(self, name: bytes, data: bytes = b"") -> bool:
        return self.channel.requestReceivedWithReply(name, data, True)

    def test_envFilter(self) -> None:
        """Only LANG and LC_* are accepted (sshd's AcceptEnv); others are refused and unset."""
        self.assertTrue(self.request(b"env", NS(b"LANG") + NS(b"C.UTF-8")))
        self.assertTrue(self.request(b"env", NS(b"LC_ALL") + NS(b"C")))
        self.assertFalse(self.request(b"env", NS(b"LD_PRELOAD") + NS(b"/tmp/evil.so")))
        self.assertFalse(self.request(b"env", NS(b"PATH") + NS(b"/tmp")))
        self.assertTrue(self.request(b"exec", NS(b"true")))
        env = self.spawner.calls[0]["environment"]
        self.assertEqual(env["LANG"], "C.UTF-8")
        self.assertEqual(env["LC_ALL"], "C")
        self.assertEqual(env["PATH"], "/bin")
        self.assertNotIn("LD_PRELOAD", env)
        self.assertNotIn("MAIL", env)
        for name in ("HOME", "USER", "LOGNAME", "SHELL"):
            self.assertIn(name, env)
        self.assertEqual(env["HOME"], "/nonexistent-home")
        self.assertEqual(self.spawner.calls[0]["path"], "/")  # missing home: / like sshd

    def test_execAndShellArgv(self) -> None:
        """exec runs C{shell -c CMD}; shell runs the login shell as a login shell (-bash)."""
        self.assertTrue(self.request(b"exec", NS(b"echo hi")))
        shell = os.fsencode(self.environment.shell)
        base = os.path.basename(shell)
        self.assertEqual(self.spawner.calls[0]["args"], [base, b"-c", b"echo hi"])
        self.assertEqual(self.spawner.calls[0]["executable"], shell)
        self.assertFalse(self.request(b"shell"), "a session has one child")
        other = self.conn.attach(SessionChannel(self.environment, self.clock, spawn=self.spawner))
        self.assertTrue(other.requestReceivedWithReply(b"shell", b"", True))
        self.assertEqual(self.spawner.calls[1]["args"], [b"-" + base])

    def test_garbageRequestsRefused(self) -> None:
        """Malformed, truncated or lying payloads give a failed request, never an exception."""
        garbage = [
            (b"pty-req", b""),
            (b"pty-req", NS(b"xterm") + b"\x00\x00"),
            (b"pty-req", b"\xff\xff\xff\xffxterm"),
            (b"pty-req", NS(b"xterm") + uint32(80, 24, 0, 0) + NS(b"\x01\x00")),
            (b"env", NS(b"LANG")),
            (b"env", NS(b"LANG") + NS(b"\xff\xfe")),
            (b"env", NS(b"LANG") + NS(b"a\0b")),
            (b"exec", b"\x00\x00\x01\x00short"),
            (b"subsystem", b"\x01"),
            (b"subsystem", NS(b"x11-evil")),
            (b"window-change", b"\x00\x01"),
            (b"window-change", uint32(80, 24, 0, 0)),  # no pty
            (b"signal", NS(b"NOTASIGNAL")),
            (b"signal", b""),
            (b"break", uint32(0)),  # no pty
            (b"x11-req", b"whatever"),
            (b"x11-req", b"\x00" + NS(b"MIT-MAGIC-COOKIE-1") + NS(b"abc\nrm -rf") + uint32(0)),
            (b"auth-agent-req@openssh.com", b"junk"),
        ]
        for name, data in garbage:
            self.assertFalse(self.request(name, data), name)
        self.assertEqual(self.spawner.calls, [])
        self.assertTrue(self.request(b"exec", NS(b"true")), "channel still usable")

    def test_stdoutStderrAndExitStatusInOrder(self) -> None:
        """stdout is data, stderr extended data 1; exit-status follows all output; EOF; close."""
        self.request(b"exec", NS(b"x"))
        self.spawner.protocol.childDataReceived(1, b"out")
        self.spawner.protocol.childDataReceived(2, b"err")
        self.spawner.protocol.processEnded(exitStatus(3))
        self.assertEqual(self.conn.stdout(), b"out")
        self.assertEqual(self.conn.stderr(), b"err")
        self.assertEqual(self.conn.kinds(), ["data", "ext", b"exit-status", "eof", "close"])
        self.assertEqual(self.conn.events[2][2], uint32(3))

    def test_startedLineNamesReapedChild(self) -> None:
        """
        A child that exits at once is reaped while its transport is being made (Twisted's
        registerReapProcessHandler), which sets the transport's pid to None before the
        spawn returns: the "started" line still names the pid it was spawned with.
        """
        spawn = self.spawner

        def spawnReaped(*args: Any) -> FakeChild:
            child = spawn(*args)
            child.pid = None  # type: ignore[assignment]
            return child

        self.channel._spawn = spawnReaped
        with capturedLogs() as events:
            self.request(b"exec", NS(b"true"))
        [started] = [e for e in events if e.get("log_format", "").startswith("started")]
        self.assertEqual((started["kind"], started["pid"]), ("exec", 4242))

    def test_closedChannelLetsGoOfItsInputCredit(self) -> None:
        """
        Once the channel is closed, its stdin credit no longer refers back to it: the
        two would otherwise be a reference cycle that keeps the channel, its connection
        and a lost link's transport until the cyclic collector runs.
        """
        self.request(b"exec", NS(b"x"))
        credit = self.channel._credit
        self.assertIn(self.channel, vars(credit).values())
        self.spawner.protocol.processEnded(exitStatus(0))
        peerClosed(self.channel)
        self.assertNotIn(self.channel, vars(credit).values())

    def test_exitSignalPayload(self) -> None:
        """A killed child gives exit-signal: name without SIG, core flag, message, language."""
        self.request(b"exec", NS(b"x"))
        status = signal.SIGSEGV | 0x80  # core dumped
        self.spawner.protocol.processEnded(Failure(ProcessTerminated(None, signal.SIGSEGV, status)))
        self.assertEqual(
            self.conn.events[0],
            ("request", b"exit-signal", NS(b"SEGV") + b"\x01" + NS(b"") + NS(b"")),
        )

    def test_outputPausedUntilWindowOpens(self) -> None:
        """With the remote window exhausted the child is no longer read; window space resumes it."""
        channel = self.conn.attach(
            SessionChannel(
                self.environment,
                self.clock,
                spawn=self.spawner,
                remoteWindow=0,
                remoteMaxPacket=32768,
            )
        )
        channel.highWater = 64 * 1024
        channel.requestReceivedWithReply(b"exec", NS(b"cat big"), True)
        child = self.spawner.child
        for _ in range(3):
            self.spawner.protocol.childDataReceived(1, b"x" * 32768)
        self.assertTrue(child.paused)
        self.assertEqual(self.conn.stdout(), b"")
        channel.addWindowBytes(1 << 20)
        self.assertFalse(child.paused)
        self.assertEqual(len(self.conn.stdout()), 3 * 32768)

    def test_stdinCreditFollowsChild(self) -> None:
        """Window credit is given back only once the child's stdin buffer has drained."""
        channel = self.conn.attach(
            SessionChannel(
                self.environment,
                self.clock,
                spawn=self.spawner,
                localWindow=64 * 1024,
                localMaxPacket=16 * 1024,
            )
        )
        channel.requestReceivedWithReply(b"exec", NS(b"cat"), True)
        child = self.spawner.child
        child.producer.pauseProducing()  # the pipe is full
        deliver(channel, b"a" * 16384)
        deliver(channel, b"b" * 16384)
        self.assertEqual(child.stdin, [b"a" * 16384, b"b" * 16384])
        self.assertEqual(self.conn.adjusted, 0)
        child.producer.resumeProducing()  # the child read it all
        self.assertEqual(self.conn.adjusted, 32768)

    def test_eofClosesStdinWithoutPty(self) -> None:
        """Channel EOF closes the child's stdin (after unregistering the stdin producer)."""
        self.request(b"exec", NS(b"wc -l"))
        self.channel.eofReceived()
        self.assertTrue(self.spawner.child.stdinClosed)
        self.assertIsNone(self.spawner.child.producer)

    def test_eofIgnoredWithPty(self) -> None:
        """With a pty, channel EOF is ignored like sshd; window-change and break are accepted."""
        self.assertTrue(self.request(b"pty-req", ptyReq()))
        terminal = self.channel._terminal
        self.addCleanup(terminal.close)
        self.assertTrue(self.request(b"window-change", uint32(100, 30, 0, 0)))
        self.assertTrue(self.request(b"shell"))
        self.assertEqual(self.spawner.calls[0]["environment"]["TERM"], "xterm")
        self.channel.eofReceived()
        self.assertFalse(self.spawner.child.stdinClosed)

    def test_signalToProcessGroup(self) -> None:
        """A signal request sends the named signal to the child's process group."""
        self.request(b"exec", NS(b"sleep 9"))
        self.assertTrue(self.request(b"signal", NS(b"USR1")))
        self.assertEqual(self.signals, [(4242, signal.SIGUSR1)])

    def test_channelCloseHangsUpChild(self) -> None:
        """
        Closing the channel first closes the child's pipes, SIGTERMs its
        group, and SIGKILLs it if it has not gone after the grace period.
        """
        self.request(b"exec", NS(b"sleep 9"))
        peerClosed(self.channel)
        child = self.spawner.child
        self.assertTrue(child.lost)
        self.assertIsNone(child.producer)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM)])
        self.clock.advance(session.KILL_GRACE)
        self.assertEqual(self.signals[-1], (4242, signal.SIGKILL))

    def test_reapedLeaderNotKilledByNumber(self) -> None:
        """
        A child reaped while another process of its group still holds its output open
        (a background job): the kill after the grace period goes to the group only, not
        to the child's own number, which may be an unrelated process's by then.
        """
        self.request(b"exec", NS(b"sleep 9 & exit 0"))
        peerClosed(self.channel)
        self.spawner.child.pid = None  # type: ignore[assignment]  # reaped by Twisted
        self.clock.advance(session.KILL_GRACE)
        self.assertEqual(self.signals[-1], (4242, signal.SIGKILL))
        self.assertEqual(self.leaderSignalled[-1], False)

    def test_childGoneNoKill(self) -> None:
        """A child that ends after its hang-up is not killed, and nothing more is sent."""
        self.request(b"exec", NS(b"sleep 9"))
        peerClosed(self.channel)
        sent = list(self.conn.events)
        self.spawner.protocol.processEnded(exitStatus(143))
        self.clock.advance(session.KILL_GRACE)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM)])
        self.assertEqual(self.conn.events, sent)

    def test_subsystem(self) -> None:
        """
        sftp runs the first sftp-server that exists; when none exists, the
        agent's own (python -m agent.sftpserver) through the same spawn path.
        """
        missing = SessionEnvironment(sftpServerPaths=("/nonexistent/sftp-server",))
        channel = self.conn.attach(SessionChannel(missing, self.clock, spawn=self.spawner))
        self.assertTrue(channel.requestReceivedWithReply(b"subsystem", NS(b"sftp"), True))
        call = self.spawner.calls[-1]
        self.assertEqual(call["args"][-2:], [b"-m", b"agent.sftpserver"])
        self.assertEqual(call["executable"], os.fsencode(sys.executable))
        self.assertIn("PYTHONPATH", call["environment"])
        present = SessionEnvironment(sftpServerPaths=("/nonexistent/sftp-server", "/bin/true"))
        channel = self.conn.attach(SessionChannel(present, self.clock, spawn=self.spawner))
        self.assertTrue(channel.requestReceivedWithReply(b"subsystem", NS(b"sftp"), True))
        self.assertEqual(self.spawner.calls[-1]["args"], [b"/bin/true"])


class SessionProcessTests(TestCase):
    """Real children on the real reactor: what only a real process can show."""

    def start(self, *requests: tuple[bytes, bytes]) -> tuple[SessionChannel, RecordingConnection]:
        home = self.mktemp()
        os.mkdir(home)
        conn = RecordingConnection()
        channel = conn.attach(SessionChannel(SessionEnvironment(home=home), reactor, **WINDOW))
        self.addCleanup(lambda: peerClosed(channel) if channel.process is not None else None)
        for name, data in requests:
            self.assertTrue(channel.requestReceivedWithReply(name, data, True), name)
        return channel, conn

    async def test_execOutputApartAndExitStatus(self) -> None:
        """A real exec keeps stdout and stderr apart and reports its exit code."""
        _, conn = self.start((b"exec", NS(b"echo out; echo err >&2; exit 3")))
        await conn.when(conn.isClosed)
        self.assertEqual(conn.stdout(), b"out\n")
        self.assertEqual(conn.stderr(), b"err\n")
        self.assertIn(("request", b"exit-status", uint32(3)), conn.events)
        self.assertEqual(conn.kinds()[-3:], [b"exit-status", "eof", "close"])

    async def test_killedCommandExitSignal(self) -> None:
        """A command killed by SIGKILL ends the session with exit-signal KILL."""
        _, conn = self.start((b"exec", NS(b"kill -KILL $$")))
        await conn.when(conn.isClosed)
        self.assertIn(
            ("request", b"exit-signal", NS(b"KILL") + b"\x00" + NS(b"") + NS(b"")), conn.events
        )

    async def test_stdinAndEOF(self) -> None:
        """Channel data reaches the child's stdin and channel EOF ends it: wc -l counts 2."""
        channel, conn = self.start((b"exec", NS(b"wc -l")))
        deliver(channel, b"a\nb\n")
        channel.eofReceived()
        await conn.when(conn.isClosed)
        self.assertEqual(conn.stdout().strip(), b"2")
        self.assertIn(("request", b"exit-status", uint32(0)), conn.events)

    async def test_ptyTermAndWindowSize(self) -> None:
        """On a pty the child sees TERM and the requested size; window-change resizes it."""
        script = b'echo "T=$TERM"; stty size; read x; stty size'
        channel, conn = self.start(
            (b"pty-req", ptyReq(b"xterm-test", cols=100, rows=30)), (b"exec", NS(script))
        )
        await conn.when(lambda: b"30 100" in conn.stdout())
        self.assertIn(b"T=xterm-test", conn.stdout())
        self.assertTrue(
            channel.requestReceivedWithReply(b"window-change", uint32(120, 40, 0, 0), False)
        )
        deliver(channel, b"\n")
        await conn.when(conn.isClosed)
        self.assertIn(b"40 120", conn.stdout())

    async def test_channelCloseKillsChild(self) -> None:
        """When the channel closes first the child is hung up and reaped: no process, no zombie."""
        ended: defer.Deferred[None] = defer.Deferred()
        channel, conn = self.start((b"exec", NS(b"echo started; sleep 1000")))
        original = channel.childEnded
        channel.childEnded = lambda reason: (original(reason), ended.callback(None))  # type: ignore[method-assign]
        await conn.when(lambda: b"started" in conn.stdout())
        pid = channel.process.pid
        peerClosed(channel)
        await ended
        self.assertIsNone(channel.process)
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: not even a zombie is left
        self.assertNotIn("eof", conn.kinds())


def directTCPIP(host: bytes, port: int) -> bytes:
    return NS(host) + uint32(port) + NS(b"192.0.2.1") + uint32(50000)


class ForwardInMemoryTests(SynchronousTestCase):
    """direct-tcpip opens and splices, with an in-memory memory and transport."""

    def test_connectsFirstThenSplices(self) -> None:
        """The open answers only after the TCP connect; bytes then flow both ways."""
        memory = MemoryReactor()
        conn = RecordingConnection()
        d = ForwardChannel.open(
            memory, directTCPIP(b"127.0.0.1", 8080), remoteWindow=1 << 20, remoteMaxPacket=32768
        )
        self.assertNoResult(d)
        host, port, factory, _, _ = memory.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        channel = conn.attach(self.successResultOf(d))
        deliver(channel, b"GET /")
        self.assertEqual(transport.value(), b"GET /")
        proto.dataReceived(b"200 OK")
        self.assertEqual(conn.stdout(), b"200 OK")
        proto.connectionLost(Failure(Exception("done")))
        self.assertEqual(conn.kinds()[-2:], ["eof", "close"])

    def test_pausesSocketWhenOutputPaused(self) -> None:
        """The TCP socket is not read while the channel's output is paused."""
        memory = MemoryReactor()
        conn = RecordingConnection()
        d = ForwardChannel.open(
            memory, directTCPIP(b"127.0.0.1", 8080), remoteWindow=0, remoteMaxPacket=32768
        )
        proto = memory.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        channel = conn.attach(self.successResultOf(d))
        channel.highWater = 1000
        proto.dataReceived(b"x" * 2000)
        self.assertEqual(transport.producerState, "paused")
        channel.addWindowBytes(1 << 20)
        self.assertEqual(transport.producerState, "producing")

    def test_connectFailureRefusesOpen(self) -> None:
        """A failed connect refuses the open with OPEN_CONNECT_FAILED and a reason."""
        memory = MemoryReactor()
        d = ForwardChannel.open(memory, directTCPIP(b"127.0.0.1", 1))
        connector = memory.connectors[0]
        memory.tcpClients[0][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        error = self.failureResultOf(d, ConchError).value
        self.assertEqual(error.args[1], connection.OPEN_CONNECT_FAILED)
        self.assertIn("127.0.0.1 port 1", error.args[0])

    def test_garbageOpenRefused(self) -> None:
        """A malformed direct-tcpip payload or port 0 is refused without connecting."""
        memory = MemoryReactor()
        for data in (
            b"",
            b"\x00\x00\x00\xffx",
            directTCPIP(b"127.0.0.1", 0),
            directTCPIP(b"127.0.0.1", 70000),
        ):
            self.failureResultOf(ForwardChannel.open(memory, data), ConchError)
        self.assertEqual(memory.tcpClients, [])


class ForwardLoopbackTests(TestCase):
    """A real splice to a listening port on 127.0.0.1."""

    async def test_spliceToLocalPort(self) -> None:
        """Bytes and EOF on the channel reach a local TCP server; its answer and close come back."""

        class Upper(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(data.upper())
                self.transport.loseConnection()

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Upper), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        conn = RecordingConnection()
        channel = await ForwardChannel.open(
            reactor, directTCPIP(b"127.0.0.1", port.getHost().port), **WINDOW
        )
        conn.attach(channel)
        deliver(channel, b"hello")
        channel.eofReceived()  # half-close, as ssh -L does when its client is done
        await conn.when(conn.isClosed)
        peerClosed(channel)
        self.assertEqual(conn.stdout(), b"HELLO")
        self.assertEqual(conn.kinds()[-2:], ["eof", "close"])

    async def test_refusedPort(self) -> None:
        """Connecting to a closed loopback port refuses the open."""
        with self.assertRaises(ConchError):
            await ForwardChannel.open(reactor, directTCPIP(b"127.0.0.1", closedPort()))
