"""
A session's child gets the same process state whichever way the agent starts it: spawned
(agent._spawn, the usual way) or forked (another login, or what posix_spawn declines). Each
test starts one child each way, pipes and pty, in an agent-like state (a sessions' open-file
limit below the agent's own, a signal the agent ignores, a umask), and compares everything a
session can see of its own process in /proc: every limit, the umask, signal dispositions,
mask and pending set, credentials and groups, capabilities, session, process group and
controlling terminal, nice value and scheduling policy, working directory, program,
arguments, environment, descriptors and their flags, and the rest of /proc's per-process
settings. And a child that reads its open-file limit as its very first act, before the agent
has run another instruction, reads the sessions' (agent.openfiles.spawnUnderSessionLimit).

Except glibc's own signals (32 and 33): when the agent inherited them ignored (CI's pytest did,
from a parent started by glibc's posix_spawn, which ignores them in its child), a forked child
keeps them ignored, since Python cannot change them (glibc's sigaction refuses), while
posix_spawn's child gets their default (agent._spawn._GLIBC_SIGNALS). No program can use them,
so SigIgn is compared without them; the spawned child's (checked to be empty) keeps them.

Not here: a session run as another login (a grant's --as, the agent as root) is only ever
forked, to switch users, so it has no second path to compare with; its credentials and limit
are tested end to end (tests/e2e/test_access.py, tests/e2e/test_open_files.py). Nor the I/O
priority, which /proc does not show (both paths inherit it, as they do the nice value).
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

from twisted.internet import process

from agent import _process, _spawn, openfiles
from tests.test_agent_spawn import CAT, ENVIRONMENT, SpawnCase

#: Fields of /proc/PID/status that a process inherits and a session may depend on.
STATUS_FIELDS = (
    "Umask",
    "SigPnd",
    "ShdPnd",
    "SigBlk",
    "SigIgn",
    "SigCgt",
    "Uid",
    "Gid",
    "Groups",
    "NoNewPrivs",
    "Seccomp",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "Cpus_allowed_list",
    "Mems_allowed_list",
)

#: Files of /proc/PID that hold one inherited setting each.
SETTING_FILES = (
    "oom_score_adj",
    "timerslack_ns",
    "personality",
    "coredump_filter",
    "loginuid",
    "sessionid",
    "cgroup",
)

#: Fields of /proc/PID/stat (1-based, as proc(5) numbers them) compared as they are.
STAT_FIELDS = {
    "priority": 18,
    "nice": 19,
    "exit_signal": 38,
    "rt_priority": 40,
    "policy": 41,
}

#: The open flags of a descriptor that a program can tell apart by their effect. Not
#: C{O_LARGEFILE}: the kernel sets it on every file a 64-bit program opens, so the pty the
#: spawned child opens by name has it and the one C{openpty} gave the agent (the forked
#: child's) may not; it changes nothing on a terminal, which has no offset.
DESCRIPTOR_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC | os.O_SYNC | os.O_DSYNC | os.O_ASYNC
)

#: A child that reads its limits as it starts, and exits.
READ_LIMITS = (b"cat", b"/proc/self/limits")

#: The umask the test gives the "agent": children of both paths must have it.
UMASK = 0o027


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def readSetting(pid: int, name: str) -> str:
    """
    /proc/PID/NAME, or that it cannot be read: C{timerslack_ns} and C{personality} need
    ptrace's leave, which a hardened kernel (Yama's ptrace_scope 2 or 3) refuses the parent.
    """
    try:
        return read(f"/proc/{pid}/{name}")
    except PermissionError:
        return "(not readable)"


def limitsOf(pid: int) -> dict[str, tuple[str, str]]:
    """Every limit's (soft, hard), by name, from /proc/PID/limits."""
    return parseLimits(read(f"/proc/{pid}/limits"))


def parseLimits(text: str) -> dict[str, tuple[str, str]]:
    """Every limit's (soft, hard), by name, from a /proc/PID/limits text."""
    limits = {}
    for line in text.splitlines()[1:]:
        name = line[:26].strip()
        soft, hard = line[26:].split()[:2]
        limits[name] = (soft, hard)
    return limits


def statOf(pid: int) -> dict[str, int]:
    """/proc/PID/stat's fields, by proc(5)'s names, for the fields compared or checked."""
    fields = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    named = {"pgrp": 5, "session": 6, "tty_nr": 7, "tpgid": 8, **STAT_FIELDS}
    return {name: int(fields[number - 3]) for name, number in named.items()}


