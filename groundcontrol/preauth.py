"""
What a connection may cost groundcontrol before it has authenticated.

groundcontrol faces the internet: anyone may connect and start a handshake. Until a
connection has logged in, L{PreauthMixin} (mixed into the server transport, with the
limits of the factory's L{PreauthGuard}) holds it to:

  - a version line of at most 255 bytes that is the first thing the client sends
    (RFC 4253 section 4.2; Conch alone accepts 4 KiB of anything first);
  - packets of at most L{PreauthLimits.maxPacketLength} bytes (RFC 4253's 35000;
    Conch alone buffers up to 1 MiB for a packet that may never complete);
  - at most L{PreauthLimits.maxPackets} packets and L{PreauthLimits.maxBytes} bytes in
    all, so a client that never finishes cannot keep the server busy (or make it queue
    answers it never reads) for the whole grace time;
  - KEXINIT name-lists of bounded size and shape, and at most
    L{PreauthLimits.maxKexInits} key exchanges;
  - well-formed messages: a message Conch cannot parse drops the connection with a
    protocol error and one log line, never an exception.

Each connection that ends without logging in after failing authentication, running out
the login grace time or breaking one of these rules counts against its source address
(IPv4 address, IPv6 /64). Past L{PenaltyPolicy.freeFailures} such connections the source
is refused at once, before any key exchange, for a time that doubles with each further
failure up to L{PenaltyPolicy.maxPenalty} (OpenSSH's C{PerSourcePenalties}, exponential).

A connection that made groundcontrol compute a key exchange and then closed without
trying to log in (OpenSSH's C{noauth}: ssh-keyscan, ssh-audit, a DHEat-style CPU
attack) costs its source one unit of a token bucket: L{PenaltyPolicy.noauthAllowance}
of them at once, refilled at L{PenaltyPolicy.noauthRate} per second; a source with none
left is refused until one has refilled. So one source makes groundcontrol compute that
many key exchanges nobody logs in with, whatever its concurrency (plus those of its
connections already in their handshake when it ran out).

A connection that closed before groundcontrol computed any key exchange, without a
failure (a banner grab, a TCP health check, ssh-audit's DHEat rate probe), draws on a
second allowance of the same kind: L{PenaltyPolicy.earlyCloseAllowance} at once, then
L{PenaltyPolicy.earlyCloseRate} per second. A connection counts against it from its
accept until it sends its version line (L{SourcePenalties.accepted}), so a source cannot
be served more than the allowance by holding connections open.

A new device refused by the pending caps (a fresh key per connection is free to make,
its signature check is not) counts as a failed connection of its source.

Sources inside L{PenaltyPolicy.exempt} networks (known NATs in front of many devices,
a load balancer's health checkers) are counted and logged as any other, but never
refused (and a new device the pending caps refuse is not counted against them).

Sources are remembered in a bounded LRU, so the memory spent is bounded whatever the
number of attackers.

The caps on concurrent handshakes, in total and per source, are
L{accesstunnel.transports.limiter.HandshakeLimiter}'s; the grace time is the transport's.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.conch.ssh import transport
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from accesstunnel.addresses import sourceNetwork
from accesstunnel.clocks import elapsedClock

__all__ = [
    "DEFAULT_EARLY_CLOSE_ALLOWANCE",
    "DEFAULT_EARLY_CLOSE_RATE",
    "DEFAULT_NOAUTH_ALLOWANCE",
    "DEFAULT_NOAUTH_RATE",
    "REFUSAL_REASONS",
    "Allowance",
    "ConnectionAllowance",
    "ExemptNetwork",
    "FailureKind",
    "PenaltyPolicy",
    "PreauthGuard",
    "PreauthLimits",
    "PreauthMixin",
    "SourcePenalties",
    "guardOf",
    "parseExemptNetwork",
    "sourceKey",
]

ExemptNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Key exchanges without a login attempt one source may cost at once, and per second
#: after that (OpenSSH 9.8's noauth:1s is one a second, after 15 s of them).
DEFAULT_NOAUTH_ALLOWANCE = 30
DEFAULT_NOAUTH_RATE = 1.0
#: Connections one source may close before any key exchange (a banner grab, a TCP health
#: check, ssh-audit's DHEat rate probe) at once, and per second after that. ssh-audit
#: wants at most 20 banners a second from one source over its 1.5 s probe: 20 + 2/s
#: serves it 22 or 23, about 15 a second (SECURITY.md).
DEFAULT_EARLY_CLOSE_ALLOWANCE = 20
DEFAULT_EARLY_CLOSE_RATE = 2.0

#: Why a connection is refused at the door: its source's failed connections (the
#: exponential penalty), its key exchanges without a login attempt, its connections
#: closed before a key exchange.
REFUSED_FAILURES = "failures"
REFUSED_NOAUTH = "noauth"
REFUSED_EARLY_CLOSE = "early_close"
REFUSAL_REASONS = (REFUSED_FAILURES, REFUSED_NOAUTH, REFUSED_EARLY_CLOSE)
#: Seconds between two log lines about one source running out of one allowance.
_LOG_INTERVAL = 60.0


@attrs.frozen
class PreauthLimits:
    """Bounds on everything a client may send before it has logged in."""

    #: RFC 4253 4.2: the version line is at most 255 characters including CR LF.
    maxVersionLine: int = 255
    #: RFC 4253 6.1: every implementation handles packets of 35000 bytes; a handshake
    #: needs far less (the largest, an RSA-8192 user-auth request, is about 2.5 KB).
    maxPacketLength: int = 35000
    #: Packets before authentication: a login takes about 15 even with six keys tried.
    maxPackets: int = 200
    #: Bytes before authentication, all packets together.
    maxBytes: int = 256 * 1024
    #: Key exchanges (KEXINITs received) before authentication.
    maxKexInits: int = 2
    #: One KEXINIT name-list, in bytes, and one algorithm name in it (RFC 4251 6: 64).
    maxNameList: int = 4096
    maxName: int = 64


@attrs.frozen
class PenaltyPolicy:
    """When a source that keeps failing to log in is refused, and for how long."""

    #: Failed connections a source may have before it is refused at all.
    freeFailures: int = 5
    #: Seconds refused after the first failure past the free ones; doubles each time.
    firstPenalty: float = 2.0
    maxPenalty: float = 600.0
    #: A source with no failure for this long starts afresh.
    forgetAfter: float = 3600.0
    #: Sources remembered at once (least recently failed forgotten first).
    maxSources: int = 65536
    #: Key exchanges a source may have computed for connections that then closed
    #: without trying to log in, at once (the bucket's size)...
    noauthAllowance: int = DEFAULT_NOAUTH_ALLOWANCE
    #: ...and refilled at this rate (per second); 0 turns the bound off.
    noauthRate: float = DEFAULT_NOAUTH_RATE
    #: Connections a source may close before any key exchange (without a failure), at
    #: once, and refilled at this rate (per second; 0 turns the bound off).
    earlyCloseAllowance: int = DEFAULT_EARLY_CLOSE_ALLOWANCE
    earlyCloseRate: float = DEFAULT_EARLY_CLOSE_RATE
    #: Networks whose sources are never refused (their failures still count and log).
    exempt: tuple[ExemptNetwork, ...] = ()

    def penalty(self, failures: int) -> float:
        """Seconds a source with C{failures} failed connections is refused."""
        beyond = failures - self.freeFailures
        if beyond <= 0:
            return 0.0
        return min(self.firstPenalty * 2.0 ** min(beyond - 1, 62), self.maxPenalty)


def sourceKey(peer: Any) -> str:
    """
    The source a penalty is kept for (L{sourceNetwork}: the IPv4 address, or the /64 of an
    IPv6 address). Anything without a host is taken as it prints.
    """
    peer = getattr(peer, "address", peer)  # Conch's SSHTransportAddress
    host = getattr(peer, "host", None)
    if host is None:
        return str(peer)
    return sourceNetwork(str(host))


def parseExemptNetwork(text: str) -> ExemptNetwork:
    """
    A network given to C{--penalty-exempt}: C{203.0.113.7}, C{198.51.100.0/24},
    C{2001:db8:5::/48}. An IPv4-mapped IPv6 network is taken as the IPv4 one.

    @raise ValueError: saying what is wrong: not an address or network, host bits set
        (C{10.1.2.3/8}), or an IPv6 prefix longer than /64 (IPv6 sources are counted
        per /64, so a longer one could not be told apart from its neighbours).
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            loose = ipaddress.ip_network(text.strip(), strict=False)
            raise ValueError(f"{text!r} has host bits set (the network is {loose})") from None
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or network") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        if network.prefixlen > 64:
            raise ValueError(
                f"{text!r}: IPv6 sources are counted per /64, so an exempt IPv6 "
                "network is a /64 or shorter"
            )
    return network


