"""
The agent with its state directory on a read-only file system, in memory: the C{os} of
L{accesstunnel.statefiles} is replaced here by one that refuses every change with C{EROFS},
as a card the kernel remounted read-only after errors (ext4's errors=remount-ro) does, or a
read-only root.

What is promised (tests/e2e/test_agent_readonly.py runs the real programs on a read-only
tmpfs): a device with its key in place links and serves; each state file that cannot be
written is said once, in words ("Read-only file system"), not at every link or minute; a
certificate that could not be stored is not asked for; a first start without a key exits
with a status the systemd unit does not restart on; a log file that cannot be opened is
replaced by standard output; all of it recovers once the directory is writable again,
without a restart.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.logfile import LogFile

from accesstunnel import statefiles
from agent import cli as agent_cli
from agent import launcher, tap
from agent.enrollment import (
    CERTIFICATE_FILE,
    CERTIFICATE_RETRY_DELAY,
    STATUS_FILE,
    STATUS_RETRY_DELAY,
    StatusFile,
    certificateLifetime,
    renewalDue,
)
from agent.failover import FailoverEndpoint
from agent.identity import (
    DEVICE_KEY_FILE,
    READ_ONLY_EXIT_STATUS,
    ReadOnlyStateError,
    ServerKeyPin,
    loadOrCreateDeviceKey,
)
from agent.tap import AgentConfig
from tests.test_agent_disk import certificatesIssued, names
from tests.test_enrollment import DAY, EnrollmentTestCase
from tests.test_failover import LinkFactory, connector

READ_ONLY = os.strerror(errno.EROFS)  # "Read-only file system"


class ReadOnlyDisk:
    """
    C{os} as L{accesstunnel.statefiles} sees it, on a file system mounted read-only while
    C{readOnly}: reads work; making, changing or removing a file fails with C{EROFS}.
    """

    def __init__(self) -> None:
        self.readOnly = True
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _refuse(self) -> None:
        if self.readOnly:
            self.refused += 1
            raise OSError(errno.EROFS, READ_ONLY)

    def open(self, path: Any, flags: int, *args: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            self._refuse()
        return os.open(path, flags, *args)

    def unlink(self, path: Any) -> None:
        self._refuse()
        os.unlink(path)

    def replace(self, source: Any, target: Any) -> None:
        self._refuse()
        os.replace(source, target)

    def link(self, source: Any, target: Any) -> None:
        self._refuse()
        os.link(source, target)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> ReadOnlyDisk:
    """A read-only file system under the state files; set C{readOnly = False} to remount."""
    readOnly = ReadOnlyDisk()
    monkeypatch.setattr(statefiles, "os", readOnly)
    return readOnly


def warnings(events: Sequence[Any]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]


# -- the device key ----------------------------------------------------------------------


def test_firstStartOnAReadOnlyFileSystem(tmp_path: Path, disk: ReadOnlyDisk) -> None:
    """
    No key and a read-only state directory: an error that names the read-only file system
    and what to do, not "with room on that disk" (more room would not help); nothing left.
    """
    with pytest.raises(ReadOnlyStateError) as raised:
        loadOrCreateDeviceKey(tmp_path)
    text = str(raised.value)
    assert "read-only file system" in text and str(tmp_path / DEVICE_KEY_FILE) in text
    assert "systemctl restart tunnel-agent" in text and "room" not in text
    assert names(tmp_path) == []
    disk.readOnly = False
    assert names(tmp_path) == [] and loadOrCreateDeviceKey(tmp_path) is not None


def test_stateDirectoryOnAReadOnlyFileSystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state directory that cannot be made on a read-only file system says so too."""

    def readOnlyMkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, READ_ONLY)

    monkeypatch.setattr(Path, "mkdir", readOnlyMkdir)
    with pytest.raises(ReadOnlyStateError, match=r"cannot make the state directory .*read-only"):
        loadOrCreateDeviceKey(tmp_path / "state")


