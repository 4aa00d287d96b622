"""
Tests for the packet sizes on a device link: the channels whose both ends are
ours (groundcontrol's device side, the agent's sessions and forwards) offer
LINK_MAX_PACKET instead of OpenSSH's 32 KiB; a peer that offers 32 KiB (an
older agent or groundcontrol) still never gets a larger packet; a packet above
what a channel offered is still refused; the operator hop keeps the operator's
packet size; and FlowChannel joins queued writes into one packet up to what the
peer offers, without reordering anything or changing the window bounds.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import common, connection
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.channel import DEFAULT_MAX_PACKET, LINK_MAX_PACKET, FlowChannel
from accesstunnel.connection import TunnelConnection
from agent.forward import ForwardChannel, SpliceChannel
from agent.session import SessionChannel, SessionEnvironment
from groundcontrol.relay import RelayChannel
from groundcontrol.testing import Script, ScriptedSession, echoScript
from tests.test_agent_session import FakeSpawner, RecordingConnection
from tests.test_flow_window import fakeSession
from tests.test_relay import ONE_WINDOW, RelayTestCase

MiB = 1024 * 1024


class LinkSession(ScriptedSession):
    """A scripted device session that offers LINK_MAX_PACKET (a new agent) and records packets."""

    receiveMaxPacket = LINK_MAX_PACKET

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packets: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.packets.append(len(data))
        super().dataReceived(data)


class OldSession(LinkSession):
    """The same, offering 32 KiB like an agent from before LINK_MAX_PACKET."""

    receiveMaxPacket = DEFAULT_MAX_PACKET


def script(command: bytes | None) -> Script | None:
    """C{big} streams 8 MiB; C{sleep} holds; the rest as echoScript."""
    if command == b"big":
        return Script(stream=8 * MiB)
    if command == b"sleep":
        return Script(hold=True)
    return echoScript(command)


class AdvertisedTests(SynchronousTestCase):
    """Which maximum packet each kind of channel offers."""

    def test_deviceLinkChannelsOfferLinkMaxPacket(self) -> None:
        """The agent's session and forward channels offer LINK_MAX_PACKET."""
        self.assertGreater(LINK_MAX_PACKET, DEFAULT_MAX_PACKET)
        session = SessionChannel(SessionEnvironment(home="/nonexistent", defaultPath="/"), Clock())
        self.assertEqual(session.localMaxPacket, LINK_MAX_PACKET)
        self.assertEqual(SpliceChannel().localMaxPacket, LINK_MAX_PACKET)
        self.assertEqual(ForwardChannel().localMaxPacket, LINK_MAX_PACKET)

    def test_otherChannelsKeepDefault(self) -> None:
        """A plain FlowChannel and a relay channel offer 32 KiB unless told otherwise."""
        self.assertEqual(FlowChannel().localMaxPacket, DEFAULT_MAX_PACKET)
        self.assertEqual(RelayChannel().localMaxPacket, DEFAULT_MAX_PACKET)
        self.assertEqual(FlowChannel(localMaxPacket=1000).localMaxPacket, 1000)

    def test_channelsOpenedByTheDeviceOfferLinkMaxPacket(self) -> None:
        """
        A channel the agent opens (here a remote forward's forwarded-tcpip) gets a device
        side that offers LINK_MAX_PACKET, like the channels groundcontrol opens to the
        agent; its operator side keeps 32 KiB.
        """
        from groundcontrol import forwarding

        opened: list[RelayChannel] = []

        class OperatorConn:
            stopped = False

            def openChannel(self, channel: RelayChannel, data: bytes) -> None:
                opened.append(channel)
                channel.channelOpen(b"")

        class Link:
            deviceName = "kiln7"
            remoteForwards = forwarding.RemoteForwards()

        Link.remoteForwards.add(b"127.0.0.1", 8080, OperatorConn())
        payload = (
            common.NS(b"127.0.0.1") + struct.pack(">L", 8080) + common.NS(b"10.0.0.9")
        ) + struct.pack(">L", 5555)
        d = defer.Deferred.fromCoroutine(
            forwarding.relayFromDevice(
                Link(), forwarding.FORWARDED_TCPIP, 2 * MiB, LINK_MAX_PACKET, payload
            )
        )
        deviceSide = self.successResultOf(d)
        self.assertEqual(deviceSide.localMaxPacket, LINK_MAX_PACKET)
        self.assertEqual([c.localMaxPacket for c in opened], [DEFAULT_MAX_PACKET])

    def test_linkPacketFitsTransports(self) -> None:
        """A full link packet plus its headers stays under the transports' 1 MiB packet limit."""
        from accesstunnel.fastpath import MAX_PACKET

        self.assertLess(LINK_MAX_PACKET + 1024, MAX_PACKET)


