"""
The agent's open-file limit (agent.openfiles): raised at start up to the hard limit, the
sessions' children given back the one it started with (fork path: setrlimit in the child;
spawn path: one prlimit), and a session or forward refused at its open, with a reason for the
operator, when the descriptors run out. The limits are stand-ins here, except in a process of
its own with a low limit; end to end: tests/e2e/test_open_files.py.
"""

from __future__ import annotations

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
        self.children: list[tuple[int, int, tuple[int, int]]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == NOFILE
        return self.limit

    def setrlimit(self, which: int, limit: tuple[int, int]) -> None:
        assert which == NOFILE
        self.set.append(limit)

    def prlimit(self, pid: int, which: int, limit: tuple[int, int]) -> None:
        self.children.append((pid, which, limit))


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
        forked child is set back to 1024 before it runs, a spawned one by one prlimit.
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
        openfiles.spawnedChild(4242, prlimit=limits.prlimit)
        self.assertEqual(limits.children, [(4242, NOFILE, (1024, 524288))])

    def test_upToTheHardLimit(self) -> None:
        """A hard limit below WANTED is as far as it goes, and the line says so."""
        limits = _Limits(1024, 4096)
        (line,) = self.raised(limits)
        self.assertEqual(limits.set, [(4096, 4096)])
        self.assertIn(f"(hard limit 4096, below the {openfiles.WANTED} wanted)", line)

    def test_highEnoughAlready(self) -> None:
        """Nothing raised, and the children are left alone: no setrlimit, no prlimit."""
        limits = _Limits(65536, 65536)
        self.assertEqual(self.raised(limits), ["open-file limit 65536 (hard limit 65536)"])
        openfiles.forkedChild(setrlimit=limits.setrlimit)
        openfiles.spawnedChild(4242, prlimit=limits.prlimit)
        self.assertEqual((limits.set, limits.children), ([], []))

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
        openfiles.spawnedChild(4242, prlimit=limits.prlimit)
        self.assertEqual(limits.children, [])


class SessionChildTests(SynchronousTestCase):
    def test_bothPathsSetTheLimit(self) -> None:
        """
        The session children's classes set the limit on both paths: in the forked child's
        setup (before Twisted's own), and on the pid posix_spawn gave.
        """
        calls: list[Any] = []
        self.patch(openfiles, "forkedChild", lambda: calls.append("forked"))
        self.patch(openfiles, "spawnedChild", lambda pid: calls.append(("spawned", pid)))
        self.patch(_process._spawn, "spawn", lambda *args: 4242)
        child: Any = object.__new__(_process._SessionPTYProcess)
        child._terminalName = "/dev/pts/99"
        self.assertTrue(child._trySpawnInsteadOfFork("/", None, None, b"/bin/sh", [b"sh"], {}, {}))
        self.assertEqual(calls, [("spawned", 4242)])
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
