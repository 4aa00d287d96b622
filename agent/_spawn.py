"""
Starting a session's child with the C library's C{posix_spawn}, not C{fork()}.

Why: C{fork()} of the agent copies the page tables of its whole Python process
(~37 MB) only for C{exec} to throw them away; it was 30% of the agent's CPU to
open a session (bench/RESULTS.md, "100 sessions: what the session ends cost",
session 14), and slower still on the single-board computers the agent runs on.
glibc's C{posix_spawn} starts the child with C{clone(CLONE_VM|CLONE_VFORK)}:
nothing is copied, the file actions and C{exec} run in the child, and the call
returns once the child has exec'd (or reports why it could not). The agent's
CPU to open a session fell from 4.3-5.2 to 1.2-1.3 ms (bench/RESULTS.md,
"Session open without fork (session 15, H3)").

Why glibc's own, called through C{ctypes}, rather than the alternatives:

  - Python 3.11's C{os.posix_spawn} has C{setsid} but no C{chdir}, and the child
    must start in the user's home. Changing the agent's own directory around
    the call would move every thread of the process meanwhile (Twisted's
    resolver threads run beside the reactor).
  - C{subprocess.Popen(cwd=..., start_new_session=True)} (C{vfork} in 3.11)
    resets only C{SIGPIPE} and C{SIGXFSZ}, cannot give a pty child its
    controlling terminal, and its own reaping (C{_cleanup}) may C{waitpid} a
    pid that Twisted reaps.
  - glibc (2.34 and later) has file actions for both: C{addchdir_np} and
    C{addclosefrom_np}. C{ctypes} is already loaded in a running agent
    (L{accesstunnel.linkflow.keepReadBuffersInHeap}); it is imported here only
    at the first spawn, never with the reactor (L{agent.launcher}).

What the child gets is what the C{fork} path gives it (L{agent._process}):
its own session (C{POSIX_SPAWN_SETSID}, applied by glibc before the file
actions), the signals the agent ignores, and glibc's own (L{_GLIBC_SIGNALS}),
reset to their default (C{POSIX_SPAWN_SETSIGDEF}; the others' handlers end at
C{exec} anyway), the
caller's signal mask, the file descriptors the caller's file actions set up
and none other above 2, the working directory, the environment, and (from
the caller, L{agent.openfiles.spawnUnderSessionLimit}) the sessions'
open-file limit; the rest of its state it inherits on both paths alike
(tests/test_agent_spawn_parity.py compares them). A pty child
opens its terminal by name in a file action: a session leader with no
controlling terminal that opens a terminal without C{O_NOCTTY} acquires it
(Linux), as C{TIOCSCTTY} gives it on the fork path.

L{spawn} returns C{None} whenever it cannot do that here (another C library,
glibc before 2.34, an argument with a NUL byte that C would cut short) or
C{posix_spawn} fails (the program is missing, the directory is gone): the
caller then forks as before, which also gives the operator the same error as
before when the program cannot be run.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's own, without the enum lookups
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

#: glibc's flags (spawn.h); musl has the same values.
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSID = 0x80

#: Room for C{posix_spawnattr_t} (336 bytes with 64-bit glibc) and
#: C{posix_spawn_file_actions_t} (80): opaque to us, so generously sized.
_OPAQUE_BYTES = 1024

#: glibc's C{sigset_t}: 1024 signals.
_SIGSET_BYTES = 128

#: The real-time signals glibc keeps for itself (thread cancellation and
#: C{setxid}; C{signal.SIGRTMIN} is the first one it leaves to programs).
#: Its C{posix_spawn} sets them to C{SIG_IGN} in the child before C{exec}
#: (glibc 2.36), and an ignored signal stays ignored across C{exec}; a forked
#: child keeps their default.
_GLIBC_SIGNALS = range(32, signal.SIGRTMIN)

#: One file action: C{os.posix_spawn}'s tuples (C{os.POSIX_SPAWN_OPEN},
#: C{_DUP2}, C{_CLOSE}).
FileAction = tuple[Any, ...]

_libc: Any = None  # False once found wanting; the bound functions otherwise


def _bound() -> Any:
    """glibc's spawn functions with their C types, or None if this C library lacks them."""
    global _libc
    if _libc is None:
        _libc = _bind()
    return _libc or None


