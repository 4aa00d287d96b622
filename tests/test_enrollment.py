"""
Enrollment over the device link, in memory: the real agent (agent.link + agent.enrollment)
talking to the real groundcontrol front door (realm, AgentRequests, registry, router,
control shell, fleet watcher) over twisted.test.iosim pumps, with a SQLite store in memory
and one task.Clock for both ends. No reactor, no sockets, no sleeps.

Each test proves one promise of issue 3: hello and serials, routing by key, certificates
(issue, renewal, expiry and re-approval), enrollment tokens, pairing-code claims and
leases, pending caps, and fleet notifications.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogEvent, Logger, capturedLogs, formatEvent
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from accesstunnel.timetext import isoTime, parseIsoTime
from agent import cli as agent_cli
from agent.enrollment import (
    CA_FILE,
    CERTIFICATE_FILE,
    STATUS_FILE,
    Enrollment,
    StatusFile,
    renewalDue,
)
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, AgentTransport, LinkSettings
from groundcontrol.enrollment import CertificatePolicy, hashSecret
from groundcontrol.fleetwatch import DEFAULT_LEASE_CHECK_INTERVAL
from groundcontrol.notify import FleetEvent
from groundcontrol.pki import FleetCA, verifyDeviceCertificate
from groundcontrol.requestnotice import SERIAL_WAIT
from groundcontrol.sshserver import ServerSettings
from groundcontrol.store import PendingLimits
from groundcontrol.testing import (
    FakeAgentFactory,
    InMemoryFleet,
    OperatorSession,
    ScriptedSession,
    newKey,
    publicLine,
    refuseForwards,
    resultNow,
    scriptedSessions,
)
from tests.test_login_garbage import collectorOff

#: A plausible "now" (Nov 2023): certificates are dated from the shared clock.
T0 = 1_700_000_000

#: Keepalives that never fire in these tests, so the clock can jump by days in one step.
QUIET = 1e9

HOUR = 3600.0
DAY = 86400.0


class RecordingNotifier:
    """A notifier double: keeps every fleet event it is given."""

    def __init__(self) -> None:
        self.events: list[FleetEvent] = []

    def notify(self, event: FleetEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[tuple[str, str]]:
        return [(e.event, e.device) for e in self.events]


def captureLog(owner: Any, attribute: str = "_log") -> list[str]:
    """Route C{owner.<attribute>} (a Logger) into a list of formatted messages."""
    messages: list[str] = []

    def observer(event: LogEvent) -> None:
        messages.append(formatEvent(event))

    setattr(owner, attribute, Logger(namespace="test", observer=observer))
    return messages


@attrs.define
class AgentUnderTest:
    """A real agent link with its enrollment, and the in-memory connection it is on."""

    name: str
    key: keys.Key
    stateDir: Path
    enrollment: Enrollment
    factory: AgentLinkFactory
    sessions: list[ScriptedSession]
    pump: iosim.IOPump | None = None
    log: list[str] = attrs.Factory(list)

    @property
    def fingerprint(self) -> str:
        return fingerprint(publicLine(self.key))

    @property
    def status(self) -> dict[str, Any]:
        return StatusFile.read(self.stateDir)

    @property
    def certificatePEM(self) -> bytes:
        return (self.stateDir / CERTIFICATE_FILE).read_bytes()

    @property
    def connected(self) -> bool:
        return self.pump is not None and not self.pump.clientIO.disconnected


class World:
    """
    An in-memory fleet with a fleet CA and a recording notifier, and helpers to run real
    agents against it and to drive the control shell as an operator would.
    """

    def __init__(
        self,
        base: Path,
        start: float = T0,
        pendingLimits: PendingLimits | None = None,
    ) -> None:
        self.base = base
        self.clock = Clock()
        self.clock.advance(start)
        self.ca = FleetCA.create(base / "ca", datetime.fromtimestamp(start - DAY, UTC))
        self.notifier = RecordingNotifier()
        settings = ServerSettings(
            keepaliveInterval=QUIET,
            pendingLimits=pendingLimits if pendingLimits is not None else PendingLimits(),
        )
        self.fleet = InMemoryFleet(
            clock=self.clock,
            settings=settings,
            certificates=CertificatePolicy(self.ca),
            notifier=self.notifier,
        )
        self._serial = 0

    @property
    def now(self) -> float:
        return self.clock.seconds()

    @property
    def utcNow(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def advance(self, seconds: float) -> None:
        """Let time pass, then let everything that it set moving arrive."""
        self.clock.advance(seconds)
        self.fleet.flush()

    def poll(self) -> None:
        """One pass of the fleet watcher, and whatever it sends to agents."""
        self.fleet.pollFleet()
        self.fleet.flush()

    # -- agents --

    def agent(
        self,
        name: str,
        key: keys.Key | None = None,
        token: str | None = None,
        serial: str | None = None,
        stateName: str | None = None,
    ) -> AgentUnderTest:
        """A real agent for C{name} (not connected yet); a new key and state dir by default."""
        key = key if key is not None else newKey()
        self._serial += 1
        stateDir = self.base / f"state-{stateName or name}-{self._serial}"
        stateDir.mkdir()
        enrollment = Enrollment(
            stateDir,
            self.clock,
            requestedName=name,
            serial=serial if serial is not None else f"SN-{name}",
            version="0.1.0",
            token=token,
        )
        sessions: list[ScriptedSession] = []
        settings = LinkSettings(
            name=name,
            deviceKey=key,
            serverKey=ServerKeyPin(fingerprint(publicLine(self.fleet.hostKey))),
            keepaliveInterval=QUIET,
        )
        factory = AgentLinkFactory(
            settings,
            self.clock,  # type: ignore[arg-type]
            scriptedSessions(record=sessions),
            refuseForwards,
            enrollment,
        )
        result = AgentUnderTest(name, key, stateDir, enrollment, factory, sessions)
        result.log = captureLog(enrollment)
        return result

    def connect(self, agent: AgentUnderTest, host: str = "127.0.0.1") -> AgentUnderTest:
        """(Re)connect C{agent} from C{host} and let its enrollment steps run."""
        agent.pump = self.fleet.network.connect(self.fleet.factory, agent.factory, host)
        self.fleet.flush()
        return agent

    def start(self, name: str, **kwargs: Any) -> AgentUnderTest:
        """A new agent, connected."""
        host = kwargs.pop("host", "127.0.0.1")
        return self.connect(self.agent(name, **kwargs), host)

    def enrolled(self, name: str, **kwargs: Any) -> AgentUnderTest:
        """An agent for a device approved beforehand, connected."""
        agent = self.agent(name, **kwargs)
        self.fleet.enrollDevice(name, agent.key)
        return self.connect(agent)

    def disconnect(self, agent: AgentUnderTest) -> None:
        assert agent.pump is not None
        self.fleet.network.cut(agent.pump)

    # -- operators --

    def operator(self, name: str, admin: bool = False) -> keys.Key:
        return self.fleet.addOperator(name, admin=admin)

    def ctl(self, key: keys.Key, line: str) -> tuple[int | None, str, str]:
        """Run one control-shell command as the operator with C{key}: (status, out, err)."""
        operator = self.fleet.operator("ctl", key)
        session = self.fleet.session(operator)
        assert session.isOpen, session.openFailure
        session.exec(line.encode())
        self.fleet.flush()
        self.clock.advance(0)  # the control shell runs the command after answering
        self.fleet.flush()
        return session.exitStatus, bytes(session.output).decode(), bytes(session.stderr).decode()

    def session(self, key: keys.Key, device: str) -> OperatorSession:
        """An operator's session to C{device} (open or refused)."""
        operator = self.fleet.operator(f"dev_{device}", key)
        assert operator.connection is not None
        return self.fleet.session(operator)

    def reaches(self, key: keys.Key, device: str, agent: AgentUnderTest | None = None) -> bool:
        """
        Whether the operator with C{key} gets a working session on C{device} (and, given
        C{agent}, whether that agent is the one serving it).
        """
        before = len(agent.sessions) if agent is not None else 0
        session = self.session(key, device)
        if not session.isOpen:
            return False
        session.exec(b"hello")
        self.fleet.flush()
        self.clock.advance(0)
        self.fleet.flush()
        if bytes(session.output) != b"hello\n":
            return False
        return agent is None or len(agent.sessions) == before + 1

    def refusal(self, key: keys.Key, device: str) -> str:
        session = self.session(key, device)
        assert not session.isOpen, f"dev_{device} was reachable"
        return session.openFailureText

    # -- store --

    def device(self, name: str) -> Any:
        return resultNow(self.fleet.store.deviceByName(name))

    def requests(self) -> dict[str, Any]:
        """Pending enrollment requests by key fingerprint."""
        return {r.fingerprint: r for r in resultNow(self.fleet.store.listEnrollmentRequests())}

    def token(self, uses: int = 1, lifetime: float = HOUR, secret: str | None = None) -> str:
        secret = secret or f"token-{self._serial}-{uses}-{lifetime}"
        self._serial += 1
        resultNow(
            self.fleet.store.createToken(
                hashSecret(secret), uses, self.now + lifetime, "admin", self.now
            )
        )
        return secret

    def usesLeft(self) -> list[int]:
        return [t.usesLeft for t in resultNow(self.fleet.store.listTokens())]


