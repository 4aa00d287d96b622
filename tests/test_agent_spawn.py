"""
agent._process starts a session's child without fork() (agent._spawn), and the child
gets what the fork path gives it: its own session, the pty as its controlling terminal
(Ctrl-C reaches it), the working directory, exactly the environment, only descriptors
0-2, no ignored signals. A program that cannot be run, or a uid to switch to, forks as
before. Real children (C{cat}, which waits on its stdin), inspected through C{/proc}
while they run; the parent side on a memory reactor.
"""

from __future__ import annotations

import os
import signal
import sys
import termios
from typing import Any

from twisted.internet import process
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from agent import _process, _spawn

CAT = b"/bin/cat"
ENVIRONMENT = {"HOME": "/home/operator", "LANG": "C.UTF-8", "TERM": "xterm"}


def processStat(pid: int) -> dict[str, int]:
    """The fields of C{/proc/PID/stat} after the command name that these tests read."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return {
        "pgrp": int(fields[2]),
        "session": int(fields[3]),
        "tty": int(fields[4]),
        "foreground": int(fields[5]),
    }


def ignoredSignals(pid: int) -> set[int]:
    """The signals C{pid} ignores (C{SigIgn} in C{/proc/PID/status})."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {n + 1 for n in range(64) if mask & (1 << n)}


def environmentOf(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if e)


class SpawnCase(SynchronousTestCase):
    """Children started on a memory reactor, killed and reaped by the test."""

    def setUp(self) -> None:
        if not sys.platform.startswith("linux") or _spawn._bound() is None:
            raise SkipTest("spawning without fork needs Linux with glibc 2.34 or later")
        self.reactor = MemoryReactor()
        self.directory = os.path.realpath(self.mktemp())
        os.mkdir(self.directory)

    def noFork(self) -> None:
        """Make C{os.fork} fail the test: the child must be spawned."""

        def fork() -> int:
            raise AssertionError("os.fork() called")

        self.patch(os, "fork", fork)

    def started(self, child: Any) -> Any:
        """Kill and reap C{child} at the end (Twisted's reaping is left out of it)."""
        if child.pid not in process.reapProcessHandlers:
            return child  # it had exited already: Twisted reaped it as it registered it
        process.unregisterReapProcessHandler(child.pid, child)

        def end() -> None:
            try:
                if os.waitpid(child.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return  # the test reaped it
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)

        self.addCleanup(end)
        return child

    def untilRunning(self, child: Any, terminal: _process.Terminal | None = None) -> None:
        """
        Wait until C{child} (a C{cat}) runs: C{posix_spawn} returns once the child's exec
        has replaced its memory, a moment before the kernel has put the new program's
        environment in place (C{/proc/PID/environ} reads empty until then). A byte that
        came back through C{cat} was read by the program itself, past that.
        """
        if terminal is None:
            os.write(child.pipes[0].fileno(), b"x")
            stdout = child.pipes[1].fileno()
            os.set_blocking(stdout, True)
            self.assertEqual(os.read(stdout, 1), b"x")
            return
        # The terminal echoes the line (if it echoes), then cat writes it.
        copies = 2 if termios.tcgetattr(terminal.master)[3] & termios.ECHO else 1
        os.set_blocking(terminal.master, True)
        os.write(terminal.master, b"x\n")
        seen = b""
        while seen.count(b"x") < copies:
            seen += os.read(terminal.master, 64)

    def pipeChild(self, executable: bytes = CAT, args: tuple[bytes, ...] = (b"cat",)) -> Any:
        child = _process._SessionProcess(
            self.reactor, executable, list(args), ENVIRONMENT, self.directory, ProcessProtocol()
        )
        for pipe in child.pipes.values():
            self.addCleanup(os.close, pipe.fileno())
        return self.started(child)

    def ptyChild(self, args: tuple[bytes, ...] = (b"cat",)) -> tuple[Any, _process.Terminal]:
        terminal = _process.Terminal.open("xterm", (24, 80, 0, 0), [])
        self.addCleanup(os.close, terminal.master)
        child = _process._SessionPTYProcess(
            self.reactor,
            CAT,
            list(args),
            ENVIRONMENT,
            self.directory,
            ProcessProtocol(),
            None,
            None,
            (terminal.master, terminal.slave, terminal.name),
        )
        return self.started(child), terminal


