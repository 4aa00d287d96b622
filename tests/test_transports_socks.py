"""
Tests for L{accesstunnel.transports.socks}: the SOCKS5 client the agent uses to reach
onion services through tor, in memory (a StringTransport stands for tor's SOCKS port).
"""

from __future__ import annotations

import struct

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.socks import SOCKS5Endpoint, SOCKSError
from accesstunnel.transports.tunnel import ProxyError
from tests.test_transports_proxy import FakeProxyEndpoint, Recorder

ONION = "7saugtmhnngo6ok5twqnw5jzspxszabgraw6mw75y3nnnea3go3q6cid.onion"
GREETING = b"\x05\x01\x00"
CONNECT = b"\x05\x01\x00\x03" + bytes([len(ONION)]) + ONION.encode() + struct.pack(">H", 2222)
CHOSEN = b"\x05\x00"
SUCCESS_IPV4 = b"\x05\x00\x00\x01" + b"\x00" * 6
SERVER_OPENING = b"SSH-2.0-AccessTunnel\r\n\x00\x00\x01\x2c\x0a\x14kexinit..."


class SOCKS5Tests(SynchronousTestCase):
    """The greeting, the CONNECT, tor's replies, and the hand-over to the link protocol."""

    def setUp(self) -> None:
        self.proxyEndpoint = FakeProxyEndpoint()
        self.endpoint = SOCKS5Endpoint(self.proxyEndpoint, ONION, 2222)
        self.d = self.endpoint.connect(Factory.forProtocol(Recorder))
        [self.transport] = self.proxyEndpoint.transports
        [self.socks] = self.proxyEndpoint.protocols

    def test_greetingThenConnectByName(self) -> None:
        """
        The client offers only "no authentication", and once chosen asks to CONNECT to the
        onion by name (address type 3): tor must see the name, no resolver may.
        """
        self.assertEqual(self.transport.value(), GREETING)
        self.transport.clear()
        self.socks.dataReceived(CHOSEN)
        self.assertEqual(self.transport.value(), CONNECT)
        self.assertNoResult(self.d)

    def test_serverBytesWithTheReplyDeliveredAtOnce(self) -> None:
        """
        The server's opening that arrives in the same read as tor's success reply reaches
        the link protocol at once. (txtorcon held it until the next read: an SSH link then
        hung until the server's login grace time, each attempt.)
        """
        self.socks.dataReceived(CHOSEN)
        self.socks.dataReceived(SUCCESS_IPV4 + SERVER_OPENING)
        protocol = self.successResultOf(self.d)
        self.assertIsInstance(protocol, Recorder)
        self.assertEqual(protocol.received, SERVER_OPENING)  # type: ignore[attr-defined]
        self.assertIs(protocol.transport, self.transport)
        self.socks.dataReceived(b"more")
        self.assertEqual(protocol.received, SERVER_OPENING + b"more")  # type: ignore[attr-defined]
        self.socks.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(protocol.lost), 1)  # type: ignore[attr-defined]

    def test_everythingInOneRead(self) -> None:
        """The method choice, the reply and the server's first bytes in one read."""
        self.socks.dataReceived(CHOSEN + SUCCESS_IPV4 + SERVER_OPENING)
        self.assertEqual(self.successResultOf(self.d).received, SERVER_OPENING)  # type: ignore[attr-defined]

    def test_replyByteByByte(self) -> None:
        """Answers split anywhere are put together; nothing is handed over early."""
        for byte in CHOSEN + SUCCESS_IPV4[:-1]:
            self.socks.dataReceived(bytes([byte]))
            self.assertNoResult(self.d)
        self.socks.dataReceived(SUCCESS_IPV4[-1:])
        self.assertEqual(self.successResultOf(self.d).received, b"")  # type: ignore[attr-defined]

    def test_otherAddressTypes(self) -> None:
        """A reply bound to an IPv6 address or a name is consumed to its exact length."""
        for bound in (b"\x04" + b"\x00" * 16 + b"\x00\x00", b"\x03\x04host\x00\x16"):
            self.setUp()
            self.socks.dataReceived(CHOSEN + b"\x05\x00\x00" + bound + b"SSH-")
            self.assertEqual(self.successResultOf(self.d).received, b"SSH-")  # type: ignore[attr-defined]

    def test_torOnionErrors(self) -> None:
        """
        Tor's onion reply codes fail the connect with a message an operator can act on and
        the code; the connection is dropped.
        """
        self.socks.dataReceived(CHOSEN + b"\x05\xf0\x00\x01" + b"\x00" * 6)
        failure = self.failureResultOf(self.d, SOCKSError)
        self.assertEqual(failure.value.code, 0xF0)
        self.assertIn("descriptor can not be found", str(failure.value))
        self.assertIn(ONION, str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_shortRefusal(self) -> None:
        """A refusal without the address part still fails at once, not when the server hangs up."""
        self.socks.dataReceived(CHOSEN + b"\x05\x05")
        self.assertEqual(self.failureResultOf(self.d, SOCKSError).value.code, 5)

    def test_authenticationWanted(self) -> None:
        """A server that wants a password (or none of our methods: 0xFF) is refused clearly."""
        self.socks.dataReceived(b"\x05\xff")
        self.assertIn("authentication", str(self.failureResultOf(self.d, SOCKSError).value))

    def test_notSOCKS5(self) -> None:
        """Something that is not a SOCKS5 server (an SSH server on the port) fails the connect."""
        self.socks.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.failureResultOf(self.d, SOCKSError)
        self.assertTrue(self.transport.disconnecting)

    def test_unknownAddressType(self) -> None:
        """A success reply with an address type SOCKS5 does not define fails the connect."""
        self.socks.dataReceived(CHOSEN + b"\x05\x00\x00\x09\x00\x00\x00\x00\x00\x00")
        self.failureResultOf(self.d, SOCKSError)

    def test_closedBeforeAnswer(self) -> None:
        """tor hanging up before answering fails the connect."""
        self.socks.dataReceived(CHOSEN)
        self.socks.connectionLost(Failure(ConnectionError("reset")))
        self.failureResultOf(self.d, ProxyError)

    def test_cancel(self) -> None:
        """Cancelling while tor builds circuits aborts the connection to its SOCKS port."""
        self.socks.dataReceived(CHOSEN)
        self.d.cancel()
        self.failureResultOf(self.d, defer.CancelledError)
        self.assertTrue(self.transport.disconnecting)

    def test_badTargets(self) -> None:
        """Names SOCKS5 cannot carry and impossible ports are refused before connecting."""
        with self.assertRaises(ValueError):
            SOCKS5Endpoint(self.proxyEndpoint, "a" * 256, 22)
        with self.assertRaises(ValueError):
            SOCKS5Endpoint(self.proxyEndpoint, ONION, 0)
