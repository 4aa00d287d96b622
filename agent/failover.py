"""
Finding the server: try an ordered list of addresses, each attempt bounded in time, and
start next time with the one that last worked.

Why: a device may sit on a network where the direct route is closed, port 443 leads only to
a proxy, or a captive portal answers everything; trying the list in order finds whatever gets
out, and remembering the winner (in the state directory, so across restarts) makes the next
reconnect fast instead of re-walking addresses that time out.

An address counts as working only once the link on it is up (the link protocol's C{ready}
Deferred fires, i.e. the agent authenticated), not merely when TCP connected: a TLS-intercepting
middlebox accepts every connection. A link that closes before it was up sends the next
connect to the next address.

The link protocol is told where and when it was dialled (its C{dialed} method, given a
L{Dial}): the line it writes once it is up names the address and the time from the dial.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from accesstunnel.addresses import Connector
from accesstunnel.clocks import wallClock
from accesstunnel.reasontext import reasonText
from accesstunnel.statefiles import writeAtomically
from agent import linklog
from agent.clocksense import certificateClockNote

__all__ = ["AllAddressesFailed", "Dial", "FailoverEndpoint"]

DEFAULT_ATTEMPT_TIMEOUT = 15.0


class AllAddressesFailed(ConnectionError):  # noqa: N818 - reads as a state
    """Every address in the list failed this round; ClientService backs off and retries."""


@attrs.frozen
class Dial:
    """
    Where a link's connection was dialled, and when (the clock's seconds): the address
    as given (a proxy named by host), its transport (C{"tcp"}, C{"tls"}, C{"wss"}...).
    """

    address: str
    transport: str
    started: float


class _Watch(ProtocolWrapper):
    """Tells the endpoint when the link's protocol really started, came up, or ended."""

    factory: _WatchFactory
    _made = False

    def makeConnection(self, transport: Any) -> None:
        self._made = True
        super().makeConnection(transport)
        self.factory.made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._made:
            super().connectionLost(reason)
        self.factory.lost(reason)


class _WatchFactory(WrappingFactory):
    protocol = _Watch
    noisy = False  # one per attempt: "Starting factory" lines would drown the useful ones

    def __init__(self, wrappedFactory: IProtocolFactory, dial: Dial | None = None) -> None:
        super().__init__(wrappedFactory)
        self.dial = dial
        self.started: defer.Deferred[_Watch] = defer.Deferred()
        self.up: defer.Deferred[None] = defer.Deferred()

    def made(self, watch: _Watch) -> None:
        if not self.started.called:
            self.started.callback(watch)
        dialed = getattr(watch.wrappedProtocol, "dialed", None)
        if dialed is not None and self.dial is not None:
            dialed(self.dial)
        ready = getattr(watch.wrappedProtocol, "ready", None)
        if isinstance(ready, defer.Deferred):
            ready.addCallbacks(self._up, self._notUp)
        else:
            self._up(None)  # a protocol with no notion of "up": connected is up

    def _up(self, result: Any) -> Any:
        if not self.up.called:
            self.up.callback(None)
        return result

    def _notUp(self, reason: Failure) -> Failure:
        if not self.up.called:
            self.up.errback(reason)
        return reason

    def lost(self, reason: Failure) -> None:
        self.transportFailed(reason)
        if not self.up.called:
            self.up.errback(reason)

    def transportFailed(self, reason: Failure) -> None:
        """The transport ended before the link protocol started (WebSocket refused...)."""
        if not self.started.called:
            self.started.errback(reason)


#: accesstunnel.transports.tunnel's error for a proxy that took the connection and did not
#: answer, named (Failure.check takes the name) so that an agent without a proxy does not
#: import the tunnel module.
_PROXY_UNANSWERED = "accesstunnel.transports.tunnel.ProxyUnansweredError"


def _timedOut(result: Any, timeout: float) -> Any:
    """
    An attempt cut short by its timeout is a timeout, however the endpoint reports the
    cancel: HostnameEndpoint (every ssh://, tls://, wss://) fails with
    ConnectingCancelledError, not CancelledError, and the log said "could not reach
    ssh://A: HostnameAddress(hostname=b'A', port=22)" for a silently dropped address.
    """
    if isinstance(result, Failure) and result.check(_PROXY_UNANSWERED):
        # Connected to an HTTP proxy that never answered the CONNECT: say so, not "no
        # connection", which points at the server.
        raise _StalledError(f"{reasonText(result.value)} in {timeout:g} s")
    if isinstance(result, Failure) and result.check(
        defer.CancelledError, error.ConnectingCancelledError
    ):
        raise defer.TimeoutError(timeout, "connect")
    return result


