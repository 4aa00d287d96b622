"""
groundcontrol with a tor:// listener starts while tor's control port does not answer (the
host booted before tor, or tor is broken): its other listeners serve, the onion service is
published once tor answers, and listening.json says what is listening meanwhile. A usage
error (a --tor-control that is no endpoint) still stops it at once.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from accesstunnel.addresses import AddressError
from accesstunnel.transports.tor import (
    CONTROL_ANSWER_PATIENCE,
    FIRST_UPLOAD_PATIENCE,
    UPLOAD_WAIT,
    OnionAddress,
    OnionServerEndpoint,
    TorSettings,
)
from groundcontrol.listening import ListenService, listenAll
from tests.test_transports_walk import _FakeOnion, _FakeTor

REFUSED = "Connection was refused by other side: 111: Connection refused"
LOST_BEFORE_UPLOAD = (
    "lost tor's control port tcp:127.0.0.1:9051 before the onion service was published"
)


class _StalledTor(_FakeTor):
    """A tor that takes the service and has not reported the descriptor uploaded yet."""

    def __init__(self) -> None:
        super().__init__()
        self.creating: defer.Deferred[Any] = defer.Deferred()

    def create_onion_service(self, **kwargs: Any) -> defer.Deferred[Any]:
        self.added.append(kwargs)
        return self.creating


class _RefusingTor(_FakeTor):
    """A tor that answers and refuses the service."""

    def create_onion_service(self, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(RuntimeError("tor refused the onion service"))


def answeringTor(case: SynchronousTestCase) -> list[Any]:
    """txtorcon.connect faked for C{case}: each call takes the next answer off the list."""
    import txtorcon

    answers: list[Any] = []
    case.patch(txtorcon, "connect", lambda reactor, endpoint: answers.pop(0))
    return answers


class TorNotUpAtStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.answers = answeringTor(self)
        self.reactor = MemoryReactorClock()
        self.keyFile = Path(self.mktemp()) / "onion_key"

    def refuse(self, times: int = 1) -> None:
        for _ in range(times):
            self.answers.append(defer.fail(error.ConnectionRefusedError("111: Connection refused")))

    def startListening(self) -> defer.Deferred[Any]:
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings(onionKeyFile=self.keyFile))
        return endpoint.listen(Factory())

    def listen(self) -> Any:
        return self.successResultOf(self.startListening())

    def test_upUnpublishedThenPublished(self) -> None:
        """
        The listener is up at once, unpublished (no .onion yet, and why); one warning,
        then silence while tor keeps refusing (retries after 1, 2, 4 s); when tor answers
        the service is published, the key file written, and watchers told each change
        (tor answered: waiting for the upload; published; then lost when tor goes).
        """
        self.refuse()
        changes: list[str | None] = []
        with capturedLogs() as events:
            port = self.listen()
            port.whenChanged(lambda: changes.append(port.notReadyBecause))
            self.assertIsNone(port.getHost().host)
            self.assertEqual(port.getHost().port, 2222)
            self.assertIn(
                "cannot reach tor's control port tcp:127.0.0.1:9051", port.notReadyBecause
            )
            self.refuse(2)
            self.reactor.advance(1)
            self.reactor.advance(2)
            tor = _FakeTor()
            self.answers.append(defer.succeed(tor))
            self.reactor.advance(3.9)
            self.assertEqual(tor.added, [])
            self.reactor.advance(0.1)
        self.assertEqual(len(tor.added), 1)
        self.assertEqual(port.getHost().host, "abcdef.onion")
        self.assertIsNone(port.notReadyBecause)
        self.assertEqual(changes, [UPLOAD_WAIT, None])
        self.assertEqual(self.keyFile.read_text(), "ED25519-V3:KEY\n")
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(
            lines[0].startswith(
                "onion service for tor://:2222 not published yet: cannot reach tor's "
                "control port tcp:127.0.0.1:9051"
            ),
            lines[0],
        )
        self.assertIn(REFUSED, lines[0])
        self.assertEqual(events[0]["log_level"].name, "warn")
        self.assertIn("onion service abcdef.onion:2222 published", lines[1])
        with capturedLogs():
            tor.gone.errback(error.ConnectionLost("tor restarted"))
        self.assertEqual(changes, [UPLOAD_WAIT, None, "lost tor's control port tcp:127.0.0.1:9051"])
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_newCauseIsLoggedAgain(self) -> None:
        """A different failure while waiting is one more line; the same one is not."""
        self.refuse()
        with capturedLogs() as events:
            port = self.listen()
            self.answers.append(defer.fail(OSError(13, "Permission denied")))
            self.reactor.advance(1)
            self.answers.append(defer.fail(OSError(13, "Permission denied")))
            self.reactor.advance(2)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Permission denied", lines[1])
        self.assertIn("Permission denied", port.notReadyBecause)
        self.successResultOf(port.stopListening())

    def test_torLostBeforeUpload(self) -> None:
        """
        tor answers but goes away before it reports the descriptor uploaded (restarted
        while bootstrapping), which txtorcon would wait for for ever: listening.json says
        tor is being waited for, then that it was lost (one line), and the service is
        published once tor answers again, 2 s later (tor answering restarted the delays).
        """
        self.refuse(3)
        changes: list[str | None] = []
        with capturedLogs() as events:
            port = self.listen()
            port.whenChanged(lambda: changes.append(port.notReadyBecause))
            self.reactor.advance(1)
            self.reactor.advance(2)
            stalled = _StalledTor()
            self.answers.append(defer.succeed(stalled))
            self.reactor.advance(4)
            self.assertEqual(changes, [UPLOAD_WAIT])
            stalled.gone.errback(error.ConnectionLost("tor restarted"))
            self.assertEqual(changes, [UPLOAD_WAIT, LOST_BEFORE_UPLOAD])
            tor = _FakeTor()
            self.answers.append(defer.succeed(tor))
            self.reactor.advance(2)
        self.assertEqual(port.getHost().host, "abcdef.onion")
        self.assertEqual(changes, [UPLOAD_WAIT, LOST_BEFORE_UPLOAD, UPLOAD_WAIT, None])
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn(f"cannot publish the onion service yet ({LOST_BEFORE_UPLOAD})", lines[1])
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_torLostBeforeFirstUpload(self) -> None:
        """
        The same at start: tor answers, then goes before the upload; the listener is up
        at once, unpublished because tor was lost (not waiting for an upload that cannot
        come), and publishes 1 s later when tor answers again.
        """
        stalled = _StalledTor()
        self.answers.append(defer.succeed(stalled))
        listening = self.startListening()
        self.assertNoResult(listening)
        with capturedLogs():
            stalled.gone.errback(error.ConnectionLost("tor restarted"))
            port: Any = self.successResultOf(listening)
            self.assertEqual(port.notReadyBecause, LOST_BEFORE_UPLOAD)
            self.answers.append(defer.succeed(_FakeTor()))
            self.reactor.advance(1)
        self.assertIsNone(port.notReadyBecause)
        self.assertEqual(port.getHost().host, "abcdef.onion")
        self.successResultOf(port.stopListening())

    def test_firstUploadLate(self) -> None:
        """
        tor answers but has not uploaded the descriptor after FIRST_UPLOAD_PATIENCE (still
        bootstrapping, or cut off from the Tor network): the listener is up unpublished,
        saying so, instead of holding back listening.json until then; the upload, when it
        comes, publishes it.
        """
        stalled = _StalledTor()
        self.answers.append(defer.succeed(stalled))
        listening = self.startListening()
        self.reactor.advance(FIRST_UPLOAD_PATIENCE - 0.5)
        self.assertNoResult(listening)
        self.reactor.advance(0.5)
        port: Any = self.successResultOf(listening)
        self.assertEqual(port.notReadyBecause, UPLOAD_WAIT)
        self.assertIsNone(port.getHost().host)
        changes: list[str | None] = []
        port.whenChanged(lambda: changes.append(port.notReadyBecause))
        with capturedLogs() as events:
            stalled.creating.callback(_FakeOnion("abcdef.onion", "ED25519-V3:KEY"))
        self.assertEqual(changes, [None])
        self.assertEqual(port.getHost().host, "abcdef.onion")
        self.assertIn("onion service abcdef.onion:2222 published", formatEvent(events[0]))
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_lostAfterListenStoppedWaiting(self) -> None:
        """
        The same, and then tor goes before the upload: one line, and the service is
        published when tor answers again.
        """
        stalled = _StalledTor()
        self.answers.append(defer.succeed(stalled))
        listening = self.startListening()
        self.reactor.advance(FIRST_UPLOAD_PATIENCE)
        port: Any = self.successResultOf(listening)
        with capturedLogs() as events:
            stalled.gone.errback(error.ConnectionLost("tor restarted"))
            self.assertEqual(port.notReadyBecause, LOST_BEFORE_UPLOAD)
            self.answers.append(defer.succeed(_FakeTor()))
            self.reactor.advance(2)
        self.assertEqual(port.getHost().host, "abcdef.onion")
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(f"cannot publish the onion service yet ({LOST_BEFORE_UPLOAD})", lines[0])
        self.successResultOf(port.stopListening())

    def test_controlPortSilent(self) -> None:
        """
        tor's control port neither answers nor refuses (a firewall drops it): after
        CONTROL_ANSWER_PATIENCE the attempt gives up, saying so, and the listener is up
        unpublished and tries again (it waited for ever: no retry, no line).
        """
        self.answers.append(defer.Deferred())
        with capturedLogs() as events:
            listening = self.startListening()
            self.reactor.advance(CONTROL_ANSWER_PATIENCE)
            port: Any = self.successResultOf(listening)
            self.answers.append(defer.Deferred())
            self.reactor.advance(1)
            self.assertEqual(self.answers, [])  # asked again
        silent = (
            "tor's control port tcp:127.0.0.1:9051 did not take the connection in 5 s (is a "
            "firewall dropping it?)"
        )
        self.assertEqual(port.notReadyBecause, silent)
        [line] = [formatEvent(e) for e in events]
        self.assertIn(f"not published yet: {silent}", line)
        self.successResultOf(port.stopListening())

    def test_sameCauseAfterTorAnswered(self) -> None:
        """
        tor answers but refuses the service, twice: one line, and listening.json says the
        refusal each time, not the wait for an upload that the second answer began.
        """
        self.refuse()
        changes: list[str | None] = []
        with capturedLogs() as events:
            port = self.listen()
            port.whenChanged(lambda: changes.append(port.notReadyBecause))
            for delay in (1, 2):
                self.answers.append(defer.succeed(_RefusingTor()))
                self.reactor.advance(delay)
        refused = "tor refused the onion service"
        self.assertEqual(changes, [UPLOAD_WAIT, refused, UPLOAD_WAIT, refused])
        self.assertEqual(len(events), 2, [formatEvent(e) for e in events])
        self.successResultOf(port.stopListening())

    def test_refusalsBackOff(self) -> None:
        """
        tor answers and refuses every time: the attempts back off to one every 30 s as
        for a silent tor (tor answering restarted the delays: it was asked every 2 s for
        as long as it refused). A silence (30 s more) and an answer after it restart them.
        """
        attempts: list[float] = []
        clock = self.reactor

        class Refusing(_RefusingTor):
            def create_onion_service(self, **kwargs: Any) -> defer.Deferred[Any]:
                attempts.append(clock.seconds())
                return super().create_onion_service(**kwargs)

        def nextAttempt() -> None:
            clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())

        self.refuse()
        with capturedLogs():
            port = self.listen()
            self.answers.extend(defer.succeed(Refusing()) for _ in range(8))
            for _ in range(8):
                nextAttempt()
            self.refuse()
            nextAttempt()
            self.answers.extend(defer.succeed(Refusing()) for _ in range(2))
            nextAttempt()
            nextAttempt()
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        self.assertEqual(gaps, [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 60.0, 2.0])
        self.successResultOf(port.stopListening())

    def test_stoppedWhileWaiting(self) -> None:
        """Stopping an unpublished listener stops its retries and its local port."""
        self.refuse()
        with capturedLogs():
            port = self.listen()
        stopped: list[bool] = []
        port._local.stopListening = lambda: stopped.append(True)
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(stopped, [True])
        self.assertFalse(self.keyFile.exists())

    def test_unreadableKeyFileStillFails(self) -> None:
        """An --onion-key that cannot be read needs an administrator: listen fails."""
        self.keyFile.mkdir(parents=True)
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings(onionKeyFile=self.keyFile))
        self.failureResultOf(endpoint.listen(Factory()), IsADirectoryError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_badControlEndpointStillFails(self) -> None:
        """A --tor-control that is no endpoint string is a usage error: listen fails."""
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings(control="nonsense:x"))
        self.failureResultOf(endpoint.listen(Factory()), AddressError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


@implementer(IListeningPort)
class _ReadyPort:
    """A port reachable where it listens (ssh://)."""

    def getHost(self) -> Any:
        return IPv4Address("TCP", "0.0.0.0", 22)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass


class _WaitingPort(_ReadyPort):
    """A port that is up on loopback but not yet reachable at its public address."""

    def __init__(self) -> None:
        self.notReadyBecause: str | None = "tor is not answering"
        self._changed: list[Any] = []

    def whenChanged(self, callback: Any) -> None:
        self._changed.append(callback)

    def ready(self) -> None:
        self.notReadyBecause = None
        for callback in self._changed:
            callback()

    def getHost(self) -> Any:
        return OnionAddress("x.onion" if self.notReadyBecause is None else None, 22)

    def getLocalHost(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 40123)


@implementer(IStreamServerEndpoint)
class _Given:
    def __init__(self, port: Any) -> None:
        self.port = port

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.succeed(self.port)


class ListeningFileTests(SynchronousTestCase):
    def test_notReadyListenerInFileAndLine(self) -> None:
        """
        A listener up but unpublished: a warning 'listening on' line with its loopback
        address and why; listening.json lists it with ready false and why, and is written
        again (ready true, its public host) once it is published. Others are ready.
        """
        waiting = _WaitingPort()
        runDir = Path(self.mktemp())
        services = [
            ListenService(_Given(_ReadyPort()), Factory(), "ssh://:22"),
            ListenService(_Given(waiting), Factory(), "tor://:22"),
        ]
        parent = MultiService()
        listenAll(parent, runDir, services)
        with capturedLogs() as events:
            parent.startService()
        lines = [formatEvent(e) for e in events]
        self.assertIn(
            "listening on 127.0.0.1:40123 (tor://:22), not reachable there yet: "
            "tor is not answering",
            lines,
        )
        data = json.loads((runDir / "listening.json").read_text())["listening"]
        self.assertEqual(
            data,
            [
                {"spec": "ssh://:22", "host": "0.0.0.0", "port": 22, "ready": True},
                {
                    "spec": "tor://:22",
                    "host": None,
                    "port": 22,
                    "ready": False,
                    "waiting": "tor is not answering",
                },
            ],
        )
        waiting.ready()
        data = json.loads((runDir / "listening.json").read_text())["listening"]
        self.assertEqual(
            data[1], {"spec": "tor://:22", "host": "x.onion", "port": 22, "ready": True}
        )
