"""
Attacks found by the session-17 security review, each kept as a test of its fix.

Each test plays the hostile party on a whole in-memory groundcontrol (or on the one
piece it attacks) and checks that the attack no longer works.
"""

from __future__ import annotations

import os
import pwd
import struct
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from twisted.conch.ssh import common, connection, keys
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    LogLevel,
    PredicateResult,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.enrollmessages import HELLO, decodeMessage, encodeMessage
from accesstunnel.keys import fingerprint
from accesstunnel.logfilter import MinimumLevel
from agent.forward import ForwardChannel
from agent.remoteforward import RemoteForwarder
from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.auth import FleetKeyChecker
from groundcontrol.preauth import PenaltyPolicy
from groundcontrol.sshserver import (
    ENROLLMENT_REQUEST_BURST,
    ENROLLMENT_REQUEST_INTERVAL,
    MAX_UNSENT_FOR_PEER,
    MIN_PEER_MAX_PACKET,
    PEER_REKEY_BURST,
    PEER_REKEY_INTERVAL,
)
from groundcontrol.store import PendingLimitReached, PendingLimits
from groundcontrol.testing import (
    InMemoryFleet,
    OperatorSession,
    Script,
    ScriptedSession,
    echoScript,
    newKey,
    openMemoryStore,
    publicLine,
    resultNow,
    scriptedSessions,
)
from tests.test_access import LOGIN_USER, AccessFleet
from tests.test_agent_forwarding import ListeningReactor
from tests.test_enrollment import EnrollmentTestCase


def captureLog(case: SynchronousTestCase) -> list[Any]:
    """Every log event from now to the end of C{case}'s test."""
    events: list[Any] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class OperatorChoosesLoginUserTests(SynchronousTestCase):
    """
    ``login-user@accesstunnel`` is groundcontrol's word to the agent (a grant's ``--as``).
    An operator who sent it on their own session channel would pick the user the device
    runs their session as: root, on an agent running as root, whatever their grant says.
    """

    def setUp(self) -> None:
        self.world = AccessFleet()

    def test_operatorLoginUserRequestRefused(self) -> None:
        """groundcontrol refuses the request from an operator; the device never sees it."""
        self.world.ctl(self.world.root, "grant bob lab1 --as pi")
        session = self.world.session(self.world.bob, "lab1")
        self.assertTrue(session.isOpen)
        answer = session.request(LOGIN_USER, common.NS(b"root"))
        self.world.fleet.flush()
        assert answer is not None
        self.failureResultOf(answer)
        device = self.world.sessions[-1]
        self.assertEqual(
            [r for r in device.requests if r[0] == LOGIN_USER],
            [(LOGIN_USER, common.NS(b"pi"), True)],
        )

    def test_operatorLoginUserRefusedWithoutAGrantUser(self) -> None:
        """Nor may an operator whose grant names no user send one first."""
        self.world.ctl(self.world.root, "grant bob lab1")
        session = self.world.session(self.world.bob, "lab1")
        answer = session.request(LOGIN_USER, common.NS(b"root"))
        self.world.fleet.flush()
        assert answer is not None
        self.failureResultOf(answer)
        self.assertNotIn(LOGIN_USER, [r[0] for r in self.world.sessions[-1].requests])

    def test_otherPrivateRequestsRefused(self) -> None:
        """Any request in the project's own namespace is groundcontrol's, not an operator's."""
        self.world.ctl(self.world.root, "grant bob lab1")
        session = self.world.session(self.world.bob, "lab1")
        answer = session.request(b"anything@accesstunnel", b"")
        self.world.fleet.flush()
        assert answer is not None
        self.failureResultOf(answer)
        self.assertNotIn(b"anything@accesstunnel", [r[0] for r in self.world.sessions[-1].requests])


