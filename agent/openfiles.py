"""
The agent's open-file limit (C{RLIMIT_NOFILE}), and its sessions'.

Why: a Linux process starts with a soft limit of 1024 descriptors (so does a systemd
service), while groundcontrol lets one device link carry 1000 channels
(C{--max-channels-per-device}): a pty session holds one descriptor in the agent, an exec three
(its pipes), a forward one (its socket), besides the agent's own. So the agent raises its soft
limit at start to L{WANTED}, up to the hard limit (L{raiseForTheAgent}, one log line), and gives
its sessions' children the soft limit it started with from their first instruction
(L{forkedChild}, L{spawnUnderSessionLimit}), as sshd's sessions have it: programs that use
C{select()}, or close every descriptor up to the limit before they run another, expect the
usual one.

When the descriptors run out anyway, a session or forward is refused at its open with a
message the operator reads (L{haveRoom}, L{outOfDescriptors}), rather than failing later in a
request with no reason given.
"""

from __future__ import annotations

import errno
import os
import resource
import select
from collections.abc import Callable
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

#: The range of descriptors L{_noneOpen} polls, and its poll object.
_topPoll: tuple[tuple[int, int], Any] | None = None


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


def spawnUnderSessionLimit(
    start: Callable[[], int | None],
    getrlimit: Any = resource.getrlimit,
    setrlimit: Any = resource.setrlimit,
    roomBelow: Callable[[int, int], bool] | None = None,
) -> int | None:
    """
    Call C{start} (a C{posix_spawn}, L{agent._spawn}) with this process's open-file limit
    lowered to the sessions' (L{forkedChild}'s) for the call and raised back after it, so the
    child it starts has the sessions' limit from its first instruction. Returns what C{start}
    returns (the child's pid, or None), or None without calling it when lowering the limit
    could starve the agent's other threads: the caller then forks, and the forked child sets
    the limit before it runs (L{forkedChild}).

    Why lower the agent's own: C{posix_spawn} has no attribute for limits (nor one to start
    the child stopped) and returns once the child has exec'd, so a C{prlimit(pid)} after it
    (session 17's way) let the program's first steps run under the agent's raised limit: a
    program that sizes a table by it, closes every descriptor up to it, or forks at once, saw
    8192, and its children kept it. The race-free alternatives cost more: a helper program
    that sets the limit and execs the session's (C{prlimit(1)}, C{sh -c 'ulimit -n ...'}) is
    a second exec per session, and forking is the cost L{agent._spawn} removed. Lowering the
    limit for the call, with its check, costs ~4 us per session child (bench/RESULTS.md, "The
    sessions' open-file limit before the first instruction (session 18, H4)").

    What it risks, and why it does not: the limit is the process's, so while it is lowered
    (the length of the C{posix_spawn} call; the reactor's thread, the only one that spawns, is
    in it) another thread's open (the resolver's C{getaddrinfo}: a socket, a file of C{/etc})
    fails with C{EMFILE} unless a descriptor below the sessions' limit is free. Descriptors are
    given lowest-first, so the limit is lowered only when the L{RESERVE} lowest free ones are
    below it (L{_roomBelow}): an agent with more open than that (hundreds of sessions at once)
    forks its next children instead, until sessions end.
    """
    if _sessionLimit is None:
        return start()
    roomBelow = roomBelow or _roomBelow
    if not roomBelow(_sessionLimit[0], RESERVE):
        return None
    agentLimit = getrlimit(resource.RLIMIT_NOFILE)
    try:
        setrlimit(resource.RLIMIT_NOFILE, _sessionLimit)
    except (OSError, ValueError):
        return None
    try:
        return start()
    finally:
        try:
            setrlimit(resource.RLIMIT_NOFILE, agentLimit)
        except (OSError, ValueError) as e:
            _log.warn(
                "open-file limit stays {soft}: cannot raise it back to {agent}: {why}",
                soft=_sessionLimit[0],
                agent=agentLimit[0],
                why=e,
            )


def haveRoom(count: int) -> bool:
    """
    Whether C{count} more descriptors, and L{RESERVE} beside them, can be opened now: found
    by opening that many (duplicates of one kept open) and closing them again.
    """
    return _canOpen(count + RESERVE)


def _roomBelow(limit: int, count: int) -> bool:
    """
    Whether the C{count} lowest free descriptors are all below C{limit}: at once if the
    C{count} just below it are free (one C{poll}, 2 us; the usual case, an agent that has
    never had that many open), else found by opening them (7 us).
    """
    if limit >= count and _noneOpen(limit - count, limit):
        return True
    return _canOpen(count, below=limit)


def _noneOpen(start: int, stop: int) -> bool:
    """
    Whether no descriptor from C{start} to C{stop} (excluded) is open: C{poll} marks each
    that is not with C{POLLNVAL}. The poll object is made once for the range and kept.
    """
    global _topPoll
    if _topPoll is None or _topPoll[0] != (start, stop):
        poller = select.poll()
        for fd in range(start, stop):
            poller.register(fd, 0)
        _topPoll = ((start, stop), poller)
    marked = _topPoll[1].poll(0)
    return len(marked) == stop - start and all(events & select.POLLNVAL for _, events in marked)


def _canOpen(count: int, below: int | None = None) -> bool:
    """
    Whether C{count} descriptors can be opened now (numbered below C{below}, if given),
    found by opening them (duplicates of one kept open) and closing them again.
    """
    global _probe
    if _probe is None:
        _probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    taken: list[int] = []
    try:
        for _ in range(count):
            taken.append(os.dup(_probe))
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            return False
        raise
    finally:
        for fd in taken:
            os.close(fd)
    return below is None or not taken or max(taken) < below


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
    "spawnUnderSessionLimit",
]
