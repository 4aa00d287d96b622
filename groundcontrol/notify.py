"""Telling people about fleet events: a structured log line always, a webhook when configured.

New pending devices, approvals, re-key requests, revocations and lapsed leases are decisions
a human may need to take or audit, so they are pushed out as they happen. Notification is a
side effect of those actions and must never undo or delay them: L{INotifier.notify} returns
at once and never raises, and a slow or dead webhook costs bounded memory and nothing else.
"""

from __future__ import annotations

import json
import random as _random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import Interface, implementer

from accesstunnel.reasontext import reasonText
from accesstunnel.timetext import isoTime
from groundcontrol.documents import auditEventJSON

__all__ = [
    "DEVICE_APPROVED",
    "DEVICE_LEASE_ENDED",
    "DEVICE_PENDING",
    "DEVICE_REKEY_REQUESTED",
    "DEVICE_REVOKED",
    "STOP_DELIVERY_WAIT",
    "USER_AGENT",
    "FleetEvent",
    "HTTPPoster",
    "INotifier",
    "LogNotifier",
    "MultiNotifier",
    "Notifier",
    "NotifierService",
    "WebhookNotifier",
    "makeNotifier",
]

#: Event names. A webhook receiver switches on these, so once shipped they do not change.
DEVICE_PENDING = "device.pending"
DEVICE_REKEY_REQUESTED = "device.rekey-requested"
DEVICE_APPROVED = "device.approved"
DEVICE_REVOKED = "device.revoked"
DEVICE_LEASE_ENDED = "device.lease-ended"

USER_AGENT = "access-tunnel-groundcontrol"

#: Seconds a stopping groundcontrol goes on delivering queued notifications (a few: a
#: systemd stop waits for it, and a receiver that hangs must not hold a restart for long).
STOP_DELIVERY_WAIT = 5.0