def _inside(source: str, networks: tuple[ExemptNetwork, ...]) -> bool:
    """Whether the source key C{source} (an address or an IPv6 /64) is in C{networks}."""
    if not networks:
        return False
    try:
        network = ipaddress.ip_network(source)
    except ValueError:
        return False
    return any(
        network.version == exempt.version and network.subnet_of(exempt)  # type: ignore[arg-type]
        for exempt in networks
    )


@attrs.frozen
class Allowance:
    """
    A per-source token bucket: C{size} units at once, refilled at C{rate} per second (0
    turns it off). A source that has used them all is refused until one has refilled.
    """

    size: int
    rate: float
    #: What a unit is, for the log line of a refusal.
    what: str
    #: The refusal reason it gives (L{REFUSAL_REASONS}).
    reason: str

    def owed(self, bucket: _Bucket, now: float) -> float:
        """Units not yet paid back by the refill."""
        return max(0.0, bucket.owed - (now - bucket.at) * self.rate)

    def refusal(self, bucket: _Bucket, now: float, extra: int = 0) -> float:
        """
        Seconds until the source has one unit of its allowance again, with C{extra}
        units counted as spent on top of C{bucket}.
        """
        if self.rate <= 0:
            return 0.0
        return max(0.0, (self.owed(bucket, now) + extra - (self.size - 1)) / self.rate)

    def emptyBucket(self, now: float) -> _Bucket:
        """A bucket owing nothing as of C{now}, for one holder's own allowance."""
        return _Bucket(at=now)

    def spend(self, bucket: _Bucket, now: float) -> bool:
        """Take one unit from C{bucket} if it has one now; whether it had."""
        if self.refusal(bucket, now):
            return False
        bucket.owed, bucket.at = self.owed(bucket, now) + 1, now
        return True


