"""
Session records, recording policy and the session control commands, in memory: the real
groundcontrol front door (InMemoryFleet) and a fake agent acting out scripted sessions,
on a Clock. Recordings go to a temporary directory through a synchronous runner, or
through injected openers that fail like a full disk.
"""

from __future__ import annotations

import errno
import json
import struct
import tempfile
from pathlib import Path
from typing import IO, Any

from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from accesstunnel.timetext import isoTime
from groundcontrol.control import ControlContext, runCommand
from groundcontrol.documents import SESSION_KEYS
from groundcontrol.recording import Recorder, RecordingPolicy, parseCast
from groundcontrol.relay import RELAY_FAILURE_STATUS
from groundcontrol.sessions import (
    SCREEN_MEMORY,
    SessionRegistry,
    attachSessions,
    isSessionId,
    newSessionId,
    pastSession,
    pastSessions,
)
from groundcontrol.testing import (
    InMemoryFleet,
    OperatorSession,
    Script,
    echoScript,
    publicLine,
    resultNow,
    scriptedSessions,
)


def script(command: bytes | None) -> Script | None:
    """A shell that prints a prompt and echoes; 'die' exits 7; the rest as echoScript."""
    if command is None:
        return Script(stdout=b"$ ", echo=True)
    if command == b"die":
        return Script(stdout=b"dying\n", status=7)
    return echoScript(command)


def ptyRequest(cols: int = 80, rows: int = 24, term: bytes = b"xterm-256color") -> bytes:
    return common.NS(term) + struct.pack(">4L", cols, rows, 0, 0) + common.NS(b"")


