"""
Tests for groundcontrol.preauth: bounded pre-authentication input and per-source
penalties (failures, key exchanges without a login attempt, exempt networks), on the
real front door in memory (StringTransport and iosim, task.Clock).
"""

from __future__ import annotations

import ipaddress
import os
import struct

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.conch.ssh import common, transport
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.preauth import (
    Allowance,
    ConnectionAllowance,
    PenaltyPolicy,
    PreauthGuard,
    PreauthLimits,
    SourcePenalties,
    guardOf,
    parseExemptNetwork,
    sourceKey,
)
from groundcontrol.sshserver import ServerSettings
from groundcontrol.store import PendingLimits
from groundcontrol.testing import FakeAgentFactory, FakeOperator, InMemoryFleet, newKey

ATTACKER = "127.0.0.2"
CLIENT_VERSION = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"


def plainPacket(messageType: int, payload: bytes) -> bytes:
    """An SSH binary packet before key exchange (no cipher, no MAC)."""
    body = bytes((messageType,)) + payload
    padding = 8 - (5 + len(body)) % 8
    if padding < 4:
        padding += 8
    return struct.pack(">LB", 1 + len(body) + padding, padding) + body + b"\0" * padding


def kexInit(lists: list[bytes] | None = None) -> bytes:
    """A KEXINIT payload a modern client could send, or with C{lists} instead."""
    if lists is None:
        lists = [
            b"curve25519-sha256",
            b"ssh-ed25519",
            b"aes128-ctr",
            b"aes128-ctr",
            b"hmac-sha2-256",
            b"hmac-sha2-256",
            b"none",
            b"none",
            b"",
            b"",
        ]
    return os.urandom(16) + b"".join(common.NS(x) for x in lists) + b"\0" + b"\0\0\0\0"


def keyExchange(client: RawClient) -> None:
    """
    Have the server compute a curve25519 key exchange for C{client}, as ssh-keyscan
    does before it closes: version line, KEXINIT, the client's ECDH INIT.
    """
    public = x25519.X25519PrivateKey.generate().public_key()
    client.send(CLIENT_VERSION + plainPacket(transport.MSG_KEXINIT, kexInit()))
    written = len(client.io.value())
    client.send(
        plainPacket(
            transport.MSG_KEXDH_INIT, common.NS(public.public_bytes(Encoding.Raw, PublicFormat.Raw))
        )
    )
    assert len(client.io.value()) > written, "no key exchange reply"
    assert not client.dropped


