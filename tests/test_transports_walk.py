"""
What a fleet operator meets when configuring the transports, as found by walking them
(session 17): IPv6 addresses written sanely in logs and records, an unusable proxy
setting refused with a message that names it (and never shows its password), and a
proxy or tor that cannot be reached named as the culprit.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.conch.ssh.address import SSHTransportAddress
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import (
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from accesstunnel.addresses import (
    AddressError,
    clientConnector,
    describeAddress,
    hostPort,
    parseAddress,
    serverListener,
)
from accesstunnel.transports.dualstack import IPv6OnlyEndpoint, ipv4WildcardPorts
from accesstunnel.transports.proxy import HTTPConnectEndpoint, ProxySettings, ProxyURL
from accesstunnel.transports.socks import SOCKS5Endpoint
from accesstunnel.transports.tor import TorSettings
from accesstunnel.transports.tunnel import ProxyError
from tests.test_transports_proxy import FakeProxyEndpoint, Recorder


class AddressTextTests(SynchronousTestCase):
    """host:port as people read it, whatever the family."""

    def test_unbracketedIPv6(self) -> None:
        """ssh://::1:22 or a proxy at http://::1:3128: the error says to use brackets."""
        with self.assertRaises(AddressError) as caught:
            parseAddress("ssh://2001:db8::1:22")
        self.assertIn("in brackets", str(caught.exception))
        with self.assertRaises(ValueError) as parsed:
            ProxyURL.parse("http://::1:3128")
        self.assertIn("in brackets", str(parsed.exception))
        with self.assertRaises(AddressError) as caught:
            parseAddress("ssh://gc.example:22x")
        self.assertNotIn("brackets", str(caught.exception))

    def test_bracketsInEndpointStrings(self) -> None:
        """
        --tor-socks tcp:[::1]:9050 (and --listen/--server endpoint strings) take an IPv6
        literal in brackets like every other address; before, Twisted's parser failed with
        a TypeError about TCP4ClientEndpoint's arguments, a traceback at start.
        """
        reactor = MemoryReactorClock()
        tor = TorSettings(socks="tcp:[::1]:9050")
        endpoint = clientConnector(reactor, "tor://abcdef.onion", tor=tor).endpoint
        socks: Any = endpoint.proxyEndpoint  # type: ignore[attr-defined]
        self.assertEqual((socks._host, socks._port), ("::1", 9050))
        listener: Any = serverListener(reactor, "tcp:2222:interface=[::1]").endpoint
        self.assertEqual(listener._interface, "::1")
        with self.assertRaises(AddressError) as caught:
            clientConnector(reactor, "tor://abcdef.onion", tor=TorSettings(socks="tcp:[::1]"))
        self.assertIn("bad endpoint string 'tcp:[::1]'", str(caught.exception))

    def test_zoneInURL(self) -> None:
        """An IPv6 zone is written %25 in a URL (RFC 6874) and means '%'."""
        self.assertEqual(parseAddress("ssh://[fe80::1%25eth0]:22").host, "fe80::1%eth0")

    def test_hostPort(self) -> None:
        """An IPv6 literal is bracketed; names and IPv4 are not."""
        self.assertEqual(hostPort("::1", 22), "[::1]:22")
        self.assertEqual(hostPort("2001:db8::7", "443"), "[2001:db8::7]:443")
        self.assertEqual(hostPort("127.0.0.1", 22), "127.0.0.1:22")
        self.assertEqual(hostPort("gc.example", 22), "gc.example:22")

    def test_describeAddress(self) -> None:
        """
        A peer of either family, wrapped by Conch or not; an IPv4 client of a dual-stack
        [::] listener shows as its IPv4 address; an address without a host prints as is.
        """
        v6 = IPv6Address("TCP", "::1", 5555)
        self.assertEqual(describeAddress(v6), "[::1]:5555")
        self.assertEqual(describeAddress(SSHTransportAddress(v6)), "[::1]:5555")
        self.assertEqual(describeAddress(IPv4Address("TCP", "10.0.0.2", 22)), "10.0.0.2:22")
        mapped = IPv6Address("TCP", "::ffff:192.0.2.9", 40000)
        self.assertEqual(describeAddress(mapped), "192.0.2.9:40000")
        unix = UNIXAddress(b"/run/gc.sock")
        self.assertEqual(describeAddress(unix), str(unix))

    def test_proxyInTheDescription(self) -> None:
        """
        The connector's description (the agent's log lines) brackets an IPv6 proxy: 'via
        proxy ::1:3128' read as a port of the address.
        """
        proxy = ProxySettings(httpsProxy="http://[::1]:3128")
        connector = clientConnector(MemoryReactorClock(), "wss://[2001:db8::7]/t", None, proxy)
        self.assertEqual(connector.description, "wss://[2001:db8::7]/t via proxy [::1]:3128")
        inner = connector.endpoint.inner  # type: ignore[attr-defined]
        self.assertIsInstance(inner, HTTPConnectEndpoint)
        self.assertIn("[2001:db8::7]:443 via [::1]:3128", repr(inner))


