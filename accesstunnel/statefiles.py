"""
Writing state files so that a full disk or a power cut leaves the old file: one writer, one
rule, for the agent and for groundcontrol.

Devices run on SD cards that fill up (logs, a runaway process) and lose power; a server's
disk fills too. Each state file (the agent's device key, fleet certificate, C{status.json},
C{last-server.json}; groundcontrol's host key, fleet CA, onion service key and
C{listening.json}) is written to a temporary file next to it, flushed to the disk, and
renamed over the old one (or, for a file that must never be replaced, hard-linked into a
free name): a write that fails part way (C{ENOSPC}) or is cut short leaves the previous
file whole, or no file, and no temporary file taking space. The directory is flushed too,
so the rename itself survives a power cut.

A power cut (or a kill) between writing the temporary file and renaming or linking it
leaves that file behind: L{removeStaleTemporaries}, run by a program at its start, removes
those of its own state files whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Collection
from pathlib import Path

from twisted.logger import Logger

__all__ = ["createAtomically", "removeStaleTemporaries", "roomFor", "writeAtomically"]

_log = Logger()

#: A temporary file of this module's writers: C{NAME.tmp} (L{writeAtomically}'s) or
#: C{NAME.PID.tmp} (L{createAtomically}'s, named by the process that writes it).
_TEMPORARY_NAME = re.compile(r"(?P<name>.+?)(?:\.(?P<pid>[0-9]+))?\.tmp")


#: What C{link} fails with where the filesystem has no hard links (FAT, some FUSE).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _writeTemporary(path: Path, data: bytes, mode: int, suffix: str = ".tmp") -> Path:
    """
    C{data} in a new file next to C{path}, flushed to the disk; the temporary file's path.
    A failure removes what was written and raises the C{OSError}.
    """
    temporary = path.with_name(path.name + suffix)
    # One a power cut left behind goes first: the new file is made here, with C{mode}.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if e.filename is None:  # write() and fsync() name no file: say which was meant
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return temporary


def _syncDirectory(directory: Path) -> None:
    """Flush a rename in C{directory} to the disk (best effort: not every filesystem can)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def writeAtomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """
    Replace C{path} with C{data}: afterwards the file holds the old bytes or the new, whole.

    @raise OSError: the disk is full, or the directory cannot be written; C{path} is as it
        was and no temporary file is left.
    """
    temporary = _writeTemporary(path, data, mode)
    try:
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _syncDirectory(path.parent)


def createAtomically(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """
    Create C{path} holding C{data}, whole, unless it exists: False if another process made
    it first (its file is left as it is). A hard link of the flushed temporary file creates
    the name only if it is free, and only once the data is on the disk.

    @raise OSError: as L{writeAtomically}; nothing is left at C{path}.
    """
    # A temporary file of this process's own: two starts racing must not write one file.
    temporary = _writeTemporary(path, data, mode, suffix=f".{os.getpid()}.tmp")
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS or os.path.lexists(path):
            raise
        os.replace(temporary, path)  # no hard links here: a race window, but whole files
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    _syncDirectory(path.parent)
    return True


def roomFor(path: Path, size: int) -> OSError | None:
    """
    Why a file of C{size} bytes could not be written at C{path} now (the disk is full, over
    quota, read-only), or None if it could: a temporary file that size is written next to
    it, flushed, and removed, as L{writeAtomically} would write one. Cheaper than asking
    for something to store and failing: C{statvfs} tells neither a quota nor ext4's
    emergency read-only. A power cut meanwhile leaves C{NAME.PID.tmp}, which
    L{removeStaleTemporaries} removes at the next start.
    """
    try:
        temporary = _writeTemporary(path, bytes(size), 0o600, suffix=f".{os.getpid()}.tmp")
    except OSError as e:
        return e
    with contextlib.suppress(OSError):
        os.unlink(temporary)
    return None


def removeStaleTemporaries(directory: Path, names: Collection[str]) -> list[str]:
    """
    Remove the temporary files this module's writers left in C{directory} for the state
    files C{names} (a power cut between the write and the rename or link), and say once
    which; return their names. Call it at start, before this process writes a state file.

    Only this module's names for them, and only those no live writer holds:
      - C{NAME.PID.tmp} (L{createAtomically}) when no process PID runs, or PID is this
        process (a boot before this one gave it the same number: a device boots the same
        way each time, so its agent's PID repeats). One of another running process is left:
        a second start racing this one may be writing it;
      - C{NAME.tmp} (L{writeAtomically}), which the next write of C{NAME} removes anyway
        without asking: one writer per file, but a file may not be written again for weeks
        (C{device.crt}) or ever (C{last-server.json} while the address stays the same).
    Anything else (other names, directories, links) is left alone. A file that cannot be
    removed (a read-only card) is left for a later start, unsaid: its directory's other
    writes say what is wrong.
    """
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []  # none yet (a first start), or unreadable: the key's load says so
    removed = []
    for entry in entries:
        match = _TEMPORARY_NAME.fullmatch(entry)
        if match is None or match["name"] not in names:
            continue
        if match["pid"] is not None and _mayBeWritten(int(match["pid"])):
            continue
        path = directory / entry
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(entry)
    if removed:
        _log.info(
            "removed {count} temporary file(s) that a write cut short (a power cut, a kill) "
            "left in {directory}: {removed}",
            count=len(removed),
            directory=str(directory),
            removed=", ".join(removed),
        )
    return removed


def _mayBeWritten(pid: int) -> bool:
    """Whether a temporary file named by process C{pid} may be being written now."""
    if pid == os.getpid():
        return False  # this process writes none before it has looked
    if pid <= 0:
        return True  # no process has that number: not a name this module made
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process; a number too big for one: not ours either
    return True
