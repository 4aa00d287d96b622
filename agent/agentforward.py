"""
Agent forwarding (ssh -A) on the device: a private socket that reaches the operator's ssh-agent.

On C{auth-agent-req@openssh.com} a session gets, like with sshd, a listening
UNIX socket in a fresh directory only the session's user can enter
(C{/tmp/ssh-XXXXXXXXXX/agent.PID}, directory 0700 and socket owned by that
user), and its child gets C{SSH_AUTH_SOCK} pointing at it. Every connection
to the socket opens an C{auth-agent@openssh.com} channel to groundcontrol.

The standard channel has an empty payload: a server knows which client it
belongs to because there is one client per connection. The agent's link
carries many operators' sessions, so ours says which session it is for::

    uint32  the agent's own channel id of the session channel

groundcontrol maps that to the operator's connection and opens a standard
C{auth-agent@openssh.com} channel there. Socket and directory go when the
session channel closes.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from agent.forward import AcceptingFactory

AUTH_AGENT_REQUEST = b"auth-agent-req@openssh.com"
AUTH_AGENT_CHANNEL = b"auth-agent@openssh.com"


def authAgentPayload(sessionID: int) -> bytes:
    """Our C{auth-agent@openssh.com} open payload: the session's channel id."""
    return struct.pack(">L", sessionID)


class AgentForwarding:
    """The forwarded-agent socket of one session."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        conn: Any,
        sessionID: int,
        uid: int | None = None,
        gid: int | None = None,
        *,
        tempRoot: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.conn = conn
        self.sessionID = sessionID
        self.uid = uid
        self.gid = gid
        self.tempRoot = tempRoot
        self.directory: str | None = None
        self.path: str | None = None
        self._port: Any = None

    def start(self) -> str:
        """
        Make the directory and listen in it; return the socket's path (for
        C{SSH_AUTH_SOCK}). Raises L{OSError} or L{CannotListenError}, having
        removed whatever it made.
        """
        directory = tempfile.mkdtemp(prefix="ssh-", dir=self.tempRoot)  # mode 0700
        path = os.path.join(directory, f"agent.{os.getpid()}")
        factory = AcceptingFactory(
            self.conn, AUTH_AGENT_CHANNEL, lambda peer: authAgentPayload(self.sessionID)
        )
        try:
            self._port = self.reactor.listenUNIX(path, factory, mode=0o600)
            if self.uid is not None:
                # The socket first, while only we may enter its directory, then the directory,
                # never following a link: once the user owns the directory they could put a
                # symlink where the socket was, and a chown by path would follow it as root.
                gid = self.gid if self.gid is not None else -1
                if os.path.lexists(path):
                    os.chown(path, self.uid, gid, follow_symlinks=False)
                os.chown(directory, self.uid, gid, follow_symlinks=False)
        except BaseException:
            self.directory = directory
            self.path = path
            self.stop()
            raise
        self.directory, self.path = directory, path
        self.log.info("agent forwarding for session {id} at {path}", id=self.sessionID, path=path)
        return path

    def stop(self) -> defer.Deferred[None]:
        """Stop listening, then remove the socket and its directory."""
        port, self._port = self._port, None
        directory, path = self.directory, self.path
        self.directory = self.path = None
        stopped = (
            defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        )

        def remove(_: Any) -> None:
            if directory is None:
                return
            try:
                self._removeSocket(directory, path)
                os.rmdir(directory)  # a symlink put in its place is not followed: ENOTDIR
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.warn("could not remove {dir}: {why}", dir=directory, why=e)

        return stopped.addBoth(remove)

    def _removeSocket(self, directory: str, path: str | None) -> None:
        """
        Remove the socket from the directory we made, as root too: by a descriptor of that
        directory opened without following a link, and only while it is still ours or the
        session user's. The user owns it, so they may have moved it away and put a link (or
        a directory of theirs) in its place; a removal by path would act wherever it led.
        """
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            owner = os.fstat(fd).st_uid
            if owner not in (os.geteuid(), self.uid):
                raise PermissionError(f"{directory} is no longer ours (owner uid {owner})")
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.basename(path), dir_fd=fd)
        finally:
            os.close(fd)


__all__ = [
    "AUTH_AGENT_CHANNEL",
    "AUTH_AGENT_REQUEST",
    "AgentForwarding",
    "authAgentPayload",
]
