"""
The agent's open-file limit (C{RLIMIT_NOFILE}), and its sessions'.

Why: a Linux process starts with a soft limit of 1024 descriptors (so does a systemd
service), while groundcontrol lets one device link carry 1000 channels
(C{--max-channels-per-device}): a pty session holds one descriptor in the agent, an exec three
(its pipes), a forward one (its socket), besides the agent's own. So the agent raises its soft
limit at start to L{WANTED}, up to the hard limit (L{raiseForTheAgent}, one log line), and gives
its sessions' children the soft limit it started with (L{forkedChild}, L{spawnedChild}), as
sshd's sessions have it: programs that use C{select()}, or close every descriptor up to the
limit before they run another, expect the usual one.

When the descriptors run out anyway, a session or forward is refused at its open with a
message the operator reads (L{haveRoom}, L{outOfDescriptors}), rather than failing later in a
request with no reason given.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from typing import Any

from twisted.logger import Logger

#: The soft limit the agent wants: 1000 channels of up to three descriptors each, the agent's
#: own, and room for the files an SFTP session of the agent's own server keeps open.
WANTED = 8192

#: The most descriptors one session opens at once: an exec's three pipes, two ends each while
#: its child starts (a pty session: the terminal's two ends).
SESSION_DESCRIPTORS = 6

#: What a session or forward must leave free for the agent itself (a new link, its log, name
#: resolution), so that running out refuses operators' opens, never the agent's own work.
RESERVE = 10

_log = Logger()

#: The (soft, hard) limit the sessions' children get: the agent's own at start, kept once the
#: agent has raised its own; None while it has not.
_sessionLimit: tuple[int, int] | None = None

#: A descriptor to duplicate when counting what is free (L{haveRoom}).
_probe: int | None = None


def raiseForTheAgent(
    wanted: int = WANTED,
    getrlimit: Any = resource.getrlimit,
    setrlimit: Any = resource.setrlimit,
) -> None:
    """
    Raise this process's soft open-file limit to C{wanted}, or to the hard limit if that is
    lower; say so once. Children started from now on get the old soft limit back.
    """
    global _sessionLimit
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        _log.info("open-file limit {soft} (hard limit {hard})", soft=soft, hard=hard)
        return
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        _log.warn("open-file limit stays {soft}: cannot raise it: {why}", soft=soft, why=e)
        return
    _sessionLimit = (soft, hard)
    _log.info(
        "open-file limit raised from {soft} to {target} (hard limit {hard}{short}); "
        "sessions get {soft}",
        soft=soft,
        target=target,
        hard=hard,
        short="" if target >= wanted else f", below the {wanted} wanted",
    )


def forkedChild(setrlimit: Any = resource.setrlimit) -> None:
    """In a forked session child, before it runs anything: the agent's soft limit at start."""
    if _sessionLimit is not None:
        setrlimit(resource.RLIMIT_NOFILE, _sessionLimit)


#: C{prlimit(2)}: Linux's (the spawn path, L{agent._spawn}, is Linux's only).
_PRLIMIT = getattr(resource, "prlimit", None)


def spawnedChild(pid: int, prlimit: Any = _PRLIMIT) -> None:
    """
    Give a session child started with C{posix_spawn} (L{agent._spawn}) the agent's soft limit
    at start: one C{prlimit} system call, made only if the agent raised its own.

    Not before it runs: C{posix_spawn} has no attribute for limits, and it returns once the
    child has exec'd its program, so that program's first steps (in practice the dynamic
    loader's; the call follows within microseconds) may run under the agent's raised soft
    limit, never above the hard one. The one way to have the child start with it, lowering
    the agent's own limit around the call, would make the agent's other threads (name
    resolution) fail to open descriptors meanwhile. The child cannot have been reaped (and its
    pid reused): the reactor, which reaps, is the caller.
    """
    if _sessionLimit is None or prlimit is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        prlimit(pid, resource.RLIMIT_NOFILE, _sessionLimit)


def haveRoom(count: int) -> bool:
    """
    Whether C{count} more descriptors, and L{RESERVE} beside them, can be opened now: found
    by opening that many (duplicates of one kept open) and closing them again.
    """
    global _probe
    if _probe is None:
        _probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    taken: list[int] = []
    try:
        for _ in range(count + RESERVE):
            taken.append(os.dup(_probe))
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            return False
        raise
    finally:
        for fd in taken:
            os.close(fd)
    return True


def outOfDescriptors(what: str) -> str:
    """The operator's reason for a refused C{what} (a session, a forward), and a log line."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    text = (
        f"the device's agent has too many files open for another {what} "
        f"(its open-file limit is {soft}); try again when sessions have ended"
    )
    _log.warn("refused a {what}: too many files open (limit {soft})", what=what, soft=soft)
    return text


__all__ = [
    "RESERVE",
    "SESSION_DESCRIPTORS",
    "WANTED",
    "forkedChild",
    "haveRoom",
    "outOfDescriptors",
    "raiseForTheAgent",
    "spawnedChild",
]