class RawClient:
    """A server transport of the real front door fed bytes by hand."""

    def __init__(self, fleet: InMemoryFleet, host: str = ATTACKER) -> None:
        factory = fleet.factory
        if not factory.numPorts:
            factory.doStart()
        peer = IPv4Address("TCP", host, 50000)
        self.proto = factory.buildProtocol(peer)
        self.io = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", host, 22))
        self.proto.makeConnection(self.io)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    @property
    def dropped(self) -> bool:
        return bool(self.io.disconnecting)

    def lose(self) -> None:
        """The peer (or the server) closed: deliver connectionLost like a reactor."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.proto.connectionLost(Failure(ConnectionDone()))

    def disconnectReason(self) -> bytes:
        """The description of the DISCONNECT the server sent (unencrypted only)."""
        written = self.io.value()
        marker = bytes((transport.MSG_DISCONNECT,))
        i = written.rfind(marker + b"\0\0\0")
        assert i != -1, written
        return common.getNS(written[i + 5 :])[0]


class BoundedInputTests(SynchronousTestCase):
    """Every pre-auth buffer is bounded; breaking a bound drops the client, no exception."""

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()

    def test_longVersionLineDropped(self) -> None:
        """A version line longer than 255 bytes is refused before Conch's 4 KiB bound."""
        client = RawClient(self.fleet)
        client.send(b"SSH-2.0-" + b"x" * 300)
        self.assertTrue(client.dropped)
        self.assertIn(b"version line too long", client.disconnectReason())

    def test_otherFirstLineDropped(self) -> None:
        """Anything but an SSH version line first (an HTTP request, a banner) is refused."""
        client = RawClient(self.fleet)
        client.send(b"GET / HTTP/1.1\r\n")
        self.assertTrue(client.dropped)
        self.assertIn(b"not an SSH version line", client.disconnectReason())

    def test_partialVersionLineWaits(self) -> None:
        """A short, unfinished version line is not an error: the client may be slow."""
        client = RawClient(self.fleet)
        client.send(b"SSH-2.0-Open")
        self.assertFalse(client.dropped)

    def test_versionAndKexInitInOneRead(self) -> None:
        """
        The version line and the first packet arriving together are parsed apart: a
        packet that happens to contain a line starting with SSH- is not a version line.
        """
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION + plainPacket(transport.MSG_IGNORE, b"\nSSH-1.0-evil\n"))
        self.assertFalse(client.dropped)
        self.assertEqual(client.proto.otherVersionString, CLIENT_VERSION.rstrip(b"\r\n"))

    def test_oversizedPacketLengthDropped(self) -> None:
        """A packet announcing more than 35000 bytes is refused as soon as its length is read."""
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION + struct.pack(">LB", 1_000_000, 4) + b"\x14" * 3)
        self.assertTrue(client.dropped)
        self.assertIn(b"packet of 1000000 bytes", client.disconnectReason())
        self.assertEqual(client.proto.buf, b"")

    def test_hugeNameListDropped(self) -> None:
        """A KEXINIT name-list of more than 4096 bytes is refused."""
        client = RawClient(self.fleet)
        lists = [b"curve25519-sha256," + b"a" * 5000] + [b"none"] * 9
        client.send(CLIENT_VERSION + plainPacket(transport.MSG_KEXINIT, kexInit(lists)))
        self.assertTrue(client.dropped)
        self.assertIn(b"name-list of", client.disconnectReason())

    def test_badAlgorithmNameDropped(self) -> None:
        """Algorithm names longer than 64 bytes or holding control bytes are refused."""
        for bad in (b"x" * 65, b"curve25519-sha256\x1b[2J", b"a,,b"):
            client = RawClient(self.fleet)
            lists = [bad] + [b"none"] * 9
            client.send(CLIENT_VERSION + plainPacket(transport.MSG_KEXINIT, kexInit(lists)))
            self.assertTrue(client.dropped, bad)
            self.assertIn(b"malformed KEXINIT", client.disconnectReason())

    def test_truncatedKexInitDropped(self) -> None:
        """A truncated KEXINIT is a protocol error, not an exception out of dataReceived."""
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION + plainPacket(transport.MSG_KEXINIT, b"\0" * 20))
        self.assertTrue(client.dropped)
        self.assertIn(b"truncated KEXINIT", client.disconnectReason())

    def test_unparsableMessageDropped(self) -> None:
        """A message Conch cannot parse (a truncated DISCONNECT) drops the client cleanly."""
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION + plainPacket(transport.MSG_DEBUG, b"\x01\xff\xff"))
        self.assertTrue(client.dropped)
        self.assertIn(b"malformed message", client.disconnectReason())

    def test_tooManyPacketsDropped(self) -> None:
        """A client that sends packet after packet without logging in is dropped."""
        limits = guardOf(self.fleet.factory).limits
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION)
        ignore = plainPacket(transport.MSG_IGNORE, common.NS(b"x"))
        client.send(ignore * limits.maxPackets)
        self.assertFalse(client.dropped)
        client.send(ignore)
        self.assertTrue(client.dropped)
        self.assertIn(b"packets before logging in", client.disconnectReason())

    def test_tooManyBytesDropped(self) -> None:
        """Bytes before logging in are bounded in total, whatever the packets."""
        limits = guardOf(self.fleet.factory).limits
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION)
        big = plainPacket(transport.MSG_IGNORE, common.NS(b"x" * 30000))
        for _ in range(limits.maxBytes // len(big) + 1):
            client.send(big)
        self.assertTrue(client.dropped)
        self.assertIn(b"bytes before logging in", client.disconnectReason())

    def test_secondKexInitAllowedThirdNot(self) -> None:
        """At most two key exchanges may start before authentication."""
        limits = PreauthLimits()
        self.assertEqual(limits.maxKexInits, 2)
        client = RawClient(self.fleet)
        client.send(CLIENT_VERSION + plainPacket(transport.MSG_KEXINIT, kexInit()))
        self.assertFalse(client.dropped)
        client.proto._preauthKexInits = limits.maxKexInits  # as if a re-exchange happened
        client.send(plainPacket(transport.MSG_KEXINIT, kexInit()))
        self.assertTrue(client.dropped)

    def test_droppedClientIgnoresMore(self) -> None:
        """After a drop, further bytes are ignored (nothing parsed, nothing buffered)."""
        client = RawClient(self.fleet)
        client.send(b"HELLO\n")
        client.send(b"x" * 100_000)
        self.assertEqual(client.proto.buf, b"")

    def test_loginStillWorks(self) -> None:
        """A real client logs in through the guard and its limits."""
        key = self.fleet.addOperator("alice")
        operator = self.fleet.operator("ctl", key)
        self.assertIsNotNone(operator.connection)


class PenaltyTests(SynchronousTestCase):
    """A source that keeps failing is refused for a while, exponentially, and forgotten."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.policy = PenaltyPolicy(
            freeFailures=3, firstPenalty=2, maxPenalty=60, forgetAfter=600, maxSources=4
        )
        self.penalties = SourcePenalties(self.clock, self.policy)

    def test_freeFailuresThenDoubling(self) -> None:
        """Three failures are free; then 2, 4, 8, ... seconds, capped at the maximum."""
        seen = [self.penalties.failed("10.0.0.1", "test") for _ in range(10)]
        self.assertEqual(seen, [0, 0, 0, 2, 4, 8, 16, 32, 60, 60])

    def test_refusedUntilPenaltyEnds(self) -> None:
        """A penalised source is refused until its penalty has run out, others are not."""
        for _ in range(4):
            self.penalties.failed("10.0.0.1", "test")
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 2)
        self.assertEqual(self.penalties.refusedFor("10.0.0.2"), 0)
        self.clock.advance(1.9)
        self.assertGreater(self.penalties.refusedFor("10.0.0.1"), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)

    def test_forgottenAfterQuietTime(self) -> None:
        """A source with no failure for forgetAfter seconds starts afresh."""
        for _ in range(5):
            self.penalties.failed("10.0.0.1", "test")
        self.clock.advance(600)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)
        self.assertEqual(self.penalties.failed("10.0.0.1", "test"), 0)

    def test_boundedMemory(self) -> None:
        """At most maxSources are remembered; the least recently failing go first."""
        for n in range(100):
            self.penalties.failed(f"10.0.0.{n}", "test")
        self.assertEqual(len(self.penalties), 4)

    def test_clockJumpsBack(self) -> None:
        """After the clock jumps back a day, a penalty still ends within maxPenalty."""
        for _ in range(20):
            self.penalties.failed("10.0.0.1", "test")
        self.clock.rightNow -= 86400
        self.assertLessEqual(self.penalties.refusedFor("10.0.0.1"), 60)
        self.clock.advance(60)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)

    def test_clockJumpsForward(self) -> None:
        """After the clock jumps forward past forgetAfter, the source is forgotten."""
        for _ in range(20):
            self.penalties.failed("10.0.0.1", "test")
        self.clock.advance(7 * 86400)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)
        self.assertEqual(len(self.penalties), 0)

    def test_sourceKeys(self) -> None:
        """IPv4 addresses count alone; IPv6 by /64; v4-mapped IPv6 as the IPv4 address."""
        self.assertEqual(sourceKey(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")
        self.assertEqual(
            sourceKey(IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1)), "2001:db8:1:2::/64"
        )
        self.assertEqual(sourceKey(IPv6Address("TCP", "::ffff:192.0.2.7", 1)), "192.0.2.7")


class PenaltyWiringTests(SynchronousTestCase):
    """The front door records failures per source and refuses penalised sources at once."""

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.guard = guardOf(self.fleet.factory)
        self.key = self.fleet.addOperator("alice")

    def failLogin(self, host: str) -> FakeOperator:
        operator = FakeOperator("ctl", newKey(), hostKey=self.fleet.hostKey)
        self.fleet.network.connect(self.fleet.factory, operator, clientHost=host)
        self.fleet.flush()
        return operator

    def test_failedLoginsPenaliseTheSource(self) -> None:
        """
        After the free failed logins, the next connection from that source is closed
        before the server says anything; another source still logs in.
        """
        free = self.guard.penalties.policy.freeFailures
        for _ in range(free + 1):
            operator = self.failLogin(ATTACKER)
            self.assertIsNone(operator.connection)
        self.assertGreater(self.guard.penalties.refusedFor(ATTACKER), 0)
        refused = RawClient(self.fleet, ATTACKER)
        self.assertTrue(refused.dropped)
        self.assertEqual(refused.io.value(), b"")  # not even a version line
        refused.lose()
        self.assertEqual(self.guard.penalties.refusedConnections, 1)
        good = FakeOperator("ctl", self.key, hostKey=self.fleet.hostKey)
        self.fleet.network.connect(self.fleet.factory, good, clientHost="127.0.0.1")
        self.assertIsNotNone(good.connection)

    def test_successIsNoFailure(self) -> None:
        """Logging in (after a failed attempt or not) never counts against the source."""
        for _ in range(10):
            self.fleet.operator("ctl", self.key)
        self.assertEqual(len(self.guard.penalties), 0)

    def test_violationAndGraceCount(self) -> None:
        """A dropped rule-breaker and a client that ran out the grace time both count."""
        client = RawClient(self.fleet, "127.0.0.9")
        client.send(b"nonsense\n")
        client.lose()
        self.assertEqual(self.guard.penalties._sources["127.0.0.9"].failures, 1)
        slow = RawClient(self.fleet, "127.0.0.9")
        slow.send(CLIENT_VERSION)
        self.fleet.clock.advance(self.fleet.factory.settings.loginGraceTime)
        self.assertTrue(slow.dropped)
        slow.lose()
        self.assertEqual(self.guard.penalties._sources["127.0.0.9"].failures, 2)

    def test_quietCloseIsNoFailure(self) -> None:
        """
        A client that closes without trying to log in is no failure (it only draws on
        its source's early-close allowance, EarlyCloseWiringTests).
        """
        client = RawClient(self.fleet, "127.0.0.9")
        client.send(CLIENT_VERSION)
        client.lose()
        self.assertEqual(self.guard.penalties._sources["127.0.0.9"].failures, 0)
        self.assertEqual(self.guard.penalties.refusedFor("127.0.0.9"), 0)


class NoauthTests(SynchronousTestCase):
    """
    Key exchanges that end without a login attempt (OpenSSH's noauth): a token bucket per
    source, refused when empty until one has refilled; bounded in time and memory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.policy = PenaltyPolicy(noauthAllowance=3, noauthRate=0.5, maxPenalty=60)
        self.penalties = SourcePenalties(self.clock, self.policy)

    def test_allowanceThenRate(self) -> None:
        """
        Three at once are free; the third empties the bucket, so the source is refused
        for one refill (2 s at 0.5/s), then has one again; another source is untouched.
        """
        self.assertEqual([self.penalties.noauth("10.0.0.1") for _ in range(2)], [0, 0])
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)
        self.assertEqual(self.penalties.noauth("10.0.0.1"), 2)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 2)
        self.assertEqual(self.penalties.refusedFor("10.0.0.2"), 0)
        self.clock.advance(2)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)
        self.assertEqual(self.penalties.noauth("10.0.0.1"), 2)

    def test_exchangesEachCount(self) -> None:
        """A connection that had two key exchanges computed costs two of the allowance."""
        self.penalties.noauth("10.0.0.1", 2)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)
        self.penalties.noauth("10.0.0.1")
        self.assertGreater(self.penalties.refusedFor("10.0.0.1"), 0)

    def test_noFailureAndForgotten(self) -> None:
        """
        Noauth connections are not failures (no exponential penalty follows); a source
        whose bucket has refilled is forgotten.
        """
        for _ in range(3):
            self.penalties.noauth("10.0.0.1")
        self.assertEqual(self.penalties._sources["10.0.0.1"].failures, 0)
        self.clock.advance(6)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)
        self.assertEqual(len(self.penalties), 0)

    def test_refusalBounded(self) -> None:
        """
        Connections already in their handshake when the bucket ran dry still count, but
        the refusal never exceeds maxPenalty, even after the clock jumps back a day.
        """
        for _ in range(1000):
            self.penalties.noauth("10.0.0.1")
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 60)
        self.clock.rightNow -= 86400
        self.assertLessEqual(self.penalties.refusedFor("10.0.0.1"), 60)
        self.clock.advance(60)
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0)

    def test_rateZeroTurnsItOff(self) -> None:
        """With a rate of 0 nothing is counted and nothing refused."""
        penalties = SourcePenalties(self.clock, PenaltyPolicy(noauthAllowance=1, noauthRate=0))
        for _ in range(100):
            self.assertEqual(penalties.noauth("10.0.0.1"), 0)
        self.assertEqual((penalties.refusedFor("10.0.0.1"), len(penalties)), (0, 0))

    def test_loggedOncePerRefusal(self) -> None:
        """One log line when a refusal starts, not one per connection still finishing."""
        with capturedLogs() as events:
            for _ in range(10):
                self.penalties.noauth("10.0.0.1")
        lines = [e for e in events if e.get("reason") == "noauth"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["refusing"], "refusing")
        self.assertIn("key exchanges without a login attempt", lines[0]["what"])


