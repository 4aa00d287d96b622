"""
agent._process reads a pty child's output: a burst in packet-sized pieces, a
keystroke at once, hang-up after the last byte. A real pty pair (os.openpty),
no reactor: each L{_readPty} call is what one readable event does.
"""

from __future__ import annotations

import os
import tty
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


class ReadPtyTests(SynchronousTestCase):
    """L{_process._readPty} on a raw pty whose slave end the test writes."""

    def setUp(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # bytes pass unchanged (no ONLCR, no echo)
        for fd in (self.master, self.slave):
            os.set_blocking(fd, False)
        self.addCleanup(self._close)
        self.pieces: list[bytes] = []

    def _close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)

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

    def test_burstInOnePiece(self) -> None:
        """
        A burst the child wrote at once (as much as the pty holds: ~11.5 KiB
        here, which plain reads return in 3-4 pieces of at most 4 KiB) comes
        out of one event as one piece.
        """
        burst = os.urandom(64 * 1024)
        written = self._write(burst)
        self.assertGreater(written, 4096)
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [burst[:written]])
        # Nothing more: the next event reads nothing and passes nothing on.
        self.assertIsNone(self._event())
        self.assertEqual(len(self.pieces), 1)

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
        while True:
            before = len(self.pieces)
            self.assertIsNone(self._event())
            if len(self.pieces) == before:
                break
        self.assertEqual(self.pieces[0], burst[:5000])
        self.assertTrue(all(len(p) <= 5000 for p in self.pieces))
        self.assertEqual(b"".join(self.pieces), burst[:written])

    def test_keystrokeAtOnce(self) -> None:
        """
        A single keystroke's echo is passed on in the event that finds it,
        alone: the gathering stops when the pty would block, without waiting.
        """
        self._write(b"x")
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [b"x"])
        self._write(b"y")
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
        reads = self._countReads()
        self._write(b"x")
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [b"x"])
        self.assertEqual(reads, [1])

    def test_fullReadIsFollowedByAnother(self) -> None:
        """A read of a full pty chunk reads on: bulk output still gathers into one piece."""
        reads = self._countReads()
        burst = os.urandom(64 * 1024)
        written = self._write(burst)
        self.assertIsNone(self._event())
        self.assertEqual(self.pieces, [burst[:written]])
        self.assertGreater(len(reads), 1)
        self.assertGreaterEqual(reads[0], _process.PTY_SHORT_READ)

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
        One readable event delivers an 8,000-byte burst as one
        C{childDataReceived(1, ...)} call, the way the session channel then
        sends it as one packet.
        """
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        tty.setraw(slave)
        os.set_blocking(master, False)
        os.set_blocking(slave, False)
        self.assertEqual(os.write(slave, b"q" * 8_000), 8_000)
        child = _process._SessionPTYProcess.__new__(_process._SessionPTYProcess)
        recorder = _Recorder()
        child.fd = master
        child.proto = recorder  # type: ignore[assignment]
        self.assertIsNone(child.doRead())
        self.assertEqual(recorder.calls, [(1, b"q" * 8_000)])
