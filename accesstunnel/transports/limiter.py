"""
A bound on concurrent unauthenticated SSH handshakes, so a reconnect storm (a whole fleet
coming back after a server restart) cannot starve agents and operators already logged in.

Key exchange and signature checks cost CPU; thousands at once would delay every packet of
the live sessions on the same reactor. So at most C{maxPending} connections are in their
handshake at once (at most C{maxPerSource} from one source address). Authenticated
connections do not count.

B{Agents and operators.} The slots are split in two pools: C{operatorReserve} of them are
for operators, the rest for agents. While agents wait for a slot, a new connection is put
in a pool by the first line it sends, its SSH version line, which SSH clients send at once,
before any key exchange work: our agent's (C{SSH-2.0-AccessTunnelAgent_0.1.0
Twisted_26.10.0}; agents deployed before it had a line of its own send Conch's
C{SSH-2.0-Twisted_...} and count as agents too, see L{isAgentVersion}) goes to the agents'
pool, any other (C{SSH-2.0-OpenSSH_9.2p1 ...}) to the operators'. A connection that sends
no complete version line within C{versionTimeout}
seconds (a client waiting for the server's line first, a stalled one) or a line longer than
SSH allows goes to the agents' pool: only a connection that says it is not our agent is
served from the reserve. While no agent waits, a new connection that could start in the
agents' pool starts there at once, unread: its pool would make no one wait; so does one
still awaiting its line once a slot frees for it.
The source address cannot tell them apart when every device sits behind its own NAT, and
an operator may share an address with a crowd of agents; the version line can. Nothing is
gained by lying: a connection that claims to be an operator is counted in the operators'
pool, which is small (C{operatorReserve}) and where one source holds at most half of it
(L{operatorShare}); the agents' own slots are never touched by it (it can only take
reserved slots the agents would otherwise borrow, below). With C{operatorReserve=0} there
is one pool and no version line is awaited (the limiter before the split).

B{Lending.} Reserved slots that no operator uses are lent to agents, all but
C{operatorFloor} of them (L{defaultOperatorFloor}: a quarter of the reserve, at least two;
4 of 16), so a reconnect storm runs on C{maxPending - operatorFloor} slots (60 of 64), not
on the agents' own C{maxPending - operatorReserve} (48). The invariant, kept by
L{_Pool.start} and L{_Pool.release}: an agent takes a reserved slot only when its own pool
is full and, with that slot lent, at least C{operatorFloor} reserved slots are still free
(slots in use = the operators' handshakes + the slots lent); a borrowed slot goes back to
the reserve when that agent's handshake ends (logged in, failed, timed out), and a freed
reserved slot goes to a waiting operator before any agent may borrow it again. So an
operator arriving in a storm starts at once unless C{operatorFloor} operator handshakes
are in progress already, and then gets the next reserved slot that frees (a lent one frees
within one agent handshake); agents never have fewer than their own slots.

Connections beyond the bound of their pool B{wait}; they are not refused (OpenSSH's
C{MaxStartups} closes them, and a refused agent sits in its backoff while the server has
CPU to spare):

  - a connection whose pool is full is held, read paused and its SSH protocol not even
    built, in a waiting room (connections still awaiting their version line count in the
    room too);
  - when the waiting room holds C{maxWaiting} connections and every pool is full, the
    listening ports stop accepting (C{stopReading}), so further connections wait in the
    kernel's listen backlog; they accept again as soon as a slot frees (with
    C{maxWaiting=0} the ports pause the moment the slots are full). While the other pool
    has a free slot (in a storm of agents: the operators' reserve) the ports keep
    accepting, so that an operator can still get in; a connection that would then have
    to wait in a full room is closed instead, after its version line;
  - within a pool, a freed slot goes first to a connection whose source had nothing in
    progress and nothing waiting when it arrived, then to sources with no handshake in
    progress, then round robin over the other sources: so a source that brings hundreds
    of connections at once cannot make a quiet one wait behind all of them. Within a
    source, first come first served.

One source may have C{maxPerSource} handshakes in progress and C{maxWaitingPerSource}
connections waiting in each pool, and C{maxPerSource + maxWaitingPerSource} awaiting their
version line; beyond that its connections are closed at once (cheaply: no key exchange).
Holding them would let one address pin file descriptors and memory without limit; the
agent's jittered backoff brings a refused one back later.

Every handshake is also bounded in time: a connection still not logged in
C{handshakeTimeout} seconds after its slot was granted is aborted (the SSH transport's login
grace time normally ends it first; this catches a connection whose polite close never
completes, e.g. one stalled inside a TLS handshake).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from accesstunnel.addresses import sourceNetwork
from accesstunnel.clocks import elapsedClock
from accesstunnel.layers import transportLayers

__all__ = ["AGENTS", "OPERATORS", "HandshakeLimiter", "isAgentVersion"]

DEFAULT_MAX_PENDING = 64
DEFAULT_MAX_PER_SOURCE = 16
#: Accepted connections held before the listening ports pause: enough for a whole fleet's
#: reconnect storm, so the kernel does not drop SYNs (and with them an operator's connect).
#: A waiting connection costs a file descriptor and about 1 KiB: no SSH state yet.
DEFAULT_MAX_WAITING = 16384
DEFAULT_MAX_WAITING_PER_SOURCE = 256
#: Seconds past the SSH factory's login grace time before the limiter aborts a handshake.
HANDSHAKE_TIMEOUT_MARGIN = 10.0
#: The handshake timeout when the SSH factory has no login grace time to go by.
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
#: Seconds a new connection has to send its version line before it is put in the agents'
#: pool unread. SSH clients send theirs at once (one round trip at most).
DEFAULT_VERSION_TIMEOUT = 2.0
#: Bytes a waiting connection may send before its turn (a version line and a KEXINIT are
#: about 2 KB; a client waits for the server's before it sends more).
MAX_WAITING_BYTES = 64 * 1024
#: The longest version line SSH allows, CR LF included (RFC 4253, 4.2).
MAX_VERSION_LINE = 255
#: How our agent's version line starts (agent/link.py: C{SSH-2.0-AccessTunnelAgent_0.1.0
#: Twisted_26.10.0}), whatever the agent's and Twisted's versions.
AGENT_VERSION_PREFIX = b"SSH-2.0-AccessTunnelAgent_"
#: How the line of agents from before it had its own starts: Conch's client as it is.
LEGACY_AGENT_VERSION_PREFIX = b"SSH-2.0-Twisted_"

AGENTS = "agents"
OPERATORS = "operators"

_CONNECTION_DONE = Failure(ConnectionDone())

_NEW, _HELLO, _WAITING, _PENDING, _DONE, _REFUSED, _LOST = range(7)


def isAgentVersion(line: bytes) -> bool:
    """
    Whether C{line} (a version line without its CR LF) is one our agent sends: its own
    (C{SSH-2.0-AccessTunnelAgent_...}), or Conch's (C{SSH-2.0-Twisted_...}), which agents
    deployed before it send, so that they keep landing in the agents' pool.
    """
    return line.startswith((AGENT_VERSION_PREFIX, LEGACY_AGENT_VERSION_PREFIX))


def defaultOperatorReserve(maxPending: int) -> int:
    """A quarter of the slots for operators (at least one), leaving at least one for agents."""
    return min(maxPending - 1, max(1, maxPending // 4))


def defaultOperatorFloor(operatorReserve: int) -> int:
    """
    Reserved slots never lent to agents: a quarter of the reserve, at least two (4 of 16),
    never more than the reserve (a reserve of one or two is not lent at all).
    """
    return min(operatorReserve, max(2, operatorReserve // 4))


def operatorShare(maxPerSource: int, operatorReserve: int) -> int:
    """Operator handshakes one source may have in progress: at most half the reserve."""
    return min(maxPerSource, max(1, operatorReserve // 2))


def _hasAvatar(protocol: Any) -> bool:
    """Conch sets C{transport.avatar} the moment authentication succeeds."""
    return getattr(protocol, "avatar", None) is not None


def _source(transport: Any) -> str:
    """The source whose handshakes are counted together (L{sourceNetwork})."""
    peer = transport.getPeer()
    peer = getattr(peer, "address", peer)
    return sourceNetwork(str(getattr(peer, "host", peer)))


def _listeningPort(transport: Any) -> Any:
    """
    The listening port a connection came in on (a TCP server transport's C{server}),
    looking through TLS and other wrappers; C{None} if there is none to pause.
    """
    for layer in transportLayers(transport):
        port = getattr(layer, "server", None)
        if callable(getattr(port, "stopReading", None)) and callable(
            getattr(port, "startReading", None)
        ):
            return port
    return None


def _call(obj: Any, name: str) -> None:
    method = getattr(obj, name, None)
    if method is not None:
        method()


class _Limited(ProtocolWrapper):
    """
    One connection: sends its version line, waits for a handshake slot in its pool, then
    counts as pending until the SSH protocol (built only then) has authenticated.
    """

    factory: HandshakeLimiter
    wrappedProtocol: Any
    transport: Any
    state = _NEW
    source = ""
    pool: _Pool | None = None
    #: Its handshake runs on a slot borrowed from another pool (an operators' slot).
    borrowed = False
    waitingSince = 0.0
    _timer: Any = None

    def __init__(self, factory: HandshakeLimiter, addr: Any) -> None:
        # The SSH protocol is built when the connection gets its slot, not before.
        self.factory = factory
        self.wrappedProtocol = None
        self._addr = addr
        self._buffered: list[bytes] = []
        self._bufferedBytes = 0

    def logPrefix(self) -> str:
        wrapped = self.wrappedProtocol
        if wrapped is not None:
            return super().logPrefix()  # type: ignore[no-any-return]
        name = getattr(getattr(self.factory.wrappedFactory, "protocol", None), "__name__", None)
        return f"{name or 'SSH'} ({self.__class__.__name__})"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.source = _source(transport)
        self.factory._arrived(self)

    # -- called by the factory

    def _hello(self) -> None:
        """Read until the version line (or the deadline) says which pool this belongs to."""
        self.state = _HELLO
        self._timer = self.factory._clock().callLater(
            self.factory.versionTimeout, self._versionTimedOut
        )

    def _wait(self) -> None:
        self.state = _WAITING
        self.waitingSince = self.factory._now()
        _call(self.transport, "pauseProducing")

    def _refuse(self) -> None:
        self.state = _REFUSED
        self._buffered = []
        self.transport.loseConnection()

    def _begin(self) -> None:
        """This connection has a slot: build the SSH protocol and let it run."""
        waited = self.state == _WAITING
        self.state = _PENDING
        self._timer = self.factory._clock().callLater(self.factory.handshakeTimeout, self._timedOut)
        protocol = self.factory.wrappedFactory.buildProtocol(self._addr)
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if waited and self.state == _PENDING:
            _call(self.transport, "resumeProducing")
        buffered, self._buffered = self._buffered, []
        self._bufferedBytes = 0
        for data in buffered:
            if self.wrappedProtocol is None:
                break
            self.dataReceived(data)

    def _versionTimedOut(self) -> None:
        self._timer = None
        if self.state == _HELLO:
            self.factory._classified(self, AGENTS)

    def _timedOut(self) -> None:
        self._timer = None
        if self.state != _PENDING:
            return
        self.factory._log.info(
            "handshake from {source} not finished in {timeout} s; aborting it",
            source=self.source,
            timeout=self.factory.handshakeTimeout,
        )
        self._abort()

    def _abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()

    def _check(self) -> None:
        if self.state == _PENDING and self.factory._isAuthenticated(self.wrappedProtocol):
            self.state = _DONE
            self._cancelTimer()
            self.factory._release(self)
            self._stepAside()

    def _stepAside(self) -> None:
        """
        Logged in, this wrapper only passes bytes on, for as long as the connection
        lasts: let every read and write skip it. Instance attributes shadow the methods,
        so the socket calls the SSH protocol's C{dataReceived} and the SSH protocol the
        socket's C{write} directly: on a keystroke's path each frame is paid cold after
        every pause (bench/RESULTS.md, "Echo latency (session 7)"). The connection's loss,
        close and addresses still go through the wrapper, and its bookkeeping with them.
        """
        self.dataReceived = self.wrappedProtocol.dataReceived  # type: ignore[method-assign]
        self.write = self.transport.write  # type: ignore[method-assign]
        self.writeSequence = self.transport.writeSequence  # type: ignore[method-assign]

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _keep(self, data: bytes) -> bool:
        """Keep bytes that came before the SSH protocol exists; C{False} if too many."""
        self._buffered.append(data)
        self._bufferedBytes += len(data)
        return self._bufferedBytes <= MAX_WAITING_BYTES

    def _versionLine(self) -> bytes | None:
        """The version line received so far, if whole; C{b""} if there cannot be one."""
        head = b"".join(self._buffered)[:MAX_VERSION_LINE]
        end = head.find(b"\n")
        if end >= 0:
            return head[:end].rstrip(b"\r")
        return b"" if len(head) >= MAX_VERSION_LINE else None

    # -- the wrapped protocol's transport

    def write(self, data: bytes) -> None:
        # The success message is written right after Conch records the avatar.
        self._check()
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self._check()
        super().writeSequence(data)

    # -- the wrapped protocol

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _HELLO:
            # At most a version line's worth is kept before the connection is classified;
            # the bound on waiting connections applies from then on.
            self._keep(data)
            line = self._versionLine()
            if line is not None:
                self._cancelTimer()
                self.factory._classified(
                    self, AGENTS if not line or self.factory.isAgentVersion(line) else OPERATORS
                )
                if self.state == _WAITING and self._bufferedBytes > MAX_WAITING_BYTES:
                    self._buffered = []
                    self._abort()
            return
        if state == _WAITING:
            # Read should be paused; a transport that cannot pause has its data kept.
            if not self._keep(data):
                self._buffered = []
                self._abort()
            return
        if state in (_PENDING, _DONE):
            self.wrappedProtocol.dataReceived(data)
            self._check()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        state = self.state
        if state == _LOST:
            return
        self.state = _LOST
        self._cancelTimer()
        self._buffered = []
        self.factory.unregisterProtocol(self)
        if state == _HELLO:
            self.factory._unhello(self)
            self.factory._pump()
        elif state == _WAITING:
            self.factory._forget(self)
        elif state == _PENDING:
            self.factory._release(self)
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)
        # The shortcuts of _stepAside (bound methods of the SSH protocol, which holds
        # this wrapper as its transport): without them nothing cyclic is left to free.
        for name in ("dataReceived", "write", "writeSequence"):
            vars(self).pop(name, None)


class _Pool:
    """
    The handshake slots of one kind of connection (agents or operators) and the queues of
    those waiting for one.
    """

    def __init__(self, name: str, size: int, perSource: int, lender: _Pool | None = None) -> None:
        self.name = name
        self.size = size
        self.perSource = perSource
        #: The pool whose idle slots this one may borrow (the agents': the operators').
        self.lender = lender
        #: Slots this pool keeps free of borrowers (by default all: it lends none).
        self.floor = size
        #: Handshakes of this kind in progress, on this pool's slots or borrowed ones.
        self.pending = 0
        #: Of those, on slots borrowed from the lender.
        self.borrowed = 0
        #: This pool's slots lent to a borrower's handshakes now.
        self.lent = 0
        self.waiting = 0
        self._perSource: Counter[str] = Counter()
        #: Waiting connections by source, oldest first; the order of sources is the round.
        self._queues: OrderedDict[str, deque[_Limited]] = OrderedDict()
        #: Connections that were alone from their source when they arrived.
        self._fresh: deque[_Limited] = deque()
        #: Sources with connections waiting and (when noted) no handshake in progress.
        self._quiet: deque[str] = deque()

    @property
    def inUse(self) -> int:
        """This pool's slots taken: by its own handshakes and by those it lent them to."""
        return self.pending - self.borrowed + self.lent

    @property
    def full(self) -> bool:
        """Every slot of this pool is taken (whether more could be borrowed or not)."""
        return self.inUse >= self.size

    @property
    def canLend(self) -> bool:
        """Lending one more slot would still leave C{floor} of them free."""
        return self.inUse + self.floor < self.size

    @property
    def hasRoom(self) -> bool:
        """A handshake of this kind could start now, on a slot of its own or a borrowed one."""
        return not self.full or (self.lender is not None and self.lender.canLend)

    def canStart(self, source: str) -> bool:
        return self.hasRoom and self._perSource[source] < self.perSource

    def waitingFrom(self, source: str) -> int:
        queue = self._queues.get(source)
        return len(queue) if queue is not None else 0

    def start(self, conn: _Limited) -> None:
        """C{conn} takes a slot: one of this pool's if any is free, else a borrowed one."""
        if self.full:
            assert self.lender is not None and self.lender.canLend
            conn.borrowed = True
            self.borrowed += 1
            self.lender.lent += 1
        self.pending += 1
        self._perSource[conn.source] += 1

    def enqueue(self, conn: _Limited) -> None:
        source = conn.source
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = deque()
        if not queue and self._perSource[source] == 0:
            self._fresh.append(conn)
        queue.append(conn)
        self.waiting += 1

    def release(self, conn: _Limited) -> None:
        """A handshake ended: authenticated, or the connection went away."""
        source = conn.source
        self.pending -= 1
        if conn.borrowed:
            # The slot goes back to the pool it came from.
            assert self.lender is not None
            conn.borrowed = False
            self.borrowed -= 1
            self.lender.lent -= 1
        self._perSource[source] -= 1
        if self._perSource[source] <= 0:
            del self._perSource[source]
            if source in self._queues:
                self._quiet.append(source)

    def forget(self, conn: _Limited) -> None:
        """A waiting connection went away before its turn."""
        self._unqueue(conn)
        if conn.source in self._queues and self._perSource[conn.source] == 0:
            self._quiet.append(conn.source)

    def _unqueue(self, conn: _Limited) -> None:
        queue = self._queues[conn.source]
        queue.remove(conn)
        if not queue:
            del self._queues[conn.source]
        self.waiting -= 1

    def _takeFirst(self, source: str) -> _Limited:
        conn = self._queues[source][0]
        self._unqueue(conn)  # found at once: it is first in its queue
        return conn

    def next(self) -> _Limited | None:
        """The waiting connection that gets the next free slot, taken out of the queues."""
        if not self.hasRoom:
            return None
        while self._fresh:
            conn = self._fresh.popleft()
            if conn.state == _WAITING and self._perSource[conn.source] < self.perSource:
                self._unqueue(conn)
                return conn
        while self._quiet:
            source = self._quiet.popleft()
            if source in self._queues and self._perSource[source] == 0:
                return self._takeFirst(source)
        # Round robin over sources with handshakes in progress but below their bound.
        # Sources at their bound are skipped; there are at most size/perSource.
        for _ in range(len(self._queues)):
            source = next(iter(self._queues))
            self._queues.move_to_end(source)
            if self._perSource[source] < self.perSource:
                return self._takeFirst(source)
        return None


class HandshakeLimiter(WrappingFactory):
    """
    Wrap an SSH server factory; let at most C{maxPending} connections that have not yet
    authenticated run their handshake at once, C{operatorReserve} of those slots for
    operators (agents borrow idle ones, all but C{operatorFloor}), at most
    C{maxPerSource} from one address; hold the others until a slot frees (see the module
    docstring).

    Apply it innermost (around the SSH factory, inside TLS and WebSocket), and share one
    instance between all listeners so the bound is for the whole server. It finds the
    listening ports to pause from the connections they deliver.

    @ivar pending: handshakes in progress.
    @ivar waiting: accepted connections not yet started: awaiting their version line or
        waiting for a slot.
    @ivar pools: the agents' and operators' L{_Pool}s by name.
    @ivar refused: connections closed since the limiter last had room (one log line per
        episode).
    @ivar queued: connections that had to wait, in the same episode.
    @ivar refusedConnections: connections closed at accept since the server started (its
        source over its caps, or the waiting room full), for metrics.
    @ivar helloing: connections awaiting their version line now.
    """

    protocol = _Limited  # type: ignore[assignment]
    noisy = False
    _log = Logger()

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        maxPending: int = DEFAULT_MAX_PENDING,
        maxPerSource: int = DEFAULT_MAX_PER_SOURCE,
        isAuthenticated: Callable[[Any], bool] = _hasAvatar,
        maxWaiting: int = DEFAULT_MAX_WAITING,
        maxWaitingPerSource: int = DEFAULT_MAX_WAITING_PER_SOURCE,
        handshakeTimeout: float | None = None,
        clock: IReactorTime | None = None,
        operatorReserve: int | None = None,
        versionTimeout: float = DEFAULT_VERSION_TIMEOUT,
        isAgentVersion: Callable[[bytes], bool] = isAgentVersion,
        operatorFloor: int | None = None,
    ) -> None:
        super().__init__(wrappedFactory)
        if maxPending < 1 or maxPerSource < 1:
            raise ValueError("limits must be at least 1")
        if maxWaiting < 0 or maxWaitingPerSource < 0:
            raise ValueError("waiting limits must not be negative")
        if operatorReserve is None:
            operatorReserve = defaultOperatorReserve(maxPending)
        if not 0 <= operatorReserve < maxPending:
            raise ValueError("the operator reserve must leave at least one slot for agents")
        if operatorFloor is None:
            operatorFloor = defaultOperatorFloor(operatorReserve)
        if not 0 <= operatorFloor <= operatorReserve:
            raise ValueError("the operators' floor must be within their reserve")
        self.maxPending = maxPending
        self.maxPerSource = maxPerSource
        self.maxWaiting = maxWaiting
        self.maxWaitingPerSource = maxWaitingPerSource
        self.operatorReserve = operatorReserve
        self.operatorFloor = operatorFloor
        self.versionTimeout = versionTimeout
        self.isAgentVersion = isAgentVersion
        if handshakeTimeout is None:
            grace = getattr(getattr(wrappedFactory, "settings", None), "loginGraceTime", None)
            handshakeTimeout = (
                DEFAULT_HANDSHAKE_TIMEOUT
                if not isinstance(grace, (int, float))
                else grace + HANDSHAKE_TIMEOUT_MARGIN
            )
        self.handshakeTimeout = handshakeTimeout
        self._clockGiven = clock
        self._isAuthenticated = isAuthenticated
        self.operators = _Pool(
            OPERATORS, operatorReserve, operatorShare(maxPerSource, operatorReserve)
        )
        self.operators.floor = operatorFloor
        self.agents = _Pool(
            AGENTS, maxPending - operatorReserve, maxPerSource, lender=self.operators
        )
        self.pools = {AGENTS: self.agents, OPERATORS: self.operators}
        self.waiting = 0
        #: Connections awaiting their version line, by source, and all of them in arrival order.
        self._hello: Counter[str] = Counter()
        self._helloing: OrderedDict[_Limited, None] = OrderedDict()
        self._ports: set[Any] = set()
        self.paused = False
        #: Times the listening ports were paused (for tests and logs).
        self.pauses = 0
        self._pumping = False
        self._pumpAgain = False
        # One log line when an episode of waiting or refusing starts, one when it ends.
        self._episode = False
        self.refused = 0
        self.refusedConnections = 0
        self.queued = 0
        self._mostWaiting = 0
        self._longestWait = 0.0

    @property
    def pending(self) -> int:
        return self.agents.pending + self.operators.pending

    @property
    def helloing(self) -> int:
        return len(self._helloing)

    # -- time

    def _clock(self) -> Any:
        clock = self._clockGiven or getattr(self.wrappedFactory, "clock", None)
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._clockGiven = clock
        return clock

    def _now(self) -> float:
        """
        The time to measure waits with: the monotonic clock beside a reactor that times with
        the wall clock (groundcontrol's), so a step of the clock is not a wait of its size.
        """
        return elapsedClock(self._clock())()

    # -- protocol building

    def buildProtocol(self, addr: Any) -> _Limited:
        return _Limited(self, addr)

    # -- admission

    def _arrived(self, conn: _Limited) -> None:
        port = _listeningPort(conn.transport)
        if port is not None and port not in self._ports:
            self._ports.add(port)
            if self.paused:
                port.stopReading()
        if not self.operatorReserve or (
            self.agents.canStart(conn.source) and not self.agents.waiting
        ):
            # No agent waits for a slot: which pool this one belongs to makes no one wait,
            # so it starts at once, as an agent (a client that waits for the server's
            # version line before it sends its own, as ssh-keyscan does, is not held).
            self._admit(conn, self.agents)
        elif self._hello[conn.source] >= self.maxPerSource + self.maxWaitingPerSource:
            self._refuse(conn)
        else:
            self._hello[conn.source] += 1
            self._helloing[conn] = None
            self._held(+1)
            conn._hello()
        self._updatePorts()

    def _classified(self, conn: _Limited, pool: str) -> None:
        """C{conn}'s version line (or its deadline) came: it may start, or wait, in C{pool}."""
        self._unhello(conn)
        self._admit(conn, self.pools[pool])
        self._pump()

    def _unhello(self, conn: _Limited) -> None:
        self._helloing.pop(conn, None)
        source = conn.source
        self._hello[source] -= 1
        if self._hello[source] <= 0:
            del self._hello[source]
        self._held(-1)

    def _admit(self, conn: _Limited, pool: _Pool) -> None:
        conn.pool = pool
        source = conn.source
        if pool.canStart(source):
            # Nothing that could start is waiting in this pool (a freed slot always goes to
            # a waiter), so this one jumps no queue.
            self._start(conn)
            return
        self._startEpisode()
        roomFull = not pool.hasRoom and self.waiting >= self.maxWaiting and not self.paused
        if pool.waitingFrom(source) >= self.maxWaitingPerSource or roomFull:
            # (With the ports paused, only connections accepted together with the one that
            # filled the room arrive: those few wait.)
            self._refuse(conn)
            return
        pool.enqueue(conn)
        self._held(+1)
        self.queued += 1
        conn._wait()

    def _held(self, delta: int) -> None:
        self.waiting += delta
        self._mostWaiting = max(self._mostWaiting, self.waiting)

    def _refuse(self, conn: _Limited) -> None:
        self._startEpisode()
        self.refused += 1
        self.refusedConnections += 1
        conn._refuse()

    def _start(self, conn: _Limited) -> None:
        assert conn.pool is not None
        conn.pool.start(conn)
        conn._begin()

    def _startEpisode(self) -> None:
        if not self._episode:
            self._episode = True
            self._log.warn(
                "handshake limit reached ({pending} in progress); new connections wait their turn",
                pending=self.pending,
            )

    def _release(self, conn: _Limited) -> None:
        """A handshake ended: authenticated, or the connection went away."""
        assert conn.pool is not None
        conn.pool.release(conn)
        self._pump()

    def _forget(self, conn: _Limited) -> None:
        """A waiting connection went away before its turn."""
        assert conn.pool is not None
        conn.pool.forget(conn)
        self._held(-1)
        self._pump()

    def _pump(self) -> None:
        """Give free slots to waiting connections; pause or resume the ports to match."""
        if self._pumping:
            self._pumpAgain = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._pumpAgain = False
                for pool in (self.operators, self.agents):
                    while (conn := pool.next()) is not None:
                        self._held(-1)
                        self._longestWait = max(self._longestWait, self._now() - conn.waitingSince)
                        self._start(conn)
                self._startUnread()
                again = self._pumpAgain
        finally:
            self._pumping = False
        self._updatePorts()
        if self._episode and not self.waiting and not self._full():
            self._log.info(
                "handshakes below the limit again; {refused} connections were refused, "
                "{queued} waited (at most {most} at once, the longest {longest:.1f} s)",
                refused=self.refused,
                queued=self.queued,
                most=self._mostWaiting,
                longest=self._longestWait,
            )
            self._episode = False
            self.refused = self.queued = self._mostWaiting = 0
            self._longestWait = 0.0

    def _startUnread(self) -> None:
        """
        Start, unread, connections still awaiting their version line that could now start
        as agents with no agent waiting: the rule L{_arrived} applies to a new connection.
        Without it a client that waits for the server's line before it sends its own (as
        ssh-keyscan does) sat out its C{versionTimeout} next to a free slot.
        """
        if not self._helloing or self.agents.waiting:
            return
        for conn in list(self._helloing):
            if self.agents.waiting or not self.agents.hasRoom:
                return
            if conn.state == _HELLO and self.agents.canStart(conn.source):
                conn._cancelTimer()
                self._classified(conn, AGENTS)

    def _full(self) -> bool:
        """No new connection could start: every pool is at its bound."""
        return not self.agents.hasRoom and self.operators.full

    # -- the listening ports

    def _updatePorts(self) -> None:
        full = self._full() and self.waiting >= self.maxWaiting
        if full and not self.paused:
            self.paused = True
            self.pauses += 1
            for port in list(self._ports):
                if self._listening(port):
                    port.stopReading()
        elif not full and self.paused:
            self.paused = False
            for port in list(self._ports):
                if self._listening(port):
                    port.startReading()

    def _listening(self, port: Any) -> bool:
        if getattr(port, "disconnecting", False) or not getattr(port, "connected", True):
            self._ports.discard(port)
            return False
        return True

    def __getattr__(self, name: str) -> Any:
        # Settings, clock, portal...: whoever holds this factory may ask the SSH factory.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.wrappedFactory, name)
