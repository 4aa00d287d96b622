"""
Tests for the agent's lines about its link (agent.linklog, written by agent.link):
one line when a link comes up, naming the address and transport it was dialled on,
how it authenticated, what the key exchange chose and how long it took from the dial;
one when a link that was up ends, saying after how long and why. Once per link, not
per session.

In memory: the real agent link, kept up by its link service through the failover
endpoint, against a real groundcontrol (groundcontrol.testing.InMemoryFleet) over
iosim; over tls://, and over wss:// through an in-memory HTTP CONNECT proxy, with the
agent's own connectors and groundcontrol's listeners and a device certificate on disk.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import txaio
from twisted.conch.ssh import keys
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    PredicateResult,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel import policy
from accesstunnel.addresses import Connector, clientConnector, serverListener
from accesstunnel.durations import spokenDuration
from accesstunnel.keys import fingerprint
from accesstunnel.logfilter import MinimumLevel
from accesstunnel.timetext import isoTime
from accesstunnel.transports.proxy import ProxySettings
from accesstunnel.transports.tls import ServerTLS
from agent import linklog
from agent.failover import FailoverEndpoint
from agent.identity import ServerKeyPin
from agent.link import STOP_GRACE, AgentLinkFactory, AgentTransport, LinkSettings, linkService
from groundcontrol.testing import InMemoryFleet, publicLine, refuseForwards, scriptedSessions
from tests.test_addresses_certificate_watch import MemoryEndpoint
from tests.test_transports_tls import Fixture


class FleetEndpoint(MemoryEndpoint):
    """
    Connects to groundcontrol's C{serverFactory} over the fleet's in-memory network,
    as TCP would: the bytes move when the test flushes the fleet, not at the connect.
    """

    def __init__(self, fleet: InMemoryFleet, serverFactory: IProtocolFactory) -> None:
        super().__init__(serverFactory, fleet.clock)
        self.fleet = fleet
        self.pumps: list[iosim.IOPump] = []

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        connected = super().connect(protocolFactory)
        assert self.pump is not None
        self.fleet.network.pumps.append(self.pump)
        self.pumps.append(self.pump)
        return connected


class LinkLogCase(SynchronousTestCase):
    """A fleet, an enrolled device kiln7 and the events logged meanwhile."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        self.fleet = InMemoryFleet(clock=MemoryReactorClock())
        self.fleet.factory.doStart()  # what groundcontrol's listening port does first
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def startLink(self, connector: Connector, deviceKey: keys.Key) -> Any:
        """The agent's link service over the failover endpoint, dialling C{connector}."""
        self.settings = LinkSettings(
            name="kiln7",
            deviceKey=deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        self.factory = AgentLinkFactory(
            self.settings, self.fleet.clock, scriptedSessions(), refuseForwards
        )
        endpoint = FailoverEndpoint(
            self.fleet.clock, [connector], self.directory / "last-server.json"
        )
        service = linkService(endpoint, self.factory, self.fleet.clock)
        service.startService()
        return service

    def lines(self, text: str) -> list[LogEvent]:
        """The events logged with format C{text}."""
        return [e for e in self.events if e.get("log_format") == text]

    def linkUp(self) -> LogEvent:
        [event] = self.lines(linklog.LINK_UP)
        return event


class TCPLinkTests(LinkLogCase):
    """A link over ssh:// (TCP): its line, once, and the line of its end."""

    def setUp(self) -> None:
        super().setUp()
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.endpoint = FleetEndpoint(self.fleet, self.fleet.factory)
        connector = Connector(self.endpoint, lambda f: f, "ssh://gc.test", "ssh")
        self.service = self.startLink(connector, self.deviceKey)
        self.fleet.clock.advance(0.4)  # the handshake's time on the wire
        self.fleet.flush()
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))

    def test_lineOnceUp(self) -> None:
        """
        Once authenticated the link says, in one info line, the address and transport it
        dialled, the time from the dial, its name, key and that it presented no
        certificate, and what the key exchange chose: AES-128-GCM both ways (its MAC
        implicit), strict kex on.
        """
        event = self.linkUp()
        self.assertEqual(event["log_level"], LogLevel.info)
        expected = {
            "transport": "ssh",
            "address": "ssh://gc.test",
            "seconds": 0.4,
            "name": "kiln7",
            "keyFingerprint": fingerprint(publicLine(self.deviceKey)),
            "certificate": "no TLS, no device certificate",
            "tls": None,
            "certificateSerial": None,
            "hostKey": "ssh-ed25519",
            "strictKex": "on",
            "cipherOut": "aes128-gcm@openssh.com",
            "macOut": "<implicit>",
            "cipherIn": "aes128-gcm@openssh.com",
            "macIn": "<implicit>",
            "compression": "none",
        }
        self.assertEqual({k: event.get(k) for k in expected}, expected)
        self.assertIn(event["kex"], [k.decode() for k in policy.KEY_EXCHANGES])
        text = formatEvent(event)
        self.assertTrue(
            text.startswith("link up over ssh via ssh://gc.test in 0.40 s as kiln7: key SHA256:"),
            text,
        )
        self.assertIn(
            "strict kex on; out aes128-gcm@openssh.com MAC <implicit>, "
            "in aes128-gcm@openssh.com MAC <implicit>, compression none",
            text,
        )

    def test_notPerSession(self) -> None:
        """Sessions over the link write no more link lines."""
        aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        operator = self.fleet.operator("dev_kiln7", aliceKey)
        for _ in range(3):
            session = self.fleet.session(operator)
            self.assertTrue(session.isOpen, session.openFailure)
            session.exec(b"echo hi")
            self.fleet.flush()
        self.linkUp()
        self.assertEqual(self.lines(linklog.LINK_DOWN), [])

    def test_linkLostFromUnderIt(self) -> None:
        """
        A link cut after an hour and a bit says, at warn, how long it was up and what
        the loss said (and groundcontrol's line of the device's disconnection says how
        long too); the next link, once up, gets its own line.
        """
        for _ in range(373):
            self.fleet.clock.advance(10)
            self.fleet.flush()
        [pump] = self.endpoint.pumps
        pump.clientIO.disconnectReason = error.ConnectionLost("Connection reset by peer")
        self.fleet.network.cut(pump)
        [event] = self.lines(linklog.LINK_DOWN)
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["lastedSeconds"], 3730.0)
        self.assertEqual(
            formatEvent(event),
            "link over ssh via ssh://gc.test down after 1h02m10s: Connection to the other "
            "side was lost in a non-clean fashion: Connection reset by peer.",
        )
        [gc] = self.lines("device {device} disconnected after {lasted}")
        self.assertEqual(formatEvent(gc), "device kiln7 disconnected after 1h02m10s")
        self.assertEqual(gc["connectedFor"], 3730.0)
        self.fleet.clock.advance(60)  # the reconnect's backoff
        self.fleet.flush()
        self.assertEqual(len(self.lines(linklog.LINK_UP)), 2)

    def test_endLineWithoutTheSocket(self) -> None:
        """
        The line of a link's end says what its line when up said, without reading the
        socket again: by then Twisted's TCP has let go of it (C{getHandle} raises
        AttributeError), and a link not dialled through the failover endpoint (as
        bench/transports dials) looked for TLS there and raised instead of logging.
        """
        link = self.factory.currentLink
        link._dial = None  # as if dialled by another endpoint: no Dial to name it
        [pump] = self.endpoint.pumps

        def socketGone() -> None:
            raise AttributeError("'WriteThroughClient' object has no attribute 'socket'")

        pump.clientIO.getHandle = socketGone  # type: ignore[attr-defined]
        self.fleet.network.cut(pump)
        [event] = self.lines(linklog.LINK_DOWN)
        self.assertEqual(event["transport"], "ssh")
        self.assertEqual(event["address"], "ssh://gc.test")

    def test_groundcontrolSilent(self) -> None:
        """A link whose keepalives go unanswered ends saying groundcontrol stopped answering."""
        [pump] = self.endpoint.pumps
        self.fleet.network.pumps.remove(pump)  # nothing moves on it any more
        interval, count = self.settings.keepaliveInterval, self.settings.keepaliveCount
        for _ in range(count + 2):
            self.fleet.clock.advance(interval)
        pump.clientIO.reportDisconnect()  # the socket's close, once aborted
        [event] = self.lines(linklog.LINK_DOWN)
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(
            event["why"],
            f"groundcontrol stopped answering ({count} keepalives {interval:g} s apart)",
        )

    def test_agentStopping(self) -> None:
        """The agent stopping ends its link with a line at info that says so."""
        self.fleet.clock.advance(12)
        self.service.stopService()
        self.fleet.flush()
        [event] = self.lines(linklog.LINK_DOWN)
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["why"], linklog.AGENT_STOPPING)
        self.assertEqual(event["lasted"], "12.0 s")

    def test_factoryQuiet(self) -> None:
        """
        The link factory's start and stop, at every attempt and every link's end, are
        not logged ("Starting factory <agent.link.AgentLinkFactory object at 0x...>").
        """
        self.factory.doStart()
        self.factory.doStop()
        self.assertEqual([e for e in self.events if e.get("factory") is self.factory], [])

    def test_conchConnectionLostWrittenAtDebugOnly(self) -> None:
        """
        Conch's bare "connection lost" from the agent's link is written at debug only:
        its end's own line says more. The same event from another SSH transport is kept.
        """
        self.service.stopService()
        self.fleet.flush()
        lost = [
            e for e in self.lines("connection lost") if isinstance(e["log_source"], AgentTransport)
        ]
        self.assertEqual(len(lost), 1)
        info, debug = MinimumLevel(LogLevel.info), MinimumLevel(LogLevel.debug)
        self.assertIs(info(lost[0]), PredicateResult.no)
        self.assertIs(debug(lost[0]), PredicateResult.maybe)
        self.assertIs(info(dict(lost[0], log_source=object())), PredicateResult.maybe)


