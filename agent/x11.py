"""
X11 forwarding (ssh -X) on the device: a display on loopback that reaches the operator's X server.

On C{x11-req} (RFC 4254 6.3.1: bool single-connection, string auth protocol,
string auth cookie in hex, uint32 screen) a session gets what sshd gives it
with C{X11UseLocalhost yes}: the first free display N >= 10 listening on
C{127.0.0.1:6000+N} (and C{::1} where there is IPv6), C{DISPLAY=localhost:N.S},
and the cookie installed for the session's user with C{xauth -q -} (run as
that user, through the session's own spawn path)::

    remove unix:N
    add unix:N PROTOCOL COOKIE
    add localhost/unix:N PROTOCOL COOKIE

No xauth on the device, or xauth failing, refuses the request. Every
connection to the display opens an C{x11} channel to groundcontrol, with the
standard payload followed by the session it belongs to::

    string  originator address
    uint32  originator port
    uint32  the agent's own channel id of the session channel (ours)

groundcontrol strips the last four bytes and opens a standard C{x11} channel
to the operator. With single-connection, the display stops listening after
its first connection. Listeners go when the session channel closes.
"""

from __future__ import annotations

import errno
import re
import signal
import struct
from typing import Any

from attrs import frozen
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from agent import _process
from agent.forward import AcceptingFactory

X11_REQUEST = b"x11-req"
X11_CHANNEL = b"x11"

#: TCP port of display 0.
X11_BASE_PORT = 6000
#: First display number tried (sshd's X11DisplayOffset).
DISPLAY_OFFSET = 10
#: Displays tried before giving up (sshd's MAX_DISPLAYS).
MAX_DISPLAYS = 1000

#: Seconds xauth may take (it waits for a stale lock on .Xauthority).
XAUTH_TIMEOUT = 15.0

# What may go into an xauth command line: no spaces, no newlines.
_PROTOCOL = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_COOKIE = re.compile(rb"(?:[0-9a-fA-F]{2}){1,256}")


@frozen
class X11Request:
    """A parsed C{x11-req}."""

    singleConnection: bool
    protocol: str
    cookie: str
    screen: int

    @classmethod
    def parse(cls, data: bytes) -> X11Request:
        """Parse and check the payload; raise L{ValueError} if it is not safe to use."""
        if not data:
            raise ValueError("empty x11-req")
        single = data[0] != 0
        protocol, rest = _string(data[1:])
        cookie, rest = _string(rest)
        if len(rest) != 4:
            raise ValueError("bad screen number")
        (screen,) = struct.unpack(">L", rest)
        if not _PROTOCOL.fullmatch(protocol):
            raise ValueError("bad auth protocol")
        if not _COOKIE.fullmatch(cookie):
            raise ValueError("auth cookie is not hex")
        if screen > 0xFFFF:
            raise ValueError("bad screen number")
        return cls(single, protocol.decode("ascii"), cookie.decode("ascii"), screen)


