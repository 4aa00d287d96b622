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
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from accesstunnel.addresses import clientEndpoint
from accesstunnel.reasontext import reasonText

__all__ = [
    "OnionAddress",
    "OnionServerEndpoint",
    "TorControlError",
    "TorSettings",
    "onionClientEndpoint",
]

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


class TorControlError(ConnectionError):
    """tor's control port did not answer or refused us: no onion service can be published."""


@implementer(IAddress)
@attrs.frozen
class OnionAddress:
    """What an onion listener reports as its host: the C{.onion} name and public port."""

    host: str
    port: int
    type: str = "ONION"


#: Seconds between attempts to publish the onion service again once tor's control port
#: went away (tor restarted): quick at first, then every 30 s for as long as it takes.
REPUBLISH_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@implementer(IListeningPort)
class _OnionPort:
    """
    The local listening port plus the onion service pointing at it, published again
    whenever tor comes back.

    Why again: an ADD_ONION service lives as long as the tor process (and the control
    connection that added it). When tor restarted (a package upgrade, a crash), the onion
    address stopped answering for good while groundcontrol went on looking healthy; every
    tor:// agent was cut off until someone restarted groundcontrol. Now losing the control
    connection is logged, and the service is published again, with the same key and so
    the same address, as soon as tor answers.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: TorSettings,
        publicPort: int,
        local: IListeningPort,
        privateKey: str | None,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._publicPort = publicPort
        self._local = local
        self._privateKey = privateKey
        self.onion: Any = None
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._stopped = False

    async def publish(self) -> None:
        """Connect to tor's control port and add the onion service (the first, or again)."""
        import txtorcon  # groundcontrol only: the agent dials through SOCKS alone

        control = clientEndpoint(self._reactor, self._settings.control)
        try:
            tor = await txtorcon.connect(self._reactor, control)
        except Exception as e:
            raise TorControlError(
                f"cannot reach tor's control port {self._settings.control} (is tor running, "
                f"with ControlPort and CookieAuthentication 1?): {reasonText(e)}"
            ) from e
        localPort = self._local.getHost().port  # type: ignore[attr-defined]
        onion = await tor.create_onion_service(
            ports=[(self._publicPort, f"127.0.0.1:{localPort}")],
            private_key=self._privateKey,
            version=3,
        )
        if self._stopped:  # stopListening came while tor was answering
            await onion.remove()
            return
        self._privateKey = self._privateKey or onion.private_key
        self.onion = onion
        tor.protocol.when_disconnected().addBoth(self._torGone)
        self._log.info(
            "onion service {onion}:{port} published for 127.0.0.1:{local}",
            onion=onion.hostname,
            port=self._publicPort,
            local=localPort,
        )

    def _torGone(self, reason: Any) -> None:
        if self._stopped:
            return
        self._log.warn(
            "lost tor's control port {control}: onion service {onion} is unreachable until "
            "tor is back; publishing it again",
            control=self._settings.control,
            onion=self.onion.hostname if self.onion is not None else "?",
        )
        self._failures = 0
        self._again()

    def _again(self) -> None:
        delay = REPUBLISH_DELAYS[min(self._failures, len(REPUBLISH_DELAYS) - 1)]
        self._retry = self._reactor.callLater(delay, self._republish)

    def _republish(self) -> None:
        self._retry = None
        publishing = defer.Deferred.fromCoroutine(self.publish())

        def failed(reason: Any) -> None:
            self._failures += 1
            self._log.info(
                "cannot publish the onion service yet ({error}); trying again",
                error=reasonText(reason.value),
            )
            if not self._stopped:
                self._again()

        publishing.addErrback(failed)

    def getHost(self) -> OnionAddress:
        return OnionAddress(self.onion.hostname, self._publicPort)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        try:
            if self.onion is not None:
                await self.onion.remove()
        finally:
            await defer.maybeDeferred(self._local.stopListening)


@implementer(IStreamServerEndpoint)
class OnionServerEndpoint:
    """
    Listen on a loopback port and publish it as a v3 onion service on C{publicPort}.

    C{listen} fires once tor has uploaded the first descriptor, so a server that reports
    itself listening can be reached; it fails if tor cannot be reached then (groundcontrol
    does not start). Later losses of tor are repaired by L{_OnionPort}.
    """

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
        keyFile = self.settings.onionKeyFile
        key = keyFile.read_text().strip() if keyFile and keyFile.exists() else None
        port = _OnionPort(self._reactor, self.settings, self.publicPort, local, key)
        try:
            await port.publish()
        except BaseException:
            await defer.maybeDeferred(local.stopListening)
            raise
        if keyFile is not None and key is None:
            _writePrivate(keyFile, port.onion.private_key + "\n")
        return port


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
        clientEndpoint(reactor, settings.socks),
        host,
        port,
        f"tor's SOCKS port {settings.socks} (is tor running?)",
    )