class ConnectProxy(protocol.Protocol):
    """
    An HTTP CONNECT proxy in memory: answers the request, then hands the connection
    to C{target}'s protocol (groundcontrol's listener) as if it had dialled it.
    """

    def __init__(self, target: IProtocolFactory, requests: list[bytes]) -> None:
        self.target = target
        self.requests = requests
        self.buffer = b""
        self.inner: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        head, separator, rest = self.buffer.partition(b"\r\n\r\n")
        if not separator:
            return
        self.requests.append(head.split(b"\r\n", 1)[0])
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
        self.inner = self.target.buildProtocol(iosim.FakeAddress())
        self.inner.makeConnection(self.transport)
        if rest:
            self.inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)


class SpokenDurationTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Seconds to a tenth under a minute, then minutes, hours and days, each unit padded."""
        cases = {
            0.04: "0.0 s",
            41.26: "41.3 s",
            60: "1m00s",
            725: "12m05s",
            10927: "3h02m07s",
            86400 * 9 + 4 * 3600 + 13 * 60 + 59: "9d04h13m",
        }
        self.assertEqual({s: spokenDuration(s) for s in cases}, cases)


class TLSLinkTests(LinkLogCase):
    """
    A link over tls://, or wss:// through an HTTP proxy, presenting the device
    certificate: its line names the transport, the address (and proxy), the TLS
    version and the certificate.
    """

    def setUp(self) -> None:
        super().setUp()
        # autobahn schedules its WebSocket timers through txaio's loop.
        self.patch(txaio.config, "loop", self.fleet.clock)  # type: ignore[attr-defined]
        self.pki = Fixture(self.directory / "pki")
        self.clientTLS, self.issued = self.pki.device("kiln7")
        assert self.clientTLS.clientKeyFile is not None
        self.deviceKey = keys.Key.fromFile(str(self.clientTLS.clientKeyFile))
        self.fleet.enrollDevice("kiln7", self.deviceKey)
        self.serverTLS = ServerTLS(self.pki.serverCert, self.pki.serverKey, self.pki.caFile)

    def settle(self) -> None:
        """Move the bytes; TLS sends what it wrote at the clock's next turn."""
        for _ in range(20):
            self.fleet.flush()
            self.fleet.clock.advance(0)

    def assertCertificateNamed(self, event: LogEvent) -> None:
        self.assertEqual(event["tls"], "TLSv1.3")
        self.assertEqual(event["certificateSerial"], self.issued.serialNumber)
        self.assertEqual(event["keyFingerprint"], fingerprint(self.deviceKey))
        self.assertIn(
            f"key {fingerprint(self.deviceKey)}, TLSv1.3 with device certificate "
            f"{self.issued.serialNumber} (valid until {isoTime(self.issued.notAfter)})",
            formatEvent(event),
        )

    def startTLS(self) -> Any:
        """The agent's link service over tls://, dialled; its link not up yet."""
        listener = serverListener(self.fleet.clock, "tls://127.0.0.1:0", self.serverTLS)
        connector = clientConnector(self.fleet.clock, "tls://127.0.0.1:443", self.clientTLS)
        self.endpoint = FleetEndpoint(self.fleet, listener.wrapFactory(self.fleet.factory))
        connector.endpoint.inner = self.endpoint  # type: ignore[attr-defined]
        return self.startLink(connector, self.deviceKey)

    def test_tls(self) -> None:
        """Over tls:// directly."""
        self.startTLS()
        self.fleet.clock.advance(1.5)
        self.settle()
        event = self.linkUp()
        self.assertEqual(event["transport"], "tls")
        self.assertEqual(event["address"], "tls://127.0.0.1:443")
        self.assertEqual(event["seconds"], 1.5)
        self.assertCertificateNamed(event)

    def test_tlsStop(self) -> None:
        """
        The agent stopping closes its link over tls:// at once: TLS sends its close alert
        with the link's back-pressure attached (Twisted's TLS waits for a producer
        registered with it to let go; accesstunnel.linkflow registers under it), and the
        line of the link's end says the agent stopped.
        """
        service = self.startTLS()
        self.fleet.clock.advance(1.5)
        self.settle()
        self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
        stopped = service.stopService()
        self.settle()
        self.assertTrue(stopped.called)
        [event] = self.lines(linklog.LINK_DOWN)
        self.assertEqual(event["why"], linklog.AGENT_STOPPING)
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))

    def test_stopWithGroundcontrolSilent(self) -> None:
        """
        Stopping while groundcontrol does not answer (frozen, or the network gone): TLS's
        close waits for an answer that never comes, so the link is aborted after
        STOP_GRACE and the stop ends.
        """
        service = self.startTLS()
        self.fleet.clock.advance(1.5)
        self.settle()
        [pump] = self.endpoint.pumps
        self.fleet.network.pumps.remove(pump)  # nothing moves on it any more
        stopped = service.stopService()
        self.fleet.clock.advance(STOP_GRACE - 0.1)
        self.assertFalse(pump.clientIO.disconnecting)  # TLS waits for the server's alert
        self.fleet.clock.advance(0.1)
        self.assertTrue(pump.clientIO.disconnecting)  # aborted
        self.assertFalse(stopped.called)
        pump.clientIO.reportDisconnect()  # the socket's close, once aborted
        self.assertTrue(stopped.called)

    def test_wssThroughProxy(self) -> None:
        """Over wss:// through an HTTP CONNECT proxy, which the line names by host."""
        listener = serverListener(self.fleet.clock, "wss://127.0.0.1:0/tunnel", self.serverTLS)
        requests: list[bytes] = []
        connector = clientConnector(
            self.fleet.clock,
            "wss://127.0.0.1:443/tunnel",
            self.clientTLS,
            proxy=ProxySettings(httpsProxy="http://proxy.test:3128"),
        )
        target = listener.wrapFactory(self.fleet.factory)
        proxyFactory = protocol.Factory.forProtocol(lambda: ConnectProxy(target, requests))
        connector.endpoint.inner.proxyEndpoint = FleetEndpoint(  # type: ignore[attr-defined]
            self.fleet, proxyFactory
        )
        self.startLink(connector, self.deviceKey)
        self.fleet.clock.advance(2.25)
        self.settle()
        self.assertEqual(requests, [b"CONNECT 127.0.0.1:443 HTTP/1.1"])
        event = self.linkUp()
        self.assertEqual(event["transport"], "wss")
        self.assertEqual(event["address"], "wss://127.0.0.1:443/tunnel via proxy proxy.test:3128")
        self.assertEqual(event["seconds"], 2.25)
        self.assertCertificateNamed(event)
        self.assertTrue(
            formatEvent(event).startswith(
                "link up over wss via wss://127.0.0.1:443/tunnel via proxy proxy.test:3128 "
                "in 2.25 s as kiln7: key SHA256:"
            )
        )
