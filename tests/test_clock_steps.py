"""
The wall clock steps (accesstunnel/clocks.py): the agent times on the monotonic clock and
reads the wall clock only for dates; groundcontrol times on the wall clock but measures a
link's silence on the monotonic one.

Each test has two clocks: a C{task.Clock} that runs the timers, and a wall clock that the
test steps on its own, as NTP steps a device's C{CLOCK_REALTIME} and leaves
C{CLOCK_MONOTONIC} alone. tests/e2e/test_clock_steps.py runs a real agent under libfaketime.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from OpenSSL import SSL
from twisted.internet import defer, error, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.addresses import Connector
from accesstunnel.clocks import elapsedClock, useMonotonicTimers, wallClock
from accesstunnel.keepalive import Keepalive, KeepaliveSweep
from accesstunnel.keys import fingerprint
from accesstunnel.timetext import isoTime
from accesstunnel.transports.tls import ClientTLS, ServerTLS
from accesstunnel.transports.tlsdates import CertificateDatesError, datesNamed
from accesstunnel.transports.tlsreasons import CertificateTrustError
from agent.clocksense import TIME_EPOCH, certificateClockNote
from agent.enrollment import (
    CERTIFICATE_FILE,
    WALL_CLOCK_RECHECK,
    certificateLifetime,
    renewalDue,
)
from agent.failover import AllAddressesFailed, FailoverEndpoint
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.pki import DEFAULT_SERVER_LIFETIME, FleetCA, issueServerCertificate
from groundcontrol.sshserver import agentProbeAfter
from groundcontrol.testing import (
    InMemoryFleet,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)
from tests.test_enrollment import DAY, HOUR, AgentUnderTest, World
from tests.test_transports_tls import Fixture, Sender, connectedPair

INTERVAL = 15.0
COUNT = 3

#: Where the device's clock is before NTP's first sync: 12 seconds after the epoch.
BOOTED_IN_1970 = 12.0


class SteppingWallClock:
    """A wall clock that follows a timer clock, offset by steps the test makes."""

    def __init__(self, timers: Clock, offset: float = 0.0) -> None:
        self._timers = timers
        self.offset = offset

    def __call__(self) -> float:
        return self._timers.seconds() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


def temporaryDirectory(case: SynchronousTestCase) -> Path:
    """A directory of C{case}'s own, removed after it (not under the cwd)."""
    path = Path(tempfile.mkdtemp(prefix="clock-steps-"))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def deviceClock(start: float = 1_000_000.0) -> tuple[Clock, SteppingWallClock]:
    """The agent's clocks: timers on a Clock (monotonic), and a wall clock beside it."""
    clock = Clock()
    clock.advance(start)
    wall = SteppingWallClock(clock, offset=1_800_000_000.0 - start)
    clock.wallSeconds = wall  # type: ignore[attr-defined]
    return clock, wall