class _Transport:
    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.packets.append((messageType, payload))


class RefusalTests(SynchronousTestCase):
    """A packet above what the channel offered is refused, however large the offer."""

    def _open(self, maxPacket: int) -> tuple[TunnelConnection, FlowChannel, _Transport]:
        conn = TunnelConnection()
        transport = _Transport()
        conn.transport = transport  # type: ignore[assignment]
        channel = FlowChannel(localWindow=ENOUGH, localMaxPacket=maxPacket, conn=conn)
        channel.received: list[bytes] = []  # type: ignore[misc]
        channel.dataReceived = channel.received.append  # type: ignore[method-assign]
        conn.localToRemoteChannel[0] = 7
        conn.channels[0] = channel
        conn.channelsToRemoteChannel[channel] = 7
        channel.id = 0
        return conn, channel, transport

    def _data(self, conn: TunnelConnection, size: int) -> None:
        conn.ssh_CHANNEL_DATA(struct.pack(">2L", 0, size) + b"d" * size)

    def test_upToLinkMaxPacketAccepted(self) -> None:
        """A link channel takes a packet of exactly LINK_MAX_PACKET."""
        conn, channel, transport = self._open(LINK_MAX_PACKET)
        self._data(conn, LINK_MAX_PACKET)
        self.assertEqual([len(d) for d in channel.received], [LINK_MAX_PACKET])  # type: ignore[attr-defined]
        self.assertEqual(transport.packets, [])

    def test_aboveLinkMaxPacketRefused(self) -> None:
        """One byte more than LINK_MAX_PACKET closes the channel and delivers nothing."""
        conn, channel, transport = self._open(LINK_MAX_PACKET)
        self._data(conn, LINK_MAX_PACKET + 1)
        self.assertEqual(channel.received, [])  # type: ignore[attr-defined]
        self.assertEqual([t for t, _ in transport.packets], [97])  # SSH_MSG_CHANNEL_CLOSE

    def test_oldChannelRefusesLargePacket(self) -> None:
        """A channel offering 32 KiB still refuses a 32 KiB + 1 packet."""
        conn, channel, transport = self._open(DEFAULT_MAX_PACKET)
        self._data(conn, DEFAULT_MAX_PACKET + 1)
        self.assertEqual(channel.received, [])  # type: ignore[attr-defined]
        self.assertEqual([t for t, _ in transport.packets], [97])


ENOUGH = 4 * MiB


def sentPackets(conn: RecordingConnection) -> list[tuple[str, int]]:
    return [(e[0], len(e[-1])) for e in conn.events if e[0] in ("data", "ext")]


