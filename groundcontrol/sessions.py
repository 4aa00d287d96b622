"""
Live relayed sessions: who opened what on which device, recorded and audited.

Every channel the router splices to a device becomes a L{LiveSession}, the
L{RelayChannel.observer} of both sides. It fills a L{SessionRecord} (short id,
operator account, device, channel type, client address, key fingerprint,
start and end, bytes each way, pty or exec and the command, exit status or
signal), records pty sessions as asciicast (L{groundcontrol.recording}),
lets admins or the session's own operator L{watch <LiveSession.addWatcher>}
or L{kill <LiveSession.kill>} it, and writes C{session.started} and
C{session.ended} to the store's audit log.

Bytes are counted by the relay channels themselves and read once, at the end;
nothing here runs per packet unless the session is recorded or watched.

The L{SessionRegistry} of a groundcontrol is found from its device
L{Registry} (L{sessionsFor}), which the router and the control shell both
hold already.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.application.service import MultiService
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from accesstunnel.addresses import describeAddress
from accesstunnel.clocks import elapsedClock
from groundcontrol.recording import (
    Recorder,
    Recording,
    RecordingError,
    RecordingPolicy,
    RetentionService,
)
from groundcontrol.registry import Registry
from groundcontrol.relay import ENDED, inertText
from groundcontrol.store import SESSION_ENDED, SESSION_STARTED, IStore, SessionEvents

#: Session ids: this many characters of a 32-letter alphabet (50 bits).
ID_LENGTH = 10
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"

#: A terminal session keeps at most this much of its latest output (since the last
#: full-screen clear) to show a new watcher the screen before following live.
SCREEN_MEMORY = 64 * 1024
#: Where a program starts a fresh screen: erase display, reset, the alternate screen.
_SCREEN_STARTS = (b"\x1b[2J", b"\x1bc", b"\x1b[?1049h", b"\x1b[?47h")
#: Sent to a new watcher before the remembered output: cursor home, erase display.
_CLEAR = b"\x1b[H\x1b[2J"

RECORDING_FAILED = "session.recording-failed"
SESSION_KILLED = "session.killed"


def newSessionId() -> str:
    """
    A short random session id, easy to type: no 0/o, 1/l. The low five bits of each of
    ID_LENGTH random bytes pick a letter (256 is a multiple of the alphabet's 32, so
    every letter is as likely): one read of the system's generator per id, where a
    draw per letter was ten (16 us against 1.1 us per id).
    """
    return "".join([_ID_ALPHABET[b & 31] for b in secrets.token_bytes(ID_LENGTH)])


def isSessionId(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c in _ID_ALPHABET for c in text)


@attrs.define
class SessionRecord:
    """Everything the audit log keeps about one relayed channel."""

    id: str
    account: str
    device: str
    channelType: str
    startedAt: float
    client: str | None = None
    keyFingerprint: str | None = None
    pty: bool = False
    term: str | None = None
    cols: int | None = None
    rows: int | None = None
    #: shell, exec or subsystem, once the operator asked for one.
    mode: str | None = None
    #: The exec command, or the subsystem name.
    command: str | None = None
    endedAt: float | None = None
    #: Operator to device (stdin), and device to operator (stdout and stderr).
    bytesIn: int = 0
    bytesOut: int = 0
    exitStatus: int | None = None
    exitSignal: str | None = None
    #: Who killed the session, if someone did.
    killedBy: str | None = None
    #: The recording, relative to the recordings directory.
    recording: str | None = None
    recordingError: str | None = None
    #: Why C{session.started} could not be written (a session let go on, failing open).
    auditError: str | None = None

    def toJSON(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account": self.account,
            "device": self.device,
            "channel_type": self.channelType,
            "client": self.client,
            "key_fingerprint": self.keyFingerprint,
            "started_at": self.startedAt,
            "ended_at": self.endedAt,
            "pty": self.pty,
            "term": self.term,
            "cols": self.cols,
            "rows": self.rows,
            "mode": self.mode,
            "command": self.command,
            "bytes_in": self.bytesIn,
            "bytes_out": self.bytesOut,
            "exit_status": self.exitStatus,
            "exit_signal": self.exitSignal,
            "killed_by": self.killedBy,
            "recording": self.recording,
            "recording_error": self.recordingError,
            "audit_error": self.auditError,
        }


class AuditRefusedError(Exception):
    """A session refused because its C{session.started} could not be written."""


class Watcher(Protocol):
    """Someone following a live session's output."""

    def output(self, data: bytes) -> None: ...

    def sessionEnded(self, message: str) -> None: ...