class MonotonicTimersTests(SynchronousTestCase):
    """L{useMonotonicTimers} on one of Twisted's reactors (made here, never run)."""

    def setUp(self) -> None:
        self.reactor: Any = SelectReactor()
        self.addCleanup(self.reactor.waker.connectionLost, None)
        self.wallNow = 1_800_000_000.0
        self.monotonicNow = 500.0
        self.reactor.seconds = lambda: self.wallNow  # Twisted's default: the wall clock
        self.ran: list[str] = []

    def convert(self) -> None:
        useMonotonicTimers(
            self.reactor, monotonic=lambda: self.monotonicNow, wall=lambda: self.wallNow
        )

    def test_pendingCallsKeepTheirDelays(self) -> None:
        """
        Calls scheduled before the switch (in the reactor's heap, or still new) are due
        the same number of seconds later, on the monotonic clock.
        """
        first = self.reactor.callLater(10, self.ran.append, "first")
        self.reactor._insertNewDelayedCalls()  # in the heap, as after a reactor iteration
        second = self.reactor.callLater(20, self.ran.append, "second")
        self.convert()
        self.assertEqual((first.getTime(), second.getTime()), (510.0, 520.0))
        self.assertEqual(self.reactor.seconds(), 500.0)
        self.assertEqual(self.reactor.callLater(5, print).getTime(), 505.0)
        self.assertEqual(wallClock(self.reactor)(), self.wallNow)
        self.monotonicNow += 10
        self.reactor.runUntilCurrent()
        self.assertEqual(self.ran, ["first"])

    def test_wallClockStepsMoveNoTimer(self) -> None:
        """
        After the switch a step of the wall clock, either way, changes neither when a
        timer is due nor how long the reactor may sleep.
        """
        self.convert()
        call = self.reactor.callLater(30, self.ran.append, "check")
        self.reactor._insertNewDelayedCalls()
        for step in (+86400.0, -2 * 86400.0, -50 * 365 * 86400.0):
            self.wallNow += step
            self.reactor.runUntilCurrent()
            self.assertEqual(self.ran, [])
            self.assertEqual(self.reactor.timeout(), 30.0)
        self.assertEqual(call.getTime(), 530.0)

    def test_onceOnly(self) -> None:
        """A second switch changes nothing (the monotonic clock is not shifted again)."""
        self.convert()
        call = self.reactor.callLater(10, print)
        self.monotonicNow = 900.0
        self.convert()
        self.assertEqual(call.getTime(), 510.0)


class ElapsedClockTests(SynchronousTestCase):
    """Which clock measures durations beside a timer clock."""

    def test_wallClockReactorMeasuresOnMonotonic(self) -> None:
        """A reactor as Twisted makes it (seconds is time.time): the monotonic clock."""
        reactor = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertIs(elapsedClock(reactor), time.monotonic)
        self.assertIs(wallClock(reactor), time.time)

    def test_monotonicReactorMeasuresOnItself(self) -> None:
        """After L{useMonotonicTimers}: the reactor's own seconds, and the wall clock kept."""
        reactor: Any = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        useMonotonicTimers(reactor)
        self.assertIs(elapsedClock(reactor), time.monotonic)
        self.assertIs(wallClock(reactor), time.time)

    def test_testClock(self) -> None:
        """A task.Clock is both, unless it is given a wall clock of its own."""
        clock = Clock()
        self.assertEqual(elapsedClock(clock), clock.seconds)
        self.assertEqual(wallClock(clock), clock.seconds)
        clock, wall = deviceClock()
        self.assertIs(wallClock(clock), wall)


class ServerKeepaliveStepTests(SynchronousTestCase):
    """
    groundcontrol's passive keepalives on agent links (probe after 37.5 s, one sweep):
    timers on the wall clock, silence on the monotonic one.
    """

    def setUp(self) -> None:
        self.wall = Clock()  # the reactor's timers: the wall clock
        self.wall.advance(1_800_000_000)
        self.monotonic = Clock()
        self.monotonic.advance(1_000)
        self.sweep = KeepaliveSweep(self.wall)
        self.deaths: list[int] = []
        self.probed: set[int] = set()
        self.links = [self.link(n) for n in range(30)]

    def link(self, n: int) -> Keepalive:
        keepalive = Keepalive(
            self.wall,
            lambda: self.probed.add(n),
            lambda: self.deaths.append(n),
            INTERVAL,
            COUNT,
            agentProbeAfter(INTERVAL, COUNT),
            self.sweep,
            elapsed=self.monotonic.seconds,
        )
        keepalive.start()
        return keepalive

    def elapse(self, seconds: float) -> None:
        """
        Real time passes; each agent pings every 30 s, at its own phase (n s), and
        answers a probe within a second.
        """
        for _ in range(int(seconds)):
            self.monotonic.advance(1)
            self.wall.advance(1)
            now = int(self.monotonic.seconds())
            for n, keepalive in enumerate(self.links):
                if (now + n) % 30 == 0 or n in self.probed:
                    keepalive.received()
            self.probed.clear()

    def test_forwardStepShorterThanTheDeadline(self) -> None:
        """
        A forward step of 40 s (less than the 45 s deadline, so not seen as a late check)
        drops no link: each pending look runs at once and finds the agent heard from
        lately. (On the wall clock the step was 40 s more silence: the links last heard
        from over 5 s before it, most of them, were declared dead at once.)
        """
        self.elapse(100)
        self.wall.advance(40)  # NTP steps the server's clock
        self.elapse(300)
        self.assertEqual(self.deaths, [])

    def test_silentAgentStillFoundAfterStep(self) -> None:
        """After the step, an agent that goes silent is found after 45 s of silence."""
        self.elapse(100)
        self.wall.advance(40)
        self.elapse(30)
        quiet = self.links.pop(7)  # its agent answers once more, then never again
        quiet.received()
        self.elapse(INTERVAL * COUNT - 1)
        self.assertEqual(self.deaths, [])
        self.elapse(2)
        self.assertEqual(self.deaths, [7])