def test_emptyKeyOnAReadOnlyFileSystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    An empty key (never written, by an agent before statefiles) that cannot be removed from
    a read-only card is the same read-only error: its exit status is not restarted.
    """
    (tmp_path / DEVICE_KEY_FILE).write_bytes(b"")

    def readOnlyUnlink(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, READ_ONLY)

    monkeypatch.setattr(Path, "unlink", readOnlyUnlink)
    with pytest.raises(
        ReadOnlyStateError, match=r"cannot replace the empty device key .*read-only"
    ):
        loadOrCreateDeviceKey(tmp_path)


def test_keyInPlaceOnAReadOnlyFileSystem(tmp_path: Path, disk: ReadOnlyDisk) -> None:
    """A device with its key (and its .pub) in place starts as ever: it writes nothing."""
    disk.readOnly = False
    key = loadOrCreateDeviceKey(tmp_path)
    disk.readOnly = True
    assert loadOrCreateDeviceKey(tmp_path) == key
    assert disk.refused == 0


def test_firstStartExitsWithAStatusSystemdDoesNotRestart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    The agent says why on standard error and exits with L{READ_ONLY_EXIT_STATUS}, the
    status docs/systemd/tunnel-agent.service names in RestartPreventExitStatus= (with
    Restart=always and RestartSec=5 it was started again every 5 s, for ever).
    """

    def readOnly(stateDir: Path) -> Any:
        raise ReadOnlyStateError(f"cannot write a new device key to {stateDir}: read-only")

    monkeypatch.setattr(tap, "loadOrCreateDeviceKey", readOnly)
    config = AgentConfig(
        stateDir=tmp_path,
        servers=("ssh://127.0.0.1:2222",),
        name="kiln7",
        serverKey=ServerKeyPin("SHA256:" + "A" * 43),
    )
    with pytest.raises(SystemExit) as exited:
        tap.buildService(config, MemoryReactorClock())
    assert exited.value.code == READ_ONLY_EXIT_STATUS
    assert "read-only" in capsys.readouterr().err
    unit = Path(__file__).parents[1] / "docs" / "systemd" / "tunnel-agent.service"
    assert f"RestartPreventExitStatus={READ_ONLY_EXIT_STATUS}\n" in unit.read_text()


def test_otherKeyErrorsStayUsageErrors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at first start still exits 1, so systemd tries again (room may come)."""
    from agent.identity import IdentityError

    def full(stateDir: Path) -> Any:
        raise IdentityError("no space")

    monkeypatch.setattr(tap, "loadOrCreateDeviceKey", full)
    config = AgentConfig(
        stateDir=tmp_path, servers=(), name="kiln7", serverKey=ServerKeyPin("SHA256:" + "A" * 43)
    )
    with pytest.raises(usage.UsageError):
        tap.buildService(config, MemoryReactorClock())


# -- the log file ------------------------------------------------------------------------


def test_logFileThatCannotBeOpenedFallsBackToStandardOutput(tmp_path: Path) -> None:
    """
    C{tunnel-agentd -l FILE} where FILE cannot be opened (a read-only card; here its
    directory is a file) logs to standard output and says why, rather than stopping the
    agent with a traceback before it links.
    """
    (tmp_path / "logs").write_bytes(b"")
    output, why = launcher._openLogFile(str(tmp_path / "logs" / "agent.log"), Clock())
    assert output is sys.stdout
    assert isinstance(why, OSError)
    assert launcher._openLogFile("-", Clock()) == (sys.stdout, None)


class CardLogFile:
    """A log file on a card that the kernel remounts read-only while the agent runs."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.readOnly = False
        self.tries = 0

    def write(self, text: str) -> None:
        self.tries += 1
        if self.readOnly:
            raise OSError(errno.EROFS, READ_ONLY)
        self.lines.append(text)

    def flush(self) -> None:
        pass

    def rotate(self) -> None:
        if self.readOnly:
            raise OSError(errno.EROFS, READ_ONLY)