class ConnectionAllowanceTests(SynchronousTestCase):
    """
    One connection's own allowance (a link's enrollment requests, its peer's key
    re-exchanges): a burst, then one per refill; refusals logged once per interval.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.own = ConnectionAllowance(Allowance(3, 0.5, "requests", "requests"))

    def spend(self, times: int) -> list[bool]:
        return [self.own.spend(self.clock.seconds()) for _ in range(times)]

    def test_burstThenRefill(self) -> None:
        """Three at once, then one per 2 s, counted from the first spend."""
        self.assertEqual(self.spend(4), [True, True, True, False])
        self.clock.advance(2)
        self.assertEqual(self.spend(2), [True, False])

    def test_eachConnectionItsOwn(self) -> None:
        """Another connection with the same allowance has all of it."""
        self.spend(4)
        other = ConnectionAllowance(self.own.allowance)
        self.assertTrue(other.spend(self.clock.seconds()))

    def test_refusalLoggedOncePerInterval(self) -> None:
        """The first refusal is logged, the next only after the interval."""
        now = self.clock.seconds()
        self.assertFalse(self.own.logRefusal(now, 30))  # nothing spent: nothing refused
        self.spend(4)
        self.assertEqual([self.own.logRefusal(now, 30) for _ in range(3)], [True, False, False])
        self.assertFalse(self.own.logRefusal(now + 29, 30))
        self.assertTrue(self.own.logRefusal(now + 30, 30))

    def test_peerRekeySettings(self) -> None:
        """The server's settings make one re-key allowance for all connections; 0 is none."""
        settings = ServerSettings(peerRekeyBurst=4, peerRekeyInterval=0.5)
        allowance = settings.peerRekeyAllowance
        assert allowance is not None
        self.assertEqual((allowance.size, allowance.rate), (4, 2.0))
        self.assertIs(settings.peerRekeyAllowance, allowance)
        self.assertIsNone(ServerSettings(peerRekeyBurst=0).peerRekeyAllowance)


