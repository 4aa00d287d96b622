"""
Prometheus metrics of a groundcontrol, and the HTTP endpoint that serves them.

Gauges are read at scrape time from the live state (registry, sessions,
the handshake limiter, the per-source penalties); counters move on events that
are rare compared with packets: a session's bytes are added once, when it ends,
from the relay's own counts. Handshake durations and authentication failures
come from front-door subclasses (L{MeteredTransport}, L{MeteredUserAuth}) that
L{instrumentFactory} installs on one factory instance. Connections refused at
the door are counted where they are refused (the limiter, the penalties) and
read at scrape time too (L{_RefusalCollector}): counting them costs a refused
connection one integer increment, metrics or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.conch import error
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

from accesstunnel.clocks import elapsedClock
from accesstunnel.transports.limiter import AGENTS, OPERATORS, HandshakeLimiter
from groundcontrol.listening import ListenService, writeListeningFile
from groundcontrol.preauth import SourcePenalties, guardOf
from groundcontrol.registry import Registry
from groundcontrol.sessions import SessionRecord, SessionRegistry
from groundcontrol.sshserver import GroundControlTransport, GroundControlUserAuth

#: Seconds from TCP accept to a logged-in SSH connection.
HANDSHAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The C{reason} of a connection the handshake limiter closed at accept (its source over
#: the per-source caps, or every pool and the waiting room full); the penalties' reasons
#: are L{groundcontrol.preauth.REFUSAL_REASONS}.
REFUSED_HANDSHAKE_LIMIT = "handshake_limit"
#: The C{pool} of connections still awaiting their version line (not yet in a pool).
AWAITING_VERSION = "awaiting_version"
#: In DATA/run: the metrics listener's bound address, once it is bound.
METRICS_FILE = "metrics.json"


class _RefusalCollector(Collector):
    """
    C{groundcontrol_connections_refused_total}, by reason, read at scrape time from the
    counts the limiter and the penalties keep (they count every refusal anyway).
    """

    def __init__(self) -> None:
        self.limiter: HandshakeLimiter | None = None
        self.penalties: SourcePenalties | None = None

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "groundcontrol_connections_refused",
            "Connections closed at accept, before any SSH work, by reason: handshake_limit "
            "(the handshake limiter's per-source caps or its full waiting room), failures "
            "(a penalised source), noauth (its key exchanges without a login used up), "
            "early_close (its connections closed before a key exchange used up)",
            labels=["reason"],
        )

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        if self.limiter is not None:
            family.add_metric([REFUSED_HANDSHAKE_LIMIT], self.limiter.refusedConnections)
        if self.penalties is not None:
            for reason, count in self.penalties.refusals.items():
                family.add_metric([reason], count)
        yield family


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
        self.channelsWaiting = Gauge(
            "groundcontrol_channels_waiting",
            "Channel opens and -R forwards held for a device that is reconnecting now "
            "(--device-wait)",
            registry=r,
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
        self.handshakesInProgress = Gauge(
            "groundcontrol_handshakes_in_progress",
            "Unauthenticated connections in their SSH handshake now, by the limiter's pool",
            ["pool"],
            registry=r,
        )
        self.handshakesWaiting = Gauge(
            "groundcontrol_handshakes_waiting",
            "Accepted connections waiting for a handshake slot now, by pool "
            "(awaiting_version: not yet in one, their SSH version line still to come)",
            ["pool"],
            registry=r,
        )
        self.penalisedSources = Gauge(
            "groundcontrol_penalised_sources",
            "Sources (IPv4 addresses, IPv6 /64s) refused at the door now, whatever the reason",
            registry=r,
        )
        self._refusals = _RefusalCollector()
        r.register(self._refusals)

    def watch(self, registry: Registry, sessions: SessionRegistry) -> None:
        """Read the live gauges from C{registry} and C{sessions} at scrape time."""
        self.agentsConnected.set_function(lambda: len(registry))
        self.agentsPending.set_function(registry.pendingCount)
        self.sessionsLive.set_function(lambda: len(sessions.live))
        self.channelsWaiting.set_function(
            lambda: 0 if registry.waits is None else len(registry.waits)
        )

    def watchFrontDoor(
        self, penalties: SourcePenalties, limiter: HandshakeLimiter | None = None
    ) -> None:
        """
        Read the refusals and penalised sources from C{penalties}, and the handshakes in
        progress, waiting and refused at accept from C{limiter}, at scrape time.
        """
        self._refusals.penalties = penalties
        self.penalisedSources.set_function(penalties.refusedSources)
        if limiter is None:
            return
        self._refusals.limiter = limiter
        for name in (AGENTS, OPERATORS):
            pool = limiter.pools[name]
            self.handshakesInProgress.labels(pool=name).set_function(
                partial(getattr, pool, "pending")
            )
            self.handshakesWaiting.labels(pool=name).set_function(partial(getattr, pool, "waiting"))
        self.handshakesWaiting.labels(pool=AWAITING_VERSION).set_function(lambda: limiter.helloing)

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
        # A duration: on the monotonic clock, whatever a step of the wall clock does.
        self._acceptedAt = elapsedClock(self.factory.clock)()
        super().connectionMade()

    def setService(self, service: Any) -> None:
        super().setService(service)
        metrics: Metrics | None = getattr(self.factory, "metrics", None)
        if metrics is None or self._acceptedAt is None or service.name != b"ssh-connection":
            return
        avatar = getattr(self, "avatar", None)
        peer = "agent" if hasattr(avatar, "linkUp") else "operator"
        metrics.handshakeDone(elapsedClock(self.factory.clock)() - self._acceptedAt, peer)
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
    limiter: HandshakeLimiter | None = None,
) -> ListenService:
    """
    Wire C{metrics} to the live state, the front door and the handshake C{limiter} in
    front of it, and serve them on C{endpoint} (a Twisted endpoint string). The bound
    address goes to C{runDir/metrics.json} (port 0 picks one).
    """
    metrics.watch(registry, sessions)
    metrics.watchFrontDoor(guardOf(factory).penalties, limiter)
    sessions.metrics = metrics
    instrumentFactory(factory, metrics)
    site: Any = metrics.site()
    listener = ListenService(serverFromString(reactor, endpoint), site, "metrics")
    listener.listening.addCallback(
        lambda _: writeListeningFile(runDir / METRICS_FILE, [listener])(None)
    )
    return listener


def instrumentFactory(factory: Any, metrics: Metrics) -> None:
    """Make C{factory} (a L{GroundControlFactory}) report to C{metrics}."""
    factory.metrics = metrics
    factory.protocol = MeteredTransport
    factory.services = dict(factory.services)
    factory.services[b"ssh-userauth"] = MeteredUserAuth


__all__ = [
    "METRICS_FILE",
    "MeteredTransport",
    "MeteredUserAuth",
    "Metrics",
    "instrumentFactory",
    "metricsService",
]