class AgentTakesOneLoginUserTests(SynchronousTestCase):
    """The agent's side: a session's user is decided once, by the first login-user request."""

    def ask(self, channel: SessionChannel, user: bytes) -> Any:
        return channel.requestReceivedWithReply(LOGIN_USER, common.NS(user), True)

    def test_secondLoginUserRefused(self) -> None:
        """After one login user, another is refused and the first stays."""
        me = pwd.getpwuid(os.geteuid()).pw_name.encode()
        channel = SessionChannel(SessionEnvironment(), Clock())
        self.assertTrue(self.ask(channel, me))
        chosen = channel.environment.pw
        self.assertFalse(self.ask(channel, me))
        self.assertEqual(channel.environment.pw, chosen)


def _forwardRequest(address: bytes, port: int) -> bytes:
    return common.NS(address) + struct.pack(">L", port)


class _ForwardsWorld(SynchronousTestCase):
    """lab1 granted to bob and carol; its fake agent answers remote forwards in memory."""

    #: Whether the fake agent takes ports below 1024 (as the real one does, running as root).
    agentIsRoot = False
    #: What bob's grant adds to "grant bob lab1".
    bobGrant = ""

    def setUp(self) -> None:
        self.world = AccessFleet()
        self.carol = self.world.fleet.addOperator("carol")
        self.world.ctl(self.world.root, f"grant bob lab1 {self.bobGrant}")
        self.world.ctl(self.world.root, "grant carol lab1")
        self.reactor = ListeningReactor()
        agentConn = self.world.fleet.registry.lookup("lab1")
        assert agentConn is not None
        # The fake agent answers remote forwards as the real one does, listening in memory.
        agentFactory = next(
            pump.client.factory
            for pump in self.world.fleet.network.pumps
            if getattr(pump.client.factory, "name", None) == "lab1"
        )
        forwarder = RemoteForwarder(
            self.reactor, agentFactory.connection, allowPrivilegedPorts=self.agentIsRoot
        )

        def answer(requestType: bytes, data: bytes) -> Any:
            if requestType == b"tcpip-forward":
                return forwarder.forward(data)
            if requestType == b"cancel-tcpip-forward":
                return forwarder.cancel(data)
            return 0

        agentFactory.connection.gotGlobalRequest = answer

    def ask(self, key: Any, requestType: bytes, data: bytes) -> Any:
        """Send a global request on a new connection of C{key} to dev_lab1 (kept open)."""
        operator = self.world.fleet.operator("dev_lab1", key)
        self.world.fleet.flush()
        assert operator.connection is not None
        d = operator.connection.sendGlobalRequest(requestType, data, wantReply=1)
        self.world.fleet.flush()
        return d


class OtherOperatorsForwardsTests(_ForwardsWorld):
    """
    Two operators granted the same device: one's ``ssh -R`` is theirs alone. A
    ``cancel-tcpip-forward`` naming another operator's forward went to the device, which
    closed the listener; the same operator could then ask for that port and receive the
    connections meant for the first. C{SessionRouter.forwardRequest} passes a cancel on
    only for a forward the same connection owns.
    """

    def test_cannotCancelAnotherOperatorsForward(self) -> None:
        """carol's cancel of bob's forward is refused, and bob's listener stays."""
        asked = self.ask(self.world.bob, b"tcpip-forward", _forwardRequest(b"localhost", 8080))
        self.successResultOf(asked)
        (listening,) = self.reactor.ports
        cancelled = self.ask(
            self.carol, b"cancel-tcpip-forward", _forwardRequest(b"localhost", 8080)
        )
        self.failureResultOf(cancelled)
        self.assertFalse(listening.stopped)

    def test_ownerCancelsOwnForward(self) -> None:
        """The connection that made a forward cancels it (``~C -KR``): the listener stops."""
        operator = self.world.fleet.operator("dev_lab1", self.world.bob)
        self.world.fleet.flush()
        assert operator.connection is not None
        request = _forwardRequest(b"localhost", 8080)
        asked = operator.connection.sendGlobalRequest(b"tcpip-forward", request, wantReply=1)
        self.world.fleet.flush()
        self.successResultOf(asked)
        (listening,) = self.reactor.ports
        cancelled = operator.connection.sendGlobalRequest(
            b"cancel-tcpip-forward", request, wantReply=1
        )
        self.world.fleet.flush()
        self.successResultOf(cancelled)
        self.assertTrue(listening.stopped)