@attrs.define
class _Bucket:
    """What a source owes one allowance, as of C{at}."""

    owed: float = 0.0
    at: float = 0.0
    #: When a refusal by this allowance was last logged.
    loggedAt: float = float("-inf")


#: The bucket of a source that owes nothing.
_NOTHING_OWED = _Bucket()


class ConnectionAllowance:
    """
    One connection's own allowance (a link's enrollment requests, the key re-exchanges
    its peer starts), where L{SourcePenalties} keeps a source's: the L{Allowance} and what
    the connection owes it. What it owes is kept from its first spend on: most
    connections never spend.
    """

    __slots__ = ("_bucket", "allowance")

    def __init__(self, allowance: Allowance) -> None:
        self.allowance = allowance
        self._bucket: _Bucket | None = None

    def spend(self, now: float) -> bool:
        """Take one unit if the connection has one now; whether it had."""
        if self._bucket is None:
            self._bucket = self.allowance.emptyBucket(now)
        return self.allowance.spend(self._bucket, now)

    def logRefusal(self, now: float, interval: float) -> bool:
        """
        Whether a refusal now is one to log: the first, then at most one per C{interval}
        seconds (a peer that keeps asking would otherwise write a line per request).
        """
        bucket = self._bucket
        if bucket is None or now - bucket.loggedAt < interval:
            return False
        bucket.loggedAt = now
        return True


@attrs.define
class _Record:
    failures: int
    lastFailure: float
    refusedUntil: float
    #: Whether the source is in an exempt network (decided once, when first counted).
    exempt: bool
    #: Key exchanges computed for connections that closed without trying to log in.
    noauth: _Bucket = attrs.field(factory=_Bucket)
    #: Connections that closed before any key exchange.
    earlyClose: _Bucket = attrs.field(factory=_Bucket)