def test_logFileThatTurnsReadOnlyFallsBackToStandardOutput() -> None:
    """
    Once a write to the log file fails (the card went read-only), the lines go to standard
    output, the first of them saying why, once; before, every line after it vanished.
    """
    card, stdout = CardLogFile(), io.StringIO()
    output = launcher.FallbackLogFile(card, "/var/log/tunnel-agent.log", stdout)
    output.write("one\n")
    card.readOnly = True
    output.write("two\n")
    output.rotate()
    output.write("three\n")
    output.flush()
    assert card.lines == ["one\n"]
    said, *rest = stdout.getvalue().splitlines()
    assert "cannot write the log file /var/log/tunnel-agent.log: " + READ_ONLY in said
    assert "[agent.launcher#warn]" in said
    assert rest == ["two", "three"]


NOON = datetime(2026, 11, 27, 12, 0, tzinfo=UTC).timestamp()


def test_logFileTriedAgainOnceAMinute() -> None:
    """
    After a failed write the lines go to standard output until the first line a minute
    (elapsed clock) after the last try, which tries the log file again: once the card is
    writable it goes there, after a line saying from when to when lines went to standard
    output, and standard output says they went back. A step of the wall clock moves no try.
    """
    card, stdout, clock = CardLogFile(), io.StringIO(), Clock()
    wall = [NOON]
    output = launcher.FallbackLogFile(
        card, "/var/log/tunnel-agent.log", stdout, elapsed=clock.seconds, wall=lambda: wall[0]
    )
    output.write("one\n")
    card.readOnly = True
    output.write("two\n")
    card.readOnly = False
    clock.advance(launcher.LOG_FILE_RETRY - 1)
    wall[0] += 365 * 86400  # NTP sets a clock that was a year behind
    output.write("three\n")
    assert card.tries == 2
    wall[0] = NOON + launcher.LOG_FILE_RETRY
    clock.advance(1)
    output.write("four\n")
    output.write("five\n")
    assert card.tries == 4
    first, back, *rest = card.lines
    assert (first, rest) == ("one\n", ["five\n"])
    note, line = back.splitlines()
    assert "[agent.launcher#warn] the log lines from 2026-11-27T12:00:00Z to " in note
    assert "2026-11-27T12:01:00Z went to standard output (the journal, under systemd)" in note
    assert line == "four"
    said, two, three, again = stdout.getvalue().splitlines()
    assert "trying the file again every 60 s" in said
    assert (two, three) == ("two", "three")
    assert again.endswith(
        "[agent.launcher#info] logging to /var/log/tunnel-agent.log again from 2026-11-27T12:01:00Z"
    )


def test_logFileStillUnwritableIsTriedOnceAMinuteUnsaid() -> None:
    """
    A try that fails again says nothing more (one line said why) and the next try is a
    minute after it; while the file works, no line looks at the clock (the hot path).
    """
    card, stdout, clock = CardLogFile(), io.StringIO(), Clock()
    looked = []

    def elapsed() -> float:
        looked.append(clock.seconds())
        return clock.seconds()

    output = launcher.FallbackLogFile(card, "/var/log/a.log", stdout, elapsed=elapsed)
    for _ in range(100):
        output.write("fine\n")
    assert looked == []
    card.readOnly = True
    output.write("lost\n")
    for _ in range(3 * 60):
        clock.advance(1)
        output.write("tick\n")
    assert card.tries == 100 + 1 + 3
    assert len(stdout.getvalue().splitlines()) == 1 + 1 + 3 * 60
    assert stdout.getvalue().count("cannot write the log file") == 1