class ForwardAddressInLogTests(_ForwardsWorld):
    """
    The address an operator names in ``ssh -R ADDRESS:PORT:...`` is theirs to spell, and
    groundcontrol's log line for the forward ("bob forwards ADDRESS:PORT on device lab1")
    printed it as it came: new lines (forged log lines) and escape sequences. It is now
    made inert (relay.inertText) and cut to 64 characters.
    """

    def test_forwardAddressInertInTheLog(self) -> None:
        events = captureLog(self)
        evil = b"x\n2026-11-27T10:00:00+0000 [groundcontrol] forged\x1b[2J"
        self.successResultOf(
            self.ask(self.world.bob, b"tcpip-forward", _forwardRequest(evil, 8080))
        )
        (line,) = [formatEvent(e) for e in events if "forwards" in (e.get("log_format") or "")]
        self.assertTrue(line.isprintable(), line)


class PrivilegedRemoteForwardTests(_ForwardsWorld):
    """
    The agent, running as root, takes a remote forward on a port below 1024 for anyone
    (agent/link.py: allowPrivilegedPorts when root), like sshd for a root login. But an
    operator whose grant runs their sessions as pi (``--as pi``) may not do as root what
    pi cannot: listen on 127.0.0.1:25 or :53 of the device, where local programs expect
    a root service. groundcontrol's forwardRequest passes a port below 1024 on only for
    a grant without a login user, or as root.
    """

    agentIsRoot = True
    bobGrant = "--as pi"

    def test_loginUserCannotTakePrivilegedPort(self) -> None:
        asked = self.ask(self.world.bob, b"tcpip-forward", _forwardRequest(b"localhost", 25))
        self.failureResultOf(asked)
        self.assertEqual(self.reactor.ports, [])

    def test_withoutLoginUserAsBefore(self) -> None:
        """carol's grant names no user: her sessions run as the agent's, root; so may she."""
        asked = self.ask(self.carol, b"tcpip-forward", _forwardRequest(b"localhost", 25))
        self.successResultOf(asked)


class WeakSignatureTests(SynchronousTestCase):
    """
    Logins are signed with ssh-ed25519 or rsa-sha2-256/512 only, as groundcontrol
    advertises (server-sig-algs): not with SHA-1 (``ssh-rsa``) or DSA (``ssh-dss``), which
    Conch's key check accepts. The signature's own algorithm counts, not only the one the
    request names (Conch verifies with the one inside the signature).
    """

    def setUp(self) -> None:
        self.store = openMemoryStore()
        self.rsa = keys.Key(rsa.generate_private_key(65537, 2048))
        resultNow(self.store.addAccount("ada", [publicLine(self.rsa)], False, 1_700_000_000.0))
        self.checker = FleetKeyChecker(self.store)

    def login(self, user: bytes, key: keys.Key, algName: bytes, signatureType: bytes | None) -> Any:
        sigData = b"session id and request"
        signature = None if signatureType is None else key.sign(sigData, signatureType)
        return self.checker.requestAvatarId(
            SSHPrivateKey(user, algName, key.public().blob(), sigData, signature)
        )

    def test_rsaSHA2Accepted(self) -> None:
        """The control: rsa-sha2-256 and -512 log in."""
        for algorithm in (b"rsa-sha2-256", b"rsa-sha2-512"):
            login = self.successResultOf(self.login(b"ctl", self.rsa, algorithm, algorithm))
            self.assertEqual(login.account.name, "ada")

    def test_sha1Refused(self) -> None:
        """ssh-rsa (SHA-1) is refused, named as such or inside an rsa-sha2 request."""
        self.failureResultOf(self.login(b"ctl", self.rsa, b"ssh-rsa", None), UnauthorizedLogin)
        self.failureResultOf(
            self.login(b"ctl", self.rsa, b"ssh-rsa", b"ssh-rsa"), UnauthorizedLogin
        )
        self.failureResultOf(
            self.login(b"ctl", self.rsa, b"rsa-sha2-256", b"ssh-rsa"), UnauthorizedLogin
        )
        self.failureResultOf(
            self.login(b"agent+kiln7", self.rsa, b"rsa-sha2-512", b"ssh-rsa"), UnauthorizedLogin
        )

    def test_dsaRefused(self) -> None:
        """A DSA key is refused, even as a new device's."""
        dsaKey = keys.Key(dsa.generate_private_key(1024))
        self.failureResultOf(
            self.login(b"agent+kiln7", dsaKey, b"ssh-dss", b"ssh-dss"), UnauthorizedLogin
        )
        self.failureResultOf(
            self.login(b"agent+kiln7", dsaKey, b"ssh-dss", None), UnauthorizedLogin
        )


