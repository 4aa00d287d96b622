"""
The agent's own SFTP server, for devices without sftp-server: ``python -m agent.sftpserver``.

A session's sftp subsystem runs this when the device has no sftp-server
(L{agent.session.builtinSftpServer}). It is started through the session's
spawn path, so it runs as the session's user, in that user's home: the file
access it gives is exactly that user's, and relative paths are from the
home directory, as with OpenSSH's sftp-server.

It is Conch's L{FileTransferServer} (SFTP version 3) on stdin/stdout, with
L{LocalFiles} serving this process's file system. Compared with Conch's
C{SFTPServerForUnixConchUser}, which it follows: file names stay bytes end
to end (a name that is not UTF-8 still works), reads and writes are
positional and whole, C{fsetstat} and size changes work (scp -p, reput),
status codes and texts follow sftp-server's mapping of errno, a rename does
not replace an existing file (SSH_FXP_RENAME) unless the client uses
C{posix-rename@openssh.com}, and SYMLINK takes its arguments in OpenSSH's
order. The OpenSSH extensions C{posix-rename}, C{hardlink}, C{fsync},
C{statvfs}/C{fstatvfs} and C{expand-path} are offered. Input is buffered in
one growing buffer (Conch's concatenates per read), and stdin is not read
while stdout is backed up, so memory stays bounded whatever the client
pipelines.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from twisted.conch.interfaces import ISFTPFile, ISFTPServer
from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.common import getNS
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

#: Largest read answered at once (OpenSSH's sftp-server: 256 KiB - 1 KiB).
MAX_READ = 256 * 1024 - 1024

#: Largest SFTP message accepted (sftp-server's SFTP_MAX_MSG_LENGTH).
MAX_MESSAGE = 256 * 1024

EXTENSIONS = {
    b"posix-rename@openssh.com": b"1",
    b"statvfs@openssh.com": b"2",
    b"fstatvfs@openssh.com": b"2",
    b"hardlink@openssh.com": b"1",
    b"fsync@openssh.com": b"1",
    b"expand-path@openssh.com": b"1",
}

# sftp-server's errno_to_portable.
_STATUS = {
    errno.ENOENT: filetransfer.FX_NO_SUCH_FILE,
    errno.ENOTDIR: filetransfer.FX_NO_SUCH_FILE,
    errno.EBADF: filetransfer.FX_NO_SUCH_FILE,
    errno.ELOOP: filetransfer.FX_NO_SUCH_FILE,
    errno.EPERM: filetransfer.FX_PERMISSION_DENIED,
    errno.EACCES: filetransfer.FX_PERMISSION_DENIED,
    errno.EFAULT: filetransfer.FX_PERMISSION_DENIED,
    errno.ENAMETOOLONG: filetransfer.FX_BAD_MESSAGE,
    errno.EINVAL: filetransfer.FX_BAD_MESSAGE,
    errno.ENOSYS: filetransfer.FX_OP_UNSUPPORTED,
}

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def attributes(s: os.stat_result) -> dict[str, int]:
    """SFTP v3 attributes of a stat result."""
    return {
        "size": s.st_size,
        "uid": s.st_uid,
        "gid": s.st_gid,
        "permissions": s.st_mode,
        "atime": int(s.st_atime),
        "mtime": int(s.st_mtime),
    }


def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _groupName(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def longName(name: bytes, s: os.stat_result, now: float | None = None) -> bytes:
    """The C{ls -l} line sftp-server gives with each name (what C{sftp ls -l} shows)."""
    now = time.time() if now is None else now
    t = time.localtime(s.st_mtime)
    if abs(now - s.st_mtime) < 182 * 24 * 3600:
        when = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}"
    else:
        when = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d}  {t.tm_year}"
    line = (
        f"{stat.filemode(s.st_mode)} {s.st_nlink:3d} {_userName(s.st_uid):<8s} "
        f"{_groupName(s.st_gid):<8s} {s.st_size:8d} {when} "
    )
    return line.encode("utf-8") + name


def _openFlags(flags: int) -> int:
    read = flags & filetransfer.FXF_READ
    write = flags & filetransfer.FXF_WRITE
    mode = os.O_RDWR if read and write else os.O_WRONLY if write else os.O_RDONLY
    for sftp, posix in (
        (filetransfer.FXF_APPEND, os.O_APPEND),
        (filetransfer.FXF_CREAT, os.O_CREAT),
        (filetransfer.FXF_TRUNC, os.O_TRUNC),
        (filetransfer.FXF_EXCL, os.O_EXCL),
    ):
        if flags & sftp:
            mode |= posix
    return mode | os.O_CLOEXEC


@implementer(ISFTPFile)
class LocalFile:
    """An open file."""

    def __init__(self, path: bytes, flags: int, attrs: dict[str, Any]) -> None:
        mode = attrs.get("permissions", 0o666) & 0o7777
        self.fd = os.open(path, _openFlags(flags), mode)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def readChunk(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, min(length, MAX_READ), offset)

    def writeChunk(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def getAttrs(self) -> dict[str, int]:
        return attributes(os.fstat(self.fd))

    def setAttrs(self, attrs: dict[str, Any]) -> None:
        if "size" in attrs:
            os.ftruncate(self.fd, attrs["size"])
        if "permissions" in attrs:
            os.fchmod(self.fd, attrs["permissions"] & 0o7777)
        if "atime" in attrs and "mtime" in attrs:
            os.utime(self.fd, (attrs["atime"], attrs["mtime"]))
        if "uid" in attrs and "gid" in attrs:
            os.fchown(self.fd, attrs["uid"], attrs["gid"])


class LocalDirectory:
    """An open directory: its names, each with its C{ls -l} line and attributes."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.names = [b".", b"..", *os.listdir(path)]  # readdir(3) gives both; so does sftp-server
        self.names.reverse()

    def __iter__(self) -> LocalDirectory:
        return self

    def __next__(self) -> tuple[bytes, bytes, dict[str, int]]:
        while self.names:
            name = self.names.pop()
            try:
                s = os.lstat(os.path.join(self.path, name))
            except OSError:
                continue  # gone since the listing
            return name, longName(name, s), attributes(s)
        raise StopIteration

    def close(self) -> None:
        self.names = []


