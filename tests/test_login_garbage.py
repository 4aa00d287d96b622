"""
Logins and logouts leave groundcontrol no cyclic garbage.

Whatever an agent's or an operator's connection makes in groundcontrol must be freed by
reference counting once it is done with, not left in reference cycles for the cyclic
collector: in a reconnect storm (10,000 logins in half a minute) every cycle a login
leaves is work for a full collection and memory held until one runs, which
L{groundcontrol.stormgc} puts off to the storm's end. Each test runs its connections with
the collector off and then asks C{gc.collect()} what they left: nothing (the operator
session test excepted, see there); where a connection ends, its server transport must
also be gone before that collection (freed by reference counting alone).

Where a test's own doubles would keep objects alive or in cycles that a real server does
not have, the test does what the real thing does:

  - the in-memory transports let go of their protocol and producer when the connection
    is lost, as C{twisted.internet.tcp} does (C{del self.protocol}, C{producer = None});
  - Twisted's log buffer (global logging has not begun in a test run) is taken out: its
    events hold their sources (avatars, transports) alive, as twistd's log files do not;
  - one link through the handshake limiter stays up meanwhile, as on any live server:
    the limiter's wrapper provides its transport's interfaces (C{directlyProvides}), and
    zope.interface keeps one declaration per set of them, itself a cycle (it lists
    itself), while any connection uses it;
  - each test logs in once before it measures, so that one-off objects (lazy imports,
    caches, the first declaration above) are made before;
  - the clock runs past the keepalive sweep's next look (a stopped keepalive stays in
    its bucket until then, holding its transport alive, by design).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet.task import Clock
from twisted.logger import globalLogBeginner, globalLogPublisher
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

import agent.enrollment
from accesstunnel.keys import fingerprint
from accesstunnel.transports.limiter import HandshakeLimiter
from agent.enrollment import Enrollment
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.enrollment import CertificatePolicy
from groundcontrol.pki import FleetCA
from groundcontrol.sshserver import ServerSettings
from groundcontrol.store import PendingLimits
from groundcontrol.testing import (
    FakeAgentFactory,
    FakeOperator,
    InMemoryFleet,
    newKey,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)

#: Connections each test measures.
N = 4

#: Longer than a stopped keepalive stays in the sweep (probeAfter 37.5 s + a granule).
AFTER_THE_SWEEP = 60.0


@contextmanager
def collectorOff() -> Iterator[list[Any]]:
    """
    Run the block with the cyclic collector off (after a collection), then collect and
    hand back, in the list yielded, every object that collection found unreachable.

    Everything the collector tracks before the block is held until after that
    collection, so what it finds was made in the block: not, say, what the test runner
    lets go of a test that ran before.
    """
    gc.collect()
    wasEnabled = gc.isenabled()
    gc.disable()
    found: list[Any] = []
    before = gc.get_objects()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        del before
        if wasEnabled:
            gc.enable()


def describe(garbage: list[Any]) -> str:
    """The kinds of objects in C{garbage}, most common first (for a failure message)."""
    counts: dict[str, int] = {}
    for o in garbage:
        kind = type(o).__qualname__
        if kind == "frame":
            kind = f"frame {o.f_code.co_name} ({Path(o.f_code.co_filename).name})"
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda i: -i[1]))


def lose(fleet: InMemoryFleet, pump: iosim.IOPump) -> None:
    """Drop a connection; the server's in-memory transport lets go as TCP's does."""
    if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
        fleet.network.cut(pump)
    pump.serverIO.protocol = None
    pump.serverIO.producer = None


def withoutTheLogBuffer(case: SynchronousTestCase) -> None:
    """
    Take out, for C{case}, Twisted's buffer of log events for a logging system not begun
    yet: its events hold their sources (avatars, transports) alive, as twistd's log
    files do not.
    """
    buffer = getattr(globalLogBeginner, "_temporaryObserver", None)
    if buffer is not None:
        globalLogPublisher.removeObserver(buffer)
        case.addCleanup(globalLogPublisher.addObserver, buffer)


def assertLeavesNoGarbage(
    case: SynchronousTestCase,
    fleet: InMemoryFleet,
    connection: Callable[[], None],
    settle: Callable[[], None],
    built: list[weakref.ref[Any]],
) -> None:
    """
    C{connection} (one connection, from start to end) run once to warm up, then N times
    with the collector off: the collection after finds nothing, and every transport of
    those N (C{built} collects them, weakly) is freed before it, by reference counting.
    C{settle} lets the timers pass after each round.
    """
    connection()
    settle()
    with collectorOff() as garbage:
        # The collector's snapshot holds the network's list of pumps as it is, and the
        # next connection would be added to that list: flushing makes a new one.
        fleet.flush()
        del built[:]
        for _ in range(N):
            connection()
        settle()
        alive = [t for t in built if t() is not None]
        case.assertEqual(len(built), N)
        case.assertEqual(alive, [], "transports not freed by reference counting")
    case.assertEqual(garbage, [], describe(garbage))


class LoginGarbageTests(SynchronousTestCase):
    def setUp(self) -> None:
        withoutTheLogBuffer(self)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.directory = Path(tempfile.mkdtemp(prefix="login-garbage-"))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.ca = FleetCA.create(
            self.directory / "ca", datetime.fromtimestamp(self.clock.seconds() - 86400, UTC)
        )
        self.fleet = self.newFleet()
        self.operatorKey = self.fleet.addOperator("ada")
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.fleet.grant("ada", "kiln7")
        #: Client ends of connections that are over (their garbage is not the server's).
        self.clients: list[Any] = []

    def newFleet(self, pendingLimits: PendingLimits | None = None) -> InMemoryFleet:
        """
        A groundcontrol whose server transports are counted (weakly, in C{servers}),
        behind the handshake limiter as groundcontrol runs it (C{door}), with one
        bystander link up.
        """
        fleet = InMemoryFleet(
            clock=self.clock,
            settings=ServerSettings(pendingLimits=pendingLimits or PendingLimits()),
            certificates=CertificatePolicy(self.ca),
        )
        self.fleet = fleet
        #: Every server transport built, weakly.
        self.servers: list[weakref.ref[Any]] = []
        build = fleet.factory.buildProtocol

        def buildProtocol(addr: Any) -> Any:
            server = build(addr)
            self.servers.append(weakref.ref(server))
            return server

        fleet.factory.buildProtocol = buildProtocol  # type: ignore[method-assign]
        self.door: Any = HandshakeLimiter(fleet.factory)
        self.bystander = self.fakeAgent("bystander", fleet.enrollDevice("bystander"))
        return fleet

    def connect(self, client: Any) -> iosim.IOPump:
        return self.fleet.network.connect(self.door, client)

    def fakeAgent(self, name: str, key: keys.Key) -> iosim.IOPump:
        return self.connect(
            FakeAgentFactory(name, key, hostKey=self.fleet.hostKey, clock=self.clock)
        )

    def end(self, pump: iosim.IOPump) -> None:
        """The connection is over: lose it (if groundcontrol has not already)."""
        self.clients.append((pump.client, pump.clientIO))
        lose(self.fleet, pump)

    def settle(self) -> None:
        """Let the sweep pass, a second at a time (the links up answer keepalives)."""
        for _ in range(int(AFTER_THE_SWEEP)):
            self.clock.advance(1)
            self.fleet.flush()
        self.assertFalse(self.bystander.serverIO.disconnecting)

    def assertNoGarbage(self, connection: Callable[[], None]) -> None:
        """Each run of C{connection} leaves nothing, its server transport included."""
        assertLeavesNoGarbage(self, self.fleet, connection, self.settle, self.servers)

    def test_stormOfLogins(self) -> None:
        """
        Agents log in and stay, as in a reconnect storm: their logins (the "none"
        method tried first, the key query answered with PK_OK, the signed request)
        leave nothing for the collector.
        """
        keys = [self.fleet.enrollDevice(f"storm{i}") for i in range(N + 1)]
        self.fakeAgent("storm0", keys[0])
        with collectorOff() as garbage:
            for i in range(1, N + 1):
                self.fakeAgent(f"storm{i}", keys[i])
            self.assertEqual(len(self.fleet.registry), N + 2)  # and the bystander
        self.assertEqual(garbage, [], describe(garbage))

    def test_agentLoginAndLogout(self) -> None:
        """An approved device's agent logs in (routable), and its link is lost."""

        def connection() -> None:
            pump = self.fakeAgent("kiln7", self.deviceKey)
            self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
            self.end(pump)
            self.fleet.flush()
            self.assertIsNone(self.fleet.registry.lookup("kiln7"))

        self.assertNoGarbage(connection)

    def test_realAgentWithEnrollment(self) -> None:
        """
        The product's agent link with its enrollment: the hello on every link, and a
        certificate issued over the first one, then reconnections (with it).
        """
        stateDir = self.directory / "agent"
        stateDir.mkdir()
        enrollment = Enrollment(
            stateDir, self.clock, requestedName="kiln7", serial="SN-1", version="0.1.0"
        )
        settings = LinkSettings(
            name="kiln7",
            deviceKey=self.deviceKey,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
        )
        factory = AgentLinkFactory(
            settings, self.clock, scriptedSessions(), refuseForwards, enrollment
        )

        def connection() -> None:
            pump = self.connect(factory)
            self.assertIsNotNone(self.fleet.registry.lookup("kiln7"))
            self.end(pump)
            self.fleet.flush()

        self.assertNoGarbage(connection)
        self.assertTrue((stateDir / agent.enrollment.CERTIFICATE_FILE).exists())

    def test_pendingAgent(self) -> None:
        """A device nobody approved yet logs in with a new key and waits, then leaves."""

        def connection() -> None:
            pump = self.fakeAgent("newcomer", newKey())
            self.assertEqual(self.fleet.registry.pendingCount(), 1)
            self.end(pump)
            self.fleet.flush()
            self.assertEqual(self.fleet.registry.pendingCount(), 0)

        self.assertNoGarbage(connection)

    def test_refusedByThePendingCaps(self) -> None:
        """
        A new device the pending caps refuse: the store's refusal is awaited by the realm
        (a Failure re-raised in a coroutine) and answered with a disconnect.
        """
        self.newFleet(PendingLimits(total=0))

        def connection() -> None:
            pump = self.fakeAgent("newcomer", newKey())
            self.assertTrue(pump.serverIO.disconnecting)
            self.end(pump)

        self.assertNoGarbage(connection)

    def test_refusedLogins(self) -> None:
        """A revoked device's agent, and an operator with a key nobody knows, are refused."""
        revokedKey = self.fleet.enrollDevice("retired")
        resultNow(self.fleet.store.revokeDevice("retired", "test", self.clock.seconds()))

        def revoked() -> None:
            pump = self.fakeAgent("retired", revokedKey)
            self.assertIsNone(self.fleet.registry.lookup("retired"))
            self.end(pump)

        def stranger() -> None:
            operator = FakeOperator("dev_kiln7", newKey(), hostKey=self.fleet.hostKey)
            pump = self.connect(operator)
            self.assertIsNone(operator.connection)
            self.end(pump)

        self.assertNoGarbage(revoked)
        self.assertNoGarbage(stranger)

    def test_operatorLoginAndLogout(self) -> None:
        """An operator logs in (their key checked in the store) and disconnects."""

        def connection() -> None:
            operator = FakeOperator("dev_kiln7", self.operatorKey, hostKey=self.fleet.hostKey)
            pump = self.connect(operator)
            self.assertIsNotNone(operator.connection)
            self.end(pump)
            self.fleet.flush()

        self.assertNoGarbage(connection)

    def test_operatorSession(self) -> None:
        """
        An operator's session on a device: opened, a command run, closed, logged out.
        Nothing is left for the collector: each L{RelayChannel} drops its observer (the
        L{LiveSession}, which holds both channels) and its fired C{opened} Deferred
        (whose result and canceller are the channel) when it closes; the operator's
        side holds the operator's whole connection.
        """
        device = self.fakeAgent("kiln7", self.deviceKey)

        def connection() -> None:
            operator = FakeOperator("dev_kiln7", self.operatorKey, hostKey=self.fleet.hostKey)
            pump = self.connect(operator)
            session = self.fleet.session(operator)
            self.assertTrue(session.isOpen, session.openFailure)
            session.exec(b"hello")
            self.fleet.flush()
            self.clock.advance(0)
            self.fleet.flush()
            self.assertEqual(bytes(session.output), b"hello\n")
            self.end(pump)
            self.fleet.flush()

        self.assertNoGarbage(connection)
        self.assertFalse(device.serverIO.disconnecting)
