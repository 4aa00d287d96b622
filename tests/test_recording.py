"""
The asciicast recorder on its own: buffering and flush timing on a Clock, the bounded
writer backlog, the strict format check (and asciinema's own reader when installed),
and retention by age and size driven by a Clock.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.recording import (
    CastFormatError,
    Recorder,
    Recording,
    RecordingError,
    RecordingPolicy,
    RetentionService,
    openRecordingFile,
    parseCast,
    parseSize,
    pruneRecordings,
    recordingPath,
    synchronousRunner,
)


class HeldRunner:
    """A runner that runs nothing until told: the writer thread, paused."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def runAll(self) -> None:
        """Run every job, including those queued by the completion of earlier ones."""
        while self.jobs:
            self.runNext()

    def runNext(self) -> None:
        """Complete the oldest job (the writer thread finishing one write)."""
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def failNext(self, error: Exception) -> None:
        """Fail the oldest job with C{error} instead of running it."""
        _f, _args, d = self.jobs.pop(0)
        d.errback(error)

    def writes(self) -> list[bytes]:
        """The data of the write jobs queued now."""
        return [args[1] for f, args, _ in self.jobs if f.__name__ == "_writeAll"]


class RecordingTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.policy = RecordingPolicy(directory=self.directory)

    def start(self, runner: Any = synchronousRunner, **policy: Any) -> Recording:
        chosen = RecordingPolicy(directory=self.directory, **policy)
        path = recordingPath(self.directory, "abcdefghij", self.clock.seconds())
        return Recording.start(path, 80, 24, "xterm", self.clock, runner, chosen)

    def lines(self, recording: Recording) -> list[str]:
        return recording.path.read_text().splitlines()


