"""
The agent's open-file limit (agent.openfiles): raised at start up to the hard limit, the
sessions' children given back the one it started with from their first instruction (fork
path: setrlimit in the child; spawn path: the agent's own lowered around posix_spawn), and a
session or forward refused at its open, with a reason for the operator, when the descriptors
run out. The limits are stand-ins here, except in a process of its own with a low limit; real
children on both paths: tests/test_agent_spawn_parity.py; end to end:
tests/e2e/test_open_files.py.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from agent import _process, openfiles

NOFILE = resource.RLIMIT_NOFILE


class _Limits:
    """getrlimit/setrlimit/prlimit stand-ins that record what they were asked."""

    def __init__(self, soft: int, hard: int) -> None:
        self.limit = (soft, hard)
        self.set: list[tuple[int, int]] = []
        self.children: list[tuple[int, int]] = []
        self.room: list[tuple[int, int]] = []
        self.free = True
        self.answer: int | Exception | None = 4242

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == NOFILE
        return self.limit

    def setrlimit(self, which: int, limit: tuple[int, int]) -> None:
        assert which == NOFILE
        self.set.append(limit)
        self.limit = limit

    def spawned(self) -> int | None:
        """L{openfiles.spawnUnderSessionLimit} with these stand-ins."""
        return openfiles.spawnUnderSessionLimit(
            self.spawn, self.getrlimit, self.setrlimit, self.roomBelow
        )

    def spawn(self) -> int | None:
        """
        A posix_spawn stand-in: the child it starts has the limit of this moment; its pid,
        or C{self.answer} if set (None: declined; an exception: raised).
        """
        self.children.append(self.limit)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def roomBelow(self, limit: int, count: int) -> bool:
        self.room.append((limit, count))
        return self.free


class RaiseForTheAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(openfiles, "_sessionLimit", None)

    def raised(self, limits: _Limits) -> list[str]:
        with capturedLogs() as seen:
            openfiles.raiseForTheAgent(getrlimit=limits.getrlimit, setrlimit=limits.setrlimit)
        return [formatEvent(e) for e in seen]

    def test_raisedAndChildrenGetTheOldOne(self) -> None:
        """
        From Linux's 1024 to WANTED (systemd's hard limit is higher), said in one line; a
        forked child is set back to 1024 before it runs, a spawned one starts with it.
        """
        limits = _Limits(1024, 524288)
        lines = self.raised(limits)
        self.assertEqual(limits.set, [(openfiles.WANTED, 524288)])
        self.assertEqual(
            lines,
            [
                f"open-file limit raised from 1024 to {openfiles.WANTED} (hard limit 524288); "
                "sessions get 1024"
            ],
        )
        openfiles.forkedChild(setrlimit=limits.setrlimit)
        self.assertEqual(limits.set[-1], (1024, 524288))
        limits.limit = (openfiles.WANTED, 524288)
        self.assertEqual(limits.spawned(), 4242)
        self.assertEqual(limits.children, [(1024, 524288)])

    def test_upToTheHardLimit(self) -> None:
        """A hard limit below WANTED is as far as it goes, and the line says so."""
        limits = _Limits(1024, 4096)
        (line,) = self.raised(limits)
        self.assertEqual(limits.set, [(4096, 4096)])
        self.assertIn(f"(hard limit 4096, below the {openfiles.WANTED} wanted)", line)

    def test_highEnoughAlready(self) -> None:
        """Nothing raised, and the children are left alone: no setrlimit, no probe."""
        limits = _Limits(65536, 65536)
        self.assertEqual(self.raised(limits), ["open-file limit 65536 (hard limit 65536)"])
        openfiles.forkedChild(setrlimit=limits.setrlimit)
        self.assertEqual(limits.spawned(), 4242)
        self.assertEqual((limits.set, limits.room), ([], []))
        self.assertEqual(limits.children, [(65536, 65536)])

    def test_cannotRaise(self) -> None:
        """A refusal is a warning; the children are left alone."""
        limits = _Limits(1024, 524288)

        def refuse(which: int, limit: tuple[int, int]) -> None:
            raise ValueError("not allowed")

        with capturedLogs() as seen:
            openfiles.raiseForTheAgent(getrlimit=limits.getrlimit, setrlimit=refuse)
        self.assertEqual(
            [formatEvent(e) for e in seen],
            ["open-file limit stays 1024: cannot raise it: not allowed"],
        )
        self.assertEqual(limits.spawned(), 4242)
        self.assertEqual((limits.set, limits.children), ([], [(1024, 524288)]))


class SpawnUnderSessionLimitTests(SynchronousTestCase):
    """
    The spawn path: the agent's own soft limit lowered to the sessions' for the posix_spawn
    call alone (the child starts with it), when the agent's other threads keep room below it.
    """

    def setUp(self) -> None:
        self.patch(openfiles, "_sessionLimit", (1024, 524288))
        self.limits = _Limits(openfiles.WANTED, 524288)

    def test_loweredForTheSpawnAlone(self) -> None:
        """
        Room for RESERVE descriptors below 1024 is checked, the limit lowered, the child
        started under it, and the agent's own raised back: in that order.
        """
        self.assertEqual(self.limits.spawned(), 4242)
        self.assertEqual(self.limits.room, [(1024, openfiles.RESERVE)])
        self.assertEqual(self.limits.children, [(1024, 524288)])
        self.assertEqual(self.limits.set, [(1024, 524288), (openfiles.WANTED, 524288)])
        self.assertEqual(self.limits.limit, (openfiles.WANTED, 524288))

    def test_noRoomBelowForks(self) -> None:
        """
        With fewer than RESERVE descriptors free below the sessions' limit (the agent's other
        threads would fail to open any while it is lowered): no spawn, the limit untouched,
        None for the caller to fork.
        """
        self.limits.free = False
        self.assertIsNone(self.limits.spawned())
        self.assertEqual((self.limits.set, self.limits.children), ([], []))

    def test_raisedBackWhateverTheSpawnDoes(self) -> None:
        """A spawn that declines (None) or raises still leaves the agent its own limit."""
        self.limits.answer = None
        self.assertIsNone(self.limits.spawned())
        self.limits.answer = RuntimeError("boom")
        self.assertRaises(RuntimeError, self.limits.spawned)
        self.assertEqual(self.limits.set[-1], (openfiles.WANTED, 524288))
        self.assertEqual(self.limits.set[1::2], [(openfiles.WANTED, 524288)] * 2)

    def test_cannotLowerForks(self) -> None:
        """A refused lowering: no spawn, None for the caller to fork."""

        def refuse(which: int, limit: tuple[int, int]) -> None:
            raise OSError("not allowed")

        spawned = openfiles.spawnUnderSessionLimit(
            self.limits.spawn, self.limits.getrlimit, refuse, self.limits.roomBelow
        )
        self.assertIsNone(spawned)
        self.assertEqual(self.limits.children, [])

    def test_cannotRaiseBackWarns(self) -> None:
        """The child started; a refused raise back is a warning, the agent runs on under it."""
        calls: list[tuple[int, int]] = []

        def lowerOnly(which: int, limit: tuple[int, int]) -> None:
            calls.append(limit)
            if len(calls) > 1:
                raise ValueError("not allowed")

        with capturedLogs() as seen:
            spawned = openfiles.spawnUnderSessionLimit(
                self.limits.spawn, self.limits.getrlimit, lowerOnly, self.limits.roomBelow
            )
        self.assertEqual(spawned, 4242)
        self.assertEqual(
            [formatEvent(e) for e in seen],
            [
                f"open-file limit stays 1024: cannot raise it back to {openfiles.WANTED}: "
                "not allowed"
            ],
        )

    def test_roomBelowOpensAndCloses(self) -> None:
        """
        The check opens the lowest free descriptors and closes them: none free below the
        lowest free one, one below the next; nothing is left open.
        """
        openfiles.haveRoom(0)  # its probe descriptor, kept open, is opened first
        lowest = os.dup(0)
        os.close(lowest)
        before = os.listdir("/proc/self/fd")
        self.assertFalse(openfiles._roomBelow(lowest, 1))
        self.assertTrue(openfiles._roomBelow(lowest + 1, 1))
        self.assertEqual(os.listdir("/proc/self/fd"), before)

    def test_roomBelowAtOnceWhenTheTopIsFree(self) -> None:
        """
        The usual case: the RESERVE descriptors just below the limit are free, which one poll
        tells, and nothing is opened. One of them open (a pipe whose other end has closed,
        which poll marks as hung up, not as no descriptor): the lowest free are opened.
        """
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        os.close(writer)
        limit = reader + 2 * openfiles.RESERVE
        top = range(limit - openfiles.RESERVE, limit)
        if any(_isOpen(fd) for fd in top):
            self.skipTest("descriptors above this test's pipe are open")
        opened: list[int] = []
        dup = os.dup

        def countedDup(fd: int) -> int:
            opened.append(fd)
            return dup(fd)

        self.patch(os, "dup", countedDup)
        self.assertTrue(openfiles._roomBelow(limit, openfiles.RESERVE))
        self.assertEqual(opened, [])
        self.assertFalse(openfiles._noneOpen(reader, reader + 1))
        openfiles._roomBelow(reader + 1, 1)
        self.assertNotEqual(opened, [])


def _isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class SessionChildTests(SynchronousTestCase):
    def test_bothPathsSetTheLimit(self) -> None:
        """
        The session children's classes set the limit on both paths: in the forked child's
        setup (before Twisted's own), and around the posix_spawn call.
        """
        calls: list[Any] = []
        self.patch(openfiles, "forkedChild", lambda: calls.append("forked"))

        def underLimit(start: Any) -> Any:
            calls.append("lowered")
            pid = start()
            calls.append("raised")
            return pid

        self.patch(openfiles, "spawnUnderSessionLimit", underLimit)

        def spawn(*args: Any, around: Any) -> int:
            def posixSpawn() -> int:
                calls.append("spawn")
                return 4242

            return around(posixSpawn)

        self.patch(_process._spawn, "spawn", spawn)
        child: Any = object.__new__(_process._SessionPTYProcess)
        child._terminalName = "/dev/pts/99"
        self.assertTrue(child._trySpawnInsteadOfFork("/", None, None, b"/bin/sh", [b"sh"], {}, {}))
        self.assertEqual(calls, ["lowered", "spawn", "raised"])
        self.assertEqual(child.pid, 4242)
        setups: list[str] = []
        self.patch(
            _process.process.PTYProcess,
            "_setupChild",
            lambda self, *a, **k: setups.append("twisted"),
        )
        self.patch(
            _process.process.Process, "_setupChild", lambda self, *a, **k: setups.append("twisted")
        )
        self.patch(_process.os, "setsid", lambda: None)
        cls: Any
        for cls in (_process._SessionProcess, _process._SessionPTYProcess):
            calls.clear()
            setups.clear()
            child = object.__new__(cls)
            child._setupChild()
            self.assertEqual((calls, setups), (["forked"], ["twisted"]))


class HaveRoomTests(SynchronousTestCase):
    def test_lowLimitInAProcessOfItsOwn(self) -> None:
        """
        Under a limit of 64, with descriptors opened until few are left: room for a session
        while SESSION_DESCRIPTORS + RESERVE are free, none once fewer are, room again after
        some close; the probe leaves nothing open. The reason names the limit.
        """
        program = """
import os, resource
from agent import openfiles
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
need = openfiles.SESSION_DESCRIPTORS + openfiles.RESERVE
assert openfiles.haveRoom(openfiles.SESSION_DESCRIPTORS)
baseline = len(os.listdir("/proc/self/fd")) - 1
held = []
while True:
    try:
        held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        break
free = lambda: 64 - baseline - len(held)
while free() < need:
    os.close(held.pop())
before = free()
assert openfiles.haveRoom(openfiles.SESSION_DESCRIPTORS), before
assert free() == before == 64 - len(os.listdir("/proc/self/fd")) + 1
held.append(os.open(os.devnull, os.O_RDONLY))
assert not openfiles.haveRoom(openfiles.SESSION_DESCRIPTORS)
assert openfiles.haveRoom(1)
assert free() == before - 1 == 64 - len(os.listdir("/proc/self/fd")) + 1
print(openfiles.outOfDescriptors("session"))
"""
        result = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.strip(),
            "the device's agent has too many files open for another session (its open-file "
            "limit is 64); try again when sessions have ended",
        )
