"""
Session recordings: asciicast v2 files of pty sessions, their retention, and
reading them back with dangerous terminal escapes neutralised.

A recording lives at C{DATA/recordings/YYYY/MM/DD/SESSIONID.cast} (UTC date of
the session's start). The header carries the terminal size, C{TERM} and the
start time (a pty given no size, 0x0, is recorded as the 80x24 programs then assume,
with C{"pty_size": "0x0"} saying what was negotiated: asciicast v2 has no 0-column
terminal); each piece of device output becomes an C{"o"} event with its time
relative to the start, each window change an C{"r"} event. Operator input is
not recorded.

Writing never blocks the reactor on the disk. Opening the file and writing
its header happen once, synchronously, when the session starts: a few hundred
bytes into the page cache, no fsync, and the only way to refuse a session
before it runs when the disk is full. After that, events are buffered in
memory and handed to one writer thread (a single-worker pool, so writes stay
in order) at least every L{RecordingPolicy.flushInterval} seconds, or as soon
as L{RecordingPolicy.flushBytes} are buffered. A recording has at most one
write in flight: what is flushed meanwhile waits and goes as one joined write
when the previous one completes, so writes grow with the load instead of
queueing up behind the thread (each small write used to wait for the GIL
while the reactor was busy relaying, and fast output outran them).

If the data waiting for the disk still grows past
L{RecordingPolicy.maxBacklog}, the recording holds back the session's output
(C{onThrottle(True)}: the relay stops crediting the device's channel) until
it is written down to half of that (C{onThrottle(False)}). Fast output is
slowed, never a reason to end the session; only a write that fails (a full
disk, an I/O error) fails the recording.

A recording that fails is handled by policy: fail-closed (the default) refuses
a session whose recording cannot be opened and ends a session whose recording
breaks; fail-open lets the session go on and says so in the log and the audit
trail. The session side of that lives in L{groundcontrol.sessions}.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from accesstunnel.clocks import elapsedClock
from accesstunnel.reasontext import reasonText

_T = TypeVar("_T")

#: The directory under DATA that holds recordings.
RECORDINGS_DIRECTORY = "recordings"

#: What a recording file's name looks like: the session id and this suffix.
CAST_SUFFIX = ".cast"


#: What programs assume when the pty was given no size (0 columns or rows): the
#: kernel's window size is 0x0 and curses and readline fall back to terminfo's
#: 80 columns and 24 lines.
ASSUMED_SIZE = (80, 24)


def playableSize(cols: int, rows: int) -> tuple[int, int]:
    """
    The size a recording says for a pty of C{cols}x{rows}: asciicast v2 wants the
    terminal's width and height, and no player draws 0 columns, so a 0 (ssh -tt without
    a terminal asks for 0x0) is what programs then assume (L{ASSUMED_SIZE}).
    """
    return (cols or ASSUMED_SIZE[0], rows or ASSUMED_SIZE[1])


def describeSize(cols: int, rows: int) -> str:
    """
    A pty's size as negotiated, and what it is recorded as when that differs: the one
    wording that C{watch} shows and the recording's C{pty_size} header key explains.
    """
    size = f"{cols}x{rows}"
    width, height = playableSize(cols, rows)
    if (width, height) == (cols, rows):
        return size
    return f"{size} (no size given; programs and the recording assume {width}x{height})"


class RecordingError(Exception):
    """A recording could not be opened or written; the text says why."""


class Runner(Protocol):
    """Run a blocking callable somewhere; its outcome arrives in a Deferred."""

    def __call__(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]: ...


def synchronousRunner(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
    """Run C{f} inline (unit tests): an already-fired Deferred, failures included."""
    try:
        return defer.succeed(f(*args))
    except BaseException:
        return defer.fail()


def writerThread(reactor: Any) -> Runner:
    """
    A runner backed by one writer thread that starts with the reactor and stops
    during its shutdown. One worker keeps every recording's writes in order.
    """
    pool = ThreadPool(minthreads=1, maxthreads=1, name="groundcontrol-recording")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        return threads.deferToThreadPool(reactor, pool, f, *args)

    return run


#: Opens a new recording file for writing: C{opener(path) -> binary file}.
Opener = Callable[[Path], IO[bytes]]


def openRecordingFile(path: Path) -> IO[bytes]:
    """Create C{path} (and its directories), owner-only, refusing to overwrite."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb", buffering=0)