class BufferingTests(RecordingTestCase):
    def test_headerWrittenAtOnce(self) -> None:
        """The header is on disk as soon as the recording starts (a full disk refuses it)."""
        recording = self.start()
        self.assertEqual(
            recording.path.relative_to(self.directory).as_posix(), "2027/01/15/abcdefghij.cast"
        )
        (header,) = self.lines(recording)
        self.assertIn('"version": 2', header)
        self.assertEqual(oct(recording.path.stat().st_mode & 0o777), "0o600")

    def test_flushAfterInterval(self) -> None:
        """Output waits in memory until the flush interval passes, then is written."""
        recording = self.start(flushInterval=1.0)
        recording.output(b"hello")
        self.clock.advance(0.5)
        recording.output(b" world")
        self.assertEqual(len(self.lines(recording)), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.lines(recording)[1:], ['[0.0, "o", "hello"]', '[0.5, "o", " world"]'])

    def test_flushBySize(self) -> None:
        """Reaching flushBytes writes at once, without waiting for the clock."""
        recording = self.start(flushBytes=1024)
        recording.output(b"x" * 2000)
        self.assertEqual(len(self.lines(recording)), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closeWritesTheRest(self) -> None:
        """Closing writes what is buffered, including a dangling partial UTF-8 sequence."""
        recording = self.start()
        recording.output(b"ab\xc3")
        self.successResultOf(recording.close())
        cast = parseCast(recording.path.read_bytes())
        self.assertEqual("".join(t for _, _, t in cast.events), "ab\ufffd")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_writesInOrderThroughRunner(self) -> None:
        """Writes go through the runner (the writer thread) in order."""
        runner = HeldRunner()
        recording = self.start(runner=runner, flushBytes=1)
        recording.output(b"1")
        recording.output(b"2")
        self.assertEqual(len(self.lines(recording)), 1)  # nothing written on this thread
        runner.runAll()
        self.assertEqual(
            [t for _, _, t in parseCast(recording.path.read_bytes()).events], ["1", "2"]
        )


class WriteInFlightTests(RecordingTestCase):
    """One write in flight per recording; flushes meanwhile are joined; back-pressure."""

    def setUp(self) -> None:
        super().setUp()
        self.runner = HeldRunner()
        self.throttle: list[bool] = []
        self.failures: list[str] = []

    def begin(self, **policy: Any) -> Recording:
        path = recordingPath(self.directory, "abcdefghij", self.clock.seconds())
        chosen = RecordingPolicy(directory=self.directory, **policy)
        return Recording.start(
            path,
            80,
            24,
            "xterm",
            self.clock,
            self.runner,
            chosen,
            onFailure=self.failures.append,
            onThrottle=self.throttle.append,
        )

    def texts(self, recording: Recording) -> list[str]:
        return [t for _, _, t in parseCast(recording.path.read_bytes()).events]

    def test_oneWriteInFlightThenOneJoinedWrite(self) -> None:
        """Flushes during a write wait and go, in order, as one joined write after it."""
        recording = self.begin(flushBytes=1)
        recording.output(b"a")
        recording.output(b"b")
        recording.output(b"c")
        recording.output(b"d")
        self.assertEqual(len(self.runner.writes()), 1)  # only "a" is being written
        self.runner.runNext()
        (joined,) = self.runner.writes()
        self.assertEqual(joined.count(b"\n"), 3)  # b, c and d in one write
        self.runner.runNext()
        self.assertEqual(self.runner.jobs, [])
        self.assertEqual(self.texts(recording), ["a", "b", "c", "d"])
        self.assertEqual(recording.writes, 2)
        self.assertEqual(recording.written, recording.path.stat().st_size)

    def test_flushByTimeStillOneInFlight(self) -> None:
        """The flush interval still hands data over; it waits for the write in flight."""
        recording = self.begin()
        recording.output(b"first")
        self.clock.advance(1.0)
        recording.output(b"second")
        self.clock.advance(1.0)
        self.assertEqual(len(self.runner.writes()), 1)
        self.runner.runAll()
        self.assertEqual(self.texts(recording), ["first", "second"])

    def test_closeFiresAfterPendingWrites(self) -> None:
        """close() writes everything, closes the file after the last write, then fires."""
        recording = self.begin(flushBytes=1)
        recording.output(b"a")
        recording.output(b"b")
        recording.output(b"tail\xc3")
        closed = recording.close()
        self.assertNoResult(closed)
        self.runner.runNext()  # "a"
        self.assertNoResult(closed)
        self.assertEqual(len(self.runner.writes()), 1)  # b and the tail, joined
        self.runner.runNext()
        self.assertNoResult(closed)  # the close is queued after the last write
        self.runner.runAll()
        self.successResultOf(closed)
        self.assertEqual(self.texts(recording), ["a", "b", "tail", "\ufffd"])
        self.assertEqual(self.failures, [])

    def test_writeErrorFailsTheRecording(self) -> None:
        """A failed write (EIO) fails the recording once; pending data is dropped; close fires."""
        recording = self.begin(flushBytes=1)
        recording.output(b"a")
        recording.output(b"b")
        self.runner.failNext(OSError(errno.EIO, "Input/output error"))
        self.assertEqual(self.failures, ["Input/output error"])
        self.assertEqual(recording.failed, "Input/output error")
        self.assertEqual(self.runner.writes(), [])  # "b" is not written after the failure
        self.runner.runAll()  # the file is closed
        recording.output(b"c")
        self.assertEqual(self.runner.jobs, [])
        self.successResultOf(recording.close())

    def test_writeErrorWhileClosing(self) -> None:
        """A write failing after close() still fires close() (without onFailure)."""
        recording = self.begin(flushBytes=1)
        recording.output(b"a")
        closed = recording.close()
        self.runner.failNext(OSError(errno.ENOSPC, "No space left on device"))
        self.runner.runAll()
        self.successResultOf(closed)
        self.assertEqual(self.failures, [])
        self.assertEqual(recording.failed, "No space left on device")

    def test_backlogHoldsOutputBackInsteadOfFailing(self) -> None:
        """Past maxBacklog the session is held back, not failed; below half it resumes."""
        recording = self.begin(flushBytes=1000, maxBacklog=5200)
        for _ in range(5):
            recording.output(b"y" * 1000)
        self.assertEqual(self.throttle, [])
        recording.output(b"y" * 1000)  # about 6 KB waits for the disk
        self.assertEqual(self.throttle, [True])
        self.assertTrue(recording.throttled)
        recording.output(b"y" * 1000)  # what still arrives is kept
        self.assertEqual(self.throttle, [True])
        self.runner.runNext()  # the first 1 KB: still above half
        self.assertEqual(self.throttle, [True])
        self.runner.runNext()  # the joined rest: caught up
        self.assertEqual(self.throttle, [True, False])
        self.assertEqual(recording.holds, 1)
        self.runner.runAll()
        self.assertEqual(self.failures, [])
        self.assertIsNone(recording.failed)
        self.assertEqual("".join(self.texts(recording)), "y" * 7000)

    def test_failureReleasesTheHold(self) -> None:
        """A recording that fails while holding the session back lets it go (fail-open)."""
        recording = self.begin(flushBytes=1000, maxBacklog=1500)
        recording.output(b"y" * 1000)
        recording.output(b"y" * 1000)
        self.assertEqual(self.throttle, [True])
        self.runner.failNext(OSError(errno.ENOSPC, "No space left on device"))
        self.assertEqual(self.throttle, [True, False])

    def test_writeFailureReported(self) -> None:
        """A write error (ENOSPC) is reported once through onFailure, and writing stops."""
        failures: list[str] = []

        class Full:
            closed = False

            def __init__(self) -> None:
                self.header = True

            def write(self, data: Any) -> int:
                if self.header:
                    self.header = False
                    return len(data)
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self) -> None:
                self.closed = True

        disk = Full()
        path = recordingPath(self.directory, "abcdefghij", self.clock.seconds())
        recording = Recording.start(
            path,
            80,
            24,
            "xterm",
            self.clock,
            synchronousRunner,
            self.policy,
            opener=lambda p: disk,  # type: ignore[arg-type,return-value]
            onFailure=failures.append,
        )
        recording.output(b"x")
        self.clock.advance(1)
        recording.output(b"y")
        self.clock.advance(1)
        self.assertEqual(failures, ["No space left on device"])
        self.assertTrue(disk.closed)
        self.assertEqual(recording.failed, "No space left on device")

    def test_openRefusesOverwrite(self) -> None:
        """A recording never overwrites an existing file."""
        path = self.directory / "x.cast"
        path.write_text("old")
        with self.assertRaises(FileExistsError):
            openRecordingFile(path)
        recorder = Recorder(self.policy, self.clock, opener=lambda p: openRecordingFile(path))
        with self.assertRaises(RecordingError):
            recorder.begin("abcdefghij", 80, 24, "xterm")


