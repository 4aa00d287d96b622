"""
``python -m agent`` / ``tunnel-agentd``: the agent daemon without twistd, in less memory.

It takes the command line of ``twistd -n tunnel-agent`` (the same L{agent.tap.Options},
plus twistd's C{-l/--logfile}) and runs the same L{agent.tap.makeService} on the reactor of
``python -m accesstunnel.twistd`` (L{accesstunnel.reactor}: epoll, each event dispatched
without the legacy log context), the way ``twistd --nodaemon`` does: log lines in
twistd's format on standard output or in a file (rotated at 1 MB and on SIGUSR1, as twistd
does), standard output and error redirected into the log, SIGTERM and SIGINT stop the
services and the reactor, SIGHUP re-reads C{--config} (the agent's own handler). A stopping
agent exits once its sessions' children have ended (L{stopThenOutliveSessions}, as under
twistd), so it leaves none behind: its systemd unit signals the agent alone
(C{KillMode=process}).
``twistd -n tunnel-agent`` keeps working as before; this is an addition for devices where
memory counts.

What it saves (bench/RESULTS.md, "Agent footprint"):

  - twistd itself and its plugin scan (unpickling C{dropin.cache} imports every installed
    plugin's interfaces: trial, unittest, words, cred's strcred);
  - pyOpenSSL, service_identity, idna and cryptography's X.509 bindings for an agent that
    dials no C{tls://} or C{wss://} address. Twisted's C{tcp} and C{endpoints} modules try
    to import pyOpenSSL once, at import, to offer C{startTLS} and C{wrapClientTLS}; this
    launcher imports them while pyOpenSSL is refused, then lets it be imported again, so
    it is loaded only when a TLS address is first dialled (L{accesstunnel.addresses} wraps
    TLS with C{TLSMemoryBIOFactory} imported at that moment). In this process Twisted's
    own C{startTLS}, C{connectSSL} and C{ssl:}/C{tls:} endpoint strings are unavailable:
    use C{tls://} and C{wss://} addresses;
  - other optional imports that modules imported with the reactor try once, for features
    the agent never uses; refused while the reactor is imported, like pyOpenSSL, and
    importable again afterwards: the standard library's C{ssl} (libssl; C{asyncio}, which
    C{twisted.internet.defer} imports, C{http.client} and C{urllib.request}, which
    C{twisted.python.compat} imports, want it for TLS), C{bz2} and C{lzma} (C{zipfile} and
    C{shutil}, under C{twisted.plugin}, for compressed archives) and C{ctypes}
    (C{twisted.python.win32}, for Windows error messages);
  - the system's libcrypto, which C{_hashlib} loads for C{hashlib} and C{hmac}: the agent
    already carries OpenSSL inside cryptography, which does its ciphers and signatures.
    C{_hashlib} is refused for good, so C{hashlib} and C{hmac} use Python's builtin
    MD5/SHA-1/SHA-2/SHA-3/BLAKE2 (the key exchange's hashes; the link's integrity is
    AES-GCM's tag, in cryptography). Not available then: C{hashlib.pbkdf2_hmac},
    C{hashlib.scrypt} and the hashes only OpenSSL has; nothing the agent uses;
  - modules that Twisted imports unconditionally with the reactor for features the agent
    never uses: C{asyncio} (from C{twisted.internet.defer}) and C{html} with its entity
    table (from C{twisted.python.compat}) are stood in for while the reactor is imported
    by modules holding only the few names those take (L{STAND_INS_WITH_THE_REACTOR}), and
    C{http.cookiejar} (C{twisted.python.compat}'s deprecated C{cookielib}, which brings
    C{urllib.request}, C{http.client} and C{email}) is loaded lazily
    (L{LAZY_WITH_THE_REACTOR}). A later C{import asyncio} or C{import html} imports the
    real module, C{Deferred.asFuture} and C{fromFuture} work as before.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import types
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast

#: Optional imports refused while the reactor is imported (see the module docstring).
REFUSED_WITH_THE_REACTOR = ("OpenSSL", "ssl", "bz2", "lzma", "ctypes")

#: Refused for the life of the process: hashlib's and hmac's OpenSSL backend.
REFUSED_FOR_GOOD = ("_hashlib",)

#: Modules that modules imported with the reactor import as a whole (``from http import
#: cookiejar``, for C{twisted.python.compat}'s deprecated C{cookielib}: it brings
#: C{urllib.request}, C{http.client}, C{email}, C{tempfile}) but the agent never uses: found as
#: usual while the reactor is imported, but loaded lazily (L{importlib.util.LazyLoader}: run
#: at the first access to one of their attributes). Only for modules nothing else imports
#: again: importing a lazy module a second time loads it.
LAZY_WITH_THE_REACTOR = ("http.cookiejar",)


class _Refuse:
    """A meta path finder that makes importing these packages (and their modules) fail."""

    def __init__(self, packages: tuple[str, ...]) -> None:
        self.packages = packages
        self.forGood = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".", 1)[0] in self.packages:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


class _Lazy:
    """A meta path finder that has the other finders find these modules, loaded lazily."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.names:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            find = getattr(finder, "find_spec", None)
            spec = find and find(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = importlib.util.LazyLoader(spec.loader)
                return spec
        return None


def _asyncio() -> types.ModuleType:
    """
    Stands in for C{asyncio} (29 modules, with C{concurrent.futures}, C{logging} and
    C{subprocess}), of which C{twisted.internet.defer} takes C{AbstractEventLoop} and
    C{Future}, named only in annotations (C{asFuture} and C{fromFuture} use the loop and the
    future they are given), and C{iscoroutine}, which C{Deferred.fromCoroutine},
    C{ensureDeferred} and C{inlineCallbacks} call.
    """
    module = types.ModuleType("asyncio", "Stand-in for asyncio while the reactor is imported.")

    class AbstractEventLoop:
        """Stands in for C{asyncio.AbstractEventLoop} in annotations."""

    class Future:
        """Stands in for C{asyncio.Future} in annotations."""

    coroutineTypes = (types.CoroutineType, types.GeneratorType, Coroutine)

    def iscoroutine(obj: object) -> bool:
        """C{asyncio.iscoroutine} as Python 3.11 has it (Twisted also tests for generators)."""
        return isinstance(obj, coroutineTypes)

    module.__dict__.update(AbstractEventLoop=AbstractEventLoop, Future=Future)
    module.__dict__.update(iscoroutine=iscoroutine)
    return module


def _html() -> types.ModuleType:
    """
    Stands in for C{html}, which loads C{html.entities} (a 2,231-entry table) at import, of
    which C{twisted.python.compat} takes C{escape}: the real one, imported at the first call.
    """
    module = types.ModuleType("html", "Stand-in for html while the reactor is imported.")

    def escape(s: str, quote: bool = True) -> str:
        """C{html.escape}, imported at the first call."""
        from html import escape

        return escape(s, quote)

    module.__dict__.update(escape=escape)
    return module


#: Modules that modules imported with the reactor import unconditionally, for features the
#: agent never uses, and a stand-in for each with only what those modules take from it at
#: import. Each stand-in is in C{sys.modules} only while the reactor is imported: a later
#: C{import} imports the real module.
STAND_INS_WITH_THE_REACTOR = {"asyncio": _asyncio, "html": _html}


def _refusing(packages: tuple[str, ...]) -> _Refuse:
    """A L{_Refuse} of those C{packages} not imported yet, first on C{sys.meta_path}."""
    refuse = _Refuse(tuple(p for p in packages if p not in sys.modules))
    sys.meta_path.insert(0, refuse)
    return refuse


def importReactor() -> Any:
    """
    Install L{accesstunnel.reactor}'s reactor (unless a reactor is installed already: a test
    process) and import it and C{twisted.internet.endpoints} with
    L{REFUSED_WITH_THE_REACTOR} refused, L{LAZY_WITH_THE_REACTOR} loaded lazily and
    L{STAND_INS_WITH_THE_REACTOR} stood in for, then allow and import them as usual again;
    refuse L{REFUSED_FOR_GOOD} from now on. Return the reactor.

    Changes nothing for a module a process imported before (a test process): the modules
    keep what they found then.
    """
    if not any(isinstance(f, _Refuse) and f.forGood for f in sys.meta_path):
        _refusing(REFUSED_FOR_GOOD).forGood = True
    refuse = _refusing(REFUSED_WITH_THE_REACTOR)
    lazy = _Lazy(tuple(m for m in LAZY_WITH_THE_REACTOR if m not in sys.modules))
    sys.meta_path.insert(1, lazy)
    standIns = {
        name: make() for name, make in STAND_INS_WITH_THE_REACTOR.items() if name not in sys.modules
    }
    sys.modules.update(standIns)
    try:
        if "twisted.internet.reactor" not in sys.modules:
            from accesstunnel.reactor import install

            install()
        from twisted.internet import endpoints, reactor  # noqa: F401
    finally:
        sys.meta_path.remove(refuse)
        sys.meta_path.remove(lazy)
        for name, standIn in standIns.items():
            if sys.modules.get(name) is standIn:
                del sys.modules[name]
    return reactor


def _openLogFile(logfile: str, reactor: Any) -> tuple[Any, OSError | None]:
    """
    Where the agent's lines go: standard output for C{-}, else the rotated file (SIGUSR1
    rotates it), or standard output and why, when the file cannot be opened: on a
    read-only or full card the agent still links, so the operator gets in to mend it (it
    stopped here, with a traceback).
    """
    if logfile == "-":
        return sys.stdout, None
    import signal

    from twisted.python.logfile import LogFile

    from accesstunnel.clocks import elapsedClock, wallClock

    try:
        logFile = LogFile.fromFullPath(logfile)
    except OSError as e:
        return sys.stdout, e
    output = FallbackLogFile(
        logFile, logfile, elapsed=elapsedClock(reactor), wall=wallClock(reactor)
    )
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(output.rotate))
    return output, None