def _writeAll(handle: IO[bytes], data: bytes) -> None:
    """Write all of C{data} (an unbuffered file may take only part of it)."""
    view = memoryview(data)
    while view:
        n = handle.write(view)
        if n is None or n <= 0:
            raise OSError("short write to the recording")
        view = view[n:]


def _close(handle: IO[bytes]) -> None:
    handle.close()


@attrs.frozen
class RecordingPolicy:
    """Where recordings go, what happens when they fail, and how long they stay."""

    #: DATA/recordings; None records nothing.
    directory: Path | None = None
    #: Fail-open: a broken recording does not stop the session.
    failOpen: bool = False
    #: Recordings older than this many seconds are deleted (None: kept).
    maxAge: float | None = None
    #: The oldest recordings are deleted while all of them take more (None: no cap).
    maxBytes: int | None = None
    flushInterval: float = 1.0
    flushBytes: int = 64 * 1024
    #: Bytes flushed and not yet written above which the session's output is
    #: held back (it resumes below half of this).
    maxBacklog: int = 8 * 1024 * 1024
    #: Seconds between retention passes.
    pruneInterval: float = 3600.0

    @property
    def enabled(self) -> bool:
        return self.directory is not None


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parseSize(text: str) -> int:
    """Bytes in C{10G}, C{512M}, C{64k}, C{1000} (binary units); ValueError otherwise."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in _SIZE_UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"bad size {text!r}: use a whole number and a unit, e.g. 500M, 10G")
    return int(number) * _SIZE_UNITS[unit]


def recordingPath(directory: Path, sessionId: str, startedAt: float) -> Path:
    """DIRECTORY/YYYY/MM/DD/SESSIONID.cast for a session started at C{startedAt} (UTC)."""
    day = time.strftime("%Y/%m/%d", time.gmtime(startedAt))
    return directory / day / f"{sessionId}{CAST_SUFFIX}"


class Recording:
    """
    One session's asciicast file, open for appending events.

    Events are buffered and flushed by the clock (C{flushInterval}) or by size
    (C{flushBytes}); one write is in flight at a time and what is flushed
    meanwhile goes as one joined write after it. C{onThrottle(True)} asks the
    session to hold its output back while more than C{maxBacklog} bytes wait
    for the disk, C{onThrottle(False)} lets it go again. L{failed} holds the
    reason once the recording broke, and C{onFailure} is called once with it.
    """

    _log = Logger()

    def __init__(
        self,
        path: Path,
        handle: IO[bytes],
        startedAt: float,
        clock: IReactorTime,
        runner: Runner,
        policy: RecordingPolicy,
        onFailure: Callable[[str], None] | None = None,
        onThrottle: Callable[[bool], None] | None = None,
    ) -> None:
        self.path = path
        self._handle: IO[bytes] | None = handle
        self.startedAt = startedAt
        self._clock = clock
        # Event times are a duration since the start, on a clock a step does not move (a
        # step back froze them for as long, a step forward put a gap of its size in the cast).
        self._elapsed = elapsedClock(clock)
        self._elapsedStart = self._elapsed()
        self._runner = runner
        self._policy = policy
        self._onFailure = onFailure
        self._onThrottle = onThrottle
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer: list[bytes] = []
        self._buffered = 0
        #: Flushed, waiting for the write in flight to complete.
        self._pending: list[bytes] = []
        #: Bytes flushed and not yet written (pending and in flight).
        self._backlog = 0
        self._writing = False
        #: The session's output is held back (C{onThrottle(True)} was called).
        self.throttled = False
        self._timer: IDelayedCall | None = None
        self._last = 0.0
        self._closing: defer.Deferred[None] | None = None
        self.failed: str | None = None
        #: Bytes of the file written so far (header included).
        self.written = 0
        #: Writes handed to the runner (each joins everything flushed meanwhile).
        self.writes = 0
        #: Times the session's output was held back for the disk.
        self.holds = 0

    @classmethod
    def start(
        cls,
        path: Path,
        width: int,
        height: int,
        term: str,
        clock: IReactorTime,
        runner: Runner,
        policy: RecordingPolicy,
        opener: Opener = openRecordingFile,
        title: str | None = None,
        onFailure: Callable[[str], None] | None = None,
        onThrottle: Callable[[bool], None] | None = None,
    ) -> Recording:
        """
        Open the file and write the header now, so that a full disk refuses the
        session before it starts. Raises L{RecordingError}.
        """
        startedAt = clock.seconds()
        cols, rows = max(0, int(width)), max(0, int(height))
        header: dict[str, Any] = {"version": 2}
        header["width"], header["height"] = playableSize(cols, rows)
        header["timestamp"] = int(startedAt)
        header["env"] = {"TERM": term}
        if (header["width"], header["height"]) != (cols, rows):
            header["pty_size"] = f"{cols}x{rows}"  # what was negotiated (describeSize)
        if title:
            header["title"] = title
        line = (json.dumps(header, ensure_ascii=False) + "\n").encode("utf-8")
        handle = None
        try:
            handle = opener(path)
            _writeAll(handle, line)
        except OSError as e:
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
            raise RecordingError(
                f"cannot start the recording {path.name}: {reasonText(e)}"
            ) from None
        recording = cls(path, handle, startedAt, clock, runner, policy, onFailure, onThrottle)
        recording.written = len(line)
        return recording

    # -- events ------------------------------------------------------------------

    def output(self, data: bytes) -> None:
        """Device output: an C{"o"} event."""
        text = self._decoder.decode(data)
        if text:
            self._event("o", text)

    def resize(self, cols: int, rows: int) -> None:
        """A window change: an C{"r"} event (C{COLSxROWS}, a 0 as L{playableSize} says)."""
        width, height = playableSize(cols, rows)
        self._event("r", f"{width}x{height}")

    def _event(self, code: str, text: str) -> None:
        if self.failed is not None or self._closing is not None:
            return
        now = max(self._last, self._elapsed() - self._elapsedStart)
        self._last = now
        line = json.dumps([round(now, 6), code, text], ensure_ascii=False) + "\n"
        encoded = line.encode("utf-8")
        self._buffer.append(encoded)
        self._buffered += len(encoded)
        if self._buffered >= self._policy.flushBytes:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._policy.flushInterval, self.flush)

    # -- writing -----------------------------------------------------------------

    def flush(self) -> None:
        """Hand everything buffered to the writer (after the write in flight, if any)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._buffer or self.failed is not None or self._handle is None:
            return
        self._pending.extend(self._buffer)
        self._backlog += self._buffered
        self._buffer.clear()
        self._buffered = 0
        if self._backlog > self._policy.maxBacklog:
            self._throttle(True)
        self._writeNext()

    def _writeNext(self) -> None:
        """Start one write of everything pending, unless one is in flight."""
        if self._writing or not self._pending or self._handle is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._writing = True
        self.writes += 1
        d = self._runner(_writeAll, self._handle, data)
        d.addCallbacks(self._wrote, self._writeFailed, callbackArgs=(len(data),))

    def _wrote(self, _: Any, n: int) -> None:
        self._writing = False
        self._backlog -= n
        self.written += n
        if self.throttled and self._backlog <= self._policy.maxBacklog // 2:
            self._throttle(False)
        if self._pending:
            self._writeNext()
        elif self._closing is not None:
            self._closeFile()

    def _writeFailed(self, failure: Any) -> None:
        self._writing = False
        self._fail(reasonText(failure.value))

    def _throttle(self, hold: bool) -> None:
        if self.throttled == hold:
            return
        self.throttled = hold
        self.holds += hold
        if self._onThrottle is not None:
            self._onThrottle(hold)

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        self._buffer.clear()
        self._buffered = 0
        self._pending.clear()
        self._backlog = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._log.error("recording {path} failed: {reason}", path=str(self.path), reason=reason)
        self._throttle(False)
        if self._onFailure is not None and self._closing is None:
            self._onFailure(reason)
        self._closeFile()

    def close(self) -> defer.Deferred[None]:
        """
        Write what is left and close the file; fires once the last write is done
        and the file is on its way to disk.
        """
        if self._closing is not None:
            return self._closing
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._event("o", tail)
        self.flush()
        self._closing = defer.Deferred()
        closing = self._closing
        if not self._writing:
            self._closeFile()
        return closing

    def _closeFile(self) -> None:
        """Close the file (no write is in flight); then fire L{close}'s Deferred."""
        handle, self._handle = self._handle, None
        closing = self._closing
        if handle is not None:
            self._log.info(
                "recording {path} closed: {written} bytes in {writes} writes,"
                " output held back {holds} times",
                path=self.path.name,
                written=self.written,
                writes=self.writes,
                holds=self.holds,
            )
        if handle is None:
            if closing is not None and not closing.called:
                closing.callback(None)
            return
        d = self._runner(_close, handle)
        d.addErrback(self._writeFailed)
        if closing is not None:
            d.addBoth(lambda _: None if closing.called else closing.callback(None))