class EnrollmentRequestFloodTests(SynchronousTestCase):
    """
    A device's enrollment requests (hello, enroll, claim-code, certificate) each cost
    groundcontrol a store call, most a write with an audit event (a hello whose serial
    changed), a certificate a signature. Any key may connect as a pending device, and it
    could send them back to back, without end: the store and the audit log flooded by one
    link. The agent makes a few per link (at most 4 at its start, then one every ten
    minutes or hours); a link gets a burst of them, then one per interval.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.agent, _ = self.fleet.agent("oven2", newKey())
        self.fleet.flush()

    def hellos(self, count: int) -> list[bool]:
        """Send C{count} hellos with changing serials; whether each was answered."""
        conn = self.agent.connection
        assert conn is not None
        answers: list[bool] = []
        for i in range(count):
            asked = conn.sendGlobalRequest(
                HELLO, encodeMessage({"serial": f"serial-{i % 2}"}), wantReply=1
            )
            asked.addCallbacks(lambda _: answers.append(True), lambda _: answers.append(False))
        self.fleet.flush()
        self.assertEqual(len(answers), count)
        return answers

    def test_pendingDeviceCannotFloodTheStore(self) -> None:
        """200 hellos with changing serials: a burst is answered, the rest refused."""
        before = resultNow(self.fleet.store.lastAuditId())
        answered = self.hellos(200).count(True)
        self.assertLessEqual(answered, ENROLLMENT_REQUEST_BURST)
        self.assertGreaterEqual(answered, 4)  # the agent's own start is never refused
        written = resultNow(self.fleet.store.lastAuditId()) - before
        self.assertLessEqual(written, ENROLLMENT_REQUEST_BURST)

    def test_refilled(self) -> None:
        """After the interval, one more is answered, and only one."""
        self.hellos(ENROLLMENT_REQUEST_BURST + 1)
        self.fleet.clock.advance(ENROLLMENT_REQUEST_INTERVAL)
        self.assertEqual(self.hellos(2), [True, False])


class ClaimCodeGuessingTests(EnrollmentTestCase):
    """
    ``ctl claim CODE`` is open to every account, and a pairing code is ~40 bits that live
    ten minutes; with many devices showing codes at once (a rollout) and no bound on wrong
    guesses, an operator with no grant could guess one and own a device. Bounded since
    by the control shell's claim (groundcontrol/control/claimguesses.py: ten wrong codes,
    then one a minute; tests/test_claim_guesses.py).
    """

    def test_wrongGuessesAreBounded(self) -> None:
        """After 100 wrong codes in a row, the account's next claim is refused for a while."""
        mallory = self.world.operator("mallory")
        code = self.world.start("oven2").status["pairing_code"]
        for i in range(100):
            status, _, _ = self.world.ctl(mallory, f"claim AAAA-{i:04d}")
            self.assertNotEqual(status, 0)
        status, _, _ = self.world.ctl(mallory, f"claim {code}")
        self.assertNotEqual(status, 0)