class AgentKeepaliveStepTests(SynchronousTestCase):
    """The agent's active keepalive: timers on the monotonic clock, aligned on the wall's."""

    def setUp(self) -> None:
        # Whole seconds of the wall clock are at .37 of the monotonic one.
        self.clock, self.wall = deviceClock(start=1_000_000.37)
        self.pings: list[float] = []
        self.deaths: list[float] = []
        self.keepalive = Keepalive(
            self.clock,
            lambda: self.pings.append(self.wall()),
            lambda: self.deaths.append(self.clock.seconds()),
            INTERVAL,
            COUNT,
            align=1.0,
        )
        self.keepalive.start()

    def test_checksOnWholeWallSeconds(self) -> None:
        """
        The pings of a fleet fall on whole seconds of the wall clock, which fleets
        synchronise, not of each device's monotonic clock (since its boot).
        """
        answered = 0
        for _ in range(int(200 / 0.01)):
            self.clock.advance(0.01)
            if len(self.pings) > answered:  # the server answers each ping at once
                answered = len(self.pings)
                self.keepalive.received()
        self.assertGreater(len(self.pings), 5)
        self.assertEqual(self.deaths, [])
        fractions = [p - math.floor(p) for p in self.pings]
        self.assertTrue(all(f < 0.011 for f in fractions), fractions)

    def test_backwardStepDelaysNothing(self) -> None:
        """
        An hour back, then the server stops answering: dead at the deadline after the
        last answer, not an hour later.
        """
        self.clock.advance(5)
        self.keepalive.received()
        last = self.clock.seconds()
        self.wall.step(-HOUR)
        self.clock.advance(INTERVAL * COUNT - 0.01)
        self.assertEqual(self.deaths, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.deaths), 1)
        self.assertAlmostEqual(self.deaths[0], last + INTERVAL * COUNT, delta=1e-6)

    def test_forwardStepDropsNothing(self) -> None:
        """A day forward: no timer fires early, and an answering server keeps the link."""
        self.clock.advance(5)
        self.wall.step(DAY)
        for _ in range(40):
            self.clock.advance(INTERVAL / 2)
            if self.pings:
                self.keepalive.received()
        self.assertEqual(self.deaths, [])


class DeviceClock:
    """
    A device's clocks over a shared Clock: its timers (the monotonic clock) are the
    Clock's, its wall clock is L{SteppingWallClock} over it.
    """

    def __init__(self, clock: Clock) -> None:
        self.seconds = clock.seconds
        self.callLater = clock.callLater
        self.getDelayedCalls = clock.getDelayedCalls
        self.wallSeconds = SteppingWallClock(clock)