def _frozenDetail(detail: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy, so an event cannot change while it waits in a retry queue."""
    return MappingProxyType(dict(detail or {}))


@frozen
class FleetEvent:
    """
    Something happened to a device that someone should hear about.

    @ivar event: what happened, one of the C{DEVICE_*} names (or a newer one).
    @ivar device: the device name (for a pending device, the name it asked for).
    @ivar actor: who did it: an account name, C{"token"}, C{"claim"}, C{"system"} for
        automatic actions such as a lease ending, or C{None} when the device itself did.
    @ivar at: when, in seconds since the epoch (from the injected clock).
    @ivar detail: event-specific facts (key fingerprint, serial, source address, ...); values
        should be JSON-serialisable, anything else is sent as its C{str}.
    @ivar id: the audit event's id, when it came from the audit log (the fleet watcher's
        events do), so that a receiver can tell a repeated delivery from a new event.
    """

    event: str
    device: str
    actor: str | None
    at: float
    detail: Mapping[str, Any] = field(factory=dict, converter=_frozenDetail, hash=False)
    id: int | None = None

    def toJSON(self) -> dict[str, Any]:
        """
        The webhook payload: the audit event's document (L{auditEventJSON}: C{at} as ISO
        8601 with a C{Z}, the detail's keys in snake_case and its instants as ISO), in the
        vocabulary of the CLI's and the control shell's JSON.
        """
        return auditEventJSON(self.id, self.event, self.device, self.actor, self.at, self.detail)


class INotifier(Interface):
    """Somewhere fleet events go."""

    def notify(event: FleetEvent) -> None:  # noqa: N805 - zope.interface style
        """
        Pass C{event} on, eventually. Returns at once; never raises, whatever goes wrong,
        because the caller is in the middle of approving or revoking a device.
        """


class Notifier(TypingProtocol):
    """L{INotifier} for type checkers, which do not read zope.interface declarations."""

    def notify(self, event: FleetEvent) -> None: ...


def _printable(text: str | None) -> str | None:
    """Device-controlled text for a log line, with control characters replaced."""
    if text is None:
        return None
    return "".join(c if c.isprintable() else "?" for c in text)


@implementer(INotifier)
class LogNotifier:
    """Every fleet event as a structured log event, so it is recorded even with no webhook."""

    log = Logger()

    def notify(self, event: FleetEvent) -> None:
        try:
            document = event.toJSON()
            self.log.info(
                "fleet event {event} for {device}",
                event=_printable(event.event),
                device=_printable(event.device),
                actor=_printable(event.actor),
                at=document["at"],
                detail=document["detail"],
            )
        except Exception:
            # A broken log observer must not break an approval; there is nowhere left to
            # report this but the log itself, which may work for other observers.
            self.log.failure("could not log a fleet event")


@implementer(INotifier)
class MultiNotifier:
    """Tells several notifiers; one that fails does not stop the others."""

    log = Logger()

    def __init__(self, notifiers: Iterable[Notifier]) -> None:
        self.notifiers = tuple(notifiers)
        self._handOvers: list[Deferred[None]] = []

    def notify(self, event: FleetEvent) -> None:
        for notifier in self.notifiers:
            try:
                notifier.notify(event)
            except Exception:
                self.log.failure("notifier {notifier!r} failed", notifier=notifier)

    def handOverAtStop(self) -> Deferred[None]:
        """
        For a source that notifies what it holds when groundcontrol stops, and may take a
        moment to (the fleet watcher reads its held requests' serials): it fires the
        Deferred returned once it has. A L{drain} begun before then waits for it, within its
        bound, before it calls a webhook idle and stops it; what comes after the bound is
        refused and named (C{webhook stopped; not sending ...}).
        """
        handOver: Deferred[None] = Deferred()
        self._handOvers.append(handOver)
        return handOver

    def unfinishedIds(self) -> list[int]:
        """The audit ids of the events its webhooks have not delivered or given up yet."""
        return [
            eventId
            for notifier in self.notifiers
            if isinstance(notifier, WebhookNotifier)
            for eventId in notifier.unfinishedIds()
        ]

    def drain(self, within: float) -> Deferred[Any]:
        """
        Let each notifier that queues (L{WebhookNotifier.drain}) deliver what it holds, and
        what the hand-overs (L{handOverAtStop}) bring, for at most C{within} seconds; fires
        when all of them have finished.
        """
        handOvers, self._handOvers = self._handOvers, []
        drains = [
            n.drain(within, after=gatherResults(handOvers, consumeErrors=True))
            for n in self.notifiers
            if isinstance(n, WebhookNotifier)
        ]
        return gatherResults(drains, consumeErrors=True)


class NotifierService(Service):
    """
    Delivers the queued notifications when groundcontrol stops, for at most
    L{STOP_DELIVERY_WAIT} seconds: without it a SIGTERM lost every event still queued or
    waiting to retry, and nothing said which. twistd waits for the Deferred C{stopService}
    returns before it stops the reactor. Its parent must stop it after the fleet watcher,
    whose stop hands over the notifications it holds: MultiService stops its children in
    reverse order, so it is added before the watcher.
    """

    def __init__(self, notifier: MultiNotifier, within: float = STOP_DELIVERY_WAIT) -> None:
        self.notifier = notifier
        self.within = within

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.notifier.drain(self.within)


class HTTPPoster(TypingProtocol):
    """The part of L{treq.client.HTTPClient} (and L{treq.testing.StubTreq}) used here."""

    def post(
        self,
        url: str,
        /,
        *,
        data: bytes,
        headers: Headers,
        allow_redirects: bool,
        unbuffered: bool,
    ) -> Deferred[Any]: ...


class _Discard(Protocol):
    """
    Reads a response body and throws it away: a webhook's answer is never buffered, however
    long. Cancelling L{done} (the attempt timed out) aborts the connection.
    """

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Whatever ended the body (done, truncated, aborted), the status line was the answer.
        if not self.done.called:
            self.done.callback(None)


def _origin(url: str) -> str:
    """The URL without path, query or credentials: webhook URLs often embed a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


@implementer(INotifier)
class WebhookNotifier:
    """
    POSTs each fleet event as JSON to a URL, retrying with jittered exponential backoff.

    A webhook receiver (chat bridge, ticketing, on-call tool) may be briefly down, so
    connection errors, timeouts and non-2xx answers are retried, up to C{maxAttempts} in all
    for an event, then the event is given up with an error log (the log notifier still has
    it). Redirects are not followed: a 3xx is a misconfigured URL, reported like any failure.

    Memory is bounded: at most C{concurrency} events are in delivery and at most
    C{maxPending} wait; when the queue is full the oldest waiting event is dropped with a
    warning, since under a flood the newest events are the most useful. Order is not kept.

    At shutdown L{drain} goes on delivering for a bounded time, then L{stop} logs one line
    for each event not delivered: the audit row stays, the line says which were not sent.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        httpClient: HTTPPoster,
        maxAttempts: int = 8,
        initialDelay: float = 1.0,
        maxDelay: float = 300.0,
        timeout: float = 10.0,
        maxPending: int = 1000,
        concurrency: int = 4,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """
        @param url: an C{http://} or C{https://} URL; anything else is a configuration error
            raised here, at start-up, rather than on the first event.
        @param httpClient: a L{treq.client.HTTPClient} (see L{makeNotifier}) or a test double.
        @param timeout: seconds for one attempt, from sending the request to the end of the
            response; measured on C{clock}.
        @param random: returns a float in [0, 1); the jitter source, injectable for tests.
        @raise ValueError: for a bad URL or a non-positive limit.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL must be http:// or https://, got {_origin(url)!r}")
        if maxAttempts < 1 or maxPending < 1 or concurrency < 1:
            raise ValueError("maxAttempts, maxPending and concurrency must be at least 1")
        self.url = url
        self.clock = clock
        self.httpClient = httpClient
        self.maxAttempts = maxAttempts
        self.initialDelay = initialDelay
        self.maxDelay = maxDelay
        self.timeout = timeout
        self.maxPending = maxPending
        self.concurrency = concurrency
        self.random = random
        self._origin = _origin(url)
        self._pending: deque[FleetEvent] = deque()
        #: The events the workers are delivering (attempting or waiting to retry).
        self._delivering: list[FleetEvent] = []
        self._active = 0
        self._inFlight: set[Deferred[Any]] = set()
        self._idleWaiters: list[Deferred[None]] = []
        self._stopped = False
        #: When a L{drain} stops it at the latest (on the clock), once one has begun.
        self._stopsAt: float | None = None
        #: The retries waited for: each timer's event, when it is due, the failed attempt.
        self._retries: dict[Deferred[None], _Retry] = {}

    # -- INotifier --------------------------------------------------------------------------

    def notify(self, event: FleetEvent) -> None:
        try:
            if self._stopped:
                self.log.warn(
                    "webhook stopped; not sending fleet event {event} for {device}",
                    event=event.event,
                    device=_printable(event.device),
                )
                return
            if len(self._pending) >= self.maxPending:
                dropped = self._pending.popleft()
                self.log.warn(
                    "webhook queue full ({limit} events waiting); dropped fleet event "
                    "{event} for {device} at {at}",
                    limit=self.maxPending,
                    event=dropped.event,
                    device=_printable(dropped.device),
                    at=isoTime(dropped.at),
                )
            self._pending.append(event)
            while self._active < self.concurrency and self._pending:
                self._active += 1
                Deferred.fromCoroutine(self._work()).addErrback(
                    lambda f: self.log.failure("webhook worker failed", f)
                )
        except Exception:
            self.log.failure("could not queue a fleet event for the webhook")

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events waiting for a worker (not counting those being delivered)."""
        return len(self._pending)

    def unfinishedIds(self) -> list[int]:
        """
        The audit ids of the events queued or being delivered (attempting, or waiting to
        retry): what a crash now would leave unsent (L{groundcontrol.fleetturn}).
        """
        return [e.id for e in (*self._delivering, *self._pending) if e.id is not None]

    def whenIdle(self) -> Deferred[None]:
        """Fires once every queued event has been delivered or given up."""
        if not self._active and not self._pending:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idleWaiters.append(waiter)
        return waiter

    def drain(self, within: float, after: Deferred[Any] | None = None) -> Deferred[None]:
        """
        Deliver what is queued, and what is notified meanwhile, for at most C{within} seconds
        on the clock (groundcontrol's stop waits for it), then L{stop}. A receiver that hangs
        costs the bound, not the attempt's timeout or the retries' backoff; an event whose
        retry would fall after the bound (waiting for it when the drain begins, or failing
        meanwhile) is given up at once, and named.
        Fires when every event was delivered or given up, once C{after} (what is handed
        over at the stop, L{MultiNotifier.handOverAtStop}) has fired, or when the bound's
        L{stop} has finished, whichever comes first.
        """
        if self._stopped:
            return self.stop()
        self._stopsAt = self.clock.seconds() + within
        for timer, retry in list(self._retries.items()):
            if retry.due >= self._stopsAt:
                # Waiting would only hold the stop until its bound cancels the retry.
                self._notRetriedBeforeStop(retry)
                timer.cancel()
        finished: Deferred[None] = Deferred()

        def finish(result: object = None) -> None:
            if bound.active():
                bound.cancel()
            self._stopped = True  # anything notified after this would outlive the reactor
            if not finished.called:
                finished.callback(None)

        bound = self.clock.callLater(within, lambda: self.stop().addBoth(finish))
        handedOver = after if after is not None else succeed(None)
        handedOver.addBoth(lambda _: self.whenIdle()).addCallback(finish)
        return finished

    def stop(self) -> Deferred[None]:
        """
        Stop sending: drop what waits, cancel requests and retry timers, so no timer outlives
        the service, and log each event not delivered, one line each (the audit log has them
        all). Fires when the workers have finished.
        """
        self._stopped = True
        for event in [*self._delivering, *self._pending]:
            self.log.warn(
                "webhook stopping: fleet event {event} for {device} at {at} not delivered "
                "to {webhook}",
                event=event.event,
                device=_printable(event.device),
                at=isoTime(event.at),
                webhook=self._origin,
            )
        self._delivering.clear()
        self._pending.clear()
        for d in list(self._inFlight):
            d.cancel()
        return self.whenIdle()

    # -- delivery ---------------------------------------------------------------------------

    def retryDelay(self, attempt: int) -> float:
        """
        Seconds to wait after failed attempt number C{attempt} (1-based): doubling from
        C{initialDelay}, capped at C{maxDelay}, randomised over the upper half of the interval
        so that retries after a receiver outage do not arrive in lockstep.
        """
        ceiling = min(self.initialDelay * 2 ** min(attempt - 1, 64), self.maxDelay)
        return ceiling * (0.5 + 0.5 * self.random())

    async def _work(self) -> None:
        try:
            while self._pending and not self._stopped:
                event = self._pending.popleft()
                self._delivering.append(event)
                try:
                    await self._deliver(event)
                finally:
                    if event in self._delivering:
                        self._delivering.remove(event)
        finally:
            self._active -= 1
            if not self._active and not self._pending:
                waiters, self._idleWaiters = self._idleWaiters, []
                for waiter in waiters:
                    waiter.callback(None)

    async def _deliver(self, event: FleetEvent) -> None:
        body = json.dumps(event.toJSON(), default=str, sort_keys=True).encode("utf-8")
        fields = {
            "event": event.event,
            "device": _printable(event.device),
            "webhook": self._origin,
            "maxAttempts": self.maxAttempts,
        }
        for attempt in range(1, self.maxAttempts + 1):
            failure = await self._attempt(body)
            if failure is None:
                self.log.debug(
                    "webhook delivered fleet event {event} for {device} to {webhook} "
                    "(attempt {attempt})",
                    attempt=attempt,
                    **fields,
                )
                return
            if self._stopped:
                return
            if attempt == self.maxAttempts:
                self.log.error(
                    "webhook gave up on fleet event {event} for {device} after {maxAttempts} "
                    "attempts to {webhook}: {reason}",
                    reason=failure,
                    **fields,
                )
                return
            delay = self.retryDelay(attempt)
            retry = _Retry(event, self.clock.seconds() + delay, attempt, failure)
            if self._stopsAt is not None and retry.due >= self._stopsAt:
                # Waiting would only hold the stop until its bound cancels the retry.
                self._notRetriedBeforeStop(retry)
                return
            self.log.warn(
                "webhook attempt {attempt}/{maxAttempts} for fleet event {event} for "
                "{device} to {webhook} failed ({reason}); retrying in {delay:.1f}s",
                attempt=attempt,
                reason=failure,
                delay=delay,
                **fields,
            )
            if not await self._sleep(delay, retry):
                return

    async def _sleep(self, delay: float, retry: _Retry) -> bool:
        """
        Wait C{delay} on the clock, until C{retry} is due; False if L{stop} interrupted the
        wait, or a L{drain} that ends before it is due.
        """
        timer: Deferred[None] = deferLater(self.clock, delay)
        self._inFlight.add(timer)
        self._retries[timer] = retry
        try:
            await timer
        except CancelledError:
            return False
        finally:
            self._inFlight.discard(timer)
            del self._retries[timer]
        return True

    def _notRetriedBeforeStop(self, retry: _Retry) -> None:
        """One line for an event not delivered because its retry would come after the stop."""
        assert self._stopsAt is not None
        now = self.clock.seconds()
        self.log.warn(
            "webhook stopping: fleet event {event} for {device} at {at} not delivered to "
            "{webhook}: attempt {attempt}/{maxAttempts} failed ({reason}), and groundcontrol "
            "stops within {left:.1f}s, before a retry would be due (in {delay:.1f}s)",
            event=retry.event.event,
            device=_printable(retry.event.device),
            at=isoTime(retry.event.at),
            webhook=self._origin,
            attempt=retry.attempt,
            maxAttempts=self.maxAttempts,
            reason=retry.failure,
            left=max(0.0, self._stopsAt - now),
            delay=retry.due - now,
        )

    async def _attempt(self, body: bytes) -> str | None:
        """One POST; C{None} on a 2xx answer, otherwise why it failed, for the log."""
        try:
            exchange = Deferred.fromCoroutine(self._exchange(body))
        except Exception as e:
            return _describe(e)
        # The timeout cancels the request: treq's agent then fails with its own wrapper of
        # the CancelledError (ResponseNeverReceived), which the default conversion to
        # TimeoutError does not recognise; any result of a timed-out attempt is a timeout.
        exchange.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timedOut)
        self._inFlight.add(exchange)
        try:
            code = await exchange
        except TimeoutError:
            return f"no complete answer within {self.timeout}s"
        except CancelledError:
            return "cancelled"
        except Exception as e:
            return _describe(e)
        finally:
            self._inFlight.discard(exchange)
        if 200 <= code < 300:
            return None
        return f"HTTP {code}"

    async def _exchange(self, body: bytes) -> int:
        """Send the request, read the answer to its end (so the connection can be reused)."""
        response = await self.httpClient.post(
            self.url,
            data=body,
            headers=Headers(
                {
                    b"Content-Type": [b"application/json"],
                    b"User-Agent": [USER_AGENT.encode("ascii")],
                }
            ),
            allow_redirects=False,
            unbuffered=True,
        )
        discard = _Discard()
        response.deliverBody(discard)
        await discard.done
        return int(response.code)


@frozen
class _Retry:
    """A retry waited for: of C{event}, due on the clock at C{due}, after C{attempt} failed."""

    event: FleetEvent
    due: float
    attempt: int
    failure: str


def _timedOut(result: object, timeout: float) -> None:
    """C{Deferred.addTimeout}'s C{onTimeoutCancel}: the attempt timed out, whatever it raised."""
    raise TimeoutError(f"no complete answer within {timeout}s")


def _describe(error: BaseException) -> str:
    """A one-line reason for a failed request; treq wraps the interesting part."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    # Without Twisted's closing period: the retry line goes on after it ("...refused);
    # retrying in 1.0s", not "...refused.); retrying").
    name, text = type(error).__name__, reasonText(error)
    return name if text == name else f"{name}: {text}"


def makeNotifier(
    reactor: Any, webhookURL: str | None = None, **webhookOptions: Any
) -> MultiNotifier:
    """
    The notifier groundcontrol runs with: the log always, plus a webhook if a URL is given.

    @param reactor: provides C{IReactorTime} and C{IReactorTCP}/C{IReactorSSL}; used as the
        webhook's clock and by its HTTP agent (which verifies https certificates against the
        system trust roots).
    @param webhookOptions: passed to L{WebhookNotifier}.
    """
    notifiers: list[Notifier] = [LogNotifier()]
    if webhookURL:
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        from groundcontrol.webhookpool import WebhookConnectionPool

        pool = WebhookConnectionPool(reactor, webhookOptions.get("concurrency", 4))
        agent: Any = Agent(reactor, pool=pool)  # an IAgent; mypy cannot see zope declarations
        client = HTTPClient(agent)
        notifiers.append(WebhookNotifier(webhookURL, reactor, client, **webhookOptions))
    return MultiNotifier(notifiers)
