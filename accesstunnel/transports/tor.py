"""
Tor: groundcontrol publishes an onion service through a running tor's control port, and
the agent dials C{.onion} addresses through a tor SOCKS port (our SOCKS5 client).

A device on a network that blocks everything but Tor (or an operator who wants the server's
location hidden) still gets a link. The onion service's key is kept in a file so the
address survives restarts; agents have it in their server list.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from accesstunnel.addresses import clientEndpoint
from accesstunnel.clocks import elapsedClock
from accesstunnel.reasontext import reasonText
from accesstunnel.statefiles import writeAtomically

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

    host: str | None
    port: int
    type: str = "ONION"


#: Seconds between attempts to publish the onion service (again) while tor's control port
#: does not answer (tor restarted, or not started yet): quick at first, then every 30 s for
#: as long as it takes.
REPUBLISH_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


#: Why the service is not published while tor, answering, has not uploaded its descriptor
#: yet (a tor still bootstrapping, or cut off from the Tor network).
UPLOAD_WAIT = (
    "tor's control port answers; waiting for tor to upload the onion service's descriptor "
    "(is tor connected to the Tor network?)"
)


#: How long C{listen} waits for tor's first descriptor upload before it reports the port up
#: but unpublished and lets the publishing go on: a running tor uploads in about 2 s, and
#: listening.json (every listener's) is not held back while tor bootstraps, or for ever
#: while it cannot reach the Tor network.
FIRST_UPLOAD_PATIENCE = 10.0


#: Seconds tor's control port has to answer each thing groundcontrol asks it: the connection,
#: authentication and the configuration txtorcon reads first, and each question while it waits
#: for the upload. A running tor answers in milliseconds, bootstrapping or not; one silent this
#: long is hung, or is not tor (a wrong port that takes the connection and says nothing), and
#: waiting on it was waiting for ever: no retry, and no log line after the first. Shorter than
#: L{FIRST_UPLOAD_PATIENCE}, so a start with such a port says so.
CONTROL_ANSWER_PATIENCE = 5.0


#: Seconds between the questions groundcontrol asks tor (how far it has bootstrapped) while tor
#: has not reported the descriptor uploaded, or not answered the service's ADD_ONION: one
#: unanswered is a hung tor, hung up and tried again; an answer is logged once per change, and
#: the wait goes on (tor uploads once it is on the Tor network; asking it again would not help).
UPLOAD_CHECK_INTERVAL = 60.0


class _StillPublishingError(Exception):
    """C{listen}'s patience ran out before tor published the service."""


def _firstOf(
    work: defer.Deferred[Any], other: defer.Deferred[Any], otherwise: Callable[[], Exception]
) -> defer.Deferred[Any]:
    """
    C{work}'s outcome, or a failure with C{otherwise()} if C{other} fires first; what
    C{work} gives after that goes on down its own chain, to callbacks added meanwhile.
    """
    outcome: defer.Deferred[Any] = defer.Deferred()

    def settle(result: Any) -> Any:
        if outcome.called:
            return result
        if isinstance(result, Failure):
            outcome.errback(result)
        else:
            outcome.callback(result)
        return None

    def beaten(_: Any) -> None:
        if not outcome.called:
            outcome.errback(Failure(otherwise()))

    work.addBoth(settle)
    other.addBoth(beaten)
    return outcome


def _within(
    reactor: Any, work: defer.Deferred[Any], seconds: float, otherwise: Callable[[], Exception]
) -> defer.Deferred[Any]:
    """
    C{work}'s outcome, or a failure with C{otherwise()} if it has none after C{seconds}; what
    it gives later is dropped (the caller hangs up the connection it waited on). Cancelling
    the result stops the timer.
    """

    def giveUp() -> None:
        work.addErrback(lambda _: None)
        outcome.errback(Failure(otherwise()))

    def stopTimer(_: defer.Deferred[Any]) -> None:
        if timer.active():
            timer.cancel()
            work.addErrback(lambda _: None)

    outcome: defer.Deferred[Any] = defer.Deferred(stopTimer)
    timer = reactor.callLater(seconds, giveUp)

    def settle(result: Any) -> Any:
        if outcome.called:
            return result
        timer.cancel()
        if isinstance(result, Failure):
            outcome.errback(result)
        else:
            outcome.callback(result)
        return None

    work.addBoth(settle)
    return outcome