class FormatTests(RecordingTestCase):
    def test_strictFormat(self) -> None:
        """parseCast rejects what asciinema would choke on."""
        good = '{"version": 2, "width": 80, "height": 24}\n[0.5, "o", "x"]\n'
        self.assertEqual(parseCast(good).events, [(0.5, "o", "x")])
        for bad in [
            "",
            '{"version": 1, "width": 80, "height": 24}\n',
            '{"version": 2, "width": 0, "height": 24}\n',
            '{"version": 2, "width": 80, "height": 24}\n[1, "o"]\n',
            '{"version": 2, "width": 80, "height": 24}\n[1, "o", "a"]\n[0.5, "o", "b"]\n',
            '{"version": 2, "width": 80, "height": 24}\n[1, "r", "wide"]\n',
            '{"version": 2, "width": 80, "height": 24}\nnot json\n',
        ]:
            with self.assertRaises(CastFormatError, msg=bad):
                parseCast(bad)

    def test_asciinemaReadsIt(self) -> None:
        """When asciinema is installed, 'asciinema cat' prints exactly the recorded output."""
        asciinema = shutil.which("asciinema") or str(Path(sys.executable).parent / "asciinema")
        if not os.path.exists(asciinema):
            raise self.skipTest("asciinema is not installed")
        recording = self.start()
        recording.output("caf\u00e9 \x1b[31mred\x1b[0m\r\n".encode())
        recording.resize(100, 30)
        self.successResultOf(recording.close())
        out = subprocess.run(
            [asciinema, "cat", str(recording.path)], capture_output=True, check=True, timeout=60
        ).stdout
        self.assertEqual(out, "caf\u00e9 \x1b[31mred\x1b[0m\r\n".encode())

    def test_parseSize(self) -> None:
        """Retention sizes are written like 10G, 500M, 64k."""
        self.assertEqual(parseSize("10G"), 10 << 30)
        self.assertEqual(parseSize("500m"), 500 << 20)
        self.assertEqual(parseSize("64KiB"), 64 << 10)
        self.assertEqual(parseSize("1000"), 1000)
        for bad in ("", "G", "-1G", "1.5G", "10X"):
            with self.assertRaises(ValueError):
                parseSize(bad)


class RetentionTests(RecordingTestCase):
    def make(self, name: str, age: float, size: int) -> Path:
        path = recordingPath(self.directory, name, self.clock.seconds() - age)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        mtime = self.clock.seconds() - age
        os.utime(path, (mtime, mtime))
        return path

    def test_byAge(self) -> None:
        """Recordings older than maxAge go, with their emptied date directories."""
        old = self.make("aaaaaaaaaa", 91 * 86400, 10)
        new = self.make("bbbbbbbbbb", 89 * 86400, 10)
        removed = pruneRecordings(self.directory, self.clock.seconds(), 90 * 86400, None)
        self.assertEqual(removed, [old])
        self.assertFalse(old.parent.exists())
        self.assertTrue(new.exists())

    def test_bySizeOldestFirstSparingLive(self) -> None:
        """Over maxBytes, the oldest go first, but never a recording still being written."""
        oldest = self.make("aaaaaaaaaa", 30, 100)
        middle = self.make("bbbbbbbbbb", 20, 100)
        newest = self.make("cccccccccc", 10, 100)
        removed = pruneRecordings(
            self.directory, self.clock.seconds(), None, 150, keep=frozenset({oldest})
        )
        self.assertEqual(removed, [middle, newest])
        self.assertTrue(oldest.exists())

    def test_periodicWithClock(self) -> None:
        """The retention service prunes at start and again every pruneInterval."""
        recorder = Recorder(
            RecordingPolicy(directory=self.directory, maxAge=100.0, pruneInterval=3600.0),
            self.clock,
        )
        service = RetentionService(recorder, self.clock, lambda: ())
        first = self.make("aaaaaaaaaa", 0, 1)
        service.startService()
        self.assertEqual(service.passes, 1)
        self.assertTrue(first.exists())
        self.clock.advance(3600)
        self.assertEqual(service.passes, 2)
        self.assertFalse(first.exists())
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
