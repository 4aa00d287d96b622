"""
agent._process reads a pty child's output: a burst in packet-sized pieces, a
keystroke at once, hang-up after the last byte. A real pty pair (os.openpty),
no reactor: each L{_readPty} call is what one readable event does.

The kernel moves bytes across a pty asynchronously (the slave's writes land in a
flip buffer that a worker thread pushes to the master, about 4 KiB at a time), so
these tests wait until what they need is readable (L{waitReadable}) and never
assume how much one read finds; how reads are gathered is tested with scripted
reads (L{ScriptedReads}).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import termios
import tty
from collections.abc import Iterable
from typing import Any

from twisted.internet import main
from twisted.trial.unittest import SynchronousTestCase

from agent import _process


class _Recorder:
    """A process protocol that keeps each C{childDataReceived} call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.calls.append((childFD, data))


def waitReadable(testCase: SynchronousTestCase, fd: int, n: int) -> None:
    """
    Wait until at least C{n} bytes are readable on the pty master C{fd} (its input
    queue, at most about 4 KiB), failing C{testCase} after about a second.
    """
    for _ in range(1000):
        waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        if waiting >= n:
            return
        select.select([fd], [], [], 0.001)
    testCase.fail(f"the pty never had {n} bytes to read")


class RawPtyCase(SynchronousTestCase):
    """
    A raw, non-blocking pty pair: C{master} the agent's end, C{slave} the child's; a
    test that closes the slave itself sets it to -1.
    """

    def setUp(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # bytes pass unchanged (no ONLCR, no echo)
        for fd in (self.master, self.slave):
            os.set_blocking(fd, False)
        self.addCleanup(self._close)

    def _close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)


