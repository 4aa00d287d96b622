"""
Fuzzing groundcontrol's logged-in SSH transports on their steady path (hypothesis).

tests/test_fuzz_transport.py stops at login; this file starts there. Each example builds
an in-memory groundcontrol (InMemoryFleet) with device kiln7 on the real agent link and
two operators, alice and bob, each with a C{cat} session open on kiln7. alice's
connection has had its quick ACKs (a fake socket takes the option) and, like the link,
is checked to be on the steady path (accesstunnel.fastpath.enterSteadyState) before
anything is fuzzed. Then one of groundcontrol's two steady transports is fed hostile
input by its peer:

  - alice's connection (Conch's client, aes128-ctr with HMAC, or a fast-path client,
    AES-GCM), or the device link (the agent's end, AES-GCM), sends correctly framed,
    encrypted packets of any type and payload: channel data, extended data, window
    adjusts, requests, EOF, close, open confirmations and failures for its open session
    channel and for channel numbers that do not exist, with any claimed and real
    lengths (past the window, past the maximum packet, truncated length fields), channel
    opens and global requests of every kind, and any other message number;
  - either peer sends raw garbage, or a packet with bits flipped on the wire.

While fuzzing, the fuzzing peer acts on nothing it receives but a disconnect (what it
gets answers nonsense it sent; a real attacker ignores it too).

The properties: no exception escapes any transport; nothing is logged as a failure (an
unexpected traceback, an unhandled error in a Deferred); the fuzzed connection is either
dropped or still works (a fresh session through it echoes byte-exact); garbage and bit
flips always drop it with a MAC or packet error; bob's session (and the device link, when
alice is fuzzed) keeps working byte-exact and receives nothing it did not ask for; and
what groundcontrol holds for the fuzzed connection stays bounded (its receive buffer, its
relay queues).
"""

from __future__ import annotations

import gc
import struct
from typing import Any

from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import common, connection, transport
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel import quickack
from accesstunnel.channel import DEFAULT_WINDOW, LINK_MAX_PACKET
from accesstunnel.fastpath import MAX_PACKET, FastPathMixin
from accesstunnel.keys import fingerprint
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.testing import (
    FakeOperator,
    InMemoryFleet,
    OperatorSession,
    ScriptedSession,
    publicLine,
    refuseForwards,
    scriptedSessions,
)
from tests.test_fuzz_transport import noFailuresLogged
from tests.test_steady_path import recordDisconnects

#: derandomize fixes the random stream, not the search: Hypothesis also draws constants it
#: reads from the source of the repository's modules loaded at the time (its "local
#: constants"), so the examples tried change with the code anywhere in the tree and with
#: which modules the run imported (this file alone, or the whole suite's collection). A
#: case found once is an @example below, or it may not be tried again.
FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_RAW = settings(FUZZ, max_examples=60)

U32 = 0xFFFFFFFF
#: Stands for the fuzzed connection's own open session channel (groundcontrol's number).
OWN = -1
#: A channel number that names no channel, used instead of one the fuzz must not touch.
NOWHERE = 0x7EADBEEF
#: What a connection may hold of a packet not yet whole.
BUFFER_BOUND = MAX_PACKET + 4 + 64


_FastOperatorTransport = type(
    "_FastOperatorTransport",
    (FastPathMixin, FakeOperator.protocol),
    {"__doc__": "An operator's client with our packet layer: the connection runs AES-GCM."},
)


class _Session(OperatorSession):
    """
    An operator's session that refuses a channel request whose name is not ASCII, as
    OpenSSH's client does; Conch's raises (groundcontrol passes a device's requests on).
    """

    def requestReceived(self, requestType: bytes, data: bytes) -> Any:
        if not requestType.isascii():
            return 0
        return super().requestReceived(requestType, data)


class _QuickAckSocket:
    """Takes the quick ACK socket option, so an operator's connection has quick ACKs."""

    def setsockopt(self, *option: Any) -> None:
        pass


# -- the world -----------------------------------------------------------------------------


