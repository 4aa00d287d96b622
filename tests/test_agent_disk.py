"""
The agent with its state directory on a full disk, in memory: every state file write goes
through L{accesstunnel.statefiles}, whose C{os} is replaced here by a disk with a set number
of bytes of room, so a write fails part way with C{ENOSPC} as it does on a full SD card.

What is promised (tests/e2e/test_agent_disk_full.py runs the real programs on a full tmpfs):
a failed write leaves the previous file whole and no temporary file; key generation fails
with a clear error and leaves nothing; the status file, the remembered address and the
fleet certificate are written again once there is room, without a restart; the link, its
sessions and enrollment go on meanwhile.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.conch.ssh import keys
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, capturedLogs, formatEvent

from accesstunnel import statefiles
from agent import cli as agent_cli
from agent.enrollment import (
    CA_FILE,
    CERTIFICATE_FILE,
    CERTIFICATE_RETRY_DELAY,
    STATUS_FILE,
    STATUS_RETRY_DELAY,
    StatusFile,
    certificateLifetime,
    renewalDue,
)
from agent.failover import FailoverEndpoint
from agent.identity import DEVICE_KEY_FILE, IdentityError, loadOrCreateDeviceKey
from groundcontrol.testing import resultNow
from tests.test_enrollment import DAY, EnrollmentTestCase
from tests.test_failover import LinkFactory, connector

NO_SPACE = os.strerror(errno.ENOSPC)
QUOTA = os.strerror(errno.EDQUOT)


class FullDisk:
    """
    C{os} as L{accesstunnel.statefiles} sees it, on a disk with C{room} bytes left (C{None}:
    as much as the real one). A write past the room writes what fits and then fails with
    C{ENOSPC} (or C{error}: C{EDQUOT} for a quota), as the kernel does.
    """

    def __init__(self, room: int | None = 0, error: int = errno.ENOSPC) -> None:
        self.room = room
        self.error = error
        self.refused = 0
        #: The largest file there is room for, if set: a few blocks free, any number of
        #: times (a file replaced gives its blocks back). A larger write fails, writing none.
        self.largest: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if self.largest is not None and len(data) > self.largest:
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error))
        if self.room is None:
            return os.write(fd, data)
        if self.room == 0:
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error))
        written = os.write(fd, bytes(data[: self.room]))
        self.room -= written
        return written


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> FullDisk:
    """A full disk under the agent's state files; set C{room = None} to free it."""
    full = FullDisk()
    monkeypatch.setattr(statefiles, "os", full)
    return full


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def certificatesIssued(fleet: Any, device: str = "kiln7") -> int:
    """How many fleet certificates groundcontrol has signed for C{device}."""
    return len(resultNow(fleet.store.listCertificates(device)))


# -- accesstunnel.statefiles ------------------------------------------------------------


def test_failedReplaceKeepsTheOldFile(tmp_path: Path, disk: FullDisk) -> None:
    """A write that runs out of room part way leaves the old file whole and no temporary."""
    path = tmp_path / "status.json"
    path.write_bytes(b"old, whole\n")
    disk.room = 10
    with pytest.raises(OSError) as raised:
        statefiles.writeAtomically(path, b"new content, longer than the room left\n")
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old, whole\n"
    assert names(tmp_path) == ["status.json"]
    disk.room = None
    statefiles.writeAtomically(path, b"new\n", mode=0o600)
    assert path.read_bytes() == b"new\n"
    assert names(tmp_path) == ["status.json"]


def test_createAtomicallyLeavesNothingOrAWholeFile(tmp_path: Path, disk: FullDisk) -> None:
    """
    Creating a file on a full disk leaves no file (not an empty one); with room it is made
    whole with its mode; an existing file is left alone (another process made it first).
    """
    path = tmp_path / "key"
    with pytest.raises(OSError):
        statefiles.createAtomically(path, b"secret\n")
    assert names(tmp_path) == []
    disk.room = None
    assert statefiles.createAtomically(path, b"secret\n", mode=0o600)
    assert path.read_bytes() == b"secret\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not statefiles.createAtomically(path, b"another\n")
    assert path.read_bytes() == b"secret\n"
    assert names(tmp_path) == ["key"]


