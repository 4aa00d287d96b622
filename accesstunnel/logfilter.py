"""
The log level filter of groundcontrol and tunnel-agent (``--log-level``; default info).

Conch logs a debug event for every keepalive it answers, every channel request
and every key exchange; written out, they cost groundcontrol a quarter of its
idle CPU with 10,000 agent links and a device SD-card writes and CPU for each
session. By default groundcontrol and tunnel-agent write events of level info
and above; ``--log-level debug`` writes them all again.

Conch also logs "sending close {id}" at info for every channel it closes
(groundcontrol closes two per session: the operator's side and the device's),
and "opening channel {id} with {localWindowSize} {localMaxPacket}" for every
channel it opens (groundcontrol opens one per session on the device's link);
our own "session ..." lines at its start and end and "session child exited"
say more. The filter treats those events as debug (L{DEBUG_ONLY_CONCH_EVENTS})
rather than each connection class overriding Conch's C{sendClose} and
C{openChannel} or its logger: the filter applies to every SSH connection in
either process, whatever logger its class declares, and Conch's logic is not
copied.

A class whose own line says what one of Conch's info events says, and more, names
that event's format in its C{conchEventsSaidOtherwise}, and the filter treats the
event as debug when that class logged it: the agent's link says when it ended, after
how long and why (agent.linklog), in place of Conch's bare "connection lost".

Twisted itself logs at info, on a device at every retry of its link, lines that name
objects by their repr and that our own lines say better (L{DEBUG_ONLY_TWISTED_EVENTS},
L{TWISTED_PORT_LINES}), so the filter treats them as debug too, from any source:
"Starting factory <...object at 0x...>" and "Stopping factory" for each connection a
client factory makes (the TLS handshake watch, the WebSocket client; the failover
endpoint says what each attempt came to), ClientService's "Scheduling retry N to connect
<...> in 1.4793110889045264 seconds." (the agent's link says its retries in
agent.linklog.LINK_RETRY, with the address tried first; no other ClientService logs),
and a listening port's "AcceptingFactory starting on 6010" and "(TCP Port 6010 Closed)"
(both programs say where they listen: groundcontrol "listening on ADDRESS", the agent
its X11 display, remote forward and agent socket).

Under twistd, L{twistdObserver} makes the observer twistd would make from its
options (``-l FILE``, ``--syslog``, standard output with ``-n``), and
L{LogObserverService}, the program's top service, gives it, filtered, to
twistd's application as its L{ILogObserver} component, which twistd's
C{AppLogger} uses when no ``--logger`` is given (L{useFilteredTwistdObserver}).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from constantly import NamedConstant
from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    PredicateResult,
)
from twisted.python.components import Componentized
from zope.interface import implementer

#: Level names for ``--log-level``, lowest first.
LEVELS = ("debug", "info", "warn", "error", "critical")
DEFAULT_LEVEL = "info"

#: Formats of events Conch's SSHConnection logs at info that the filter treats as
#: debug: one per channel, with nothing our own session lines lack.
DEBUG_ONLY_CONCH_EVENTS = frozenset(
    {"sending close {id}", "opening channel {id} with {localWindowSize} {localMaxPacket}"}
)

#: Formats of events Twisted logs at info that the filter treats as debug, from any source.
DEBUG_ONLY_TWISTED_EVENTS = frozenset(
    {
        "Starting factory {factory!r}",
        "Stopping factory {factory!r}",
        "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
    }
)

#: The text of the legacy (log.msg) lines of a Twisted listening port starting and
#: closing, which the filter treats as debug.
TWISTED_PORT_LINES = re.compile(r".+ starting on .+|\((?:TCP|UDP|UNIX|SSL)\b.* Port .+ Closed\)")


def parseLevel(name: str) -> NamedConstant:
    """The L{LogLevel} called C{name}; ValueError for anything else."""
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {name!r}")
    return LogLevel.levelWithName(name)


def _saidOtherwise(event: LogEvent) -> bool:
    """Whether C{event}'s source writes a fuller line of its own in its place."""
    said = getattr(event.get("log_source"), "conchEventsSaidOtherwise", None)
    return said is not None and event.get("log_format") in said