class World:
    """
    groundcontrol with kiln7 linked, alice and bob each with a C{cat} session on it.

    Both of groundcontrol's steady transports are reachable: C{link} (the device link,
    the agent as its client) and C{alice} (an operator connection).
    """

    def __init__(self, test: SynchronousTestCase, fastOperator: bool) -> None:
        self.test = test
        self.fleet = fleet = InMemoryFleet()
        deviceKey = fleet.enrollDevice("kiln7")
        keys = {name: fleet.addOperator(name) for name in ("alice", "bob")}
        for name in keys:
            fleet.grant(name, "kiln7")
        self.deviceSessions: list[ScriptedSession] = []
        factory = AgentLinkFactory(
            LinkSettings(
                name="kiln7",
                deviceKey=deviceKey,
                serverKey=ServerKeyPin(fingerprint(publicLine(fleet.hostKey))),
            ),
            fleet.clock,
            scriptedSessions(record=self.deviceSessions),
            refuseForwards,
        )
        self.linkPump = fleet.connect(factory)
        self.alice = FakeOperator("dev_kiln7", keys["alice"], hostKey=fleet.hostKey)
        if fastOperator:
            self.alice.protocol = _FastOperatorTransport  # type: ignore[assignment]
        self.alicePump = fleet.connect(self.alice)
        self.bob = FakeOperator("dev_kiln7", keys["bob"], hostKey=fleet.hostKey)
        self.bobPump = fleet.connect(self.bob)
        self.aliceSession = self.cat(self.alice)
        # Past the quick ACKs: alice's connection turns steady after the last one.
        while self.alicePump.server._quickAcksLeft:
            self.echo(self.aliceSession, b"q")
        self.aliceLinkChannel = self._newestLinkChannel()
        self.bobSession = self.cat(self.bob)
        self.bobLinkChannel = self._newestLinkChannel()
        self.bobSent = bytearray()
        for side in (self.alicePump.server, self.linkPump.server):
            test.assertTrue(side.steady, side)
            test.assertEqual(side.dataReceived, side._fpSteadyRead)

    def _newestLinkChannel(self) -> int:
        """groundcontrol's number for the channel it opened last on the device link."""
        return max(self.linkPump.server.service.channels)

    def cat(self, operator: FakeOperator) -> OperatorSession:
        assert operator.connection is not None
        session = _Session(localWindow=0, conn=operator.connection)
        operator.connection.openChannel(session)
        self.fleet.flush()
        self.test.assertTrue(session.isOpen, session.openFailure)
        d = session.exec(b"cat")
        self.fleet.flush()
        self.test.successResultOf(d)  # type: ignore[arg-type]
        return session

    def echo(self, session: OperatorSession, data: bytes) -> None:
        """C{data} typed into C{session} comes back through the device's C{cat}, exactly."""
        before = len(session.output)
        session.write(data)
        self.fleet.flush()
        self.test.assertEqual(bytes(session.output[before:]), data)

    # -- the checks ------------------------------------------------------------------------

    def bobStillExact(self) -> None:
        """bob's session saw nothing but its own echo, and still echoes byte-exact."""
        test = self.test
        test.assertFalse(self.bobPump.serverIO.disconnecting)
        test.assertEqual(bytes(self.bobSession.output), bytes(self.bobSent))
        test.assertEqual(
            self.bobSession.events, [("data", len(self.bobSent))] if self.bobSent else []
        )
        data = b"bob \x00\xff" + bytes(range(40))
        self.echo(self.bobSession, data)
        self.bobSent += data

    def freshSessionEchoes(self, operator: FakeOperator) -> None:
        """A new session of C{operator} runs C{cat} on kiln7 and echoes byte-exact."""
        session = self.cat(operator)
        self.echo(session, b"fresh \x00\r\n" + bytes(range(256)))

    def bounded(self, sshTransport: Any) -> None:
        """What groundcontrol holds for a connection: at most one unfinished packet, and
        relay queues within the windows they were granted."""
        self.test.assertLessEqual(len(sshTransport._fpBuf), BUFFER_BOUND)
        self.test.assertEqual(self.fleet.network.bufferedBytes(), 0)
        for channel in self.fleet.relayChannels():
            self.test.assertLessEqual(channel.queuedBytes, DEFAULT_WINDOW + LINK_MAX_PACKET)


