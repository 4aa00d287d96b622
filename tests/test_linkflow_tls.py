"""
Tests for accesstunnel.linkflow over TLS, in memory: a link whose socket is under TLS
closes when asked to, with the link's back-pressure attached.

Twisted's TLS (C{TLSMemoryBIOProtocol.loseConnection}) sends no close alert, and so never
closes, while a producer is registered with it. L{LinkFlow} registered there, a stopping
agent linked over tls:// waited for its link to close forever (SIGTERM, then systemd's
SIGKILL 90 s later).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.connection import TunnelConnection
from accesstunnel.linkflow import LinkFlow
from accesstunnel.transports.tls import ServerTLS
from tests.test_transports_tls import Fixture, Receiver, Sender, connectedPair


class _SSHTransport:
    """Stands for the link's SSH transport: all LinkFlow.attach reads is its transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport


class LinkOverTLSTests(SynchronousTestCase):
    """LinkFlow on an agent's link under TLS."""

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        fixture = Fixture(directory)
        client, _ = fixture.device()
        server = ServerTLS(fixture.serverCert, fixture.serverKey, fixture.caFile)
        self.clientTLS, self.serverTLS, self.pump = connectedPair(server, "gc.test", client)
        self.conn = TunnelConnection()
        self.conn.transport = _SSHTransport(self.clientTLS)
        self.flow = LinkFlow.attach(self.conn)

    def test_registersUnderTLS(self) -> None:
        """The back-pressure comes from the layer under TLS, which TLS writes through to."""
        assert self.flow is not None
        self.assertIsNone(self.clientTLS._producer)
        self.assertIs(self.clientTLS.transport.producer, self.flow)

    def test_closeCompletes(self) -> None:
        """
        The agent closes its link (as it does when it stops): TLS sends its close alert,
        the server answers, and both ends see the connection lost.
        """
        self.clientTLS.loseConnection()
        self.pump.flush()
        [receiver] = Receiver.instances
        self.assertEqual(len(receiver.lost), 1)
        self.assertEqual(len(Sender.lost), 1)

    def test_closeWhilePausedCompletes(self) -> None:
        """
        Closed while the socket under TLS had paused the link: the close still completes,
        and the link lets go of its waiting channels' place in line.
        """
        assert self.flow is not None
        self.clientTLS.transport.producer.pauseProducing()
        self.assertTrue(self.flow.paused)
        self.clientTLS.loseConnection()
        self.pump.flush()
        [receiver] = Receiver.instances
        self.assertEqual(len(receiver.lost), 1)
        self.assertEqual(len(Sender.lost), 1)