class SourcePenalties:
    """
    Per source, in a bounded LRU: failed connections, key exchanges computed for
    connections that closed without trying to log in, and connections that closed before
    any key exchange; who is refused until when, and why.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, policy: PenaltyPolicy | None = None) -> None:
        # Penalties and allowances are durations: measured on a clock that does not step.
        self._now = elapsedClock(clock)
        self.policy = policy = policy or PenaltyPolicy()
        self._sources: OrderedDict[str, _Record] = OrderedDict()
        self._noauth = Allowance(
            policy.noauthAllowance,
            policy.noauthRate,
            "key exchanges without a login attempt",
            REFUSED_NOAUTH,
        )
        self._earlyClose = Allowance(
            policy.earlyCloseAllowance,
            policy.earlyCloseRate,
            "connections closed (or silent) before a key exchange",
            REFUSED_EARLY_CLOSE,
        )
        #: Connections accepted and not yet heard from (no version line), by source:
        #: each counts as an early close until it speaks (at most the open connections).
        self._silent: Counter[str] = Counter()
        #: Connections refused since the server started, in all and by reason.
        self.refusedConnections = 0
        self.refusals: Counter[str] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))

    def __len__(self) -> int:
        return len(self._sources)

    def _current(self, source: str, now: float) -> _Record | None:
        record = self._sources.get(source)
        if record is None:
            return None
        policy = self.policy
        # The clock went back: never refuse (or remember) longer than the policy says.
        record.refusedUntil = min(record.refusedUntil, now + policy.maxPenalty)
        record.lastFailure = min(record.lastFailure, now)
        record.noauth.at = min(record.noauth.at, now)
        record.earlyClose.at = min(record.earlyClose.at, now)
        if record.failures and now - record.lastFailure >= policy.forgetAfter:
            record.failures = 0
        if (
            not record.failures
            and record.refusedUntil <= now
            and not self._noauth.owed(record.noauth, now)
            and not self._earlyClose.owed(record.earlyClose, now)
        ):
            del self._sources[source]
            return None
        return record

    def _remember(self, source: str, now: float) -> _Record:
        record = self._current(source, now)
        if record is None:
            record = _Record(0, now, now, self.exempt(source), _Bucket(0.0, now), _Bucket(0.0, now))
            self._sources[source] = record
        self._sources.move_to_end(source)
        while len(self._sources) > self.policy.maxSources:
            self._sources.popitem(last=False)
        return record

    def exempt(self, source: str) -> bool:
        """Whether C{source} is in a network of L{PenaltyPolicy.exempt}."""
        return _inside(source, self.policy.exempt)

    def _refusal(self, record: _Record | None, now: float, silent: int) -> tuple[float, str]:
        """
        How long a source is refused for, and the reason that lasts longest, from its
        C{record} (None: nothing owed) and its C{silent} connections.
        """
        if record is None:
            return self._earlyClose.refusal(_NOTHING_OWED, now, silent), REFUSED_EARLY_CLOSE
        return max(
            (record.refusedUntil - now, REFUSED_FAILURES),
            (self._noauth.refusal(record.noauth, now), REFUSED_NOAUTH),
            (self._earlyClose.refusal(record.earlyClose, now, silent), REFUSED_EARLY_CLOSE),
        )

    def _refusedNow(self, source: str) -> tuple[float, str]:
        now = self._now()
        record = self._current(source, now)
        silent = self._silent.get(source, 0)
        if record is None and silent < self._earlyClose.size:
            return 0.0, REFUSED_EARLY_CLOSE  # the common case, on every accept: no lookup more
        if record.exempt if record is not None else self.exempt(source):
            return 0.0, REFUSED_EARLY_CLOSE
        return self._refusal(record, now, silent)

    def refusal(self, source: str) -> str | None:
        """
        Why C{source} is refused now (one of L{REFUSAL_REASONS}, the one that lasts
        longest), or None if it may connect.
        """
        seconds, reason = self._refusedNow(source)
        return reason if seconds > 0 else None

    def refusedFor(self, source: str) -> float:
        """Seconds C{source} is still refused for (0: it may connect)."""
        return max(0.0, self._refusedNow(source)[0])

    def refusedSources(self) -> int:
        """Sources refused now (exempt ones never are). Reads all of them; changes nothing."""
        now = self._now()
        silent = self._silent
        remembered = sum(
            1
            for source, record in self._sources.items()
            if not record.exempt and self._refusal(record, now, silent.get(source, 0))[0] > 0
        )
        unremembered = sum(
            1
            for source, count in silent.items()
            if source not in self._sources
            and self._refusal(None, now, count)[0] > 0
            and not self.exempt(source)
        )
        return remembered + unremembered

    def failed(self, source: str, why: str) -> float:
        """
        Count a failed connection from C{source}; return the seconds it is now refused
        (0 for an exempt source, which is logged as it would have been refused).
        """
        now = self._now()
        record = self._remember(source, now)
        record.failures += 1
        record.lastFailure = now
        penalty = self.policy.penalty(record.failures)
        if not penalty:
            return 0.0
        if not record.exempt:
            self._log.info(
                "refusing {source} for {penalty:.0f}s after {failures} failed connections "
                "(last: {why})",
                source=source,
                penalty=penalty,
                failures=record.failures,
                why=why,
            )
        elif now >= record.refusedUntil:
            # One line where another source would have been refused: not one per failure.
            self._log.info(
                "not refusing {source} (exempt): {failures} failed connections, "
                "{penalty:.0f}s of penalty (last: {why})",
                source=source,
                penalty=penalty,
                failures=record.failures,
                why=why,
            )
        record.refusedUntil = max(record.refusedUntil, now + penalty)
        return 0.0 if record.exempt else penalty

    def noauth(self, source: str, exchanges: int = 1) -> float:
        """
        Count a connection from C{source} that had groundcontrol compute C{exchanges} key
        exchanges and closed without trying to log in; return the seconds the source is
        now refused (0 within its allowance, or exempt).
        """
        return self._spend(source, self._noauth, exchanges, lambda r: r.noauth)

    def earlyClose(self, source: str) -> float:
        """
        Count a connection from C{source} that closed, without a login and without a
        failure, before groundcontrol computed any key exchange; return the seconds the
        source is now refused (0 within its allowance, or exempt).
        """
        return self._spend(source, self._earlyClose, 1, lambda r: r.earlyClose)

    def accepted(self, source: str) -> None:
        """
        A connection from C{source} was accepted (not refused). Until L{spoke} it counts
        against the early-close allowance as if it had closed early, so that a client
        with several connections open at once (ssh-audit's rate probe keeps 3) cannot
        have more than the allowance served between two refills. SSH clients send their
        version line at once, so one that logs in counts for one round trip.
        """
        if self._earlyClose.rate > 0:
            self._silent[source] += 1

    def spoke(self, source: str) -> None:
        """A connection L{accepted} from C{source} sent its version line, or ended."""
        if self._earlyClose.rate > 0:
            self._silent[source] -= 1
            if self._silent[source] <= 0:
                del self._silent[source]

    def _spend(
        self,
        source: str,
        allowance: Allowance,
        units: int,
        bucketOf: Callable[[_Record], _Bucket],
    ) -> float:
        if allowance.rate <= 0:
            return 0.0
        now = self._now()
        record = self._remember(source, now)
        bucket = bucketOf(record)
        before = allowance.refusal(bucket, now)
        # Never owe more than maxPenalty's worth of refusal.
        most = allowance.size - 1 + allowance.rate * self.policy.maxPenalty
        bucket.owed = min(allowance.owed(bucket, now) + units, most)
        bucket.at = now
        refused = allowance.refusal(bucket, now)
        # One line when a refusal starts, not one per connection still finishing, nor
        # one per refill for a source that keeps at it (at most one a minute).
        if refused and not before and now - bucket.loggedAt >= _LOG_INTERVAL:
            bucket.loggedAt = now
            self._log.info(
                "{refusing} {source} for {refused:.1f}s: it used its {allowance} {what} "
                "(then {rate} a second){exempt}",
                refusing="not refusing" if record.exempt else "refusing",
                source=source,
                refused=refused,
                allowance=allowance.size,
                what=allowance.what,
                rate=allowance.rate,
                exempt=" (exempt)" if record.exempt else "",
                reason=allowance.reason,
            )
        return 0.0 if record.exempt else refused

    def refused(self, reason: str = REFUSED_FAILURES) -> None:
        """A connection was refused at the door, for C{reason} (see L{refusal})."""
        self.refusedConnections += 1
        self.refusals[reason] += 1


class PreauthGuard:
    """The limits and the shared penalty box of one server (one SSH factory)."""

    def __init__(
        self,
        clock: IReactorTime,
        limits: PreauthLimits | None = None,
        penalties: PenaltyPolicy | None = None,
    ) -> None:
        self.limits = limits or PreauthLimits()
        self.penalties = SourcePenalties(clock, penalties)


def guardOf(factory: Any) -> PreauthGuard:
    """
    The factory's L{PreauthGuard}: C{factory.preauthGuard} if set, else one made on first
    use with the defaults and the factory's clock, shared by all its connections.
    """
    guard = getattr(factory, "preauthGuard", None)
    if guard is None:
        guard = PreauthGuard(factory.clock)
        factory.preauthGuard = guard
    return guard


#: Bytes a MAC (or an AEAD tag) adds to a packet, at most (hmac-sha2-512).
_MAX_MAC = 64


class FailureKind(enum.Enum):
    """What a connection that ends without a login did that counts against its source."""

    #: It broke a pre-login rule (L{PreauthViolation}).
    VIOLATION = enum.auto()
    #: A new device refused by the pending caps (sshserver disconnects it with
    #: too-many-connections, the only pre-login disconnect with that reason): not
    #: counted for an exempt source.
    PENDING_REFUSED = enum.auto()
    #: It failed authentication.
    BAD_AUTH = enum.auto()
    #: It ran out the login grace time.
    GRACE_TIME = enum.auto()


@attrs.frozen
class _Failure:
    """Why a connection that ends without a login counts against its source."""

    kind: FailureKind
    #: What the log line says (L{SourcePenalties.failed}'s "last: ...").
    why: str


class PreauthViolation(Exception):  # noqa: N818 - a reason to drop, not a bug
    """The client broke a pre-authentication rule; the text says which."""


def _checkNameLists(packet: bytes, limits: PreauthLimits) -> None:
    """A KEXINIT payload (after the message number): cookie, ten name-lists, flag, uint32."""
    offset = 16
    if len(packet) < offset:
        raise PreauthViolation("truncated KEXINIT")
    for _ in range(10):
        if len(packet) < offset + 4:
            raise PreauthViolation("truncated KEXINIT")
        (length,) = struct.unpack(">L", packet[offset : offset + 4])
        offset += 4
        if length > limits.maxNameList:
            raise PreauthViolation(f"KEXINIT name-list of {length} bytes")
        if len(packet) < offset + length:
            raise PreauthViolation("truncated KEXINIT")
        names = packet[offset : offset + length]
        offset += length
        if names and any(
            not 0 < len(name) <= limits.maxName or not all(0x21 <= c <= 0x7E for c in name)
            for name in names.split(b",")
        ):
            raise PreauthViolation("malformed KEXINIT algorithm name")
    if len(packet) < offset + 5:
        raise PreauthViolation("truncated KEXINIT")


class PreauthMixin:
    """
    Mix into an L{transport.SSHServerTransport} subclass (before it in the bases) to bound
    what an unauthenticated client may send and to keep score of failing sources.

    The factory supplies C{clock} and, optionally, C{preauthGuard} (see L{guardOf}) and
    C{settings.loginGraceTime}.
    """

    _preauthLog = Logger()
    _preauthSource = ""
    _preauthRefused = False
    _preauthViolation: str | None = None
    _preauthStarted = 0.0
    _preauthPackets = 0
    _preauthBytes = 0
    _preauthKexInits = 0
    #: Key exchanges the client had us compute (its KEXDH/ECDH/hybrid INITs).
    _preauthExchanges = 0
    #: The reason code of the DISCONNECT we sent before a login, if we sent one.
    _preauthDisconnect: int | None = None
    #: Accepted, and no version line from the client yet (see L{SourcePenalties.accepted}).
    _preauthSilent = False

    # The attributes of the transport this is mixed into.
    factory: Any
    transport: Any
    buf: bytes
    gotVersion: bool
    currentEncryptions: Any

    #: Nothing to do per read once logged in: the fast packet layer's steady path may
    #: skip this layer (accesstunnel.fastpath.enterSteadyState).
    steadyCovers = frozenset({"dataReceived"})

    def _preauthDone(self) -> bool:
        return getattr(self, "avatar", None) is not None

    def _steadyReady(self) -> bool:
        return (
            self._preauthDone()
            and not self._preauthRefused
            and self._preauthViolation is None
            and super()._steadyReady()  # type: ignore[misc]
        )

    def connectionMade(self) -> None:
        guard = guardOf(self.factory)
        self._preauthSource = sourceKey(self.transport.getPeer())
        self._preauthStarted = elapsedClock(self.factory.clock)()  # a wall step moves none
        refusal = guard.penalties.refusal(self._preauthSource)
        if refusal is not None:
            # Before our version line and any key exchange: a refused source costs an
            # accept and a close, nothing more. Not logged per connection (a flood
            # would flood the log); the penalty was logged when it started.
            self._preauthRefused = True
            guard.penalties.refused(refusal)
            self.transport.loseConnection()
            return
        guard.penalties.accepted(self._preauthSource)
        self._preauthSilent = True
        super().connectionMade()  # type: ignore[misc]

    def _preauthSpoke(self, penalties: SourcePenalties) -> None:
        """The client sent its version line, or the connection ended."""
        if self._preauthSilent:
            self._preauthSilent = False
            penalties.spoke(self._preauthSource)

    def dataReceived(self, data: bytes) -> None:
        if self._preauthRefused or self._preauthViolation is not None:
            return
        if self._preauthDone():
            super().dataReceived(data)  # type: ignore[misc]
            return
        limits = guardOf(self.factory).limits
        self._preauthBytes += len(data)
        try:
            if self._preauthBytes > limits.maxBytes:
                raise PreauthViolation(f"more than {limits.maxBytes} bytes before logging in")
            if not self.gotVersion:
                buffered = self.buf + data
                self._checkVersion(buffered, limits)
                end = buffered.find(b"\n")
                if end != -1:
                    # Conch looks for "SSH-" on every line it is given, binary packets
                    # included: hand it the version line alone, then the rest.
                    cut = end + 1 - len(self.buf)
                    super().dataReceived(data[:cut])  # type: ignore[misc]
                    self._preauthSpoke(guardOf(self.factory).penalties)
                    data = data[cut:]
                    if not data or self.transport.disconnecting:
                        return
            super().dataReceived(data)  # type: ignore[misc]
            if not self._preauthDone() and self._preauthViolation is None:
                # What is left unparsed is at most one unfinished packet.
                unparsed = len(self.buf) + len(getattr(self, "_fpBuf", b""))
                if unparsed > limits.maxPacketLength + _MAX_MAC:
                    raise PreauthViolation(
                        f"packet of more than {limits.maxPacketLength} bytes before logging in"
                    )
        except PreauthViolation as e:
            self._preauthDrop(str(e))
        except Exception as e:
            # Conch could not parse what a client sent before logging in. That is the
            # client's problem: drop it with one line, not a traceback per attempt.
            self._preauthLog.debug("unparsable message from {source}", source=self._preauthSource)
            self._preauthDrop(f"malformed message ({type(e).__name__})")

    def _checkVersion(self, buffered: bytes, limits: PreauthLimits) -> None:
        end = buffered.find(b"\n")
        line = buffered if end == -1 else buffered[: end + 1]
        if len(line) > limits.maxVersionLine:
            raise PreauthViolation("version line too long")
        if not (b"SSH-"[: len(line)] == line[:4]):
            raise PreauthViolation("the first line is not an SSH version line")

    def getPacket(self) -> bytes | None:
        encryptions = self.currentEncryptions
        if (
            not self._preauthDone()
            and self._preauthViolation is None
            and getattr(encryptions, "inCipType", None) == b"none"
        ):
            # Before the first NEWKEYS the length is in clear: refuse an oversized
            # packet as soon as its length is read. (Encrypted packets are bounded by
            # the buffer check in dataReceived, whichever packet layer reads them.)
            blockSize = encryptions.decBlockSize
            if len(self.buf) >= blockSize:
                if not hasattr(self, "first"):
                    # Decrypt the first block once, as Conch would; Conch takes it from here.
                    self.first = encryptions.decrypt(self.buf[:blockSize])
                (length,) = struct.unpack(">L", self.first[:4])
                limit = guardOf(self.factory).limits.maxPacketLength
                if length > limit:
                    raise PreauthViolation(f"packet of {length} bytes before logging in")
        if self._preauthViolation is not None:
            return None
        return super().getPacket()  # type: ignore[misc, no-any-return]

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if self._preauthViolation is not None:
            return
        if not self._preauthDone():
            limits = guardOf(self.factory).limits
            self._preauthPackets += 1
            if len(payload) >= limits.maxPacketLength:
                raise PreauthViolation(
                    f"packet of more than {limits.maxPacketLength} bytes before logging in"
                )
            if self._preauthPackets > limits.maxPackets:
                raise PreauthViolation(f"more than {limits.maxPackets} packets before logging in")
            if messageNum == transport.MSG_KEXINIT:
                self._preauthKexInits += 1
                if self._preauthKexInits > limits.maxKexInits:
                    raise PreauthViolation("too many key exchanges before logging in")
                _checkNameLists(payload, limits)
            elif messageNum == transport.MSG_KEXDH_INIT:
                self._preauthExchanges += 1
        super().dispatchMessage(messageNum, payload)  # type: ignore[misc]

    def _preauthDrop(self, why: str) -> None:
        if self._preauthViolation is not None:
            return
        self._preauthViolation = why
        self._preauthLog.info(
            "dropping {source} before login: {why}", source=self._preauthSource, why=why
        )
        self.buf = b""
        self.sendDisconnect(  # type: ignore[attr-defined]
            transport.DISCONNECT_PROTOCOL_ERROR, why.encode("ascii", "replace")
        )

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if not self._preauthDone():
            self._preauthDisconnect = reason
        super().sendDisconnect(reason, desc)  # type: ignore[misc]

    def connectionLost(self, reason: Any = None) -> None:
        if not self._preauthRefused:
            if not self._preauthDone():
                self._preauthCount(guardOf(self.factory).penalties)
            elif self._loginIsNoauth():
                # Logged in, but as nobody accountable: the key exchanges count as if
                # nobody had logged in with them (L{_loginIsNoauth}).
                penalties = guardOf(self.factory).penalties
                penalties.noauth(self._preauthSource, max(1, self._preauthExchanges))
        super().connectionLost(reason)  # type: ignore[misc]

    def _loginIsNoauth(self) -> bool:
        """
        Whether this connection's login, now that it ends, draws on its source's no-auth
        allowance like a key exchange nobody logged in with: a login anyone can make with
        a fresh key (a device still pending), looped, costs us a key exchange and a
        signature check each time. The transport decides; by default no login does.
        """
        return False

    def _preauthCount(self, penalties: SourcePenalties) -> None:
        """Count this connection, which ends without a login, against its source."""
        source = self._preauthSource
        self._preauthSpoke(penalties)
        failure = self._failure()
        if failure is None:
            if self._preauthExchanges:
                # OpenSSH's noauth: our CPU went into key exchanges nobody logged in with.
                penalties.noauth(source, self._preauthExchanges)
            else:
                # Closed before any key exchange: a banner grab, a TCP health check,
                # ssh-audit's DHEat rate probe.
                penalties.earlyClose(source)
        elif failure.kind is FailureKind.PENDING_REFUSED and penalties.exempt(source):
            # A new device the pending caps refused (we said too many connections)
            # counts as a failure: it logged in with a key, but anyone can make a fresh
            # key per connection and have us check a signature. Not for an exempt
            # source: a NAT in front of a fleet being rolled out is where it happens
            # honestly.
            pass
        else:
            penalties.failed(source, failure.why)

    def _failure(self) -> _Failure | None:
        """Why this connection, ending without a login, counts against its source."""
        if self._preauthViolation is not None:
            return _Failure(FailureKind.VIOLATION, self._preauthViolation)
        if self._preauthDisconnect == transport.DISCONNECT_TOO_MANY_CONNECTIONS:
            return _Failure(FailureKind.PENDING_REFUSED, "a new device refused by the pending caps")
        attempts = getattr(getattr(self, "service", None), "loginAttempts", 0)
        if attempts:
            return _Failure(FailureKind.BAD_AUTH, f"{attempts} failed authentication attempts")
        grace = getattr(getattr(self.factory, "settings", None), "loginGraceTime", None)
        elapsed = elapsedClock(self.factory.clock)() - self._preauthStarted
        if grace is not None and elapsed >= grace:
            return _Failure(FailureKind.GRACE_TIME, "login grace time exceeded")
        return None