class ReadPtyTests(RawPtyCase):
    """L{_process._readPty} on a raw pty whose slave end the test writes."""

    def setUp(self) -> None:
        super().setUp()
        self.pieces: list[bytes] = []

    def _write(self, data: bytes) -> int:
        """Write C{data} to the slave as far as the pty takes it now."""
        written = 0
        while written < len(data):
            try:
                written += os.write(self.slave, data[written:])
            except BlockingIOError:
                break
        return written

    def _event(self) -> Any:
        """One readable event: what _readPty returns; pieces land in self.pieces."""
        return _process._readPty(self.master, self.pieces.append)

    def test_burstInPacketSizedPieces(self) -> None:
        """
        A burst the child wrote at once (as much as the pty holds) comes out whole
        and in order, the first event's piece a full read or more, no piece above
        L{PTY_BATCH}. (How much one event gathers depends on how fast the kernel
        refills the master: L{GatherTests} checks the gathering itself.)
        """
        burst = os.urandom(64 * 1024)
        written = self._write(burst)
        self.assertGreater(written, 4096)
        self._drain(written)
        self.assertGreaterEqual(len(self.pieces[0]), _process.PTY_SHORT_READ)
        self.assertTrue(all(len(p) <= _process.PTY_BATCH for p in self.pieces))
        self.assertEqual(b"".join(self.pieces), burst[:written])
        # Nothing more: the next event reads nothing and passes nothing on.
        pieces = len(self.pieces)
        self.assertIsNone(self._event())
        self.assertEqual(len(self.pieces), pieces)

    def _drain(self, written: int) -> None:
        """Run events, each once something is readable, until C{written} bytes came out."""
        for _ in range(1000):
            if sum(map(len, self.pieces)) >= written:
                return
            waitReadable(self, self.master, 1)
            self.assertIsNone(self._event())
        self.fail("the pty's bytes never all came out")

    def test_pieceBoundedByBatch(self) -> None:
        """
        No piece exceeds L{PTY_BATCH} (one packet's payload): with the bound
        set below what is waiting, each event stops there, and every byte
        still comes out, in order.
        """
        self.patch(_process, "PTY_BATCH", 5000)
        burst = os.urandom(64 * 1024)
        written = self._write(burst)
        self.assertGreater(written, 10_000)
        self._drain(written)
        self.assertTrue(all(len(p) <= 5000 for p in self.pieces))
        self.assertEqual(b"".join(self.pieces), burst[:written])

    def test_keystrokeAtOnce(self) -> None:
        """
        A single keystroke's echo is passed on in the event that finds it,
        alone: the gathering stops when the pty would block, without waiting.
        """
        self._write(b"x")
        waitReadable(self, self.master, 1)
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [b"x"])
        self._write(b"y")
        waitReadable(self, self.master, 1)
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [b"x", b"y"])

    def _countReads(self) -> list[int]:
        """Record the size each os.read in _process returns (or -1 for an error)."""
        reads: list[int] = []
        realRead = os.read

        def read(fd: int, n: int) -> bytes:
            try:
                data = realRead(fd, n)
            except OSError:
                reads.append(-1)
                raise
            reads.append(len(data))
            return data

        self.patch(_process.os, "read", read)
        return reads

    def test_keystrokeIsOneRead(self) -> None:
        """
        A keystroke's echo takes one read: a short read ends the gathering, with
        no second read failing with EAGAIN before the echo is passed on.
        """
        self._write(b"x")
        waitReadable(self, self.master, 1)
        reads = self._countReads()
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [b"x"])
        self.assertEqual(reads, [1])

    def test_fullReadIsFollowedByAnother(self) -> None:
        """A read of a full pty chunk reads on: bulk output gathers past one read."""
        burst = os.urandom(64 * 1024)
        written = self._write(burst)
        waitReadable(self, self.master, _process.PTY_SHORT_READ)
        reads = self._countReads()
        self.assertIsNone(self._event())
        self.assertGreater(len(reads), 1)
        self.assertGreaterEqual(reads[0], _process.PTY_SHORT_READ)
        [piece] = self.pieces
        self.assertEqual(piece, burst[: len(piece)])
        self.assertLessEqual(len(piece), written)

    def test_hangUpAfterLastByte(self) -> None:
        """
        When the child's side closes (the child exited), every byte it wrote
        is passed on before the read reports the connection lost, so the
        process ends (and exit-status is sent) only after all output.
        """
        burst = b"z" * 50_000  # the pty takes what it holds
        written = self._write(burst)
        os.close(self.slave)
        self.slave = -1
        results = []
        while True:
            result = self._event()
            results.append((result, sum(len(p) for p in self.pieces)))
            if result is not None:
                break
        self.assertIs(results[-1][0], main.CONNECTION_LOST)
        self.assertEqual(results[-1][1], written)
        self.assertEqual(b"".join(self.pieces), burst[:written])
        self.assertTrue(all(len(p) <= _process.PTY_BATCH for p in self.pieces))

    def test_hangUpWithNothingWaiting(self) -> None:
        """A hang-up with no output left passes nothing on and reports the loss."""
        os.close(self.slave)
        self.slave = -1
        self.assertIs(self._event(), main.CONNECTION_LOST)
        self.assertEqual(self.pieces, [])


class SessionPTYProcessReadTests(SynchronousTestCase):
    """L{_process._SessionPTYProcess.doRead} hands gathered output to its protocol."""

    def test_doReadGathers(self) -> None:
        """
        One readable event delivers an 8,000-byte burst (read as 4,096 and 3,904
        bytes) as one C{childDataReceived(1, ...)} call, the way the session channel
        then sends it as one packet.
        """
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        tty.setraw(slave)
        os.set_blocking(master, False)
        os.set_blocking(slave, False)
        self.assertEqual(os.write(slave, b"q" * 8_000), 8_000)
        reads = ScriptedReads(self, [b"q" * 4096, b"q" * 3904, errno.EAGAIN])
        child = _process._SessionPTYProcess.__new__(_process._SessionPTYProcess)
        recorder = _Recorder()
        child.fd = master
        child.proto = recorder  # type: ignore[assignment]
        self.assertIsNone(child.doRead())
        self.assertEqual(recorder.calls, [(1, b"q" * 8_000)])
        self.assertEqual(reads.left, [])


