"""
The fast SSH packet layer (accesstunnel.fastpath) in memory: whole handshakes
between our server and client transports over iosim with every offered cipher
and MAC, rekeys, large and small packets interleaved and split at every size,
interoperation with Conch's own transports, MAC failures, and the strict key
exchange rules (Terrapin fix).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.conch.ssh import factory, service, transport
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim

from accesstunnel import fastpath, policy
from groundcontrol.testing import newKey

MSG_ECHO = 200  # a service message: the server's service sends the payload back
HOST_KEY = newKey()


class EchoServerService(service.SSHService):
    name = b"test-echo"

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.transport.sendPacket(messageNum, packet)


class EchoClientService(service.SSHService):
    name = b"test-echo"

    def serviceStarted(self) -> None:
        self.received: list[bytes] = []

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.received.append(packet)


class ServerFactory(factory.SSHFactory):
    publicKeys = {b"ssh-ed25519": HOST_KEY.public()}
    privateKeys = {b"ssh-ed25519": HOST_KEY}
    services = {b"test-echo": EchoServerService}

    def getService(self, transport: Any, service: bytes) -> Any:
        return self.services.get(service)

    def getPrimes(self) -> None:
        return None


class _Recording:
    """Test hooks of the four transports: policy, chosen algorithms, disconnects recorded."""

    ciphers: list[bytes] | None = None
    macs: list[bytes] | None = None
    isClient: bool

    def connectionMade(self) -> None:
        self.disconnects: list[tuple[int, bytes]] = []
        self.peerDisconnects: list[tuple[int, bytes]] = []
        self.secured = 0
        if self.isClient:
            policy.applyClientPolicy(self)
        else:
            policy.applyServerPolicy(self)
            self.supportedPublicKeys = [b"ssh-ed25519"]
        if self.ciphers is not None:
            self.supportedCiphers = self.ciphers
        if self.macs is not None:
            self.supportedMACs = self.macs
        super().connectionMade()  # type: ignore[misc]

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.peerDisconnects.append((reasonCode, description))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self.disconnects.append((reason, desc))
        super().sendDisconnect(reason, desc)  # type: ignore[misc]

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Any:
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.secured += 1  # Conch calls this after every NEWKEYS
        if self.secured == 1:
            self.echo = EchoClientService()
            self.requestService(self.echo)  # type: ignore[attr-defined]


class FastServer(_Recording, fastpath.FastPathMixin, transport.SSHServerTransport):
    """Our packet layer, server side."""


class FastClient(_Recording, fastpath.FastPathMixin, transport.SSHClientTransport):
    """Our packet layer, client side."""


class ConchServer(_Recording, transport.SSHServerTransport):
    """Conch's own server transport under the same policy (no fast path)."""


class ConchClient(_Recording, transport.SSHClientTransport):
    """Conch's own client transport under the same policy (no fast path)."""


def connect(
    serverClass: type = FastServer, clientClass: type = FastClient, **clientAttrs: Any
) -> tuple[Any, Any, iosim.IOPump]:
    f = ServerFactory()
    f.doStart()
    server = serverClass()
    server.factory = f
    client = clientClass()
    for name, value in clientAttrs.items():
        setattr(client, name, value)
    serverIO = iosim.FakeTransport(
        server,
        isServer=True,
        hostAddress=IPv4Address("TCP", "127.0.0.1", 22),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    clientIO = iosim.FakeTransport(
        client,
        isServer=False,
        hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 22),
    )
    pump = iosim.connect(server, serverIO, client, clientIO, greet=False, clock=Clock())
    pump.flush()
    return server, client, pump


def echo(client: Any, pump: iosim.IOPump, payloads: list[bytes]) -> None:
    """Send each payload through the server's echo service; assert all come back in order."""
    before = len(client.echo.received)
    for p in payloads:
        client.sendPacket(MSG_ECHO, p)
    pump.flush()
    assert client.echo.received[before:] == payloads


def mixedPayloads(rng: random.Random) -> list[bytes]:
    sizes = [0, 1, 2, 15, 16, 17, 31, 32, 33, 100, 32768, 5, 65536, 1, 200_000, 3, 4093]
    return [rng.randbytes(n) for n in sizes]


COMBINATIONS = [
    (c, m)
    for c in policy.CIPHERS
    for m in (policy.MACS if c not in fastpath.AEAD_CIPHERS else policy.MACS[:1])
]


