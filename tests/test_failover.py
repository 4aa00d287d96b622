"""Tests for agent.failover: the ordered server list, per-attempt timeouts, memory, replace."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from accesstunnel.addresses import Connector
from accesstunnel.transports.proxy import HTTPConnectEndpoint, ProxyURL
from agent.failover import AllAddressesFailed, FailoverEndpoint
from tests.test_transports_proxy import FakeProxyEndpoint


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """An endpoint whose connects succeed, fail or hang as the test says."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.attempts = 0
        self.cancelled = 0
        self.transports: list[StringTransport] = []

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        self.attempts += 1
        if self.behaviour == "refuse":
            return defer.fail(error.ConnectionRefusedError())
        if self.behaviour == "hang":

            def cancel(d: defer.Deferred[Any]) -> None:
                self.cancelled += 1

            return defer.Deferred(cancel)
        p = factory.buildProtocol(None)
        transport = StringTransport()
        p.makeConnection(transport)
        self.transports.append(transport)
        return defer.succeed(p)


class Link(protocol.Protocol):
    """Stands in for the agent's SSH transport: C{ready} fires when the test says."""

    def connectionMade(self) -> None:
        self.ready: defer.Deferred[Any] = defer.Deferred()
        self.factory.links.append(self)  # type: ignore[attr-defined]


class LinkFactory(protocol.Factory):
    protocol = Link

    def __init__(self) -> None:
        self.links: list[Link] = []


def connector(name: str, behaviour: str) -> Connector:
    return Connector(ScriptedEndpoint(behaviour), lambda f: f, name, name.split(":")[0])