def _bind() -> Any:
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return False
    import ctypes  # at the first spawn, never with the reactor (agent.launcher)

    libc: Any = ctypes.CDLL(None)
    p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    strings = ctypes.POINTER(ctypes.c_char_p)
    signatures: dict[str, list[Any]] = {
        "posix_spawn": [ctypes.POINTER(ctypes.c_int), s, p, p, strings, strings],
        "posix_spawnattr_init": [p],
        "posix_spawnattr_destroy": [p],
        "posix_spawnattr_setflags": [p, ctypes.c_short],
        "posix_spawnattr_setsigdefault": [p, p],
        "posix_spawn_file_actions_init": [p],
        "posix_spawn_file_actions_destroy": [p],
        "posix_spawn_file_actions_addopen": [p, i, s, i, ctypes.c_uint],
        "posix_spawn_file_actions_adddup2": [p, i, i],
        "posix_spawn_file_actions_addclose": [p, i],
        "posix_spawn_file_actions_addchdir_np": [p, s],
        "posix_spawn_file_actions_addclosefrom_np": [p, i],
    }
    if not all(hasattr(libc, name) for name in signatures):
        return False  # before glibc 2.34 (addclosefrom_np) or 2.29 (addchdir_np)
    for name, argtypes in signatures.items():
        function = getattr(libc, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    libc.ctypes = ctypes  # its types, for the callers, with the functions that take them
    return libc


class _SpawnError(Exception):
    """A spawn function returned an error: the caller forks instead."""


def _ok(result: int) -> None:
    if result != 0:
        raise _SpawnError(result)


def _cStrings(ctypes: Any, items: Sequence[bytes]) -> Any:
    """A NULL-terminated C{char *[]}."""
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def _callNow(posixSpawn: Callable[[], int | None]) -> int | None:
    return posixSpawn()


def spawn(
    executable: bytes,
    args: Sequence[bytes],
    environment: dict[str, str],
    path: str,
    fileActions: Sequence[FileAction],
    around: Callable[[Callable[[], int | None]], int | None] = _callNow,
) -> int | None:
    """
    Start C{executable} (a path: no C{PATH} search) with C{args} and exactly
    C{environment}, in its own session, in directory C{path}, its descriptors
    set up by C{fileActions} and every other one above 2 closed. Returns the
    child's pid, or None if it could not be started this way (module docstring):
    the caller then forks.

    C{around} makes the C{posix_spawn} call itself, everything else ready: what
    the child should start with that no attribute gives it is set there, for as
    short a time as can be (L{agent.openfiles.spawnUnderSessionLimit}); it may
    decline (None) and the caller forks.
    """
    libc = _bound()
    if libc is None or b"/" not in executable or not args:
        return None
    names = [os.fsencode(name) for name in environment]
    variables = [
        name + b"=" + os.fsencode(value)
        for name, value in zip(names, environment.values(), strict=True)
    ]
    directory = os.fsencode(path)
    if any(b"=" in name for name in names) or any(
        b"\0" in item for item in (executable, directory, *args, *variables)
    ):
        return None  # the fork path's os.execvpe refuses these with a clear error
    ctypes = libc.ctypes
    attributes = ctypes.create_string_buffer(_OPAQUE_BYTES)
    actions = ctypes.create_string_buffer(_OPAQUE_BYTES)
    try:
        _ok(libc.posix_spawnattr_init(attributes))
    except _SpawnError:
        return None
    try:
        _ok(libc.posix_spawn_file_actions_init(actions))
        try:
            _setAttributes(libc, attributes)
            _addActions(libc, actions, fileActions, directory)
            pid = ctypes.c_int(0)
            argv, envp = _cStrings(ctypes, args), _cStrings(ctypes, variables)

            def posixSpawn() -> int:
                _ok(
                    libc.posix_spawn(ctypes.byref(pid), executable, actions, attributes, argv, envp)
                )
                return pid.value  # on failure glibc has reaped the child that could not exec

            return around(posixSpawn)
        finally:
            libc.posix_spawn_file_actions_destroy(actions)
    except _SpawnError:
        return None
    finally:
        libc.posix_spawnattr_destroy(attributes)


def _setAttributes(libc: Any, attributes: Any) -> None:
    """
    Its own session; back to their default: the signals the agent ignores, and
    glibc's own (L{_GLIBC_SIGNALS}), which its C{posix_spawn} leaves ignored in
    the child otherwise.
    """
    defaults = _signalSet(libc.ctypes, [*_ignoredSignals(), *_GLIBC_SIGNALS])
    _ok(libc.posix_spawnattr_setsigdefault(attributes, defaults))
    _ok(libc.posix_spawnattr_setflags(attributes, _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF))


def _ignoredSignals() -> list[int]:
    """
    The signals the agent ignores now, read at each spawn (a handler may change
    at any time). Through C{_signal}, the C module under L{signal}: its
    C{getsignal} returns the same handler without L{signal.getsignal}'s
    conversion of every answer to an enum, which made this 23 us of each
    session's start for 64 signals, against 1.5 us (bench/RESULTS.md, "Session
    open and end CPU (session 20, H8)").
    """
    ignore = _signal.SIG_IGN
    return [n for n in range(1, signal.NSIG) if _signal.getsignal(n) == ignore]


def _signalSet(ctypes: Any, numbers: Sequence[int]) -> Any:
    """
    A C{sigset_t} holding C{numbers}, written directly (Linux's layout: signal
    I{n} is bit I{n - 1}, in C{unsigned long} words), since C{sigaddset}
    refuses glibc's own signals.
    """
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    words = (ctypes.c_ulong * (_SIGSET_BYTES * 8 // bits))()
    for number in numbers:
        words[(number - 1) // bits] |= 1 << ((number - 1) % bits)
    return words


def _addActions(
    libc: Any, actions: Any, fileActions: Sequence[FileAction], directory: bytes
) -> None:
    """The caller's file actions, then: nothing else above 2, and the working directory."""
    for action in fileActions:
        kind = action[0]
        if kind == os.POSIX_SPAWN_OPEN:
            _, fd, name, flags, mode = action
            _ok(libc.posix_spawn_file_actions_addopen(actions, fd, os.fsencode(name), flags, mode))
        elif kind == os.POSIX_SPAWN_DUP2:
            _ok(libc.posix_spawn_file_actions_adddup2(actions, action[1], action[2]))
        elif kind == os.POSIX_SPAWN_CLOSE:
            _ok(libc.posix_spawn_file_actions_addclose(actions, action[1]))
        else:
            raise _SpawnError(kind)
    _ok(libc.posix_spawn_file_actions_addclosefrom_np(actions, 3))
    _ok(libc.posix_spawn_file_actions_addchdir_np(actions, directory))


__all__ = ["FileAction", "spawn"]