class ScriptedReads:
    """C{os.read} in L{_process} replaced: each call returns the next bytes or raises."""

    def __init__(self, testCase: SynchronousTestCase, script: Iterable[bytes | int]) -> None:
        self.left = list(script)
        testCase.patch(_process.os, "read", self.read)

    def read(self, fd: int, n: int) -> bytes:
        step = self.left.pop(0)
        if isinstance(step, int):
            raise OSError(step, os.strerror(step))
        assert len(step) <= n, (len(step), n)
        return step


class GatherTests(SynchronousTestCase):
    """How L{_process._readPty} gathers one event's reads, with the reads scripted."""

    def gather(self, script: list[bytes | int]) -> tuple[list[bytes], Any, ScriptedReads]:
        reads = ScriptedReads(self, script)
        pieces: list[bytes] = []
        return pieces, _process._readPty(-1, pieces.append), reads

    def test_fullReadsGatherIntoOnePiece(self) -> None:
        """Full reads go on until the pty would block: one piece for the event."""
        pieces, result, reads = self.gather([b"a" * 4096, b"b" * 4096, b"c" * 3000, errno.EAGAIN])
        self.assertIsNone(result)
        self.assertEqual(pieces, [b"a" * 4096 + b"b" * 4096 + b"c" * 3000])
        self.assertEqual(reads.left, [])

    def test_shortReadEndsTheGathering(self) -> None:
        """A read under L{PTY_SHORT_READ} ends the event: no read that would only block."""
        pieces, result, reads = self.gather([b"a" * 4096, b"b" * 10, b"never read"])
        self.assertIsNone(result)
        self.assertEqual(pieces, [b"a" * 4096 + b"b" * 10])
        self.assertEqual(reads.left, [b"never read"])

    def test_batchBoundsThePiece(self) -> None:
        """The reads ask for what is left of L{PTY_BATCH}, and stop when it is in hand."""
        self.patch(_process, "PTY_BATCH", 6000)
        pieces, result, reads = self.gather([b"a" * 4096, b"b" * 1904, b"never read"])
        self.assertIsNone(result)
        self.assertEqual(pieces, [b"a" * 4096 + b"b" * 1904])
        self.assertEqual(reads.left, [b"never read"])

    def test_hangUpAfterWhatWasRead(self) -> None:
        """EIO (the child side closed) passes on what was read first, then reports the loss."""
        pieces, result, reads = self.gather([b"a" * 4096, errno.EIO, b"never read"])
        self.assertIs(result, main.CONNECTION_LOST)
        self.assertEqual(pieces, [b"a" * 4096])
        self.assertEqual(reads.left, [b"never read"])


class SignalGroupTests(SynchronousTestCase):
    """L{_process.signalGroup}: the group first, the process alone only while it may be."""

    def setUp(self) -> None:
        self.sent: list[tuple[str, int, int]] = []

        def killpg(pid: int, number: int) -> None:
            self.sent.append(("group", pid, number))
            raise ProcessLookupError(pid)

        def kill(pid: int, number: int) -> None:
            self.sent.append(("process", pid, number))

        self.patch(os, "killpg", killpg)
        self.patch(os, "kill", kill)

    def test_noGroupThenTheProcess(self) -> None:
        """A child that has not called setsid yet leads no group: it is signalled alone."""
        self.assertTrue(_process.signalGroup(4242, signal.SIGTERM))
        self.assertEqual(
            self.sent, [("group", 4242, signal.SIGTERM), ("process", 4242, signal.SIGTERM)]
        )

    def test_reapedLeaderNeverAlone(self) -> None:
        """With orLeader=False (a reaped child) nothing but the group is ever signalled."""
        self.assertFalse(_process.signalGroup(4242, signal.SIGKILL, orLeader=False))
        self.assertEqual(self.sent, [("group", 4242, signal.SIGKILL)])
