"""
groundcontrol answers OpenSSH's transport-level ping (ping@openssh.com) as sshd does, so a
9.5+ client sends the chaff that hides an operator's keystroke timing (groundcontrol.pingreply).
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import common, transport
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.pingreply import MSG_PING, MSG_PONG
from groundcontrol.testing import FakeOperator, InMemoryFleet


def recordAnswers(client: Any) -> list[tuple[int, bytes]]:
    """
    The PONGs and UNIMPLEMENTEDs C{client} (a Conch client transport) receives from now
    on; a PONG goes no further (Conch's connection service would answer it UNIMPLEMENTED).
    """
    answers: list[tuple[int, bytes]] = []
    dispatch = client.dispatchMessage

    def record(messageNum: int, payload: bytes) -> None:
        if messageNum in (MSG_PONG, transport.MSG_UNIMPLEMENTED):
            answers.append((messageNum, payload))
        if messageNum != MSG_PONG:
            dispatch(messageNum, payload)

    client.dispatchMessage = record
    return answers


class _PingBeforeLogin(FakeOperator.protocol):  # type: ignore[name-defined,misc]
    """An operator's client that pings once its keys are in use, before it logs in."""

    def connectionSecure(self) -> None:
        if self.service is None:
            self.factory.answers = recordAnswers(self)
            self.sendPacket(MSG_PING, common.NS(b"early"))
        super().connectionSecure()


class PingReplyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.key = self.fleet.addOperator("alice", admin=True)

    def login(self) -> tuple[FakeOperator, Any, Any]:
        """alice logged in: her factory, her client transport and groundcontrol's."""
        operator = FakeOperator("alice", self.key, hostKey=self.fleet.hostKey)
        pump = self.fleet.connect(operator)
        self.assertIsNotNone(operator.connection)
        return operator, pump.client, pump.server

    def test_extensionAdvertised(self) -> None:
        """The EXT_INFO a client gets names ping@openssh.com (version 0) besides server-sig-algs."""
        _, client, _ = self.login()
        self.assertEqual(client.peerExtensions.get(b"ping@openssh.com"), b"0")
        self.assertIn(b"server-sig-algs", client.peerExtensions)

    def test_pingAnsweredWithItsData(self) -> None:
        """A logged-in peer's PING is answered by a PONG carrying the same data, in order."""
        operator, client, _ = self.login()
        answers = recordAnswers(client)
        client.sendPacket(MSG_PING, common.NS(b"PING!"))
        client.sendPacket(MSG_PING, common.NS(b""))
        self.fleet.flush()
        self.assertEqual(answers, [(MSG_PONG, common.NS(b"PING!")), (MSG_PONG, common.NS(b""))])
        self.assertFalse(operator.lost)

    def test_pongIgnored(self) -> None:
        """A PONG (groundcontrol sends no pings) is neither answered nor an error."""
        operator, client, _ = self.login()
        answers = recordAnswers(client)
        client.sendPacket(MSG_PONG, common.NS(b"stray"))
        self.fleet.flush()
        self.assertEqual(answers, [])
        self.assertFalse(operator.lost)

    def test_noAnswerBeforeLogin(self) -> None:
        """A PING before login goes unanswered (sshd's rule); the login goes on."""
        operator = FakeOperator("alice", self.key, hostKey=self.fleet.hostKey)
        operator.protocol = _PingBeforeLogin
        self.fleet.connect(operator)
        self.assertIsNotNone(operator.connection)
        self.assertEqual(operator.answers, [])  # type: ignore[attr-defined]

    def test_noAnswerDuringKeyExchange(self) -> None:
        """
        A PING that arrives while keys are being re-exchanged is dropped, not queued for
        after it (sshd's rule: a peer that never ends an exchange piles nothing up); the
        next one, after the exchange, is answered.
        """
        _, client, server = self.login()
        answers = recordAnswers(client)
        server.sendKexInit()
        server.dispatchMessage(MSG_PING, common.NS(b"during"))
        self.fleet.flush()
        self.assertEqual(server._keyExchangeState, server._KEY_EXCHANGE_NONE)
        self.assertEqual(answers, [])
        client.sendPacket(MSG_PING, common.NS(b"after"))
        self.fleet.flush()
        self.assertEqual(answers, [(MSG_PONG, common.NS(b"after"))])

    def test_malformedPingEndsTheConnection(self) -> None:
        """A PING whose string says more bytes than it holds ends the connection as malformed."""
        operator, client, _ = self.login()
        client.sendPacket(MSG_PING, b"\x00\x00\x00\x64short")
        self.fleet.flush()
        self.assertTrue(operator.lost)
        self.assertEqual(operator.disconnectReason, "malformed message")