class ProxySettingTests(SynchronousTestCase):
    """An unusable proxy setting is a clear error naming it, with no password in it."""

    def connector(self, environ: dict[str, str], override: str | None = None) -> Any:
        settings = ProxySettings.fromEnvironment(environ, override)
        return clientConnector(MemoryReactorClock(), "wss://gc.example/t", None, settings)

    def test_unsupportedScheme(self) -> None:
        """
        HTTPS_PROXY=socks5h://... (curl's) is an AddressError naming the variable (the agent
        prints it as a usage error), not a ValueError traceback from deep in the parser.
        """
        with self.assertRaises(AddressError) as caught:
            self.connector({"HTTPS_PROXY": "socks5h://127.0.0.1:1080"})
        self.assertIn("HTTPS_PROXY", str(caught.exception))
        self.assertIn("only http:// proxies", str(caught.exception))

    def test_whichSettingIsNamed(self) -> None:
        """Lower case wins, as in curl, and is the one named; --proxy wins over both."""
        with self.assertRaises(AddressError) as caught:
            self.connector({"https_proxy": "https://p:1", "HTTPS_PROXY": "http://ok:1"})
        self.assertIn("https_proxy", str(caught.exception))
        with self.assertRaises(AddressError) as caught:
            self.connector({"https_proxy": "http://ok:1"}, override="ftp://p:1")
        self.assertIn("--proxy", str(caught.exception))

    def test_passwordNotShown(self) -> None:
        """
        A password with an unescaped '#' splits the URL; the error says so without the
        password (the message goes to the log and the terminal).
        """
        with self.assertRaises(AddressError) as caught:
            self.connector({"HTTPS_PROXY": "http://agent:pa#ss@proxy:3128"})
        message = str(caught.exception)
        self.assertNotIn("pa#ss", message)
        self.assertNotIn("ss@proxy", message)
        self.assertIn("percent-escape", message)
        with self.assertRaises(ValueError) as parsed:
            ProxyURL.parse("https://agent:s3cret@proxy:3128")
        self.assertNotIn("s3cret", str(parsed.exception))
        self.assertIn("agent:***@proxy:3128", str(parsed.exception))

    def test_percentEncodedPasswordWorks(self) -> None:
        """The fix for the above: every special character percent-encoded comes through."""
        url = ProxyURL.parse("http://agent:p%40ss%3Aw%2Frd%25%23%3F%26%C3%A9%20%2B@[::1]:3128")
        self.assertEqual((url.host, url.port, url.password), ("::1", 3128, "p@ss:w/rd%#?&é +"))

    def test_unusableProxyOnlyMattersWhereUsed(self) -> None:
        """A bad HTTP_PROXY does not stop wss:// (HTTPS_PROXY) or a NO_PROXY host."""
        settings = ProxySettings.fromEnvironment(
            {"HTTP_PROXY": "socks5://x:1", "HTTPS_PROXY": "http://p:3128", "NO_PROXY": "direct"}
        )
        self.assertIsNotNone(settings.proxyFor("wss", "gc.example", 443))
        self.assertIsNone(settings.proxyFor("ws", "gc.direct", 80))
        self.assertRaises(ValueError, settings.proxyFor, "ws", "gc.example", 80)

    def test_badTorName(self) -> None:
        """A name SOCKS cannot carry is an AddressError, not a ValueError traceback."""
        self.assertRaises(
            AddressError,
            clientConnector,
            MemoryReactorClock(),
            "tor://" + "a" * 300 + ".onion",
            tor=TorSettings(),
        )


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    """Nothing listens there."""

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        return defer.fail(error.ConnectionRefusedError("111: Connection refused"))


