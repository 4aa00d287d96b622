"""
The device side of an SSH "session" channel: a pty, a login shell, an exec, a subsystem.

groundcontrol passes the operator's channel requests through unchanged, so this
module is where Access Tunnel must behave like sshd's session handling: the
same environment, argv, exit-status/exit-signal, EOF and hang-up rules, so
that ssh, scp, sftp and rsync all work as they do against sshd.

Flow control runs end to end: the receive window re-opens only as the child's
stdin accepts bytes (L{agent._flow.EndpointChannel}), and the child is no longer
read while the channel's output queue is over its high-water mark.

While the link to groundcontrol is backlogged, a pipe child's output is read
when the link serves its channel, not when the pipe turns readable (the pull,
L{SessionChannel.childOutput}): read, sealed and sent in one go while the bytes
are in cache, so the agent holds about one read per channel the link is
serving rather than a queue per channel. With 100 bulk sessions every readable
pipe was read into a queue, 75 MiB in all against a 1 MiB L2 per core, and the
same copies and seals ran on cold data (bench/RESULTS.md, "100 sessions
(session 9)"). The child's stdout leaves the reactor once per backlog, not at
each link pause, and returns to it when the link serves the channel and the
pipe is empty: the link has caught up, and output that comes later (a reply, a
prompt) goes at once.

Agent forwarding (C{auth-agent-req@openssh.com}, L{agent.agentforward}) and
X11 forwarding (C{x11-req}, L{agent.x11}) are set up here too, before the
child starts. Requests are answered strictly in order: one that takes time
(installing the X11 cookie runs xauth) holds the requests and channel data
that come after it until it is answered.

The sftp subsystem runs the device's sftp-server; a device without one gets
the agent's own (L{agent.sftpserver}), started through the same spawn path so
that it has the session user's file access.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import pwd
import signal
import struct
import sys
import termios
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from attrs import evolve, field, frozen
from twisted.conch.ssh import common, connection
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from agent import _process
from agent._flow import EndpointChannel

if TYPE_CHECKING:
    from accesstunnel.connection import TunnelConnection

DEFAULT_SFTP_SERVER_PATHS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
)
DEFAULT_XAUTH_PATHS = ("/usr/bin/xauth", "/usr/X11R6/bin/xauth", "/usr/local/bin/xauth")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Seconds a child may take to go after its hang-up before it is killed.
KILL_GRACE = 10.0


class BadRequestError(ValueError):
    """A channel request payload that does not parse."""


class _Payload:
    """
    Strict reader of SSH wire-format fields. Conch's C{getNS} silently
    returns a short string when the length prefix lies; we refuse instead.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data

    def string(self) -> bytes:
        if len(self._data) < 4:
            raise BadRequestError("truncated string length")
        (length,) = struct.unpack(">L", self._data[:4])
        if len(self._data) < 4 + length:
            raise BadRequestError("truncated string")
        value, self._data = common.getNS(self._data)
        return value

    def text(self) -> str:
        """A string field that must be UTF-8 with no NUL (it goes into execve)."""
        try:
            value = self.string().decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequestError("not UTF-8") from e
        if "\0" in value:
            raise BadRequestError("NUL in string")
        return value

    def uint32(self) -> int:
        if len(self._data) < 4:
            raise BadRequestError("truncated uint32")
        (value,) = struct.unpack(">L", self._data[:4])
        self._data = self._data[4:]
        return value

    def rest(self) -> bytes:
        """Everything not read yet."""
        data, self._data = self._data, b""
        return data

    def end(self) -> None:
        """Refuse trailing bytes."""
        if self._data:
            raise BadRequestError("trailing bytes")


def _hostAndPort(payload: _Payload) -> tuple[str, int]:
    """An IP address and a port: what goes into SSH_CONNECTION must be nothing else."""
    host = ipaddress.ip_address(payload.text())  # ValueError: refused
    port = payload.uint32()
    if port > 0xFFFF:
        raise BadRequestError("port out of range")
    return str(host), port


def _defaultUser() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