class SessionMetrics(Protocol):
    """What the metrics module is told."""

    def sessionStarted(self, record: SessionRecord) -> None: ...

    def sessionEnded(self, record: SessionRecord) -> None: ...


class LiveSession:
    """One relayed channel while it is open: the observer of both relay sides."""

    _log = Logger()

    def __init__(
        self,
        sessions: SessionRegistry,
        record: SessionRecord,
        operatorSide: Any,
        deviceSide: Any,
    ) -> None:
        self.record = record
        #: When it started on the elapsed clock (the record's dates are wall dates).
        self.startedElapsed = elapsedClock(sessions.clock)()
        self.operatorSide = operatorSide
        self.deviceSide = deviceSide
        self._sessions = sessions
        self.recording: Recording | None = None
        self.watchers: list[Watcher] = []
        #: A terminal session's latest output from its last fresh screen (bounded).
        self.screen: bytearray | None = None
        #: The operator's channel was confirmed.
        self.started = False
        #: C{session.started} was written (or, failing open, attempted): C{ended} follows.
        self.announced = False
        self.ended = False
        self._audited: defer.Deferred[Any] = defer.succeed(None)

    @property
    def id(self) -> str:
        return self.record.id

    # -- relay observer ---------------------------------------------------------

    def describeOperator(self, conn: Any) -> None:
        """Fill in the client address and key fingerprint from the operator's connection."""
        transport = getattr(conn, "transport", None)
        if transport is None or self.record.client is not None:
            return
        self.record.client = describeAddress(transport.getPeer())
        login = getattr(getattr(transport, "avatar", None), "login", None)
        self.record.keyFingerprint = getattr(login, "keyFingerprint", None)

    def relayOpened(self, side: Any) -> None:
        if side is not self.operatorSide or self.started:
            return
        self.describeOperator(side.conn)
        self.started = True
        self._sessions._started(self)

    def relayData(self, side: Any, data: bytes) -> None:
        if side is not self.deviceSide:
            return
        if self.recording is not None:
            self.recording.output(data)
        if self.screen is not None:
            self._remember(data)
        for watcher in list(self.watchers):
            watcher.output(data)

    def _remember(self, data: bytes) -> None:
        """
        Keep the output since the last fresh screen, at most about L{SCREEN_MEMORY}:
        a search for a few sequences and a copy per packet, no terminal emulation. A
        sequence split across two packets is missed (the screen then starts earlier).
        """
        start = max(data.rfind(marker) for marker in _SCREEN_STARTS)
        screen = self.screen
        assert screen is not None
        if start >= 0:
            screen[:] = data[start:]
        else:
            screen += data
        if len(screen) > 2 * SCREEN_MEMORY:
            cut = len(screen) - SCREEN_MEMORY
            newline = screen.find(b"\n", cut)
            del screen[: newline + 1 if 0 <= newline < cut + 4096 else cut]

    def relayRequest(self, side: Any, requestType: bytes, data: bytes) -> Any:
        """
        Note what the request says (pty size, command) and let it pass (C{True}); a shell
        or exec that must be recorded when its recording cannot start ends the session here
        (C{ENDED}, fail-closed).
        """
        record = self.record
        if side is self.deviceSide:
            if requestType == b"exit-status" and len(data) >= 4:
                (record.exitStatus,) = struct.unpack(">L", data[:4])
            elif requestType == b"exit-signal":
                try:
                    # The device's text, for the end line and ctl sessions: inert, short.
                    record.exitSignal = inertText(common.getNS(data)[0], 32)
                except ValueError:
                    record.exitSignal = "?"
            return True
        try:
            if requestType == b"pty-req":
                term, rest = common.getNS(data)
                record.cols, record.rows = struct.unpack(">2L", rest[:8])
                record.term = term.decode("ascii", "replace")
                record.pty = True
                if self.screen is None:
                    self.screen = bytearray()
            elif requestType == b"window-change":
                cols, rows = struct.unpack(">2L", data[:8])
                record.cols, record.rows = cols, rows
                if self.recording is not None:
                    self.recording.resize(cols, rows)
            elif requestType in (b"shell", b"exec", b"subsystem"):
                if record.mode is not None:
                    return True  # the device refuses a second one
                if requestType != b"shell":
                    record.command = common.getNS(data)[0].decode("utf-8", "replace")
                record.mode = requestType.decode()
                self._sessions._logOpened(record)
                if record.pty and requestType != b"subsystem":
                    return self._startRecording()
        except (struct.error, ValueError):
            return True  # malformed: the device answers it
        return True

    def relayClosed(self, side: Any) -> None:
        if self.ended:
            return
        self.ended = True
        record = self.record
        record.endedAt = self._sessions.clock.seconds()
        record.bytesIn = self.operatorSide.bytesReceived
        record.bytesOut = self.deviceSide.bytesReceived
        if self.recording is not None:
            self.recording.close()
        message = f"groundcontrol: session {record.id} ended"
        for watcher in list(self.watchers):
            watcher.sessionEnded(message)
        self.watchers.clear()
        self._sessions._ended(self)

    # -- recording --------------------------------------------------------------

    def _startRecording(self) -> Any:
        recorder = self._sessions.recorder
        if recorder is None or not recorder.enabled:
            return True
        record = self.record
        try:
            self.recording = recorder.begin(
                record.id,
                record.cols or 0,
                record.rows or 0,
                record.term or "xterm",
                title=f"{record.account} on {record.device}",
                onFailure=self._recordingFailed,
                onThrottle=self._recordingThrottled,
            )
        except RecordingError as e:
            record.recordingError = str(e)
            self._sessions._audit(self, RECORDING_FAILED, {"reason": str(e)})
            if recorder.policy.failOpen:
                self._log.warn(
                    "session {id} goes on unrecorded: {reason}", id=record.id, reason=str(e)
                )
                return True
            self._log.warn("session {id} refused: {reason}", id=record.id, reason=str(e))
            self.endWithMessage(f"groundcontrol: session refused: it must be recorded and {e}")
            return ENDED
        directory = recorder.policy.directory
        path = self.recording.path
        record.recording = str(path.relative_to(directory)) if directory else str(path)
        return True

    def _recordingThrottled(self, hold: bool) -> None:
        """The recording is behind (or caught up): hold (or release) the device's output."""
        side = self.deviceSide
        if hold:
            side.holdCredit()
        else:
            side.releaseCredit()

    def _recordingFailed(self, reason: str) -> None:
        record = self.record
        record.recordingError = reason
        self._sessions._audit(self, RECORDING_FAILED, {"reason": reason})
        recorder = self._sessions.recorder
        if recorder is not None and recorder.policy.failOpen:
            self._log.warn(
                "recording of session {id} failed, session goes on: {reason}",
                id=record.id,
                reason=reason,
            )
            return
        self._log.warn(
            "recording of session {id} failed, ending it: {reason}", id=record.id, reason=reason
        )
        self.endWithMessage(
            f"groundcontrol: the session recording failed ({reason}); the session is ended"
        )

    # -- control ----------------------------------------------------------------

    def endWithMessage(self, message: str) -> None:
        """Tell the operator why, give status 255, and close both sides."""
        operator = self.operatorSide
        if not operator.exitReported:
            operator.endWithMessage(message)
        else:
            operator.loseConnection()
        self.deviceSide.loseConnection()

    def kill(self, actor: str) -> None:
        """End the session now, on C{actor}'s word."""
        self.record.killedBy = actor
        self._sessions._audit(self, SESSION_KILLED, {"by": actor})
        self.endWithMessage(f"groundcontrol: session {self.id} was ended by {actor}")

    def addWatcher(self, watcher: Watcher) -> None:
        """Show C{watcher} the screen as the session's latest output draws it, then follow."""
        if self.screen:
            watcher.output(_CLEAR + bytes(self.screen))
        self.watchers.append(watcher)

    def removeWatcher(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)