class FailoverTests(SynchronousTestCase):
    """Trying each address in order and remembering the one that worked."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        self.stateFile = self.directory / "state" / "last-server.json"
        self.clock = Clock()
        self.factory = LinkFactory()

    def endpoint(self, *connectors: Connector, timeout: float = 15) -> FailoverEndpoint:
        return FailoverEndpoint(self.clock, list(connectors), self.stateFile, timeout)

    def test_inOrder(self) -> None:
        """Refused addresses are skipped at once; the first that connects is used."""
        a, b, c = connector("ssh:a", "refuse"), connector("tls:b", "ok"), connector("wss:c", "ok")
        endpoint = self.endpoint(a, b, c)
        link = self.successResultOf(endpoint.connect(self.factory))
        self.assertIsInstance(link, Link)
        self.assertEqual([x.endpoint.attempts for x in (a, b, c)], [1, 1, 0])  # type: ignore[attr-defined]
        self.assertEqual(endpoint.transport, "tls")

    def test_hangingAttemptIsBounded(self) -> None:
        """A connect that hangs is cancelled after the attempt timeout; the next one is tried."""
        a, b = connector("ssh:a", "hang"), connector("tls:b", "ok")
        endpoint = self.endpoint(a, b, timeout=15)
        d = endpoint.connect(self.factory)
        self.assertNoResult(d)
        self.clock.advance(14.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.successResultOf(d)
        self.assertEqual(a.endpoint.cancelled, 1)  # type: ignore[attr-defined]

    def test_addressWithItsOwnTimeout(self) -> None:
        """
        An address with its own attempt timeout (tor://: 60 s, as an onion connect builds
        circuits first) gets that long; the others keep the endpoint's.
        """
        slow = Connector(ScriptedEndpoint("hang"), lambda f: f, "tor:a", "tor", 60.0)
        b = connector("tls:b", "ok")
        endpoint = self.endpoint(slow, b, timeout=15)
        d = endpoint.connect(self.factory)
        self.clock.advance(59.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.successResultOf(d)
        self.assertEqual(slow.endpoint.cancelled, 1)  # type: ignore[attr-defined]

    def test_torAddressesWaitForTor(self) -> None:
        """clientConnector gives tor:// addresses TOR_ATTEMPT_TIMEOUT, other schemes none."""
        from twisted.internet.testing import MemoryReactorClock

        from accesstunnel.addresses import TOR_ATTEMPT_TIMEOUT, clientConnector

        reactor = MemoryReactorClock()
        tor = clientConnector(reactor, "tor://" + "a" * 56 + ".onion:2222")
        self.assertEqual(tor.attemptTimeout, TOR_ATTEMPT_TIMEOUT)
        self.assertGreater(TOR_ATTEMPT_TIMEOUT, 15)
        self.assertIsNone(clientConnector(reactor, "ssh://gc.example").attemptTimeout)

    def test_allFail(self) -> None:
        """
        When every address fails the connect fails (ClientService backs off), naming each
        with its reason, without Twisted's closing period before the "; ".
        """
        endpoint = self.endpoint(connector("ssh:a", "refuse"), connector("tls:b", "hang"))
        d = endpoint.connect(self.factory)
        self.clock.advance(16)
        failure = self.failureResultOf(d, AllAddressesFailed)
        self.assertEqual(
            str(failure.value),
            "ssh:a: Connection was refused by other side; tls:b: no connection in 15 s",
        )

    def test_remembersTheLastGood(self) -> None:
        """
        The address whose link came up is written to the state file and tried first by the
        next connect and by a new agent process (a new endpoint on the same file).
        """
        a, b = connector("ssh:a", "refuse"), connector("tls:b", "ok")
        endpoint = self.endpoint(a, b)
        self.successResultOf(endpoint.connect(self.factory))
        self.assertFalse(self.stateFile.exists(), "remembered only once the link is up")
        self.factory.links[-1].ready.callback(None)
        self.assertEqual(json.loads(self.stateFile.read_text()), {"address": "tls:b"})
        self.successResultOf(endpoint.connect(self.factory))
        self.assertEqual(a.endpoint.attempts, 1)  # type: ignore[attr-defined]

        a2, b2 = connector("ssh:a", "refuse"), connector("tls:b", "ok")
        restarted = self.endpoint(a2, b2)
        self.successResultOf(restarted.connect(self.factory))
        self.assertEqual(a2.endpoint.attempts, 0)  # type: ignore[attr-defined]

    def test_connectedButNeverUp(self) -> None:
        """
        An address that accepts connections but whose link never comes up (a middlebox)
        sends the next connect to the next address, so the list is still walked.
        """
        a, b = connector("tls:a", "ok"), connector("wss:b", "ok")
        endpoint = self.endpoint(a, b)
        self.successResultOf(endpoint.connect(self.factory))
        ready = self.factory.links[-1].ready
        ready.errback(Failure(ConnectionError("closed before up")))
        self.failureResultOf(ready, ConnectionError)  # the link's own chain is left intact
        self.assertFalse(self.stateFile.exists(), "an address whose link failed is not remembered")
        self.successResultOf(endpoint.connect(self.factory))
        self.assertEqual(b.endpoint.attempts, 1)  # type: ignore[attr-defined]
        self.assertEqual(endpoint.current, b)

    def test_connectedButNeverUpLine(self) -> None:
        """The line says why without the error's own closing period before more words."""
        from twisted.logger import capturedLogs, formatEvent

        endpoint = self.endpoint(connector("tls:a", "ok"), connector("wss:b", "ok"))
        self.successResultOf(endpoint.connect(self.factory))
        ready = self.factory.links[-1].ready
        with capturedLogs() as events:
            ready.errback(Failure(error.ConnectionLost("Connection lost.")))
        self.failureResultOf(ready, error.ConnectionLost)
        self.assertIn(
            "tls:a connected but the link did not come up (Connection to the other side was "
            "lost in a non-clean fashion: Connection lost); trying wss:b first next time",
            [formatEvent(e) for e in events],
        )

    def test_lossBeforeStartTriesNext(self) -> None:
        """A transport that ends before the link protocol starts counts as a failed attempt."""

        @implementer(IStreamClientEndpoint)
        class Refusing:
            attempts = 0

            def connect(self, factory: Any) -> defer.Deferred[Any]:
                self.attempts += 1
                d: defer.Deferred[Any] = defer.Deferred()
                # e.g. the WebSocket was refused: the adapter tells the factory.
                self.reactorLater = lambda: factory.transportFailed(Failure(ConnectionError("404")))
                d.callback(protocol.Protocol())
                self.reactorLater()
                return d

        ws = Connector(Refusing(), lambda f: f, "wss:a", "wss")
        endpoint = self.endpoint(ws, connector("tls:b", "ok"))
        self.successResultOf(endpoint.connect(self.factory))
        self.assertEqual(endpoint.transport, "tls")

    def test_transportEndsAfterTheTimeout(self) -> None:
        """
        A wss:// attempt whose WebSocket never opens is cut off by its timeout, and its
        connection then ends (autobahn's onClose tells the factory): no AlreadyCalledError
        (it was logged as a critical "Unhandled error in Deferred" each time).
        """
        factories: list[Any] = []

        @implementer(IStreamClientEndpoint)
        class NeverOpens:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                factories.append(factory)
                outer = protocol.Protocol()
                outer.makeConnection(StringTransport())  # TLS up, WebSocket never opens
                return defer.succeed(outer)

        ws = Connector(NeverOpens(), lambda f: f, "wss:a", "wss")
        endpoint = self.endpoint(ws, connector("tls:b", "ok"))
        connecting = endpoint.connect(self.factory)
        self.clock.advance(15)
        self.successResultOf(connecting)
        factories[0].transportFailed(Failure(ConnectionError("WebSocket did not open")))
        del factories[:]
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(defer.AlreadyCalledError), [])

    def test_stoppedWhileConnecting(self) -> None:
        """
        The agent stopping cancels the connect: no "could not reach A: no connection in
        15 s" line (it was not a timeout), and the next address is not dialled.
        """
        a, b = connector("ssh:a", "hang"), connector("tls:b", "ok")
        endpoint = self.endpoint(a, b)
        with capturedLogs() as events:
            connecting = endpoint.connect(self.factory)
            connecting.cancel()
        self.failureResultOf(connecting, defer.CancelledError)
        self.assertEqual(b.endpoint.attempts, 0)  # type: ignore[attr-defined]
        self.assertFalse([e for e in events if "could not reach" in formatEvent(e)])

    def test_connectedThenSilent(self) -> None:
        """
        A wss:// address that connects and then says nothing: the line says what it waited
        for (it said "no connection in 15 s", as for an address that never answered).
        """

        class TLSUnder(protocol.Protocol):
            def getHandle(self) -> SSL.Connection:  # a handshake that got nowhere
                return SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)

        @implementer(IStreamClientEndpoint)
        class Silent:
            def __init__(self, outer: protocol.Protocol) -> None:
                self.outer = outer

            def connect(self, factory: Any) -> defer.Deferred[Any]:
                self.outer.makeConnection(StringTransport())
                return defer.succeed(self.outer)

        endpoint = self.endpoint(
            Connector(Silent(TLSUnder()), lambda f: f, "wss://a/t", "wss"),
            Connector(Silent(protocol.Protocol()), lambda f: f, "ws://b/t", "ws"),
        )
        with capturedLogs() as events:
            connecting = endpoint.connect(self.factory)
            self.clock.advance(15)
            self.clock.advance(15)
        self.failureResultOf(connecting, AllAddressesFailed)
        lines = [formatEvent(e) for e in events if "could not reach" in formatEvent(e)]
        self.assertEqual(
            lines,
            [
                "could not reach wss://a/t: connected, but the TLS handshake did not finish in "
                "15 s (is it a TLS port?)",
                "could not reach ws://b/t: connected, but the WebSocket did not open in 15 s "
                "(its HTTP request got no answer)",
            ],
        )

    def test_proxyTookTheConnectionAndSaidNothing(self) -> None:
        """
        A wss:// address through an HTTP proxy that takes the connection and never answers
        the CONNECT: the line names the proxy and what it left unanswered (it said "no
        connection in 15 s", which blames the server); the proxy connection is aborted.
        An agent stopped meanwhile logs nothing, as for any attempt it cancels.
        """
        proxy = FakeProxyEndpoint()
        tunnel = HTTPConnectEndpoint(proxy, ProxyURL.parse("http://proxy:3128"), "gc", 443)
        description = "wss://gc/t via proxy proxy:3128"
        endpoint = self.endpoint(Connector(tunnel, lambda f: f, description, "wss"))
        with capturedLogs() as events:
            connecting = endpoint.connect(self.factory)
            self.clock.advance(15)
        self.failureResultOf(connecting, AllAddressesFailed)
        self.assertTrue(proxy.transports[0].value().startswith(b"CONNECT gc:443 HTTP/1.1"))
        self.assertTrue(proxy.transports[0].disconnecting)
        lines = [formatEvent(e) for e in events if "could not reach" in formatEvent(e)]
        self.assertEqual(
            lines,
            [
                f"could not reach {description}: the proxy proxy:3128 took the connection but "
                "did not answer the CONNECT in 15 s"
            ],
        )
        with capturedLogs() as events:
            connecting = endpoint.connect(self.factory)
            connecting.cancel()
        self.failureResultOf(connecting, defer.CancelledError)
        self.assertFalse([e for e in events if "could not reach" in formatEvent(e)])

    def test_replace(self) -> None:
        """
        A new list (SIGHUP) is used by the next connect; the remembered address keeps its
        priority if it is still in the list.
        """
        endpoint = self.endpoint(connector("ssh:a", "ok"))
        self.successResultOf(endpoint.connect(self.factory))
        self.factory.links[-1].ready.callback(None)
        c, a = connector("tls:c", "ok"), connector("ssh:a", "ok")
        endpoint.replace([c, a])
        self.successResultOf(endpoint.connect(self.factory))
        self.assertEqual(endpoint.current, a)
        d, e = connector("wss:d", "ok"), connector("tls:e", "ok")
        endpoint.replace([d, e])
        self.successResultOf(endpoint.connect(self.factory))
        self.assertEqual(endpoint.current, d)

    def test_emptyListRefused(self) -> None:
        """An empty list is a configuration error, not an agent that silently never dials."""
        self.assertRaises(ValueError, self.endpoint)

    def test_corruptStateFileIgnored(self) -> None:
        """A damaged state file means "no memory", not a crash."""
        self.stateFile.parent.mkdir(parents=True)
        self.stateFile.write_text("{not json")
        endpoint = self.endpoint(connector("ssh:a", "ok"))
        self.assertEqual(endpoint.preferred, 0)

    def test_connectionLossReachesTheLink(self) -> None:
        """Once made, the link's protocol sees the connection end (ClientService relies on it)."""
        endpoint = self.endpoint(connector("ssh:a", "ok"))
        lost: list[Failure] = []
        self.successResultOf(endpoint.connect(self.factory))
        link = self.factory.links[-1]
        link.connectionLost = lost.append  # type: ignore[method-assign]
        link.transport.loseConnection()  # type: ignore[union-attr]
        link.transport.transport.protocol = None  # type: ignore[union-attr]
        link.transport.connectionLost(Failure(ConnectionError("bye")))  # type: ignore[union-attr]
        self.assertEqual(len(lost), 1)


