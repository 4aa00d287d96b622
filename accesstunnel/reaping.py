"""
Reaping, on C{SIGCHLD}, only the children that exited, each through its own Twisted handler.

Twisted's C{reapAllProcesses} calls C{waitpid} for every child it knows on every
C{SIGCHLD}: with a hundred children alive, reaping the one that exited took about 70-105 us
of CPU, against about 25 us this way
(bench/RESULTS.md, "Session open without fork (session 15, H3)"). L{ExitedChildHandling}
is Twisted's C{SIGCHLD} handling with that one change; L{accesstunnel.reactor} installs it.
"""

from __future__ import annotations

import os

from twisted.internet import process

# Twisted's private signal classes (Twisted is pinned, constraints.txt). If a Twisted release
# moves them, this import fails and L{accesstunnel.reactor} falls back to Twisted's own
# reaping: the agent still starts, and reaps as stock Twisted does.
from twisted.internet._signals import (
    SignalHandling,
    _ChildSignalHandling,
    _FDWaker,
    _MultiSignalHandling,
    _SIGCHLDWaker,
)
from twisted.internet.posixbase import PosixReactorBase


def reapExited() -> None:
    """
    Reap each child that has exited through its own handler (Twisted's
    C{reapProcessHandlers}): C{waitid(WNOWAIT)} names one exited child without
    reaping it, its handler reaps it (C{reapProcess}: C{waitpid}, then
    C{processEnded}), and so on until none is left. Two system calls per exit
    instead of one C{waitpid} per live child. An exited child no handler knows
    (not started through Twisted) would be named again and again: then every
    known child is tried as stock Twisted does (C{reapAllProcesses}), and that
    one is left to whoever started it, as stock.
    """
    handlers = process.reapProcessHandlers
    while handlers:
        try:
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if exited is None:
            return
        handler = handlers.get(exited.si_pid)
        if handler is None:
            process.reapAllProcesses()
            return
        handler.reapProcess()
        if handlers.get(exited.si_pid) is handler:
            return  # not reaped (reapProcess logged why): stop, as stock does


class ExitedChildWaker(_SIGCHLDWaker):
    """Twisted's C{SIGCHLD} waker, reaping with L{reapExited}."""

    def doRead(self) -> None:
        _FDWaker.doRead(self)  # empty the pipe
        reapExited()


class ExitedChildHandling(_ChildSignalHandling):
    """Twisted's C{SIGCHLD} handling, with L{ExitedChildWaker}."""

    def install(self) -> None:
        if self._childWaker is None:
            self._childWaker = ExitedChildWaker()
            self._addInternalReader(self._childWaker)
        self._childWaker.install()
        process.reapAllProcesses()  # children that ended before the handler was there


def reapingSignals(reactor: PosixReactorBase) -> SignalHandling:
    """
    C{PosixReactorBase}'s signal handling (stop on SIGINT/SIGTERM, reap on SIGCHLD), reaping
    only the children that exited: the reactor's C{_signalsFactory}.
    """
    return _MultiSignalHandling(
        (
            super(PosixReactorBase, reactor)._signalsFactory(),
            ExitedChildHandling(
                reactor._addInternalReader,  # type: ignore[attr-defined]
                reactor._removeInternalReader,  # type: ignore[attr-defined]
            ),
        )
    )


__all__ = ["ExitedChildHandling", "ExitedChildWaker", "reapExited", "reapingSignals"]