def descriptorsOf(pid: int, child: Any, terminal: _process.Terminal | None) -> dict[int, Any]:
    """
    Each open descriptor: what it is (the session's own pipe, by inode, or its terminal, by
    name) and its open flags in octal (L{DESCRIPTOR_FLAGS}).
    """
    descriptors = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if terminal is not None and target == terminal.name:
            what = "terminal"
        elif fd in child.pipes and (
            os.stat(f"/proc/{pid}/fd/{fd}").st_ino == os.fstat(child.pipes[fd].fileno()).st_ino
        ):
            what = "its pipe"
        else:
            what = target
        fdinfo = read(f"/proc/{pid}/fdinfo/{fd}").splitlines()
        flags = next(int(line.split()[1], 8) for line in fdinfo if line.startswith("flags:"))
        descriptors[fd] = (what, oct(flags & DESCRIPTOR_FLAGS))
    return descriptors


def stateOf(child: Any, terminal: _process.Terminal | None) -> dict[str, Any]:
    """
    What a session's process can see of itself, with what differs by nature between two
    children (their pids, their pipes' inodes, their autogroup's number) put as relations:
    whether it leads its session and group, whether its terminal is its pty, and its
    terminal's foreground group.
    """
    pid = child.pid
    status = {}
    for line in read(f"/proc/{pid}/status").splitlines():
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            status[name] = value.strip()
    stat = statOf(pid)
    return {
        "limits": limitsOf(pid),
        "status": status,
        "settings": {name: readSetting(pid, name) for name in SETTING_FILES},
        "autogroup nice": read(f"/proc/{pid}/autogroup").split()[-1],
        "namespaces": {
            n: os.readlink(f"/proc/{pid}/ns/{n}") for n in os.listdir(f"/proc/{pid}/ns")
        },
        "leads its session": stat["session"] == pid,
        "leads its group": stat["pgrp"] == pid,
        "terminal": (
            "its pty"
            if terminal is not None and stat["tty_nr"] == os.stat(terminal.name).st_rdev
            else stat["tty_nr"]
        ),
        "foreground group is its own": stat["tpgid"] == pid,
        "scheduling": {name: stat[name] for name in STAT_FIELDS},
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "exe": os.readlink(f"/proc/{pid}/exe"),
        "cmdline": read(f"/proc/{pid}/cmdline"),
        "environ": read(f"/proc/{pid}/environ"),
        "descriptors": descriptorsOf(pid, child, terminal),
    }


#: glibc's own signals' bits in /proc's signal sets (the module docstring: not compared).
GLIBC_SIGNALS_MASK = sum(1 << (number - 1) for number in _spawn._GLIBC_SIGNALS)


def withoutGlibcSignals(state: dict[str, Any]) -> dict[str, Any]:
    """C{state} with glibc's own signals taken out of its ignored set."""
    status = dict(state["status"])
    status["SigIgn"] = f"{int(status['SigIgn'], 16) & ~GLIBC_SIGNALS_MASK:016x}"
    return {**state, "status": status}