# -- the device key ----------------------------------------------------------------------


def test_firstStartOnAFullDisk(tmp_path: Path, disk: FullDisk) -> None:
    """
    A first start that cannot write the new key fails with an error that says why and
    leaves nothing in the state directory; the next start with room makes the key, which
    every later start loads.
    """
    state = tmp_path / "state"
    with pytest.raises(IdentityError) as raised:
        loadOrCreateDeviceKey(state)
    assert NO_SPACE in str(raised.value)
    assert str(state / DEVICE_KEY_FILE) in str(raised.value)
    assert names(state) == []
    disk.room = None
    key = loadOrCreateDeviceKey(state)
    assert names(state) == [DEVICE_KEY_FILE, DEVICE_KEY_FILE + ".pub"]
    assert loadOrCreateDeviceKey(state) == key
    assert (state / (DEVICE_KEY_FILE + ".pub")).read_text() == (
        key.public().toString("OPENSSH").decode() + "\n"
    )


def test_stateDirectoryThatCannotBeMade(tmp_path: Path) -> None:
    """
    A state directory that cannot be made (here its parent is a file; on a full ext4 card,
    ENOSPC) is a clear error, not a traceback from twistd.
    """
    (tmp_path / "var").write_bytes(b"")
    with pytest.raises(IdentityError, match=r"cannot make the state directory .*var/state"):
        loadOrCreateDeviceKey(tmp_path / "var" / "state")


def test_keyCutShortLeavesNoKey(tmp_path: Path, disk: FullDisk) -> None:
    """A key whose write runs out of room half way is not left behind, half a key."""
    disk.room = 100
    with pytest.raises(IdentityError):
        loadOrCreateDeviceKey(tmp_path)
    assert names(tmp_path) == []


def test_emptyKeyFromAnOlderAgentIsReplaced(tmp_path: Path) -> None:
    """
    An empty key file (an agent before statefiles made the file, then found the disk full)
    is a key never written: it is replaced by a new key, with a warning, instead of every
    start failing with "cannot use device key" until someone removes it.
    """
    (tmp_path / DEVICE_KEY_FILE).write_bytes(b"")
    with capturedLogs() as events:
        key = loadOrCreateDeviceKey(tmp_path)
    assert keys.Key.fromString((tmp_path / DEVICE_KEY_FILE).read_bytes()) == key
    assert any("is empty (never written)" in formatEvent(e) for e in events)


def test_truncatedKeyIsAnError(tmp_path: Path) -> None:
    """A key file with something in it that is not a key is not replaced: it may be one."""
    (tmp_path / DEVICE_KEY_FILE).write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl")
    with pytest.raises(IdentityError, match="cannot use device key"):
        loadOrCreateDeviceKey(tmp_path)


def test_publicKeyWrittenWhenThereIsRoom(tmp_path: Path, disk: FullDisk) -> None:
    """
    The key fits but its public half does not: the agent starts with its key (it never
    reads the .pub), says so, and the next start writes the .pub.
    """
    disk.room = 400  # an ed25519 key in OpenSSH form is 387 bytes, its .pub 81
    with capturedLogs() as events:
        key = loadOrCreateDeviceKey(tmp_path)
    assert names(tmp_path) == [DEVICE_KEY_FILE]
    assert any(e["log_level"] == LogLevel.warn and NO_SPACE in formatEvent(e) for e in events)
    disk.room = None
    assert loadOrCreateDeviceKey(tmp_path) == key
    assert names(tmp_path) == [DEVICE_KEY_FILE, DEVICE_KEY_FILE + ".pub"]


# -- status.json -------------------------------------------------------------------------


def test_statusWriteFailureIsLoggedOnceAndRetried(tmp_path: Path, disk: FullDisk) -> None:
    """
    An update on a full disk does not raise; the file keeps its last whole content; one
    warning says why, not one a minute; once there is room the agent writes it again by
    itself (no update needed) and says so.
    """
    clock = Clock()
    status = StatusFile(tmp_path, clock)
    disk.room = None
    status.update(state="pending", name="kiln7")
    disk.room = 0
    with capturedLogs() as events:
        status.update(state="approved")
        for _ in range(5):
            clock.advance(STATUS_RETRY_DELAY)
    assert StatusFile.read(tmp_path)["state"] == "pending"
    assert names(tmp_path) == [STATUS_FILE]
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1 and NO_SPACE in warnings[0], warnings
    assert disk.refused == 6
    disk.room = None
    with capturedLogs() as events:
        clock.advance(STATUS_RETRY_DELAY)
    assert StatusFile.read(tmp_path)["state"] == "approved"
    assert [formatEvent(e) for e in events] == [f"{tmp_path / STATUS_FILE} written again"]
    assert clock.getDelayedCalls() == []