class ExemptTests(SynchronousTestCase):
    """Sources in exempt networks (a NAT in front of many devices) are never refused."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.policy = PenaltyPolicy(
            freeFailures=2,
            noauthAllowance=2,
            exempt=(parseExemptNetwork("198.51.100.0/24"), parseExemptNetwork("2001:db8:5::/48")),
        )
        self.penalties = SourcePenalties(self.clock, self.policy)

    def test_failuresCountedNeverRefused(self) -> None:
        """
        An exempt source's failures are counted as anyone's, but it is never refused, by
        failures or by key exchanges without a login; a source outside the networks is.
        """
        for source in ("198.51.100.7", "192.0.2.7"):
            for _ in range(5):
                self.penalties.failed(source, "test")
        self.assertEqual(self.penalties._sources["198.51.100.7"].failures, 5)
        self.assertEqual(self.penalties.refusedFor("198.51.100.7"), 0)
        self.assertGreater(self.penalties.refusedFor("192.0.2.7"), 0)
        for _ in range(5):
            self.assertEqual(self.penalties.noauth("198.51.100.8"), 0)
        self.assertEqual(self.penalties.refusedFor("198.51.100.8"), 0)

    def test_loggedOncePerWouldBePenalty(self) -> None:
        """
        An exempt source's penalties are logged where another source would have been
        refused (saying it is exempt), once per would-be penalty, not once per failure.
        """
        with capturedLogs() as events:
            for _ in range(6):
                self.penalties.failed("198.51.100.7", "bad key")
            self.clock.advance(3)  # the first would-be penalties (2 s, 4 s) overlap
            self.penalties.failed("198.51.100.7", "bad key")
        exempt = [e for e in events if e["log_format"].startswith("not refusing")]
        self.assertEqual(len(exempt), 1)
        self.assertEqual(exempt[0]["source"], "198.51.100.7")
        self.clock.advance(600)
        with capturedLogs() as events:
            self.penalties.failed("198.51.100.7", "bad key")
        self.assertEqual(len(events), 1)

    def test_networksOfBothFamilies(self) -> None:
        """
        IPv6 sources (counted per /64) inside an exempt IPv6 network are exempt, others
        not; an IPv4-mapped network is taken as IPv4.
        """
        source = sourceKey(IPv6Address("TCP", "2001:db8:5:1::7", 1))
        outside = sourceKey(IPv6Address("TCP", "2001:db8:6:1::7", 1))
        self.assertTrue(self.penalties.exempt(source))
        self.assertFalse(self.penalties.exempt(outside))
        self.assertFalse(self.penalties.exempt("198.51.101.1"))
        self.assertEqual(
            parseExemptNetwork("::ffff:198.51.100.0/120"),
            ipaddress.IPv4Network("198.51.100.0/24"),
        )

    def test_parse(self) -> None:
        """
        A bare address is a /32; a network with host bits set, an IPv6 prefix longer
        than the /64 sources are counted by, or not an address at all are refused with
        a message saying which.
        """
        self.assertEqual(parseExemptNetwork("203.0.113.7"), ipaddress.ip_network("203.0.113.7/32"))
        for bad, says in (
            ("10.1.2.3/8", "host bits set (the network is 10.0.0.0/8)"),
            ("2001:db8::/96", "per /64"),
            ("nat.example", "not an IPv4 or IPv6 address or network"),
            ("10.0.0.0/33", "not an IPv4 or IPv6 address or network"),
        ):
            with self.assertRaises(ValueError) as caught:
                parseExemptNetwork(bad)
            self.assertIn(says, str(caught.exception))


class NoauthWiringTests(SynchronousTestCase):
    """
    The front door counts a key exchange that ends without a login attempt, and only
    that; exempt sources are never refused at the door.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.policy = PenaltyPolicy(
            freeFailures=1, noauthAllowance=2, exempt=(parseExemptNetwork("127.0.0.64/26"),)
        )
        self.fleet.factory.preauthGuard = PreauthGuard(self.fleet.clock, penalties=self.policy)
        self.penalties = guardOf(self.fleet.factory).penalties

    def test_keyExchangesWithoutLoginRefused(self) -> None:
        """
        Two ssh-keyscan-like connections (a key exchange, then close) use the allowance;
        the third connection from that source is closed before our version line, while
        another source still gets its key exchange.
        """
        for _ in range(2):
            client = RawClient(self.fleet, ATTACKER)
            keyExchange(client)
            client.lose()
        refused = RawClient(self.fleet, ATTACKER)
        self.assertTrue(refused.dropped)
        self.assertEqual(refused.io.value(), b"")
        keyExchange(RawClient(self.fleet, "127.0.0.3"))

    def test_closeBeforeKeyExchangeIsNoNoauth(self) -> None:
        """
        Connections that close after the version line and KEXINIT, before we compute a
        key exchange (ssh-audit's rate probe reads only the banner), do not draw on the
        no-auth allowance (only on the early-close one, 20 by default).
        """
        for _ in range(10):
            client = RawClient(self.fleet, ATTACKER)
            client.send(CLIENT_VERSION + plainPacket(transport.MSG_KEXINIT, kexInit()))
            client.lose()
        record = self.penalties._sources[ATTACKER]
        self.assertEqual((record.noauth.owed, record.earlyClose.owed), (0, 10))
        self.assertEqual(self.penalties.refusedFor(ATTACKER), 0)

    def test_loginIsNoNoauth(self) -> None:
        """Operators who log in (a key exchange each) are never counted."""
        key = self.fleet.addOperator("alice")
        for _ in range(5):
            self.assertIsNotNone(self.fleet.operator("ctl", key).connection)
        self.assertEqual(len(self.penalties), 0)

    def test_pendingRefusedDeviceIsAFailure(self) -> None:
        """
        A new device refused by the pending caps (we disconnect it with
        too-many-connections after its key's signature check) is a failure of its
        source, not a noauth exchange: past the free failures the next new device from
        there is refused at the door, before any key exchange. From an exempt source it
        is not counted at all.
        """
        fleet = InMemoryFleet(
            settings=ServerSettings(pendingLimits=PendingLimits(total=0, perHost=0))
        )
        fleet.factory.preauthGuard = PreauthGuard(fleet.clock, penalties=self.policy)
        penalties = guardOf(fleet.factory).penalties
        for host in (ATTACKER, "127.0.0.65"):
            for _ in range(2):
                agent = FakeAgentFactory(
                    "kiln7", newKey(), hostKey=fleet.hostKey, clock=fleet.clock
                )
                fleet.network.connect(fleet.factory, agent, clientHost=host)
                self.assertIn("waiting for approval", agent.disconnectReason or "")
        record = penalties._sources[ATTACKER]
        self.assertEqual((record.failures, record.noauth.owed), (2, 0))
        self.assertNotIn("127.0.0.65", penalties._sources)
        agent = FakeAgentFactory("kiln7", newKey(), hostKey=fleet.hostKey, clock=fleet.clock)
        fleet.network.connect(fleet.factory, agent, clientHost=ATTACKER)
        self.assertIsNone(agent.disconnectReason)
        self.assertEqual(penalties.refusals["failures"], 1)

    def test_exemptSourceNotRefused(self) -> None:
        """
        From an exempt address, failed logins and key exchanges without a login past
        every allowance are still counted, and the next connection is served; from a
        neighbour outside the network it is refused.
        """
        for host in ("127.0.0.65", "127.0.0.9"):
            for _ in range(3):
                operator = FakeOperator("ctl", newKey(), hostKey=self.fleet.hostKey)
                self.fleet.network.connect(self.fleet.factory, operator, clientHost=host)
                self.fleet.flush()
            for _ in range(3):
                client = RawClient(self.fleet, host)
                if client.dropped:
                    continue
                keyExchange(client)
                client.lose()
        self.assertEqual(self.penalties._sources["127.0.0.65"].failures, 3)
        self.assertFalse(RawClient(self.fleet, "127.0.0.65").dropped)
        self.assertTrue(RawClient(self.fleet, "127.0.0.9").dropped)


