"""
Prometheus metrics of a groundcontrol, and the HTTP endpoint that serves them.

Gauges are read at scrape time from the live state (registry, sessions);
counters move on events that are rare compared with packets: a session's
bytes are added once, when it ends, from the relay's own counts. Handshake
durations and authentication failures come from front-door subclasses
(L{MeteredTransport}, L{MeteredUserAuth}) that L{instrumentFactory} installs
on one factory instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.twisted import MetricsResource
from twisted.conch import error
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

from groundcontrol.listening import ListenService, writeListeningFile
from groundcontrol.registry import Registry
from groundcontrol.sessions import SessionRecord, SessionRegistry
from groundcontrol.sshserver import GroundControlTransport, GroundControlUserAuth

#: Seconds from TCP accept to a logged-in SSH connection.
HANDSHAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one groundcontrol, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.agentsConnected = Gauge(
            "groundcontrol_agents_connected", "Devices with a routable link now", registry=r
        )
        self.agentsPending = Gauge(
            "groundcontrol_agents_pending", "Connected devices waiting for approval", registry=r
        )
        self.sessionsLive = Gauge(
            "groundcontrol_sessions_live", "Relayed channels open now", registry=r
        )
        self.sessionsTotal = Counter(
            "groundcontrol_sessions",
            "Relayed channels opened, by channel type",
            ["type"],
            registry=r,
        )
        self.sessionsEnded = Counter(
            "groundcontrol_sessions_ended", "Relayed channels closed", registry=r
        )
        self.bytesRelayed = Counter(
            "groundcontrol_relayed_bytes",
            "Bytes relayed by ended sessions, by direction",
            ["direction"],
            registry=r,
        )
        self.handshakeSeconds = Histogram(
            "groundcontrol_handshake_seconds",
            "TCP accept to authenticated SSH connection, by kind of peer",
            ["peer"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.authFailures = Counter(
            "groundcontrol_auth_failures",
            "Refused authentication attempts (public keys not accepted)",
            registry=r,
        )
        self.recordingFailures = Counter(
            "groundcontrol_recording_failures", "Session recordings that failed", registry=r
        )

    def watch(self, registry: Registry, sessions: SessionRegistry) -> None:
        """Read the live gauges from C{registry} and C{sessions} at scrape time."""
        self.agentsConnected.set_function(lambda: len(registry))
        self.agentsPending.set_function(registry.pendingCount)
        self.sessionsLive.set_function(lambda: len(sessions.live))

    # -- SessionMetrics -------------------------------------------------------------

    def sessionStarted(self, record: SessionRecord) -> None:
        self.sessionsTotal.labels(type=record.channelType).inc()

    def sessionEnded(self, record: SessionRecord) -> None:
        self.sessionsEnded.inc()
        self.bytesRelayed.labels(direction="to_device").inc(record.bytesIn)
        self.bytesRelayed.labels(direction="to_operator").inc(record.bytesOut)
        if record.recordingError:
            self.recordingFailures.inc()

    # -- front door ---------------------------------------------------------------

    def handshakeDone(self, seconds: float, peer: str) -> None:
        self.handshakeSeconds.labels(peer=peer).observe(max(0.0, seconds))

    def authFailed(self) -> None:
        self.authFailures.inc()

    def site(self) -> Site:
        """A web site serving the metrics at C{/metrics} (and at C{/})."""
        resource: Any = MetricsResource(registry=self.registry)
        root = Resource()
        root.putChild(b"metrics", resource)
        root.putChild(b"", resource)
        return Site(root)


class MeteredTransport(GroundControlTransport):
    """Times each connection from accept to login."""

    _acceptedAt: float | None = None

    def connectionMade(self) -> None:
        self._acceptedAt = self.factory.clock.seconds()
        super().connectionMade()

    def setService(self, service: Any) -> None:
        super().setService(service)
        metrics: Metrics | None = getattr(self.factory, "metrics", None)
        if metrics is None or self._acceptedAt is None or service.name != b"ssh-connection":
            return
        avatar = getattr(self, "avatar", None)
        peer = "agent" if hasattr(avatar, "linkUp") else "operator"
        metrics.handshakeDone(self.factory.clock.seconds() - self._acceptedAt, peer)
        self._acceptedAt = None


class MeteredUserAuth(GroundControlUserAuth):
    """Counts refused public keys (not the client's 'none' probe or key queries)."""

    def _ebBadAuth(self, reason: Any) -> None:
        metrics: Metrics | None = getattr(getattr(self.transport, "factory", None), "metrics", None)
        refused = reason.check(UnauthorizedLogin) and not reason.check(error.ValidPublicKey)
        if metrics is not None and self.method != b"none" and refused:
            metrics.authFailed()
        super()._ebBadAuth(reason)


def metricsService(
    reactor: Any,
    endpoint: str,
    metrics: Metrics,
    registry: Registry,
    sessions: SessionRegistry,
    factory: Any,
    runDir: Path,
) -> ListenService:
    """
    Wire C{metrics} to the live state and the front door, and serve them on
    C{endpoint} (a Twisted endpoint string). The bound address goes to
    C{runDir/metrics.json} (port 0 picks one).
    """
    metrics.watch(registry, sessions)
    sessions.metrics = metrics
    instrumentFactory(factory, metrics)
    site: Any = metrics.site()
    listener = ListenService(serverFromString(reactor, endpoint), site, "metrics")
    listener.listening.addCallback(
        lambda _: writeListeningFile(runDir / "metrics.json", [listener])(None)
    )
    return listener


def instrumentFactory(factory: Any, metrics: Metrics) -> None:
    """Make C{factory} (a L{GroundControlFactory}) report to C{metrics}."""
    factory.metrics = metrics
    factory.protocol = MeteredTransport
    factory.services = dict(factory.services)
    factory.services[b"ssh-userauth"] = MeteredUserAuth


__all__ = ["MeteredTransport", "MeteredUserAuth", "Metrics", "instrumentFactory", "metricsService"]
