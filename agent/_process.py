"""
Spawning a session's child the way sshd does, on top of Twisted's process support.

Five things Twisted's C{reactor.spawnProcess} does not do for us:

  - B{Own session for pipe children.} sshd calls C{setsid()} for every child,
    with or without a pty, so a C{signal} request or a hang-up reaches the whole
    process group (C{sh -c 'a | b'}) and never the agent's own group.
    L{_SessionProcess} does the same.
  - B{No C{fork()}.} A child that runs as the agent's own user is started
    with glibc's C{posix_spawn} (L{agent._spawn}), pty or pipes: Twisted's
    own C{posix_spawnp} path takes no pty, no other working directory and no
    C{setsid}, and forking the agent's ~37 MB process was 30% of its CPU to
    open a session. Anything else (another user, another platform, a program
    that cannot be run) forks as before.
  - B{Large reads.} Twisted reads child output 8 KiB at a time; 64 KiB reads
    roughly double bulk throughput (scp, tar over ssh). A pty gives at most
    ~4 KiB per read (Linux's line discipline buffer), so a pty child's output
    is read until the pty would block or one packet's worth is in hand, and
    passed on as one piece: one SSH packet instead of eight.
  - B{Output read when the link can take it.} While the device link is
    backlogged, a pipe child's stdout can be left out of the reactor
    (L{_SessionProcess.holdOutput}) and read by its channel when the link
    serves it (L{_SessionProcess.pullOutput}), so the bytes are sealed and
    sent as soon as they are read (L{agent.session}). A pty child's output is
    never held (L{OutputPull}).
  - B{The pty is set up before the child runs.} The terminal modes and window
    size from C{pty-req} are applied to the pty before C{exec}, so a child that
    asks at once (C{stty size}) sees them.

We still use Twisted's L{process.Process} and L{process.PTYProcess} (rather
than ptyprocess, which blocks): they integrate with the reactor's SIGCHLD
handling, so every child is reaped and no zombie is left. This relies on two
overridable hooks of those classes (C{processReaderFactory}, C{_setupChild},
C{doRead}, C{_trySpawnInsteadOfFork}); the version is pinned with the project.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import sys
import termios
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from attrs import define
from twisted.conch import ttymodes
from twisted.internet import main, process
from twisted.internet.posixbase import PosixReactorBase

from accesstunnel.writethrough import SEND_FD, WriteThroughMixin
from agent import _spawn, openfiles

#: Twisted's own file actions for a child's descriptors (private: Twisted is pinned); a
#: Twisted without it leaves pipe children to fork, as before.
_getFileActions: Any = getattr(process, "_getFileActions", None)

#: Bytes read from a child's output per system call (four packets on the link
#: to groundcontrol, L{accesstunnel.channel.LINK_MAX_PACKET}).
READ_SIZE = 256 * 1024

#: A pipe child's stdout pipe, when the agent runs as root: room for one
#: L{READ_SIZE} read. At Linux's 64 KiB every read returns at most 64 KiB, and
#: the agent and a fast child wake each other every 64 KiB (bench/RESULTS.md,
#: "Bulk and 100 sessions (session 4)").
OUTPUT_PIPE_SIZE = READ_SIZE

#: Most bytes of a pty child's output gathered in one reactor event: one SSH
#: packet's payload (L{accesstunnel.channel.DEFAULT_MAX_PACKET}, what our
#: channels and OpenSSH's sessions use), so each gathering leaves as one packet.
PTY_BATCH = 32 * 1024

#: A pty read shorter than this took all there was, most likely (a keystroke's
#: echo, a prompt): the gathering stops there instead of reading again only to
#: fail with EAGAIN. Linux's pty gives up to ~4 KiB per read while more waits.
PTY_SHORT_READ = 1024

#: A pipe child's stdin: the pipe's size (when the agent runs as root) and
#: what the agent buffers before it holds back window credit. At Linux's
#: 64 KiB the agent and the child take turns every 64 KiB on a bulk upload
#: (bench/RESULTS.md, "Bulk up and 100 sessions"). Unprivileged users share a
#: soft limit on pipe memory past which new pipes shrink, so they keep 64 KiB.
STDIN_PIPE_SIZE = 1024 * 1024

_F_SETPIPE_SZ = 1031

#: Signals an SSH peer may name (RFC 4254 section 6.10), without "SIG".
SIGNALS: dict[str, int] = {
    name: getattr(signal, "SIG" + name)
    for name in (
        "ABRT",
        "ALRM",
        "FPE",
        "HUP",
        "ILL",
        "INT",
        "KILL",
        "PIPE",
        "QUIT",
        "SEGV",
        "TERM",
        "USR1",
        "USR2",
    )
}
_SIGNAL_NAMES = {number: name for name, number in SIGNALS.items()}

#: Last opcode with a uint32 argument in the encoded terminal modes (RFC 4254 8).
_LAST_MODE_WITH_ARGUMENT = 159


def signalName(number: int) -> str:
    """
    The exit-signal name for C{number}: the RFC 4254 name, or like OpenSSH
    C{NAME@openssh.com} for signals the RFC does not list.
    """
    if number in _SIGNAL_NAMES:
        return _SIGNAL_NAMES[number]
    try:
        return signal.Signals(number).name.removeprefix("SIG") + "@openssh.com"
    except ValueError:
        return f"SIG{number}@openssh.com"


def signalGroup(pid: int | None, number: int, orLeader: bool = True) -> bool:
    """
    Send C{number} to the process group led by C{pid} (every session child
    leads its own), or to C{pid} alone if it has not called C{setsid} yet.
    Returns whether anything was signalled.

    @param orLeader: whether C{pid} alone may be signalled when it leads no group.
        False once the child has been reaped: its number may be another process's
        by then, while a group's number is not given out as long as the group has
        a member (the kernel keeps it taken).
    """
    if pid is None:
        return False
    for kill in (os.killpg, os.kill) if orLeader else (os.killpg,):
        try:
            kill(pid, number)
        except ProcessLookupError:
            continue
        except PermissionError:
            return False
        return True
    return False


def parseModes(encoded: bytes) -> list[tuple[int, int]]:
    """
    Decode RFC 4254 encoded terminal modes: opcode byte + uint32, ending at
    TTY_OP_END (0) or at the first opcode without a defined argument.
    """
    modes = []
    for offset in range(0, len(encoded), 5):
        opcode = encoded[offset]
        if opcode == 0 or opcode > _LAST_MODE_WITH_ARGUMENT:
            break
        if offset + 5 > len(encoded):
            raise ValueError("truncated terminal mode")
        modes.append((opcode, struct.unpack(">L", encoded[offset + 1 : offset + 5])[0]))
    return modes


def applyModes(fd: int, modes: Sequence[tuple[int, int]]) -> None:
    """
    Apply the modes the client's terminal has (Conch's C{unix.setModes}, done
    on the pty before the child starts). Modes this platform lacks are skipped.
    """
    attr = termios.tcgetattr(fd)
    for opcode, value in modes:
        mode: Any = ttymodes.TTYMODES.get(opcode)
        if mode is None:
            continue
        if isinstance(mode, tuple):
            flagIndex, name = mode
            bit = getattr(termios, name, None)
            if bit is None:
                continue
            attr[flagIndex] = attr[flagIndex] | bit if value else attr[flagIndex] & ~bit
        elif mode in ("ISPEED", "OSPEED"):
            speed = getattr(termios, f"B{value}", None)
            if speed is not None:
                attr[4 if mode == "ISPEED" else 5] = speed
        else:
            index = getattr(termios, mode, None)
            if index is not None and index < len(attr[6]) and value <= 0xFF:
                attr[6][index] = bytes((_specialCharacter(value),))
    termios.tcsetattr(fd, termios.TCSANOW, attr)


#: What OpenSSH's client sends for a special character its terminal has switched
#: off (its C{_POSIX_VDISABLE} is 0 on Linux, but goes over the wire as 255).
_DISABLED_ON_THE_WIRE = 0xFF

#: What switches a special character off on this system's ptys (Linux: 0).
_POSIX_VDISABLE = 0


def _specialCharacter(value: int) -> int:
    """
    A special character (VEOL, VEOL2...) as the pty is to hold it: one switched
    off at the client's terminal is switched off here too, as sshd does, not
    made byte 255, which would then end a line (VEOL) wherever it is typed.
    """
    return _POSIX_VDISABLE if value == _DISABLED_ON_THE_WIRE else value


def packWinsize(rows: int, cols: int, xpixel: int, ypixel: int) -> bytes:
    """A C{struct winsize}; SSH sends uint32s, the kernel keeps shorts."""
    return struct.pack("4H", *(min(v, 0xFFFF) for v in (rows, cols, xpixel, ypixel)))


@define
class Terminal:
    """A pty opened for a C{pty-req}, before a child owns it."""

    master: int
    slave: int
    name: str
    term: str

    @classmethod
    def open(
        cls, term: str, size: tuple[int, int, int, int], modes: Sequence[tuple[int, int]]
    ) -> Terminal:
        """Open a pty with the client's window size and terminal modes."""
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, packWinsize(*size))
            applyModes(slave, modes)
            return cls(master, slave, os.ttyname(slave), term)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise

    def close(self) -> None:
        """Give the pty back when no child was started on it."""
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def _readFrom(fd: int, callback: Any) -> Any:
    """C{fdesc.readFromFD} with L{READ_SIZE} instead of 8 KiB."""
    try:
        output = os.read(fd, READ_SIZE)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EINTR):
            return None
        return main.CONNECTION_LOST
    if not output:
        return main.CONNECTION_DONE
    callback(output)
    return None