class PendingHelloRevealsNamesTests(SynchronousTestCase):
    """
    A stranger may log in as ``agent+NAME`` with a fresh key and wait as a pending device;
    the hello answer said ``rekey`` when NAME was an existing device and ``new`` when not.
    One pending key, reconnecting under one name after another (its request is updated,
    no new one made, no cap spent), enumerated the fleet's device names. The answer now
    says ``pending`` for both; the store keeps the kind for the admins.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.fleet.enrollDevice("kiln7")

    def hello(self, name: str, key: keys.Key) -> Any:
        agent, pump = self.fleet.agent(name, key)
        self.fleet.flush()
        assert agent.connection is not None
        asked = agent.connection.sendGlobalRequest(HELLO, encodeMessage({}), wantReply=1)
        self.fleet.flush()
        answer = decodeMessage(self.successResultOf(asked))
        pump.client.transport.loseConnection()
        self.fleet.flush()
        return answer["state"]

    def test_sameAnswerWhetherTheNameExists(self) -> None:
        """One stranger's key, asking for an existing and a free name: the same answer."""
        stranger = newKey()
        self.assertEqual(self.hello("kiln7", stranger), self.hello("no-such-device", stranger))
        self.assertEqual(self.hello("kiln7", newKey()), "pending")


class PeerRekeyFloodTests(SynchronousTestCase):
    """
    Before login a source gets few key exchanges (two per connection, and the no-auth
    allowance). After it, nothing bounded the ones a peer starts: any key logs in as a
    pending device, and could then re-exchange keys back to back, each costing
    groundcontrol's one process a key exchange and a signature (DHEat, after login). A
    logged-in peer gets a burst of re-exchanges, then one per interval; beyond that it is
    disconnected. Ours come every 1 GiB or hour, OpenSSH's every 1-4 GiB.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.agent, self.pump = self.fleet.agent("oven2", newKey())
        self.fleet.flush()
        assert self.agent.connection is not None

    def rekey(self, times: int) -> int:
        """Start C{times} re-exchanges one after the other; how many were completed."""
        client = self.pump.client
        done = 0
        for _ in range(times):
            if self.agent.lost:
                break
            client.sendKexInit()
            self.fleet.flush()
            if not self.agent.lost:
                done += 1
        return done

    def test_backToBackRekeysDisconnected(self) -> None:
        """200 back to back: a burst is served, then the peer is disconnected."""
        done = self.rekey(200)
        self.assertTrue(self.agent.lost)
        self.assertLessEqual(done, PEER_REKEY_BURST)
        self.assertIn("key exchanges", self.agent.disconnectReason or "")

    def test_rekeysAtTheIntervalServed(self) -> None:
        """One per interval goes on for ever."""
        for _ in range(3 * PEER_REKEY_BURST):
            self.assertEqual(self.rekey(1), 1)
            self.fleet.clock.advance(PEER_REKEY_INTERVAL)
        self.assertFalse(self.agent.lost)


class PendingLoginLoopTests(SynchronousTestCase):
    """
    Connections that end without a login count against their source (failures, key
    exchanges without a login, early closes); logins never do. But any key logs in as a
    pending device, so one pending key logging in and out in a loop had groundcontrol
    compute a key exchange and a signature check each time, unbounded: the DHEat that the
    no-auth allowance stops, by logging in. A login that ends while its device is still
    pending now draws on the no-auth allowance (30 at once, then one a second).
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()

    def loop(self, key: keys.Key, name: str, times: int) -> int:
        """Log in as agent+NAME with C{key} and leave, C{times} times; how many logged in."""
        served = 0
        for _ in range(times):
            agent, pump = self.fleet.agent(name, key)
            self.fleet.flush()
            if agent.connection is None:
                break
            served += 1
            pump.client.transport.loseConnection()
            self.fleet.flush()
        return served

    def test_pendingLoginLoopRefused(self) -> None:
        """A pending key's 100 logins in a row: past the allowance, refused at the door."""
        allowance = PenaltyPolicy().noauthAllowance
        self.assertLessEqual(self.loop(newKey(), "oven2", 100), allowance)

    def test_approvedDeviceNotCounted(self) -> None:
        """An approved device reconnecting is never counted (its key is accountable)."""
        key = self.fleet.enrollDevice("kiln7")
        self.assertEqual(self.loop(key, "kiln7", 40), 40)


