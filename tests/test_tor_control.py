"""
groundcontrol's control connections to tor while it cannot publish its onion service (in
memory: tor's side of the control port is L{ControlPort}, each connection a
StringTransport). Every attempt that fails after tor answered hangs up the connection it
opened, so retries every 30 s for days do not pile up open connections in tor and in
groundcontrol; the published service keeps its one, closed at stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel import statefiles
from accesstunnel.transports.tor import (
    CONTROL_ANSWER_PATIENCE,
    FIRST_UPLOAD_PATIENCE,
    REPUBLISH_DELAYS,
    UPLOAD_CHECK_INTERVAL,
    UPLOAD_WAIT,
    OnionServerEndpoint,
    TorSettings,
)
from tests.test_agent_disk import FullDisk
from tests.test_tor_startup import _RefusingTor, _StalledTor
from tests.test_transports_walk import _FakeOnion, _FakeTor

#: tor's answer to txtorcon's first question when its cookie file cannot be read by
#: groundcontrol (not in tor's group: the usual mistake); txtorcon then fails to connect.
UNREADABLE_COOKIE = (
    b"250-PROTOCOLINFO 1\r\n"
    b'250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/nonexistent/control_auth_cookie"\r\n'
    b'250-VERSION Tor="0.4.8.10"\r\n'
    b"250 OK\r\n"
)

#: Attempts made in each test: the quick ones, then several 30 s ones.
ATTEMPTS = len(REPUBLISH_DELAYS) + 4


class ControlPort:
    """tor's side of its control port: takes or refuses each connection made to it."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.transports: list[StringTransport] = []
        self._answered = 0

    def _pending(self) -> list[tuple[Any, Any]]:
        start = self._answered
        clients, connectors = self.reactor.tcpClients[start:], self.reactor.connectors[start:]
        pending = list(zip(clients, connectors, strict=True))
        self._answered = len(self.reactor.tcpClients)
        return pending

    def accept(self, answer: bytes = b"") -> None:
        """Connect the attempts made since the last call and send them C{answer}."""
        for (host, port, factory, _, _), _ in self._pending():
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            if answer:
                protocol.dataReceived(answer)
            self.transports.append(transport)

    def refuse(self) -> None:
        """Refuse the attempts made since the last call (tor not running)."""
        for (_, _, factory, _, _), connector in self._pending():
            factory.clientConnectionFailed(connector, error.ConnectionRefusedError())

    @property
    def open(self) -> int:
        """Connections groundcontrol has not hung up."""
        return sum(not transport.disconnecting for transport in self.transports)


