"""
Tor: groundcontrol publishes an onion service through a running tor's control port, and
the agent dials C{.onion} addresses through a tor SOCKS port (our SOCKS5 client).

A device on a network that blocks everything but Tor (or an operator who wants the server's
location hidden) still gets a link. The onion service's key is kept in a file so the
address survives restarts; agents have it in their server list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["OnionAddress", "OnionServerEndpoint", "TorSettings", "onionClientEndpoint"]

DEFAULT_CONTROL = "tcp:127.0.0.1:9051"
DEFAULT_SOCKS = "tcp:127.0.0.1:9050"


@attrs.frozen
class TorSettings:
    """
    Where tor is, as Twisted client endpoint strings, and where the onion key lives.

    @ivar control: tor's control port (groundcontrol publishes its onion service there).
    @ivar socks: tor's SOCKS port (the agent dials through it).
    @ivar onionKeyFile: the onion service's private key; created on first start (0600).
        C{None}: a new address each start (tests).
    """

    control: str = DEFAULT_CONTROL
    socks: str = DEFAULT_SOCKS
    onionKeyFile: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))


@implementer(IAddress)
@attrs.frozen
class OnionAddress:
    """What an onion listener reports as its host: the C{.onion} name and public port."""

    host: str
    port: int
    type: str = "ONION"


@implementer(IListeningPort)
class _OnionPort:
    """The local listening port plus the onion service pointing at it."""

    def __init__(self, local: IListeningPort, onion: Any, publicPort: int) -> None:
        self._local = local
        self.onion = onion
        self._publicPort = publicPort

    def getHost(self) -> OnionAddress:
        return OnionAddress(self.onion.hostname, self._publicPort)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self.onion.remove()
        finally:
            await defer.maybeDeferred(self._local.stopListening)


@implementer(IStreamServerEndpoint)
class OnionServerEndpoint:
    """
    Listen on a loopback port and publish it as a v3 onion service on C{publicPort}.

    C{listen} fires once tor has uploaded the first descriptor, so a server that reports
    itself listening can be reached.
    """

    _log = Logger()

    def __init__(self, reactor: Any, publicPort: int, settings: TorSettings) -> None:
        self._reactor = reactor
        self.publicPort = publicPort
        self.settings = settings

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.Deferred.fromCoroutine(self._listen(protocolFactory))

    async def _listen(self, protocolFactory: IProtocolFactory) -> IListeningPort:
        local = await endpoints.TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1").listen(
            protocolFactory
        )
        try:
            import txtorcon  # groundcontrol only: the agent dials through SOCKS alone

            control = endpoints.clientFromString(self._reactor, self.settings.control)
            tor = await txtorcon.connect(self._reactor, control)
            keyFile = self.settings.onionKeyFile
            key = keyFile.read_text().strip() if keyFile and keyFile.exists() else None
            localPort = local.getHost().port  # type: ignore[attr-defined]
            onion = await tor.create_onion_service(
                ports=[(self.publicPort, f"127.0.0.1:{localPort}")],
                private_key=key,
                version=3,
            )
        except BaseException:
            await defer.maybeDeferred(local.stopListening)
            raise
        if keyFile is not None and key is None:
            _writePrivate(keyFile, onion.private_key + "\n")
        self._log.info(
            "onion service {onion}:{port} published for 127.0.0.1:{local}",
            onion=onion.hostname,
            port=self.publicPort,
            local=localPort,
        )
        return _OnionPort(local, onion, self.publicPort)


def _writePrivate(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    temporary.replace(path)


def onionClientEndpoint(
    reactor: Any, host: str, port: int, settings: TorSettings
) -> IStreamClientEndpoint:
    """
    Reach C{host:port} (usually a C{.onion}) through tor's SOCKS port: our SOCKS5 client
    (L{accesstunnel.transports.socks}), not txtorcon's, which holds back the server's first
    bytes when they arrive with tor's reply.
    """
    from accesstunnel.transports.socks import SOCKS5Endpoint

    return SOCKS5Endpoint(
        endpoints.clientFromString(reactor, settings.socks),
        host,
        port,
        f"tor's SOCKS port {settings.socks} (is tor running?)",
    )