class ParityCase(SpawnCase):
    """The agent's state for its children: a lowered sessions' limit, SIGUSR1 ignored, a umask."""

    def setUp(self) -> None:
        super().setUp()
        self.agentLimit = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft, hard = self.agentLimit
        #: As if the agent had raised its own limit from this one.
        self.sessionLimit = (min(soft, 1024) // 2, hard)
        self.patch(openfiles, "_sessionLimit", self.sessionLimit)
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        self.addCleanup(os.umask, os.umask(UMASK))

    def start(self, forked: bool, terminal: bool) -> tuple[Any, _process.Terminal | None]:
        """A C{cat} started one way or the other, running (its program's own code reached)."""
        if forked:
            patched = self.patch(_spawn, "spawn", lambda *args, **kwargs: None)
        else:
            patched = self.patch(os, "fork", self.noForkCalled)
        try:
            if terminal:
                child, pty = self.ptyChild()
            else:
                child, pty = self.pipeChild(), None
        finally:
            patched.restore()
        self.untilRunning(child, pty)
        return child, pty

    @staticmethod
    def noForkCalled() -> int:
        raise AssertionError("os.fork() called")

    def assertSameState(self, terminal: bool) -> dict[str, Any]:
        spawned = stateOf(*self.start(forked=False, terminal=terminal))
        forked = withoutGlibcSignals(stateOf(*self.start(forked=True, terminal=terminal)))
        compared = withoutGlibcSignals(spawned)
        for key in compared:
            self.assertEqual((key, compared[key]), (key, forked[key]))
        return spawned


class ParityTests(ParityCase):
    def test_pipeChild(self) -> None:
        """
        An exec's child: the same state both ways, and it is the session's: the sessions'
        open-file limit (the rest as the agent's), no signal ignored, blocked or pending, the
        agent's umask, its own session with no terminal, its three pipes and nothing else.
        """
        state = self.assertSameState(terminal=False)
        self.checkSessionState(state)
        self.assertEqual(state["terminal"], 0)
        self.assertEqual(
            {fd: what for fd, (what, _) in state["descriptors"].items()},
            {0: "its pipe", 1: "its pipe", 2: "its pipe"},
        )

    def test_ptyChild(self) -> None:
        """
        A shell's child: the same state both ways, the session's as for an exec, with the pty
        as its controlling terminal (its group in the foreground) on 0, 1 and 2.
        """
        state = self.assertSameState(terminal=True)
        self.checkSessionState(state)
        self.assertEqual(state["terminal"], "its pty")
        self.assertTrue(state["foreground group is its own"])
        self.assertEqual(
            {fd: what for fd, (what, _) in state["descriptors"].items()},
            {0: "terminal", 1: "terminal", 2: "terminal"},
        )

    def checkSessionState(self, state: dict[str, Any]) -> None:
        soft, hard = self.sessionLimit
        self.assertEqual(state["limits"]["Max open files"], (str(soft), str(hard)))
        for name, which in (
            ("Max stack size", resource.RLIMIT_STACK),
            ("Max core file size", resource.RLIMIT_CORE),
            ("Max processes", resource.RLIMIT_NPROC),
        ):
            self.assertEqual(
                state["limits"][name], tuple(map(limitText, resource.getrlimit(which)))
            )
        for name in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
            self.assertEqual(int(state["status"][name], 16), 0, name)
        self.assertEqual(state["status"]["Umask"], f"{UMASK:04o}")
        self.assertTrue(state["leads its session"])
        self.assertTrue(state["leads its group"])
        self.assertEqual(state["cwd"], self.directory)
        self.assertEqual(state["exe"], os.path.realpath(os.fsdecode(CAT)))
        expected = "".join(f"{name}={value}\0" for name, value in ENVIRONMENT.items())
        self.assertEqual(state["environ"], expected)


def limitText(value: int) -> str:
    """A limit as /proc/PID/limits writes it."""
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


class FirstInstructionTests(ParityCase):
    """
    The child's open-file limit from its first instruction. To make the order certain, not
    likely: posix_spawn's stand-in returns the pid only once the child has exited (left a
    zombie, C{WNOWAIT}), the schedule in which the child runs all it does before the agent
    runs another instruction: a limit set on the child after the spawn (session 17's
    C{prlimit}) comes too late, every time.
    """

    def setUp(self) -> None:
        super().setUp()
        spawn = _spawn.spawn

        def spawnAndLetItRun(*args: Any, **kwargs: Any) -> int | None:
            pid = spawn(*args, **kwargs)
            if pid is not None:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            return pid

        self.patch(_spawn, "spawn", spawnAndLetItRun)
        self.patch(os, "fork", self.noForkCalled)

    def test_pipeChild(self) -> None:
        """C{cat /proc/self/limits} on pipes reads the sessions' limit."""
        child = self.pipeChild(CAT, READ_LIMITS)
        self.assertReadTheSessionsLimit(child, child.pipes[1].fileno())

    def test_ptyChild(self) -> None:
        """C{cat /proc/self/limits} on a pty reads the sessions' limit."""
        child, terminal = self.ptyChild(READ_LIMITS)
        self.assertReadTheSessionsLimit(child, terminal.master)

    def assertReadTheSessionsLimit(self, child: Any, output: int) -> None:
        """C{child} has exited; what it wrote to C{output} says the sessions' open-file limit."""
        self.assertNotIn(child.pid, process.reapProcessHandlers)  # reaped as it registered
        os.set_blocking(output, True)
        written = b""
        while True:
            try:
                chunk = os.read(output, 65536)
            except OSError:  # EIO: a pty whose child side is closed, all read
                break
            if not chunk:
                break
            written += chunk
        self.assertEqual(
            parseLimits(written.decode())["Max open files"], tuple(map(str, self.sessionLimit))
        )


class NoRoomBelowTests(ParityCase):
    def test_forkedUnderTheLimit(self) -> None:
        """
        With fewer than RESERVE descriptors free below the sessions' limit, the agent's limit
        is not lowered (its other threads would have none to open): the child is forked, and
        has the sessions' limit all the same; the agent's own is as it was.
        """
        openfiles.haveRoom(0)  # its probe descriptor, kept open, is opened first
        lowest = os.dup(0)
        os.close(lowest)
        _, hard = self.sessionLimit
        self.sessionLimit = (lowest + openfiles.RESERVE - 1, hard)
        self.patch(openfiles, "_sessionLimit", self.sessionLimit)
        forks: list[int] = []
        fork = os.fork

        def countedFork() -> int:
            pid = fork()
            if pid:
                forks.append(pid)
            return pid

        self.patch(os, "fork", countedFork)
        child, terminal = self.ptyChild()
        self.untilRunning(child, terminal)
        self.assertEqual(forks, [child.pid])
        self.assertEqual(limitsOf(child.pid)["Max open files"], tuple(map(str, self.sessionLimit)))
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), self.agentLimit)
