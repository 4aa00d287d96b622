"""
The epoll reactor without Twisted's per-event legacy log context: ``--reactor accesstunnel-epoll``.

Twisted's C{EPollReactor.doPoll} runs every readiness event inside
C{twisted.python.log.callWithLogger(selectable, ...)}: it calls the selectable's C{logPrefix()}
and pushes a legacy log context (C{{"system": prefix}}) for the event, which only legacy
C{log.msg}/C{log.err} calls read. Nothing in this project logs that way (C{twisted.logger}
events do not read that context), and on a keystroke's path the wrapping costs a few percent
of the echo time (bench/RESULTS.md, "Echo latency (session 5)"). L{TunnelEPollReactor}
dispatches each event directly and enters the legacy context only where stock Twisted logs in
it: when C{doRead}/C{doWrite} raises (the failure is logged with the selectable's prefix as its
system, as stock) and when a selectable is disconnected (C{connectionLost} runs in the context,
and an exception from it is logged there and swallowed, as stock). What it does not keep: a
legacy C{log.msg} inside a successful C{doRead}/C{doWrite} is logged with system C{-} instead
of the selectable's prefix, and a C{logPrefix()} that raises is only reported when that
selectable fails.

On C{SIGCHLD} it reaps only the children that exited (L{accesstunnel.reaping}), not every
child Twisted knows.

Installed by C{python -m accesstunnel.twistd} (twistd with this reactor installed first: the
systemd unit of groundcontrol, the end-to-end tests, bench/run) and by the agent's own launcher
(L{agent.launcher}); plain C{twistd} keeps Twisted's default reactor. C{twistd --reactor
accesstunnel-epoll} (the plugin in C{twisted/plugins/accesstunnel_reactor.py}) works only while
Twisted's plugin cache is current: L{accesstunnel.twistd} says why.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log
from twisted.python.failure import Failure

try:
    from accesstunnel.reaping import reapingSignals
except ImportError:  # Twisted's private signal classes moved (accesstunnel.reaping)
    reapingSignals = None  # type: ignore[assignment]

#: The short name twistd's C{--reactor} takes (the plugin's).
REACTOR_NAME = "accesstunnel-epoll"

_POLLIN = EPollReactor._POLL_IN


class TunnelEPollReactor(EPollReactor):
    """
    L{EPollReactor} whose C{doPoll} dispatches each event without C{log.callWithLogger}; the
    legacy log context is entered only on the failure and disconnect paths (module docstring).
    """

    def doPoll(self, timeout: float | None) -> None:
        """Poll for events and dispatch each one to its selectable (C{EPollReactor.doPoll})."""
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event != _POLLIN:
                self._doReadOrWrite(selectable, fd, event)
                continue
            # Readable and nothing else (every keystroke's wake-up): L{_doReadOrWrite}'s
            # read branch written out here, a frame fewer between epoll_wait and the read.
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                    inRead = False
                else:
                    why = selectable.doRead()
                    inRead = True
            except BaseException:
                log.callWithLogger(
                    selectable, self._failed, selectable, Failure(), sys.exc_info()[1], False
                )
                continue
            if why:
                log.callWithLogger(selectable, self._disconnectSelectable, selectable, why, inRead)

    doIteration = doPoll

    def _signalsFactory(self) -> Any:
        """
        C{PosixReactorBase}'s signal handling (stop on SIGINT/SIGTERM, reap on
        SIGCHLD), reaping only the children that exited (L{accesstunnel.reaping});
        Twisted's own if that module could not be imported.
        """
        if reapingSignals is None:
            return super()._signalsFactory()
        return reapingSignals(self)

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        """
        C{_PollLikeMixin._doReadOrWrite}: read or write, or disconnect the selectable. An
        exception from C{doRead}/C{doWrite} is logged and disconnects it, and C{connectionLost}
        runs, in the selectable's legacy log context, as under stock C{doPoll}.
        """
        why: Any = None
        inRead = False
        if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):
            # Handle disconnection only once all pending input was read; while reading this
            # is a clean (possibly half-) close, else an error.
            if fd in self._reads:
                inRead = True
                why = CONNECTION_DONE
            else:
                why = CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    if event & self._POLL_IN:
                        why = selectable.doRead()
                        inRead = True
                    if not why and event & self._POLL_OUT:
                        why = selectable.doWrite()
                        inRead = False
            except BaseException:
                why = sys.exc_info()[1]
                log.callWithLogger(selectable, self._failed, selectable, Failure(), why, inRead)
                return
        if why:
            log.callWithLogger(selectable, self._disconnectSelectable, selectable, why, inRead)

    def _failed(self, selectable: Any, failure: Failure, why: BaseException, inRead: bool) -> None:
        """Log C{doRead}/C{doWrite}'s C{failure} (as stock, C{log.err}) and disconnect."""
        log.err(failure)
        self._disconnectSelectable(selectable, why, inRead)


def install() -> None:
    """Install L{TunnelEPollReactor} as the global reactor (twistd's C{--reactor} calls this)."""
    from twisted.internet.main import installReactor

    installReactor(TunnelEPollReactor())


__all__ = ["REACTOR_NAME", "TunnelEPollReactor", "install"]