def test_logFileNoteStartsOnALineOfItsOwn(tmp_path: Path) -> None:
    """
    The line that filled the disk was written in part (the kernel writes what fits): the
    note about the span on standard output starts on a line of its own after it.
    """

    class FillingLogFile(LogFile):
        room: int | None = None

        def write(self, data: Any) -> None:
            if self.room is not None:
                LogFile.write(self, data[: self.room])
                self.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            LogFile.write(self, data)

    path = tmp_path / "agent.log"
    card, clock = FillingLogFile.fromFullPath(str(path)), Clock()
    output = launcher.FallbackLogFile(card, str(path), io.StringIO(), elapsed=clock.seconds)
    output.write("one\n")
    card.room = 3
    output.write("two and more\n")
    card.room = None
    clock.advance(launcher.LOG_FILE_RETRY)
    output.write("three\n")
    output.close()
    one, cut, note, three = path.read_text().splitlines()
    assert (one, cut, three) == ("one", "two", "three")
    assert "went to standard output" in note


# -- status.json -------------------------------------------------------------------------


def test_statusOnAReadOnlyFileSystem(tmp_path: Path, disk: ReadOnlyDisk) -> None:
    """
    One warning names the read-only file system; the file keeps its content; once the file
    system is writable again the status is written within a minute, without an update.
    """
    clock = Clock()
    status = StatusFile(tmp_path, clock)
    with capturedLogs() as events:
        status.update(state="approved", name="kiln7")
        for _ in range(10):
            clock.advance(STATUS_RETRY_DELAY)
    said = warnings(events)
    assert len(said) == 1 and READ_ONLY in said[0], said
    assert names(tmp_path) == []
    disk.readOnly = False
    clock.advance(STATUS_RETRY_DELAY)
    assert StatusFile.read(tmp_path)["state"] == "approved"


# -- tunnel-agent pair and status ---------------------------------------------------------


@pytest.fixture
def readOnlyState(monkeypatch: pytest.MonkeyPatch) -> None:
    """C{tunnel-agent}'s try at a file in the state directory finds it read-only."""

    def readOnly(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, READ_ONLY)

    monkeypatch.setattr(agent_cli.tempfile, "TemporaryFile", readOnly)