class GatherTests(SynchronousTestCase):
    """FlowChannel joins queued writes into packets of up to the peer's maximum."""

    def _channel(
        self, remoteMaxPacket: int = LINK_MAX_PACKET
    ) -> tuple[RecordingConnection, FlowChannel]:
        conn = RecordingConnection()
        channel = FlowChannel(remoteWindow=0, remoteMaxPacket=remoteMaxPacket)
        conn.attach(channel)
        return conn, channel

    def test_queuedWritesLeaveAsOnePacket(self) -> None:
        """4 KiB writes queued behind a closed window leave as LINK_MAX_PACKET packets."""
        conn, channel = self._channel()
        pieces = 3 * LINK_MAX_PACKET // 4096
        for i in range(pieces):
            channel.write(bytes([i % 256]) * 4096)
        channel.addWindowBytes(ENOUGH)
        self.assertEqual(sentPackets(conn), [("data", LINK_MAX_PACKET)] * 3)
        self.assertEqual(
            b"".join(e[1] for e in conn.events),
            b"".join(bytes([i % 256]) * 4096 for i in range(pieces)),
        )
        self.assertEqual(channel.queuedBytes, 0)

    def test_oldPeerGetsItsMaxPacket(self) -> None:
        """A peer that offered 32 KiB gets 32 KiB packets, split across writes where needed."""
        conn, channel = self._channel(DEFAULT_MAX_PACKET)
        for _ in range(5):
            channel.write(b"a" * 20000)
        channel.addWindowBytes(ENOUGH)
        self.assertEqual(
            sentPackets(conn),
            [("data", DEFAULT_MAX_PACKET)] * 3 + [("data", 5 * 20000 - 3 * DEFAULT_MAX_PACKET)],
        )
        self.assertEqual(b"".join(e[1] for e in conn.events), b"a" * 100000)

    def test_windowBoundsAPacket(self) -> None:
        """A join never exceeds the window the peer has given; the rest waits for more."""
        conn, channel = self._channel()
        for _ in range(4):
            channel.write(b"w" * 30000)
        channel.addWindowBytes(50000)
        self.assertEqual(sentPackets(conn), [("data", 50000)])
        self.assertEqual(channel.queuedBytes, 70000)
        channel.addWindowBytes(ENOUGH)
        self.assertEqual(
            sentPackets(conn),
            [("data", 50000), ("data", LINK_MAX_PACKET), ("data", 70000 - LINK_MAX_PACKET)],
        )
        self.assertEqual(b"".join(e[1] for e in conn.events), b"w" * 120000)

    def test_orderKeptAcrossKinds(self) -> None:
        """Data, stderr of another kind, a request and EOF are never joined across or reordered."""
        conn, channel = self._channel()
        channel.write(b"a" * 100)
        channel.write(b"b" * 100)
        channel.writeExtended(connection.EXTENDED_DATA_STDERR, b"e" * 10)
        channel.writeExtended(connection.EXTENDED_DATA_STDERR, b"f" * 10)
        channel.writeExtended(2, b"g" * 10)
        channel.write(b"c" * 100)
        channel.sendRequestInOrder(b"exit-status", struct.pack(">L", 0))
        channel.write(b"d" * 100)
        channel.writeEOF()
        channel.addWindowBytes(ENOUGH)
        self.assertEqual(
            conn.events,
            [
                ("data", b"a" * 100 + b"b" * 100),
                ("ext", connection.EXTENDED_DATA_STDERR, b"e" * 10 + b"f" * 10),
                ("ext", 2, b"g" * 10),
                ("data", b"c" * 100),
                ("request", b"exit-status", struct.pack(">L", 0)),
                ("data", b"d" * 100),
                ("eof",),
            ],
        )

    def test_sentCountsEveryByte(self) -> None:
        """sent() reports the joined bytes, so a relay credits its other side in full."""
        _, channel = self._channel()
        counted: list[int] = []
        channel.sent = counted.append  # type: ignore[method-assign]
        for _ in range(10):
            channel.write(b"s" * 10000)
        channel.addWindowBytes(ENOUGH)
        self.assertEqual(sum(counted), 100000)


class AgentSendTests(SynchronousTestCase):
    """What the agent's session sends for a child's 64 KiB reads, by what groundcontrol offered."""

    def _session(self, remoteMaxPacket: int) -> tuple[RecordingConnection, FakeSpawner]:
        conn, spawner, channel = fakeSession(ENOUGH, remoteMaxPacket)
        channel.requestReceivedWithReply(b"exec", common.NS(b"head -c 1M /dev/zero"), True)
        for _ in range(4):
            spawner.protocol.childDataReceived(1, b"d" * (64 * 1024))
        return conn, spawner

    def test_newGroundcontrolGetsOnePacketPerRead(self) -> None:
        """groundcontrol offered LINK_MAX_PACKET: each 64 KiB read leaves as one packet."""
        conn, _ = self._session(LINK_MAX_PACKET)
        self.assertEqual(sentPackets(conn), [("data", 64 * 1024)] * 4)

    def test_oldGroundcontrolGetsItsMaxPacket(self) -> None:
        """groundcontrol offered 32 KiB (before LINK_MAX_PACKET): 32 KiB packets, every byte."""
        conn, _ = self._session(DEFAULT_MAX_PACKET)
        self.assertEqual(sentPackets(conn), [("data", DEFAULT_MAX_PACKET)] * 8)