def dropped(pump: Any) -> bool:
    return bool(pump.serverIO.disconnecting or pump.serverIO.disconnected)


def deaf(peer: Any) -> Any:
    """
    Until the returned function is called, C{peer} (the fuzzing end) ignores what it
    receives but a disconnect: answers to the nonsense it sent, or a key exchange it
    did not start (its own transport knows nothing of what the fuzz sent).
    """
    original = peer.dispatchMessage
    channelData = peer.__dict__.get("_fpChannelData")

    def dispatchMessage(messageNum: int, payload: bytes) -> None:
        if messageNum == transport.MSG_DISCONNECT:
            original(messageNum, payload)

    peer.dispatchMessage = dispatchMessage
    if channelData is not None:
        peer._fpChannelData = None

    def hear() -> None:
        del peer.dispatchMessage
        if channelData is not None and not peer._fpClosed:
            peer._fpChannelData = channelData

    return hear


# -- what the fuzzing peer sends -----------------------------------------------------------

_u32 = st.one_of(
    st.sampled_from([0, 1, 2, 0x7FFFFFFF, 0x80000000, U32 - 1, U32]), st.integers(0, U32)
)
#: Mostly the fuzzed session channel: a number that names no channel ends the connection.
_channel = st.one_of(st.just(OWN), st.just(OWN), st.just(OWN), _u32)
_smallBytes = st.binary(max_size=48)
#: Channel data: small and arbitrary, or long (past the maximum packet).
_data = st.one_of(
    _smallBytes,
    st.sampled_from([32 * 1024, 32 * 1024 + 1, 64 * 1024, 64 * 1024 + 1, 200_000]).map(
        lambda n: b"D" * n
    ),
)
#: The claimed length: the real one, or any.
_claim = st.one_of(st.none(), st.none(), _u32, st.integers(0, 70_000))


def _lengthOf(claim: int | None, data: bytes) -> bytes:
    return struct.pack(">L", len(data) if claim is None else claim) + data


def _namesOr(*known: bytes) -> st.SearchStrategy[bytes]:
    """A name the protocol knows, or any short bytes."""
    return st.one_of(st.sampled_from(known), st.binary(max_size=20))


_requestNames = _namesOr(
    b"exec",
    b"shell",
    b"subsystem",
    b"pty-req",
    b"env",
    b"window-change",
    b"signal",
    b"break",
    b"exit-status",
    b"exit-signal",
    b"eow@openssh.com",
    b"auth-agent-req@openssh.com",
    b"x11-req",
    b"",
)
_globalNames = _namesOr(
    b"keepalive@openssh.com",
    b"tcpip-forward",
    b"cancel-tcpip-forward",
    b"streamlocal-forward@openssh.com",
    b"no-more-sessions@openssh.com",
    b"hostkeys-00@openssh.com",
    b"hostkeys-prove-00@openssh.com",
)
_openTypes = _namesOr(
    b"session",
    b"direct-tcpip",
    b"forwarded-tcpip",
    b"direct-streamlocal@openssh.com",
    b"x11",
    b"auth-agent@openssh.com",
)


def _kexInit(follows: bool) -> bytes:
    """A KEXINIT a client of groundcontrol could send (a zero cookie: deterministic)."""
    lists = [b"curve25519-sha256", b"ssh-ed25519", *[b"aes128-ctr"] * 2, *[b"hmac-sha2-256"] * 2]
    lists += [b"none", b"none", b"", b""]
    return bytes(16) + b"".join(common.NS(x) for x in lists) + bytes((follows,)) + bytes(4)