class SessionRegistry:
    """The live sessions of one groundcontrol, and where their records go."""

    _log = Logger()

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        recorder: Recorder | None = None,
        metrics: SessionMetrics | None = None,
        newId: Callable[[], str] = newSessionId,
        auditFailOpen: bool | None = None,
    ) -> None:
        # Session start and end are written while an operator waits: ahead of the
        # fleet's queued bookkeeping (IStore.interactive).
        self.store = store.interactive()
        self._auditFailOpen = auditFailOpen
        self.clock = clock
        self.recorder = recorder
        self.metrics = metrics
        self._newId = newId
        self.live: dict[str, LiveSession] = {}
        #: Sessions begun (channel opened on the device), since start.
        self.total = 0

    def track(
        self,
        account: str,
        device: str,
        channelType: bytes,
        operatorSide: Any,
        deviceSide: Any,
    ) -> LiveSession:
        """Observe a freshly spliced pair of relay channels."""
        sessionId = self._newId()
        while sessionId in self.live:
            sessionId = self._newId()
        record = SessionRecord(
            id=sessionId,
            account=account,
            device=device,
            channelType=channelType.decode("ascii", "replace"),
            startedAt=self.clock.seconds(),
        )
        session = LiveSession(self, record, operatorSide, deviceSide)
        operatorSide.observer = session
        deviceSide.observer = session
        self.live[sessionId] = session
        return session

    def get(self, sessionId: str) -> LiveSession | None:
        return self.live.get(sessionId)

    def sessions(self) -> list[LiveSession]:
        """Live sessions, oldest first."""
        return sorted(self.live.values(), key=lambda s: (s.record.startedAt, s.id))

    def recordingPaths(self) -> Iterable[Path]:
        """Recordings being written now (retention spares them)."""
        return [s.recording.path for s in self.live.values() if s.recording is not None]

    @property
    def auditFailOpen(self) -> bool:
        """
        What a session whose C{session.started} cannot be written does: refused (closed),
        or let go on with a logged warning (open). Unless set, it follows the
        recording policy (C{--recording-failure}); closed without a recorder.
        """
        if self._auditFailOpen is not None:
            return self._auditFailOpen
        return self.recorder is not None and self.recorder.policy.failOpen

    async def announce(self, session: LiveSession, operatorConn: Any = None) -> None:
        """
        Write C{session.started} and wait until the store has committed it: the router
        calls this before it confirms the operator's channel, so no byte flows in a
        session the audit log does not hold. Raises L{AuditRefusedError} if the write failed
        and the policy is fail-closed (the caller refuses the session); failing open, the
        session goes on with a logged warning and its C{session.ended} says so.
        """
        if operatorConn is not None:
            session.describeOperator(operatorConn)
        record = session.record
        session.announced = True
        written: defer.Deferred[None] = defer.Deferred()
        self._audit(session, SESSION_STARTED, record.toJSON(), written)
        try:
            await written
        except defer.CancelledError:
            raise  # the operator left while the store wrote: session.ended follows
        except Exception as e:
            reason = str(e) or e.__class__.__name__
            record.auditError = reason
            failOpen = self.auditFailOpen
            self._log.warn(
                "session {id} of {account} on {device} {outcome}: cannot audit it: {reason}",
                id=record.id,
                account=record.account,
                device=record.device,
                outcome="goes on unaudited" if failOpen else "refused",
                reason=reason,
            )
            if not failOpen:
                session.announced = False
                self.live.pop(session.id, None)
                raise AuditRefusedError(f"it cannot be audited: {reason}") from None

    def _started(self, session: LiveSession) -> None:
        self.total += 1
        record = session.record
        if record.channelType != "session":
            self._logOpened(record)  # a forward: no request will say more
        # The router announces every session before its operator side opens; this
        # writes session.started for a caller that tracks one without announcing it.
        if not session.announced:
            session.announced = True
            self._audit(session, SESSION_STARTED, record.toJSON())
        if self.metrics is not None:
            self.metrics.sessionStarted(record)

    def _ended(self, session: LiveSession) -> None:
        self.live.pop(session.id, None)
        if not session.announced:
            return  # refused, or the operator went away before anything was written
        record = session.record
        assert record.endedAt is not None
        self._log.info(
            "session {id} ended: {account} {what} on {device}, status {status},"
            " {bytesIn} bytes in, {bytesOut} out, {duration:.3f} s",
            id=record.id,
            account=record.account,
            what=_what(record),
            device=record.device,
            status=_status(record),
            bytesIn=record.bytesIn,
            bytesOut=record.bytesOut,
            duration=elapsedClock(self.clock)() - session.startedElapsed,
        )
        self._audit(session, SESSION_ENDED, record.toJSON())
        if self.metrics is not None and session.started:
            self.metrics.sessionEnded(record)

    def _logOpened(self, record: SessionRecord) -> None:
        """
        The session's one line at its start, once it is known what it runs: a session
        channel's shell, exec or subsystem request, or a forward's open. (A session
        channel that ends before any of them has only its end line.)
        """
        self._log.info(
            "session {id}: {account} opened {what} on {device} from {client}",
            id=record.id,
            account=record.account,
            what=_what(record),
            device=record.device,
            client=record.client,
        )

    def _audit(
        self,
        session: LiveSession,
        event: str,
        detail: dict[str, Any],
        written: defer.Deferred[None] | None = None,
    ) -> None:
        """
        Write an audit event after the session's earlier ones, in order. C{written},
        if given, fires once the store has it, or fails with the store's error
        (which is then the caller's to report); otherwise a failure is logged.
        """
        record = session.record
        now = self.clock.seconds()
        detail = {"session": record.id, **detail}

        def write(_: Any) -> defer.Deferred[Any]:
            return self.store.audit(event, record.account, record.device, detail, now)

        def done(_: Any) -> None:
            if written is not None:
                written.callback(None)

        def failed(failure: Failure) -> None:
            if written is not None:
                written.errback(failure)
                return
            self._log.failure("could not audit {event} of {id}", failure, event=event, id=record.id)

        session._audited = session._audited.addCallback(write).addCallbacks(done, failed)