class UnreachableProxyTests(SynchronousTestCase):
    """The proxy itself not answering is reported as the proxy's problem."""

    def test_torNotRunning(self) -> None:
        """
        tor not running: 'cannot reach tor's SOCKS port tcp:...: connection refused'
        instead of a bare 'Connection refused' after the onion's address.
        """
        connector = clientConnector(
            MemoryReactorClock(), "tor://abcdef.onion", tor=TorSettings(socks="tcp:127.0.0.1:9")
        )
        endpoint = connector.endpoint
        assert isinstance(endpoint, SOCKS5Endpoint)
        endpoint.proxyEndpoint = RefusingEndpoint()
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Recorder)), ProxyError)
        message = str(failure.value)
        self.assertIn("tor's SOCKS port tcp:127.0.0.1:9", message)
        self.assertIn("is tor running", message)
        self.assertIn("Connection refused", message)

    def test_httpProxyDown(self) -> None:
        """The HTTP proxy's address, bracketed, is in the message."""
        endpoint = HTTPConnectEndpoint(
            RefusingEndpoint(), ProxyURL.parse("http://[::1]:3128"), "gc.example", 443
        )
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Recorder)), ProxyError)
        self.assertIn("cannot reach the proxy [::1]:3128", str(failure.value))

    def test_cancelStaysACancel(self) -> None:
        """A connect given up on (the failover's timeout) is still a cancel, not a ProxyError."""
        waiting: defer.Deferred[Any] = defer.Deferred()

        @implementer(IStreamClientEndpoint)
        class Hanging:
            def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
                return waiting

        endpoint = SOCKS5Endpoint(Hanging(), "abcdef.onion", 22)
        d = endpoint.connect(Factory.forProtocol(Recorder))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    def test_connectToIPv6(self) -> None:
        """CONNECT names an IPv6 server in brackets, in the request line and Host."""
        proxy = FakeProxyEndpoint()
        endpoint = HTTPConnectEndpoint(proxy, ProxyURL.parse("http://p:1"), "2001:db8::7", 443)
        endpoint.connect(Factory.forProtocol(Recorder))
        request = proxy.transports[0].value()
        self.assertTrue(request.startswith(b"CONNECT [2001:db8::7]:443 HTTP/1.1\r\n"))
        self.assertIn(b"\r\nHost: [2001:db8::7]:443\r\n", request)

    def test_authenticationHint(self) -> None:
        """A 407 says whether credentials are missing or were refused (never the password)."""
        for url, expected in (
            ("http://p:1", "the proxy wants credentials"),
            ("http://agent:s3cret@p:1", "it refused the credentials of 'agent'"),
        ):
            proxy = FakeProxyEndpoint()
            endpoint = HTTPConnectEndpoint(proxy, ProxyURL.parse(url), "gc.example", 443)
            d = endpoint.connect(Factory.forProtocol(Recorder))
            proxy.protocols[0].dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            message = str(self.failureResultOf(d, ProxyError).value)
            self.assertIn(expected, message)
            self.assertNotIn("s3cret", message)

    def test_connectedProxyUnchanged(self) -> None:
        """Once the proxy answers, its own refusals read as before."""
        proxy = FakeProxyEndpoint()
        endpoint = HTTPConnectEndpoint(proxy, ProxyURL.parse("http://p:1"), "gc.example", 443)
        d = endpoint.connect(Factory.forProtocol(Recorder))
        proxy.protocols[0].dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        failure = self.failureResultOf(d, ProxyError)
        self.assertIn("the proxy refused CONNECT: HTTP/1.1 407", str(failure.value))


