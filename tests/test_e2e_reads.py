"""
The e2e harness's bounded reads (tests/e2e/harness.py readLine, readChunk), in-process on
a pipe: a child that never writes fails the test with what it read instead of hanging the
suite, and what follows a line stays in the pipe for the stream's own reads.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e.harness import HarnessError, readChunk, readLine

#: Far below the harness's 30 s: the helper's bound is the same code whatever its length.
SHORT = 0.2


class BoundedReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.openWriters: set[int] = set()

    def pipe(self, text: bool = True) -> tuple[IO[Any], int]:
        """A read stream (as Popen gives it) and the write descriptor, closed after."""
        readEnd, writeEnd = os.pipe()
        stream = os.fdopen(readEnd, "r" if text else "rb")
        self.addCleanup(stream.close)
        self.addCleanup(lambda: os.close(writeEnd) if writeEnd in self.openWriters else None)
        self.openWriters.add(writeEnd)
        return stream, writeEnd

    def closeWriter(self, fd: int) -> None:
        self.openWriters.discard(fd)
        os.close(fd)

    def test_silentPipeFails(self) -> None:
        """A pipe whose writer never writes: HarnessError (an AssertionError), not a hang."""
        stream, _ = self.pipe()
        with self.assertRaises(HarnessError) as caught:
            readLine(stream, "the silent child", timeout=SHORT)
        self.assertIsInstance(caught.exception, AssertionError)
        self.assertIn("no line from the silent child in 0.2 s", str(caught.exception))

    def test_partialLineShownInTheFailure(self) -> None:
        """What came before the line stalled is in the message."""
        stream, writer = self.pipe()
        os.write(writer, b"Allocated po")
        with self.assertRaises(HarnessError) as caught:
            readLine(stream, "ssh -R", timeout=SHORT)
        self.assertIn("read so far: b'Allocated po'", str(caught.exception))

    def test_oneLineAndTheRestLeft(self) -> None:
        """A line, newline included; the next is left for the stream's own read."""
        stream, writer = self.pipe()
        os.write(writer, b"started\nmore\n")
        self.assertEqual(readLine(stream, "the session"), "started\n")
        self.closeWriter(writer)
        self.assertEqual(stream.read(), "more\n")

    def test_ptyLineEndings(self) -> None:
        """A text stream's CRLF (ssh -tt: the pty's) reads as LF, as readline() gives it."""
        stream, writer = self.pipe()
        os.write(writer, b"y\r\ny\r\n")
        self.assertEqual(readLine(stream, "yes"), "y\n")
        binary, binaryWriter = self.pipe(text=False)
        os.write(binaryWriter, b"y\r\n")
        self.assertEqual(readLine(binary, "yes"), "y\r\n")

    def test_endOfFile(self) -> None:
        """At the pipe's end: what came (empty if nothing), as readline() gives it."""
        stream, writer = self.pipe()
        os.write(writer, b"half")
        self.closeWriter(writer)
        self.assertEqual(readLine(stream, "the child"), "half")
        self.assertEqual(readLine(stream, "the child"), "")

    def test_chunks(self) -> None:
        """readChunk: what is there, up to the size; empty at the end; fails when silent."""
        stream, writer = self.pipe(text=False)
        with self.assertRaises(HarnessError) as caught:
            readChunk(stream, "the bulk output", 1 << 20, timeout=SHORT)
        self.assertIn("nothing more from the bulk output in 0.2 s", str(caught.exception))
        os.write(writer, b"abcdef")
        self.assertEqual(readChunk(stream, "the bulk output", 4), b"abcd")
        self.assertEqual(readChunk(stream, "the bulk output", 1 << 20), b"ef")
        self.closeWriter(writer)
        self.assertEqual(readChunk(stream, "the bulk output", 1 << 20), b"")