# (message type, recipient channel or None, body): the recipient is packed before the body.
_channelPackets = st.one_of(
    st.tuples(st.just(connection.MSG_CHANNEL_DATA), _channel, st.builds(_lengthOf, _claim, _data)),
    st.tuples(
        st.just(connection.MSG_CHANNEL_EXTENDED_DATA),
        _channel,
        st.builds(
            lambda code, body: struct.pack(">L", code) + body,
            st.one_of(st.just(1), _u32),
            st.builds(_lengthOf, _claim, _data),
        ),
    ),
    st.tuples(
        st.just(connection.MSG_CHANNEL_WINDOW_ADJUST), _channel, _u32.map(struct.Struct(">L").pack)
    ),
    st.tuples(
        st.just(connection.MSG_CHANNEL_REQUEST),
        _channel,
        st.builds(
            lambda name, want, rest: common.NS(name) + bytes((want,)) + rest,
            _requestNames,
            st.sampled_from([0, 1, 2, 255]),
            _smallBytes,
        ),
    ),
    st.tuples(
        st.sampled_from(
            [
                connection.MSG_CHANNEL_EOF,
                connection.MSG_CHANNEL_CLOSE,
                connection.MSG_CHANNEL_SUCCESS,
                connection.MSG_CHANNEL_FAILURE,
            ]
        ),
        _channel,
        st.binary(max_size=8),
    ),
    st.tuples(
        st.just(connection.MSG_CHANNEL_OPEN_CONFIRMATION),
        _channel,
        st.builds(
            lambda a, b, c, rest: struct.pack(">3L", a, b, c) + rest, _u32, _u32, _u32, _smallBytes
        ),
    ),
    st.tuples(
        st.just(connection.MSG_CHANNEL_OPEN_FAILURE),
        _channel,
        st.builds(
            lambda code, text: struct.pack(">L", code) + common.NS(text) + common.NS(b""),
            _u32,
            _smallBytes,
        ),
    ),
)
_otherPackets = st.one_of(
    st.tuples(
        st.just(connection.MSG_CHANNEL_OPEN),
        st.none(),
        st.builds(
            lambda kind, ids, rest: common.NS(kind) + struct.pack(">3L", *ids) + rest,
            _openTypes,
            st.tuples(_u32, _u32, _u32),
            _smallBytes,
        ),
    ),
    st.tuples(
        st.just(connection.MSG_GLOBAL_REQUEST),
        st.none(),
        st.builds(
            lambda name, want, rest: common.NS(name) + bytes((want,)) + rest,
            _globalNames,
            st.sampled_from([0, 1]),
            _smallBytes,
        ),
    ),
    # A key re-exchange started by the fuzzing peer behind its own transport's back.
    st.tuples(st.just(transport.MSG_KEXINIT), st.none(), st.builds(_kexInit, st.booleans())),
    st.tuples(st.just(30), st.none(), st.just(common.NS(b"\x01" * 32))),
    # Asking for authentication again once logged in (answered UNIMPLEMENTED).
    st.tuples(
        st.just(transport.MSG_SERVICE_REQUEST), st.none(), st.just(common.NS(b"ssh-userauth"))
    ),
    st.tuples(st.integers(0, 255), st.none(), st.binary(max_size=64)),
)
#: A packet, its payload cut short (its length fields truncated) or whole.
_packets = st.tuples(
    st.one_of(_channelPackets, _channelPackets, _channelPackets, _otherPackets),
    st.one_of(st.none(), st.none(), st.none(), st.integers(0, 11)),
)
_packetLists = st.lists(_packets, min_size=1, max_size=8)
#: groundcontrol's receive window left on the fuzzed session channel: all of it, or
#: nearly spent (so that data past it is cheap to send).
_windowLeft = st.one_of(st.none(), st.integers(0, 64))

_CHANNEL_MESSAGES = range(
    connection.MSG_CHANNEL_OPEN_CONFIRMATION, connection.MSG_CHANNEL_FAILURE + 1
)