class Recorder:
    """Starts recordings under a policy: the session registry's view of recording."""

    def __init__(
        self,
        policy: RecordingPolicy,
        clock: IReactorTime,
        runner: Runner = synchronousRunner,
        opener: Opener = openRecordingFile,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._runner = runner
        self._opener = opener

    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    def begin(
        self,
        sessionId: str,
        width: int,
        height: int,
        term: str,
        title: str | None = None,
        onFailure: Callable[[str], None] | None = None,
        onThrottle: Callable[[bool], None] | None = None,
    ) -> Recording:
        """Start a session's recording; raises L{RecordingError}."""
        assert self.policy.directory is not None
        path = recordingPath(self.policy.directory, sessionId, self._clock.seconds())
        return Recording.start(
            path,
            width,
            height,
            term,
            self._clock,
            self._runner,
            self.policy,
            opener=self._opener,
            title=title,
            onFailure=onFailure,
            onThrottle=onThrottle,
        )

    def read(self, path: Path) -> defer.Deferred[bytes]:
        """Read a recording (off the reactor thread)."""
        return self._runner(Path.read_bytes, path)

    def prune(self, keep: Iterable[Path] = ()) -> defer.Deferred[list[Path]]:
        """Apply retention now, sparing C{keep} (recordings still being written)."""
        directory = self.policy.directory
        if directory is None or (self.policy.maxAge is None and self.policy.maxBytes is None):
            return defer.succeed([])
        return self._runner(
            pruneRecordings,
            directory,
            self._clock.seconds(),
            self.policy.maxAge,
            self.policy.maxBytes,
            frozenset(keep),
        )


# -- retention -------------------------------------------------------------------


def _casts(directory: Path) -> Iterator[tuple[Path, float, int]]:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if not name.endswith(CAST_SUFFIX):
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            yield path, st.st_mtime, st.st_size


def pruneRecordings(
    directory: Path,
    now: float,
    maxAge: float | None,
    maxBytes: int | None,
    keep: frozenset[Path] = frozenset(),
) -> list[Path]:
    """
    Delete recordings last written more than C{maxAge} seconds before C{now},
    then the oldest ones while all of them together exceed C{maxBytes}. Files
    in C{keep} are never deleted; emptied day/month/year directories go too.

    @return: the deleted files.
    """
    if not directory.is_dir():
        return []
    files = sorted(_casts(directory), key=lambda f: (f[1], str(f[0])))
    removed: list[Path] = []
    survivors = []
    for path, mtime, size in files:
        if maxAge is not None and mtime < now - maxAge and path not in keep:
            removed.append(path)
        else:
            survivors.append((path, mtime, size))
    if maxBytes is not None:
        total = sum(size for _, _, size in survivors)
        for path, _mtime, size in survivors:
            if total <= maxBytes:
                break
            if path in keep:
                continue
            removed.append(path)
            total -= size
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for path in removed:
        parent = path.parent
        while parent != directory and parent.is_relative_to(directory):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    return removed


class RetentionService(Service):
    """Prune recordings at start and every C{pruneInterval} seconds."""

    _log = Logger()

    def __init__(
        self, recorder: Recorder, clock: IReactorTime, live: Callable[[], Iterable[Path]]
    ) -> None:
        self._recorder = recorder
        self._clock = clock
        self._live = live
        self._loop: task.LoopingCall | None = None
        self.passes = 0

    def startService(self) -> None:
        super().startService()
        loop = task.LoopingCall(self.pruneNow)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._recorder.policy.pruneInterval, now=True).addErrback(
            lambda f: self._log.failure("recording retention stopped", f)
        )

    def pruneNow(self) -> defer.Deferred[Any]:
        def done(removed: list[Path]) -> None:
            self.passes += 1
            if removed:
                self._log.info("retention deleted {count} recordings", count=len(removed))

        d = self._recorder.prune(self._live())
        d.addCallback(done)
        d.addErrback(lambda f: self._log.failure("recording retention failed", f))
        return d

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


