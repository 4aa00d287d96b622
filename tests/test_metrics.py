"""
Metrics in memory: an instrumented InMemoryFleet on a Clock; gauges read the live state,
counters move on sessions, logins and refused keys, the front door's refusals and
handshakes are read from the limiter and the penalties, and the exposition text says so.
"""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.limiter import HandshakeLimiter
from groundcontrol.metrics import Metrics, instrumentFactory
from groundcontrol.preauth import PenaltyPolicy, PreauthGuard, guardOf
from groundcontrol.sessions import SessionRegistry, attachSessions
from groundcontrol.testing import FakeOperator, InMemoryFleet, newKey


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.metrics = Metrics()
        self.sessions = attachSessions(
            self.fleet.registry, SessionRegistry(self.fleet.store, self.fleet.clock)
        )
        self.metrics.watch(self.fleet.registry, self.sessions)
        self.sessions.metrics = self.metrics
        instrumentFactory(self.fleet.factory, self.metrics)
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_agentsConnectedGauge(self) -> None:
        """groundcontrol_agents_connected follows the registry, read at scrape time."""
        self.assertEqual(self.value("groundcontrol_agents_connected"), 0)
        self.fleet.agent("kiln7", self.deviceKey)
        self.assertEqual(self.value("groundcontrol_agents_connected"), 1)
        self.assertEqual(self.value("groundcontrol_agents_pending"), 0)
        self.fleet.agent("newbie", newKey())
        self.assertEqual(self.value("groundcontrol_agents_pending"), 1)

    def test_handshakeDurations(self) -> None:
        """Each login is timed, labelled by kind of peer, from accept to ssh-connection."""
        self.fleet.agent("kiln7", self.deviceKey)
        self.fleet.operator("dev_kiln7", self.aliceKey)
        self.assertEqual(self.value("groundcontrol_handshake_seconds_count", peer="agent"), 1)
        self.assertEqual(self.value("groundcontrol_handshake_seconds_count", peer="operator"), 1)
        # The in-memory clock did not move: every handshake took 0 s.
        self.assertEqual(self.value("groundcontrol_handshake_seconds_sum", peer="operator"), 0)

    def test_authFailuresCounted(self) -> None:
        """A key nobody owns counts as one failure; the 'none' probe and key queries do not."""
        self.fleet.operator("dev_kiln7", self.aliceKey)
        self.assertEqual(self.value("groundcontrol_auth_failures_total"), 0)
        self.fleet.operator("dev_kiln7", newKey())
        self.assertEqual(self.value("groundcontrol_auth_failures_total"), 1)

    def test_sessionsAndBytes(self) -> None:
        """A session counts while live, then in the total, with its bytes added at close."""
        self.fleet.agent("kiln7", self.deviceKey)
        operator = self.fleet.operator("dev_kiln7", self.aliceKey)
        session = self.fleet.session(operator)
        session.exec(b"cat")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        session.conn.sendData(session, b"12345")
        self.fleet.flush()
        self.assertEqual(self.value("groundcontrol_sessions_live"), 1)
        self.assertEqual(self.value("groundcontrol_sessions_total", type="session"), 1)
        # Bytes are counted at the end, not per packet.
        self.assertIsNone(self.value("groundcontrol_relayed_bytes_total", direction="to_device"))
        session.sendEOF()
        self.fleet.flush()
        self.assertEqual(self.value("groundcontrol_sessions_live"), 0)
        self.assertEqual(self.value("groundcontrol_sessions_ended_total"), 1)
        self.assertEqual(self.value("groundcontrol_relayed_bytes_total", direction="to_device"), 5)
        self.assertEqual(
            self.value("groundcontrol_relayed_bytes_total", direction="to_operator"), 5
        )
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn('groundcontrol_sessions_total{type="session"} 1.0', text)


class _Mute(protocol.Protocol):
    """A client that connects and says nothing (a banner grab, a TCP health check)."""


class _StalledAgent(protocol.Protocol):
    """A client that sends our agent's version line and then nothing more."""

    def connectionMade(self) -> None:
        self.transport.write(b"SSH-2.0-AccessTunnelAgent_0.1.0 Twisted_26.10.0\r\n")  # type: ignore[union-attr]


class FrontDoorMetricsTests(SynchronousTestCase):
    """
    What the handshake limiter and the per-source penalties count, scraped: connections
    refused (at accept by the limiter; at the door for a penalised source, by reason),
    handshakes in progress and waiting by pool, and the sources refused now.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        policy = PenaltyPolicy(freeFailures=1, earlyCloseAllowance=2)
        self.fleet.factory.preauthGuard = PreauthGuard(self.fleet.clock, penalties=policy)
        # Two agents' slots and one operator's (not lent: its floor is all of it).
        self.limiter = HandshakeLimiter(
            self.fleet.factory, maxPending=3, operatorReserve=1, maxWaitingPerSource=2
        )
        self.metrics = Metrics()
        self.metrics.watchFrontDoor(guardOf(self.fleet.factory).penalties, self.limiter)

    def connect(
        self, client: protocol.ClientFactory | type[protocol.Protocol], host: str
    ) -> iosim.IOPump:
        """Connect C{client} (a factory, or a protocol class) from C{host} through the limiter."""
        if not isinstance(client, protocol.ClientFactory):
            client = protocol.ClientFactory.forProtocol(client)
        return self.fleet.network.connect(self.limiter, client, clientHost=host)

    def scrape(self) -> dict[tuple[str, str], float]:
        """Parse the exposition text as Prometheus would: (name, labels) -> value."""
        samples = {}
        for family in text_string_to_metric_families(
            generate_latest(self.metrics.registry).decode()
        ):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[(sample.name, labels)] = sample.value
        return samples

    def test_scraped(self) -> None:
        """
        Two banner grabs from 127.0.0.2 use its early-close allowance, so its third
        connection is refused at the door; two failed logins from 127.0.0.3 penalise
        it, so its next is refused too. Then five stalled agents from one address: two
        in their handshake, two waiting, one closed at accept by the limiter; a silent
        client from another address (while agents wait) awaits its version line. The
        scrape says all of it, and the two sources refused now.
        """
        for _ in range(3):
            self.fleet.network.cut(self.connect(_Mute, "127.0.0.2"))
        for _ in range(3):
            self.connect(FakeOperator("ctl", newKey(), hostKey=self.fleet.hostKey), "127.0.0.3")
        for _ in range(5):
            self.connect(_StalledAgent, "192.0.2.9")
        self.connect(_Mute, "192.0.2.10")
        samples = self.scrape()
        refused = "groundcontrol_connections_refused_total"
        self.assertEqual(
            {k[1]: v for k, v in samples.items() if k[0] == refused},
            {
                "reason=handshake_limit": 1,
                "reason=failures": 1,
                "reason=noauth": 0,
                "reason=early_close": 1,
            },
        )
        self.assertEqual(samples[("groundcontrol_penalised_sources", "")], 2)
        progress, waiting = (
            "groundcontrol_handshakes_in_progress",
            "groundcontrol_handshakes_waiting",
        )
        self.assertEqual(
            (samples[(progress, "pool=agents")], samples[(progress, "pool=operators")]), (2, 0)
        )
        self.assertEqual(
            (
                samples[(waiting, "pool=agents")],
                samples[(waiting, "pool=operators")],
                samples[(waiting, "pool=awaiting_version")],
            ),
            (2, 0, 1),
        )
        # The refusals end; the gauge follows at the next scrape.
        self.fleet.clock.advance(600)
        self.assertEqual(self.scrape()[("groundcontrol_penalised_sources", "")], 0)