class EarlyCloseTests(SynchronousTestCase):
    """
    Connections that close before any key exchange: a second allowance of the no-auth
    kind (a token bucket per source), refused when empty until one has refilled; exempt
    sources never; each refusal has its reason, and the refused sources can be counted.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.policy = PenaltyPolicy(
            earlyCloseAllowance=4,
            earlyCloseRate=2,
            maxPenalty=60,
            exempt=(parseExemptNetwork("198.51.100.0/24"),),
        )
        self.penalties = SourcePenalties(self.clock, self.policy)

    def test_allowanceThenRate(self) -> None:
        """
        Four at once are free; the fourth empties the bucket, so the source is refused
        for one refill (0.5 s at 2/s), with early_close as the reason; then it has one
        again. Another source, and the no-auth allowance, are untouched.
        """
        self.assertEqual([self.penalties.earlyClose("10.0.0.1") for _ in range(3)], [0, 0, 0])
        self.assertIsNone(self.penalties.refusal("10.0.0.1"))
        self.assertEqual(self.penalties.earlyClose("10.0.0.1"), 0.5)
        self.assertEqual(self.penalties.refusal("10.0.0.1"), "early_close")
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 0.5)
        self.assertIsNone(self.penalties.refusal("10.0.0.2"))
        self.assertEqual(self.penalties._sources["10.0.0.1"].noauth.owed, 0)
        self.clock.advance(0.5)
        self.assertIsNone(self.penalties.refusal("10.0.0.1"))
        self.clock.advance(2)  # all paid back: forgotten when next looked up
        self.assertIsNone(self.penalties.refusal("10.0.0.1"))
        self.assertEqual(len(self.penalties), 0)

    def test_exemptNeverRefused(self) -> None:
        """An exempt source (a load balancer's health checker) is counted, never refused."""
        for _ in range(100):
            self.assertEqual(self.penalties.earlyClose("198.51.100.9"), 0)
        self.assertIsNone(self.penalties.refusal("198.51.100.9"))
        self.assertEqual(self.penalties.refusedSources(), 0)

    def test_refusalBounded(self) -> None:
        """However many closes were still finishing, a refusal lasts at most maxPenalty."""
        for _ in range(10_000):
            self.penalties.earlyClose("10.0.0.1")
        self.assertEqual(self.penalties.refusedFor("10.0.0.1"), 60)

    def test_rateZeroTurnsItOff(self) -> None:
        """With a rate of 0 nothing is counted and nothing refused."""
        penalties = SourcePenalties(self.clock, PenaltyPolicy(earlyCloseRate=0))
        for _ in range(100):
            self.assertEqual(penalties.earlyClose("10.0.0.1"), 0)
        self.assertEqual((penalties.refusedFor("10.0.0.1"), len(penalties)), (0, 0))

    def test_loggedOncePerRefusal(self) -> None:
        """
        One log line when a refusal starts, naming what was used up; a source that
        spends each refill as it comes gets no line per refill (at most one a minute).
        """
        with capturedLogs() as events:
            for _ in range(10):
                self.penalties.earlyClose("10.0.0.1")
            self.clock.advance(0.5)  # one refill, spent at once: no second line
            self.penalties.earlyClose("10.0.0.1")
            self.clock.advance(60)
            for _ in range(10):
                self.penalties.earlyClose("10.0.0.1")
        lines = [e for e in events if e.get("reason") == "early_close"]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0]["what"], "connections closed (or silent) before a key exchange")

    def test_reasonThatLastsLongest(self) -> None:
        """A source refused for several reasons gives the one that lasts longest."""
        for _ in range(5):
            self.penalties.earlyClose("10.0.0.1")
        self.assertEqual(self.penalties.refusal("10.0.0.1"), "early_close")
        for _ in range(self.policy.freeFailures + 2):
            self.penalties.failed("10.0.0.1", "test")
        self.assertEqual(self.penalties.refusal("10.0.0.1"), "failures")
        for _ in range(self.policy.noauthAllowance + 200):
            self.penalties.noauth("10.0.0.1")
        self.assertEqual(self.penalties.refusal("10.0.0.1"), "noauth")

    def test_refusedSources(self) -> None:
        """
        refusedSources() counts the sources refused now, whatever the reason, never an
        exempt one nor one merely remembered; it forgets nobody (a scrape changes nothing).
        """
        for _ in range(5):
            self.penalties.earlyClose("10.0.0.1")
            self.penalties.earlyClose("198.51.100.1")
        for _ in range(self.policy.freeFailures + 1):
            self.penalties.failed("10.0.0.2", "test")
        self.penalties.failed("10.0.0.3", "test")
        self.assertEqual((self.penalties.refusedSources(), len(self.penalties)), (2, 4))
        self.clock.advance(1)
        self.assertEqual((self.penalties.refusedSources(), len(self.penalties)), (1, 4))
        self.clock.advance(self.policy.maxPenalty)
        self.assertEqual(self.penalties.refusedSources(), 0)

    def test_silentConnectionsCount(self) -> None:
        """
        Connections accepted and not yet heard from count as early closes until they
        speak: four open and silent refuse the source (and it is among the refused
        sources) with nothing remembered for it; when one speaks it may connect again.
        Silent connections from an exempt source never refuse it.
        """
        for _ in range(4):
            self.penalties.accepted("10.0.0.1")
            self.penalties.accepted("198.51.100.1")
        self.assertEqual(self.penalties.refusal("10.0.0.1"), "early_close")
        self.assertEqual((self.penalties.refusedSources(), len(self.penalties)), (1, 0))
        self.assertIsNone(self.penalties.refusal("198.51.100.1"))
        self.penalties.spoke("10.0.0.1")
        self.assertIsNone(self.penalties.refusal("10.0.0.1"))
        self.assertEqual(self.penalties.refusedSources(), 0)