#: After a write to the log file failed, how often (elapsed seconds) a line tries it again.
LOG_FILE_RETRY = 60.0


class FallbackLogFile:
    """
    The log file, until a write to it fails: then standard output (the journal, under
    systemd), which says why once. A card the kernel remounts read-only while the agent
    runs (ext4's errors=remount-ro) made every line after it vanish, unsaid anywhere.

    The log file is tried again by the first line at least L{LOG_FILE_RETRY} seconds after
    the last try (on the agent's monotonic clock: a step of the wall clock neither hurries
    nor holds it back): once someone frees space or remounts the card, the lines go back to
    the file, the first of them saying there which span went to standard output, and standard
    output says they went back. While the file works a line costs one test more than before.
    """

    def __init__(
        self,
        logFile: Any,
        path: str,
        fallback: Any = None,
        elapsed: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._logFile: Any = logFile
        self._path = path
        self._fallback = fallback if fallback is not None else sys.stdout
        self._elapsed = elapsed
        self._wall = wall
        #: While lines go to standard output: since when (wall clock, said in the log file
        #: once it works again) and when the log file was last tried (elapsed clock).
        self._since: float | None = None
        self._triedAt = 0.0

    def write(self, text: str) -> None:
        if self._since is None:
            try:
                self._logFile.write(text)
                return
            except OSError as e:
                self._gaveUp(e)
        elif self._elapsed() - self._triedAt >= LOG_FILE_RETRY and self._wroteAgain(text):
            return
        self._fallback.write(text)

    def flush(self) -> None:
        if self._since is None:
            try:
                self._logFile.flush()
                return
            except OSError as e:
                self._gaveUp(e)
        self._fallback.flush()

    def rotate(self) -> None:
        if self._since is None:
            try:
                self._logFile.rotate()
            except OSError as e:
                self._gaveUp(e)

    def _line(self, level: Any, logFormat: str, **fields: Any) -> str:
        """A line of the agent's own, as the log observer writes one."""
        from twisted.logger import formatEventAsClassicLogText

        event = {
            "log_format": logFormat,
            "log_namespace": "agent.launcher",
            "log_level": level,
            "log_time": self._wall(),
            "path": self._path,
            **fields,
        }
        return formatEventAsClassicLogText(event) or ""

    def _gaveUp(self, error: OSError) -> None:
        from twisted.logger import LogLevel

        from accesstunnel.reasontext import reasonText

        self._since, self._triedAt = self._wall(), self._elapsed()
        line = self._line(
            LogLevel.warn,
            "cannot write the log file {path}: {error}; logging to standard output from "
            "here (the journal, under systemd), and trying the file again every "
            "{retry:.0f} s",
            error=reasonText(error),
            retry=LOG_FILE_RETRY,
        )
        self._fallback.write(line)

    def _wroteAgain(self, text: str) -> bool:
        """
        Whether C{text} went to the log file, after a line there saying which span of lines
        went to standard output; if the file still cannot be written, nothing is said.
        """
        from twisted.logger import LogLevel

        from accesstunnel.timetext import isoTime

        self._triedAt = self._elapsed()
        until = self._wall()
        span = {"since": isoTime(self._since), "until": isoTime(until)}
        note = self._line(
            LogLevel.warn,
            "the log lines from {since} to {until} went to standard output (the journal, "
            "under systemd): this file could not be written",
            **span,
        )
        try:
            self._logFile.write(self._lineBreak() + note + text)
        except OSError:
            return False
        self._since = None
        self._fallback.write(
            self._line(LogLevel.info, "logging to {path} again from {until}", **span)
        )
        return True

    def _lineBreak(self) -> str:
        """
        A line break if the log file ends inside a line: the kernel writes what fits of the
        line that fills the disk, and the note would go on from its middle.
        """
        try:
            with open(self._logFile.path, "rb") as written:
                written.seek(-1, 2)
                last = written.read(1)
        except (AttributeError, OSError):
            return ""  # not a file, or empty
        return "" if last == b"\n" else "\n"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._logFile.close()


def _startLogging(logfile: str, reactor: Any, level: Any) -> Any:
    """
    Log as C{twistd --nodaemon} does: text lines to standard output or a rotated file;
    only events of C{level} (C{--log-level}) and above.
    """
    from twisted.logger import ILogObserver, Logger, globalLogBeginner, textFileLogObserver

    from accesstunnel.logfilter import filtered
    from accesstunnel.reasontext import reasonText

    output, unopened = _openLogFile(logfile, reactor)
    observer = cast(ILogObserver, textFileLogObserver(output))
    globalLogBeginner.beginLoggingTo([filtered(observer, level)])
    if unopened is not None:
        Logger(namespace="agent.launcher").warn(
            "cannot open the log file {path}: {error}; logging to standard output instead "
            "(the journal, under systemd)",
            path=logfile,
            error=reasonText(unopened),
        )
    return output


#: How often a stopping agent looks whether its sessions' children have ended.
SESSION_END_POLL = 0.1


def stopThenOutliveSessions(
    stopServices: Callable[[], Any],
    clock: Any,
    children: Mapping[int, Any] | None = None,
    grace: float | None = None,
) -> Any:
    """
    Stop the agent's services (C{stopServices}), then wait, at most C{grace} seconds (by
    default the sessions' own L{agent.session.KILL_GRACE} and 2 s more), until no child process
    of the agent is left (C{children}: Twisted's registry of the processes the reactor reaps).
    The agent's top service does this when it stops (L{agent.tap.AgentService}), under
    C{twistd} and C{tunnel-agentd} alike.

    Why: stopping the services closes the link, and each session hangs its child up as its
    channel closes (SIGHUP to a terminal's process group, SIGTERM to a command's) and kills it
    L{agent.session.KILL_GRACE} later if it is still there. Without this wait the reactor
    stopped at once and that kill never came: a child that ignored the hang-up outlived the
    agent, an orphan holding whatever it held (found under the systemd unit's
    C{KillMode=process}, docs/systemd/tunnel-agent.service, where systemd signals only the
    agent). Processes a session detached on purpose (C{nohup}, C{setsid}, C{tmux}) are not the
    agent's children and live on, as they do when sshd restarts.
    """
    from twisted.internet import defer, task
    from twisted.logger import Logger

    if children is None:
        from twisted.internet import process

        children = process.reapProcessHandlers
    if grace is None:
        from agent.session import KILL_GRACE

        grace = KILL_GRACE + 2.0
    log = Logger(namespace="agent.launcher")

    @defer.inlineCallbacks
    def childrenEnded() -> Any:
        if children:
            log.info(
                "waiting for {count} session children to end (at most {grace:.0f} s)",
                count=len(children),
                grace=grace,
            )
        deadline = clock.seconds() + grace
        while children and clock.seconds() < deadline:
            yield task.deferLater(clock, SESSION_END_POLL, lambda: None)
        if children:
            log.warn(
                "session children {pids} still running after {grace:.0f} s; exiting anyway",
                pids=sorted(children),
                grace=grace,
            )

    stopped = defer.maybeDeferred(stopServices)
    return stopped.addBoth(lambda result: childrenEnded().addCallback(lambda _: result))


def main(argv: list[str] | None = None) -> int:
    """Parse the agent's options, start logging and the agent's services, run the reactor."""
    reactor = importReactor()

    import platform

    from twisted.logger import Logger
    from twisted.python import usage

    import twisted
    from agent.link import AGENT_VERSION
    from agent.tap import Options, makeService

    class LauncherOptions(Options):
        synopsis = "Usage: tunnel-agentd [-l LOGFILE] " + Options.synopsis
        optParameters = [
            ["logfile", "l", "-", "Log to this file (rotated at 1 MB), - for standard output."],
            *Options.optParameters,
        ]

    options = LauncherOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"{options}\ntunnel-agent: {e}", file=sys.stderr)
        return 1
    output = _startLogging(options["logfile"], reactor, options["log-level"])
    log = Logger(namespace="agent.launcher")
    log.info(
        "tunnel-agent {version} (Twisted {twisted}, {python} {pythonVersion}) starting up.",
        version=AGENT_VERSION,
        twisted=twisted.version.short(),
        python=sys.executable,
        pythonVersion=platform.python_version(),
    )
    log.info("reactor class: {reactorClass}.", reactorClass=type(reactor).__qualname__)
    top = makeService(options)
    top.privilegedStartService()
    reactor.callWhenRunning(top.startService)
    # The top service's stop outlives the sessions' children (agent.tap.AgentService).
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    log.info("Server Shut Down.")
    if output is not sys.stdout:
        output.close()
    return 0