def _readPty(fd: int, callback: Any, first: bytes = b"") -> Any:
    """
    Read a pty master until it would block, a read comes back short
    (L{PTY_SHORT_READ}) or L{PTY_BATCH} bytes are in hand, and pass what came
    to C{callback} in one call; C{first}, a long read already made, comes first.

    Linux's pty returns at most ~4 KiB per read, yet more is usually waiting
    when the child writes fast: taking it now sends one 32 KiB packet instead
    of eight 4 KiB ones. A lone keystroke's echo is one short read and goes out
    at once: no second read that would only fail with C{EAGAIN} (a system call
    and a raised exception on every keystroke's path, paid cold after each
    pause; bench/RESULTS.md, "Echo latency (session 7)"). Output that arrives
    after a short read is the next event's. On hang-up or end of file, what was
    read before it is passed on first.
    """
    chunks: list[bytes] = [first] if first else []
    size = len(first)
    result: Any = None
    while size < PTY_BATCH:
        try:
            output = os.read(fd, PTY_BATCH - size)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EINTR):
                result = main.CONNECTION_LOST  # EIO: the child side is closed
            break
        if not output:
            result = main.CONNECTION_DONE
            break
        chunks.append(output)
        size += len(output)
        if len(output) < PTY_SHORT_READ:
            break
    if chunks:
        callback(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    return result


@runtime_checkable
class OutputPull(Protocol):
    """
    A child whose stdout its session's channel may take out of the reactor while the link
    is backlogged, and read itself when the link serves it (the pull, L{agent.session}).
    Each kind of child the agent spawns says whether it can be held: a pipe child can
    (L{_SessionProcess}), a pty child never is (L{_SessionPTYProcess}). A child that is
    not an C{OutputPull} at all (another reactor's) is never held either.
    """

    def holdOutput(self) -> bool:
        """Stop the reactor reading stdout; False if it was not held."""
        ...

    def pullOutput(self) -> bytes | None:
        """One read of the held stdout; None when nothing waits or it ended."""
        ...

    def releaseOutput(self) -> None:
        """The reactor reads stdout again."""
        ...


class _LargeReader(process.ProcessReader):
    def doRead(self) -> Any:
        return _readFrom(self.fd, self.dataReceived)


class _WriteThroughWriter(WriteThroughMixin, process.ProcessWriter):
    """A child's stdin pipe: small writes go to the pipe at once."""


class _SpawnedNotForked:
    """
    Twisted's C{_trySpawnInsteadOfFork} for a session child: spawned by
    L{agent._spawn} when it runs as the agent's own user on Linux with glibc,
    its descriptors set up by the class's L{_spawnActions}; else (C{False})
    forked as before: a uid or gid to switch to needs C{fork} (C{setuid} in
    the child), and so does anything L{agent._spawn.spawn} declines, including
    a program it could not run (the fork path then tells the operator why, on
    the child's standard error, as it always did), and an agent with too many
    descriptors open to lower its open-file limit for the spawn
    (L{openfiles.spawnUnderSessionLimit}). Either way the child starts with the
    same process state (tests/test_agent_spawn_parity.py).
    """

    pid: Any
    status: Any

    def _spawnActions(self, kwargs: dict[str, Any]) -> list[_spawn.FileAction] | None:
        """The file actions for the child's descriptors 0-2, from C{_setupChild}'s C{kwargs}."""
        raise NotImplementedError

    def _trySpawnInsteadOfFork(
        self,
        path: str,
        uid: int | None,
        gid: int | None,
        executable: bytes,
        args: list[bytes],
        environment: dict[str, str],
        kwargs: dict[str, Any],
    ) -> bool:
        if uid is not None or gid is not None or not sys.platform.startswith("linux"):
            return False
        actions = self._spawnActions(kwargs)
        if actions is None:
            return False
        # The child starts under the agent's open-file limit at start (agent.openfiles).
        pid = _spawn.spawn(
            executable, args, environment, path, actions, around=openfiles.spawnUnderSessionLimit
        )
        if pid is None:
            return False
        self.pid = pid
        self.status = -1
        return True

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        # The fork path, in the child: the agent's open-file limit at start (agent.openfiles).
        openfiles.forkedChild()
        super()._setupChild(*args, **kwargs)  # type: ignore[misc]


class _SessionProcess(_SpawnedNotForked, process.Process):
    """
    A pipe child in its own session, read L{READ_SIZE} at a time, stdin written through,
    its stdout held for the pull while the link is backlogged (L{OutputPull}).
    """

    processReaderFactory = _LargeReader
    processWriterFactory = _WriteThroughWriter

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stdin = self.pipes.get(0)
        if stdin is not None:
            stdin.bufferSize = STDIN_PIPE_SIZE
        if os.geteuid() == 0:
            for childFD, size in ((0, STDIN_PIPE_SIZE), (1, OUTPUT_PIPE_SIZE)):
                pipe = self.pipes.get(childFD)
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, size)

    def holdOutput(self) -> bool:
        """
        Stop the reactor reading the child's stdout: its channel reads it with
        L{pullOutput} when the link has room. False if there is no stdout to hold.
        """
        reader = self.pipes.get(1)
        if reader is None or reader.disconnecting:
            return False
        reader.stopReading()
        return True

    def pullOutput(self) -> bytes | None:
        """
        One L{READ_SIZE} read of the held stdout, now: what came, or None if
        nothing waits or the pipe has ended or failed (the caller then gives
        the pipe back to the reactor with L{releaseOutput}, whose next read
        sees the end or the error and closes it the usual way).
        """
        reader = self.pipes.get(1)
        if reader is None or reader.disconnecting:
            return None
        try:
            return os.read(reader.fd, READ_SIZE) or None
        except OSError:
            return None

    def releaseOutput(self) -> None:
        """The reactor reads the child's stdout again (after L{holdOutput})."""
        reader = self.pipes.get(1)
        if reader is not None and not reader.disconnecting:
            reader.startReading()

    def _spawnActions(self, kwargs: dict[str, Any]) -> list[_spawn.FileAction] | None:
        """
        Its three pipes (C{fdmap}: the child's descriptor to the agent's), in
        Twisted's own order of C{dup2}s, safe when a pipe's end is itself 0, 1
        or 2; each end is close-on-exec (C{os.pipe}), and L{agent._spawn}
        closes everything above 2 after these.
        """
        if _getFileActions is None:
            return None  # fork, as before
        fdmap: dict[int, int] = kwargs["fdmap"]
        return _getFileActions(
            [(fd, True) for fd in set(fdmap.values())],
            fdmap,
            doClose=os.POSIX_SPAWN_CLOSE,
            doDup2=os.POSIX_SPAWN_DUP2,
        )

    def _setupChild(self, *args: Any, **kwargs: Any) -> None:
        os.setsid()  # the fork path, when the child cannot be spawned
        super()._setupChild(*args, **kwargs)