# -- reading back --------------------------------------------------------------------


class CastFormatError(ValueError):
    """The file is not a well-formed asciicast v2 recording."""


@attrs.frozen
class Cast:
    """A parsed asciicast v2 file."""

    header: dict[str, Any]
    #: (seconds since start, code, text), times non-decreasing.
    events: list[tuple[float, str, str]]


def parseCast(data: bytes | str) -> Cast:
    """
    Parse and strictly validate asciicast v2: a header object with version 2,
    positive integer width and height, then one JSON array per line of
    (non-negative, non-decreasing number, one-letter code, string).
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise CastFormatError("empty recording")
    try:
        header = json.loads(lines[0])
    except ValueError as e:
        raise CastFormatError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise CastFormatError("header is not an asciicast v2 header")
    for key in ("width", "height"):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CastFormatError(f"header {key} must be a positive integer")
    if "timestamp" in header and not isinstance(header["timestamp"], int):
        raise CastFormatError("header timestamp must be an integer")
    if "env" in header and not isinstance(header["env"], dict):
        raise CastFormatError("header env must be an object")
    events: list[tuple[float, str, str]] = []
    last = 0.0
    for number, line in enumerate(lines[1:], start=2):
        try:
            event = json.loads(line)
        except ValueError as e:
            raise CastFormatError(f"line {number} is not JSON: {e}") from None
        if not (isinstance(event, list) and len(event) == 3):
            raise CastFormatError(f"line {number} is not a [time, code, data] event")
        at, code, payload = event
        if not isinstance(at, int | float) or isinstance(at, bool) or at < last:
            raise CastFormatError(f"line {number}: time must be a number, never decreasing")
        if not (isinstance(code, str) and len(code) == 1 and isinstance(payload, str)):
            raise CastFormatError(f"line {number}: code and data must be strings")
        if code == "r" and not _isSize(payload):
            raise CastFormatError(f"line {number}: resize data must be COLSxROWS")
        last = float(at)
        events.append((last, code, payload))
    return Cast(header, events)


def _isSize(text: str) -> bool:
    cols, _, rows = text.partition("x")
    return cols.isdigit() and rows.isdigit()


# -- neutralising terminal escapes ---------------------------------------------------

_GROUND, _ESC, _ESC_INTER, _CSI, _CSI_IGNORE, _STRING, _STRING_ESC = range(7)

#: CSI final bytes dropped whatever their parameters: window manipulation and
#: title reports (t), status and cursor reports (n), device attributes (c),
#: terminal parameters (x), media copy (i).
_DROPPED_CSI_FINALS = frozenset("tncxi")
_MAX_CSI = 64
#: ESC followed by these starts a string (OSC, DCS, SOS, PM, APC): dropped to its end.
_STRING_STARTERS = frozenset("]PX^_")
#: 8-bit C1 string starters (OSC, DCS, SOS, PM, APC) and CSI.
_C1_STRINGS = frozenset("\x9d\x90\x98\x9e\x9f")
_C1_CSI = "\x9b"


class TerminalSanitizer:
    """
    Pass terminal output through with its dangerous escapes removed.

    Dropped: every OSC (titles 0/1/2, hyperlinks 8, clipboard 52, colours, ...),
    DCS, SOS, PM and APC strings; CSI window manipulation and reports
    (C{t}, C{n}, C{c}, C{x}, C{i}, DECRQM and other C{$} requests, XTVERSION,
    keyboard-protocol queries); DECID; all other 8-bit C1 controls. Kept: text,
    ordinary C0 controls, SGR colours, cursor movement, erasing, scrolling,
    modes, charsets. Stateful, so a sequence split across chunks is still
    recognised; the state held is bounded.
    """

    def __init__(self) -> None:
        self._state = _GROUND
        self._pending: list[str] = []

    def feed(self, text: str) -> str:
        out: list[str] = []
        emit = out.append
        pending = self._pending
        state = self._state
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            i += 1
            if state == _GROUND:
                if ch == "\x1b":
                    state = _ESC
                    pending[:] = [ch]
                elif "\x80" <= ch <= "\x9f":
                    if ch == _C1_CSI:
                        state = _CSI
                        pending[:] = ["\x1b", "["]
                    elif ch in _C1_STRINGS:
                        state = _STRING
                    # any other C1 control is dropped
                else:
                    emit(ch)
            elif state == _ESC:
                if ch == "[":
                    state = _CSI
                    pending.append(ch)
                elif ch in _STRING_STARTERS:
                    state = _STRING
                    pending.clear()
                elif ch == "\x1b":
                    pending[:] = [ch]
                elif ch == "Z" or ch == "\\":  # DECID (identify yourself); a stray ST
                    state = _GROUND
                    pending.clear()
                elif " " <= ch <= "/":
                    state = _ESC_INTER
                    pending.append(ch)
                elif "0" <= ch <= "~":
                    pending.append(ch)
                    emit("".join(pending))
                    pending.clear()
                    state = _GROUND
                else:  # a control character cancels the escape and is executed
                    pending.clear()
                    state = _GROUND
                    if ch < " ":
                        emit(ch)
            elif state == _ESC_INTER:
                if " " <= ch <= "/" and len(pending) < 8:
                    pending.append(ch)
                elif "0" <= ch <= "~":
                    pending.append(ch)
                    emit("".join(pending))
                    pending.clear()
                    state = _GROUND
                else:
                    pending.clear()
                    state = _ESC if ch == "\x1b" else _GROUND
                    if ch == "\x1b":
                        pending.append(ch)
            elif state in (_CSI, _CSI_IGNORE):
                if "@" <= ch <= "~":
                    if state == _CSI and self._keepCSI(pending, ch):
                        pending.append(ch)
                        emit("".join(pending))
                    pending.clear()
                    state = _GROUND
                elif ch == "\x1b":
                    pending[:] = [ch]
                    state = _ESC
                elif ch < " ":
                    emit(ch)  # executed in the middle of a sequence, like xterm
                elif state == _CSI:
                    if len(pending) >= _MAX_CSI or not (" " <= ch <= "?"):
                        pending.clear()
                        state = _CSI_IGNORE
                    else:
                        pending.append(ch)
            elif state == _STRING:
                if ch == "\x07" or ch == "\x9c":
                    state = _GROUND
                elif ch == "\x1b":
                    state = _STRING_ESC
            elif state == _STRING_ESC:
                if ch == "\\":
                    state = _GROUND
                elif ch == "\x1b":
                    pass
                else:
                    # ESC ends the string and begins another escape: read
                    # this character again as that escape's next.
                    state = _ESC
                    pending[:] = ["\x1b"]
                    i -= 1
        self._state = state
        return "".join(out)

    @staticmethod
    def _keepCSI(pending: list[str], final: str) -> bool:
        body = "".join(pending[1:])[1:]  # after ESC [
        if final in _DROPPED_CSI_FINALS:
            return False
        if "$" in body or '"' in body:
            return False  # DECRQM and other requests and rectangle reports
        if final == "q" and body.startswith(">"):
            return False  # XTVERSION
        # keyboard-protocol queries and pushes
        return not (final == "u" and body.startswith(("?", "=", ">", "<")))


def neutralise(text: str) -> str:
    """L{TerminalSanitizer} over one complete piece of text."""
    return TerminalSanitizer().feed(text)


__all__ = [
    "ASSUMED_SIZE",
    "CAST_SUFFIX",
    "RECORDINGS_DIRECTORY",
    "Cast",
    "CastFormatError",
    "Recorder",
    "Recording",
    "RecordingError",
    "RecordingPolicy",
    "RetentionService",
    "TerminalSanitizer",
    "describeSize",
    "neutralise",
    "openRecordingFile",
    "parseCast",
    "parseSize",
    "playableSize",
    "pruneRecordings",
    "recordingPath",
    "synchronousRunner",
    "writerThread",
]