@implementer(ISFTPServer)
class LocalFiles:
    """
    This process's file system, as this process's user. Relative paths are
    from C{root} (default: the working directory, the user's home).
    """

    def __init__(self, root: bytes | None = None) -> None:
        self.root = root
        #: ISFTPServer's avatar: the user served, which this process (and so this object) is.
        self.avatar = self

    def _path(self, path: bytes) -> bytes:
        if not path:
            path = b"."
        if self.root is not None:
            return os.path.join(self.root, path)
        return path

    def gotVersion(self, otherVersion: int, extData: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return dict(EXTENSIONS)

    def openFile(self, filename: bytes, flags: int, attrs: dict[str, Any]) -> LocalFile:
        return LocalFile(self._path(filename), flags, attrs)

    def removeFile(self, filename: bytes) -> None:
        os.remove(self._path(filename))

    def renameFile(self, oldpath: bytes, newpath: bytes) -> None:
        """SSH_FXP_RENAME never replaces an existing file (sftp-server's rule)."""
        old, new = self._path(oldpath), self._path(newpath)
        if os.path.lexists(new):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        os.rename(old, new)

    def posixRename(self, oldpath: bytes, newpath: bytes) -> None:
        os.rename(self._path(oldpath), self._path(newpath))

    def hardLink(self, oldpath: bytes, newpath: bytes) -> None:
        os.link(self._path(oldpath), self._path(newpath))

    def makeDirectory(self, path: bytes, attrs: dict[str, Any]) -> None:
        os.mkdir(self._path(path), attrs.get("permissions", 0o777) & 0o7777)

    def removeDirectory(self, path: bytes) -> None:
        os.rmdir(self._path(path))

    def openDirectory(self, path: bytes) -> LocalDirectory:
        return LocalDirectory(self._path(path))

    def getAttrs(self, path: bytes, followLinks: bool) -> dict[str, int]:
        path = self._path(path)
        return attributes(os.stat(path) if followLinks else os.lstat(path))

    def setAttrs(self, path: bytes, attrs: dict[str, Any]) -> None:
        path = self._path(path)
        if "size" in attrs:
            os.truncate(path, attrs["size"])
        if "permissions" in attrs:
            os.chmod(path, attrs["permissions"] & 0o7777)
        if "atime" in attrs and "mtime" in attrs:
            os.utime(path, (attrs["atime"], attrs["mtime"]))
        if "uid" in attrs and "gid" in attrs:
            os.chown(path, attrs["uid"], attrs["gid"])

    def readLink(self, path: bytes) -> bytes:
        return os.readlink(self._path(path))

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> None:
        """
        SSH_FXP_SYMLINK as OpenSSH sends it: the first path is the link's
        target, the second the link to make (the reverse of the draft, which
        every OpenSSH client and server agree on). Conch's server passes the
        first as C{linkPath}.
        """
        target, link = linkPath, targetPath
        os.symlink(target, self._path(link))

    def realPath(self, path: bytes) -> bytes:
        return os.path.realpath(self._path(path))

    def expandPath(self, path: bytes) -> bytes:
        """C{expand-path@openssh.com}: C{~} and C{~user}, then the real path."""
        return self.realPath(os.path.expanduser(path or b"."))

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> bytes:
        if extendedName == b"statvfs@openssh.com":
            path, _ = getNS(extendedData)
            return packStatvfs(os.statvfs(self._path(path)))
        raise NotImplementedError(extendedName.decode("ascii", "replace"))


def packStatvfs(v: os.statvfs_result) -> bytes:
    """The C{statvfs@openssh.com} reply body."""
    flags = (1 if v.f_flag & os.ST_RDONLY else 0) | (2 if v.f_flag & os.ST_NOSUID else 0)
    return struct.pack(
        ">11Q",
        v.f_bsize,
        v.f_frsize,
        v.f_blocks,
        v.f_bfree,
        v.f_bavail,
        v.f_files,
        v.f_ffree,
        v.f_favail,
        v.f_fsid,
        flags,
        v.f_namemax,
    )


@implementer(IPushProducer)
class _Backpressure:
    """Stops reading requests while replies cannot be written."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class SFTPServer(filetransfer.FileTransferServer):
    """Conch's SFTP server with the fixes and extensions described above."""

    def __init__(self, files: Any, lost: Callable[[], None] | None = None) -> None:
        super().__init__(avatar=files)
        self._lost = lost
        self._input = bytearray()
        self._status = {
            b"posix-rename@openssh.com": self._posixRename,
            b"hardlink@openssh.com": self._hardLink,
            b"fsync@openssh.com": self._fsync,
        }

    def connectionMade(self) -> None:
        register = getattr(self.transport, "registerProducer", None)
        if register is not None and hasattr(self.transport, "pauseProducing"):
            register(_Backpressure(self.transport), True)

    def dataReceived(self, data: bytes) -> None:
        buf = self._input
        buf += data
        offset = 0
        while len(buf) - offset >= 9:
            length, kind, requestId = struct.unpack_from("!LBL", buf, offset)
            if not 5 <= length <= MAX_MESSAGE:
                self._log.warn("bad SFTP message length {length}", length=length)
                self.transport.loseConnection()  # type: ignore[union-attr, misc]
                return
            end = offset + 4 + length
            if len(buf) < end:
                break
            packet = bytes(buf[offset + 5 : end])
            offset = end
            self._dispatch(kind, requestId, packet)
        del buf[:offset]

    def _dispatch(self, kind: int, requestId: int, packet: bytes) -> None:
        name = self.packetTypes.get(kind)
        handler = getattr(self, f"packet_{name}", None) if name else None
        reply = struct.pack("!L", requestId)
        if handler is None:
            self._sendStatus(reply, filetransfer.FX_OP_UNSUPPORTED, b"unsupported request")
            return
        try:
            handler(packet)
        except Exception:
            # Conch asserts on trailing bytes and lets struct errors out;
            # the client must still get an answer, or it waits forever.
            if kind == filetransfer.FXP_INIT:
                self.transport.loseConnection()  # type: ignore[union-attr, misc]
            else:
                self._sendStatus(reply, filetransfer.FX_BAD_MESSAGE, b"bad message")

    def _ebStatus(self, reason: Failure, requestId: bytes, msg: bytes = b"request failed") -> None:
        value = reason.value
        if isinstance(value, OSError) and value.errno is not None:
            code = _STATUS.get(value.errno, filetransfer.FX_FAILURE)
            self._sendStatus(requestId, code, os.strerror(value.errno).encode())
            return
        super()._ebStatus(reason, requestId, msg)

    def _answer(self, requestId: bytes, function: Any, *args: Any) -> None:
        try:
            function(*args)
        except Exception:
            self._ebStatus(Failure(), requestId)
        else:
            self._sendStatus(requestId, filetransfer.FX_OK, b"")

    def packet_EXTENDED(self, data: bytes) -> None:
        requestId, rest = data[:4], data[4:]
        name, rest = getNS(rest)
        if name in self._status:
            self._status[name](requestId, rest)
        elif name == b"expand-path@openssh.com":
            path, _ = getNS(rest)
            try:
                expanded = self.client.expandPath(path)
            except Exception:
                self._ebStatus(Failure(), requestId)
            else:
                self._cbReadLink(expanded, requestId)
        elif name == b"fstatvfs@openssh.com":
            handle, _ = getNS(rest)
            fileObj = self.openFiles.get(handle)
            if fileObj is None:
                self._sendStatus(requestId, filetransfer.FX_FAILURE, b"no such handle")
                return
            try:
                reply = packStatvfs(os.fstatvfs(fileObj.fd))
            except Exception:
                self._ebStatus(Failure(), requestId)
            else:
                self.sendPacket(filetransfer.FXP_EXTENDED_REPLY, requestId + reply)
        else:
            super().packet_EXTENDED(data)

    def _posixRename(self, requestId: bytes, data: bytes) -> None:
        old, data = getNS(data)
        new, _ = getNS(data)
        self._answer(requestId, self.client.posixRename, old, new)

    def _hardLink(self, requestId: bytes, data: bytes) -> None:
        old, data = getNS(data)
        new, _ = getNS(data)
        self._answer(requestId, self.client.hardLink, old, new)

    def _fsync(self, requestId: bytes, data: bytes) -> None:
        handle, _ = getNS(data)
        fileObj = self.openFiles.get(handle)
        if fileObj is None:
            self._sendStatus(requestId, filetransfer.FX_FAILURE, b"no such handle")
            return
        self._answer(requestId, os.fsync, fileObj.fd)

    def readConnectionLost(self) -> None:
        """The client is done: send what is left, then go."""
        self.transport.loseConnection()  # type: ignore[union-attr, misc]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr, misc]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self._lost is not None:
            self._lost()


def main() -> None:
    """Serve SFTP on stdin/stdout until the client goes."""
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio

    reactor: Any = _reactor
    stdio.StandardIO(SFTPServer(LocalFiles(), lost=reactor.stop))
    reactor.run()


__all__ = [
    "EXTENSIONS",
    "MAX_READ",
    "LocalFiles",
    "SFTPServer",
    "longName",
    "main",
]

if __name__ == "__main__":
    main()
