"""Global requests may be answered later, and the replies keep the requests' order."""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import common, connection
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.connection import TunnelConnection


class _Recorder:
    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.packets.append((messageType, payload))


class _Connection(TunnelConnection):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[bytes, defer.Deferred[Any]] = {}

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        if requestType == b"slow":
            self.pending[requestType] = defer.Deferred()
            return self.pending[requestType]
        if requestType == b"data":
            return 1, b"answer"
        return 0


def request(name: bytes, wantReply: bool = True) -> bytes:
    return common.NS(name) + (b"\x01" if wantReply else b"\x00")


class GlobalRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.conn = _Connection()
        self.conn.transport = _Recorder()  # type: ignore[assignment]

    def test_laterReplyKeepsOrder(self) -> None:
        """A quick request behind a slow one is answered after it, not before."""
        self.conn.ssh_GLOBAL_REQUEST(request(b"slow"))
        self.conn.ssh_GLOBAL_REQUEST(request(b"unknown"))
        self.assertEqual(self.conn.transport.packets, [])  # type: ignore[attr-defined]
        self.conn.pending[b"slow"].callback((1, b"late"))
        self.assertEqual(
            self.conn.transport.packets,  # type: ignore[attr-defined]
            [(connection.MSG_REQUEST_SUCCESS, b"late"), (connection.MSG_REQUEST_FAILURE, b"")],
        )

    def test_replyData(self) -> None:
        """A (1, data) result is a success carrying that data."""
        self.conn.ssh_GLOBAL_REQUEST(request(b"data"))
        self.assertEqual(
            self.conn.transport.packets,  # type: ignore[attr-defined]
            [(connection.MSG_REQUEST_SUCCESS, b"answer")],
        )

    def test_noReplyWanted(self) -> None:
        """Without want-reply nothing is sent, even for an unknown request."""
        self.conn.ssh_GLOBAL_REQUEST(request(b"unknown", wantReply=False))
        self.assertEqual(self.conn.transport.packets, [])  # type: ignore[attr-defined]

    def test_failureIsARefusal(self) -> None:
        """A handler that fails is answered with REQUEST_FAILURE, not silence."""
        self.conn.ssh_GLOBAL_REQUEST(request(b"slow"))
        self.conn.pending[b"slow"].errback(RuntimeError("boom"))
        self.assertEqual(
            self.conn.transport.packets,  # type: ignore[attr-defined]
            [(connection.MSG_REQUEST_FAILURE, b"")],
        )
        self.flushLoggedErrors(RuntimeError)