class _SessionPTYProcess(WriteThroughMixin, _SpawnedNotForked, process.PTYProcess):
    """
    A pty child (Twisted already makes it a session leader), its output
    gathered up to one packet per event (L{_readPty}); a keystroke is written
    to the pty at once, not a reactor turn later, with C{os.write} called from
    C{write} itself (C{writeSomeData} and C{fdesc.writeToFD} would only call it).
    """

    _wtSend = SEND_FD

    def __init__(
        self,
        reactor: Any,
        executable: bytes,
        args: list[bytes],
        environment: dict[str, str],
        path: str,
        proto: Any,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: Any = None,
    ) -> None:
        # The pty's name (usePTY: master, slave, name), which Twisted's own
        # __init__ drops, for the child to open (_trySpawnInsteadOfFork).
        self._terminalName: str | None = (
            usePTY[2] if isinstance(usePTY, (tuple, list)) and usePTY[2] else None
        )
        super().__init__(reactor, executable, args, environment, path, proto, uid, gid, usePTY)

    def _spawnActions(self, kwargs: dict[str, Any]) -> list[_spawn.FileAction] | None:
        """
        The pty, which the child opens by name as a new session's leader and
        so has as its controlling terminal (what C{TIOCSCTTY} does on the fork
        path), as its standard input, output and error.
        """
        if self._terminalName is None:
            return None
        return [
            (os.POSIX_SPAWN_OPEN, 0, self._terminalName, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]

    def doRead(self) -> Any:
        # The first read written out here: a keystroke's echo is one short read,
        # passed on without L{_readPty}'s frame (two fewer before its send); a
        # long one goes on gathering there.
        try:
            output = os.read(self.fd, PTY_BATCH)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return main.CONNECTION_LOST  # EIO: the child side is closed
        if not output:
            return main.CONNECTION_DONE
        if len(output) < PTY_SHORT_READ:
            # A protocol that names where its pty output goes (the session's: the
            # channel's write) is given it there, a frame fewer than childDataReceived.
            direct = getattr(self.proto, "ptyOutput", None)
            if direct is None:
                self.proto.childDataReceived(1, output)  # type: ignore[union-attr]
            else:
                direct(output)
            return None
        return _readPty(self.fd, self._output, output)

    def _output(self, data: bytes) -> None:
        self.proto.childDataReceived(1, data)  # type: ignore[union-attr]

    # -- never held (L{OutputPull}) ---------------------------------------------

    def holdOutput(self) -> bool:
        """
        Never: a pty child's output is a person's session (a keystroke's echo, a
        prompt), gathered up to a packet per event and sent as it comes.
        """
        return False

    def pullOutput(self) -> bytes | None:
        return None  # never held, so never pulled

    def releaseOutput(self) -> None:
        pass  # never held, so never released


class Spawner(Protocol):
    """How a session starts its child; tests substitute a fake."""

    def __call__(
        self,
        reactor: Any,
        protocol: Any,
        executable: bytes,
        args: list[bytes],
        environment: dict[str, str],
        path: str,
        uid: int | None,
        gid: int | None,
        terminal: Terminal | None,
    ) -> Any: ...


def spawn(
    reactor: Any,
    protocol: Any,
    executable: bytes,
    args: list[bytes],
    environment: dict[str, str],
    path: str,
    uid: int | None,
    gid: int | None,
    terminal: Terminal | None,
) -> Any:
    """
    Start a session child on C{reactor}: on a pty (which then belongs to the
    child) or on three pipes. Other reactors get plain C{spawnProcess}.
    """
    if not isinstance(reactor, PosixReactorBase):
        usePTY: Any = (terminal.master, terminal.slave, terminal.name) if terminal else False
        return reactor.spawnProcess(  # type: ignore[no-any-return]
            protocol, executable, args, environment, path, uid, gid, usePTY
        )
    if terminal is not None:
        return _SessionPTYProcess(
            reactor,
            executable,
            args,
            environment,
            path,
            protocol,
            uid,
            gid,
            (terminal.master, terminal.slave, terminal.name),
        )
    return _SessionProcess(reactor, executable, args, environment, path, protocol, uid, gid)


__all__ = [
    "PTY_BATCH",
    "READ_SIZE",
    "SIGNALS",
    "STDIN_PIPE_SIZE",
    "OutputPull",
    "Spawner",
    "Terminal",
    "applyModes",
    "packWinsize",
    "parseModes",
    "signalGroup",
    "signalName",
    "spawn",
]