# -- the remembered address --------------------------------------------------------------


def test_rememberedAddressOnAFullDisk(tmp_path: Path, disk: FullDisk) -> None:
    """
    A link that comes up on a full disk keeps the address remembered before and leaves no
    temporary file; the next link up with room records the new one.
    """
    stateFile = tmp_path / "last-server.json"
    stateFile.write_text(json.dumps({"address": "ssh:a"}) + "\n")
    endpoint = FailoverEndpoint(Clock(), [connector("tls:b", "ok")], stateFile)
    factory = LinkFactory()
    endpoint.connect(factory)
    with capturedLogs() as events:
        factory.links[-1].ready.callback(None)
    assert json.loads(stateFile.read_text()) == {"address": "ssh:a"}
    assert names(tmp_path) == ["last-server.json"]
    assert any(NO_SPACE in formatEvent(e) for e in events)
    disk.room = None
    endpoint.connect(factory)
    factory.links[-1].ready.callback(None)
    assert json.loads(stateFile.read_text()) == {"address": "tls:b"}


# -- enrollment and the certificate, over an in-memory link ----------------------------


class FullDiskEnrollmentTests(EnrollmentTestCase):
    """The agent's enrollment with its state directory full (tests.test_enrollment.World)."""

    def setUp(self) -> None:
        super().setUp()
        self.disk = FullDisk(room=None)
        self.patch(statefiles, "os", self.disk)

    def test_approvedOnAFullDiskServesAndAsksOnceThereIsRoom(self) -> None:
        """
        An approved device whose disk is full serves sessions, and does not ask for a
        certificate it could not store (groundcontrol signed one an hour for nothing, an
        error line each time): one line says why; within the hour after there is room it
        asks, stores it, and the status file catches up, without a reconnect.
        """
        self.disk.room = 0
        agent = self.world.agent("kiln7")
        self.fleet.enrollDevice("kiln7", agent.key)
        self.world.connect(agent)
        self.assertTrue(self.world.reaches(self.admin, "kiln7", agent))
        self.assertEqual(agent.enrollment.state, "approved")
        for _ in range(5):
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(names(agent.stateDir), [])
        self.assertEqual(certificatesIssued(self.fleet), 0)
        said = [line for line in agent.log if "is on a full disk" in line]
        self.assertEqual(len(said), 1, agent.log)
        self.assertIn(
            f"{agent.stateDir / CERTIFICATE_FILE} is on a full disk ({NO_SPACE})", said[0]
        )
        self.assertIn("the agent has none and asks for a new one once it can store it", said[0])
        self.assertFalse(any("cannot store the new fleet certificate" in m for m in agent.log))

        self.disk.room = None
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(names(agent.stateDir), sorted([CA_FILE, CERTIFICATE_FILE, STATUS_FILE]))
        self.assertEqual(certificatesIssued(self.fleet), 1)
        self.assertEqual(agent.status["state"], "approved")
        self.assertIn("certificate_expires_at", agent.status)
        self.assertTrue(agent.connected)

    def test_renewalOnAFullDiskKeepsTheOldCertificate(self) -> None:
        """
        A renewal that falls due on a full disk leaves the old certificate byte for byte
        (the TLS transports present it) and asks groundcontrol for none; once there is room
        the agent renews within the hour.
        """
        agent = self.world.enrolled("kiln7")
        old = agent.certificatePEM
        notBefore, notAfter = certificateLifetime(old)
        self.disk.room = 0
        self.world.advance(renewalDue(notBefore, notAfter) - self.world.now)
        for _ in range(3):
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(agent.certificatePEM, old)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        self.assertEqual(names(agent.stateDir), sorted([CA_FILE, CERTIFICATE_FILE, STATUS_FILE]))
        said = [line for line in agent.log if "is on a full disk" in line]
        self.assertEqual(len(said), 1, agent.log)
        self.assertIn("keeps the one valid until", said[0])
        self.disk.room = None
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertNotEqual(agent.certificatePEM, old)
        self.assertEqual(certificatesIssued(self.fleet), 2)
        self.assertGreater(certificateLifetime(agent.certificatePEM)[1], notAfter + DAY)

    def test_overQuotaIsAFullDisk(self) -> None:
        """A state directory over the agent's quota (EDQUOT) holds the request back too."""
        self.disk.error = errno.EDQUOT
        agent = self.world.enrolled("kiln7")
        notBefore, notAfter = certificateLifetime(agent.certificatePEM)
        self.disk.room = 0
        self.world.advance(renewalDue(notBefore, notAfter) - self.world.now)
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        self.assertTrue(any(f"on a full disk ({QUOTA})" in m for m in agent.log), agent.log)

    def runningOutWarnings(self, agent: Any) -> list[tuple[float, str]]:
        """
        (wall time, text) of each warning the agent's enrollment logs from now on, which
        goes on to the agent's log too.
        """
        said: list[tuple[float, str]] = []

        def observer(event: LogEvent) -> None:
            text = formatEvent(event)
            agent.log.append(text)
            if event["log_level"] == LogLevel.warn and "cannot be renewed" in text:
                said.append((self.world.now, text))

        agent.enrollment._log = Logger(namespace="test", observer=cast(ILogObserver, observer))
        return said

    def test_certificateRunningOutOnAFullDiskIsWarnedHourly(self) -> None:
        """
        A certificate that cannot be renewed for lack of room is warned about at warning
        level every hour of its last day (a person must free space before the device drops
        off the fleet), not before, and not again at a reconnect within the hour; once it
        has run out the warning says so. With room the renewal stops the warnings.
        """
        agent = self.world.enrolled("kiln7")
        notBefore, notAfter = certificateLifetime(agent.certificatePEM)
        said = self.runningOutWarnings(agent)
        self.disk.room = 0
        self.world.advance(renewalDue(notBefore, notAfter) - self.world.now)
        while self.world.now < notAfter - DAY - CERTIFICATE_RETRY_DELAY:
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(said, [])
        while self.world.now + CERTIFICATE_RETRY_DELAY < notAfter:
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(len(said), 24, said)
        self.assertTrue(all(0 < notAfter - when < DAY for when, _ in said))
        gaps = {later - earlier for (earlier, _), (later, _) in itertools.pairwise(said)}
        self.assertEqual(gaps, {CERTIFICATE_RETRY_DELAY})
        first = said[0][1]
        self.assertIn(f"{agent.stateDir / CERTIFICATE_FILE} runs out in 23 h", first)
        self.assertIn("free space on that disk", first)
        self.assertIn("the device comes back as pending", first)
        self.assertIn(" min (", said[-1][1])

        self.world.disconnect(agent)
        self.world.connect(agent)
        self.assertEqual(len(said), 24, said)
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(len(said), 25)
        self.assertIn("has run out", said[-1][1])

        self.disk.room = None
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 2)
        self.world.advance(DAY)
        self.assertEqual(len(said), 25)

    def test_renewalThatDoesNotFitIsNotAskedFor(self) -> None:
        """
        status.json fits but a certificate does not (a few blocks free): a renewal is not
        asked for (groundcontrol signed one an hour for nothing, an error line each time)
        until a file the size of the certificate held can be written, looked at hourly, by
        a restarted agent either; one line says so, and in the certificate's last day the
        warning that it runs out is hourly. Once there is room it renews within the hour.
        """
        first = self.world.enrolled("kiln7")
        old = first.certificatePEM
        notBefore, notAfter = certificateLifetime(old)
        self.disk.largest = 600  # status.json is about 200 bytes, a certificate 700-1000
        self.world.advance(renewalDue(notBefore, notAfter) - self.world.now)
        self.world.advance(2 * CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        self.world.disconnect(first)
        agent = self.world.agent("kiln7", key=first.key)  # the agent restarted
        for name in (CERTIFICATE_FILE, CA_FILE, STATUS_FILE):
            (agent.stateDir / name).write_bytes((first.stateDir / name).read_bytes())
        said = self.runningOutWarnings(agent)
        self.world.connect(agent)
        while self.world.now + CERTIFICATE_RETRY_DELAY < notAfter - DAY / 2:
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        for each in (first, agent):
            (wait,) = [m for m in each.log if "is on a full disk" in m]
            self.assertIn(
                f"{each.stateDir / CERTIFICATE_FILE} is on a full disk ({NO_SPACE})", wait
            )
            self.assertIn("keeps the one valid until", wait)
        self.assertEqual(len(said), 12, said)
        self.assertIn("runs out in 23 h", said[0][1])
        self.assertEqual(agent.certificatePEM, old)
        self.assertEqual(names(agent.stateDir), sorted([CA_FILE, CERTIFICATE_FILE, STATUS_FILE]))

        self.disk.largest = None
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 2)
        self.assertGreater(certificateLifetime(agent.certificatePEM)[1], notAfter + DAY)
        self.world.advance(DAY)
        self.assertEqual(len(said), 12)

    def test_firstCertificateThatDoesNotFitIsAskedForOnce(self) -> None:
        """
        With no certificate held, its size is not known: the first is asked for, does not
        fit, and no other is asked for until a file its size can be written; one error line
        says so. Once there is room the agent asks within the hour and stores it.
        """
        self.disk.largest = 600
        agent = self.world.agent("kiln7")
        self.fleet.enrollDevice("kiln7", agent.key)
        self.world.connect(agent)
        for _ in range(5):
            self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 1)
        (error,) = [m for m in agent.log if "cannot store the new fleet certificate" in m]
        self.assertIn(f"in {agent.stateDir / CERTIFICATE_FILE}: {NO_SPACE}", error)
        self.assertRegex(error, r"asks for a new one once a file of \d+ bytes can be written")
        self.assertFalse(any("is on a full disk" in m for m in agent.log), agent.log)
        self.assertEqual(names(agent.stateDir), [CA_FILE, STATUS_FILE])  # the CA is smaller

        self.disk.largest = None
        self.world.advance(CERTIFICATE_RETRY_DELAY)
        self.assertEqual(certificatesIssued(self.fleet), 2)
        self.assertEqual(names(agent.stateDir), sorted([CA_FILE, CERTIFICATE_FILE, STATUS_FILE]))

    def test_pendingOnAFullDiskShowsItsCodeOnceThereIsRoom(self) -> None:
        """
        A pending device whose disk is full still registers a pairing code and logs it
        (the status file cannot hold it); once there is room the status file is written
        within a minute and C{tunnel-agent pair} prints the code.
        """
        self.disk.room = 0
        agent = self.world.start("oven2")
        self.assertEqual(agent.enrollment.state, "pending")
        self.assertIsNotNone(self.fleet.registry.pendingFor(agent.fingerprint))
        (line,) = [m for m in agent.log if m.startswith("pairing code ")]
        code = line.split()[2]
        self.assertEqual(agent_cli.main(["pair", "--state", str(agent.stateDir)]), 1)
        self.disk.room = None
        self.world.advance(STATUS_RETRY_DELAY)
        self.assertEqual(agent.status["pairing_code"], code)
        self.assertEqual(agent.status["state"], "pending")

    def test_restartKeepsTheCertificateExpiryInStatus(self) -> None:
        """
        A restarted agent (a new process: a new Enrollment on a copy of the state directory)
        whose certificate is still good says its expiry in the status file, as the one
        that stored it did (before, the hello's write dropped it until the next renewal).
        """
        agent = self.world.enrolled("kiln7")
        expires = agent.status["certificate_expires_at"]
        self.world.disconnect(agent)
        restarted = self.world.agent("kiln7", key=agent.key)
        for name in (CERTIFICATE_FILE, CA_FILE, STATUS_FILE):
            (restarted.stateDir / name).write_bytes((agent.stateDir / name).read_bytes())
        self.world.connect(restarted)
        self.assertEqual(restarted.status["state"], "approved")
        self.assertEqual(restarted.status["certificate_expires_at"], expires)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 1)
