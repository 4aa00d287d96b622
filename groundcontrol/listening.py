"""
Listening on endpoints, and saying where.

A listen address may ask for port 0 (the kernel picks one); tests and the
demo need to learn which port that was. Each L{ListenService} records its
bound address, and groundcontrol writes all of them to
C{DATA/run/listening.json} once every listener is up. A listener that cannot listen
stops groundcontrol with exit status L{LISTEN_FAILED_STATUS} (L{stopWithStatus}).

A port may be up but not yet reachable where it was asked for: a C{tor://} listener whose
onion service waits for tor (L{accesstunnel.transports.tor}). Such a port has a
C{notReadyBecause} (why, or C{None} once reachable) and C{whenChanged(callback)}; the
"listening on" line and listening.json (C{"ready": false, "waiting": why}) say so, and
listening.json is written again when it changes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from accesstunnel.addresses import describeAddress
from accesstunnel.reasontext import reasonText
from accesstunnel.statefiles import writeAtomically

#: groundcontrol's exit status when a listener cannot listen: not 0, which a service manager
#: takes for a stop that was wanted (systemd's Restart=on-failure would not start it again).
LISTEN_FAILED_STATUS = 1


class ListenService(Service):
    """Listen on one endpoint for as long as the service runs."""

    _log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        description: str,
        stop: Callable[[int], None] | None = None,
    ) -> None:
        """C{stop(status)}: what a failure to listen does (by default L{stopWithStatus})."""
        self._endpoint = endpoint
        self._factory = factory
        self.description = description
        self._stop = stop or stopWithStatus
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = self._endpoint.listen(self._factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            waiting = notReadyBecause(port)
            if waiting is None:
                self._log.info(
                    "listening on {address} ({description})",
                    address=describeAddress(port.getHost()),
                    description=self.description,
                )
            else:
                local = getattr(port, "getLocalHost", port.getHost)()
                self._log.warn(
                    "listening on {address} ({description}), not reachable there yet: {why}",
                    address=describeAddress(local),
                    description=self.description,
                    why=waiting,
                )
            return port

        def failed(reason: Any) -> None:
            # A server that cannot listen where it was told to must not sit there looking
            # healthy, nor stop looking like a wanted stop. One line: the cause is the
            # host's (a port taken, an address missing), not a bug to trace.
            self._log.critical(
                "cannot listen on {description}: {why}; stopping (exit status {status})",
                description=self.description,
                why=_cause(reason.value),
                status=LISTEN_FAILED_STATUS,
            )
            self._stop(LISTEN_FAILED_STATUS)
            return reason

        d.addCallbacks(listening, failed)
        d.chainDeferred(self.listening)
        self.listening.addErrback(lambda f: None)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def notReadyBecause(port: IListeningPort) -> str | None:
    """Why C{port} is up but not reachable where it was asked for; C{None}: it is."""
    return getattr(port, "notReadyBecause", None)


def _cause(error: BaseException) -> str:
    """Why a listen failed, in a few words: the system's error when there is one."""
    socketError = getattr(error, "socketError", None)  # CannotListenError's
    return reasonText(socketError if isinstance(socketError, OSError) else error)


def stopWithStatus(status: int) -> None:
    """
    Stop the reactor, and end the process with C{status} once twistd has shut down.

    twistd has no way to set its exit status (Twisted issue 11335): after the reactor stops
    it cleans up and returns, and the process exits 0. So the status is set at the very end,
    from an exit handler (L{_exitWith}), registered once the reactor has shut down: the last.
    """
    from twisted.internet import reactor

    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "after", "shutdown", atexit.register, _exitWith, status
    )
    reactor.callLater(0, _stopReactor, reactor)  # type: ignore[attr-defined]


def _exitWith(status: int) -> None:
    """
    The last exit handler: run the others (registered before this one, which would
    otherwise run after it), flush standard output and error, and end with C{status}.
    """
    atexit.unregister(_exitWith)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _stopReactor(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def writeListeningFile(path: Path, services: list[ListenService]) -> Callable[[Any], None]:
    """Return a callback that records every bound address in C{path} as JSON."""

    def write(_: Any) -> None:
        addresses = []
        for service in services:
            if service.port is None:
                continue
            host = service.port.getHost()
            entry: dict[str, Any] = {
                "spec": service.description,
                "host": getattr(host, "host", None),
                "port": getattr(host, "port", None),
                "ready": True,
            }
            waiting = notReadyBecause(service.port)
            if waiting is not None:
                entry.update(ready=False, waiting=waiting)
            addresses.append(entry)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        document = json.dumps({"pid": os.getpid(), "listening": addresses}) + "\n"
        writeAtomically(path, document.encode(), mode=0o666)  # as write_text: the umask decides

    return write


#: What the listeners are (DATA/run/LISTENING_FILE), once they all are bound.
LISTENING_FILE = "listening.json"


def listenAll(parent: MultiService, runDir: Path, listeners: list[ListenService]) -> None:
    """Attach C{listeners} to C{parent}; record them when all are bound."""
    for listener in listeners:
        listener.setServiceParent(parent)
    statusFile = runDir / LISTENING_FILE
    with contextlib.suppress(FileNotFoundError):
        statusFile.unlink()

    write = writeListeningFile(statusFile, listeners)

    def writeAndWatch(ports: list[IListeningPort]) -> None:
        write(None)
        for port in ports:  # a port that becomes reachable later (or stops being)
            whenChanged = getattr(port, "whenChanged", None)
            if whenChanged is not None:
                whenChanged(lambda: write(None))

    class _Recorder(Service):
        def startService(self) -> None:
            super().startService()
            defer.gatherResults([s.listening for s in listeners]).addCallback(writeAndWatch)

    _Recorder().setServiceParent(parent)
