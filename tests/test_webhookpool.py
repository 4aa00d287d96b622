"""
groundcontrol.webhookpool: the webhook's connection pool keeps a connection only when the
receiver's answer lets it, and an idle one only briefly. In memory: Twisted's own Agent on a
L{MemoryReactorClock}, each connection a L{StringTransport} the test answers on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent

from groundcontrol.webhookpool import IDLE_CONNECTION_KEPT, WebhookConnectionPool, keepsConnection

URL = b"http://127.0.0.1:8080/hook"


class KeepsConnectionTests(SynchronousTestCase):
    """L{keepsConnection}: RFC 9112's persistence rules."""

    def test_http11KeptUnlessClose(self) -> None:
        self.assertTrue(keepsConnection((b"HTTP", 1, 1), []))
        self.assertFalse(keepsConnection((b"HTTP", 1, 1), [b"close"]))
        self.assertFalse(keepsConnection((b"HTTP", 1, 1), [b"Upgrade, Close"]))

    def test_http10ClosedUnlessKeepAlive(self) -> None:
        self.assertFalse(keepsConnection((b"HTTP", 1, 0), []))
        self.assertTrue(keepsConnection((b"HTTP", 1, 0), [b"Keep-Alive"]))
        self.assertFalse(keepsConnection((b"HTTP", 1, 0), [b"keep-alive, close"]))


class WebhookConnectionPoolTests(SynchronousTestCase):
    """Requests through an Agent on the pool, answered by the test."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = WebhookConnectionPool(self.reactor, maxPerReceiver=4)
        self.agent: Any = Agent(self.reactor, pool=self.pool)
        self.transports: list[StringTransport] = []

    def request(self) -> Any:
        """POST; the transport the request went out on, and the response's Deferred."""
        answered = self.agent.request(b"POST", URL)
        self.reactor.advance(0)  # the endpoint's name resolution (an IP literal)
        connections = len(self.transports)
        if len(self.reactor.tcpClients) > connections:
            factory = self.reactor.tcpClients[connections][2]
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            transport.protocol = protocol
            protocol.makeConnection(transport)
            self.transports.append(transport)
        return answered

    def answer(self, transport: StringTransport, response: bytes) -> None:
        transport.clear()
        transport.protocol.dataReceived(response)

    def test_http10AnswerClosesTheConnection(self) -> None:
        """
        After an HTTP/1.0 answer without keep-alive the connection is closed, not kept, and
        the next POST opens a new one. Twisted's own pool keeps it (twisted/twisted#7843).
        """
        answered = self.request()
        self.answer(self.transports[0], b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(answered).code, 200)
        self.assertTrue(self.transports[0].disconnecting)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_http10KeepAliveIsKept(self) -> None:
        """An HTTP/1.0 answer that says keep-alive leaves the connection for the next POST."""
        answered = self.request()
        self.answer(
            self.transports[0],
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        )
        self.successResultOf(answered)
        self.assertFalse(self.transports[0].disconnecting)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(self.transports[0].value().startswith(b"POST /hook HTTP/1.1\r\n"))

    def test_http11IsKeptBriefly(self) -> None:
        """
        An HTTP/1.1 answer leaves the connection for the next POST, for
        L{IDLE_CONNECTION_KEPT} seconds of idleness: then it is closed.
        """
        self.request()
        self.answer(self.transports[0], b"HTTP/1.1 204 No Content\r\n\r\n")
        self.reactor.advance(IDLE_CONNECTION_KEPT - 0.1)
        self.assertFalse(self.transports[0].disconnecting)
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.answer(self.transports[0], b"HTTP/1.1 204 No Content\r\n\r\n")
        self.reactor.advance(IDLE_CONNECTION_KEPT)
        self.assertTrue(self.transports[0].disconnecting)

    def test_http11CloseIsClosed(self) -> None:
        """An HTTP/1.1 answer that says close: a new connection for the next POST."""
        self.request()
        self.answer(self.transports[0], b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)