@pytest.mark.parametrize(("cipher", "mac"), COMBINATIONS)
def test_every_offered_combination_round_trips(cipher: bytes, mac: bytes) -> None:
    """Each cipher/MAC the server offers completes a handshake with strict kex and carries
    small and large packets, interleaved, both ways, across two rekeys (one from each side)."""
    server, client, pump = connect(ciphers=[cipher], macs=[mac])
    assert client.secured == 1
    assert server.strictKex and client.strictKex
    assert server.currentEncryptions.inCipType == cipher
    assert client.currentEncryptions.outMACType == mac
    rng = random.Random(cipher + mac)
    echo(client, pump, mixedPayloads(rng))
    sessionID = server.sessionID
    for side in (client, server):
        side.sendKexInit()
        # Sent during the key exchange: held back, then delivered in order.
        client.sendPacket(MSG_ECHO, b"during rekey")
        pump.flush()
        assert client.echo.received[-1] == b"during rekey"
        echo(client, pump, mixedPayloads(rng))
    assert server.sessionID == sessionID
    assert server.disconnects == client.disconnects == []
    assert not pump.serverIO.disconnecting and not pump.clientIO.disconnecting


def test_sequence_numbers_restart_at_newkeys_under_strict_kex() -> None:
    """With strict kex, both directions count packets from zero after every NEWKEYS."""
    server, client, pump = connect()
    # After NEWKEYS: the client sent SERVICE_REQUEST; the server EXT_INFO and SERVICE_ACCEPT.
    assert client.outgoingPacketSequence == server.incomingPacketSequence == 1
    assert server.outgoingPacketSequence == client.incomingPacketSequence == 2
    client.sendKexInit()
    pump.flush()
    assert client.outgoingPacketSequence == server.incomingPacketSequence == 0
    echo(client, pump, [b"x"])
    assert client.outgoingPacketSequence == 1


def test_split_reads_at_every_size() -> None:
    """Packets arriving in arbitrary fragments (1 byte up to several packets) parse the same."""
    server, client, pump = connect(ciphers=[b"aes128-ctr"], macs=[b"hmac-sha2-256"])
    rng = random.Random(7)
    payloads = mixedPayloads(rng) * 2
    for p in payloads:
        client.sendPacket(MSG_ECHO, p)
    wire = b"".join(pump.clientIO.stream)
    pump.clientIO.stream = []
    pos = 0
    while pos < len(wire):
        n = rng.choice([1, 2, 7, 16, 17, 100, 5000, 70000])
        server.dataReceived(wire[pos : pos + n])
        pos += n
    pump.flush()
    assert client.echo.received == payloads


@pytest.mark.parametrize("cipher", [b"aes128-gcm@openssh.com", b"aes128-ctr"])
@pytest.mark.parametrize("mac", [b"hmac-sha2-256", b"hmac-sha2-256-etm@openssh.com"])
def test_tampered_packet_is_a_mac_error(cipher: bytes, mac: bytes) -> None:
    """One flipped bit in a packet on the wire ends the connection with a MAC error."""
    server, client, pump = connect(ciphers=[cipher], macs=[mac])
    client.sendPacket(MSG_ECHO, b"a" * 100)
    wire = bytearray(b"".join(pump.clientIO.stream))
    wire[20] ^= 0x01
    pump.clientIO.stream = [bytes(wire)]
    pump.flush()
    assert server.disconnects == [(transport.DISCONNECT_MAC_ERROR, b"bad MAC")]
    assert client.echo.received == []
    assert pump.serverIO.disconnected


@pytest.mark.parametrize(
    ("serverClass", "clientClass"), [(FastServer, ConchClient), (ConchServer, FastClient)]
)
def test_interoperates_with_conch_transports(serverClass: type, clientClass: type) -> None:
    """Our packet layer talks to Conch's own (no strict kex, CTR + HMAC) both ways, with a rekey."""
    server, client, pump = connect(serverClass, clientClass)
    assert client.secured == 1
    assert server.currentEncryptions.inCipType in (b"aes256-ctr", b"aes128-ctr")
    assert not getattr(server, "strictKex", False) and not getattr(client, "strictKex", False)
    rng = random.Random(3)
    echo(client, pump, mixedPayloads(rng))
    client.sendKexInit()
    pump.flush()
    echo(client, pump, mixedPayloads(rng))