class UnknownMessagesTests(SynchronousTestCase):
    """
    Conch logs, at info, every message number its connection service does not know,
    with the payload's repr: a logged-in peer (any key, as a pending device) could write
    without end into groundcontrol's log, four bytes of log for each byte it sent. They
    are answered (UNIMPLEMENTED) as before and logged at debug, as OpenSSH does.
    """

    def test_unknownMessagesNotLoggedAtInfo(self) -> None:
        fleet = InMemoryFleet()
        agent, pump = fleet.agent("oven2", newKey())
        fleet.flush()
        events = captureLog(self)
        written = MinimumLevel()
        for _ in range(50):
            pump.client.sendPacket(200, b"\x1b]52;c;x\x07" * 100)
        fleet.flush()
        fromServer = [e for e in events if e.get("log_source") is pump.server.service]
        self.assertEqual(len(fromServer), 50)  # still logged, at debug
        self.assertEqual([e for e in fromServer if written(e) != PredicateResult.no], [])
        self.assertFalse(agent.lost)


class PeerNotReadingTests(SynchronousTestCase):
    """
    A peer that sends requests and never reads the answers had groundcontrol keep every
    answer in memory, without end: a pending device (any key) sending channel opens
    (each refused with a sentence) and global requests, its socket never read, grew
    groundcontrol by about 4 MB a second from one slow Python client. With more than
    MAX_UNSENT_FOR_PEER waiting for it, a request that wants an answer drops the peer.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.agent, self.pump = self.fleet.agent("oven2", newKey())
        self.fleet.flush()
        assert self.agent.connection is not None
        self.link = self.agent.connection
        self.service = self.pump.server.service

    def backlog(self, size: int) -> None:
        self.service._unsentToPeer = lambda: size

    def test_requestsAnsweredWhileTheBacklogIsSmall(self) -> None:
        self.backlog(MAX_UNSENT_FOR_PEER)
        asked = self.link.sendGlobalRequest(b"keepalive@openssh.com", b"", 1)
        self.fleet.flush()
        self.failureResultOf(asked)  # refused, as ever: but answered
        self.assertFalse(self.agent.lost)

    def test_peerDroppedPastTheBacklog(self) -> None:
        for send in (
            lambda: self.link.sendGlobalRequest(b"keepalive@openssh.com", b"", 1).addErrback(
                lambda f: None
            ),
            lambda: self.pump.client.sendPacket(
                connection.MSG_CHANNEL_OPEN,
                common.NS(b"session") + struct.pack(">3L", 7, 1 << 20, 32768),
            ),
            lambda: self.pump.client.sendPacket(200, b"x"),
        ):
            self.setUp()
            self.backlog(MAX_UNSENT_FOR_PEER + 1)
            send()
            self.fleet.flush()
            self.assertTrue(self.agent.lost)


class PendingCapPerIPv6HostTests(SynchronousTestCase):
    """
    New devices are capped per source host (10 an hour) so that no one address fills the
    approval queue (100 at once; past it no new device can log in, so no token or claim
    enrolls one either, until an admin removes pending ones). An IPv6 host was counted by
    its whole address, but one host holds a whole /64 (the penalties count it so,
    groundcontrol.preauth.sourceKey): rotating addresses in its /64, anyone filled the
    queue in seconds. The cap counts an IPv6 source by its /64 (store.sourceHost, by
    accesstunnel.addresses.sourceNetwork, the rule of the penalties and the limiter).
    """

    def test_oneIPv6HostCappedByItsSlash64(self) -> None:
        store = openMemoryStore()
        limits = PendingLimits(total=100, perHost=10, window=3600)
        admitted = 0
        for i in range(1, 31):
            key = newKey()
            line = publicLine(key)
            try:
                resultNow(
                    store.recordContact(
                        f"dev{i}",
                        line,
                        fingerprint(line),
                        None,
                        f"[2001:db8::{i:x}]:4000",
                        1_700_000_000.0,
                        limits=limits,
                    )
                )
            except PendingLimitReached:
                continue
            admitted += 1
        self.assertLessEqual(admitted, limits.perHost)


class ClaimRenewRevealsDevicesTests(SynchronousTestCase):
    """
    ``ctl show NAME`` tells an operator without a grant on NAME nothing (``no device
    named``), but ``ctl claim renew|release NAME`` said whether NAME exists, whether it is
    claimed, and by whom ("is claimed by carol, not by you"). To an operator who may not
    reach the device (nor holds its claim) it now reads as for a device that does not
    exist (groundcontrol/control/commands.py, _leaseVisible).
    """

    def test_claimRenewSaysNothingOfOthersDevices(self) -> None:
        world = AccessFleet()
        for line in ("claim renew {}", "claim release {}"):
            _, _, missing = world.ctl(world.bob, line.format("no-such-device"))
            _, _, existing = world.ctl(world.bob, line.format("lab2"))
            self.assertEqual(
                existing.replace("lab2", "NAME"), missing.replace("no-such-device", "NAME")
            )


class TinyMaxPacketTests(SynchronousTestCase):
    """
    A channel's peer says how large a packet it takes, and groundcontrol relays in
    packets no larger: an operator opening a session with a maximum packet of 1 byte had
    each byte of the device's output cost groundcontrol a packet of its own (64 KiB of
    output: 65,540 packets instead of 6), so one operator with any grant could keep its
    one process busy; a device confirming groundcontrol's channels so could do the same
    with what operators send it. A peer offering less than MIN_PEER_MAX_PACKET is
    refused: its channel open, or, a device confirming ours so, its link.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.deviceKey = self.fleet.enrollDevice("kiln7")
        self.alice = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")

    def openSession(self, maxPacket: int) -> OperatorSession:
        operator = self.fleet.operator("dev_kiln7", self.alice)
        self.fleet.flush()
        assert operator.connection is not None
        session = OperatorSession(localMaxPacket=maxPacket, conn=operator.connection)
        session.name = b"session"
        operator.connection.openChannel(session)
        self.fleet.flush()
        return session

    def test_operatorsTinyMaxPacketRefused(self) -> None:
        self.fleet.agent("kiln7", self.deviceKey)
        self.assertFalse(self.openSession(1).isOpen)
        self.assertIn("packet", self.openSession(MIN_PEER_MAX_PACKET - 1).openFailureText)
        self.assertTrue(self.openSession(MIN_PEER_MAX_PACKET).isOpen)

    def test_deviceConfirmingWithTinyMaxPacketDropped(self) -> None:
        def tiny(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
            return ScriptedSession(
                echoScript,
                conn.factory.clock,
                localMaxPacket=1,
                remoteWindow=windowSize,
                remoteMaxPacket=maxPacket,
                conn=conn,
            )

        agent, _ = self.fleet.agent("kiln7", self.deviceKey, tiny)
        self.fleet.flush()
        session = self.openSession(32768)
        self.assertFalse(session.isOpen)
        self.assertTrue(agent.lost)


class ExitSignalTextTests(SynchronousTestCase):
    """
    The name in a device's exit-signal went as it came into the session's end line in
    groundcontrol's log ("status signal NAME"): a hostile device wrote new lines (forged
    log lines) and escape sequences into the log an admin reads in a terminal. It is
    made inert (relay.inertText) and short, as the device's other text is.
    """

    def test_exitSignalNameInert(self) -> None:
        fleet = InMemoryFleet()
        key = fleet.enrollDevice("kiln7")
        alice = fleet.addOperator("alice")
        fleet.grant("alice", "kiln7")
        sessions: list[ScriptedSession] = []
        fleet.agent("kiln7", key, scriptedSessions(lambda c: Script(hold=True), sessions))
        events = captureLog(self)
        session = fleet.session(fleet.operator("dev_kiln7", alice))
        session.exec(b"sleep")
        fleet.flush()
        fleet.clock.advance(0)
        device = sessions[-1]
        evil = b"KILL\n2026-11-27T10:00:00+0000 [groundcontrol] forged\x1b]52;c;eA==\x07" * 20
        device.sendRequestInOrder(
            b"exit-signal", common.NS(evil) + b"\x00" + common.NS(b"") + common.NS(b"")
        )
        device.writeEOF()
        device.loseConnection()
        fleet.flush()
        (ended,) = [formatEvent(e) for e in events if "ended" in (e.get("log_format") or "")]
        self.assertIn("status signal KILL", ended)
        self.assertTrue(ended.isprintable(), ended)
        self.assertLess(len(ended), 400)


class TerminalTypeInAgentLogTests(SynchronousTestCase):
    """
    The terminal type in an operator's pty-req is theirs to spell, and the agent's log
    line for the pty ("pty /dev/pts/3 80x24 TERM") printed it as it came: new lines and
    escape sequences into the device's log. It is printed as a quoted literal.
    """

    def test_termInertInTheLog(self) -> None:
        events = captureLog(self)
        channel = SessionChannel(SessionEnvironment(), Clock())
        term = b"xterm\n2026-11-27T10:00:00+0000 [agent] forged\x1b[2J"
        request = common.NS(term) + struct.pack(">4L", 80, 24, 0, 0) + common.NS(b"\x00")
        self.assertTrue(channel.requestReceivedWithReply(b"pty-req", request, True))
        self.addCleanup(channel.closed)
        (line,) = [formatEvent(e) for e in events if "pty" in (e.get("log_format") or "")]
        self.assertTrue(line.isprintable(), line)


class ForwardTargetInAgentLogTests(SynchronousTestCase):
    """
    The host and originator of an operator's ``direct-tcpip`` (``ssh -L``, ``-D``, ``-W``)
    are the operator's to spell, and the agent's line for the forward printed them as
    they came: new lines and escape sequences into the device's log. They are printed
    as quoted literals.
    """

    def test_forwardTargetInertInTheLog(self) -> None:
        events = captureLog(self)
        evil = b"x\n2026-11-27T10:00:00+0000 [agent] forged\x1b[2J"
        payload = common.NS(evil) + struct.pack(">L", 80) + common.NS(evil) + struct.pack(">L", 1)
        opened = ForwardChannel.open(MemoryReactorClock(), payload)
        opened.addErrback(lambda f: None)
        (line,) = [formatEvent(e) for e in events if "forward from" in (e.get("log_format") or "")]
        self.assertTrue(line.isprintable(), line)


class PeerDisconnectReasonTests(SynchronousTestCase):
    """
    A peer's disconnect says why, in words of its own. Conch logged every one at error
    level over two lines with the words as sent: each operator's ssh leaving (code 11) was
    an error line, and any peer could write new lines and escape sequences into the log.
    """

    def disconnect(self, code: int, reason: bytes) -> list[Any]:
        fleet = InMemoryFleet()
        _, pump = fleet.agent("oven2", newKey())
        fleet.flush()
        events = captureLog(self)
        pump.client.sendDisconnect(code, reason)
        fleet.flush()
        return [
            e
            for e in events
            if e.get("log_source") is pump.server and "disconnected" in e.get("log_format", "")
        ]

    def test_ordinaryLeavingIsDebug(self) -> None:
        """ssh's own 'disconnected by user' (11) is written at debug only."""
        (event,) = self.disconnect(11, b"disconnected by user")
        self.assertEqual(event["log_level"], LogLevel.debug)
        self.assertEqual(event["reason"], "disconnected by user")

    def test_otherReasonsOneInertLine(self) -> None:
        """Another code is one info line; the peer's words are inert and bounded."""
        (event,) = self.disconnect(2, b"x\n2026-11-27T10:00:00+0000 [groundcontrol] forged\x1b[2J")
        self.assertEqual(event["log_level"], LogLevel.info)
        line = formatEvent(event)
        self.assertNotIn("\n", line)
        self.assertNotIn("\x1b", line)
        self.assertIn("disconnected with code 2", line)
