"""Tests for groundcontrol.notify: fleet events to the log and to a webhook, with retries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from groundcontrol.datadir import DataDir
from groundcontrol.fleetwatch import STOP_SERIAL_READ_WAIT, FleetWatcher
from groundcontrol.notify import (
    DEVICE_APPROVED,
    DEVICE_PENDING,
    STOP_DELIVERY_WAIT,
    USER_AGENT,
    FleetEvent,
    INotifier,
    LogNotifier,
    MultiNotifier,
    NotifierService,
    WebhookNotifier,
    makeNotifier,
)
from groundcontrol.tap import Options, buildService

T0 = 1_700_000_000.0
URL = "https://hooks.example.test/T0KEN-s3cret/fleet"


def anEvent(device: str = "kiln7", n: int = 0) -> FleetEvent:
    """A pending-device event, distinguishable by C{n}."""
    return FleetEvent(
        event=DEVICE_PENDING,
        device=device,
        actor=None,
        at=T0 + n,
        detail={"fingerprint": "SHA256:abc", "n": n},
    )


def captureLogs(testCase: SynchronousTestCase, owner: Any) -> list[LogEvent]:
    """Route C{owner.log} (an instance's class-level Logger) into a list for this test."""
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observer(event: LogEvent) -> None:
        events.append(event)

    owner.log = Logger(namespace="test", source=owner, observer=observer)
    return events


class Recorder(Resource):
    """A webhook receiver that answers with the next status in C{codes} (then 200)."""

    isLeaf = True

    def __init__(self, codes: list[int] | None = None) -> None:
        super().__init__()
        self.codes = list(codes or [])
        self.requests: list[tuple[bytes, Headers, bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.requests.append((request.uri, request.requestHeaders, request.content.read()))
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        return b"ok"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON documents received, in order."""
        return [json.loads(body) for _, _, body in self.requests]


class FakeResponse:
    """Just enough of an IResponse: a code and an empty body."""

    def __init__(self, code: int) -> None:
        self.code = code

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(None)  # type: ignore[arg-type]
        protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    """An HTTP client whose requests the test answers one by one."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, Deferred[Any]]] = []
        self.cancelled: list[int] = []

    def post(self, url: str, /, **kwargs: Any) -> Deferred[Any]:
        index = len(self.requests)
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(index))
        self.requests.append((url, kwargs["data"], d))
        return d

    def answer(self, index: int, code: int = 200) -> None:
        """Answer request C{index} with C{code}."""
        self.requests[index][2].callback(FakeResponse(code))

    def fail(self, index: int, error: Exception) -> None:
        """Fail request C{index} as a connection error would."""
        self.requests[index][2].errback(error)


class FleetEventTests(SynchronousTestCase):
    """The event value."""

    def test_json(self) -> None:
        """The webhook document has the fields, the time in ISO 8601 with a Z, and the detail."""
        event = FleetEvent(DEVICE_APPROVED, "kiln7", "alice", T0, {"by": "token"})
        self.assertEqual(
            event.toJSON(),
            {
                "id": None,
                "event": "device.approved",
                "device": "kiln7",
                "actor": "alice",
                "at": "2023-11-14T22:13:20Z",
                "detail": {"by": "token"},
            },
        )

    def test_detailInTheVocabulary(self) -> None:
        """
        The detail as audit rows keep it (camelCase keys, epoch times, as every row written
        so far) is sent with snake_case keys and ISO Z times: a claim's lease end is
        C{lease_until}, as in the device document; a renewal's previous end is named.
        """
        claimed = FleetEvent(
            "device.claimed",
            "kiln7",
            "bob",
            T0,
            {"owner": "bob", "leaseUntil": T0 + 3600, "fingerprint": "SHA256:abc", "kind": "new"},
        )
        renewed = FleetEvent(
            "claim.renewed", "kiln7", "bob", T0, {"leaseUntil": T0 + 7200, "was": T0 + 3600}
        )
        revoked = FleetEvent(
            "device.revoked", "kiln7", "alice", T0, {"revokedCertificates": ["0a1b"]}
        )
        self.assertEqual(
            claimed.toJSON()["detail"],
            {
                "owner": "bob",
                "lease_until": "2023-11-14T23:13:20Z",
                "fingerprint": "SHA256:abc",
                "kind": "new",
            },
        )
        self.assertEqual(
            renewed.toJSON()["detail"],
            {"lease_until": "2023-11-15T00:13:20Z", "previous_lease_until": "2023-11-14T23:13:20Z"},
        )
        self.assertEqual(revoked.toJSON()["detail"], {"revoked_certificates": ["0a1b"]})

    def test_detailIsACopy(self) -> None:
        """Changing the dict an event was built from does not change the queued event."""
        detail = {"n": 1}
        event = FleetEvent(DEVICE_PENDING, "kiln7", None, T0, detail)
        detail["n"] = 2
        self.assertEqual(event.detail["n"], 1)
        with self.assertRaises(TypeError):
            event.detail["n"] = 3  # type: ignore[index]


class LogNotifierTests(SynchronousTestCase):
    """Every event is logged as a structured event."""

    def test_structuredEvent(self) -> None:
        """The log event carries event, device, actor and detail as fields."""
        notifier = LogNotifier()
        logged = captureLogs(self, notifier)
        self.assertTrue(verifyObject(INotifier, notifier))
        notifier.notify(
            FleetEvent(DEVICE_APPROVED, "kiln7", "alice", T0, {"k": "v", "expiresAt": T0})
        )
        [entry] = logged
        self.assertEqual(entry["log_level"], LogLevel.info)
        self.assertEqual(entry["event"], "device.approved")
        self.assertEqual(entry["device"], "kiln7")
        self.assertEqual(entry["actor"], "alice")
        self.assertEqual(entry["at"], "2023-11-14T22:13:20Z")
        self.assertEqual(entry["detail"], {"k": "v", "expires_at": "2023-11-14T22:13:20Z"})
        self.assertEqual(formatEvent(entry), "fleet event device.approved for kiln7")

    def test_controlCharactersStripped(self) -> None:
        """A name a device asked for cannot forge log lines or move a terminal cursor."""
        notifier = LogNotifier()
        logged = captureLogs(self, notifier)
        notifier.notify(anEvent(device="evil\nfleet event device.approved for x\x1b[2J"))
        text = formatEvent(logged[0])
        self.assertNotIn("\n", text)
        self.assertNotIn("\x1b", text)


class MultiNotifierTests(SynchronousTestCase):
    """Fan-out."""

    def test_failingNotifierDoesNotStopOthers(self) -> None:
        """A notifier that raises is logged and skipped; the next still hears, nothing raises."""

        @implementer(INotifier)
        class Broken:
            def notify(self, event: FleetEvent) -> None:
                raise RuntimeError("boom")

        @implementer(INotifier)
        class Recording:
            def __init__(self) -> None:
                self.events: list[FleetEvent] = []

            def notify(self, event: FleetEvent) -> None:
                self.events.append(event)

        recording = Recording()
        multi = MultiNotifier([Broken(), recording])
        logged = captureLogs(self, multi)
        event = anEvent()
        multi.notify(event)
        self.assertEqual(recording.events, [event])
        self.assertEqual(len(logged), 1)
        self.assertIsInstance(logged[0]["log_failure"].value, RuntimeError)


class WebhookTestCase(SynchronousTestCase):
    """A webhook notifier on a fake clock with deterministic jitter (always the maximum)."""

    def webhook(self, client: Any, **kwargs: Any) -> WebhookNotifier:
        """A notifier posting to L{URL} through C{client}, logs captured in C{self.logged}."""
        self.clock = Clock()
        options: dict[str, Any] = {"random": lambda: 1.0}
        options.update(kwargs)
        clock: Any = self.clock  # an IReactorTime; mypy cannot read zope declarations
        notifier = WebhookNotifier(URL, clock, client, **options)
        self.logged = captureLogs(self, notifier)
        return notifier

    def messages(self, level: LogLevel) -> list[str]:
        """The formatted log lines at C{level}."""
        return [formatEvent(e) for e in self.logged if e["log_level"] == level]


class WebhookDeliveryTests(WebhookTestCase):
    """What is sent, and retries."""

    def test_postsJSON(self) -> None:
        """One event is one POST of the event as JSON with the content type and user agent."""
        receiver = Recorder()
        notifier = self.webhook(StubTreq(receiver))
        self.assertTrue(verifyObject(INotifier, notifier))
        notifier.notify(anEvent())
        self.successResultOf(notifier.whenIdle())
        [(uri, headers, body)] = receiver.requests
        self.assertEqual(uri, b"/T0KEN-s3cret/fleet")
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"user-agent"), [USER_AGENT.encode()])
        self.assertEqual(json.loads(body), anEvent().toJSON())

    def test_retryOn500ThenSuccess(self) -> None:
        """A 500 is retried after the backoff delay, not before; the retry's 200 ends it."""
        receiver = Recorder([500])
        notifier = self.webhook(StubTreq(receiver), initialDelay=2.0)
        notifier.notify(anEvent())
        self.assertEqual(len(receiver.requests), 1)
        self.clock.advance(1.9)
        self.assertEqual(len(receiver.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(receiver.requests), 2)
        self.successResultOf(notifier.whenIdle())
        self.assertEqual(receiver.bodies[0], receiver.bodies[1])
        [warning] = self.messages(LogLevel.warn)
        self.assertIn("HTTP 500", warning)
        self.assertEqual(self.messages(LogLevel.error), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retryOnConnectionRefused(self) -> None:
        """
        A refused connection is retried, and the retry that gets through ends it. The
        warning reads '(...: Connection refused); retrying', without Twisted's closing
        period before the ')'.
        """
        client = FakeClient()
        notifier = self.webhook(client)
        notifier.notify(anEvent())
        client.fail(0, ConnectionRefusedError(111, "Connection refused"))
        self.assertNoResult(notifier.whenIdle())
        self.clock.advance(1.0)
        client.answer(1, 204)
        self.successResultOf(notifier.whenIdle())
        self.assertEqual(len(client.requests), 2)
        self.assertIn(
            "to https://hooks.example.test failed (ConnectionRefusedError: Connection was "
            "refused by other side: 111: Connection refused); retrying in 1.0s",
            self.messages(LogLevel.warn)[0],
        )

    def test_timeoutIsRetried(self) -> None:
        """A receiver that never answers is given up on after C{timeout} and retried."""
        client = FakeClient()
        notifier = self.webhook(client, timeout=10.0)
        notifier.notify(anEvent())
        self.clock.advance(9.9)
        self.assertEqual(len(client.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(client.cancelled, [0])
        self.assertIn("no complete answer within 10.0s", self.messages(LogLevel.warn)[0])
        self.clock.advance(1.0)
        self.assertEqual(len(client.requests), 2)

    def test_timeoutReportedWhateverTheClientRaises(self) -> None:
        """
        treq's agent fails a request the timeout cancels with its own wrapper of the
        CancelledError (ResponseNeverReceived): the attempt is still reported as timed out,
        not as C{CancelledError}.
        """

        class WrappingClient(FakeClient):
            def post(self, url: str, /, **kwargs: Any) -> Deferred[Any]:
                def wrapped(d: Deferred[Any]) -> None:
                    d.errback(ResponseNeverReceived([Failure(CancelledError())]))

                d: Deferred[Any] = Deferred(wrapped)
                self.requests.append((url, kwargs["data"], d))
                return d

        client = WrappingClient()
        notifier = self.webhook(client, timeout=10.0)
        notifier.notify(anEvent())
        self.clock.advance(10.0)
        (line,) = self.messages(LogLevel.warn)
        self.assertIn("failed (no complete answer within 10.0s); retrying", line)

    def test_givesUpAfterMaxAttempts(self) -> None:
        """After C{maxAttempts} failures the event is dropped with one error log line."""
        receiver = Recorder([503] * 10)
        notifier = self.webhook(StubTreq(receiver), maxAttempts=4, initialDelay=1.0)
        notifier.notify(anEvent())
        self.clock.pump([1.0, 2.0, 4.0, 8.0, 16.0])
        self.successResultOf(notifier.whenIdle())
        self.assertEqual(len(receiver.requests), 4)
        self.assertEqual(len(self.messages(LogLevel.warn)), 3)
        [error] = self.messages(LogLevel.error)
        self.assertIn("gave up on fleet event device.pending for kiln7 after 4 attempts", error)
        self.assertIn("HTTP 503", error)

    def test_secretPathNotLogged(self) -> None:
        """Webhook URLs often embed a token: logs name only the scheme and host."""
        receiver = Recorder([500])
        notifier = self.webhook(StubTreq(receiver), maxAttempts=1)
        notifier.notify(anEvent())
        [error] = self.messages(LogLevel.error)
        self.assertIn("https://hooks.example.test", error)
        self.assertNotIn("s3cret", error)
        self.assertNotIn("s3cret", repr(self.logged))

    def test_redirectIsAFailure(self) -> None:
        """A redirect is not followed (the URL is wrong); it is reported like any failure."""
        receiver = Recorder([302])
        notifier = self.webhook(StubTreq(receiver), maxAttempts=1)
        notifier.notify(anEvent())
        self.assertEqual(len(receiver.requests), 1)
        self.assertIn("HTTP 302", self.messages(LogLevel.error)[0])

    def test_synchronousClientErrorDoesNotRaise(self) -> None:
        """Even a client that raises instead of failing its Deferred cannot break C{notify}."""

        class Raising:
            def post(self, url: str, /, **kwargs: Any) -> Deferred[Any]:
                raise ValueError("bad request object")

        notifier = self.webhook(Raising(), maxAttempts=2)
        notifier.notify(anEvent())
        self.clock.advance(1.0)
        self.successResultOf(notifier.whenIdle())
        self.assertIn("ValueError: bad request object", self.messages(LogLevel.error)[0])

    def test_badURLRefusedAtConstruction(self) -> None:
        """A URL that is not http(s) is a configuration error at start-up, not at first use."""
        for url in ("ftp://example.test/", "example.test/hook", "https:///nohost"):
            self.assertRaises(ValueError, WebhookNotifier, url, Clock(), FakeClient())


class WebhookBackoffTests(WebhookTestCase):
    """The retry schedule."""

    def test_exponentialCappedJittered(self) -> None:
        """Delays double from C{initialDelay}, stop at C{maxDelay}, and vary over the upper half."""
        notifier = self.webhook(FakeClient(), initialDelay=1.0, maxDelay=300.0)
        self.assertEqual([notifier.retryDelay(n) for n in range(1, 11)][:4], [1.0, 2.0, 4.0, 8.0])
        self.assertEqual(notifier.retryDelay(10), 300.0)
        self.assertEqual(notifier.retryDelay(1000), 300.0)
        notifier.random = lambda: 0.0
        self.assertEqual(notifier.retryDelay(3), 2.0)
        self.assertEqual(notifier.retryDelay(1000), 150.0)


class WebhookQueueTests(WebhookTestCase):
    """Memory stays bounded when the receiver is dead or slow."""

    def test_queueBoundDropsOldest(self) -> None:
        """
        With one delivery in flight and room for three waiting, six events keep the in-flight
        one and the three newest; the two dropped are each logged.
        """
        client = FakeClient()
        notifier = self.webhook(client, concurrency=1, maxPending=3)
        for n in range(6):
            notifier.notify(anEvent(n=n))
        self.assertEqual(notifier.pending, 3)
        drops = self.messages(LogLevel.warn)
        self.assertEqual(len(drops), 2)
        self.assertIn("dropped fleet event device.pending for kiln7", drops[0])
        for index in range(4):
            client.answer(index)
        self.successResultOf(notifier.whenIdle())
        sent = [json.loads(body)["detail"]["n"] for _, body, _ in client.requests]
        self.assertEqual(sent, [0, 3, 4, 5])

    def test_concurrencyLimit(self) -> None:
        """No more than C{concurrency} requests are in flight at once."""
        client = FakeClient()
        notifier = self.webhook(client, concurrency=2)
        for n in range(5):
            notifier.notify(anEvent(n=n))
        self.assertEqual(len(client.requests), 2)
        client.answer(0)
        self.assertEqual(len(client.requests), 3)

    def test_stopCancelsEverything(self) -> None:
        """C{stop} drops waiting events and leaves no request or timer behind."""
        client = FakeClient()
        notifier = self.webhook(client, concurrency=2)
        for n in range(4):
            notifier.notify(anEvent(n=n))
        client.fail(0, ConnectionRefusedError())  # worker 1 is now waiting to retry
        self.successResultOf(notifier.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(notifier.pending, 0)
        self.assertEqual(client.cancelled, [1])
        notifier.notify(anEvent())
        self.assertEqual(len(client.requests), 2)


class WebhookDrainTests(WebhookTestCase):
    """At groundcontrol's stop: what is queued goes out for a bounded time, the rest is named."""

    def notLogged(self) -> list[str]:
        return [m for m in self.messages(LogLevel.warn) if "not delivered" in m]

    def test_deliversWhatIsQueued(self) -> None:
        """
        Every queued event, and one notified while draining, is posted before it fires;
        then it is stopped: a later event is not posted, no timer is left.
        """
        client = FakeClient()
        notifier = self.webhook(client, concurrency=1)
        notifier.notify(anEvent(n=0))
        notifier.notify(anEvent(n=1))
        drained = notifier.drain(5.0)
        notifier.notify(anEvent(n=2))
        for index in range(3):
            self.assertNoResult(drained)
            client.answer(index)
        self.successResultOf(drained)
        self.assertEqual([json.loads(r[1])["detail"]["n"] for r in client.requests], [0, 1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.notLogged(), [])
        notifier.notify(anEvent(n=3))
        self.assertEqual(len(client.requests), 3)

    def test_retriesWithinTheBound(self) -> None:
        """A refused attempt is retried while draining, if the retry falls within the bound."""
        client = FakeClient()
        notifier = self.webhook(client, initialDelay=1.0)
        notifier.notify(anEvent())
        drained = notifier.drain(5.0)
        client.fail(0, ConnectionRefusedError())
        self.clock.advance(1.0)
        client.answer(1)
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_boundedWhenTheReceiverHangs(self) -> None:
        """
        A receiver that never answers holds the stop for the bound, not the attempt's
        timeout: then the request is cancelled, and each event not delivered (the one being
        attempted, the one waiting) is logged, one line each, with its device.
        """
        client = FakeClient()
        notifier = self.webhook(client, concurrency=1, timeout=10.0)
        notifier.notify(anEvent("kiln7", n=0))
        notifier.notify(anEvent("oven2", n=1))
        drained = notifier.drain(3.0)
        self.clock.advance(2.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.successResultOf(drained)
        self.assertEqual(client.cancelled, [0])
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            self.notLogged(),
            [
                "webhook stopping: fleet event device.pending for kiln7 at "
                "2023-11-14T22:13:20Z not delivered to https://hooks.example.test",
                "webhook stopping: fleet event device.pending for oven2 at "
                "2023-11-14T22:13:21Z not delivered to https://hooks.example.test",
            ],
        )

    def test_waitingToRetryAtTheBound(self) -> None:
        """
        An attempt that fails while draining, when its retry would fall after the bound, is
        given up at once: one line names it as not delivered, says why and when the retry
        would have been (not 'retrying in 10.0s', which the stop would cut short), and the
        drain does not wait for the bound.
        """
        client = FakeClient()
        notifier = self.webhook(client, initialDelay=10.0)
        notifier.notify(anEvent())
        drained = notifier.drain(5.0)
        self.clock.advance(1.5)
        client.answer(0, 503)
        self.successResultOf(drained)
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(
            self.messages(LogLevel.warn),
            [
                "webhook stopping: fleet event device.pending for kiln7 at 2023-11-14T22:13:20Z "
                "not delivered to https://hooks.example.test: attempt 1/8 failed (HTTP 503), "
                "and groundcontrol stops within 3.5s, before a retry would be due (in 10.0s)"
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retryWaitedForPastTheBound(self) -> None:
        """
        An event waiting for a retry that falls after the bound when the drain begins is
        given up then, and named, with the attempt that failed and when the retry was due:
        the stop does not wait for the bound to cancel it.
        """
        client = FakeClient()
        notifier = self.webhook(client, initialDelay=10.0)
        notifier.notify(anEvent())
        client.answer(0, 503)
        self.clock.advance(2.0)
        drained = notifier.drain(5.0)
        self.successResultOf(drained)
        self.assertEqual(
            self.messages(LogLevel.warn)[1:],
            [
                "webhook stopping: fleet event device.pending for kiln7 at 2023-11-14T22:13:20Z "
                "not delivered to https://hooks.example.test: attempt 1/8 failed (HTTP 503), "
                "and groundcontrol stops within 5.0s, before a retry would be due (in 8.0s)"
            ],
        )
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retryWaitedForWithinTheBound(self) -> None:
        """A retry waited for when the drain begins, due within the bound, is made."""
        client = FakeClient()
        notifier = self.webhook(client, initialDelay=2.0)
        notifier.notify(anEvent())
        client.answer(0, 503)
        drained = notifier.drain(5.0)
        self.clock.advance(2.0)
        client.answer(1)
        self.successResultOf(drained)
        self.assertEqual(self.notLogged(), [])

    def test_retryWithinTheBoundSaysSo(self) -> None:
        """A retry that falls within the bound is announced as before, and made."""
        client = FakeClient()
        notifier = self.webhook(client, initialDelay=2.0)
        notifier.notify(anEvent())
        drained = notifier.drain(5.0)
        client.answer(0, 503)
        self.assertEqual(len(self.messages(LogLevel.warn)), 1)
        self.assertTrue(self.messages(LogLevel.warn)[0].endswith("(HTTP 503); retrying in 2.0s"))
        self.clock.advance(2.0)
        client.answer(1)
        self.successResultOf(drained)
        self.assertEqual(self.notLogged(), [])

    def test_waitsForTheHandOver(self) -> None:
        """
        What a source hands over at the stop (the fleet watcher's held notifications, after
        its store read) is delivered: the drain of an idle webhook waits for the hand-over
        instead of stopping it at once, which refused them ('webhook stopped; not sending').
        """
        client = FakeClient()
        webhook = self.webhook(client)
        notifier = MultiNotifier([webhook])
        handOver = notifier.handOverAtStop()
        drained = notifier.drain(5.0)
        self.clock.advance(0.5)
        self.assertNoResult(drained)
        notifier.notify(anEvent())
        handOver.callback(None)
        self.assertNoResult(drained)
        client.answer(0)
        self.successResultOf(drained)
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(self.messages(LogLevel.warn), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handOverBounded(self) -> None:
        """
        A hand-over that does not come within the bound does not hold the stop: the drain
        fires at the bound, and what comes later is refused and named.
        """
        webhook = self.webhook(FakeClient())
        notifier = MultiNotifier([webhook])
        handOver = notifier.handOverAtStop()
        drained = notifier.drain(5.0)
        self.clock.advance(5.0)
        self.successResultOf(drained)
        notifier.notify(anEvent())
        handOver.callback(None)
        self.assertEqual(
            self.messages(LogLevel.warn),
            ["webhook stopped; not sending fleet event device.pending for kiln7"],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleAtOnce(self) -> None:
        """Nothing queued: it fires at once and leaves no timer."""
        notifier = self.webhook(FakeClient())
        self.successResultOf(notifier.drain(5.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NotifierServiceTests(WebhookTestCase):
    """The service whose stop drains the notifiers groundcontrol runs with."""

    def test_stopWaitsForTheDrain(self) -> None:
        """Its stop fires once the webhook has delivered what it holds (the log has none)."""
        client = FakeClient()
        webhook = self.webhook(client)
        service = NotifierService(MultiNotifier([LogNotifier(), webhook]), within=5.0)
        service.startService()
        webhook.notify(anEvent())
        stopped = service.stopService()
        self.assertNoResult(stopped)
        client.answer(0)
        self.successResultOf(stopped)
        self.assertFalse(service.running)

    def test_stopBounded(self) -> None:
        """A receiver that hangs holds the stop for C{within} seconds, no longer."""
        client = FakeClient()
        webhook = self.webhook(client)
        service = NotifierService(MultiNotifier([webhook]), within=STOP_DELIVERY_WAIT)
        service.startService()
        webhook.notify(anEvent())
        stopped = service.stopService()
        self.clock.advance(STOP_DELIVERY_WAIT - 0.1)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)


class GroundcontrolStopTests(SynchronousTestCase):
    """groundcontrol's services (L{buildService}) drain the webhook when they stop."""

    def test_heldNotificationPostedAtStop(self) -> None:
        """
        A request's notification the fleet watcher holds for its serial is handed to the
        webhook when groundcontrol stops, and posted then (the watcher stops first): the stop
        waits for it, at most L{STOP_DELIVERY_WAIT}, and names it if it is not delivered.
        """
        data = Path(self.mktemp())
        data.mkdir()
        DataDir(data).ensureInitialised()
        options = Options()
        listen = "tcp:0:interface=127.0.0.1"
        options.parseOptions(
            ["--data", str(data), "--listen", listen, "--webhook", "http://127.0.0.1:9/hook"]
        )
        reactor = MemoryReactorClock()
        top = buildService(options.toConfig(), reactor)
        (service,) = [s for s in top if isinstance(s, NotifierService)]
        (webhook,) = [n for n in service.notifier.notifiers if isinstance(n, WebhookNotifier)]
        logged = captureLogs(self, webhook)
        (watcher,) = [s for s in top if isinstance(s, FleetWatcher)]
        held = FleetEvent(DEVICE_PENDING, "kiln7", None, T0, {"fingerprint": "SHA256:k1"})
        self.assertEqual(watcher._heldRequests.hold(held, T0), [])
        stopped = top.stopService()
        # The watcher reads its requests' serials first: the in-memory reactor runs no store
        # thread, so the read goes unanswered and it sends what it holds at its bound.
        self.assertEqual(reactor.tcpClients, [])
        reactor.advance(STOP_SERIAL_READ_WAIT)
        self.assertEqual([c[:2] for c in reactor.tcpClients], [("127.0.0.1", 9)])
        reactor.advance(STOP_DELIVERY_WAIT - STOP_SERIAL_READ_WAIT - 0.1)
        self.assertNoResult(stopped)
        reactor.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(
            [formatEvent(e) for e in logged if "not delivered" in formatEvent(e)],
            [
                "webhook stopping: fleet event device.pending for kiln7 at "
                "2023-11-14T22:13:20Z not delivered to http://127.0.0.1:9"
            ],
        )


class MakeNotifierTests(SynchronousTestCase):
    """The notifier groundcontrol runs with."""

    def test_logOnly(self) -> None:
        """Without a URL there is just the log notifier."""
        notifier = makeNotifier(Clock())
        assert isinstance(notifier, MultiNotifier)
        self.assertEqual([type(n) for n in notifier.notifiers], [LogNotifier])

    def test_withWebhook(self) -> None:
        """With a URL, the log and the webhook both hear every event."""
        notifier = makeNotifier(Clock(), URL, maxAttempts=3)
        assert isinstance(notifier, MultiNotifier)
        self.assertEqual([type(n) for n in notifier.notifiers], [LogNotifier, WebhookNotifier])


class FlakyReceiver(Resource):
    """A real HTTP endpoint that answers 503 to the first C{failures} POSTs, then 200."""

    isLeaf = True

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.bodies: list[bytes] = []
        self.contentTypes: list[bytes | None] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(request.content.read())
        self.contentTypes.append(request.getHeader(b"content-type"))
        request.setResponseCode(503 if len(self.bodies) <= self.failures else 200)
        return b""


class RealHTTPWebhookTests(TestCase):
    """
    The one test that uses the real reactor and a real socket: the webhook reaches an HTTP
    server on 127.0.0.1 through treq's real client and connection pool.
    """

    def test_retriedUntilAccepted(self) -> Deferred[None]:
        """A receiver failing twice with 503 gets three POSTs; the third's JSON is the event."""
        from twisted.internet import reactor as _reactor

        reactor: Any = _reactor  # typed loosely: mypy cannot read zope declarations

        receiver = FlakyReceiver(failures=2)
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        agent: Any = Agent(reactor)
        client = HTTPClient(agent)
        notifier = WebhookNotifier(
            f"http://127.0.0.1:{address.port}/hook",
            reactor,
            client,
            initialDelay=0.01,
            maxDelay=0.05,
            timeout=5.0,
        )
        event = anEvent()
        notifier.notify(event)

        def check(_: object) -> None:
            self.assertEqual(len(receiver.bodies), 3)
            self.assertEqual(receiver.contentTypes, [b"application/json"] * 3)
            self.assertEqual(json.loads(receiver.bodies[-1]), event.toJSON())

        # Agent's default pool is not persistent: no connection outlives its request.
        return notifier.whenIdle().addCallback(check)