def _string(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 4:
        raise ValueError("truncated string length")
    (length,) = struct.unpack(">L", data[:4])
    if len(data) < 4 + length:
        raise ValueError("truncated string")
    return data[4 : 4 + length], data[4 + length :]


def x11Payload(peer: IAddress, sessionID: int) -> bytes:
    """Our C{x11} open payload: standard originator fields, then the session id."""
    host = getattr(peer, "host", "")
    port = getattr(peer, "port", 0)
    return common.NS(host.encode()) + struct.pack(">LL", port, sessionID)


class X11Forwarding:
    """The forwarded display of one session."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        conn: Any,
        sessionID: int,
        request: X11Request,
        *,
        displayOffset: int = DISPLAY_OFFSET,
        maxDisplays: int = MAX_DISPLAYS,
    ) -> None:
        self.reactor = reactor
        self.conn = conn
        self.sessionID = sessionID
        self.request = request
        self.displayOffset = displayOffset
        self.maxDisplays = maxDisplays
        self.number: int | None = None
        self._ports: list[Any] = []

    @property
    def display(self) -> str:
        """C{DISPLAY} for the session's child."""
        return f"localhost:{self.number}.{self.request.screen}"

    def xauthInput(self) -> bytes:
        """What is fed to C{xauth -q -} to install the cookie."""
        n, proto, cookie = self.number, self.request.protocol, self.request.cookie
        return (
            f"remove unix:{n}\n"
            f"add unix:{n} {proto} {cookie}\n"
            f"add localhost/unix:{n} {proto} {cookie}\n"
        ).encode("ascii")

    def listen(self) -> int:
        """
        Listen on the first free display; return its number. Raises
        L{CannotListenError} when none is free.
        """
        factory = AcceptingFactory(
            self.conn,
            X11_CHANNEL,
            lambda peer: x11Payload(peer, self.sessionID),
            accepted=self._accepted,
        )
        lastError: CannotListenError | None = None
        for number in range(self.displayOffset, self.displayOffset + self.maxDisplays):
            port = X11_BASE_PORT + number
            try:
                ports = [self.reactor.listenTCP(port, factory, interface="127.0.0.1")]
            except CannotListenError as e:
                lastError = e
                continue
            try:
                ports.append(self.reactor.listenTCP(port, factory, interface="::1"))
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EADDRINUSE:
                    # Someone else holds this display on ::1: an X client
                    # trying ::1 first would reach them. Next display.
                    ports[0].stopListening()
                    lastError = e
                    continue
                # No IPv6 loopback here: 127.0.0.1 alone, as sshd does.
            self._ports = ports
            self.number = number
            self.log.info(
                "X11 forwarding for session {id} on display {n}", id=self.sessionID, n=number
            )
            return number
        raise lastError or CannotListenError("127.0.0.1", 0, OSError("no displays"))

    def _accepted(self) -> None:
        if self.request.singleConnection:
            self.stop()

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening (connections already made live on)."""
        ports, self._ports = self._ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True
        ).addErrback(lambda f: None)


class _Xauth(ProcessProtocol):
    """Feeds xauth its commands and tells whether it succeeded."""

    log = Logger()

    def __init__(self, commands: bytes, done: defer.Deferred[bool]) -> None:
        self._commands = commands
        self._done = done
        self._output: list[bytes] = []

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self._commands)
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if sum(map(len, self._output)) < 4096:
            self._output.append(data)

    def processEnded(self, reason: Failure) -> None:
        status = getattr(reason.value, "exitCode", None)
        if status != 0:
            self.log.warn(
                "xauth failed ({why}): {output}",
                why=reason.getErrorMessage(),
                output=b"".join(self._output).decode("utf-8", "replace").strip(),
            )
        if not self._done.called:
            self._done.callback(status == 0)


def installCookie(
    spawn: _process.Spawner,
    reactor: Any,
    xauth: str,
    commands: bytes,
    environment: dict[str, str],
    path: str,
    uid: int | None,
    gid: int | None,
    timeout: float = XAUTH_TIMEOUT,
) -> defer.Deferred[bool]:
    """
    Run C{xauth -q -} as the session's user, with the session's
    environment (its C{HOME} holds C{.Xauthority}), fed C{commands}. Fires
    with whether it succeeded; a hung xauth is killed after C{timeout}.
    """
    done: defer.Deferred[bool] = defer.Deferred()
    protocol = _Xauth(commands, done)
    try:
        child = spawn(
            reactor,
            protocol,
            xauth.encode(),
            [b"xauth", b"-q", b"-"],
            environment,
            path,
            uid,
            gid,
            None,
        )
    except Exception:
        Logger().failure("could not run {xauth}", xauth=xauth)
        return defer.succeed(False)

    def hung() -> None:
        Logger().warn("xauth took more than {timeout}s; killing it", timeout=timeout)
        _process.signalGroup(child.pid, signal.SIGKILL)
        if not done.called:
            done.callback(False)

    timer = reactor.callLater(timeout, hung)

    def finished(ok: bool) -> bool:
        if timer.active():
            timer.cancel()
        return ok

    return done.addCallback(finished)


__all__ = [
    "DISPLAY_OFFSET",
    "MAX_DISPLAYS",
    "X11_BASE_PORT",
    "X11_CHANNEL",
    "X11_REQUEST",
    "X11Forwarding",
    "X11Request",
    "installCookie",
    "x11Payload",
]