def payloadOf(
    messageType: int, recipient: int | None, body: bytes, cut: int | None, own: int, spare: set[int]
) -> bytes:
    """
    The payload to send: C{recipient} (L{OWN}: the fuzzed session channel) before
    C{body}, cut to C{cut} bytes. A channel message never names a channel in C{spare}
    (another operator's, on the device link): L{NOWHERE} instead.
    """
    payload = (
        body
        if recipient is None
        else struct.pack(">L", own if recipient == OWN else recipient) + body
    )
    if cut is not None:
        payload = payload[:cut]
    if messageType in _CHANNEL_MESSAGES and len(payload) >= 4:
        (named,) = struct.unpack(">L", payload[:4])
        if named in spare:
            payload = struct.pack(">L", NOWHERE) + payload[4:]
    return payload


# -- the tests -----------------------------------------------------------------------------


class SteadyFuzz(SynchronousTestCase):
    """Hostile packets and bytes on groundcontrol's logged-in, steady connections."""

    def setUp(self) -> None:
        if quickack.TCP_QUICKACK is not None:
            self.patch(quickack, "tcpSocketOf", lambda transport: _QuickAckSocket())

    def world(self, fastOperator: bool = False) -> World:
        return World(self, fastOperator)

    def fuzzPackets(
        self,
        w: World,
        pump: Any,
        own: int,
        ownChannel: Any,
        spare: set[int],
        packets: list[tuple[tuple[int, int | None, bytes], int | None]],
        windowLeft: int | None,
    ) -> bool:
        """
        The peer of C{pump} sends C{packets}, ignoring the answers; checks what is left.
        Whether a key exchange message went: the peer's own transport is then out of
        step with the exchange it started (it may wait for it, or start another), so the
        connection may rightly stall.
        """
        peer, server = pump.client, pump.server
        if windowLeft is not None and ownChannel is not None:
            ownChannel.localWindowLeft = windowLeft
        reasons = recordDisconnects(server)
        hear = deaf(peer)
        kex = False
        for (messageType, recipient, body), cut in packets:
            if dropped(pump):
                break
            peer.sendPacket(messageType, payloadOf(messageType, recipient, body, cut, own, spare))
            kex = kex or transport.MSG_KEXINIT <= messageType < 50
            w.fleet.flush()
            w.bounded(server)
        hear()
        w.fleet.flush()
        w.bounded(server)
        event(f"dropped: {reasons}" if dropped(pump) else "still up" + " (kex)" * kex)
        return kex

    @FUZZ
    @given(st.booleans(), _packetLists, _windowLeft)
    @example(False, [((connection.MSG_CHANNEL_DATA, OWN, b""), 5)], None)
    @example(
        True, [((connection.MSG_CHANNEL_DATA, OWN, _lengthOf(None, b"D" * 40_000)), None)], None
    )
    @example(False, [((connection.MSG_CHANNEL_DATA, OWN, _lengthOf(None, b"abc")), None)], 2)
    @example(
        False, [((connection.MSG_CHANNEL_WINDOW_ADJUST, OWN, struct.pack(">L", U32)), None)], None
    )
    # KEXINIT again during the exchange the first began (Conch raised at the third).
    @example(False, [((transport.MSG_KEXINIT, None, _kexInit(False)), None)] * 3, None)
    def test_operatorPackets(
        self,
        fastOperator: bool,
        packets: list[tuple[tuple[int, int | None, bytes], int | None]],
        windowLeft: int | None,
    ) -> None:
        """
        Whatever packets a logged-in operator sends, groundcontrol neither raises nor
        logs a failure; the connection is dropped or a fresh session still echoes; bob's
        session and the device link are untouched.
        """
        with noFailuresLogged():
            w = self.world(fastOperator)
            pump = w.alicePump
            server = pump.server
            own = w.aliceSession.conn.channelsToRemoteChannel[w.aliceSession]
            kex = self.fuzzPackets(
                w, pump, own, server.service.channels.get(own), set(), packets, windowLeft
            )
            self.assertFalse(dropped(w.linkPump))
            if not (dropped(pump) or kex):
                self.assertTrue(server.steady)
                w.freshSessionEchoes(w.alice)
            w.bobStillExact()
            w.freshSessionEchoes(w.bob)
            gc.collect()

    @FUZZ
    @given(_packetLists, _windowLeft)
    @example([((connection.MSG_CHANNEL_CLOSE, OWN, b""), 2)], None)
    @example([((connection.MSG_CHANNEL_DATA, OWN, _lengthOf(None, b"D" * 70_000)), None)], None)
    @example(
        [((connection.MSG_CHANNEL_EXTENDED_DATA, OWN, b"\0\0\0\1" + _lengthOf(None, b"e")), None)],
        0,
    )
    @example([((transport.MSG_KEXINIT, None, _kexInit(False)), None)] * 3, None)
    def test_devicePackets(
        self,
        packets: list[tuple[tuple[int, int | None, bytes], int | None]],
        windowLeft: int | None,
    ) -> None:
        """
        Whatever packets a logged-in device sends on its link (bob's channel aside),
        groundcontrol neither raises nor logs a failure; the link is dropped or a fresh
        operator session through it still echoes, and bob's session is untouched.
        """
        with noFailuresLogged():
            w = self.world()
            pump = w.linkPump
            server = pump.server
            own = w.aliceLinkChannel
            kex = self.fuzzPackets(
                w,
                pump,
                own,
                server.service.channels.get(own),
                {w.bobLinkChannel},
                packets,
                windowLeft,
            )
            for operatorPump in (w.alicePump, w.bobPump):
                self.assertFalse(dropped(operatorPump))
            if dropped(pump):
                self.assertTrue(w.bobSession.isClosed)
            elif not kex:
                self.assertTrue(server.steady)
                w.bobStillExact()
                w.freshSessionEchoes(w.alice)
            gc.collect()

    @FUZZ_RAW
    @given(
        st.booleans(),
        st.booleans(),
        st.one_of(
            st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=300)),
            st.tuples(
                st.just("flip"),
                st.lists(st.integers(0, 10_000), min_size=1, max_size=3).map(
                    lambda b: b"".join(struct.pack(">H", i) for i in b)
                ),
            ),
        ),
    )
    @example(False, False, ("flip", struct.pack(">H", 0)))
    @example(True, True, ("flip", struct.pack(">H", 10)))
    @example(False, True, ("garbage", b"\0\0\0\x10" + b"\0" * 20))
    def test_garbageAndBitFlips(
        self, onLink: bool, fastOperator: bool, damage: tuple[str, bytes]
    ) -> None:
        """
        Raw garbage, or a packet with bits flipped, from a logged-in peer (an operator or
        the device) ends that connection with a MAC or packet error, never an exception;
        everyone else goes on.
        """
        with noFailuresLogged():
            w = self.world(fastOperator)
            pump = w.linkPump if onLink else w.alicePump
            reasons = recordDisconnects(pump.server)
            kind, data = damage
            io = pump.clientIO
            if kind == "garbage":
                io.write(data)
            else:
                peer: Any = pump.client
                peer.sendPacket(transport.MSG_IGNORE, common.NS(b"i" * 40))
                wire = bytearray(b"".join(io.stream))
                for (bit,) in struct.iter_unpack(">H", data):
                    wire[(bit // 8) % len(wire)] ^= 1 << (bit % 8)
                io.stream[:] = [bytes(wire)]
            w.fleet.flush()
            if not dropped(pump):
                # Waiting for the rest of a packet whose (damaged) length is plausible.
                io.write(b"\0" * BUFFER_BOUND)
                w.fleet.flush()
            self.assertTrue(dropped(pump))
            self.assertEqual(len(reasons), 1, reasons)
            self.assertIn(
                reasons[0], (transport.DISCONNECT_MAC_ERROR, transport.DISCONNECT_PROTOCOL_ERROR)
            )
            if onLink:
                self.assertTrue(w.bobSession.isClosed)
                self.assertFalse(dropped(w.alicePump))
            else:
                self.assertFalse(dropped(w.linkPump))
                w.bobStillExact()
            gc.collect()