class SteppedWorld(World):
    """The enrollment tests' fleet, with agents whose wall clock the test steps."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.deviceClock = DeviceClock(self.clock)
        self.deviceWall = self.deviceClock.wallSeconds

    def agent(self, *args: Any, **kwargs: Any) -> AgentUnderTest:
        """An agent (link and enrollment) on L{deviceClock}'s clocks."""
        worldClock, self.clock = self.clock, self.deviceClock  # type: ignore[assignment]
        try:
            return super().agent(*args, **kwargs)
        finally:
            self.clock = worldClock


class RenewalStepTests(SynchronousTestCase):
    """The fleet certificate when the device's wall clock is wrong, then stepped."""

    def setUp(self) -> None:
        self.world = SteppedWorld(temporaryDirectory(self))
        self.fleet = self.world.fleet

    def issued(self) -> int:
        return len(resultNow(self.fleet.store.listCertificates("kiln7")))

    def test_renewedAfterNTPFixesA1970Clock(self) -> None:
        """
        A device that enrolled while its clock said 1970 renews its certificate on time
        once NTP has set the clock: within an hour of the renewal date, over the same
        link. (The renewal used to wait for 1970 plus the certificate's age: ~56 years.)
        """
        self.world.deviceWall.offset = BOOTED_IN_1970 - self.world.now
        agent = self.world.enrolled("kiln7")
        self.assertEqual(self.issued(), 1)
        self.assertTrue(any("is the clock set?" in line for line in agent.log), agent.log)
        self.world.advance(HOUR)
        self.world.deviceWall.offset = 0.0  # NTP's first sync
        due = renewalDue(*certificateLifetime(agent.certificatePEM))
        self.world.advance(due - self.world.now - 1)
        self.assertEqual(self.issued(), 1)
        self.world.advance(WALL_CLOCK_RECHECK)
        self.assertEqual(self.issued(), 2)
        self.assertTrue(agent.connected)

    def test_clockYearsAheadAsksHourlyNotEverySecond(self) -> None:
        """
        A device whose clock is years ahead sees every certificate as due when it is
        issued: it says its clock looks wrong and asks again hourly, not every second.
        """
        self.world.deviceWall.offset = 10 * 365 * DAY
        agent = self.world.enrolled("kiln7")
        self.world.advance(60)
        self.assertEqual(self.issued(), 1)
        self.world.advance(WALL_CLOCK_RECHECK)
        self.assertEqual(self.issued(), 2)
        (warning, *_) = [line for line in agent.log if "is the clock set?" in line]
        self.assertIn("this device's clock says 2033-", warning)
        self.world.deviceWall.offset = 0.0
        self.world.advance(DAY)
        self.assertEqual(self.issued(), 2)


#: How a wss:// attempt ends when the server's certificate does not verify and
#: accesstunnel.transports.tlsreasons cannot say why (agent log).
CHECK_FAILED = (
    "certificate verify failed: the server's certificate did not verify "
    "[OpenSSL: certificate verify failed]"
)


class CertificateClockNoteTests(SynchronousTestCase):
    """What the agent says about its clock when a server certificate did not verify."""

    def test_otherFailuresSayNothing(self) -> None:
        """A refused connection, a timeout: nothing about the clock."""
        for reason in ("Connection was refused by other side", "no connection in 15 s"):
            self.assertEqual(certificateClockNote(reason, BOOTED_IN_1970), "")

    def test_clockNotSet(self) -> None:
        """A clock in 1970 is named as the likely cause."""
        self.assertEqual(
            certificateClockNote(CHECK_FAILED, BOOTED_IN_1970),
            "; this device's clock says 1970-01-01T00:00:12Z, before this agent was written "
            "(2026-01-01T00:00:00Z): is the clock set? No server certificate can be checked "
            "until it is",
        )

    def test_beforeItsOwnCertificate(self) -> None:
        """A clock before the device's own fleet certificate was issued is not set either."""
        issued = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
        state = temporaryDirectory(self)
        pem = FleetCA.create(state / "ca", issued).certificatePEM
        (state / CERTIFICATE_FILE).write_bytes(pem)
        notBefore, _ = certificateLifetime(pem)
        note = certificateClockNote(CHECK_FAILED, notBefore - DAY, state)
        self.assertIn(
            f"before this device's fleet certificate was issued ({isoTime(notBefore)}): "
            "is the clock set?",
            note,
        )
        self.assertNotIn("is the clock set?", certificateClockNote(CHECK_FAILED, notBefore, state))

    def test_clockThatMayBeRight(self) -> None:
        """A plausible clock is still said: a server certificate may be wrong for it."""
        note = certificateClockNote(CHECK_FAILED, TIME_EPOCH + 30 * DAY)
        self.assertEqual(
            note,
            "; this device's clock says 2026-01-31T00:00:00Z (a server certificate not valid "
            "at that time fails this check too)",
        )