def _what(record: SessionRecord) -> str:
    """What a session runs, for its log lines: exec, shell, subsystem sftp, direct-tcpip."""
    if record.mode is None:
        return record.channelType
    if record.mode == "subsystem":  # the name is the operator's: inert in the log
        return f"subsystem {inertText(record.command or '', 64)}"
    return record.mode


def _status(record: SessionRecord) -> str:
    """How a session's command ended, for its end line: 0, 7, signal TERM, none."""
    if record.exitSignal is not None:
        return f"signal {record.exitSignal}"
    return "none" if record.exitStatus is None else str(record.exitStatus)


def attachSessions(registry: Registry, sessions: SessionRegistry) -> SessionRegistry:
    """Make C{sessions} the session registry of the groundcontrol owning C{registry}."""
    registry.sessions = sessions
    return sessions


def sessionsFor(registry: Registry, store: IStore, clock: IReactorTime) -> SessionRegistry:
    """
    The session registry of the groundcontrol owning C{registry}; one that
    records nothing is made on first use if none was attached.
    """
    sessions: SessionRegistry | None = registry.sessions
    if sessions is None:
        sessions = attachSessions(registry, SessionRegistry(store, clock))
    return sessions


class SessionService(MultiService):
    """Recording retention while running; live recordings flushed at shutdown."""

    def __init__(self, sessions: SessionRegistry) -> None:
        super().__init__()
        self.sessions = sessions
        recorder = sessions.recorder
        if recorder is not None and recorder.enabled:
            RetentionService(recorder, sessions.clock, sessions.recordingPaths).setServiceParent(
                self
            )

    def stopService(self) -> Any:
        for session in self.sessions.live.values():
            if session.recording is not None:
                session.recording.flush()
        return super().stopService()


