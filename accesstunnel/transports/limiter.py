"""
A bound on concurrent unauthenticated SSH handshakes, so a reconnect storm (a whole fleet
coming back after a server restart) cannot starve agents and operators already logged in.

Key exchange and signature checks cost CPU; thousands at once would delay every packet of
the live sessions on the same reactor. Like OpenSSH's C{MaxStartups}, connections beyond the
bound are closed at once; agents retry with jittered backoff (L{agent.link.backoffPolicy}),
which spreads them out. Authenticated connections do not count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

__all__ = ["HandshakeLimiter"]

DEFAULT_MAX_PENDING = 64
DEFAULT_MAX_PER_SOURCE = 16


def _hasAvatar(protocol: Any) -> bool:
    """Conch sets C{transport.avatar} the moment authentication succeeds."""
    return getattr(protocol, "avatar", None) is not None


def _source(transport: Any) -> str:
    peer = transport.getPeer()
    peer = getattr(peer, "address", peer)
    return str(getattr(peer, "host", peer))


class _Limited(ProtocolWrapper):
    """Counts its connection as pending until the wrapped protocol has authenticated."""

    factory: HandshakeLimiter
    _pending = False
    _refused = False

    def makeConnection(self, transport: Any) -> None:
        source = _source(transport)
        if not self.factory._admit(source):
            self._refused = True
            self.transport = transport
            transport.loseConnection()
            return
        self._pending = True
        self._sourceKey = source
        super().makeConnection(transport)

    def _check(self) -> None:
        if self._pending and self.factory._isAuthenticated(self.wrappedProtocol):
            self._pending = False
            self.factory._release(self._sourceKey)

    def write(self, data: bytes) -> None:
        # The success message is written right after Conch records the avatar.
        self._check()
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self._check()
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().dataReceived(data)
        self._check()

    def connectionLost(self, reason: Failure) -> None:
        if self._refused:
            return
        if self._pending:
            self._pending = False
            self.factory._release(self._sourceKey)
        super().connectionLost(reason)


class HandshakeLimiter(WrappingFactory):
    """
    Wrap an SSH server factory; admit at most C{maxPending} connections that have not yet
    authenticated, and at most C{maxPerSource} of them from one address.

    Apply it innermost (around the SSH factory, inside TLS and WebSocket), and share one
    instance between all listeners so the bound is for the whole server.
    """

    protocol = _Limited
    noisy = False
    _log = Logger()

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        maxPending: int = DEFAULT_MAX_PENDING,
        maxPerSource: int = DEFAULT_MAX_PER_SOURCE,
        isAuthenticated: Callable[[Any], bool] = _hasAvatar,
    ) -> None:
        super().__init__(wrappedFactory)
        if maxPending < 1 or maxPerSource < 1:
            raise ValueError("limits must be at least 1")
        self.maxPending = maxPending
        self.maxPerSource = maxPerSource
        self._isAuthenticated = isAuthenticated
        self.pending = 0
        self._perSource: Counter[str] = Counter()
        #: Connections refused since the limiter last had room (logged once per episode).
        self.refused = 0

    def _admit(self, source: str) -> bool:
        if self.pending >= self.maxPending or self._perSource[source] >= self.maxPerSource:
            if self.refused == 0:
                self._log.warn(
                    "too many handshakes in progress ({pending}); refusing new connections",
                    pending=self.pending,
                    source=source,
                )
            self.refused += 1
            return False
        self.pending += 1
        self._perSource[source] += 1
        return True

    def _release(self, source: str) -> None:
        self.pending -= 1
        self._perSource[source] -= 1
        if self._perSource[source] <= 0:
            del self._perSource[source]
        if self.refused and self.pending < self.maxPending:
            self._log.info(
                "handshakes below the limit again; {refused} connections were refused",
                refused=self.refused,
            )
            self.refused = 0

    def __getattr__(self, name: str) -> Any:
        # Settings, clock, portal...: whoever holds this factory may ask the SSH factory.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.wrappedFactory, name)
