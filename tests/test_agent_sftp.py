"""
Tests for the agent's built-in SFTP server (agent.sftpserver) and its use as the sftp subsystem.

The server is driven in memory by Conch's own SFTP client
(L{FileTransferClient}) over an L{iosim} pump, against a temporary
directory. Two tests use real processes: the session starting the built-in
server as a real child when the device has no sftp-server, and OpenSSH's
own sftp client (C{sftp -D}) against it, which is what operators run.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
from typing import Any

from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.filetransfer import (
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FileTransferClient,
    SFTPError,
)
from twisted.internet import defer, reactor
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from agent.session import SessionChannel, SessionEnvironment
from agent.sftpserver import EXTENSIONS, LocalFiles, SFTPServer
from tests.test_agent_session import WINDOW, RecordingConnection, deliver, peerClosed


class _Client(FileTransferClient):
    def __init__(self) -> None:
        super().__init__()
        self.serverVersion: tuple[int, dict[bytes, bytes]] | None = None

    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        self.serverVersion = (serverVersion, extData)


class InMemorySFTPTests(SynchronousTestCase):
    """The built-in server's file semantics, through Conch's SFTP client."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp()).encode()
        os.mkdir(self.root)
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: SFTPServer(LocalFiles(self.root)), _Client
        )

    def result(self, d: defer.Deferred[Any]) -> Any:
        self.pump.flush()
        return self.successResultOf(d)

    def error(self, d: defer.Deferred[Any]) -> SFTPError:
        self.pump.flush()
        return self.failureResultOf(d, SFTPError).value

    def path(self, name: bytes) -> bytes:
        return os.path.join(self.root, name)

    def put(self, name: bytes, data: bytes, chunk: int = 32768) -> None:
        handle = self.result(
            self.client.openFile(name, FXF_WRITE | FXF_CREAT | FXF_TRUNC, {"permissions": 0o644})
        )
        for offset in range(0, len(data), chunk):
            self.result(handle.writeChunk(offset, data[offset : offset + chunk]))
        self.result(handle.close())

    def get(self, name: bytes, chunk: int = 32768) -> bytes:
        handle = self.result(self.client.openFile(name, FXF_READ, {}))
        parts: list[bytes] = []
        while True:
            d = handle.readChunk(sum(map(len, parts)), chunk)
            self.pump.flush()
            failures: list[Any] = []
            d.addErrback(failures.append)
            if failures:
                failures[0].trap(EOFError)  # Conch's client: FX_EOF
                break
            parts.append(self.successResultOf(d))
        self.result(handle.close())
        return b"".join(parts)

    def test_versionAndExtensions(self) -> None:
        """The server speaks SFTP 3 and offers the OpenSSH extensions it implements."""
        self.pump.flush()
        self.assertEqual(self.client.serverVersion, (3, EXTENSIONS))

    def test_putGetAndList(self) -> None:
        """put writes bytes; get reads them back; ls lists them with ls -l lines and attributes."""
        data = os.urandom(200_000)
        self.put(b"up.bin", data)
        with open(self.path(b"up.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(self.get(b"up.bin"), data)
        directory = self.result(self.client.openDirectory(b"."))
        entries = {}
        while True:
            d = directory.read()
            self.pump.flush()
            failures: list[Any] = []
            d.addErrback(failures.append)
            if failures:
                break
            for name, longname, attrs in self.successResultOf(d):
                entries[name] = (longname, attrs)
        self.result(directory.close())
        self.assertEqual(set(entries), {b".", b"..", b"up.bin"})
        longname, attrs = entries[b"up.bin"]
        self.assertTrue(longname.startswith(b"-rw-r--r--"), longname)
        self.assertTrue(longname.endswith(b" up.bin"), longname)
        self.assertEqual(attrs["size"], len(data))
        self.assertTrue(stat.S_ISREG(attrs["permissions"]))

    def test_relativePathsFromHome(self) -> None:
        """Relative paths and realpath(".") are the home directory, like sftp-server."""
        home = self.root.decode()  # Conch's client decodes names
        self.assertEqual(self.result(self.client.realPath(b".")), home)
        self.assertEqual(self.result(self.client.realPath(b"")), home)
        self.put(b"a", b"x")
        self.assertTrue(os.path.exists(self.path(b"a")))

    def test_nonUTF8Names(self) -> None:
        """A file name that is not UTF-8 is stored and listed byte for byte."""
        name = b"caf\xe9.txt"
        self.put(name, b"latin-1")
        self.assertTrue(os.path.exists(self.path(name)))
        self.assertEqual(self.get(name), b"latin-1")

    def test_errorsAsStatusCodes(self) -> None:
        """Missing files give NO_SUCH_FILE with the system's text; other errors FAILURE."""
        e = self.error(self.client.openFile(b"missing", FXF_READ, {}))
        self.assertEqual(e.code, filetransfer.FX_NO_SUCH_FILE)
        self.assertEqual(e.message, os.strerror(2))
        os.mkdir(self.path(b"d"))
        self.put(b"d/f", b"")
        e = self.error(self.client.removeDirectory(b"d"))  # not empty
        self.assertEqual(e.code, filetransfer.FX_FAILURE)

    def test_renameDoesNotReplacePosixRenameDoes(self) -> None:
        """SSH_FXP_RENAME refuses to replace a file; posix-rename@openssh.com replaces it."""
        self.put(b"a", b"A")
        self.put(b"b", b"B")
        e = self.error(self.client.renameFile(b"a", b"b"))
        self.assertEqual(e.code, filetransfer.FX_FAILURE)
        self.result(self.client.extendedRequest(b"posix-rename@openssh.com", NS(b"a") + NS(b"b")))
        self.assertFalse(os.path.exists(self.path(b"a")))
        self.assertEqual(self.get(b"b"), b"A")

    def test_fsetstatKeepsModeAndTimes(self) -> None:
        """fsetstat sets mode and times on the open file (what scp -p and sftp put -p send)."""
        handle = self.result(self.client.openFile(b"f", FXF_WRITE | FXF_CREAT, {}))
        self.result(handle.writeChunk(0, b"data"))
        attrs = {"permissions": 0o100640, "atime": 1_000_000, "mtime": 2_000_000}
        # Conch's ClientFile.setAttrs sends FSTAT by mistake: send FSETSTAT as OpenSSH does.
        packet = handle.handle + self.client._packAttributes(attrs)
        self.result(self.client._sendRequest(filetransfer.FXP_FSETSTAT, packet))
        self.result(handle.close())
        s = os.stat(self.path(b"f"))
        self.assertEqual(stat.S_IMODE(s.st_mode), 0o640)
        self.assertEqual((s.st_atime, s.st_mtime), (1_000_000, 2_000_000))
        self.result(self.client.setAttrs(b"f", {"size": 2}))
        self.assertEqual(os.path.getsize(self.path(b"f")), 2)

    def test_mkdirSymlinkReadlink(self) -> None:
        """
        mkdir honours the mode; SYMLINK takes OpenSSH's order (target first, then
        the link, the reverse of the draft), and readlink gives the target back.
        """
        self.result(self.client.makeDirectory(b"d", {"permissions": 0o700}))
        self.assertEqual(stat.S_IMODE(os.stat(self.path(b"d")).st_mode), 0o700)
        self.result(self.client.makeLink(b"d", b"link"))  # as OpenSSH's `ln -s d link`
        self.assertEqual(os.readlink(self.path(b"link")), b"d")
        self.assertEqual(self.result(self.client.readLink(b"link")), "d")

    def test_expandPath(self) -> None:
        """expand-path@openssh.com expands ~ from HOME (the session user's home)."""
        self.patch(os, "environ", {**os.environ, "HOME": self.root.decode()})
        os.mkdir(self.path(b"sub"))
        names = self.result(self.client.extendedRequest(b"expand-path@openssh.com", NS(b"~/sub")))
        self.assertEqual(names[0][0], self.path(b"sub"))

    def test_statvfs(self) -> None:
        """statvfs@openssh.com answers with the eleven uint64 fields (sftp's df)."""
        reply = self.result(self.client.extendedRequest(b"statvfs@openssh.com", NS(b".")))
        fields = struct.unpack(">11Q", reply)
        self.assertEqual(fields[0], os.statvfs(self.root).f_bsize)

    def test_malformedRequestAnswered(self) -> None:
        """A malformed request gets BAD_MESSAGE, not silence (the client would wait forever)."""
        self.pump.flush()
        d = self.client._sendRequest(filetransfer.FXP_OPEN, NS(b"f"))  # no flags, no attrs
        e = self.error(d)
        self.assertEqual(e.code, filetransfer.FX_BAD_MESSAGE)
        self.assertEqual(self.result(self.client.realPath(b".")), self.root.decode())

    def test_oversizedMessageDropsConnection(self) -> None:
        """A message length above the limit ends the session instead of buffering it."""
        self.pump.flush()
        self.server.dataReceived(struct.pack("!LBL", 10 * 1024 * 1024, filetransfer.FXP_WRITE, 1))
        self.assertTrue(self.server.transport.disconnecting)


class _ChannelClient(_Client):
    """An SFTP client whose bytes go into a session channel."""

    def __init__(self, channel: SessionChannel) -> None:
        super().__init__()
        self.channel = channel
        self.ready: defer.Deferred[None] = defer.Deferred()

    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        super().gotServerVersion(serverVersion, extData)
        self.ready.callback(None)


class _Pipe:
    def __init__(self, channel: SessionChannel) -> None:
        self.channel = channel

    def write(self, data: bytes) -> None:
        deliver(self.channel, data)

    def loseConnection(self) -> None:
        self.channel.eofReceived()


class _ClientConnection(RecordingConnection):
    """Passes the channel's stdout to the SFTP client as it comes."""

    client: _ChannelClient

    def sendData(self, channel: Any, data: bytes) -> None:
        super().sendData(channel, data)
        # Later, as a real connection would: never back into the channel from sendData.
        reactor.callLater(0, self.client.dataReceived, bytes(data))


class BuiltinSubsystemProcessTests(TestCase):
    """The sftp subsystem falls back to the built-in server as a real child."""

    async def test_fallbackServesFiles(self) -> None:
        """
        With no sftp-server on the device the subsystem starts the built-in one
        (python -m agent.sftpserver, through the session's spawn path, in the
        user's home): realpath is home, put and get round-trip.
        """
        home = os.path.realpath(self.mktemp())
        os.mkdir(home)
        environment = SessionEnvironment(home=home, sftpServerPaths=())
        conn = _ClientConnection()
        channel = conn.attach(SessionChannel(environment, reactor, **WINDOW))
        client = _ChannelClient(channel)
        conn.client = client
        self.addCleanup(lambda: peerClosed(channel) if channel.process is not None else None)
        self.assertTrue(channel.requestReceivedWithReply(b"subsystem", NS(b"sftp"), True))
        client.makeConnection(_Pipe(channel))  # type: ignore[arg-type]
        await client.ready
        self.assertEqual(await client.realPath(b"."), home)
        handle = await client.openFile(b"f", FXF_WRITE | FXF_CREAT, {})
        await handle.writeChunk(0, b"over the channel")
        await handle.close()
        with open(os.path.join(home, "f"), "rb") as f:
            self.assertEqual(f.read(), b"over the channel")
        handle = await client.openFile(b"f", FXF_READ, {})
        self.assertEqual(await handle.readChunk(0, 100), b"over the channel")
        await handle.close()
        channel.eofReceived()
        await conn.when(conn.isClosed)
        self.assertIn(("request", b"exit-status", struct.pack(">L", 0)), conn.events)


class OpenSSHClientTests(SynchronousTestCase):
    """OpenSSH's sftp, the client operators use, against the built-in server."""

    def test_opensshBatch(self) -> None:
        """
        sftp -b with put -p / get -p / ls -l / rename / ln -s / df / mkdir / rm
        against the built-in server (sftp -D runs it on a pipe): the copy is
        identical and keeps its mode and times.
        """
        sftp = shutil.which("sftp")
        if sftp is None:
            self.skipTest("OpenSSH sftp client not installed (apt-get install openssh-client)")
        work = os.path.realpath(self.mktemp())
        os.mkdir(work)
        data = os.urandom(300_000)
        source = os.path.join(work, "src.bin")
        with open(source, "wb") as f:
            f.write(data)
        os.chmod(source, 0o640)
        os.utime(source, (1_500_000_000, 1_500_000_000))
        batch = "\n".join(
            [
                "put -p src.bin up.bin",
                "get -p up.bin down.bin",
                "rename up.bin moved.bin",
                "ln -s moved.bin link.bin",
                "ls -l",
                "df",
                "mkdir d",
                "rmdir d",
                "rm moved.bin",
                "",
            ]
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        server = f"env PYTHONPATH={root} {sys.executable} -P -m agent.sftpserver"
        done = subprocess.run(
            [sftp, "-b", "-", "-D", server],
            input=batch.encode(),
            cwd=work,
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        with open(os.path.join(work, "down.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        s = os.stat(os.path.join(work, "down.bin"))
        self.assertEqual((stat.S_IMODE(s.st_mode), s.st_mtime), (0o640, 1_500_000_000))
        self.assertIn(b"up.bin", done.stdout)
        self.assertEqual(os.readlink(os.path.join(work, "link.bin")), "moved.bin")
        self.assertFalse(os.path.exists(os.path.join(work, "moved.bin")))
