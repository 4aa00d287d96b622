"""
Listening on endpoints, and saying where.

A listen address may ask for port 0 (the kernel picks one); tests and the
demo need to learn which port that was. Each L{ListenService} records its
bound address, and groundcontrol writes all of them to
C{DATA/run/listening.json} once every listener is up.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from accesstunnel.addresses import describeAddress


class ListenService(Service):
    """Listen on one endpoint for as long as the service runs."""

    _log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, description: str
    ) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self.description = description
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = self._endpoint.listen(self._factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            host = port.getHost()
            self._log.info(
                "listening on {address} ({description})",
                address=describeAddress(host),
                description=self.description,
            )
            return port

        def failed(reason: Any) -> None:
            self._log.failure(
                "cannot listen on {description}", reason, description=self.description
            )
            from twisted.internet import reactor

            # A server that cannot listen where it was told to must not sit
            # there looking healthy.
            reactor.callLater(0, _stopReactor, reactor)  # type: ignore[attr-defined]
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
            addresses.append(
                {
                    "spec": service.description,
                    "host": getattr(host, "host", None),
                    "port": getattr(host, "port", None),
                }
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "listening": addresses}) + "\n")
        temporary.replace(path)

    return write


def listenAll(parent: MultiService, runDir: Path, listeners: list[ListenService]) -> None:
    """Attach C{listeners} to C{parent}; record them when all are bound."""
    for listener in listeners:
        listener.setServiceParent(parent)
    statusFile = runDir / "listening.json"
    with contextlib.suppress(FileNotFoundError):
        statusFile.unlink()

    class _Recorder(Service):
        def startService(self) -> None:
            super().startService()
            defer.gatherResults([s.listening for s in listeners]).addCallback(
                writeListeningFile(statusFile, listeners)
            )

    _Recorder().setServiceParent(parent)
