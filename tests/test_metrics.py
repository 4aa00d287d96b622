"""
Metrics in memory: an instrumented InMemoryFleet on a Clock; gauges read the live state,
counters move on sessions, logins and refused keys, and the exposition text says so.
"""

from __future__ import annotations

from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.metrics import Metrics, instrumentFactory
from groundcontrol.sessions import SessionRegistry, attachSessions
from groundcontrol.testing import InMemoryFleet, newKey


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