class FullDiskFile:
    """A file that takes C{room} bytes and then fails with ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()
        self.closed = False

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        self.data += bytes(data)
        return len(data)

    def close(self) -> None:
        self.closed = True


class SessionTestCase(SynchronousTestCase):
    """Device kiln7 with a scripted agent; alice (operator, granted), root (admin), bob."""

    failOpen = False

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(_rmtree, self.directory)
        self.opener: Any = None
        self.recorder = self.makeRecorder()
        self.sessions = attachSessions(
            self.fleet.registry,
            SessionRegistry(self.fleet.store, self.fleet.clock, recorder=self.recorder),
        )
        deviceKey = self.fleet.enrollDevice("kiln7")
        self.aliceKey = self.fleet.addOperator("alice")
        self.bobKey = self.fleet.addOperator("bob")
        self.rootKey = self.fleet.addOperator("root", admin=True)
        self.fleet.grant("alice", "kiln7")
        self.fleet.grant("bob", "kiln7")
        self.device = []
        self.fleet.agent("kiln7", deviceKey, scriptedSessions(script, record=self.device))
        self.alice = self.fleet.operator("dev_kiln7", self.aliceKey)

    def makeRecorder(self) -> Recorder:
        policy = RecordingPolicy(directory=self.directory, failOpen=self.failOpen)
        kwargs = {"opener": lambda path: self.opener(path)} if self.opener else {}
        recorder = Recorder(policy, self.fleet.clock, **kwargs)
        return recorder

    def useOpener(self, opener: Any) -> None:
        """Open recordings with C{opener} from now on."""
        self.recorder._opener = opener

    def shell(self, cols: int = 80, rows: int = 24) -> OperatorSession:
        session = self.fleet.session(self.alice)
        session.request(b"pty-req", ptyRequest(cols, rows))
        self.shellReply = session.request(b"shell", b"")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        return session

    def send(self, session: OperatorSession, data: bytes) -> None:
        session.conn.sendData(session, data)
        self.fleet.flush()

    def audit(self, event: str) -> list[Any]:
        return [e for e in resultNow(self.fleet.store.auditSince(0, 1000)) if e.event == event]

    def ctl(self, key: Any, name: str, *argv: str) -> Any:
        account = resultNow(self.fleet.store.accountForKey(fingerprint(publicLine(key))))
        context = ControlContext(account, self.fleet.store, self.fleet.registry, self.fleet.clock)
        d = runCommand(context, list(argv))
        from twisted.internet import defer

        return resultNow(defer.Deferred.fromCoroutine(d))


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class SessionRecordTests(SessionTestCase):
    def test_execAudited(self) -> None:
        """An exec session is audited at start and end with every field of its record."""
        session = self.fleet.session(self.alice)
        session.exec(b"die")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        (started,) = self.audit("session.started")
        (ended,) = self.audit("session.ended")
        self.assertEqual(started.actor, "alice")
        self.assertEqual(started.device, "kiln7")
        detail = ended.detail
        self.assertTrue(isSessionId(detail["id"]))
        self.assertEqual(detail["session"], detail["id"])
        self.assertEqual(detail["channel_type"], "session")
        self.assertEqual(detail["mode"], "exec")
        self.assertEqual(detail["command"], "die")
        self.assertEqual(detail["exit_status"], 7)
        self.assertEqual(detail["bytes_out"], len(b"dying\n"))
        self.assertEqual(detail["bytes_in"], 0)
        self.assertFalse(detail["pty"])
        self.assertIsNone(detail["recording"])  # exec output is not recorded
        self.assertTrue(detail["client"].startswith("127.0.0.1:"))
        self.assertEqual(detail["key_fingerprint"], fingerprint(publicLine(self.aliceKey)))
        self.assertEqual(self.sessions.live, {})

    def test_bytesBothWays(self) -> None:
        """Bytes each way are counted by the relay and land in the record at close."""
        session = self.fleet.session(self.alice)
        session.exec(b"cat")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.send(session, b"hello world")
        session.sendEOF()
        self.fleet.flush()
        (ended,) = self.audit("session.ended")
        self.assertEqual(ended.detail["bytes_in"], 11)
        self.assertEqual(ended.detail["bytes_out"], 11)
        self.assertEqual(ended.detail["exit_status"], 0)

    def test_sessionIdsShortAndUnique(self) -> None:
        """Session ids are 10 characters of an unambiguous alphabet and do not repeat."""
        ids = {newSessionId() for _ in range(2000)}
        self.assertEqual(len(ids), 2000)
        self.assertTrue(all(isSessionId(i) for i in ids))
        self.assertFalse(isSessionId("../../etc"))

    def test_abandonedBeforeConfirmNotAudited(self) -> None:
        """A channel whose operator left before it was confirmed leaves no audit trail."""
        operator = self.fleet.operator("dev_kiln7", self.bobKey)
        operator.openSession()
        # Drop the operator before groundcontrol answers.
        self.fleet.network.cut(self.fleet.network.pumps[-1])
        self.fleet.flush()
        self.assertEqual(self.audit("session.started"), [])
        self.assertEqual(self.sessions.live, {})

    def test_pastSessionsFromAudit(self) -> None:
        """
        pastSessions rebuilds ended sessions from the audit log (through the store's session
        index), newest last, the latest `limit` of them; pastSession finds one by id.
        """
        for command in (b"true", b"die", b"echo"):
            session = self.fleet.session(self.alice)
            session.exec(command)
            self.fleet.flush()
            self.fleet.clock.advance(1)
            self.fleet.flush()
        rows = resultNow(defer.Deferred.fromCoroutine(pastSessions(self.fleet.store, limit=2)))
        self.assertEqual([r["command"] for r in rows], ["die", "echo"])
        self.assertEqual([r["state"] for r in rows], ["ended", "ended"])
        one = resultNow(defer.Deferred.fromCoroutine(pastSession(self.fleet.store, rows[0]["id"])))
        self.assertEqual(one, rows[0])
        self.assertIsNone(
            resultNow(defer.Deferred.fromCoroutine(pastSession(self.fleet.store, "nosuchsess")))
        )


class RecordingTests(SessionTestCase):
    def test_ptyShellRecorded(self) -> None:
        """A pty shell is recorded as asciicast v2: size, TERM, output events, resizes."""
        session = self.shell(cols=100, rows=30)
        self.send(session, b"ls\r\n")
        self.fleet.clock.advance(0.5)
        session.request(b"window-change", struct.pack(">4L", 120, 40, 0, 0))
        self.fleet.flush()
        self.send(session, b"\xc3")  # half a UTF-8 character ...
        self.send(session, b"\xa9\r\n")  # ... and the rest
        session.sendEOF()
        self.fleet.flush()
        (ended,) = self.audit("session.ended")
        self.assertTrue(ended.detail["pty"])
        path = self.directory / ended.detail["recording"]
        self.assertEqual(path.name, f"{ended.detail['id']}.cast")
        cast = parseCast(path.read_bytes())
        self.assertEqual(cast.header["width"], 100)
        self.assertEqual(cast.header["height"], 30)
        self.assertEqual(cast.header["env"], {"TERM": "xterm-256color"})
        output = "".join(text for _, code, text in cast.events if code == "o")
        self.assertEqual(output, "$ ls\r\n\u00e9\r\n")
        self.assertIn((0.5, "r", "120x40"), cast.events)
        self.assertEqual(ended.detail["bytes_out"], len("$ ls\r\n\u00e9\r\n".encode()))

    def test_sizelessPtyRecordedAsWatchSaysIt(self) -> None:
        """
        A pty asked for at 0x0 (ssh -tt without a terminal) is recorded at the 80x24 that
        programs then assume (asciicast v2 has no 0-column terminal), with C{pty_size}
        saying what was negotiated; watch says both in the same words; a window change to
        0x0 is recorded the same way.
        """
        session = self.shell(cols=0, rows=0)
        sessionId = next(iter(self.sessions.live))
        session.request(b"window-change", struct.pack(">4L", 0, 0, 0, 0))
        self.fleet.flush()
        sink = FakeChannel()
        self.ctl(self.rootKey, "root", "watch", sessionId).stream(sink)
        self.assertIn(
            b", 0x0 (no size given; programs and the recording assume 80x24) (read-only", sink.err
        )
        session.sendEOF()
        self.fleet.flush()
        (ended,) = self.audit("session.ended")
        cast = parseCast((self.directory / ended.detail["recording"]).read_bytes())
        self.assertEqual(
            (cast.header["width"], cast.header["height"], cast.header["pty_size"]), (80, 24, "0x0")
        )
        self.assertEqual([text for _, code, text in cast.events if code == "r"], ["80x24"])

    def test_sizedPtyHeaderPlain(self) -> None:
        """A pty with a size is recorded and watched at that size, nothing added."""
        self.shell(cols=100, rows=30)
        sink = FakeChannel()
        self.ctl(self.rootKey, "root", "watch", next(iter(self.sessions.live))).stream(sink)
        self.assertIn(b", 100x30 (read-only", sink.err)
        recording = next(iter(self.sessions.live.values())).recording
        assert recording is not None
        header = json.loads(recording.path.read_bytes().split(b"\n")[0])
        self.assertNotIn("pty_size", header)

    def test_execNotRecorded(self) -> None:
        """Exec without a pty is not recorded (its command and status are audited)."""
        session = self.fleet.session(self.alice)
        session.exec(b"die")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        self.assertEqual(list(self.directory.rglob("*.cast")), [])

    def test_failClosedRefusesUnopenableRecording(self) -> None:
        """
        Fail-closed: a recording that cannot be opened ends the session before its shell
        starts. The operator reads why, gets status 255 and a closed channel; the shell
        request goes neither to the device nor back refused, because OpenSSH's client exits
        at a refused shell or exec without writing the stderr it already holds (the e2e
        full-disk test lost the message that way when both came in one read).
        """

        def full(path: Path) -> IO[bytes]:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.useOpener(full)
        session = self.fleet.session(self.alice)
        pty = session.request(b"pty-req", ptyRequest(80, 24))
        self.shellReply = session.request(b"shell", b"")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        self.failureResultOf(pty)  # its answer from the device came after the close
        self.assertIn(b"session refused: it must be recorded and", bytes(session.stderr))
        self.assertIn(b"No space left on device", bytes(session.stderr))
        self.assertTrue(session.isClosed)
        self.assertEqual(session.exitStatus, RELAY_FAILURE_STATUS)
        unanswered = self.failureResultOf(self.shellReply)
        self.assertIn("closed", str(unanswered.value))  # not "channel request failed"
        self.assertNotIn(b"shell", [r[0] for r in self.device[0].requests])
        self.assertTrue(self.device[0].isClosed)
        (failed,) = self.audit("session.recording-failed")
        self.assertIn("No space left", failed.detail["reason"])

    def test_failClosedEndsSessionOnWriteFailure(self) -> None:
        """Fail-closed: a write failure mid-session ends it with a message and status 255."""
        disk = FullDiskFile(room=300)
        self.useOpener(lambda path: disk)
        session = self.shell()
        self.assertFalse(session.isClosed)
        self.send(session, b"x" * 1000)
        self.fleet.clock.advance(1.0)  # the flush interval: the write hits the full disk
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        self.assertIn(b"recording failed (No space left on device)", bytes(session.stderr))
        self.assertEqual(session.exitStatus, RELAY_FAILURE_STATUS)
        self.assertTrue(self.device[0].isClosed)
        self.assertTrue(disk.closed)
        (ended,) = self.audit("session.ended")
        self.assertEqual(ended.detail["recording_error"], "No space left on device")

    def test_recordingFailureLineReadsCleanly(self) -> None:
        """
        A write failing with text that ends in a period (Python's 'I/O operation on closed
        file.') reads '(I/O operation on closed file); the session is ended', not
        '...file.); the session ...'.
        """

        class ClosedFile(FullDiskFile):
            def write(self, data: Any) -> int:
                if len(data) > self.room:
                    raise ValueError("I/O operation on closed file.")
                return super().write(data)

        self.useOpener(lambda path: ClosedFile(room=300))
        session = self.shell()
        self.send(session, b"x" * 1000)
        self.fleet.clock.advance(1.0)
        self.fleet.flush()
        self.assertIn(
            b"groundcontrol: the session recording failed (I/O operation on closed file); "
            b"the session is ended",
            bytes(session.stderr),
        )


class FailOpenTests(SessionTestCase):
    failOpen = True

    def test_failOpenGoesOnUnrecorded(self) -> None:
        """Fail-open: an unopenable recording is audited and logged; the session runs."""

        def full(path: Path) -> IO[bytes]:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.useOpener(full)
        session = self.shell()
        self.successResultOf(self.shellReply)  # accepted
        self.send(session, b"hi")
        self.assertEqual(bytes(session.output), b"$ hi")
        (failed,) = self.audit("session.recording-failed")
        self.assertIn("No space left", failed.detail["reason"])

    def test_failOpenSurvivesWriteFailure(self) -> None:
        """Fail-open: a write failure mid-session stops the recording, not the session."""
        disk = FullDiskFile(room=300)
        self.useOpener(lambda path: disk)
        session = self.shell()
        self.send(session, b"x" * 1000)
        self.fleet.clock.advance(1.0)
        self.fleet.flush()
        self.assertFalse(session.isClosed)
        self.send(session, b"more")
        self.assertTrue(bytes(session.output).endswith(b"more"))
        self.assertEqual(len(self.audit("session.recording-failed")), 1)


class ControlCommandTests(SessionTestCase):
    def endedExecThenShell(self) -> OperatorSession:
        """alice's exec that ended (status 7), then her shell, live: a past and a live one."""
        self.fleet.clock.advance(100)  # a start at 0 reads as unrecorded
        self.fleet.flush()
        session = self.fleet.session(self.alice)
        session.exec(b"die")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        return self.shell()

    def test_sessionsListsLiveAndPast(self) -> None:
        """
        sessions --json shows live sessions; --all adds ended ones with bytes and status:
        every session document has the same keys, its times in ISO 8601 (no end: null).
        """
        live = self.endedExecThenShell()
        result = self.ctl(self.aliceKey, "alice", "sessions", "--json")
        rows = json.loads(result.stdout)
        self.assertEqual([r["state"] for r in rows], ["live"])
        self.assertTrue(rows[0]["pty"])
        result = self.ctl(self.aliceKey, "alice", "sessions", "--all", "--json")
        rows = json.loads(result.stdout)
        self.assertEqual([r["state"] for r in rows], ["ended", "live"])
        self.assertEqual(rows[0]["exit_status"], 7)
        self.assertEqual(rows[0]["bytes_out"], 6)
        self.assertEqual([set(r) for r in rows], [set(SESSION_KEYS)] * 2)
        started = isoTime(self.fleet.clock.seconds())
        self.assertEqual([r["started_at"] for r in rows], [started, started])
        self.assertEqual([r["ended_at"] for r in rows], [started, None])
        self.assertFalse(live.isClosed)

    def test_sessionsTableSaysPtyYesOrNo(self) -> None:
        """The table's PTY column says yes/no, as every table says a flag (not True/False)."""
        self.endedExecThenShell()
        header, *rows = self.ctl(self.aliceKey, "alice", "sessions", "--all").stdout.splitlines()
        column = header.split().index("PTY")
        self.assertEqual([row.split()[column] for row in rows], ["no", "yes"])

    def test_operatorsSeeOnlyTheirOwn(self) -> None:
        """bob sees none of alice's sessions and cannot kill them; an admin can."""
        session = self.shell()
        sessionId = next(iter(self.sessions.live))
        self.assertEqual(json.loads(self.ctl(self.bobKey, "bob", "sessions", "--json").stdout), [])
        refused = self.ctl(self.bobKey, "bob", "kill", sessionId)
        self.assertEqual(refused.status, 1)
        self.assertFalse(session.isClosed)
        rows = json.loads(self.ctl(self.rootKey, "root", "sessions", "--json").stdout)
        self.assertEqual([r["id"] for r in rows], [sessionId])

    def test_killEndsSessionWithMessage(self) -> None:
        """kill ends a live session: the operator is told who did it and gets status 255."""
        session = self.shell()
        sessionId = next(iter(self.sessions.live))
        result = self.ctl(self.rootKey, "root", "kill", sessionId)
        self.assertEqual(result.status, 0)
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        self.assertIn(f"session {sessionId} was ended by root".encode(), bytes(session.stderr))
        self.assertEqual(session.exitStatus, RELAY_FAILURE_STATUS)
        self.assertTrue(self.device[0].isClosed)
        (ended,) = self.audit("session.ended")
        self.assertEqual(ended.detail["killed_by"], "root")
        self.assertEqual(len(self.audit("session.killed")), 1)

    def test_ownSessionKillable(self) -> None:
        """An operator may kill their own session."""
        session = self.shell()
        sessionId = next(iter(self.sessions.live))
        self.assertEqual(self.ctl(self.aliceKey, "alice", "kill", sessionId).status, 0)
        self.fleet.flush()
        self.assertTrue(session.isClosed)

    def test_watchStreamsSanitisedOutput(self) -> None:
        """
        watch first draws the screen so far (the prompt, after a clear), then follows a
        live pty session's output, with clipboard escapes removed.
        """
        session = self.shell()
        sessionId = next(iter(self.sessions.live))
        result = self.ctl(self.rootKey, "root", "watch", sessionId)
        sink = FakeChannel()
        done = result.stream(sink)
        self.assertEqual(bytes(sink.out), b"\x1b[H\x1b[2J$ ")
        self.send(session, b"echo \x1b]52;c;cHduZWQ=\x07hi\r\n")
        self.assertEqual(bytes(sink.out), b"\x1b[H\x1b[2J$ echo hi\r\n")
        session.sendEOF()
        self.fleet.flush()
        self.assertEqual(self.successResultOf(done), 0)
        self.assertIn(b"ended", bytes(sink.err))

    def test_watchStartsFromTheLastFreshScreen(self) -> None:
        """
        A watcher first sees the output since the program's last full-screen clear (or
        switch to the alternate screen), not what that clear wiped, then live output.
        """
        session = self.shell()
        self.send(session, b"old text\r\n")
        self.send(session, b"\x1b[H\x1b[2Jtop - 12:00\r\n")
        self.send(session, b"load 0.1\r\n")
        sink = FakeChannel()
        self.ctl(self.rootKey, "root", "watch", next(iter(self.sessions.live))).stream(sink)
        self.assertEqual(bytes(sink.out), b"\x1b[H\x1b[2J\x1b[2Jtop - 12:00\r\nload 0.1\r\n")
        self.send(session, b"\x1b[?1049hvim\r\n")
        sink2 = FakeChannel()
        self.ctl(self.rootKey, "root", "watch", next(iter(self.sessions.live))).stream(sink2)
        self.assertEqual(bytes(sink2.out), b"\x1b[H\x1b[2J\x1b[?1049hvim\r\n")
        self.assertTrue(bytes(sink.out).endswith(b"\x1b[?1049hvim\r\n"))  # live

    def test_screenMemoryBounded(self) -> None:
        """
        Without a clear, the remembered screen stays under twice SCREEN_MEMORY, is cut at
        a line start, and a watcher still sees the latest lines; exec sessions keep none.
        """
        session = self.shell()
        live = next(iter(self.sessions.live.values()))
        line = b"x" * 99 + b"\n"
        for i in range(3 * SCREEN_MEMORY // 4096):
            self.send(session, line * 40 + b"end %d\n" % i)
            self.assertLessEqual(len(live.screen), 2 * SCREEN_MEMORY)
        self.assertGreaterEqual(len(live.screen), SCREEN_MEMORY)
        self.assertTrue(live.screen.startswith(b"x") or live.screen.startswith(b"end"))
        sink = FakeChannel()
        self.ctl(self.rootKey, "root", "watch", live.id).stream(sink)
        self.assertTrue(bytes(sink.out).endswith(b"end %d\n" % i))
        other = self.fleet.session(self.alice)
        other.exec(b"cat")
        self.fleet.flush()
        exec_ = next(s for s in self.sessions.live.values() if s is not live)
        self.send(other, b"data")
        self.assertIsNone(exec_.screen)

    def watchOverSSH(self, sessionId: str, pty: tuple[int, int] | None) -> OperatorSession:
        """root runs C{ssh [-t] ctl@gc watch SESSIONID}: a control channel, with a pty or not."""
        watcher = self.fleet.session(self.fleet.operator("ctl", self.rootKey))
        if pty is not None:
            watcher.request(b"pty-req", ptyRequest(*pty))
        watcher.exec(b"watch " + sessionId.encode())
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        return watcher

    def test_watchHeaderAfterTheReplayedScreenInATerminal(self) -> None:
        """
        In a terminal, the replayed screen begins with a clear that wipes the header line
        written before it, so the header comes again after the screen, on the watcher's
        bottom row in reverse video with the cursor put back; without a terminal, the
        header is one line on stderr before the output and nothing follows it.
        """
        self.shell()
        sessionId = next(iter(self.sessions.live))
        header = (
            f"watching session {sessionId}: alice on kiln7, 80x24 (read-only; Ctrl-C stops)"
        ).encode()
        watcher = self.watchOverSSH(sessionId, pty=(100, 30))
        self.assertEqual(watcher.output, b"\x1b[H\x1b[2J$ ")
        self.assertEqual(
            bytes(watcher.stderr),
            header + b"\r\n\x1b7\x1b[30;1H\x1b[7m" + header + b"\x1b[0m\x1b[K\x1b8",
        )
        self.assertEqual([e[0] for e in watcher.events], ["stderr", "data", "stderr"])

        plain = self.watchOverSSH(sessionId, pty=None)
        self.assertEqual(bytes(plain.stderr), header + b"\n")
        self.assertEqual(plain.output, b"\x1b[H\x1b[2J$ ")
        self.assertEqual([e[0] for e in plain.events], ["stderr", "data"])

    def test_watchStatusLineFitsTheTerminal(self) -> None:
        """A narrow terminal gets the header cut one column short of its width."""
        self.shell()
        sessionId = next(iter(self.sessions.live))
        watcher = self.watchOverSSH(sessionId, pty=(20, 10))
        status = bytes(watcher.stderr).split(b"\x1b[7m", 1)[1].split(b"\x1b[0m")[0]
        self.assertEqual(status, f"watching session {sessionId}"[:19].encode())

    def test_watchRefusedForOthers(self) -> None:
        """bob cannot watch alice's session; exec sessions without a pty cannot be watched."""
        self.shell()
        sessionId = next(iter(self.sessions.live))
        self.assertEqual(self.ctl(self.bobKey, "bob", "watch", sessionId).status, 1)


class FakeChannel:
    """What a streaming command writes to."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.queuedBytes = 0

    def write(self, data: bytes) -> None:
        self.out += data

    def writeExtended(self, dataType: int, data: bytes) -> None:
        self.err += data

    def whenWritable(self) -> Any:
        from twisted.internet import defer

        return defer.succeed(None)