class EarlyCloseWiringTests(SynchronousTestCase):
    """
    The front door counts a connection that closes before any key exchange (and is no
    failure) against its source's early-close allowance, refuses the source at the door
    when it is used up, and counts each refusal by its reason.
    """

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.policy = PenaltyPolicy(
            earlyCloseAllowance=3, exempt=(parseExemptNetwork("127.0.0.64/26"),)
        )
        self.fleet.factory.preauthGuard = PreauthGuard(self.fleet.clock, penalties=self.policy)
        self.penalties = guardOf(self.fleet.factory).penalties

    def bannerGrab(self, host: str) -> RawClient:
        """What ssh-audit's rate probe does: read our version line, close."""
        client = RawClient(self.fleet, host)
        if not client.dropped:
            self.assertTrue(client.io.value().startswith(b"SSH-2.0-"))
        client.lose()
        return client

    def test_bannerGrabsRefused(self) -> None:
        """
        Three banner grabs use the allowance; the fourth connection from that source is
        closed before our version line (counted as an early_close refusal); a source
        inside an exempt network is served whatever it does.
        """
        for _ in range(3):
            self.assertFalse(self.bannerGrab(ATTACKER).dropped)
        refused = self.bannerGrab(ATTACKER)
        self.assertTrue(refused.dropped)
        self.assertEqual(refused.io.value(), b"")
        self.assertEqual(
            dict(self.penalties.refusals), {"failures": 0, "noauth": 0, "early_close": 1}
        )
        for _ in range(10):
            self.assertFalse(self.bannerGrab("127.0.0.65").dropped)
        self.fleet.clock.advance(1 / self.policy.earlyCloseRate)
        self.assertFalse(self.bannerGrab(ATTACKER).dropped)

    def test_onlyCloseBeforeKeyExchange(self) -> None:
        """
        A stalled client is a failure (grace time), a key exchange without a login
        noauth, a login nothing: none of them draws on the early-close allowance.
        """
        key = self.fleet.addOperator("alice")
        slow = RawClient(self.fleet, ATTACKER)
        slow.send(CLIENT_VERSION)
        self.fleet.clock.advance(self.fleet.factory.settings.loginGraceTime)
        slow.lose()
        client = RawClient(self.fleet, ATTACKER)
        keyExchange(client)
        client.lose()
        operator = FakeOperator("ctl", key, hostKey=self.fleet.hostKey)
        self.fleet.network.connect(self.fleet.factory, operator, clientHost=ATTACKER)
        self.assertIsNotNone(operator.connection)
        record = self.penalties._sources[ATTACKER]
        self.assertEqual((record.earlyClose.owed, record.noauth.owed, record.failures), (0, 1, 1))

    def test_countedFromAccept(self) -> None:
        """
        A silent connection counts from its accept, not from its close: with three open
        and silent (ssh-audit's probe keeps 3 open) the fourth is refused at once, so a
        client with many connections open is served no more than the allowance between
        refills. Clients that send their version line (every SSH client, at once) are
        taken off the count: ten open at once from one source are all served.
        """
        silent = [RawClient(self.fleet, ATTACKER) for _ in range(3)]
        self.assertFalse(any(c.dropped for c in silent))
        self.assertTrue(RawClient(self.fleet, ATTACKER).dropped)
        speaking = []
        for _ in range(10):
            client = RawClient(self.fleet, "127.0.0.4")
            self.assertFalse(client.dropped)
            client.send(CLIENT_VERSION)
            speaking.append(client)
        self.assertNotIn("127.0.0.4", self.penalties._sources)