class PipeChildTests(SpawnCase):
    """A pipe child (C{exec}, a subsystem) started without fork."""

    def test_spawnedNotForked(self) -> None:
        """
        With C{os.fork} failing, a pipe child starts: it is spawned. It leads
        its own session and process group, and has no controlling terminal.
        """
        self.noFork()
        child = self.pipeChild()
        stat = processStat(child.pid)
        self.assertEqual((stat["session"], stat["pgrp"]), (child.pid, child.pid))
        self.assertEqual(stat["tty"], 0)

    def test_whatTheChildGets(self) -> None:
        """
        The child runs in the directory it was given, with exactly the given
        environment, descriptors 0, 1 and 2 only (the agent's ends of its three
        pipes, nothing else the agent has open), and ignores no signal the agent
        ignores (SIGUSR1 here) nor glibc's own (32, 33).
        """
        self.noFork()
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        child = self.pipeChild()
        self.untilRunning(child)
        self.assertEqual(os.readlink(f"/proc/{child.pid}/cwd"), self.directory)
        self.assertEqual(environmentOf(child.pid), ENVIRONMENT)
        self.assertEqual(sorted(os.listdir(f"/proc/{child.pid}/fd")), ["0", "1", "2"])
        for fd in (0, 1, 2):
            self.assertEqual(
                os.stat(f"/proc/{child.pid}/fd/{fd}").st_ino,
                os.fstat(child.pipes[fd].fileno()).st_ino,
            )
        self.assertEqual(ignoredSignals(child.pid), set())

    def test_missingProgramForks(self) -> None:
        """
        A program that does not exist: the spawn fails and the child is forked,
        which tells the operator why on its stderr, and exits 1, as before.
        """
        child = self.pipeChild(b"/nonexistent/sh", (b"-sh",))
        stderr = child.pipes[2].fileno()
        os.set_blocking(stderr, True)
        output = b""
        while chunk := os.read(stderr, 65536):
            output += chunk
        self.assertIn(b"FileNotFoundError", output)
        self.assertIn(b"/nonexistent/sh", output)
        _, status = os.waitpid(child.pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 1)

    def test_otherUserForks(self) -> None:
        """A uid or gid to switch to needs fork: no spawn is tried."""
        tried: list[bytes] = []
        self.patch(_spawn, "spawn", lambda executable, *a: tried.append(executable))
        child = _process._SessionProcess.__new__(_process._SessionProcess)
        for uid, gid in ((1000, None), (None, 1000)):
            self.assertFalse(
                child._trySpawnInsteadOfFork(
                    "/", uid, gid, CAT, [b"cat"], {}, {"fdmap": {0: 5, 1: 6, 2: 7}}
                )
            )
        self.assertEqual(tried, [])

    def test_withoutTwistedsFileActionsForks(self) -> None:
        """
        A Twisted without its private C{_getFileActions} (a release that moved it): pipe
        children fork as before rather than fail to start.
        """
        tried: list[bytes] = []
        self.patch(_spawn, "spawn", lambda executable, *a: tried.append(executable))
        self.patch(_process, "_getFileActions", None)
        child = _process._SessionProcess.__new__(_process._SessionProcess)
        self.assertFalse(
            child._trySpawnInsteadOfFork(
                "/", None, None, CAT, [b"cat"], {}, {"fdmap": {0: 5, 1: 6, 2: 7}}
            )
        )
        self.assertEqual(tried, [])

    def test_aroundMakesTheCall(self) -> None:
        """
        C{around} makes the posix_spawn call, everything else ready, and sees it end, also
        when it fails (a missing program: None, the caller forks); declining (None), no child.
        """
        seen: list[str] = []

        def around(posixSpawn: Any) -> Any:
            seen.append("before")
            try:
                return posixSpawn()
            finally:
                seen.append("after")

        pid = _spawn.spawn(b"/bin/true", [b"true"], {}, self.directory, [], around=around)
        assert pid is not None
        self.assertEqual(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), 0)
        self.assertEqual(seen, ["before", "after"])
        seen.clear()
        missing = _spawn.spawn(b"/nonexistent/x", [b"x"], {}, self.directory, [], around=around)
        self.assertIsNone(missing)
        self.assertEqual(seen, ["before", "after"])
        declined = _spawn.spawn(CAT, [b"cat"], {}, self.directory, [], around=lambda call: None)
        self.assertIsNone(declined)

    def test_nulBytesDeclined(self) -> None:
        """
        An argument, a variable or a directory with a NUL byte, which C would
        cut short, is left to the fork path (whose exec refuses it).
        """
        for args, environment, path in (
            ([b"cat", b"a\0b"], {}, "/"),
            ([b"cat"], {"A": "a\0b"}, "/"),
            ([b"cat"], {}, "/\0tmp"),
        ):
            self.assertIsNone(_spawn.spawn(CAT, args, environment, path, []))


