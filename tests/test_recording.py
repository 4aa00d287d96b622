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
        jobs, self.jobs = self.jobs, []
        for f, args, d in jobs:
            try:
                d.callback(f(*args))
            except Exception:
                d.errback()


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

    def test_backlogBounded(self) -> None:
        """A writer that does not keep up fails the recording past maxBacklog bytes."""
        runner = HeldRunner()
        failures: list[str] = []
        path = recordingPath(self.directory, "abcdefghij", self.clock.seconds())
        policy = RecordingPolicy(directory=self.directory, flushBytes=1000, maxBacklog=5200)
        recording = Recording.start(
            path, 80, 24, "xterm", self.clock, runner, policy, onFailure=failures.append
        )
        for _ in range(5):
            recording.output(b"y" * 1000)
        self.assertEqual(failures, [])
        recording.output(b"y" * 1000)
        self.assertEqual(failures, ["the disk is not keeping up with the session's output"])
        runner.runAll()

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