@pytest.mark.usefixtures("readOnlyState")
@pytest.mark.parametrize("command", ["status", "pair"])
def test_noStatusOnAReadOnlyCard(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    No status file on a read-only card: not "is the agent running?" (it is, and it logs
    its pairing code) but where to look.
    """
    assert agent_cli.main([command, "--state", str(tmp_path)]) == 1
    said = capsys.readouterr().err
    assert "read-only file system" in said and "journalctl -u tunnel-agent" in said, said
    assert "is the agent running" not in said


@pytest.mark.usefixtures("readOnlyState")
def test_pairingCodeOnAReadOnlyCardMayBeOld(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A code in a status file on a read-only card is what was there when it turned so: the
    agent has offered new codes since, in its log. C{pair} prints it and says so.
    """
    (tmp_path / STATUS_FILE).write_text(
        json.dumps(
            {
                "state": "pending",
                "pairing_code": "K7QP-M2XD",
                "pairing_code_expires_at": "2026-11-27T12:10:00Z",
            }
        )
    )
    now = datetime(2026, 11, 27, 12, 5, tzinfo=UTC).timestamp()
    assert agent_cli.main(["pair", "--state", str(tmp_path)], now=lambda: now) == 0
    out, err = capsys.readouterr()
    assert out == "K7QP-M2XD\n"
    assert "this code may be out of date" in err and "journalctl" in err, err


# -- the remembered address --------------------------------------------------------------


def linksUp(stateFile: Path, remembered: str, count: int) -> tuple[Any, list[str]]:
    """
    C{count} links up over C{tls:b}, with C{remembered} the address in C{stateFile} before:
    a function that brings one more up, and the warnings said.
    """
    stateFile.write_text(json.dumps({"address": remembered}) + "\n")
    endpoint = FailoverEndpoint(Clock(), [connector("tls:b", "ok")], stateFile)
    factory = LinkFactory()

    def linkUp() -> None:
        endpoint.connect(factory)
        factory.links[-1].ready.callback(None)

    with capturedLogs() as events:
        for _ in range(count):
            linkUp()
    return linkUp, warnings(events)


def test_rememberedAddressNotWrittenAgain(tmp_path: Path, disk: ReadOnlyDisk) -> None:
    """
    A link up over the address already remembered writes nothing (before: a write at each
    link up, and on a read-only card a warning at each reconnect).
    """
    _, said = linksUp(tmp_path / "last-server.json", "tls:b", 3)
    assert said == []
    assert disk.refused == 0


def test_newAddressOnAReadOnlyFileSystem(tmp_path: Path, disk: ReadOnlyDisk) -> None:
    """
    A new working address that cannot be recorded is said once, in words, whatever the
    number of links; it is recorded at the first link up once the file system is writable.
    """
    stateFile = tmp_path / "last-server.json"
    linkUp, said = linksUp(stateFile, "ssh:a", 3)
    assert len(said) == 1 and said[0].count(READ_ONLY) == 1, said
    assert "[Errno" not in said[0]
    assert json.loads(stateFile.read_text()) == {"address": "ssh:a"}
    disk.readOnly = False
    linkUp()
    assert json.loads(stateFile.read_text()) == {"address": "tls:b"}


# -- the certificate, over an in-memory link ---------------------------------------------


class ReadOnlyEnrollmentTests(EnrollmentTestCase):
    """Enrollment with the state directory read-only (tests.test_enrollment.World)."""

    def setUp(self) -> None:
        super().setUp()
        self.disk = ReadOnlyDisk()
        self.disk.readOnly = False
        self.patch(statefiles, "os", self.disk)

    def test_renewalWaitsForAWritableCard(self) -> None:
        """
        A renewal falls due with the card read-only: the agent keeps its certificate byte
        for byte, asks groundcontrol for none (it would sign one an hour for nothing), says
        so once, and renews within the hour after the card is writable, on the same link.
        """
        agent = self.world.enrolled("kiln7")
        old = agent.certificatePEM
        notBefore, notAfter = certificateLifetime(old)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        self.disk.readOnly = True
        self.world.advance(renewalDue(notBefore, notAfter) - self.world.now)
        for _ in range(5):
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(agent.certificatePEM, old)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        said = [line for line in agent.log if "read-only file system" in line]
        self.assertEqual(len(said), 1, agent.log)
        self.assertIn(str(agent.stateDir / CERTIFICATE_FILE), said[0])
        self.assertIn("keeps the one valid until", said[0])
        self.assertFalse(any("cannot store the new fleet certificate" in m for m in agent.log))

        self.disk.readOnly = False
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertNotEqual(agent.certificatePEM, old)
        self.assertEqual(certificatesIssued(self.fleet), 2)
        self.assertTrue(agent.connected)

    def test_certificateRunningOutOnAReadOnlyCardIsWarned(self) -> None:
        """
        In its last day a certificate that cannot be renewed because the card is read-only
        is warned about hourly (as on a full disk), saying what a person must do.
        """
        agent = self.world.enrolled("kiln7")
        notBefore, notAfter = certificateLifetime(agent.certificatePEM)
        self.disk.readOnly = True
        self.world.advance(renewalDue(notBefore, notAfter) - self.world.now)
        self.assertFalse(any("cannot be renewed" in m for m in agent.log))
        self.world.advance(notAfter - DAY / 2 - self.world.now)
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        said = [line for line in agent.log if "cannot be renewed" in line]
        self.assertEqual(len(said), 2, agent.log)
        self.assertIn("runs out in 12 h", said[0])
        self.assertIn("remount it writable", said[0])
        self.assertEqual(certificatesIssued(self.fleet), 1)

    def test_pendingOnAReadOnlyCardLogsItsCode(self) -> None:
        """
        A pending device on a read-only card registers a pairing code and logs it (the
        status file cannot hold it); the status file has it within a minute of a remount.
        """
        self.disk.readOnly = True
        agent = self.world.start("oven2")
        (line,) = [m for m in agent.log if m.startswith("pairing code ")]
        self.assertNotIn(STATUS_FILE, names(agent.stateDir))
        self.disk.readOnly = False
        self.world.advance(STATUS_RETRY_DELAY)
        self.assertEqual(agent.status["pairing_code"], line.split()[2])