class _ControlPortCase(SynchronousTestCase):
    """groundcontrol's onion listener on a fake reactor, tor's control port a L{ControlPort}."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.tor = ControlPort(self.reactor)
        self.keyFile = Path(self.mktemp()) / "onion_key"

    def listen(self) -> defer.Deferred[Any]:
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings(onionKeyFile=self.keyFile))
        return endpoint.listen(Factory())

    def fakeTxtorcon(self, *tors: Any) -> None:
        """txtorcon.connect connecting to L{ControlPort}, then giving the next of C{tors}."""
        import txtorcon

        answers = list(tors)

        def connect(reactor: Any, endpoint: Any) -> defer.Deferred[Any]:
            connecting = endpoint.connect(Factory.forProtocol(Protocol))
            return connecting.addCallback(lambda _: answers.pop(0))

        self.patch(txtorcon, "connect", connect)


class ControlConnectionTests(_ControlPortCase):
    def retryFailing(self, answer: bytes = b"") -> None:
        """Let the listener try C{ATTEMPTS} times, tor answering each, none published."""
        before = len(self.tor.transports)
        for attempt in range(ATTEMPTS):
            self.reactor.advance(REPUBLISH_DELAYS[min(attempt, len(REPUBLISH_DELAYS) - 1)])
            self.tor.accept(answer)
            self.assertEqual(self.tor.open, 0, f"attempt {attempt + 1}")
        self.assertEqual(len(self.tor.transports), before + ATTEMPTS)

    def test_unreadableCookie(self) -> None:
        """
        tor answers but its cookie cannot be read (the real txtorcon, which leaves the
        connection open when it fails): each attempt's connection is hung up.
        """
        with capturedLogs():
            listening = self.listen()
            self.tor.accept(UNREADABLE_COOKIE)
            port: Any = self.successResultOf(listening)
            self.assertIn("Failed to read COOKIEFILE", port.notReadyBecause)
            self.assertEqual(self.tor.open, 0)
            self.retryFailing(UNREADABLE_COOKIE)
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_serviceRefused(self) -> None:
        """tor answers and refuses the service, again and again: each connection hung up."""
        self.fakeTxtorcon(*(_RefusingTor() for _ in range(ATTEMPTS)))
        with capturedLogs():
            listening = self.listen()
            self.tor.refuse()
            port: Any = self.successResultOf(listening)
            self.retryFailing()
        self.assertEqual(port.notReadyBecause, "tor refused the onion service")
        self.successResultOf(port.stopListening())

    def test_keyNotStored(self) -> None:
        """The service's key cannot be stored (a full disk): taken back, and hung up."""
        self.patch(statefiles, "os", FullDisk(room=0))
        tors = [_FakeTor() for _ in range(ATTEMPTS)]
        self.fakeTxtorcon(*tors)
        with capturedLogs():
            listening = self.listen()
            self.tor.refuse()
            port: Any = self.successResultOf(listening)
            self.retryFailing()
        self.assertTrue(all(tor.onion is not None and tor.onion.removed for tor in tors))
        self.successResultOf(port.stopListening())

    def test_publishedKeepsOneUntilStopped(self) -> None:
        """
        The published service lives on its control connection: kept open (tor would take
        the service away with it), and hung up when the listener stops.
        """
        tor = _FakeTor()
        self.fakeTxtorcon(tor)
        with capturedLogs():
            listening = self.listen()
            self.tor.accept()
            port: Any = self.successResultOf(listening)
        self.assertEqual(port.getHost().host, "abcdef.onion")
        self.assertEqual(self.tor.open, 1)
        self.successResultOf(port.stopListening())
        assert tor.onion is not None
        self.assertTrue(tor.onion.removed)
        self.assertEqual(self.tor.open, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stoppedWhilePublishing(self) -> None:
        """stopListening while tor is adding the service: taken back, and hung up."""
        adding: defer.Deferred[Any] = defer.Deferred()
        tor = _FakeTor()
        tor.create_onion_service = lambda **kwargs: adding  # type: ignore[method-assign]
        self.fakeTxtorcon(tor)
        listening = self.listen()
        self.tor.accept()
        self.reactor.advance(30)  # listen stops waiting: up, still publishing
        port: Any = self.successResultOf(listening)
        self.successResultOf(port.stopListening())
        self.assertEqual(self.tor.open, 1)
        onion = _FakeTor().create_onion_service(private_key=None)
        with capturedLogs():
            adding.callback(self.successResultOf(onion))
        self.assertEqual(self.tor.open, 0)


class _QuestionedTor(_StalledTor):
    """A tor that took the service and has not uploaded; answers GETINFO with C{answers}."""

    def __init__(self, *answers: str) -> None:
        super().__init__()
        self.answers = list(answers)
        self.asked = 0

    def get_info(self, key: str) -> defer.Deferred[dict[str, str]]:
        self.asked += 1
        if not self.answers:  # hung: ADD_ONION, and everything after it, unanswered
            return defer.Deferred()
        return defer.succeed({key: self.answers.pop(0)})


def bootstrap(progress: int, summary: str) -> str:
    return f'NOTICE BOOTSTRAP PROGRESS={progress} TAG=x SUMMARY="{summary}"'


class SilentControlPortTests(_ControlPortCase):
    """
    A tor (or something else) that takes the control connection and then says nothing: each
    step has CONTROL_ANSWER_PATIENCE to answer, and one that does not ends the attempt,
    logged, hung up and retried. It waited for ever: no retry, no line after the first.
    """

    def test_silentFromTheStart(self) -> None:
        """
        The real txtorcon against a port that accepts and never answers: the listener is
        up unpublished after 5 s saying why, each attempt's connection is hung up, and the
        attempts go on with the usual delays, with one line for them all.
        """
        with capturedLogs() as events:
            listening = self.listen()
            self.tor.accept()
            self.reactor.advance(CONTROL_ANSWER_PATIENCE)
            port: Any = self.successResultOf(listening)
            self.assertEqual(self.tor.open, 0)
            for attempt in range(ATTEMPTS):
                self.reactor.advance(REPUBLISH_DELAYS[min(attempt, len(REPUBLISH_DELAYS) - 1)])
                self.tor.accept()
                self.assertEqual(self.tor.open, 1)
                self.reactor.advance(CONTROL_ANSWER_PATIENCE)
                self.assertEqual(self.tor.open, 0, f"attempt {attempt + 2}")
        self.assertEqual(len(self.tor.transports), 1 + ATTEMPTS)
        silent = (
            "tor's control port tcp:127.0.0.1:9051 took the connection but did not answer in "
            "5 s (is tor hung, or is something other than tor listening there?)"
        )
        self.assertEqual(port.notReadyBecause, silent)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"onion service for tor://:2222 not published yet: {silent}", lines[0])
        self.successResultOf(port.stopListening())

    def test_hungAfterTakingTheService(self) -> None:
        """
        tor answered, took ADD_ONION and then hangs: the next question (how far it has
        bootstrapped) goes unanswered, so the attempt ends, hung up, and is tried again.
        """
        hung, next = _QuestionedTor(), _FakeTor()
        self.fakeTxtorcon(hung, next)
        with capturedLogs() as events:
            listening = self.listen()
            self.tor.accept()
            self.reactor.advance(FIRST_UPLOAD_PATIENCE)
            port: Any = self.successResultOf(listening)
            self.assertEqual(port.notReadyBecause, UPLOAD_WAIT)
            self.reactor.advance(UPLOAD_CHECK_INTERVAL - FIRST_UPLOAD_PATIENCE)
            self.assertEqual((hung.asked, self.tor.open), (1, 1))
            self.reactor.advance(CONTROL_ANSWER_PATIENCE)
            self.assertEqual(self.tor.open, 0)
            hung.creating.addErrback(lambda _: None)  # txtorcon's, on a real hang-up
            self.reactor.advance(REPUBLISH_DELAYS[1])  # tor answered: delays go on
            self.tor.accept()
        self.assertEqual(port.getHost().host, "abcdef.onion")
        self.assertEqual(self.tor.open, 1)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(
            "cannot publish the onion service yet (tor's control port tcp:127.0.0.1:9051 "
            "stopped answering while the onion service was being published (no answer in "
            "5 s: is tor hung?)); trying again",
            lines[0],
        )
        self.assertIn("onion service abcdef.onion:2222 published", lines[1])
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_slowUploadIsSaid(self) -> None:
        """
        tor answers but has not uploaded (bootstrapping): what it says is logged once per
        change, the attempt goes on (no hang-up), and the upload publishes the service.
        """
        slow = _QuestionedTor(
            bootstrap(45, "Asking for relay descriptors"),
            bootstrap(45, "Asking for relay descriptors"),
            bootstrap(100, "Done"),
        )
        self.fakeTxtorcon(slow)
        with capturedLogs() as events:
            listening = self.listen()
            self.tor.accept()
            self.reactor.advance(FIRST_UPLOAD_PATIENCE)
            port: Any = self.successResultOf(listening)
            self.reactor.advance(UPLOAD_CHECK_INTERVAL - FIRST_UPLOAD_PATIENCE)
            self.reactor.advance(UPLOAD_CHECK_INTERVAL)
            self.reactor.advance(UPLOAD_CHECK_INTERVAL)
            self.assertEqual((slow.asked, self.tor.open), (3, 1))
            slow.creating.callback(_FakeOnion("abcdef.onion", "ED25519-V3:KEY"))
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn(
            "tor has not uploaded the onion service's descriptor after 60 s (it has "
            "bootstrapped 45%: Asking for relay descriptors); still waiting (is tor connected "
            "to the Tor network?)",
            lines[0],
        )
        self.assertIn("after 180 s (it has bootstrapped 100%: Done)", lines[1])
        self.assertIn("onion service abcdef.onion:2222 published", lines[2])
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