class EnrollmentTestCase(SynchronousTestCase):
    def temporaryDirectory(self) -> Path:
        """A directory of this test's own, removed afterwards (not under the cwd)."""
        path = Path(tempfile.mkdtemp(prefix="enrollment-"))
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def setUp(self) -> None:
        base = self.temporaryDirectory()
        self.world = World(base)
        self.fleet = self.world.fleet
        self.admin = self.world.operator("root", admin=True)

    def assertRoutable(self, agent: AgentUnderTest, name: str | None = None) -> None:
        link = self.fleet.registry.lookup(name or agent.name)
        self.assertIsNotNone(link, f"{name or agent.name} is not routable")
        assert link is not None
        self.assertEqual(link.fingerprint, agent.fingerprint)

    def assertLinkRecordedByKey(self, name: str) -> None:
        """
        The device's last link (C{device show}) is recorded as one by its key, at the
        world's time: the link it was approved on, with no reconnect.
        """
        last = resultNow(self.fleet.store.lastLink(name))
        self.assertEqual(last.auth, "key")
        self.assertEqual(self.world.device(name).lastSeen, self.world.now)

    def assertPending(self, agent: AgentUnderTest, kind: str = "new") -> None:
        self.assertTrue(agent.connected, "the pending agent was disconnected")
        self.assertIsNotNone(self.fleet.registry.pendingFor(agent.fingerprint))
        self.assertEqual(self.world.requests()[agent.fingerprint].kind, kind)
        self.assertEqual(agent.enrollment.state, "pending")
        self.assertEqual(agent.status["state"], "pending")


class HelloTests(EnrollmentTestCase):
    """The agent's hello: where it stands, and its board serial."""

    def test_helloApproved(self) -> None:
        """
        An agent whose key is an approved device learns it is approved, under the store's
        name for it, and says so in its status file; the serial it reported is stored.
        """
        agent = self.world.enrolled("kiln7", serial="00000000b1c2d3e4")
        self.assertEqual(agent.enrollment.state, "approved")
        self.assertEqual(agent.enrollment.name, "kiln7")
        self.assertEqual(agent.status["state"], "approved")
        self.assertEqual(agent.status["name"], "kiln7")
        self.assertEqual(self.world.device("kiln7").serial, "00000000b1c2d3e4")
        link: Any = self.fleet.registry.lookup("kiln7")
        self.assertEqual(
            (link.details["version"], link.details["serial"]), ("0.1.0", "00000000b1c2d3e4")
        )

    def test_helloPending(self) -> None:
        """
        An unknown key is told it is pending; its request records the name it asks for,
        the serial it reported, its key and source; it is not routable.
        """
        agent = self.world.start("oven2", serial="SERIAL-42")
        self.assertPending(agent)
        request = self.world.requests()[agent.fingerprint]
        self.assertEqual(request.requestedName, "oven2")
        self.assertEqual(request.serial, "SERIAL-42")
        self.assertEqual(request.source.split(":")[0], "127.0.0.1")
        self.assertIsNone(self.fleet.registry.lookup("oven2"))
        self.assertIn("unknown device", self.world.refusal(self.admin, "oven2"))

    def test_serialChangeReachesStore(self) -> None:
        """A device that reports another serial on its next hello has it updated (audited)."""
        agent = self.world.enrolled("kiln7", serial="OLD-1")
        self.world.disconnect(agent)
        agent.enrollment._serial = "NEW-2"
        self.world.connect(agent)
        self.assertEqual(self.world.device("kiln7").serial, "NEW-2")
        self.world.poll()
        events = resultNow(self.fleet.store.auditSince(0, 1000))
        changes = [e.detail for e in events if e.event == "device.serial-changed"]
        self.assertEqual(changes[-1]["serial"], "NEW-2")
        self.assertEqual(changes[-1]["previous"], "OLD-1")