class ConfigTests(SynchronousTestCase):
    """The agent config file and its reload on SIGHUP."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = self.directory / "agent.toml"

    def test_load(self) -> None:
        """Servers, proxy, pinned CA and tor SOCKS port are read; absent ones are empty."""
        from agent.config import AgentFileConfig, loadConfig

        self.path.write_text(
            'servers = ["tls://gc.example", "wss://gc.example/tunnel"]\n'
            'proxy = "http://u:p@proxy:3128"\ntls-ca = "/etc/ca.crt"\n'
        )
        config = loadConfig(self.path)
        self.assertEqual(config.servers, ("tls://gc.example", "wss://gc.example/tunnel"))
        self.assertEqual(config.proxy, "http://u:p@proxy:3128")
        self.assertEqual(config.tlsCA, Path("/etc/ca.crt"))
        self.path.write_text("")
        self.assertEqual(loadConfig(self.path), AgentFileConfig())

    def test_errors(self) -> None:
        """Unknown keys, bad addresses, bad TOML and a missing file are reported."""
        from agent.config import ConfigError, loadConfig

        for text in ('server = ["x"]', 'servers = ["http://x"]', "servers = [", "servers = 3"):
            self.path.write_text(text)
            self.assertRaises(ConfigError, loadConfig, self.path)
        self.assertRaises(ConfigError, loadConfig, self.directory / "missing.toml")

    def test_reloadOnSIGHUP(self) -> None:
        """
        SIGHUP schedules a re-read in the reactor thread; a change reaches C{onChange}, an
        unchanged or broken file does not (the agent keeps its working addresses).
        """
        import signal

        from agent.config import installReloadOnSIGHUP, loadConfig

        class FakeReactor:
            def __init__(self) -> None:
                self.calls: list[Any] = []

            def callFromThread(self, f: Any, *args: Any) -> None:
                self.calls.append((f, args))

        self.path.write_text('servers = ["ssh://a"]\n')
        reactor = FakeReactor()
        changes: list[Any] = []
        uninstall = installReloadOnSIGHUP(reactor, self.path, changes.append, loadConfig(self.path))
        self.addCleanup(uninstall)
        self.assertIs(signal.getsignal(signal.SIGHUP), uninstall.handler)  # type: ignore[attr-defined]

        def hup() -> None:
            uninstall.handler(signal.SIGHUP, None)  # type: ignore[attr-defined]
            for f, args in reactor.calls:
                f(*args)
            reactor.calls.clear()

        hup()
        self.assertEqual(changes, [])
        self.path.write_text('servers = ["tls://b"]\n')
        hup()
        self.assertEqual([c.servers for c in changes], [("tls://b",)])
        self.path.write_text("servers = [")
        hup()
        self.assertEqual(len(changes), 1)
        uninstall()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), uninstall.handler)  # type: ignore[attr-defined]