class RelayPacketTests(RelayTestCase):
    """Packet sizes through groundcontrol, in memory with the real link classes."""

    sessionClass: type[LinkSession] = LinkSession

    def setUp(self) -> None:
        super().setUp()
        self.linkSessions: list[LinkSession] = []
        sessions = self.linkSessions

        def factory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> LinkSession:
            session = self.sessionClass(
                script,
                conn.factory.clock,
                remoteWindow=windowSize,
                remoteMaxPacket=maxPacket,
                conn=conn,
            )
            sessions.append(session)
            return session

        agentFactory = self.agentFactory()
        agentFactory.sessionFactory = factory
        self.fleet.connect(agentFactory)

    def deviceSide(self) -> RelayChannel:
        (device,) = [c for c in self.fleet.relayChannels() if not c.towardsOperator]
        return device

    def upload(self, size: int) -> tuple[Any, LinkSession]:
        """Send C{size} bytes of stdin while the device holds its input, then let it read."""
        session = self.openSession()
        self.runCommand(session, b"sleep")
        (device,) = self.linkSessions
        device.holdInput = True
        session.write(b"u" * size)
        self.fleet.flush()
        device.releaseInput()
        self.fleet.flush()
        return session, device


class NewAgentTests(RelayPacketTests):
    """An agent that offers LINK_MAX_PACKET."""

    def test_groundcontrolOffersLinkMaxPacket(self) -> None:
        """groundcontrol's device-side channel offers LINK_MAX_PACKET; its operator side 32 KiB."""
        session = self.openSession()
        self.runCommand(session, b"sleep")
        self.assertEqual(self.deviceSide().localMaxPacket, LINK_MAX_PACKET)
        self.assertEqual(self.deviceSide().remoteMaxPacket, LINK_MAX_PACKET)
        (operatorSide,) = [c for c in self.fleet.relayChannels() if c.towardsOperator]
        self.assertEqual(operatorSide.localMaxPacket, DEFAULT_MAX_PACKET)
        self.assertEqual(operatorSide.remoteMaxPacket, session.localMaxPacket)

    def test_uploadJoinedOnTheLink(self) -> None:
        """
        The operator's 32 KiB packets, queued in groundcontrol while the device's
        window was closed, reach the device in packets of up to LINK_MAX_PACKET,
        every byte once; groundcontrol held at most one window meanwhile.
        """
        _, device = self.upload(6 * MiB)
        self.assertEqual(len(device.input), 6 * MiB)
        self.assertEqual(max(device.packets), LINK_MAX_PACKET)
        self.assertLessEqual(max(c.queuedBytes for c in self.fleet.relayChannels()), ONE_WINDOW)
        self.assertLessEqual(self.fleet.bufferedInGroundControl(), ONE_WINDOW)

    def test_downloadSplitForOperator(self) -> None:
        """
        The device's 64 KiB writes travel the link as they are, and the operator
        gets packets of at most the 32 KiB it offered.
        """
        session = self.openSession()
        sizes: list[int] = []
        received = session.dataReceived

        def record(data: bytes) -> None:
            sizes.append(len(data))
            received(data)

        session.dataReceived = record  # type: ignore[method-assign]
        self.runCommand(session, b"big")
        self.assertEqual(len(session.output), 8 * MiB)
        self.assertEqual(max(sizes), DEFAULT_MAX_PACKET)
        self.assertEqual(session.exitStatus, 0)


class OldAgentTests(RelayPacketTests):
    """An agent from before LINK_MAX_PACKET, offering 32 KiB."""

    sessionClass = OldSession

    def test_oldAgentNeverGetsLargerPackets(self) -> None:
        """The same upload reaches an agent that offered 32 KiB in packets of at most 32 KiB."""
        _, device = self.upload(6 * MiB)
        self.assertEqual(len(device.input), 6 * MiB)
        self.assertEqual(max(device.packets), DEFAULT_MAX_PACKET)
        self.assertEqual(self.deviceSide().remoteMaxPacket, DEFAULT_MAX_PACKET)