class RoutingByKeyTests(EnrollmentTestCase):
    """A device holding dev_a's key that asks for name b gets nothing of b."""

    def test_keyDecidesTheName(self) -> None:
        """
        An agent with a's key asking to be b is a, and only a: it serves a's sessions,
        b's sessions are not sent to it (b is offline), its certificate names a, and it
        cannot register a pairing code or redeem a token to get b.
        """
        aKey = self.fleet.enrollDevice("alpha")
        self.fleet.enrollDevice("bravo")
        impostor = self.world.agent("bravo", key=aKey, token=self.world.token(uses=5))
        self.world.connect(impostor)
        self.assertRoutable(impostor, "alpha")
        self.assertIsNone(self.fleet.registry.lookup("bravo"))
        self.assertEqual(impostor.enrollment.name, "alpha")
        self.assertIn("offline", self.world.refusal(self.admin, "bravo"))
        self.assertTrue(self.world.reaches(self.admin, "alpha", impostor))
        self.assertEqual(len(impostor.sessions), 1)
        issued = verifyDeviceCertificate(self.world.ca, impostor.certificatePEM, self.world.utcNow)
        self.assertEqual(issued.deviceName, "alpha")
        # The token was not spent on the name it asked for.
        self.assertEqual(self.world.usesLeft(), [5])
        self.assertNotIn(impostor.fingerprint, self.world.requests())

    def test_pendingNeverShadowsApprovedName(self) -> None:
        """
        While bravo is approved and connected, an unknown key asking for bravo waits as a
        re-key request: bravo's sessions still go to the real bravo; neither a token nor
        a claim lets the newcomer take the name.
        """
        bravo = self.world.enrolled("bravo")
        token = self.world.token(uses=3)
        newcomer = self.world.start("bravo", token=token)
        self.assertPending(newcomer, kind="rekey")
        self.assertRoutable(bravo, "bravo")
        self.assertTrue(self.world.reaches(self.admin, "bravo", bravo))
        self.assertEqual(newcomer.sessions, [])
        self.assertTrue(any("device 'bravo' exists" in m for m in newcomer.log), newcomer.log)
        self.assertEqual(self.world.usesLeft(), [3])
        # It shows a pairing code, but claiming it cannot re-key bravo either.
        code = newcomer.status["pairing_code"]
        bob = self.world.operator("bob")
        status, _, err = self.world.ctl(bob, f"claim {code} --for 1h")
        self.assertEqual(status, 1)
        self.assertIn("cannot re-key", err)
        self.world.poll()
        self.assertRoutable(bravo, "bravo")
        self.assertPending(newcomer, kind="rekey")
        self.assertEqual(self.world.device("bravo").fingerprint, bravo.fingerprint)

    def test_rekeyOldKeyWorksUntilApproved(self) -> None:
        """
        A device back with a new key is a re-key request; the old key keeps working (the
        old agent stays routable and can reconnect) until an admin approves the new key.
        Then the new link is routable without reconnecting and the old one is closed.
        """
        old = self.world.enrolled("kiln7")
        new = self.world.start("kiln7")
        self.assertPending(new, kind="rekey")
        self.world.disconnect(old)
        self.world.connect(old)
        self.assertRoutable(old, "kiln7")
        self.assertTrue(self.world.reaches(self.admin, "kiln7", old))

        status, _, err = self.world.ctl(self.admin, f"approve kiln7 --key {new.fingerprint}")
        self.assertEqual(status, 0, err)
        self.world.poll()
        self.assertRoutable(new, "kiln7")
        self.assertFalse(old.connected, "the old key's link was left open")
        self.assertTrue(new.connected)
        self.assertEqual(new.enrollment.state, "approved")
        self.assertTrue(self.world.reaches(self.admin, "kiln7", new))
        # The old key is now just an unknown key asking for a taken name.
        self.world.connect(old)
        self.assertPending(old, kind="rekey")
        self.assertRoutable(new, "kiln7")

    def test_rekeyApprovedWhileNewKeyOffline(self) -> None:
        """
        Approving a re-key while the device with the new key is offline closes the link
        of the old key at once: it is no longer the device's key and must not stay routable.
        """
        old = self.world.enrolled("kiln7")
        new = self.world.start("kiln7")
        self.world.disconnect(new)
        approve = f"approve kiln7 --key {new.fingerprint}"
        self.assertEqual(self.world.ctl(self.admin, approve)[0], 0)
        self.world.poll()
        self.assertFalse(old.connected, "the replaced key's link is still open")
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))
        self.assertIn("offline", self.world.refusal(self.admin, "kiln7"))
        self.world.connect(new)
        self.assertRoutable(new, "kiln7")

    def test_rekeyByNameRefused(self) -> None:
        """
        A stranger's key asking for approved kiln7 (another board serial, another address)
        is not approved by 'ctl approve kiln7': the refusal sets the device's key, serial
        and last seen against the request's key, serial (does not match), source and first
        seen, and gives the command that would approve it; kiln7's sessions still go to the
        real kiln7 and the request stays pending. 'ctl pending' says the serial does not
        match (table and --json). The command it gives does approve the new key.
        """
        real = self.world.enrolled("kiln7", serial="SN-1")
        self.world.advance(60)
        stranger = self.world.start("kiln7", serial="EVIL-9", host="127.0.0.9")

        status, out, err = self.world.ctl(self.admin, "approve kiln7")
        self.assertEqual((status, out), (1, ""))
        lines = err.splitlines()
        self.assertEqual(
            lines[0], "approve: kiln7 is an approved device with another key: not approved."
        )
        self.assertRegex(
            lines[1],
            rf"^  device's key +{re.escape(real.fingerprint)} +serial SN-1 +last seen "
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(",
        )
        self.assertRegex(
            lines[2],
            rf"^  request's key +{re.escape(stranger.fingerprint)} +serial EVIL-9 "
            r"\(matches: no\) +from 127\.0\.0\.9:\d+ +first seen \d{4}-.*Z \(now\)$",
        )
        self.assertIn(f"  approve kiln7 --key {stranger.fingerprint}", lines)
        self.assertIn(f"  reject kiln7 --key {stranger.fingerprint}", lines)
        self.world.poll()
        self.assertRoutable(real, "kiln7")
        self.assertTrue(self.world.reaches(self.admin, "kiln7", real))
        self.assertPending(stranger, kind="rekey")
        self.assertEqual(self.world.device("kiln7").fingerprint, real.fingerprint)

        status, out, _ = self.world.ctl(self.admin, "pending --json")
        (request,) = json.loads(out)
        self.assertEqual((request["kind"], request["serial_matches"]), ("rekey", "no"))
        status, out, _ = self.world.ctl(self.admin, "pending")
        header, row = out.splitlines()
        self.assertEqual(row.split()[header.split().index("SERIAL_MATCHES")], "no")

        status, _, err = self.world.ctl(self.admin, f"approve kiln7 --key {stranger.fingerprint}")
        self.assertEqual(status, 0, err)
        self.world.poll()
        self.assertRoutable(stranger, "kiln7")


class CertificateTests(EnrollmentTestCase):
    """Fleet certificates: issued over the link, renewed at a third of their life, expiry."""

    def assertCertificate(self, agent: AgentUnderTest, name: str) -> Any:
        pem = agent.certificatePEM
        issued = verifyDeviceCertificate(self.world.ca, pem, self.world.utcNow)
        self.assertEqual(issued.deviceName, name)
        self.assertEqual(issued.serial, agent.enrollment._serial)
        self.assertEqual(issued.publicKeyFingerprint, agent.fingerprint)
        self.assertEqual((agent.stateDir / CA_FILE).read_bytes(), self.world.ca.certificatePEM)
        return issued

    def test_approvedAgentGetsCertificate(self) -> None:
        """
        An approved agent is issued a certificate over its link and keeps it in its state
        dir: it verifies with the fleet CA and binds the device name, serial and key, for
        30 days; the store records it. Both programs log its expiry as ISO Z.
        """
        with capturedLogs() as events:
            agent = self.world.enrolled("kiln7", serial="B0ARD-7")
        issued = self.assertCertificate(agent, "kiln7")
        self.assertEqual(issued.notAfter.timestamp(), self.world.now + 30 * DAY)
        (record,) = resultNow(self.fleet.store.listCertificates("kiln7"))
        self.assertEqual(record.serialNumber, issued.serialNumber)
        self.assertEqual(agent.status["certificate_expires_at"], isoTime(issued.notAfter))
        until = isoTime(issued.notAfter)
        lines = [formatEvent(e) for e in events]
        self.assertIn(f"issued certificate {issued.serialNumber} to kiln7 until {until}", lines)
        self.assertIn(f"fleet certificate stored, valid until {until}", agent.log)
        self.assertEqual(self.world.device("kiln7").certificateExpiresAt, record.notAfter)

    def test_pendingAgentGetsNoCertificate(self) -> None:
        """A pending agent holds no certificate, and asking for one directly is refused."""
        agent = self.world.start("oven2")
        self.assertFalse((agent.stateDir / CERTIFICATE_FILE).exists())
        reply = agent.factory.enrollment._request  # the agent's own request helper
        d = defer.Deferred.fromCoroutine(reply(b"certificate@accesstunnel", {}))
        self.fleet.flush()
        self.assertEqual(self.successResultOf(d), {"ok": False, "error": "not approved"})

    def test_reconnectKeepsValidCertificate(self) -> None:
        """A reconnecting agent whose certificate has most of its life left asks for none."""
        agent = self.world.enrolled("kiln7")
        first = agent.certificatePEM
        self.world.disconnect(agent)
        self.world.advance(5 * DAY)
        self.world.connect(agent)
        self.assertEqual(agent.certificatePEM, first)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 1)

    def test_renewalAtAThirdOfLifeLeft(self) -> None:
        """
        The agent renews its certificate when a third of its life is left, not a second
        before, over the same link; the renewed one is scheduled for renewal in turn.
        """
        agent = self.world.enrolled("kiln7")
        first = self.assertCertificate(agent, "kiln7")
        due = renewalDue(first.notBefore.timestamp(), first.notAfter.timestamp())
        # 30 days, backdated 5 minutes: due 20 days after issue, less a third of 5 minutes.
        self.assertEqual(due, self.world.now + 20 * DAY - 100)

        self.world.advance(due - self.world.now - 1)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 1)
        self.world.advance(1)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 2)
        second = self.assertCertificate(agent, "kiln7")
        self.assertNotEqual(second.serialNumber, first.serialNumber)
        self.assertEqual(second.notAfter.timestamp(), due + 30 * DAY)
        self.assertTrue(agent.connected)

        nextDue = renewalDue(second.notBefore.timestamp(), second.notAfter.timestamp())
        self.world.advance(nextDue - self.world.now - 1)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 2)
        self.world.advance(1)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 3)

    def test_renewalRetriedAfterFailure(self) -> None:
        """
        A renewal that fails (groundcontrol cannot issue right now) is tried again later
        on the same link, well before the certificate expires.
        """
        agent = self.world.enrolled("kiln7")
        first = self.assertCertificate(agent, "kiln7")
        due = renewalDue(first.notBefore.timestamp(), first.notAfter.timestamp())
        store = self.fleet.store
        realRecord = store.recordCertificate
        failures = []

        def failingRecord(*args: Any) -> Any:
            failures.append(args)
            return defer.fail(RuntimeError("database is locked"))

        store.recordCertificate = failingRecord
        self.world.advance(due - self.world.now)
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        store.recordCertificate = realRecord
        # Within a day, long before the 10 days left run out, it has a new certificate.
        for _ in range(24):
            self.world.advance(HOUR)
        self.assertEqual(len(resultNow(self.fleet.store.listCertificates("kiln7"))), 2)
        self.assertCertificate(agent, "kiln7")

    def test_offlinePastExpiryComesBackPending(self) -> None:
        """
        A device offline past its certificate's expiry comes back pending ("reapprove")
        with its known key, is not routable, and one approveDevice makes it routable again
        (without reconnecting) with a fresh certificate.
        """
        agent = self.world.enrolled("kiln7")
        first = self.assertCertificate(agent, "kiln7")
        self.world.disconnect(agent)
        self.world.advance(first.notAfter.timestamp() - self.world.now + 1)
        self.world.poll()
        self.world.connect(agent)
        self.assertPending(agent, kind="reapprove")
        self.assertIsNone(self.fleet.registry.lookup("kiln7"))
        self.assertIn("offline", self.world.refusal(self.admin, "kiln7"))
        self.world.poll()
        self.assertIn(("device.pending", "kiln7"), self.world.notifier.kinds())

        resultNow(self.fleet.store.approveDevice("kiln7", "root", self.world.now))
        self.world.poll()
        self.assertRoutable(agent, "kiln7")
        self.assertEqual(agent.enrollment.state, "approved")
        self.assertTrue(self.world.reaches(self.admin, "kiln7", agent))
        second = self.assertCertificate(agent, "kiln7")
        self.assertGreater(second.notAfter, first.notAfter)
        self.assertLinkRecordedByKey("kiln7")
        # And it stays approved across a reconnect.
        self.world.disconnect(agent)
        self.world.connect(agent)
        self.assertRoutable(agent, "kiln7")

    def test_reapprovalShowsWhetherTheSerialMatches(self) -> None:
        """
        'ctl pending' (table and --json) says whether a re-approval's serial is the
        device's, as for a re-key: yes from its board; no from another one with its key
        (its state directory copied), where it said nothing (null, '-'). The approval's
        notification says so too, and the device keeps its serial until then.
        """
        agent = self.world.enrolled("kiln7", serial="SN-1")
        first = self.assertCertificate(agent, "kiln7")
        self.world.disconnect(agent)
        self.world.advance(first.notAfter.timestamp() - self.world.now + 1)
        self.world.poll()
        self.world.connect(agent)
        self.assertPending(agent, kind="reapprove")
        self.assertEqual(self.pendingSerials(), [("reapprove", "SN-1", "yes")])

        self.world.disconnect(agent)
        agent.enrollment._serial = "SN-2"
        self.world.connect(agent)
        self.assertEqual(self.pendingSerials(), [("reapprove", "SN-2", "no")])
        status, out, err = self.world.ctl(self.admin, "pending")
        self.assertEqual(status, 0, err)
        header, row = (line.split() for line in out.splitlines())
        self.assertEqual(header[3:5], ["SERIAL", "SERIAL_MATCHES"], out)
        self.assertEqual(row[3:5], ["SN-2", "no"], out)
        self.assertEqual(self.world.device("kiln7").serial, "SN-1")

        resultNow(self.fleet.store.approveDevice("kiln7", "root", self.world.now))
        self.world.poll()
        (approved,) = [e for e in self.world.notifier.events if e.event == "device.approved"][-1:]
        detail = approved.toJSON()["detail"]
        self.assertEqual(
            (detail["kind"], detail["serial"], detail["device_serial"], detail["serial_matches"]),
            ("reapprove", "SN-2", "SN-1", "no"),
        )
        self.assertEqual(self.world.device("kiln7").serial, "SN-2")

    def pendingSerials(self) -> list[tuple[str, str, str]]:
        """C{ctl pending --json}: each request's kind, serial and serial_matches."""
        status, out, err = self.world.ctl(self.admin, "pending --json")
        self.assertEqual(status, 0, err)
        return [(r["kind"], r["serial"], r["serial_matches"]) for r in json.loads(out)]