@frozen
class SessionEnvironment:
    """
    Who a session runs as and where: the login user, an optional C{HOME}
    override (the benchmark points it at an empty directory so a heavy
    C{.bashrc} does not skew timings), where sftp-server and xauth may live,
    the C{PATH} a session starts with, and where the forwarded-agent socket's
    directory is made (C{None}: the temporary directory, C{/tmp}).
    """

    pw: pwd.struct_passwd = field(factory=_defaultUser)
    home: str | None = None
    sftpServerPaths: tuple[str, ...] = DEFAULT_SFTP_SERVER_PATHS
    defaultPath: str = DEFAULT_PATH
    xauthPaths: tuple[str, ...] = DEFAULT_XAUTH_PATHS
    agentSocketRoot: str | None = None

    @property
    def homeDirectory(self) -> str:
        return self.home or self.pw.pw_dir or "/"

    @property
    def shell(self) -> str:
        return self.pw.pw_shell or "/bin/sh"

    def workingDirectory(self) -> str:
        """Home, or C{/} like sshd when home does not exist."""
        home = self.homeDirectory
        return home if os.path.isdir(home) else "/"

    def credentials(self) -> tuple[int | None, int | None]:
        """The uid/gid to switch to, or C{None}s to stay who the agent is."""
        if self.pw.pw_uid == os.geteuid():
            return None, None
        return self.pw.pw_uid, self.pw.pw_gid

    def variables(self) -> dict[str, str]:
        """The environment sshd gives every session (no MAIL)."""
        return {
            "HOME": self.homeDirectory,
            "USER": self.pw.pw_name,
            "LOGNAME": self.pw.pw_name,
            "SHELL": self.shell,
            "PATH": self.defaultPath,
        }

    def sftpServer(self) -> str | None:
        """The first sftp-server that exists here."""
        return _firstExecutable(self.sftpServerPaths)

    def xauth(self) -> str | None:
        """The first xauth that exists here."""
        return _firstExecutable(self.xauthPaths)


def _firstExecutable(paths: tuple[str, ...]) -> str | None:
    for path in paths:
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def builtinSftpServer() -> tuple[str, list[str], dict[str, str]]:
    """
    How to start the agent's own SFTP server: executable, argv and the
    environment it needs on top of the session's. This Python runs it;
    C{PYTHONPATH} finds this copy of the agent, and C{-P} keeps the session
    user's working directory off C{sys.path}.
    """
    import agent

    root = os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__)))
    return (
        sys.executable,
        [sys.executable, "-P", "-m", "agent.sftpserver"],
        {"PYTHONPATH": root},
    )


def acceptedVariable(name: str) -> bool:
    """sshd's usual C{AcceptEnv LANG LC_*}."""
    return (name == "LANG" or name.startswith("LC_")) and "=" not in name


