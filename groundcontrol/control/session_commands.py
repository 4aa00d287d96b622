"""
The control shell's session commands: ``sessions``, ``kill``, ``watch``, ``replay``.

Admins see and act on every session; operators on their own. ``watch`` and
``replay`` stream terminal output to the caller with dangerous escapes
neutralised (L{groundcontrol.recording.TerminalSanitizer}): a device must not
be able to set a watcher's clipboard or title, or make their terminal answer.
"""

from __future__ import annotations

import argparse
import codecs
from typing import Any

import attrs
from twisted.conch.ssh import connection
from twisted.internet import defer, task

from accesstunnel.timetext import absoluteTime
from groundcontrol.control.commands import (
    CommandResult,
    ControlContext,
    UsageError,
    _clean,
    _done,
    _jsonDocument,
    _table,
    command,
)
from groundcontrol.documents import sessionJSON
from groundcontrol.recording import CastFormatError, TerminalSanitizer, describeSize, parseCast
from groundcontrol.sessions import (
    LiveSession,
    SessionRegistry,
    isSessionId,
    pastSession,
    pastSessions,
    recordingFile,
    sessionsFor,
)

#: A watcher whose channel holds more than this much unsent output is dropped.
WATCH_BACKLOG = 1024 * 1024

#: Replay events closer together than this (after scaling) are written at once.
_REPLAY_BATCH = 0.005


@attrs.frozen
class StreamingResult(CommandResult):
    """A result that goes on producing output: C{stream(channel)} fires with the status."""

    stream: Any = None


def _sessions(context: ControlContext) -> SessionRegistry:
    return sessionsFor(context.registry, context.store, context.clock)


def _maySee(context: ControlContext, account: str | None) -> bool:
    return context.account.isAdmin or account == context.account.name


def _sessionId(text: str) -> str:
    if not isSessionId(text):
        raise UsageError(f"malformed session id {_clean(text)!r}")
    return text


def _liveFor(context: ControlContext, sessionId: str) -> LiveSession | None:
    session = _sessions(context).get(_sessionId(sessionId))
    if session is None or not _maySee(context, session.record.account):
        return None  # another operator's session does not exist, as far as they know
    return session


def _row(record: dict[str, Any], state: str) -> dict[str, Any]:
    row = dict(record)
    row["state"] = state
    status = row.get("exit_status")
    if row.get("exit_signal"):
        status = f"SIG{row['exit_signal']}"
    if row.get("killed_by"):
        status = f"killed by {row['killed_by']}"
    row["status"] = status
    return row


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """
    The table's view of a session row: its times for people, what it ran, whether it has
    a pty as C{yes}/C{no} (as every table says a flag; C{-} when the audit did not say).
    """
    pty = row.get("pty")
    # None until known; a 0 reads as unknown too, as this module always showed it.
    return {
        **row,
        "pty": None if pty is None else "yes" if pty else "no",
        "started": absoluteTime(row.get("started_at") or None),
        "ended": absoluteTime(row.get("ended_at") or None),
        "what": row.get("command") or row.get("mode") or row.get("channel_type"),
    }


_COLUMNS = [
    "id",
    "account",
    "device",
    "what",
    "pty",
    "client",
    "started",
    "ended",
    "bytes_in",
    "bytes_out",
    "status",
    "state",
]


@command("sessions", "live sessions (yours, or all for admins); --all adds past ones")
def _sessionsCommand(parser: Any) -> Any:
    parser.add_argument("--all", action="store_true", help="past sessions from the audit log too")
    parser.add_argument("--limit", type=int, default=100, help="past sessions shown (100)")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        live = {s.id: s for s in _sessions(context).sessions()}
        rows: list[dict[str, Any]] = []
        if options.all:
            for past in await pastSessions(context.store, max(0, options.limit)):
                if not _maySee(context, past.get("account")) or past.get("id") in live:
                    continue
                state = past.get("state", "open")
                rows.append(_row(past, "ended" if state == "ended" else "unknown"))
        for session in live.values():
            if _maySee(context, session.record.account):
                record = session.record.toJSON()
                record["bytes_in"] = session.operatorSide.bytesReceived
                record["bytes_out"] = session.deviceSide.bytesReceived
                rows.append(_row(record, "live"))
        if options.json:
            return _jsonDocument([sessionJSON(r) for r in rows])
        return CommandResult(stdout=_table([_cells(r) for r in rows], _COLUMNS))

    return run


@command("kill", "end a live session (admins: any; operators: their own)")
def _kill(parser: Any) -> Any:
    parser.add_argument("session")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        session = _liveFor(context, options.session)
        if session is None:
            return CommandResult(stderr=f"kill: no live session {options.session}\n", status=1)
        session.kill(context.actor)
        return _done(options, f"killed session {session.id}", {"killed": session.id})

    return run