class TokenTests(EnrollmentTestCase):
    """Enrollment tokens: single use per device, use count and expiry enforced."""

    def test_tokenFromControlShellEnrolls(self) -> None:
        """
        A token an admin makes with 'tokens create' (printed once on stdout) enrolls an
        agent that presents it: approved and routable at once, on the same link, with a
        certificate; one use is spent.
        """
        status, out, err = self.world.ctl(self.admin, "tokens create --uses 2 --expires 1h")
        self.assertEqual(status, 0, err)
        token = out.strip()
        self.assertGreater(len(token), 30)
        self.assertIn("shown only now", err)
        agent = self.world.start("oven2", token=token)
        self.assertRoutable(agent, "oven2")
        self.assertTrue(agent.connected)
        self.assertEqual(agent.enrollment.state, "approved")
        self.assertEqual(agent.status["state"], "approved")
        self.assertTrue(self.world.reaches(self.admin, "oven2", agent))
        self.assertNotIn(agent.fingerprint, self.world.requests())
        self.assertEqual(self.world.usesLeft(), [1])
        self.assertEqual(self.world.device("oven2").approvedBy, "token:1")
        self.assertLinkRecordedByKey("oven2")

    def test_tokenDeviceCertificateBindsSerial(self) -> None:
        """A device enrolled with a token keeps the serial it reported: its record and
        its certificate bind it."""
        agent = self.world.start("oven2", token=self.world.token(), serial="PI-0042")
        self.assertEqual(self.world.device("oven2").serial, "PI-0042")
        issued = verifyDeviceCertificate(self.world.ca, agent.certificatePEM, self.world.utcNow)
        self.assertEqual(issued.serial, "PI-0042")

    def test_repeatedEnrollSpendsOneUse(self) -> None:
        """An enrolled agent presenting its token again (a reconnect) spends no other use."""
        token = self.world.token(uses=3)
        agent = self.world.start("oven2", token=token)
        self.world.disconnect(agent)
        self.world.connect(agent)
        d = defer.Deferred.fromCoroutine(
            agent.enrollment._request(b"enroll@accesstunnel", {"token": token})
        )
        self.fleet.flush()
        self.assertEqual(self.successResultOf(d), {"ok": True, "name": "oven2"})
        self.assertEqual(self.world.usesLeft(), [2])

    def test_replayBySameKeyRefused(self) -> None:
        """
        A key that redeemed a token cannot redeem it again, even once it is no longer a
        device (its name was re-keyed away) and asks for a fresh name.
        """
        token = self.world.token(uses=5)
        first = self.world.start("oven2", token=token)
        replacement = self.world.start("oven2")
        approval = self.fleet.store.approveDevice(
            "oven2", "root", self.world.now, fingerprint=replacement.fingerprint
        )
        resultNow(approval)
        self.world.poll()
        self.world.disconnect(replacement)
        again = self.world.agent("oven3", key=first.key, token=token)
        self.world.connect(again)
        self.assertPending(again)
        self.assertTrue(any("already redeemed" in m for m in again.log), again.log)
        self.assertIsNone(self.world.device("oven3"))
        self.assertEqual(self.world.usesLeft(), [4])

    def test_expiredTokenRefused(self) -> None:
        """A token past its expiry enrolls nobody: the agent stays pending and shows a code."""
        token = self.world.token(lifetime=HOUR)
        self.world.advance(HOUR)
        agent = self.world.start("oven2", token=token)
        self.assertPending(agent)
        self.assertTrue(any("has expired" in m for m in agent.log), agent.log)
        self.assertTrue(agent.status["pairing_code"])
        self.assertEqual(self.world.usesLeft(), [1])

    def test_exhaustedTokenRefused(self) -> None:
        """Once its uses are spent, a token enrolls no other device."""
        token = self.world.token(uses=1)
        first = self.world.start("oven2", token=token)
        second = self.world.start("oven3", token=token)
        self.assertRoutable(first, "oven2")
        self.assertPending(second)
        self.assertTrue(any("no uses left" in m for m in second.log), second.log)
        self.assertIsNone(self.world.device("oven3"))

    def test_unknownTokenRefused(self) -> None:
        """A made-up token is refused."""
        agent = self.world.start("oven2", token="not-a-token")
        self.assertPending(agent)
        self.assertTrue(any("no such enrollment token" in m for m in agent.log), agent.log)

    def test_lastUseRace(self) -> None:
        """
        Two agents present a one-use token at the same time (both requests in flight at
        groundcontrol before the store answers either): exactly one is enrolled, the
        other stays pending, and the token is not over-spent.
        """
        token = self.world.token(uses=1)
        store = self.fleet.store
        realRedeem = store.redeemToken
        held: list[tuple[defer.Deferred[Any], tuple[Any, ...]]] = []

        def heldRedeem(*args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            held.append((d, args))
            return d

        store.redeemToken = heldRedeem
        one = self.world.start("oven2", token=token)
        two = self.world.start("oven3", token=token)
        self.assertEqual(len(held), 2)
        store.redeemToken = realRedeem
        for d, args in held:
            realRedeem(*args).chainDeferred(d)
        self.fleet.flush()

        states = sorted(a.enrollment.state for a in (one, two))
        self.assertEqual(states, ["approved", "pending"])
        winner, loser = (one, two) if one.enrollment.state == "approved" else (two, one)
        self.assertRoutable(winner)
        self.assertPending(loser)
        self.assertIsNone(self.fleet.registry.lookup(loser.name))
        self.assertIsNone(self.world.device(loser.name))
        self.assertEqual(self.world.usesLeft(), [0])


class ClaimTests(EnrollmentTestCase):
    """Pairing codes and claims: an operator takes a device for a lease."""

    def setUp(self) -> None:
        super().setUp()
        self.bob = self.world.operator("bob")
        self.carol = self.world.operator("carol")

    def test_agentShowsPairingCode(self) -> None:
        """
        A pending agent without a token registers a pairing code and shows it in its
        status file and its log; the store keeps only its hash.
        """
        agent = self.world.start("oven2")
        code = agent.status["pairing_code"]
        self.assertRegex(code, r"^[A-Z2-9]{4}-[A-Z2-9]{4}$")
        self.assertEqual(agent.status["pairing_code_expires_at"], isoTime(self.world.now + 600))
        self.assertTrue(any(code in m and "claim" in m for m in agent.log), agent.log)
        events = resultNow(self.fleet.store.auditSince(0, 1000))
        self.assertNotIn(code, json.dumps([attrs.asdict(e) for e in events]))

    def test_claimMakesDeviceRoutableForOwner(self) -> None:
        """
        An operator's 'claim CODE --for 1h' approves the device and makes them its owner:
        it becomes routable on its live link, the owner reaches it, others do not, and
        'ls' shows the owner.
        """
        agent = self.world.start("oven2")
        code = agent.status["pairing_code"]
        status, out, err = self.world.ctl(self.bob, f"claim {code} --for 1h")
        self.assertEqual(status, 0, err)
        self.assertIn("claimed oven2", out)
        self.world.poll()
        self.assertRoutable(agent, "oven2")
        self.assertEqual(agent.enrollment.state, "approved")
        self.assertIsNone(agent.status["pairing_code"])
        self.assertTrue(self.world.reaches(self.bob, "oven2", agent))
        self.assertIn("no grant", self.world.refusal(self.carol, "oven2"))
        device = self.world.device("oven2")
        self.assertEqual((device.owner, device.leaseUntil), ("bob", self.world.now + HOUR))
        self.assertEqual(device.serial, "SN-oven2")
        verifyDeviceCertificate(self.world.ca, agent.certificatePEM, self.world.utcNow)
        _, listing, _ = self.world.ctl(self.bob, "ls --json")
        self.assertEqual([(d["name"], d["owner"]) for d in json.loads(listing)], [("oven2", "bob")])
        self.assertLinkRecordedByKey("oven2")

    def test_codeIsCaseAndSeparatorInsensitive(self) -> None:
        """A code typed in lower case without the dash is the same code."""
        agent = self.world.start("oven2")
        code = agent.status["pairing_code"].replace("-", "").lower()
        self.assertEqual(self.world.ctl(self.bob, f"claim {code}")[0], 0)

    def test_codeSingleUse(self) -> None:
        """A pairing code claims once; a second claim with it is refused."""
        agent = self.world.start("oven2")
        code = agent.status["pairing_code"]
        self.assertEqual(self.world.ctl(self.bob, f"claim {code} --for 1h")[0], 0)
        status, _, err = self.world.ctl(self.carol, f"claim {code} --for 1h")
        self.assertEqual(status, 1)
        self.assertIn("no such claim code", err)
        self.assertEqual(self.world.device("oven2").owner, "bob")

    def test_codeExpiresAndIsReplaced(self) -> None:
        """
        A code is good for ten minutes: after that a claim with it is refused, and the
        still-waiting agent has shown a new one, which works.
        """
        agent = self.world.start("oven2")
        old = agent.status["pairing_code"]
        self.world.advance(601)
        new = agent.status["pairing_code"]
        self.assertNotEqual(new, old)
        self.assertEqual(agent.status["pairing_code_expires_at"], isoTime(self.world.now + 600))
        status, _, err = self.world.ctl(self.bob, f"claim {old}")
        self.assertEqual(status, 1)
        self.assertIn("claim code", err)
        self.assertEqual(self.world.ctl(self.bob, f"claim {new}")[0], 0)

    def test_codeRetriedAfterFailure(self) -> None:
        """
        A pending agent whose pairing code could not be registered (groundcontrol's store
        failed) tries again a minute later on the same link, so the device does not stay
        without a claimable code until it happens to reconnect.
        """
        store = self.fleet.store
        realRegister = store.registerClaimCode
        store.registerClaimCode = lambda *args: defer.fail(RuntimeError("database is locked"))
        agent = self.world.start("oven2")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn("pairing_code", agent.status)
        store.registerClaimCode = realRegister
        self.world.advance(60)
        code = agent.status["pairing_code"]
        self.assertEqual(self.world.ctl(self.bob, f"claim {code}")[0], 0)

    def test_codeExpiresWhileAgentAway(self) -> None:
        """A code whose agent went away is refused as expired after ten minutes."""
        agent = self.world.start("oven2")
        code = agent.status["pairing_code"]
        self.world.disconnect(agent)
        self.world.advance(601)
        status, _, err = self.world.ctl(self.bob, f"claim {code}")
        self.assertEqual(status, 1)
        self.assertIn("expired", err)
        self.assertIsNone(self.world.device("oven2"))

    def test_leaseEnds(self) -> None:
        """
        When the lease ends the owner can no longer reach the device (it stays approved
        and connected) and the lapse is notified as claim.lapsed naming the owner.
        """
        agent = self.world.start("oven2")
        self.world.ctl(self.bob, f"claim {agent.status['pairing_code']} --for 1h")
        self.world.poll()
        self.assertTrue(self.world.reaches(self.bob, "oven2", agent))
        self.world.advance(HOUR - 1)
        self.world.poll()
        self.assertTrue(self.world.reaches(self.bob, "oven2", agent))
        self.world.advance(DEFAULT_LEASE_CHECK_INTERVAL)
        self.world.poll()
        self.assertIn("no grant", self.world.refusal(self.bob, "oven2"))
        (lapsed,) = [e for e in self.world.notifier.events if e.event == "claim.lapsed"]
        self.assertEqual((lapsed.device, lapsed.detail["owner"]), ("oven2", "bob"))
        self.assertIsNone(self.world.device("oven2").owner)
        self.assertRoutable(agent, "oven2")
        self.assertTrue(self.world.reaches(self.admin, "oven2", agent))


class PendingCapTests(EnrollmentTestCase):
    """Unknown devices are capped in all and per source host, with a clear refusal."""

    def setUp(self) -> None:
        base = self.temporaryDirectory()
        self.world = World(base, pendingLimits=PendingLimits(total=3, perHost=2))
        self.fleet = self.world.fleet
        self.admin = self.world.operator("root", admin=True)
        original = AgentTransport._log
        self.transportLog = captureLog(AgentTransport)
        self.addCleanup(setattr, AgentTransport, "_log", original)

    def test_perHostAndTotalCaps(self) -> None:
        """
        Past PendingLimits(total=3, perHost=2) new devices are refused at login: the
        agent's transport is disconnected with the reason, nothing is recorded; devices
        already pending may reconnect, and approved ones are never capped.
        """
        kiln = self.world.enrolled("kiln7")
        a = self.world.start("a1", host="10.0.0.1")
        b = self.world.start("b1", host="10.0.0.1")
        c = self.world.start("c1", host="10.0.0.1")
        self.assertPending(a)
        self.assertPending(b)
        self.assertTrue(c.pump is not None and c.pump.clientIO.disconnected)
        self.assertNotIn(c.fingerprint, self.world.requests())
        self.assertEqual(c.factory.failedLinks, 1)
        self.assertTrue(
            any("too many new devices from 10.0.0.1" in m for m in self.transportLog),
            self.transportLog,
        )
        d = self.world.start("d1", host="10.0.0.2")
        self.assertPending(d)
        e = self.world.start("e1", host="10.0.0.3")
        self.assertTrue(e.pump is not None and e.pump.clientIO.disconnected)
        self.assertTrue(
            any("too many devices are waiting for approval (3)" in m for m in self.transportLog),
            self.transportLog,
        )
        # Known keys are not new: a pending device reconnects, an approved one too.
        self.world.disconnect(a)
        self.world.connect(a, host="10.0.0.1")
        self.assertPending(a)
        self.world.disconnect(kiln)
        self.world.connect(kiln)
        self.assertRoutable(kiln, "kiln7")
        self.assertEqual(len(self.world.requests()), 3)

    def test_disconnectReasonOnTheWire(self) -> None:
        """The refusal is an SSH DISCONNECT carrying the text (what any client shows)."""
        for n in range(2):
            self.world.start(f"x{n}", host="10.0.0.9")
        fake = FakeAgentFactory("x9", newKey(), hostKey=self.fleet.hostKey, clock=self.world.clock)
        self.fleet.network.connect(self.fleet.factory, fake, "10.0.0.9")
        self.assertIsNone(fake.connection)
        self.assertIn("too many new devices", fake.disconnectReason or "")


class NotificationTests(EnrollmentTestCase):
    """The fleet watcher tells the notifier of every fleet event people care about."""

    def test_lifecycleNotified(self) -> None:
        """
        device.pending, device.rekey-requested, device.approved, device.claimed,
        claim.lapsed and device.revoked reach the notifier, with device, actor and detail;
        routine events (certificates, codes, serials) do not.
        """
        notifier = _WithoutPresence(self.world.notifier)
        oven = self.world.start("oven2", serial="S-1")
        self.world.poll()
        self.assertEqual(notifier.kinds(), [("device.pending", "oven2")])
        self.assertEqual(notifier.events[0].detail["fingerprint"], oven.fingerprint)
        self.assertEqual(notifier.events[0].detail["kind"], "new")

        self.world.ctl(self.admin, "approve oven2")
        self.world.poll()
        self.assertEqual(notifier.kinds()[-1], ("device.approved", "oven2"))
        self.assertEqual(notifier.events[-1].actor, "root")

        self.world.start("oven2")
        self.world.poll()
        self.assertEqual(notifier.kinds()[-1], ("device.rekey-requested", "oven2"))

        bob = self.world.operator("bob")
        fresh = self.world.start("fresh1")
        self.world.ctl(bob, f"claim {fresh.status['pairing_code']} --for 1h")
        self.world.poll()
        claimed = notifier.events[-1]
        self.assertEqual(
            (claimed.event, claimed.device, claimed.actor), ("device.claimed", "fresh1", "bob")
        )
        self.assertEqual(claimed.detail["owner"], "bob")

        self.world.advance(HOUR)
        self.world.poll()
        self.assertEqual(notifier.kinds()[-1], ("claim.lapsed", "fresh1"))

        self.world.ctl(self.admin, "revoke oven2")
        self.world.poll()
        self.assertEqual(notifier.kinds()[-1], ("device.revoked", "oven2"))
        self.assertFalse(oven.connected)

        self.assertEqual(
            [e for e, _ in notifier.kinds()],
            [
                "device.pending",
                "device.approved",
                "device.rekey-requested",
                "device.pending",
                "device.claimed",
                "claim.lapsed",
                "device.revoked",
            ],
        )

    def test_rekeyNotifiedWithSerialMatch(self) -> None:
        """
        A new key asking for approved kiln7 is notified once its agent's hello has reported
        a serial, saying whether it is kiln7's (serial_matches, in the webhook's document):
        yes for kiln7's board, no for another; an agent that reports none is notified
        after the wait, unknown.
        """
        notifier = _WithoutPresence(self.world.notifier)
        self.world.enrolled("kiln7", serial="SN-1")
        self.world.poll()
        for serial in ("SN-1", "SN-9"):
            self.world.start("kiln7", serial=serial)
            self.world.poll()
        self.world.start("kiln7", serial="")
        self.world.poll()
        self.assertEqual([e for e, _ in notifier.kinds()].count("device.rekey-requested"), 2)
        self.world.advance(SERIAL_WAIT)
        self.world.poll()
        documents = [e.toJSON() for e in notifier.events if e.event == "device.rekey-requested"]
        self.assertEqual(
            [(d["event"], d["detail"]["serial"], d["detail"]["serial_matches"]) for d in documents],
            [
                ("device.rekey-requested", "SN-1", "yes"),
                ("device.rekey-requested", "SN-9", "no"),
                ("device.rekey-requested", None, "unknown"),
            ],
        )
        self.assertEqual({d["detail"]["device_serial"] for d in documents}, {"SN-1"})

    def test_tokenEnrollmentNotified(self) -> None:
        """
        A device enrolled with a token is notified as pending (its first contact) and then
        as approved by the token.
        """
        notifier = _WithoutPresence(self.world.notifier)
        self.world.start("oven2", token=self.world.token())
        self.world.poll()
        self.assertEqual(
            notifier.kinds(), [("device.pending", "oven2"), ("device.approved", "oven2")]
        )
        self.assertEqual(notifier.events[1].actor, "token:1")
        self.assertEqual(notifier.events[1].detail["kind"], "token")


class _WithoutPresence:
    """A view of a recording notifier without device.online/offline (tests/test_flapping.py
    covers those), so lifecycle sequences read as the lifecycle."""

    _PRESENCE = ("device.online", "device.offline", "device.flapping")

    def __init__(self, notifier: Any) -> None:
        self._notifier = notifier

    @property
    def events(self) -> list[Any]:
        return [e for e in self._notifier.events if e.event not in self._PRESENCE]

    def kinds(self) -> list[tuple[str, str]]:
        return [(e.event, e.device) for e in self.events]


def test_pairPrintsTheCode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    'tunnel-agent pair --state DIR' prints the code the running agent registered (stdout,
    alone on its line; when it expires, as the server's JSON and people read it, and how to
    claim it on stderr), and once the device is claimed says there is nothing to pair.
    """
    world = World(tmp_path, start=int(time.time()))
    agent = world.start("oven2")
    code = agent.status["pairing_code"]
    expires = isoTime(world.now + 600)
    assert any(f"pairing code {code} (valid until {expires})" in line for line in agent.log)
    now = world.now + 5
    assert agent_cli.main(["pair", "--state", str(agent.stateDir)], now=lambda: now) == 0
    out, err = capsys.readouterr()
    assert out == f"{code}\n"
    claim = f"ssh ctl@groundcontrol claim {code} --for 7d"
    assert err == f"expires {expires} (in 9 min); claim it with: {claim}\n"

    bob = world.operator("bob")
    status, _, _ = world.ctl(bob, f"claim {code} --for 1h")
    assert status == 0
    world.poll()
    assert agent_cli.main(["pair", "--state", str(agent.stateDir)]) == 0
    assert "approved as oven2" in capsys.readouterr().out


def test_pairingCodeWithTheClockUnset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    A device whose clock looks unset (a board without a real-time clock before NTP: 1970)
    gives its pairing code's lifetime, not a date in 1970, and says the clock looks unset,
    in its log and in 'tunnel-agent pair'. Once NTP has set the clock, 'pair' still prints
    the code, offered before, as running out within its lifetime (its expiry says 1970).
    """
    world = World(tmp_path, start=12)
    agent = world.start("oven2")
    code = agent.status["pairing_code"]
    unset = (
        "this device's clock looks unset: it says {now}, before this agent was written "
        "(2026-01-01T00:00:00Z)"
    )
    (line,) = [m for m in agent.log if m.startswith(f"pairing code {code} ")]
    assert line.startswith(
        f"pairing code {code} (valid for 10 min; {unset.format(now='1970-01-01T00:00:12Z')}): "
    ), line
    assert "1970-01-01T00:10:12Z" not in line
    now = world.now + 60
    assert agent_cli.main(["pair", "--state", str(agent.stateDir)], now=lambda: now) == 0
    out, err = capsys.readouterr()
    assert out == f"{code}\n"
    claim = f"ssh ctl@groundcontrol claim {code} --for 7d"
    said = unset.format(now="1970-01-01T00:01:12Z")
    assert err == f"expires in 9 min ({said}); claim it with: {claim}\n"

    ntp = datetime(2026, 11, 27, 9, 31, tzinfo=UTC).timestamp()
    assert agent_cli.main(["pair", "--state", str(agent.stateDir)], now=lambda: ntp) == 0
    out, err = capsys.readouterr()
    assert out == f"{code}\n"
    assert err == (
        "expires within 10 min (it was offered before this device's clock was set; the "
        f"agent offers a new code when it runs out); claim it with: {claim}\n"
    )


def test_pairingCodeOfferedBeforeTheClockWentBack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A code offered with the clock set, read after the clock went back to 1970 (a reboot
    without a real-time clock, before the agent offered a new one): its date, and that the
    clock looks unset, not 'in 20784 d'.
    """
    (tmp_path / STATUS_FILE).write_text(
        json.dumps(
            {
                "state": "pending",
                "pairing_code": "K7QP-M2XD",
                "pairing_code_expires_at": "2026-11-27T09:40:00Z",
            }
        )
    )
    assert agent_cli.main(["pair", "--state", str(tmp_path)], now=lambda: 30.0) == 0
    assert capsys.readouterr().err.startswith(
        "expires 2026-11-27T09:40:00Z (this device's clock looks unset: it says "
        "1970-01-01T00:00:30Z, before this agent was written (2026-01-01T00:00:00Z)); "
    )


def test_pairWithoutAgent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'tunnel-agent pair' on a state dir with no agent status says so and fails."""
    assert agent_cli.main(["pair", "--state", str(tmp_path)]) == 1
    assert "is the agent running" in capsys.readouterr().err


def test_statusPrintsJSON(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'tunnel-agent status' prints the status file as JSON."""
    world = World(tmp_path, start=int(time.time()))
    agent = world.enrolled("kiln7")
    assert agent_cli.main(["status", "--state", str(agent.stateDir)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["state"], status["name"]) == ("approved", "kiln7")
    assert (parseIsoTime(status["certificate_expires_at"]) or 0) > time.time()


def test_statusFileInTheVocabulary(tmp_path: Path) -> None:
    """
    status.json, as a pending and then an enrolled agent write it, has snake_case keys and
    its times (pairing code expiry, certificate expiry, last update) as ISO 8601 UTC with a
    Z, as the server's --json output and webhooks have them; no epoch numbers.
    """
    world = World(tmp_path, start=int(time.time()))
    pending = json.loads((world.start("oven2").stateDir / "status.json").read_text())
    enrolled = json.loads((world.enrolled("kiln7").stateDir / "status.json").read_text())
    assert set(pending) == {
        "state",
        "name",
        "pairing_code",
        "pairing_code_expires_at",
        "updated_at",
    }
    assert set(enrolled) >= {"state", "name", "certificate_expires_at", "updated_at"}
    for written in (pending, enrolled):
        for key, value in written.items():
            assert re.fullmatch(r"[a-z]+(_[a-z]+)*", key), key
            if key.endswith("_at") and value is not None:
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value), (key, value)
            assert not isinstance(value, int | float), (key, value)


def test_oldStatusFileStillReads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    A status.json an agent from before the vocabulary wrote (camelCase, epoch times), still
    there after an upgrade replaced the programs and before the agent restarted: the new
    'tunnel-agent pair' finds its code and expiry, 'status' prints it in today's spelling.
    """
    t0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z (a set clock: after TIME_EPOCH)
    (tmp_path / "status.json").write_text(
        json.dumps(
            {
                "state": "pending",
                "name": "oven2",
                "pairingCode": "K7QP-M2XD",
                "pairingCodeExpires": t0 + 600.25,
                "certificateExpires": None,
                "updatedAt": "2026-09-21T14:13:20Z",
            }
        )
    )
    assert agent_cli.main(["pair", "--state", str(tmp_path)], now=lambda: t0) == 0
    out, err = capsys.readouterr()
    assert out == "K7QP-M2XD\n"
    assert err.startswith("expires 2026-09-21T14:23:20Z (in 10 min); claim it with:")
    assert agent_cli.main(["status", "--state", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "state": "pending",
        "name": "oven2",
        "pairing_code": "K7QP-M2XD",
        "pairing_code_expires_at": "2026-09-21T14:23:20Z",
        "certificate_expires_at": None,
        "updated_at": "2026-09-21T14:13:20Z",
    }
    assert agent_cli.main(["pair", "--state", str(tmp_path)], now=lambda: t0 + 601) == 1


def test_statusFileOneFieldPerLine(tmp_path: Path) -> None:
    """The status file reads as json.dumps(indent=2, sort_keys=True) writes it (one field
    a line, for people who look), though written without the json module's indenting
    encoder, whose closures leave a reference cycle per write
    (tests/test_agent_link_garbage.py)."""
    status = StatusFile(tmp_path)
    status.update(
        state="pending", name="kiln7", pairing_code="ABCD-1234", pairing_code_expires_at=None
    )
    status.update(pairing_code=None, note='quotes " and ünïcode')
    text = (tmp_path / "status.json").read_text()
    written = json.loads(text)
    assert text == json.dumps(written, indent=2, sort_keys=True)
    assert written["note"] == 'quotes " and ünïcode'
    assert StatusFile.read(tmp_path) == written


def test_statusFileLeavesNoGarbage(tmp_path: Path) -> None:
    """Writing the status file (each link's hello does) leaves nothing for the cyclic
    collector: why it is not written with json.dumps(indent=2) (agent.enrollment._statusJSON)."""
    status = StatusFile(tmp_path)
    status.update(state="pending", name="kiln7")
    with collectorOff() as garbage:
        status.update(pairing_code="ABCD-1234", pairing_code_expires_at="2023-11-14T22:23:20Z")
    assert garbage == []