class _StalledError(Exception):
    """An attempt that connected and then heard nothing until its timeout."""


def _stalledText(outer: Any, transport: str, timeout: float) -> str:
    """
    What an attempt that connected (TCP, and a proxy's tunnel if any) waited for when its
    timeout ran out: the TLS handshake, or the WebSocket's HTTP upgrade. It said "no
    connection in 15 s", as for an address that never answered at all.
    """
    connection = linklog.tlsConnection(outer)
    if connection is not None:
        from accesstunnel.transports.tlsreasons import handshakeUnfinished  # TLS only

        if handshakeUnfinished(connection):
            return (
                f"connected, but the TLS handshake did not finish in {timeout:g} s (is it a "
                "TLS port?)"
            )
    if transport in ("ws", "wss"):
        return (
            f"connected, but the WebSocket did not open in {timeout:g} s (its HTTP request "
            "got no answer)"
        )
    return f"connected, but the link did not start in {timeout:g} s"


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    An endpoint for L{ClientService} that walks C{connectors} in order.

    @ivar current: the connector of the link now being made or up (C{None} before the first).
    @ivar preferred: index in the list tried first (the last that worked).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        connectors: Sequence[Connector],
        stateFile: Path,
        attemptTimeout: float = DEFAULT_ATTEMPT_TIMEOUT,
    ) -> None:
        if not connectors:
            raise ValueError("at least one server address is needed")
        self._clock = clock
        self._wall = wallClock(clock)
        self._stateFile = Path(stateFile)
        self.attemptTimeout = attemptTimeout
        self.current: Connector | None = None
        self._connectors: list[Connector] = []
        self.preferred = 0
        self.replace(connectors)

    @property
    def connectors(self) -> tuple[Connector, ...]:
        return tuple(self._connectors)

    @property
    def transport(self) -> str | None:
        """The transport of the link in use (C{"tls"}, C{"wss"}, ...), for status and C{ls}."""
        return self.current.transport if self.current is not None else None

    def replace(self, connectors: Sequence[Connector]) -> None:
        """
        Take a new address list (the config file changed). The link that is up stays up;
        the next connect uses the new list, starting with the remembered address if it is
        still in it.
        """
        if not connectors:
            raise ValueError("at least one server address is needed")
        self._connectors = list(connectors)
        remembered = self._readRemembered()
        descriptions = [c.description for c in self._connectors]
        # By the address alone: the proxy it went through may have changed since (a device
        # moved to another network); older files hold the whole description.
        known = [c.address or c.description for c in self._connectors]
        if remembered in known:
            self.preferred = known.index(remembered)
        else:
            self.preferred = descriptions.index(remembered) if remembered in descriptions else 0
        self._log.info(
            "server addresses: {addresses}, trying {first} first",
            addresses=descriptions,
            first=descriptions[self.preferred],
        )

    def _order(self) -> list[Connector]:
        n = len(self._connectors)
        return [self._connectors[(self.preferred + i) % n] for i in range(n)]

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        failures: list[str] = []
        for connector in self._order():
            try:
                return await self._attempt(connector, protocolFactory)
            except defer.CancelledError:
                # Not a timeout (that is a TimeoutError, _timedOut): the connect itself was
                # cancelled, the agent stopping. It said "could not reach A: no connection
                # in 15 s" then, and went on to dial the next address.
                raise
            except defer.TimeoutError:
                reason = f"no connection in {self._timeoutFor(connector):g} s"
            except Exception as e:  # every failure is a reason to try the next one
                # Without Twisted's closing period: the reasons are joined with "; ".
                reason = reasonText(e)
            reason += self._clockNote(reason)
            failures.append(f"{connector.description}: {reason}")
            self._log.info(
                "could not reach {address}: {reason}", address=connector.description, reason=reason
            )
        raise AllAddressesFailed("; ".join(failures))

    async def _attempt(self, connector: Connector, protocolFactory: IProtocolFactory) -> IProtocol:
        dial = Dial(connector.description, connector.transport, self._clock.seconds())
        watch = _WatchFactory(protocolFactory, dial)
        self._log.debug("trying {address}", address=connector.description)
        connecting = connector.endpoint.connect(connector.wrapFactory(watch))
        outer: list[Any] = []

        def abort(d: defer.Deferred[Any]) -> None:
            for protocol in outer:
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abortConnection()

        started: defer.Deferred[_Watch] = defer.Deferred(abort)

        def relay(result: Any) -> None:
            # Not chainDeferred: after the attempt's timeout cancelled started, the
            # connection it aborted still ends (a wss:// one whose WebSocket never
            # opened, through autobahn's onClose), and chaining that into started was an
            # AlreadyCalledError, logged as a critical "Unhandled error in Deferred".
            if started.called:
                return
            if isinstance(result, Failure):
                started.errback(result)
            else:
                started.callback(result)

        watch.started.addBoth(relay)

        def connected(protocol: Any) -> defer.Deferred[_Watch]:
            outer.append(protocol)
            return started

        attempt = connecting.addCallback(connected)
        attempt.addTimeout(self._timeoutFor(connector), self._clock, _timedOut)
        try:
            watched = await attempt
        except defer.TimeoutError:
            watch.up.addErrback(lambda f: None)  # nobody waits for "up" of a failed attempt
            if outer:  # connected, then silence: say what it waited for
                timeout = self._timeoutFor(connector)
                raise _StalledError(_stalledText(outer[0], connector.transport, timeout)) from None
            raise
        except BaseException:
            watch.up.addErrback(lambda f: None)
            raise
        self.current = connector
        watch.up.addCallbacks(
            lambda _: self._worked(connector), lambda f: self._failedEarly(connector, f)
        )
        return watched.wrappedProtocol  # type: ignore[no-any-return]

    def _timeoutFor(self, connector: Connector) -> float:
        """The address's own bound (tor's is longer), else the endpoint's."""
        return connector.attemptTimeout or self.attemptTimeout

    def _worked(self, connector: Connector) -> None:
        # The link itself says it is up, and how (agent.linklog), once per link.
        if connector in self._connectors:
            self.preferred = self._connectors.index(connector)
        self._remember(connector.address or connector.description)

    def _failedEarly(self, connector: Connector, reason: Failure) -> None:
        # Reached, but no link came of it: start with the next address next time, so an
        # address that accepts and then fails cannot keep the list from being walked.
        if connector not in self._connectors:
            return
        self.preferred = (self._connectors.index(connector) + 1) % len(self._connectors)
        text = reasonText(reason.value)
        self._log.info(
            "{address} connected but the link did not come up ({reason}); "
            "trying {next} first next time",
            address=connector.description,
            reason=text + self._clockNote(text),
            next=self._connectors[self.preferred].description,
        )

    def _clockNote(self, reason: str) -> str:
        """After a failed certificate check: what this device's clock says (L{agent.clocksense})."""
        return certificateClockNote(reason, self._wall(), self._stateFile.parent)

    def _readRemembered(self) -> str | None:
        try:
            return json.loads(self._stateFile.read_text()).get("address")  # type: ignore[no-any-return]
        except (OSError, ValueError, AttributeError):
            return None

    #: Whether the last write of the remembered address failed (said once, not per link).
    _rememberFailed = False

    def _remember(self, address: str) -> None:
        """
        Write the winner atomically: a power cut leaves the old file or the new one. Not
        written again when it is the address remembered: each link up wrote the card (wear),
        and on a read-only card warned at every reconnect.
        """
        if address == self._readRemembered():
            return
        try:
            self._stateFile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # json.dumps, not json.dump: dump encodes in Python, with closures that refer to
            # each other, a reference cycle per link that came up.
            writeAtomically(self._stateFile, (json.dumps({"address": address}) + "\n").encode())
        except OSError as e:
            if not self._rememberFailed:
                self._log.warn(
                    "cannot record the working address in {path}: {error}; the agent tries "
                    "again at each link up and says nothing more until it can",
                    path=str(self._stateFile),
                    error=reasonText(e),
                )
            self._rememberFailed = True
            return
        self._rememberFailed = False