def _twistedNoise(event: LogEvent) -> bool:
    """Whether C{event} is one of Twisted's info lines that the filter writes at debug."""
    form = event.get("log_format")
    if form in DEBUG_ONLY_TWISTED_EVENTS:
        return True
    return (
        form == "{log_text}"
        and event.get("log_namespace") == "log_legacy"
        and TWISTED_PORT_LINES.fullmatch(event.get("log_text", "")) is not None
    )


def _fromSSHConnection(event: LogEvent) -> bool:
    """Whether C{event} was logged by an SSH connection (Conch's, or a subclass)."""
    connection = sys.modules.get("twisted.conch.ssh.connection")
    # Not imported: no SSH connection exists to have logged it.
    return connection is not None and isinstance(event.get("log_source"), connection.SSHConnection)


@implementer(ILogFilterPredicate)
class MinimumLevel:
    """
    Drop events below C{level}, counting L{DEBUG_ONLY_CONCH_EVENTS}, the events
    their source says otherwise (C{conchEventsSaidOtherwise}) and Twisted's
    L{DEBUG_ONLY_TWISTED_EVENTS} and L{TWISTED_PORT_LINES} as debug.
    Events without a level (text written to standard output or error, legacy
    log.msg without one) are kept.
    """

    def __init__(self, level: NamedConstant = LogLevel.info) -> None:
        self.level = level

    def __call__(self, event: LogEvent) -> NamedConstant:
        level = event.get("log_level")
        if level is None:
            return PredicateResult.maybe
        if level < self.level:
            return PredicateResult.no
        if self.level > LogLevel.debug and (
            (event.get("log_format") in DEBUG_ONLY_CONCH_EVENTS and _fromSSHConnection(event))
            or _saidOtherwise(event)
            or _twistedNoise(event)
        ):
            return PredicateResult.no
        return PredicateResult.maybe


def filtered(observer: Any, level: NamedConstant | MinimumLevel) -> FilteringLogObserver:
    """C{observer} behind a filter that drops events below C{level}."""
    predicate = level if isinstance(level, MinimumLevel) else MinimumLevel(level)
    return FilteringLogObserver(observer, [predicate])


def twistdObserver(serverOptions: Mapping[str, Any]) -> Any:
    """
    The observer twistd itself would make from its command line (C{serverOptions}:
    twistd's ServerOptions): ``-l FILE`` (rotated on SIGUSR1), ``--syslog``, or
    standard output with ``-n``. Unfiltered.
    """
    from twisted.scripts.twistd import _SomeApplicationRunner

    observer = _SomeApplicationRunner.loggerFactory(serverOptions)._getLogObserver()
    if not ILogObserver.providedBy(observer):
        # The syslog observer is a legacy one; twistd's AppLogger wraps it the same way.
        observer = LegacyLogObserverWrapper(observer)
    return observer


class LogObserverService(service.MultiService):
    """
    A program's top service. When twistd attaches it to its application it gives
    the application L{logObserver} (if set) as its log observer, which twistd
    uses when no ``--logger`` is given.
    """

    logObserver: Any = None

    def setServiceParent(self, parent: Any) -> None:
        if (
            self.logObserver is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)


def useFilteredTwistdObserver(
    top: LogObserverService, options: Any, level: NamedConstant | MinimumLevel
) -> None:
    """
    Have twistd write through its own observer filtered at C{level}, unless twistd
    was given ``--logger`` (that factory's observer is used as it is).
    C{options.parent} is twistd's ServerOptions (absent outside twistd: nothing to do).
    """
    twistd = getattr(options, "parent", None)
    if twistd is not None and not twistd.get("logger"):
        top.logObserver = filtered(twistdObserver(twistd), level)


__all__ = [
    "DEBUG_ONLY_CONCH_EVENTS",
    "DEBUG_ONLY_TWISTED_EVENTS",
    "DEFAULT_LEVEL",
    "LEVELS",
    "TWISTED_PORT_LINES",
    "LogObserverService",
    "MinimumLevel",
    "filtered",
    "parseLevel",
    "twistdObserver",
    "useFilteredTwistdObserver",
]