class PtyChildTests(SpawnCase):
    """A pty child (a shell) started without fork."""

    def test_ptyIsTheControllingTerminal(self) -> None:
        """
        With C{os.fork} failing, a pty child starts: it leads its own session,
        the pty is its controlling terminal, with the child's group in the
        foreground, and descriptors 0-2 are the pty and nothing else is open.
        """
        self.noFork()
        child, terminal = self.ptyChild()
        self.untilRunning(child, terminal)
        stat = processStat(child.pid)
        self.assertEqual((stat["session"], stat["pgrp"]), (child.pid, child.pid))
        self.assertEqual(stat["tty"], os.stat(terminal.name).st_rdev)
        self.assertEqual(stat["foreground"], child.pid)
        self.assertEqual(sorted(os.listdir(f"/proc/{child.pid}/fd")), ["0", "1", "2"])
        for fd in (0, 1, 2):
            self.assertEqual(os.readlink(f"/proc/{child.pid}/fd/{fd}"), terminal.name)
        self.assertEqual(os.readlink(f"/proc/{child.pid}/cwd"), self.directory)
        self.assertEqual(environmentOf(child.pid), ENVIRONMENT)
        self.assertEqual(ignoredSignals(child.pid), set())

    def test_interruptReachesTheChild(self) -> None:
        """Ctrl-C typed on the pty interrupts the child (the terminal's foreground group)."""
        self.noFork()
        child, terminal = self.ptyChild()
        os.write(terminal.master, b"\x03")
        _, status = os.waitpid(child.pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), -signal.SIGINT)


class IgnoredSignalsTests(SynchronousTestCase):
    """
    The signals a spawn sets back to their default are read through C{_signal}
    (bench/RESULTS.md, "Session open and end CPU (session 20, H8)"): the same
    answer L{signal.getsignal} gives, handler changes included.
    """

    def test_sameAsGetsignal(self) -> None:
        """
        A signal ignored now is in the list, and gone from it once handled again;
        the list is exactly the signals L{signal.getsignal} says are C{SIG_IGN}.
        """
        previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGUSR2, previous)

        def expected() -> list[int]:
            return [n for n in range(1, signal.NSIG) if signal.getsignal(n) == signal.SIG_IGN]

        self.assertIn(signal.SIGUSR2, _spawn._ignoredSignals())
        self.assertEqual(_spawn._ignoredSignals(), expected())
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        self.assertNotIn(signal.SIGUSR2, _spawn._ignoredSignals())
        self.assertEqual(_spawn._ignoredSignals(), expected())