class IPv6PeerRecordTests(SynchronousTestCase):
    """groundcontrol's records and logs of an IPv6 peer (an operator on ssh -6)."""

    def test_sessionClient(self) -> None:
        """A session's client (ctl sessions, the audit) is '[2001:db8::5]:PORT'."""
        from groundcontrol.sessions import SessionRegistry, attachSessions
        from groundcontrol.testing import (
            FakeOperator,
            InMemoryFleet,
            echoScript,
            resultNow,
            scriptedSessions,
        )

        fleet = InMemoryFleet()
        attachSessions(fleet.registry, SessionRegistry(fleet.store, fleet.clock))
        deviceKey = fleet.enrollDevice("kiln7")
        operatorKey = fleet.addOperator("alice")
        fleet.grant("alice", "kiln7")
        fleet.agent("kiln7", deviceKey, scriptedSessions(echoScript))
        operator = FakeOperator("dev_kiln7", operatorKey, hostKey=fleet.hostKey)
        fleet.network.connect(fleet.factory, operator, clientHost="2001:db8::5")
        session = fleet.session(operator)
        session.exec(b"hello")
        fleet.flush()
        fleet.clock.advance(0)
        fleet.flush()
        ended = [e for e in resultNow(fleet.store.auditSince(0, 100)) if e.event == "session.ended"]
        self.assertEqual(len(ended), 1)
        self.assertRegex(ended[0].detail["client"], r"^\[2001:db8::5\]:\d+$")

    def test_listeningLine(self) -> None:
        """groundcontrol's 'listening on' line brackets an IPv6 address."""
        from twisted.logger import capturedLogs, formatEvent

        from groundcontrol.listening import ListenService

        class Port:
            def getHost(self) -> IPv6Address:
                return IPv6Address("TCP", "::1", 2222)

        @implementer(IStreamServerEndpoint)
        class Endpoint:
            def listen(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
                return defer.succeed(Port())

        service = ListenService(Endpoint(), Factory(), "ssh://[::1]:2222")
        with capturedLogs() as seen:
            service.startService()
        lines = [formatEvent(e) for e in seen if "listening on" in e.get("log_format", "")]
        self.assertEqual(lines, ["listening on [::1]:2222 (ssh://[::1]:2222)"])


def ipv6Available() -> bool:
    """Whether this host can bind ::1 (containers without IPv6 cannot)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


class BothFamiliesTests(SynchronousTestCase):
    """--listen ssh://0.0.0.0:P --listen ssh://[::]:P, as in sshd_config, both listen."""

    both = ("ssh://0.0.0.0:2222", "ssh://[::]:2222")

    def test_ipv4WildcardPorts(self) -> None:
        """The forms of 'every IPv4 interface' a --listen list can hold."""
        self.assertEqual(
            ipv4WildcardPorts(
                [
                    "ssh://0.0.0.0:22",
                    "tls://:443",
                    "wss://0.0.0.0:8443/t",
                    "tcp:2222",
                    "tcp:2223:interface=0.0.0.0",
                    "tcp:2224:interface=127.0.0.1",
                    "ssh://127.0.0.1:2225",
                    "ssh://[::]:2226",
                    "tor://:22",
                    "not a url://x",
                ]
            ),
            {22, 443, 8443, 2222, 2223},
        )

    def test_ipv6OnlyBesideIPv4(self) -> None:
        """[::] is IPv6-only next to 0.0.0.0 on its port; alone, or on another port, not."""
        reactor = MemoryReactorClock()
        listener = serverListener(reactor, "ssh://[::]:2222", alongside=self.both)
        self.assertIsInstance(listener.endpoint, IPv6OnlyEndpoint)
        self.assertEqual(listener.endpoint.port, 2222)  # type: ignore[attr-defined]
        for alongside in ((), ("ssh://[::]:2222",), ("ssh://0.0.0.0:22", "ssh://[::]:2222")):
            listener = serverListener(reactor, "ssh://[::]:2222", alongside=alongside)
            self.assertFalse(isinstance(listener.endpoint, IPv6OnlyEndpoint), alongside)
        listener = serverListener(reactor, "ssh://0.0.0.0:2222", alongside=self.both)
        self.assertNotIsInstance(listener.endpoint, IPv6OnlyEndpoint)

    def test_webSocketToo(self) -> None:
        """The WebSocket (and TLS) listeners sit on the same kind of TCP endpoint."""
        listener = serverListener(
            MemoryReactorClock(),
            "ws://[::]:8080/t",
            alongside=("ws://0.0.0.0:8080/t", "ws://[::]:8080/t"),
        )
        self.assertIsInstance(listener.endpoint, IPv6OnlyEndpoint)

    def test_bothBind(self) -> None:
        """
        The IPv6-only socket leaves the IPv4 wildcard free on the same port: without
        IPV6_V6ONLY the second bind failed with EADDRINUSE (Linux, bindv6only=0).

        The wildcards are bound in a network namespace of the test's own (C{unshare
        --net}: only its own loopback, down), never on the host's interfaces, where they
        would listen on every address and a port picked for IPv6 may already be another
        program's on IPv4 (the test failed so, now and then, with EADDRINUSE).
        """
        if not ipv6Available():
            raise SkipTest("no IPv6 on this host")
        if shutil.which("unshare") is None:
            raise SkipTest("no unshare(1) to make a network namespace")
        bothBind = (
            "import socket\n"
            "from twisted.internet.protocol import Factory\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from accesstunnel.transports.dualstack import _IPv6OnlyPort\n"
            "port = _IPv6OnlyPort(0, Factory(), 5, '::', MemoryReactorClock())\n"
            "with port.createInternetSocket() as v6:\n"
            "    v6.bind(('::', 0))\n"
            "    v6.listen(1)\n"
            "    with socket.socket(socket.AF_INET) as v4:\n"
            "        v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "        v4.bind(('0.0.0.0', v6.getsockname()[1]))\n"
            "print('both bound')\n"
        )
        try:
            result = subprocess.run(
                ["unshare", "--net", "--", sys.executable, "-c", bothBind],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=Path(__file__).resolve().parent.parent,
            )
        except subprocess.TimeoutExpired:
            self.fail("the binds in a namespace of their own did not finish in 60 s")
        if result.returncode != 0 and "unshare failed" in result.stderr:
            raise SkipTest(f"cannot make a network namespace here: {result.stderr.strip()}")
        self.assertEqual(
            (result.returncode, result.stdout.strip()), (0, "both bound"), result.stderr
        )


class RememberedAddressTests(SynchronousTestCase):
    """The address that worked last, across restarts, whatever proxy it went through."""

    def test_proxyChanged(self) -> None:
        """
        An agent that linked over wss:// through one proxy and restarts with another (the
        device moved; HTTPS_PROXY changed) still tries that wss:// address first. Before,
        the remembered text included 'via proxy HOST:PORT' and no longer matched, so the
        walk began again at the first address (15 s per silent one). Files written before
        (the whole description) are still understood.
        """
        from agent.failover import FailoverEndpoint

        state = Path(self.mktemp()) / "last-server.json"
        reactor = MemoryReactorClock()

        def connectors(proxy: str) -> list[Any]:
            settings = ProxySettings(httpsProxy=proxy)
            return [
                clientConnector(reactor, "ssh://gc.example", None, settings),
                clientConnector(reactor, "wss://gc.example/t", None, settings),
            ]

        first = connectors("http://proxy-a:3128")
        endpoint = FailoverEndpoint(reactor, first, state)
        endpoint._worked(first[1])
        self.assertEqual(json.loads(state.read_text()), {"address": "wss://gc.example/t"})
        moved = FailoverEndpoint(reactor, connectors("http://proxy-b:8080"), state)
        self.assertEqual(moved.preferred, 1)
        state.write_text(json.dumps({"address": first[1].description}))
        self.assertEqual(FailoverEndpoint(reactor, first, state).preferred, 1)


class SilentAddressTests(SynchronousTestCase):
    """A server address whose packets vanish (a firewall dropping SYNs)."""

    def test_timeoutSaysSo(self) -> None:
        """
        HostnameEndpoint fails a cancelled connect with ConnectingCancelledError: the
        failover's line reads 'no connection in 15 s', and the next address is tried.
        """
        from twisted.internet.address import HostnameAddress
        from twisted.internet.task import Clock
        from twisted.logger import capturedLogs, formatEvent

        from accesstunnel.addresses import Connector
        from agent.failover import FailoverEndpoint
        from tests.test_failover import LinkFactory, ScriptedEndpoint

        @implementer(IStreamClientEndpoint)
        class Silent:
            def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
                def cancel(d: defer.Deferred[Any]) -> None:
                    d.errback(error.ConnectingCancelledError(HostnameAddress(b"10.0.0.9", 22)))

                return defer.Deferred(cancel)

        clock = Clock()
        silent = Connector(Silent(), lambda f: f, "ssh://10.0.0.9", "ssh")
        working = Connector(ScriptedEndpoint("ok"), lambda f: f, "ssh://10.0.0.10", "ssh")
        state = self.mktemp()
        endpoint = FailoverEndpoint(clock, [silent, working], Path(state) / "last.json")
        with capturedLogs() as events:
            d = endpoint.connect(LinkFactory())
            clock.advance(15.1)
        self.successResultOf(d)
        lines = [formatEvent(e) for e in events if "could not reach" in e.get("log_format", "")]
        self.assertEqual(lines, ["could not reach ssh://10.0.0.9: no connection in 15 s"])


class _FakeOnion:
    def __init__(self, hostname: str, privateKey: str) -> None:
        self.hostname = hostname
        self.private_key = privateKey
        self.removed = False

    def remove(self) -> defer.Deferred[None]:
        self.removed = True
        return defer.succeed(None)


class _FakeTor:
    """What txtorcon.connect gives: create_onion_service, and the control protocol."""

    def __init__(self) -> None:
        self.gone: defer.Deferred[None] = defer.Deferred()
        self.protocol = self
        self.added: list[dict[str, Any]] = []
        self.onion: _FakeOnion | None = None

    def when_disconnected(self) -> defer.Deferred[None]:
        return self.gone

    def create_onion_service(self, **kwargs: Any) -> defer.Deferred[_FakeOnion]:
        self.added.append(kwargs)
        self.onion = _FakeOnion("abcdef.onion", kwargs["private_key"] or "ED25519-V3:KEY")
        return defer.succeed(self.onion)


class OnionRepublishTests(SynchronousTestCase):
    """groundcontrol's onion service when the tor that hosts it restarts."""

    def setUp(self) -> None:
        import txtorcon

        self.answers: list[Any] = []
        self.patch(txtorcon, "connect", lambda reactor, endpoint: self.answers.pop(0))
        self.reactor = MemoryReactorClock()

    def test_publishedAgainWithTheSameKey(self) -> None:
        """
        tor's control connection lost: logged, and once tor answers again (retrying with
        a growing delay) the service is added again with the same key, on the same local
        port, so the .onion agents dial works again; a stopped listener retries no more.
        """
        from twisted.logger import capturedLogs, formatEvent

        from accesstunnel.transports.tor import OnionServerEndpoint

        first, second = _FakeTor(), _FakeTor()
        self.answers.append(defer.succeed(first))
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings())
        port: Any = self.successResultOf(endpoint.listen(Factory()))
        self.assertEqual(port.getHost().host, "abcdef.onion")
        [added] = first.added
        with capturedLogs() as events:
            first.gone.errback(error.ConnectionLost("tor restarted"))
            self.answers.append(defer.fail(error.ConnectionRefusedError("tor starting")))
            self.reactor.advance(1)
            self.answers.append(defer.succeed(second))
            self.reactor.advance(1.9)
            self.assertEqual(second.added, [])
            self.reactor.advance(0.1)
        self.assertEqual(second.added, [{**added, "private_key": "ED25519-V3:KEY"}])
        self.assertEqual(port.getHost().host, "abcdef.onion")
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("lost tor's control port tcp:127.0.0.1:9051", text)
        self.assertIn("cannot publish the onion service yet", text)
        self.assertIn("onion service abcdef.onion:2222 published", text)

        self.successResultOf(port.stopListening())
        assert second.onion is not None
        self.assertTrue(second.onion.removed)
        second.gone.errback(error.ConnectionLost("tor stopped"))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_torNotRunningAtStart(self) -> None:
        """
        tor's control port not answering when groundcontrol starts leaves the listener up
        but unpublished (groundcontrol's other listeners serve; tests/test_tor_startup.py),
        with a reason that names the port and what tor needs.
        """
        from twisted.logger import capturedLogs

        from accesstunnel.transports.tor import OnionServerEndpoint

        self.answers.append(defer.fail(error.ConnectionRefusedError("111: Connection refused")))
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings())
        with capturedLogs():
            port: Any = self.successResultOf(endpoint.listen(Factory()))
        message = port.notReadyBecause
        self.assertIn("cannot reach tor's control port tcp:127.0.0.1:9051", message)
        self.assertIn("ControlPort", message)
        self.assertIn("Connection refused", message)
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_torNotRunningMessageEndsWithoutAPeriod(self) -> None:
        """
        The refusal ends without Twisted's period, so groundcontrol's line after it reads
        '...: Connection refused; listening on ...', and the retry's '(...refused); trying
        again'.
        """
        from twisted.logger import capturedLogs, formatEvent

        from accesstunnel.transports.tor import OnionServerEndpoint

        self.answers.append(defer.fail(error.ConnectionRefusedError("111: Connection refused")))
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings())
        with capturedLogs():
            waiting: Any = self.successResultOf(endpoint.listen(Factory()))
        self.successResultOf(waiting.stopListening())
        self.assertEqual(
            waiting.notReadyBecause,
            "cannot reach tor's control port tcp:127.0.0.1:9051 (is tor running, with "
            "ControlPort and CookieAuthentication 1?): Connection was refused by other side: "
            "111: Connection refused",
        )

        first = _FakeTor()
        self.answers.append(defer.succeed(first))
        port: Any = self.successResultOf(endpoint.listen(Factory()))
        with capturedLogs() as events:
            first.gone.errback(error.ConnectionLost("tor restarted"))
            self.answers.append(defer.fail(error.ConnectionRefusedError("111: Connection refused")))
            self.reactor.advance(1)
        self.assertIn(
            "cannot publish the onion service yet (cannot reach tor's control port "
            "tcp:127.0.0.1:9051 (is tor running, with ControlPort and CookieAuthentication 1?): "
            "Connection was refused by other side: 111: Connection refused); trying again",
            [formatEvent(e) for e in events],
        )
        self.successResultOf(port.stopListening())

    def test_deviceSource(self) -> None:
        """
        A device linked over IPv6: the source device show prints ('online since ... from')
        and a pending request records is '[2001:db8::7]:PORT', as sshserver writes it.
        """
        from groundcontrol.testing import FakeAgentFactory, InMemoryFleet

        fleet = InMemoryFleet()
        deviceKey = fleet.enrollDevice("kiln7")
        agent = FakeAgentFactory("kiln7", deviceKey, None, fleet.hostKey, fleet.clock)
        fleet.network.connect(fleet.factory, agent, clientHost="2001:db8::7")
        link: Any = fleet.registry.lookup("kiln7")
        self.assertRegex(link.avatar.source, r"^\[2001:db8::7\]:\d+$")
