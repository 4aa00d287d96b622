"""
The webhook's HTTP connection pool: keeps a connection only when the receiver keeps it too.

A persistent pool saves a TCP (and TLS) handshake per POST when fleet events come in bursts
(a server restart brings thousands of C{device.online}). Twisted's pool puts every connection
back once its response has ended, whatever the response said about the connection
(twisted/twisted#7843): an HTTP/1.0 answer without C{Connection: keep-alive} means the
receiver closes after it (Python's C{http.server} does, as do small webhook bridges), and a
POST sent on such a connection before its close is seen fails with C{ConnectionDone} and
waits a backoff to be retried (a burst of 300 events to such a receiver lost 3 attempts so,
measured). L{WebhookConnectionPool} closes those connections instead of keeping them, and
keeps an idle one only for L{IDLE_CONNECTION_KEPT} seconds, less than the idle timeouts of
the common servers (5 s for Node.js and Apache), so that a POST rarely crosses the
receiver's close of an idle connection on the wire.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

__all__ = ["IDLE_CONNECTION_KEPT", "WebhookConnectionPool", "keepsConnection"]

#: Seconds an idle connection to the receiver is kept for the next event.
IDLE_CONNECTION_KEPT = 4


def keepsConnection(version: tuple[bytes, int, int], connectionHeader: list[bytes]) -> bool:
    """
    Whether a response lets the client send another request on its connection (RFC 9112
    section 9.3): HTTP/1.1 and later unless it says C{close}; HTTP/1.0 only if it says
    C{keep-alive}.
    """
    tokens = {t.strip().lower() for value in connectionHeader for t in value.split(b",")}
    if b"close" in tokens:
        return False
    return version[1:] >= (1, 1) or b"keep-alive" in tokens


class WebhookConnectionPool(HTTPConnectionPool):
    """
    L{HTTPConnectionPool} that does not keep a connection its receiver will close
    (module docstring).
    """

    log = Logger()

    def __init__(self, reactor: Any, maxPerReceiver: int) -> None:
        super().__init__(reactor, persistent=True)
        self.maxPersistentPerHost = maxPerReceiver
        self.cachedConnectionTimeout = IDLE_CONNECTION_KEPT

    def _putConnection(self, key: Any, connection: Any) -> None:
        # Called by the connection as its response ends, before it lets go of its parser:
        # the response's version and Connection header are still there to read.
        response = getattr(getattr(connection, "_parser", None), "response", None)
        if response is not None:
            header = connection._parser.connHeaders.getRawHeaders(b"connection", [])
            if not keepsConnection(response.version, header):
                connection.transport.loseConnection()
                return
        super()._putConnection(key, connection)