class _Watch:
    """A watcher writing a live session's output to a control channel."""

    def __init__(self, session: LiveSession, channel: Any) -> None:
        self._session = session
        self._channel = channel
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._sanitizer = TerminalSanitizer()
        self.done: defer.Deferred[int] = defer.Deferred(self._cancel)

    def output(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._channel.queuedBytes > WATCH_BACKLOG:
            self._stop(b"\r\ngroundcontrol: the watch fell behind and was stopped\r\n", 1)
            return
        text = self._sanitizer.feed(self._decoder.decode(data))
        if text:
            self._channel.write(text.encode("utf-8"))

    def sessionEnded(self, message: str) -> None:
        self._stop(f"\r\n{message}\r\n".encode(), 0)

    def _stop(self, message: bytes, status: int) -> None:
        self._session.removeWatcher(self)
        self._channel.writeExtended(connection.EXTENDED_DATA_STDERR, message)
        if not self.done.called:
            self.done.callback(status)

    def _cancel(self, d: defer.Deferred[int]) -> None:
        self._session.removeWatcher(self)


def _statusLine(text: str, cols: int, rows: int) -> bytes:
    """
    C{text} in reverse video on the terminal's bottom row, the cursor put back where it
    was: the replayed screen starts with a clear, which wipes the header line written
    before it, so a watcher in a terminal sees the header again here, as tmux shows its
    status line, until the session's own output draws over that row.
    """
    shown = text[: max(0, cols - 1)]  # the last column would leave the cursor wrapping
    return f"\x1b7\x1b[{rows};1H\x1b[7m{shown}\x1b[0m\x1b[K\x1b8".encode()


@command("watch", "follow a live terminal session read-only (Ctrl-C stops)")
def _watch(parser: Any) -> Any:
    parser.add_argument("session")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        session = _liveFor(context, options.session)
        if session is None:
            return CommandResult(stderr=f"watch: no live session {options.session}\n", status=1)
        record = session.record
        if not record.pty:
            return CommandResult(stderr=f"watch: session {record.id} has no terminal\n", status=1)

        header = (
            f"watching session {record.id}: {record.account} on {record.device}, "
            f"{describeSize(record.cols or 0, record.rows or 0)} (read-only; Ctrl-C stops)"
        )

        def stream(channel: Any) -> defer.Deferred[int]:
            size = getattr(channel, "terminalSize", None)
            newline = "\n" if size is None else "\r\n"  # a terminal is in raw mode
            channel.writeExtended(connection.EXTENDED_DATA_STDERR, (header + newline).encode())
            watch = _Watch(session, channel)
            replayed = bool(session.screen)
            session.addWatcher(watch)
            if replayed and size is not None:
                channel.writeExtended(connection.EXTENDED_DATA_STDERR, _statusLine(header, *size))
            return watch.done

        return StreamingResult(stream=stream)

    return run


async def _findPast(context: ControlContext, sessionId: str) -> dict[str, Any] | None:
    live = _sessions(context).get(sessionId)
    if live is not None:
        return live.record.toJSON()
    return await pastSession(context.store, sessionId)


async def _play(
    context: ControlContext,
    channel: Any,
    events: list[tuple[float, str, str]],
    speed: float,
    idleLimit: float | None,
) -> int:
    sanitizer = TerminalSanitizer()
    previous = 0.0
    owed = 0.0
    for at, code, text in events:
        gap = at - previous
        previous = at
        if idleLimit is not None:
            gap = min(gap, idleLimit)
        owed += gap / speed
        if owed >= _REPLAY_BATCH:
            await task.deferLater(context.clock, owed)
            owed = 0.0
        if code != "o":
            continue
        out = sanitizer.feed(text)
        if out:
            await channel.whenWritable()
            channel.write(out.encode("utf-8"))
    return 0


@command("replay", "play a session's recording with its timing (--speed N)")
def _replay(parser: Any) -> Any:
    parser.add_argument("session")
    parser.add_argument("--speed", type=float, default=1.0, help="times faster (1)")
    parser.add_argument("--idle-limit", type=float, default=None, help="cap pauses at SECONDS")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        sessionId = _sessionId(options.session)
        if not options.speed > 0:
            raise UsageError("--speed must be more than 0")
        row = await _findPast(context, sessionId)
        if row is None or not _maySee(context, row.get("account")):
            return CommandResult(stderr=f"replay: no session {sessionId}\n", status=1)
        recorder = _sessions(context).recorder
        path = recordingFile(recorder.policy if recorder else None, row.get("recording"))
        if recorder is None or path is None:
            return CommandResult(stderr=f"replay: session {sessionId} has no recording\n", status=1)
        try:
            cast = parseCast(await recorder.read(path))
        except FileNotFoundError:
            return CommandResult(
                stderr=f"replay: the recording of {sessionId} is gone (retention)\n", status=1
            )
        except (CastFormatError, UnicodeDecodeError) as e:
            return CommandResult(stderr=f"replay: unreadable recording: {e}\n", status=1)

        def stream(channel: Any) -> defer.Deferred[int]:
            return defer.Deferred.fromCoroutine(
                _play(context, channel, cast.events, options.speed, options.idle_limit)
            )

        return StreamingResult(stream=stream)

    return run


__all__ = ["StreamingResult"]
