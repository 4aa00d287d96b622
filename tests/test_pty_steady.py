"""
A keystroke's way through the agent's pty, written out (agent._process._SessionPTYProcess):
its write goes to the pty with C{os.write} from C{write} itself (no C{writeSomeData},
C{fdesc.writeToFD}), and falls back to Twisted's buffer when the pty is full; its echo
is one short read handed to the protocol from C{doRead} itself, while long output still
gathers up to a packet. A real pty pair (os.openpty), a MemoryReactor, no child; where
the session's side is needed, the real SessionChannel over a recording connection.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import abstract, main
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from agent import _process
from agent.session import SessionChannel, SessionEnvironment, _ChildProtocol
from tests.test_agent_process import RawPtyCase, _Recorder, waitReadable
from tests.test_agent_session import WINDOW, RecordingConnection
from tests.test_writethrough import fillThenDrain


class PtyFixture(RawPtyCase):
    """A L{_process._SessionPTYProcess} on the master of a raw pty, the slave the child's end."""

    def setUp(self) -> None:
        super().setUp()
        self.reactor = MemoryReactor()
        child: Any = _process._SessionPTYProcess.__new__(_process._SessionPTYProcess)
        abstract.FileDescriptor.__init__(child, self.reactor)
        child.fd = self.master
        child.connected = 1
        self.recorder = _Recorder()
        child.proto = self.recorder
        self.child = child

    def settle(self, n: int) -> None:
        """Wait until C{n} bytes written to the slave are readable on the master."""
        waitReadable(self, self.master, n)


class PtyWriteTests(PtyFixture):
    def test_keystrokeLeavesInsideWrite(self) -> None:
        """A keystroke is on the child's side of the pty when write returns, written
        by os.write in write itself: writeSomeData is never called."""

        def notCalled(data: Any) -> Any:
            raise AssertionError("writeSomeData called for a write through")

        self.child.writeSomeData = notCalled
        self.child.write(b"k")
        self.assertEqual(os.read(self.slave, 100), b"k")
        self.assertNotIn(self.child, self.reactor.getWriters())

    def test_fullPtyBuffersInOrder(self) -> None:
        """When the pty takes part or nothing (EAGAIN), the rest waits in Twisted's
        buffer and doWrite delivers every byte in order once the child reads."""
        fillThenDrain(self, self.child, self.reactor, self.slave)


class PtyReadTests(PtyFixture):
    def countReads(self) -> list[int]:
        """Count the os.read calls made from now on."""
        sizes: list[int] = []
        real = os.read

        def read(fd: int, size: int) -> bytes:
            sizes.append(size)
            return real(fd, size)

        self.patch(_process.os, "read", read)
        return sizes

    def test_echoIsOneRead(self) -> None:
        """A keystroke's echo (a short read) goes to the protocol after one read: no
        second read to find the pty empty."""
        os.write(self.slave, b"k")
        self.settle(1)
        reads = self.countReads()
        self.assertIsNone(self.child.doRead())
        self.assertEqual(self.recorder.calls, [(1, b"k")])
        self.assertEqual(len(reads), 1)

    def test_echoGoesStraightToThePtyOutput(self) -> None:
        """A protocol that names its pty output (the session's) gets the echo there, not
        through childDataReceived; the session's is what childDataReceived(1, ...) does."""
        direct: list[bytes] = []
        self.recorder.ptyOutput = direct.append  # type: ignore[attr-defined]
        os.write(self.slave, b"k")
        self.settle(1)
        self.assertIsNone(self.child.doRead())
        self.assertEqual(direct, [b"k"])
        self.assertEqual(self.recorder.calls, [])

        # The real session channel, so the two ways in cannot drift from its interface.
        conn = RecordingConnection()
        channel = conn.attach(
            SessionChannel(SessionEnvironment(home="/nonexistent"), Clock(), **WINDOW)
        )
        protocol = _ChildProtocol(channel)
        protocol.childDataReceived(1, b"through the protocol")
        protocol.ptyOutput(b"straight")
        self.assertEqual(conn.events, [("data", b"through the protocol"), ("data", b"straight")])

    def test_longOutputGathersUpToAPacket(self) -> None:
        """
        A long first read (past PTY_SHORT_READ) is passed on together with what the
        reads after it gather, at most one packet (PTY_BATCH) per event, every byte in
        order. (How much each event gathers depends on how fast the kernel refills the
        pty between reads, so only the bounds and the bytes are checked.)
        """
        data = bytes(range(256)) * 160  # 40,960 bytes: more than one packet
        written = os.write(self.slave, data)
        self.settle(_process.PTY_SHORT_READ)
        self.assertIsNone(self.child.doRead())
        self.assertGreaterEqual(len(self.recorder.calls[0][1]), _process.PTY_SHORT_READ)
        for _ in range(1000):
            if sum(len(piece) for _, piece in self.recorder.calls) >= written:
                break
            self.settle(1)
            self.assertIsNone(self.child.doRead())
        pieces = [piece for fd, piece in self.recorder.calls]
        self.assertTrue(all(fd == 1 for fd, _ in self.recorder.calls))
        self.assertLessEqual(max(map(len, pieces)), _process.PTY_BATCH)
        self.assertEqual(b"".join(pieces), data[:written])

    def test_nothingToRead(self) -> None:
        """A read that would block passes nothing on and is no loss."""
        self.assertIsNone(self.child.doRead())
        self.assertEqual(self.recorder.calls, [])

    def test_hangUp(self) -> None:
        """The child's side closed with nothing left: the pty reports the loss (EIO)."""
        os.close(self.slave)
        self.slave = -1
        self.assertIs(self.child.doRead(), main.CONNECTION_LOST)
        self.assertEqual(self.recorder.calls, [])
