"""
SSH-level keepalives: find a peer that went silent.

TCP keepalive cannot see a frozen process or a path that silently drops
everything; only a request the peer must answer can. Both ends of the agent
link, and groundcontrol towards operators, run one L{Keepalive} per
connection.

The rule: when nothing has been received since the previous check (one
interval ago; like OpenSSH's ClientAliveInterval), send a
C{keepalive@openssh.com} global request (every SSH implementation answers an
unknown global request with success or failure, and either is proof of life).
When nothing has been received for C{interval * count} seconds, the peer is
dead. At most one timer is pending per connection, and an idle connection
wakes once per interval, no more.

A keepalive may also wait longer before it asks (C{probeAfter}, like OpenSSH's
ClientAliveInterval: a probe only after that much silence). groundcontrol
uses that on agent links: the agent pings on its own every other interval
(30 s), so its pings, answered, are the proof of life, and groundcontrol sends
nothing and wakes only about once per ping it receives; it still asks a link that goes
quiet, and still declares it dead after C{interval * count} seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

DEFAULT_INTERVAL = 15.0
DEFAULT_COUNT = 3


class Keepalive:
    """
    Watch one connection for silence.

    @ivar lastReceived: when the peer last sent anything (clock seconds).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        sendPing: Callable[[], None],
        onDead: Callable[[], None],
        interval: float = DEFAULT_INTERVAL,
        count: int = DEFAULT_COUNT,
        probeAfter: float | None = None,
    ) -> None:
        """
        @param probeAfter: seconds of silence before the first ping (default:
            C{interval}, checked every interval). Longer makes the keepalive
            passive: it wakes when the silence would reach C{probeAfter}, not
            every interval, and pings only then (and every interval after
            that, until the deadline).
        """
        if interval <= 0 or count < 1:
            raise ValueError("keepalive interval must be positive and count at least 1")
        if probeAfter is not None and not interval <= probeAfter <= interval * count:
            raise ValueError("keepalive probeAfter must be between interval and interval * count")
        self._clock = clock
        self._sendPing = sendPing
        self._onDead = onDead
        self.interval = interval
        self.count = count
        self.probeAfter = interval if probeAfter is None else probeAfter
        self._passive = self.probeAfter > interval
        self.lastReceived = clock.seconds()
        self._timer: IDelayedCall | None = None
        self._due = self.lastReceived
        self._lastCheck = self.lastReceived

    @property
    def deadline(self) -> float:
        """Seconds of silence after which the peer is declared dead."""
        return self.interval * self.count

    def start(self) -> None:
        """Begin watching; silence is counted from now."""
        self.lastReceived = self._lastCheck = self._clock.seconds()
        self._schedule(self.probeAfter if self._passive else self.interval)

    def stop(self) -> None:
        """Stop watching (the connection is gone)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def received(self) -> None:
        """The peer sent something. Called for every read: keep it cheap."""
        self.lastReceived = self._clock.seconds()

    def _schedule(self, delay: float) -> None:
        self._due = self._clock.seconds() + delay
        self._timer = self._clock.callLater(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        previousCheck, self._lastCheck = self._lastCheck, now
        if now < self.lastReceived:
            # The clock went back: count silence from now, not from the future.
            self.lastReceived = now
        if now - self._due >= self.deadline:
            # The check ran a whole deadline late: the clock jumped forward or the process
            # was stopped. Silence we did not watch is no verdict: ask now, and judge from
            # the answer (dead after count - 1 more intervals without one).
            self.lastReceived = max(self.lastReceived, now - self.interval)
            previousCheck = self.lastReceived
        silence = now - self.lastReceived
        if silence >= self.deadline:
            self._log.info(
                "peer silent for {silence:.0f}s, declaring the connection dead",
                silence=silence,
            )
            self._onDead()
            return
        if silence < self.probeAfter and self._passive:
            # Heard from lately: nothing to ask. Wake when the silence would reach
            # probeAfter (traffic meanwhile only moves lastReceived, no timer).
            # At least a millisecond: a float remainder too small to move the
            # clock must not make a busy loop.
            self._schedule(max(self.probeAfter - silence, 0.001))
            return
        # Passive: silent for probeAfter (we are here only then). Active: nothing at
        # all since the last check (OpenSSH's ClientAliveInterval rule). The answer
        # to our own ping arrives after the check that sent it and spares the next
        # one: a peer that only answers is pinged every other interval, however
        # late the timer runs or slow the answer is.
        if self._passive or self.lastReceived <= previousCheck:
            self._sendPing()
        # Wake at the next interval, or exactly at the deadline if that is
        # sooner, so a dead peer is found within interval * count.
        untilDeadline = self.lastReceived + self.deadline - now
        self._schedule(min(self.interval, max(untilDeadline, 0.0)))


class KeepaliveTransportMixin:
    """
    For an SSH transport: watch the peer once the connection service runs.

    The transport calls L{watchPeer} when ssh-connection starts; every read
    counts as a sign of life; L{peerSilent} runs when the peer is dead (by
    default: abort the socket, since a dead peer will never read a polite
    close).
    """

    keepalive: Keepalive | None = None
    _keepaliveLog = Logger()

    def watchPeer(
        self,
        conn: Any,
        clock: IReactorTime,
        interval: float,
        count: int,
        probeAfter: float | None = None,
    ) -> None:
        """
        Start pinging C{conn}'s peer with C{keepalive@openssh.com} when it is
        silent (for C{probeAfter} seconds: see L{Keepalive}).
        """

        def ping() -> None:
            d = conn.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
            if d is not None:
                d.addErrback(lambda f: None)  # a refusal is an answer too

        self.keepalive = Keepalive(clock, ping, self.peerSilent, interval, count, probeAfter)
        self.keepalive.start()

    def peerSilent(self) -> None:
        """The peer is dead: drop the connection without waiting for it."""
        self._keepaliveLog.info("no answer from the peer; dropping the connection")
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        keepalive = self.keepalive
        if keepalive is not None:
            keepalive.received()
        super().dataReceived(data)  # type: ignore[misc]

    def connectionLost(self, reason: Any = None) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        super().connectionLost(reason)  # type: ignore[misc]


__all__ = ["DEFAULT_COUNT", "DEFAULT_INTERVAL", "Keepalive", "KeepaliveTransportMixin"]