class _ChildProtocol(ProcessProtocol):
    """Passes a child's output and end to its L{SessionChannel}."""

    #: The child's pid as spawned: Twisted sets the process's own C{pid} to None when it
    #: reaps it, which for a very short-lived child is before the spawn has returned.
    pid: int | None = None

    def __init__(self, channel: SessionChannel) -> None:
        self._channel = channel
        #: Where a pty child's output goes, what childDataReceived(1, ...) does
        #: (agent._process hands a keystroke's echo straight to it).
        self.ptyOutput = channel.write

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._channel.writeExtended(connection.EXTENDED_DATA_STDERR, data)
        else:
            self._channel.childOutput(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            self._channel.stdinLost()

    def processExited(self, reason: Failure) -> None:
        self._channel.childExited()

    def processEnded(self, reason: Failure) -> None:
        self._channel.childEnded(reason)


class SessionChannel(EndpointChannel):
    """
    An SSH session served by a child process on the device.

    The agent's connection creates one from C{channel_session}::

        SessionChannel(environment, reactor, remoteWindow=windowSize,
                       remoteMaxPacket=maxPacket, conn=self)
    """

    name = b"session"
    log = Logger()

    #: The agent's connection (C{conn=}), whose C{linkFlow} is the link's back-pressure.
    conn: TunnelConnection

    #: The channel requests a session answers, each with the method that does.
    #: By name, looked up per request: a table of bound methods on the instance
    #: would be a reference cycle, and with it the channel, its connection and
    #: a lost link's transport would wait for the cyclic collector.
    _requestHandlers: ClassVar[dict[bytes, str]] = {
        b"pty-req": "_ptyRequest",
        b"env": "_envRequest",
        b"shell": "_shellRequest",
        b"exec": "_execRequest",
        b"subsystem": "_subsystemRequest",
        b"window-change": "_windowChangeRequest",
        b"signal": "_signalRequest",
        b"break": "_breakRequest",
        b"eow@openssh.com": "_endOfWriteRequest",
        b"auth-agent-req@openssh.com": "_agentRequest",
        b"x11-req": "_x11Request",
        b"login-user@accesstunnel": "_loginUserRequest",
        b"client-address@accesstunnel": "_clientAddressRequest",
    }

    def __init__(
        self,
        environment: SessionEnvironment,
        reactor: Any,
        *args: Any,
        spawn: _process.Spawner = _process.spawn,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.environment = environment
        self.reactor = reactor
        self._spawn = spawn
        self._variables: dict[str, str] = {}
        self._terminal: _process.Terminal | None = None
        #: The child's L{IProcessTransport} while it runs.
        self.process: Any = None
        #: The child is an L{_process.OutputPull}: its own C{holdOutput} says whether
        #: its stdout is held while the link is backlogged (a pipe's is, a pty's never).
        self._childPull = False
        self._started = False
        self._stdinOpen = False
        self._eofPending = False
        self._killTimer: Any = None  # IDelayedCall
        self._gone = False
        #: The child's stdout is out of the reactor (held), read by this channel
        #: when the link serves it (L{drainQueue}) until the pipe is empty.
        self._outputHeld = False
        #: A pty child's output is no longer read: the operator takes no more
        #: (L{_endOfWriteRequest}), until the child exits (L{childExited}).
        self._ptyOutputStopped = False
        #: A login user was set (L{_loginUserRequest}): groundcontrol asks once, first; a
        #: second request is never groundcontrol's and is refused.
        self._loginUserChosen = False
        #: Variables the forwardings add to the child's environment.
        self._forwardVariables: dict[str, str] = {}
        #: SSH_CLIENT and SSH_CONNECTION, as groundcontrol saw the operator's connection.
        self._connectionVariables: dict[str, str] = {}
        self._agentForwarding: Any = None  # agentforward.AgentForwarding
        self._x11: Any = None  # x11.X11Forwarding
        self.forwardingStopped: defer.Deferred[Any] = defer.succeed(None)
        #: An earlier request is still being answered; what came after waits here.
        self._answering = False
        self._waiting: deque[tuple[Any, ...]] = deque()

    # -- requests ----------------------------------------------------------

    def requestReceivedWithReply(
        self, requestType: bytes, data: bytes, wantReply: bool
    ) -> bool | defer.Deferred[bool]:
        """
        Answer a channel request. A malformed or refused request is a failed
        request, never an exception: one bad packet must not hurt the link.

        While an earlier request is still being answered, this one waits
        (and its answer is a Deferred), so that requests take effect and are
        answered in the order they came.
        """
        if self._answering:
            waiting: defer.Deferred[bool] = defer.Deferred()
            self._waiting.append(("request", requestType, data, waiting))
            return waiting
        return self._answer(requestType, data)

    def _answer(self, requestType: bytes, data: bytes) -> bool | defer.Deferred[bool]:
        handlerName = self._requestHandlers.get(requestType)
        if handlerName is None:
            self.log.info("refused channel request {type!r}", type=requestType)
            return False
        handler: Callable[[_Payload], Any] = getattr(self, handlerName)
        try:
            result = handler(_Payload(data))
        except ValueError as e:
            self.log.warn("malformed {type!r} request: {why}", type=requestType, why=str(e))
            return False
        except Exception:
            self.log.failure("{type!r} request failed", type=requestType)
            return False
        if not isinstance(result, defer.Deferred):
            return bool(result)
        self._answering = True
        answer: defer.Deferred[bool] = defer.Deferred()

        def failed(reason: Failure) -> bool:
            self.log.failure("{type!r} request failed", reason, type=requestType)
            return False

        def answered(ok: bool) -> None:
            # The connection sends this reply now, before anything that
            # waited behind this request is looked at.
            answer.callback(bool(ok))
            self._answering = False
            self._takeWaiting()

        result.addErrback(failed).addCallback(answered)
        return answer

    def _takeWaiting(self) -> None:
        """Handle, in order, what arrived while a request was being answered."""
        while self._waiting and not self._answering:
            item = self._waiting.popleft()
            if item[0] == "request":
                _, requestType, data, waiting = item
                if self._gone:
                    waiting.callback(False)
                    continue
                result = self._answer(requestType, data)
                if isinstance(result, defer.Deferred):
                    result.chainDeferred(waiting)
                else:
                    waiting.callback(result)
            elif item[0] == "data":
                self.dataReceived(item[1])  # delivered: nothing is being answered
            else:
                self._eof()

    def requestReceived(self, requestType: bytes, data: bytes) -> Any:
        return self.requestReceivedWithReply(requestType, data, True)

    def _ptyRequest(self, payload: _Payload) -> bool:
        term = payload.text()
        cols, rows, xpixel, ypixel = (payload.uint32() for _ in range(4))
        modes = _process.parseModes(payload.string())
        if self._started or self._terminal is not None:
            return False
        self._terminal = _process.Terminal.open(term, (rows, cols, xpixel, ypixel), modes)
        self.log.info(
            "pty {tty} {cols}x{rows} {term!r}",
            tty=self._terminal.name,
            cols=cols,
            rows=rows,
            term=term,
        )
        return True

    def _envRequest(self, payload: _Payload) -> bool:
        name, value = payload.text(), payload.text()
        if self._started or not acceptedVariable(name):
            self.log.info("refused environment variable {name!r}", name=name)
            return False
        self._variables[name] = value
        return True

    def _shellRequest(self, payload: _Payload) -> bool:
        shell = self.environment.shell
        return self._start(shell, ["-" + os.path.basename(shell)], "shell")

    def _execRequest(self, payload: _Payload) -> bool:
        command = payload.string()
        shell = self.environment.shell
        return self._start(shell, [os.path.basename(shell), "-c", command], "exec")

    def _subsystemRequest(self, payload: _Payload) -> bool:
        name = payload.string()
        if name != b"sftp":
            self.log.info("refused subsystem {name!r}", name=name)
            return False
        server = self.environment.sftpServer()
        if server is None:
            executable, argv, variables = builtinSftpServer()
            return self._start(executable, argv, "sftp (built in)", variables)
        return self._start(server, [server], "sftp")

    def _agentRequest(self, payload: _Payload) -> bool:
        """
        ssh -A: a private socket for C{SSH_AUTH_SOCK}; its connections become
        C{auth-agent@openssh.com} channels (L{agent.agentforward}).
        """
        from agent.agentforward import AgentForwarding

        payload.end()
        if (
            self._started
            or self._agentForwarding is not None
            or self.localClosed
            or self.id is None
        ):
            return False
        uid, gid = self.environment.credentials()
        forwarding = AgentForwarding(
            self.reactor,
            self.conn,
            self.id,
            uid,
            gid,
            tempRoot=self.environment.agentSocketRoot,
        )
        try:
            path = forwarding.start()
        except (OSError, CannotListenError) as e:
            self.log.warn("agent forwarding failed: {why}", why=e)
            return False
        self._agentForwarding = forwarding
        self._forwardVariables["SSH_AUTH_SOCK"] = path
        return True

    def _x11Request(self, payload: _Payload) -> bool | defer.Deferred[bool]:
        """
        ssh -X: a display on loopback whose connections become C{x11}
        channels, and the cookie installed with xauth (L{agent.x11}). The
        answer waits for xauth.
        """
        from agent import x11

        request = x11.X11Request.parse(payload.rest())
        if self._started or self._x11 is not None or self.localClosed or self.id is None:
            return False
        xauth = self.environment.xauth()
        if xauth is None:
            self.log.warn(
                "refused X11 forwarding: no xauth in {paths}", paths=self.environment.xauthPaths
            )
            return False
        forwarding = x11.X11Forwarding(self.reactor, self.conn, self.id, request)
        try:
            forwarding.listen()
        except CannotListenError as e:
            self.log.warn("refused X11 forwarding: no free display ({why})", why=e)
            return False
        self._x11 = forwarding
        uid, gid = self.environment.credentials()
        installed = x11.installCookie(
            self._spawn,
            self.reactor,
            xauth,
            forwarding.xauthInput(),
            self._environmentFor(),
            self.environment.workingDirectory(),
            uid,
            gid,
        )

        def done(ok: bool) -> bool:
            if ok and not self._gone:
                self._forwardVariables["DISPLAY"] = forwarding.display
                return True
            if self._x11 is forwarding:
                forwarding.stop()
                self._x11 = None
            return False

        return installed.addCallback(done)

    def _clientAddressRequest(self, payload: _Payload) -> bool:
        """
        groundcontrol says where the operator's connection came from and where it
        arrived (address and port of each), before any of the operator's requests:
        the child gets SSH_CLIENT and SSH_CONNECTION as under sshd. Scripts read them,
        and bash reads ~/.bashrc for a command run over ssh only when SSH_CLIENT is set.
        """
        clientHost, clientPort = _hostAndPort(payload)
        serverHost, serverPort = _hostAndPort(payload)
        payload.end()
        if self._started:
            return False
        self._connectionVariables = {
            "SSH_CLIENT": f"{clientHost} {clientPort} {serverPort}",
            "SSH_CONNECTION": f"{clientHost} {clientPort} {serverHost} {serverPort}",
        }
        return True

    def _loginUserRequest(self, payload: _Payload) -> bool:
        """
        groundcontrol says whom this session runs as (the operator's grant names a login
        user); it asks before passing on any of the operator's requests. Only an agent
        running as root can become another user; an unknown user, a session already set
        up, or a second login user (never groundcontrol's: it refuses the operator's own
        requests in its namespace, L{groundcontrol.relay}) is refused (and groundcontrol
        then refuses the operator's session).
        """
        user = payload.text()
        payload.end()
        if (
            self._started
            or self._terminal is not None
            or self._forwardVariables
            or self._loginUserChosen
        ):
            return False
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            self.log.warn("refused login user {user!r}: no such user", user=user)
            return False
        if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
            self.log.warn("refused login user {user!r}: the agent is not root", user=user)
            return False
        self.environment = evolve(self.environment, pw=pw, home=None)
        self._loginUserChosen = True
        self.log.info("session runs as {user}", user=user)
        return True

    def _windowChangeRequest(self, payload: _Payload) -> bool:
        cols, rows, xpixel, ypixel = (payload.uint32() for _ in range(4))
        fd = self._terminalFD()
        if fd is None:
            return False
        fcntl.ioctl(fd, termios.TIOCSWINSZ, _process.packWinsize(rows, cols, xpixel, ypixel))
        return True

    def _signalRequest(self, payload: _Payload) -> bool:
        name = payload.text()
        number = _process.SIGNALS.get(name)
        if number is None or self.process is None:
            return False
        self.log.info("signal {name} to session child", name=name)
        return _process.signalGroup(self.process.pid, number)

    def _breakRequest(self, payload: _Payload) -> bool:
        """
        A BREAK on a pty: a Linux pty ignores C{tcsendbreak}, so do what the
        line discipline does with a break: SIGINT to the foreground process
        group when BRKINT is set, a NUL byte otherwise, nothing with IGNBRK.
        """
        payload.uint32()  # break length in ms: meaningless on a pty
        fd = self._terminalFD()
        if fd is None:
            return False
        iflag = termios.tcgetattr(fd)[0]
        if iflag & termios.IGNBRK:
            return True
        if iflag & termios.BRKINT:
            return _process.signalGroup(os.tcgetpgrp(fd), signal.SIGINT)
        os.write(fd, b"\0")
        return True

    def _endOfWriteRequest(self, payload: _Payload) -> bool:
        """
        The operator's ssh takes no more output: its own standard output closed
        (C{ssh dev_x@gc yes | head -1}), and it drops what still comes. As sshd does
        (nchan.c, C{chan_rcvd_eow}), a pipe child's stdout is closed here, so that its
        next write ends it with SIGPIPE (EPIPE where it ignores the signal) instead of
        its output crossing the link for nothing until the operator presses ^C. A pty
        is the child's stdin too, so it is not closed, only no longer read (sshd closes
        its own copy of it): the child blocks once the pty's buffer is full, as under
        sshd, until the operator's ^C or leaving ends it; once it has exited the pty is
        read again to its end (L{childExited}), which is how that end is seen.
        """
        payload.end()
        child = self.process
        if child is None or child.pid is None:
            return False  # no child, or it has exited and its output is read to its end
        if self._terminal is None:
            self.log.info("the operator takes no more output: closing the session child's stdout")
            child.closeStdout()
        else:
            self.log.info("the operator takes no more output: no longer reading the session's pty")
            self._ptyOutputStopped = True
            child.pauseProducing()
        return True

    def _terminalFD(self) -> int | None:
        """The pty master while it is open, else C{None}."""
        if self._terminal is None:
            return None
        if self.process is None:
            return None if self._started else self._terminal.master
        if not getattr(self.process, "connected", True):
            return None  # Twisted has closed the master; its number may be reused
        fd: int = self.process.fileno()  # type: ignore[attr-defined]
        return fd

    # -- the child -----------------------------------------------------------

    def _environmentFor(self) -> dict[str, str]:
        variables = self.environment.variables()
        if self._terminal is not None:
            variables["TERM"] = self._terminal.term
            variables["SSH_TTY"] = self._terminal.name
        variables.update(self._connectionVariables)
        variables.update(self._forwardVariables)
        variables.update(self._variables)
        return variables

    def _start(
        self,
        executable: str,
        args: list[Any],
        kind: str,
        extraVariables: dict[str, str] | None = None,
    ) -> bool:
        """Start the one child this session may have."""
        if self._started or self.localClosed:
            return False
        uid, gid = self.environment.credentials()
        argv = [os.fsencode(a) if isinstance(a, str) else a for a in args]
        environment = self._environmentFor()
        environment.update(extraVariables or {})
        protocol = _ChildProtocol(self)
        try:
            child = self._spawn(
                self.reactor,
                protocol,
                os.fsencode(executable),
                argv,
                environment,
                self.environment.workingDirectory(),
                uid,
                gid,
                self._terminal,
            )
        except Exception:
            self.log.failure("could not start {kind}", kind=kind)
            if self._terminal is not None:
                self._terminal.close()
                self._terminal = None
            return False
        self._started = True
        self._stdinOpen = True
        self.process = child
        self._childPull = isinstance(child, _process.OutputPull)
        self.log.info(
            "started {kind} pid {pid} pty={pty}",
            kind=kind,
            pid=protocol.pid,
            pty=self._terminal is not None,
        )
        child.registerProducer(self._credit, True)
        if self._eofPending:
            self._closeStdin()
        return True

    def dataReceived(self, data: bytes) -> None:
        """Channel data goes to the child's stdin; credit follows what it takes."""
        if self._answering:
            # A request before this data is still being answered: it may be
            # the one that starts the child. (Uncredited, so bounded by the window.)
            self._waiting.append(("data", data))
            return
        if self.process is None or not self._stdinOpen:
            self.consumed(len(data))  # nothing will read it: discard, like sshd
            return
        self.process.write(data)
        self._credit.received(len(data))

    def eofReceived(self) -> None:
        """Close the child's stdin; with a pty, ignore it like sshd does."""
        if self._answering:
            self._waiting.append(("eof",))
            return
        self._eof()

    def _eof(self) -> None:
        if self._terminal is not None:
            return
        if self.process is None:
            self._eofPending = True
        else:
            self._closeStdin()

    def _closeStdin(self) -> None:
        if not self._stdinOpen or self.process is None:
            return
        self._stdinOpen = False
        # A paused producer on the writer keeps its loseConnection from ever
        # finishing: unregister first.
        self.process.unregisterProducer()
        self.process.closeStdin()

    def stdinLost(self) -> None:
        """The child closed its stdin: credit whatever still arrives."""
        self._stdinOpen = False
        self._credit.stopProducing()

    def childOutput(self, data: bytes) -> None:
        """
        The child's stdout, read by the reactor: send it, and if that left the
        link backlogged, hold the pipe (out of the reactor) and read the rest
        only when the link serves this channel (L{drainQueue}). A channel out
        of window, or paused at high water, waits for its peer, not the link:
        it keeps the high-water pause, which L{outputResumed} lifts.
        """
        self.write(data)
        if self._outputHeld or self._paused or self.remoteWindowLeft <= 0:
            return
        link = self.conn.linkFlow
        if link is None or not link.paused:
            return
        if self._childPull and self.process.holdOutput():
            self._outputHeld = True
            link.waitForRoom(self, bulk=True)

    def drainQueue(self) -> None:
        """
        The link serves this channel: send what is queued, then, if the child's
        output is held, read it now, send it at once and wait for the link
        again; or, if there is nothing to read (or the channel can send no
        more), give the pipe back to the reactor.
        """
        super().drainQueue()
        if not self._outputHeld:
            return
        link = self.conn.linkFlow
        if link is not None and link.paused:
            link.waitForRoom(self, bulk=True)  # what was queued filled the link: next time
            return
        if (
            link is None
            or self.hasQueuedOutput
            or self.remoteWindowLeft <= 0
            or self.localClosed
            or self.process is None
            or (data := self.process.pullOutput()) is None
        ):
            # Caught up with the child (or it ended, or the window closed): the
            # reactor reads the pipe again, and sees its end if it ended.
            self._outputHeld = False
            if self.process is not None:
                self.process.releaseOutput()
            return
        self.write(data)
        # Into the link's line: its next turn in a row, or the back of the line
        # (LinkFlow); or at once in the same turn if the link still has room.
        link.waitForRoom(self, bulk=True)

    def outputPaused(self) -> None:
        """The operator is not reading: stop reading the child."""
        # The pause takes every pipe out of the reactor and resuming gives them
        # all back, the held stdout with them: it is no longer held.
        self._outputHeld = False
        if self.process is not None:
            self.process.pauseProducing()  # type: ignore[attr-defined]

    def outputResumed(self) -> None:
        if self.process is not None and not self._ptyOutputStopped:
            self.process.resumeProducing()  # type: ignore[attr-defined]

    def childExited(self) -> None:
        """
        The child has exited (its output may still be in the pty or pipes): a pty no
        longer read since the operator took no more output is read again, to its end,
        which is what ends the session (L{childEnded}).
        """
        if self._ptyOutputStopped and self.process is not None:
            self._ptyOutputStopped = False
            if not self._paused:
                self.process.resumeProducing()

    def childEnded(self, reason: Failure) -> None:
        """
        The child exited and all its output has been read: report how it
        ended after that output, then EOF and close (sshd's order).
        """
        self.process = None
        self._childPull = False
        self._terminal = None
        if self._killTimer is not None and self._killTimer.active():
            self._killTimer.cancel()
        self._killTimer = None
        status = getattr(reason.value, "status", None)
        if self._gone or self.localClosed or self.closing:
            return
        if status is None:
            self.log.warn("child ended without a status: {reason}", reason=reason.value)
        elif os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            name = _process.signalName(number)
            self.log.info("session child killed by {signal}", signal=name)
            self.sendRequestInOrder(
                b"exit-signal",
                common.NS(name.encode("ascii"))
                + (b"\x01" if os.WCOREDUMP(status) else b"\x00")
                + common.NS(b"")
                + common.NS(b""),
            )
        else:
            code = os.WEXITSTATUS(status)
            self.log.info("session child exited {code}", code=code)
            self.sendRequestInOrder(b"exit-status", struct.pack(">L", code))
        self.writeEOF()
        self.loseConnection()

    # -- the channel goes first ------------------------------------------------

    def closed(self) -> None:
        """
        The channel is gone (operator left, link lost) while the child may
        live on: hang it up like sshd, and kill it if it does not go.
        """
        super().closed()  # lets go of the stdin credit (EndpointChannel)
        self._gone = True
        self._stopForwarding()
        child = self.process
        if child is None:
            if self._terminal is not None and not self._started:
                self._terminal.close()
                self._terminal = None
            return
        pid = child.pid
        self._stdinOpen = False
        child.unregisterProducer()
        if self._terminal is not None:
            _process.signalGroup(pid, signal.SIGHUP)
            child.loseConnection()
        else:
            child.loseConnection()
            _process.signalGroup(pid, signal.SIGTERM)
        self.log.info("channel closed; hung up session child {pid}", pid=pid)
        self._killTimer = self.reactor.callLater(KILL_GRACE, self._kill, pid)

    def _stopForwarding(self) -> None:
        """The session is over: its agent socket and X11 display go with it."""
        stopping = []
        agentForwarding, self._agentForwarding = self._agentForwarding, None
        if agentForwarding is not None:
            stopping.append(agentForwarding.stop())
        x11, self._x11 = self._x11, None
        if x11 is not None:
            stopping.append(x11.stop())
        #: Fires once the listeners are closed and the agent socket removed.
        self.forwardingStopped = defer.gatherResults(stopping)
        while self._waiting:
            item = self._waiting.popleft()
            if item[0] == "request":
                item[3].callback(False)

    def _kill(self, pid: int | None) -> None:
        self._killTimer = None
        if self.process is not None:
            self.log.warn("session child {pid} ignored its hang-up; killing it", pid=pid)
            # Reaped already (Twisted sets pid to None) while another process of its
            # group holds its output open: only the group, whose number stays taken;
            # the child's own may belong to an unrelated process by now.
            reaped = self.process.pid is None
            _process.signalGroup(pid, signal.SIGKILL, orLeader=not reaped)


__all__ = [
    "DEFAULT_PATH",
    "DEFAULT_SFTP_SERVER_PATHS",
    "DEFAULT_XAUTH_PATHS",
    "KILL_GRACE",
    "SessionChannel",
    "SessionEnvironment",
    "acceptedVariable",
    "builtinSftpServer",
]