def _bootstrapText(answer: Any) -> str:
    """tor's answer to C{GETINFO status/bootstrap-phase} in words: C{bootstrapped 45%: ...}."""
    phase = str(answer.get("status/bootstrap-phase", "")) if isinstance(answer, dict) else ""
    progress = re.search(r"PROGRESS=(\d+)", phase)
    summary = re.search(r'SUMMARY="([^"]*)"', phase)
    if progress is None or summary is None:
        return f"its bootstrap status is {phase.strip()!r}"
    return f"it has bootstrapped {progress[1]}%: {summary[1]}"


class _UploadWatch:
    """
    Ask tor every L{UPLOAD_CHECK_INTERVAL} how far it has bootstrapped, while an onion service
    waits for its first descriptor upload: tor's answer is logged once per change, and a tor
    that does not answer within L{CONTROL_ANSWER_PATIENCE} ends the wait (C{silence} says
    why). txtorcon sends one command at a time, so a tor that never answered ADD_ONION leaves
    the question unanswered too.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        protocol: Any,
        describe: str,
        silent: Callable[[TorControlError], None],
    ) -> None:
        self._reactor = reactor
        self._protocol = protocol
        self._describe = describe
        self._silent = silent
        # How long tor has had: a duration, on the monotonic clock (groundcontrol's reactor
        # times with the wall clock, which may step while tor bootstraps).
        self._elapsed = elapsedClock(reactor)
        self._started = self._elapsed()
        self._said: str | None = None
        self._asking: defer.Deferred[Any] | None = None
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = reactor
        self._loop.start(UPLOAD_CHECK_INTERVAL, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._asking is not None:
            self._asking.cancel()

    def _check(self) -> defer.Deferred[None]:
        asking = defer.maybeDeferred(self._protocol.get_info, "status/bootstrap-phase")
        self._asking = _within(
            self._reactor,
            asking,
            CONTROL_ANSWER_PATIENCE,
            lambda: TorControlError(
                f"{self._describe} stopped answering while the onion service was being "
                f"published (no answer in {CONTROL_ANSWER_PATIENCE:g} s: is tor hung?)"
            ),
        )
        return self._asking.addCallbacks(self._answered, self._unanswered)

    def _answered(self, answer: Any) -> None:
        self._asking = None
        said = _bootstrapText(answer)
        if said != self._said:  # one line per change, not one a minute
            self._said = said
            self._log.warn(
                "tor has not uploaded the onion service's descriptor after {seconds:.0f} s "
                "({said}); still waiting (is tor connected to the Tor network?)",
                seconds=self._elapsed() - self._started,
                said=said,
            )

    def _unanswered(self, reason: Failure) -> None:
        self._asking = None
        if reason.check(TorControlError):
            self.stop()
            self._silent(reason.value)
        # Anything else is an answer (an error reply) or the connection lost, which the
        # publish sees by itself.


@implementer(IStreamClientEndpoint)
class _HangUpEndpoint:
    """
    tor's control endpoint for one publish attempt, keeping the connection it made so the
    attempt can hang it up: C{txtorcon.connect} does not when it fails after tor answered
    (authentication, its first queries), and gives nothing to close then.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint
        self._connected: list[IProtocol] = []

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        connecting = self._endpoint.connect(protocolFactory)
        connecting.addCallback(self._keep)
        return connecting

    @property
    def connected(self) -> bool:
        """Whether the connection was made (tor, or something, took it)."""
        return bool(self._connected)

    def _keep(self, protocol: IProtocol) -> IProtocol:
        self._connected.append(protocol)
        return protocol

    def hangUp(self) -> None:
        """Close the connection made, if any (one already closed is left as it is)."""
        for protocol in self._connected:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()
        self._connected.clear()


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

    The same goes for a tor that does not answer when groundcontrol starts (booted before
    tor, or tor broken): the port is up unpublished (L{notReadyBecause} says why) and the
    service is published once tor answers, so groundcontrol's other listeners serve
    meanwhile rather than the whole server stopping with tor. A tor that answers and then
    goes before its first descriptor upload is one more such failure.
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
        #: Why the onion service is not published now (C{None} while it is): for the
        #: "listening on" line and listening.json.
        self.notReadyBecause: str | None = None
        self._changed: list[Callable[[], None]] = []
        self._lastError: str | None = None
        self._retry: IDelayedCall | None = None
        #: The control connection the published service lives on (hung up at stop).
        self._control: _HangUpEndpoint | None = None
        self._failures = 0
        #: The last attempt failed after tor answered (not a silence): the delays go on.
        self._refused = False
        self._stopped = False

    def whenChanged(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} whenever the service is published or lost, or why it is not
        published changes (listening.json).
        """
        self._changed.append(callback)

    def _setNotReady(self, why: str | None) -> None:
        self.notReadyBecause = why
        for callback in self._changed:
            callback()

    async def publish(self) -> None:
        """
        Connect to tor's control port and add the onion service (the first, or again).

        A failed attempt hangs up the control connection it opened: each retry (every
        30 s at length) opens a new one, and tor keeps one that was left open, with its
        file descriptors in both programs, for as long as both run. That was every attempt
        tor answered and then refused (a cookie file groundcontrol cannot read, the
        service refused, a key that cannot be stored).
        """
        control = _HangUpEndpoint(clientEndpoint(self._reactor, self._settings.control))
        try:
            await self._publishThrough(control)
        except BaseException:
            control.hangUp()
            raise
        if self._stopped:  # stopListening came while tor was answering
            control.hangUp()
        else:
            self._control = control

    def _unanswered(self, control: _HangUpEndpoint) -> TorControlError:
        """Why an attempt gave up on a control port silent for L{CONTROL_ANSWER_PATIENCE}."""
        where, patience = self._settings.control, f"{CONTROL_ANSWER_PATIENCE:g} s"
        if control.connected:
            return TorControlError(
                f"tor's control port {where} took the connection but did not answer in "
                f"{patience} (is tor hung, or is something other than tor listening there?)"
            )
        return TorControlError(
            f"tor's control port {where} did not take the connection in {patience} (is a "
            "firewall dropping it?)"
        )

    async def _publishThrough(self, control: _HangUpEndpoint) -> None:
        import txtorcon  # groundcontrol only: the agent dials through SOCKS alone

        connecting = txtorcon.connect(self._reactor, control)
        try:
            tor = await _within(
                self._reactor,
                connecting,
                CONTROL_ANSWER_PATIENCE,
                lambda: self._unanswered(control),
            )
        except TorControlError:
            raise
        except Exception as e:
            raise TorControlError(
                f"cannot reach tor's control port {self._settings.control} (is tor running, "
                f"with ControlPort and CookieAuthentication 1?): {reasonText(e)}"
            ) from e
        # tor answers after a silence: a later silence is a new episode, retried quickly
        # again. Not after a refusal: a tor that answers and refuses every time (the service,
        # or a key that cannot be stored) was asked again every 2 s for as long as it lasted.
        if not self._refused:
            self._failures = 0
        self._setNotReady(UPLOAD_WAIT)
        localPort = self._local.getHost().port  # type: ignore[attr-defined]
        creating = tor.create_onion_service(
            ports=[(self._publicPort, f"127.0.0.1:{localPort}")],
            private_key=self._privateKey,
            version=3,
        )
        # txtorcon waits for tor's report of the first descriptor upload, which a tor that
        # goes (restarted while bootstrapping) never sends: that wait never ended, and the
        # service stayed unpublished, with no log line, until groundcontrol was restarted.
        lost = TorControlError(
            f"lost tor's control port {self._settings.control} before the onion service was "
            "published"
        )
        # A tor that hangs (after it took the service, or before it answered ADD_ONION) would
        # leave that wait for ever too: the watch asks it a question now and then.
        ended: defer.Deferred[None] = defer.Deferred()
        silence: list[TorControlError] = []

        def end(why: Any) -> None:
            if isinstance(why, TorControlError):
                silence.append(why)
            if not ended.called:
                ended.callback(None)

        tor.protocol.when_disconnected().addBoth(end)
        watch = _UploadWatch(
            self._reactor, tor.protocol, f"tor's control port {self._settings.control}", end
        )
        try:
            onion = await _firstOf(creating, ended, lambda: silence[0] if silence else lost)
        except TorControlError:
            creating.addErrback(lambda _: None)  # its own failure, if any, is no news now
            raise
        finally:
            watch.stop()
        if self._stopped:  # stopListening came while tor was answering
            await onion.remove()
            return
        keyFile = self._settings.onionKeyFile
        if keyFile is not None and self._privateKey is None:
            try:
                _writePrivate(keyFile, onion.private_key + "\n")
            except OSError:
                # Its key lost, the service would have another address at the next start;
                # a retry would add another service beside it. Taken back (a tor gone has
                # taken it already); tried again.
                with contextlib.suppress(Exception):
                    await onion.remove()
                raise
        self._privateKey = self._privateKey or onion.private_key
        self.onion = onion
        self._lastError = None
        self._refused = False
        tor.protocol.when_disconnected().addBoth(self._torGone)
        self._log.info(
            "onion service {onion}:{port} published for 127.0.0.1:{local}",
            onion=onion.hostname,
            port=self._publicPort,
            local=localPort,
        )
        self._setNotReady(None)

    def waitForTor(self, error: TorControlError) -> None:
        """
        tor did not answer at start: stay up unpublished, say so once, and keep trying
        with the republish delays.
        """
        self._lastError = reasonText(error)
        self._log.warn(
            "onion service for tor://:{port} not published yet: {error}; listening on the "
            "other addresses meanwhile, and publishing it as soon as tor answers",
            port=self._publicPort,
            error=self._lastError,
        )
        self._setNotReady(self._lastError)
        self._again()

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
        self._setNotReady(f"lost tor's control port {self._settings.control}")
        self._again()

    def _again(self) -> None:
        delay = REPUBLISH_DELAYS[min(self._failures, len(REPUBLISH_DELAYS) - 1)]
        self._retry = self._reactor.callLater(delay, self._republish)

    def _republish(self) -> None:
        self._retry = None
        defer.Deferred.fromCoroutine(self.publish()).addErrback(self._failed)

    def _failed(self, reason: Any) -> None:
        """A publish failed: say so (once per cause) and try again."""
        if self._stopped:
            return
        self._failures += 1
        self._refused = not isinstance(reason.value, TorControlError)
        error = reasonText(reason.value)
        if error != self._lastError:  # one line per cause, not one per attempt
            self._lastError = error
            self._log.warn(
                "cannot publish the onion service yet ({error}); trying again",
                error=error,
            )
        if error != self.notReadyBecause:  # after UPLOAD_WAIT, even for a cause logged
            self._setNotReady(error)
        self._again()

    def stillPublishing(self, publishing: defer.Deferred[None]) -> None:
        """
        C{listen} stopped waiting for the first publish (L{FIRST_UPLOAD_PATIENCE}): the
        port is up unpublished, L{notReadyBecause} says what it waits for, and the publish
        goes on; should it fail, it is retried as after any other failure. (tor answered
        by then, or the attempt gave up on it: L{CONTROL_ANSWER_PATIENCE} is shorter.)
        """
        publishing.addErrback(self._failed)

    def getHost(self) -> OnionAddress:
        """The C{.onion} name and public port; no name until first published."""
        return OnionAddress(self.onion.hostname if self.onion else None, self._publicPort)

    def getLocalHost(self) -> IAddress:
        """The loopback address tor forwards the onion service to."""
        return self._local.getHost()

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
            if self._control is not None:
                self._control.hangUp()
            await defer.maybeDeferred(self._local.stopListening)


@implementer(IStreamServerEndpoint)
class OnionServerEndpoint:
    """
    Listen on a loopback port and publish it as a v3 onion service on C{publicPort}.

    C{listen} fires once tor has uploaded the first descriptor, so a server that reports
    itself listening can be reached. If tor's control port does not answer then
    (L{TorControlError}), it fires with the port unpublished (its C{notReadyBecause} says
    why) and L{_OnionPort} publishes it once tor answers, as it does after later losses:
    groundcontrol's other listeners should not wait for tor. So does a tor that has not
    uploaded within L{FIRST_UPLOAD_PATIENCE} (still bootstrapping, or offline): the
    publishing goes on. Anything else (an unreadable key file, tor refusing the service)
    fails it: that needs an administrator.
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
        publishing = defer.Deferred.fromCoroutine(port.publish())
        patience = task.deferLater(self._reactor, FIRST_UPLOAD_PATIENCE, lambda: None)
        try:
            await _firstOf(publishing, patience, _StillPublishingError)
        except TorControlError as e:
            port.waitForTor(e)
        except _StillPublishingError:
            port.stillPublishing(publishing)
        except BaseException:
            await defer.maybeDeferred(local.stopListening)
            raise
        finally:
            patience.cancel()
        return port


def _writePrivate(path: Path, text: str) -> None:
    """
    Store the onion service's key (0600) through the one state-file writer: a full disk
    leaves no key and no C{.tmp} beside it, and a power cut leaves the key whole or absent.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    writeAtomically(path, text.encode(), mode=0o600)


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