# -- past sessions ---------------------------------------------------------------------


async def pastSessions(store: IStore, limit: int = 100) -> list[dict[str, Any]]:
    """
    The most recent C{limit} sessions in the audit log (all with C{limit} 0), newest
    last, as L{SessionRecord.toJSON} dicts with a C{state}: C{ended}, or C{open}
    (started, and no end recorded: live, or cut off by a server crash). Read through the
    store's session index: C{limit} rows, however long the log.
    """
    return [_pastSession(events) for events in await store.recentSessions(limit)]


async def pastSession(store: IStore, sessionId: str) -> dict[str, Any] | None:
    """One past session by id, as L{pastSessions} gives it; C{None} if the log has none."""
    events = await store.sessionEvents(sessionId)
    return None if events is None else _pastSession(events)


def _pastSession(events: SessionEvents) -> dict[str, Any]:
    row: dict[str, Any] = {"id": events.id}
    for event in (events.started, events.ended):
        if event is not None:
            row.update(event.detail)
    row["state"] = "ended" if events.ended is not None else "open"
    return row


def recordingFile(policy: RecordingPolicy | None, relative: str | None) -> Path | None:
    """The recording's path from its audit entry, kept inside the recordings directory."""
    if policy is None or policy.directory is None or not relative:
        return None
    path = (policy.directory / relative).resolve()
    base = policy.directory.resolve()
    if not path.is_relative_to(base):
        return None
    return path


__all__ = [
    "ID_LENGTH",
    "SCREEN_MEMORY",
    "AuditRefusedError",
    "LiveSession",
    "SessionRecord",
    "SessionRegistry",
    "SessionService",
    "attachSessions",
    "isSessionId",
    "newSessionId",
    "pastSession",
    "pastSessions",
    "recordingFile",
    "sessionsFor",
]