class _FailingEndpoint:
    """Every connect fails as a wss:// attempt does when the certificate does not verify."""

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(ConnectionError(CHECK_FAILED))


class FailoverClockNoteTests(SynchronousTestCase):
    """The line about an address that could not be reached says what the clock says."""

    def test_couldNotReachSaysTheClock(self) -> None:
        state = temporaryDirectory(self)
        clock, wall = deviceClock()
        wall.offset = BOOTED_IN_1970 - clock.seconds()
        address = "wss://gc.example.com/tunnel"
        endpoint = FailoverEndpoint(
            clock,
            [Connector(_FailingEndpoint(), lambda f: f, address, "wss")],  # type: ignore[arg-type]
            state / "last-server.json",
        )
        with capturedLogs() as events:
            d = endpoint.connect(protocol.Factory())
        failure = self.failureResultOf(d, AllAddressesFailed)
        lines = [formatEvent(e) for e in events if "could not reach" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn(f"could not reach {address}: {CHECK_FAILED}; this device's", lines[0])
        self.assertIn("1970-01-01T00:00:12Z", lines[0])
        self.assertIn("is the clock set?", str(failure.value))


class LinkEndReasonTests(SynchronousTestCase):
    """
    A link that ends before it is up says why TLS gave up, so the failover endpoint's
    line (and L{certificateClockNote}) sees a certificate check that failed over tls://.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        settings = LinkSettings(
            name="kiln7",
            deviceKey=self.fleet.enrollDevice("kiln7"),
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        self.factory = AgentLinkFactory(
            settings, self.fleet.clock, scriptedSessions(), refuseForwards
        )

    def endedBy(self, reason: Failure) -> str:
        link: Any = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 443))
        link.makeConnection(StringTransport())
        ended: list[Failure] = []
        link.ready.addErrback(ended.append)
        link.connectionLost(reason)
        (failure,) = ended
        self.assertIsInstance(failure.value, ConnectionError)
        return str(failure.value)

    def test_certificateCheckFailed(self) -> None:
        """pyOpenSSL's words for a server certificate that did not verify are kept."""
        failed = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(
            self.endedBy(Failure(failed)),
            "link closed before it was up: [('SSL routines', '', 'certificate verify failed')]",
        )

    def test_certificateDatesNamed(self) -> None:
        """The text that names a server certificate's dates is kept whole."""
        text = "certificate verify failed: the server's certificate is valid from X to Y"
        self.assertEqual(
            self.endedBy(Failure(CertificateDatesError(text))),
            f"link closed before it was up: {text}",
        )

    def test_cleanClose(self) -> None:
        """groundcontrol closed the connection: nothing more to say."""
        self.assertEqual(
            self.endedBy(Failure(error.ConnectionDone())), "link closed before it was up"
        )


class ServerCertificateDatesTests(SynchronousTestCase):
    """
    A server certificate that is not valid at the time the device's clock reads fails the
    agent's check (in memory, real OpenSSL, which reads the real clock) with its own dates
    named, and the clock note beside them says only what the clock says.
    """

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory)
        self.fixture = Fixture(self.directory)

    def refusedWith(self, server: ServerTLS) -> Failure:
        """Dial C{server} as the agent does; how the agent's side of TLS ended."""
        connectedPair(server, "gc.test", ClientTLS(self.fixture.caFile))
        [reason] = Sender.lost
        return reason

    def datedServer(self, now: datetime, lifetime: timedelta = DEFAULT_SERVER_LIFETIME) -> Any:
        """groundcontrol's TLS settings with a server certificate issued at C{now}."""
        key = ed25519.Ed25519PrivateKey.generate()
        keyFile, certFile = self.directory / "dated.key", self.directory / "dated.crt"
        keyFile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued = issueServerCertificate(self.fixture.ca, ["gc.test"], key, now, lifetime)
        certFile.write_bytes(issued.pem)
        return ServerTLS(certFile, keyFile, None), x509.load_pem_x509_certificate(issued.pem)

    def expectedText(self, certificate: x509.Certificate) -> str:
        return (
            "certificate verify failed: the server's certificate is valid from "
            f"{isoTime(certificate.not_valid_before_utc.timestamp())} to "
            f"{isoTime(certificate.not_valid_after_utc.timestamp())}"
        )

    def test_notYetValidNamesItsDates(self) -> None:
        """
        A certificate issued for next month: the failure names its dates, in pyOpenSSL's
        shape too (autobahn's wss:// line reads it), and the clock note adds the clock.
        """
        server, certificate = self.datedServer(datetime.now(UTC) + timedelta(days=30))
        reason = self.refusedWith(server)
        reason.trap(CertificateDatesError)
        text = self.expectedText(certificate)
        self.assertEqual(str(reason.value), text)
        self.assertEqual(reason.value.args[0][0][2], text)
        plausible = TIME_EPOCH + 30 * DAY
        self.assertEqual(
            certificateClockNote(text, plausible),
            f"; this device's clock says {isoTime(plausible)}",
        )
        self.assertIn("is the clock set?", certificateClockNote(text, BOOTED_IN_1970))

    def test_expiredNamesItsDates(self) -> None:
        """A certificate that expired yesterday names its dates the same way."""
        lifetime = timedelta(days=10)
        server, certificate = self.datedServer(
            datetime.now(UTC) - lifetime - timedelta(days=1), lifetime
        )
        reason = self.refusedWith(server)
        reason.trap(CertificateDatesError)
        self.assertEqual(str(reason.value), self.expectedText(certificate))

    def test_otherCANamedNotTheDates(self) -> None:
        """
        A certificate valid now but from another CA: its issuer is named (tlsreasons), not
        its dates, and the clock note says nothing (the clock is not the cause).
        """
        other = FleetCA.create(self.directory / "other", datetime.now(UTC), "Other CA")
        self.fixture.ca = other
        server, _ = self.datedServer(datetime.now(UTC))
        reason = self.refusedWith(server)
        reason.trap(CertificateTrustError)
        text = str(reason.value)
        self.assertIn("was issued by CN=Other CA, a CA this device does not trust", text)
        self.assertNotIn("is valid from", text)
        self.assertEqual(certificateClockNote(text, TIME_EPOCH + 30 * DAY), "")

    def test_chainCertificateNamed(self) -> None:
        """A certificate further up the chain the server sent is named by its subject."""
        now = datetime.now(UTC)
        good = x509.load_pem_x509_certificate(self.fixture.serverCert.read_bytes())
        future = FleetCA.create(self.directory / "future", now + timedelta(days=30), "Later CA")
        later = x509.load_pem_x509_certificate(future.certificatePEM)
        self.assertIsNone(datesNamed([good], now))
        self.assertEqual(
            datesNamed([good, later], now),
            "certificate verify failed: the certificate CN=Later CA in the server's chain is "
            f"valid from {isoTime(later.not_valid_before_utc.timestamp())} to "
            f"{isoTime(later.not_valid_after_utc.timestamp())}",
        )
