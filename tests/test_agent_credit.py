"""
The agent's channels whose bytes end at a consumer on the device (agent._flow.EndpointChannel)
let go of their window credit (agent._flow.InputCredit) however they end: closed, abandoned
before they opened, refused, or never sent because the link had gone. The credit refers back to
its channel, so a credit kept would be a reference cycle (the channel, its connection, a lost
link's transport; tests/test_agent_link_garbage.py runs the whole link). In memory: a recording
connection and a string transport, no reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from agent._flow import EndpointChannel, InputCredit
from agent.forward import AcceptedChannel, ForwardChannel, SpliceChannel
from agent.session import SessionChannel
from tests.test_agent_forwarding import FakeLink
from tests.test_agent_session import WINDOW, RecordingConnection, peerClosed


class NewKind(EndpointChannel):
    """A kind of endpoint channel with no close code of its own."""


def refersTo(credit: InputCredit, channel: Any) -> bool:
    return any(value is channel for value in vars(credit).values())


class EndpointChannelTests(SynchronousTestCase):
    """Every endpoint channel lets go of its credit at its end, with no code of its own."""

    def test_agentChannelsAreEndpointChannels(self) -> None:
        """The agent's session and splice channels are endpoint channels: they share this."""
        for kind in (SessionChannel, SpliceChannel, ForwardChannel, AcceptedChannel):
            self.assertTrue(issubclass(kind, EndpointChannel), kind)

    def test_closedLetsGo(self) -> None:
        """
        Closed, the channel's credit no longer refers to it, and credit the consumer gives
        afterwards goes to nobody: no window adjust for a closed channel.
        """
        conn = RecordingConnection()
        channel = conn.attach(NewKind(**WINDOW))
        credit = channel._credit
        self.assertTrue(refersTo(credit, channel))
        credit.pauseProducing()
        credit.received(1000)
        peerClosed(channel)
        self.assertFalse(refersTo(credit, channel))
        credit.resumeProducing()
        credit.received(1 << 20)
        self.assertEqual(conn.adjusted, 0)

    def test_abandonedLetsGo(self) -> None:
        """Abandoned before it opened (no close will come), the channel lets go too."""
        channel = NewKind(**WINDOW)
        credit = channel._credit
        channel.abandoned()
        self.assertFalse(refersTo(credit, channel))

    def acceptedChannel(self, conn: Any) -> tuple[AcceptedChannel, StringTransport]:
        """A channel the agent opens for a connection it accepted, on C{conn}."""
        channel = AcceptedChannel(b"forwarded-tcpip", b"payload", conn=conn, **WINDOW)
        transport = StringTransport()
        channel.tcpConnected(transport)
        return channel, transport

    def test_refusedLetsGo(self) -> None:
        """A channel the agent opened and the peer refused closes its socket and lets go."""
        link = FakeLink()
        channel, transport = self.acceptedChannel(link)
        self.assertEqual(link.opened, [(channel, b"payload")])
        credit = channel._credit
        channel.openFailed(Exception("refused"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(refersTo(credit, channel))

    def test_linkGoneBeforeTheOpenLetsGo(self) -> None:
        """The link gone before the open was sent: the socket is closed and the credit let go."""
        link = FakeLink()
        link.stopped = True
        channel, transport = self.acceptedChannel(link)
        self.assertEqual(link.opened, [])
        self.assertTrue(transport.disconnecting)
        self.assertFalse(refersTo(channel._credit, channel))