def test_conch_transports_are_not_offered_what_they_lack() -> None:
    """The policy gives a plain Conch transport CTR + plain HMAC only, and no strict-kex marker."""
    server, client, _pump = connect(FastServer, ConchClient)
    assert client.supportedCiphers == [b"aes128-ctr", b"aes256-ctr"]
    assert client.supportedMACs == [b"hmac-sha2-256", b"hmac-sha2-512"]
    assert fastpath.STRICT_KEX_CLIENT not in client.ourKexInitPayload
    assert fastpath.STRICT_KEX_SERVER in server.ourKexInitPayload


class EagerClient(FastClient):
    """Sends an IGNORE during the initial key exchange, which a strict peer must refuse."""

    def _allowedKeyExchangeMessageType(self, messageType: int) -> bool:
        return True

    def connectionMade(self) -> None:
        super().connectionMade()
        self.sendIgnore(b"hello")


def test_strict_kex_unexpected_packet_during_initial_kex_disconnects() -> None:
    """Strict kex: an IGNORE after KEXINIT and before NEWKEYS ends the connection."""
    server, client, pump = connect(FastServer, EagerClient)
    assert server.strictKex
    assert server.disconnects == [
        (transport.DISCONNECT_PROTOCOL_ERROR, b"strict KEX violation: unexpected packet type 2")
    ]
    assert client.secured == 0
    assert pump.serverIO.disconnected


class IgnoreFirstClient(FastClient):
    """Sends an IGNORE before its KEXINIT."""

    def sendKexInit(self) -> None:
        if self.sessionID is None and not self._fpOfferedStrict:
            self.transport.write(fastpath.PLAIN.seal(0, transport.MSG_IGNORE, b"\0\0\0\0")[0])
            self.outgoingPacketSequence += 1
        super().sendKexInit()


def test_strict_kex_kexinit_must_be_first() -> None:
    """Strict kex: a KEXINIT that is not the peer's first packet ends the connection."""
    server, client, _pump = connect(FastServer, IgnoreFirstClient)
    assert server.disconnects == [
        (
            transport.DISCONNECT_PROTOCOL_ERROR,
            b"strict KEX violation: KEXINIT was not the first packet",
        )
    ]
    assert client.secured == 0


def test_without_strict_kex_an_early_ignore_is_tolerated() -> None:
    """Against a peer that does not offer strict kex, Conch's tolerant rules stay."""

    class EagerConchClient(ConchClient):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.sendIgnore(b"hello")

    server, client, _pump = connect(FastServer, EagerConchClient)
    assert not server.strictKex
    assert client.secured == 1
    assert server.disconnects == []


def test_we_hold_ignore_during_initial_kex() -> None:
    """Our side never sends IGNORE/DEBUG during the initial key exchange: it waits for NEWKEYS."""
    f = ServerFactory()
    server = FastServer()
    server.factory = f
    io = iosim.FakeTransport(server, isServer=True)
    server.makeConnection(io)
    server.sendIgnore(b"x")
    server.sendDebug(b"y")
    assert server._blockedByKeyExchange == [
        (transport.MSG_IGNORE, b"\0\0\0\x01x"),
        (transport.MSG_DEBUG, b"\0\0\0\0\x01y\0\0\0\0"),
    ]


def test_newkeys_before_key_exchange_disconnects() -> None:
    """A NEWKEYS from the peer before any keys were derived ends the connection."""

    class HastyClient(FastClient):
        def ssh_KEXINIT(self, packet: bytes) -> Any:
            # NEWKEYS before the key exchange's own message.
            self.transport.write(
                fastpath.PLAIN.seal(self.outgoingPacketSequence, transport.MSG_NEWKEYS, b"")[0]
            )
            self.outgoingPacketSequence += 1
            return super().ssh_KEXINIT(packet)

    server, _client, _pump = connect(FastServer, HastyClient)
    assert server.disconnects == [
        (transport.DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS without a key exchange")
    ]


def test_prekeyed_hmac_matches_the_standard_library() -> None:
    """The pre-keyed HMAC gives the same digests as hmac.new over seq + data."""
    import hashlib
    import hmac
    import struct

    key = bytes(range(64))
    for constructor in (hashlib.sha256, hashlib.sha512):
        mac = fastpath.PrekeyedHMAC(constructor, key)
        size = constructor().digest_size
        for n in (0, 1, 100, 40000):
            data = bytes(n)
            expected = hmac.new(key[:size], struct.pack(">L", 9) + data, constructor).digest()
            assert mac.digest(9, data[: n // 2], data[n // 2 :]) == expected
