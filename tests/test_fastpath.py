"""
The fast SSH packet layer (accesstunnel.fastpath) in memory: whole handshakes
between our server and client transports over iosim with every offered cipher
and MAC, rekeys, large and small packets interleaved and split at every size,
interoperation with Conch's own transports, MAC failures, and the strict key
exchange rules (Terrapin fix); chacha20-poly1305@openssh.com against a
reference written here from OpenSSH's PROTOCOL.chacha20poly1305.
"""

from __future__ import annotations

import random
import struct
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh import connection, factory, service, transport
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.test import iosim

from accesstunnel import fastpath, policy
from groundcontrol.testing import newKey

MSG_ECHO = 200  # a service message: the server's service sends the payload back
HOST_KEY = newKey()
CHACHA = fastpath.CHACHA20_POLY1305
#: The stock OpenSSH client's cipher order (ssh_config(5), OpenSSH 9.x).
OPENSSH_CLIENT_CIPHERS = [
    CHACHA,
    b"aes128-ctr",
    b"aes192-ctr",
    b"aes256-ctr",
    b"aes128-gcm@openssh.com",
    b"aes256-gcm@openssh.com",
]


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


@pytest.mark.parametrize("cipher", [CHACHA, b"aes128-gcm@openssh.com", b"aes128-ctr"])
def test_sequence_numbers_restart_at_newkeys_under_strict_kex(cipher: bytes) -> None:
    """With strict kex, both directions count packets from zero after every NEWKEYS."""
    server, client, pump = connect(ciphers=[cipher])
    assert server.currentEncryptions.inCipType == cipher
    # After NEWKEYS: the client sent SERVICE_REQUEST; the server EXT_INFO and SERVICE_ACCEPT.
    assert client.outgoingPacketSequence == server.incomingPacketSequence == 1
    assert server.outgoingPacketSequence == client.incomingPacketSequence == 2
    client.sendKexInit()
    pump.flush()
    assert client.outgoingPacketSequence == server.incomingPacketSequence == 0
    echo(client, pump, [b"x"])
    assert client.outgoingPacketSequence == 1


@pytest.mark.parametrize("cipher", [b"aes128-ctr", CHACHA])
def test_split_reads_at_every_size(cipher: bytes) -> None:
    """Packets arriving in arbitrary fragments (1 byte up to several packets) parse the same."""
    server, client, pump = connect(ciphers=[cipher], macs=[b"hmac-sha2-256"])
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


@pytest.mark.parametrize("cipher", [b"aes128-gcm@openssh.com", b"aes128-ctr", CHACHA])
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


class KexinitTwiceClient(FastClient):
    """Sends its first KEXINIT twice (the second behind its own transport's back)."""

    def sendKexInit(self) -> None:
        super().sendKexInit()
        if self.sessionID is None:
            payload = self.ourKexInitPayload[1:]
            sealed = self._fpOut.seal(self.outgoingPacketSequence, transport.MSG_KEXINIT, payload)
            self.transport.write(b"".join(sealed))
            self.outgoingPacketSequence += 1


class NonStrictKexinitTwiceClient(KexinitTwiceClient):
    """The same, without offering strict kex."""

    _fpOfferedStrict = True  # as if offered already: Conch's plain KEXINIT


@pytest.mark.parametrize(
    ("clientClass", "description"),
    [
        (KexinitTwiceClient, b"strict KEX violation: unexpected packet type 20"),
        (NonStrictKexinitTwiceClient, b"KEXINIT during a key exchange"),
    ],
)
def test_second_kexinit_in_the_initial_kex_disconnects(
    clientClass: type, description: bytes
) -> None:
    """
    A client's second KEXINIT before its NEWKEYS ends the initial key exchange with a
    protocol error: under strict kex as the Terrapin rules say (any message the exchange
    does not need), without it as a KEXINIT out of place. Conch's server took the second
    as the exchange's (negotiating again) and raised RuntimeError out of the read at a
    third; without strict kex here, at the second (its own KEXINIT was sent first).
    """
    server, client, pump = connect(FastServer, clientClass)
    assert server.strictKex == (clientClass is KexinitTwiceClient)
    assert server.disconnects == [(transport.DISCONNECT_PROTOCOL_ERROR, description)]
    assert client.secured == 0
    assert pump.serverIO.disconnected


def test_crossing_kexinits_then_another_rekey() -> None:
    """
    Both sides start a re-exchange at once (each reads the other's KEXINIT after
    sending its own): one exchange, not a KEXINIT out of place; the next one, after
    both NEWKEYS, is a new exchange on either side.
    """
    server, client, pump = connect()
    for first, second in ((client, server), (server, client)):
        first.sendKexInit()
        second.sendKexInit()
        pump.flush()
        echo(client, pump, [b"after crossing"])
        first.sendKexInit()
        pump.flush()
        echo(client, pump, [b"after another"])
    assert client.secured == 5  # the client's count of NEWKEYS
    assert server.disconnects == client.disconnects == []


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


# -- chacha20-poly1305@openssh.com ------------------------------------------
#
# A reference written from OpenSSH's PROTOCOL.chacha20poly1305 and the
# primitives' definitions (RFC 8439 sections 2.3 and 2.5), in plain Python, so
# the codec is checked against the spec and not against itself.


def _chachaBlock(key: bytes, counterAndNonce: bytes) -> bytes:
    """One 64-byte ChaCha20 block: state words 12-15 are the 16 bytes given."""
    state = [
        *struct.unpack("<4L", b"expand 32-byte k"),
        *struct.unpack("<8L", key),
        *struct.unpack("<4L", counterAndNonce),
    ]
    x = list(state)

    def quarterRound(a: int, b: int, c: int, d: int) -> None:
        for p, q, r, bits in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
            x[p] = (x[p] + x[q]) & 0xFFFFFFFF
            v = x[r] ^ x[p]
            x[r] = ((v << bits) | (v >> (32 - bits))) & 0xFFFFFFFF

    for _ in range(10):
        for a, b, c, d in (
            (0, 4, 8, 12),
            (1, 5, 9, 13),
            (2, 6, 10, 14),
            (3, 7, 11, 15),
            (0, 5, 10, 15),
            (1, 6, 11, 12),
            (2, 7, 8, 13),
            (3, 4, 9, 14),
        ):
            quarterRound(a, b, c, d)
    return struct.pack("<16L", *((i + j) & 0xFFFFFFFF for i, j in zip(x, state, strict=True)))


def _chachaStream(key: bytes, nonce: bytes, counter: int, n: int) -> bytes:
    """Keystream in the original (and OpenSSH's) layout: 64-bit LE block counter, 64-bit nonce."""
    out = b""
    while len(out) < n:
        out += _chachaBlock(key, counter.to_bytes(8, "little") + nonce)
        counter += 1
    return out[:n]


def _poly1305(key: bytes, message: bytes) -> bytes:
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    p = (1 << 130) - 5
    acc = 0
    for i in range(0, len(message), 16):
        acc = (acc + int.from_bytes(message[i : i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) % (1 << 128)).to_bytes(16, "little")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(i ^ j for i, j in zip(a, b, strict=True))


def referenceChaChaPacket(key: bytes, seq: int, plainPacket: bytes) -> bytes:
    """The wire form of one packet (length field included, MAC appended) per the spec."""
    k2, k1 = key[:32], key[32:64]  # "The first 256 bits constitute K_2 and the second K_1"
    nonce = seq.to_bytes(8, "big")  # the sequence number as a uint64
    length = _xor(plainPacket[:4], _chachaStream(k1, nonce, 0, 4))
    polyKey = _chachaStream(k2, nonce, 0, 32)  # block counter 0
    body = _xor(plainPacket[4:], _chachaStream(k2, nonce, 1, len(plainPacket) - 4))
    return length + body + _poly1305(polyKey, length + body)


def test_reference_primitives_match_rfc8439() -> None:
    """The test's ChaCha20 and Poly1305 give RFC 8439's published test vectors."""
    # Appendix A.1, test vector 1: all-zero key, nonce and counter.
    assert _chachaBlock(bytes(32), bytes(16)) == bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    # Section 2.4.2: key 00..1f, counter 1, nonce 00000000 0000004a 00000000.
    block = _chachaBlock(
        bytes(range(32)), struct.pack("<L", 1) + bytes.fromhex("0" * 14 + "4a" + "0" * 8)
    )
    assert _xor(block[:16], b"Ladies and Gentl") == bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981"
    )
    # Section 2.5.2.
    assert _poly1305(
        bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b"),
        b"Cryptographic Forum Research Group",
    ) == bytes.fromhex("a8061dc1305136c6c22b8baf0c0127a9")


class _FixedPadding:
    """Deterministic padding for known-answer tests (the real pool is random)."""

    def take(self, n: int) -> bytes:
        return bytes(range(0xA0, 0xA0 + n))


KAT_KEY = bytes(range(64))
#: From referenceChaChaPacket (the spec, above) for KAT_KEY, sequence number
#: 7, message 94 with payload b"known answer" and padding a0 a1 ...: pinned
#: so that the codec and the reference cannot drift together.
KAT_WIRE = bytes.fromhex(
    "a39afcb2"  # the length (24), encrypted with K_1
    "22187e2d21f4447e0d03c887b2fd738d96119493d844952a"  # padding length, type, payload, padding
    "a3dbf440701b88adc1023770f4615130"  # Poly1305 tag
)


@pytest.mark.parametrize("seq", [0, 7, 0x7FFFFFFF, 0xFFFFFFFF])
@pytest.mark.parametrize("size", [0, 1, 12, 63, 64, 1000, 32768])
def test_chacha20_poly1305_known_answer(
    monkeypatch: pytest.MonkeyPatch, seq: int, size: int
) -> None:
    """Sealing gives byte for byte what PROTOCOL.chacha20poly1305 prescribes (K_2 the first
    half of the key, K_1 the second; nonce the sequence number; Poly1305 key from block 0,
    payload from block 1; tag over encrypted length and payload), and opening it gives the
    payload back; the key is cut to 64 bytes from the longer derived key Conch provides."""
    monkeypatch.setattr(fastpath, "_padding", _FixedPadding())
    payload = random.Random(size).randbytes(size)
    derived = KAT_KEY + b"\xff" * 64
    sealer = fastpath.makeCodec(CHACHA, b"hmac-sha2-256", b"iv" * 32, derived, b"i" * 64, True)
    opener = fastpath.makeCodec(CHACHA, b"hmac-sha2-256", b"iv" * 32, derived, b"i" * 64, False)
    pad = 8 - (size + 2) % 8
    pad += 8 if pad < 4 else 0
    plain = struct.pack(">LBB", size + 2 + pad, pad, 94) + payload + _FixedPadding().take(pad)
    expected = referenceChaChaPacket(KAT_KEY, seq, plain)
    assert b"".join(sealer.seal(seq, 94, payload)) == expected
    assert opener.open(bytearray(b"xyz" + expected + b"next"), 3, seq) == (
        94,
        payload,
        3 + len(expected),
    )


def test_chacha20_poly1305_pinned_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    """One packet's wire bytes are pinned (computed once from the reference above)."""
    monkeypatch.setattr(fastpath, "_padding", _FixedPadding())
    sealer = fastpath.makeCodec(CHACHA, b"", b"", KAT_KEY, b"", True)
    assert b"".join(sealer.seal(7, 94, b"known answer")) == KAT_WIRE
    plain = struct.pack(">LBB", 24, 10, 94) + b"known answer" + _FixedPadding().take(10)
    assert referenceChaChaPacket(KAT_KEY, 7, plain) == KAT_WIRE


LENGTH_112 = 100  # a payload of 100 bytes makes a chacha20-poly1305 packet length of 112 (0x70)


@pytest.mark.parametrize(
    ("offset", "bit", "expected"),
    [
        # The length's top bit: 112 + 2^31, more than any packet may be.
        (0, 0x80, (transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % (112 | 1 << 31))),
        # 113: not a multiple of the 8-byte block.
        (3, 0x01, (transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet mod (113%8 == 1)")),
        # 96: plausible, so the MAC is computed over the wrong bytes and fails.
        (3, 0x10, (transport.DISCONNECT_MAC_ERROR, b"bad MAC")),
        # The tag's last byte.
        (-1, 0x01, (transport.DISCONNECT_MAC_ERROR, b"bad MAC")),
    ],
)
def test_chacha20_poly1305_tampered_length_or_tag_disconnects(
    offset: int, bit: int, expected: tuple[int, bytes]
) -> None:
    """A flipped bit in the encrypted length or in the tag ends the connection with a
    disconnect that says why, and nothing of the packet is delivered."""
    server, client, pump = connect(ciphers=[CHACHA])
    client.sendPacket(MSG_ECHO, b"a" * LENGTH_112)
    client.sendPacket(MSG_ECHO, b"b" * LENGTH_112)  # bytes enough for a lengthened packet
    wire = bytearray(b"".join(pump.clientIO.stream))
    wire[offset if offset >= 0 else len(wire) // 2 + offset] ^= bit
    pump.clientIO.stream = [bytes(wire)]
    pump.flush()
    assert server.disconnects == [expected]
    assert client.peerDisconnects == [expected]
    assert client.echo.received == []
    assert pump.serverIO.disconnected


def test_chacha20_poly1305_sequence_number_wraps() -> None:
    """At 2^32 packets the sequence number (the nonce) wraps to 0 as OpenSSH's 32-bit one
    does, both ends agree, and the wrap starts a key exchange on each side, after which
    strict kex restarts the numbers."""
    server, client, pump = connect(ciphers=[CHACHA])
    for side in (server, client):
        side.outgoingPacketSequence = side.incomingPacketSequence = 0xFFFFFFFE
    keys = server.currentEncryptions
    payloads = [b"one", b"two", b"three", b"four"]
    echo(client, pump, payloads)
    assert server.currentEncryptions is not keys
    assert server.disconnects == client.disconnects == []
    assert client.outgoingPacketSequence == server.incomingPacketSequence < 10
    echo(client, pump, [b"after"])


def test_key_exchange_after_2_31_packets_under_one_key() -> None:
    """Whatever the rekey settings, 2^31 packets sent under one set of keys start a key
    exchange (OpenSSH's limit), so the nonce never repeats under a key."""
    server, client, pump = connect(ciphers=[CHACHA])
    client.outgoingPacketSequence = server.incomingPacketSequence = (1 << 31) - 1
    client.sendPacket(MSG_ECHO, b"the 2^31st")
    assert client._keyExchangeState != client._KEY_EXCHANGE_NONE
    keys = client.currentEncryptions
    pump.flush()
    assert client.currentEncryptions is not keys
    assert client.echo.received == [b"the 2^31st"]
    assert client.outgoingPacketSequence == server.incomingPacketSequence < 10
    assert server.disconnects == client.disconnects == []


class NonStrictClient(FastClient):
    """An SSH client that does not offer strict kex (OpenSSH before 9.6 without the fix)."""

    def sendKexInit(self) -> None:
        transport.SSHClientTransport.sendKexInit(self)


class LoggedServer(FastServer):
    """Our server transport with the fast path's log events kept in a list."""

    events: list[dict[str, Any]] = []
    _fpLog = Logger(observer=cast(ILogObserver, events.append))


def test_chacha20_poly1305_without_strict_kex_works_and_is_logged() -> None:
    """A client that picks chacha20-poly1305 but offers no strict kex still connects, as
    with OpenSSH's sshd (refusing would lock out un-updated clients), and groundcontrol
    logs that the connection is exposed to Terrapin."""
    LoggedServer.events.clear()
    server, client, pump = connect(LoggedServer, NonStrictClient, ciphers=[CHACHA])
    assert server.currentEncryptions.inCipType == CHACHA
    assert not server.strictKex and not client.strictKex
    echo(client, pump, [b"still works"])
    [event] = LoggedServer.events
    assert "Terrapin" in event["log_format"]


def test_strict_client_with_chacha_is_not_warned() -> None:
    """No Terrapin warning when strict kex was negotiated."""
    LoggedServer.events.clear()
    server, _client, _pump = connect(LoggedServer, FastClient, ciphers=[CHACHA])
    assert server.strictKex
    assert LoggedServer.events == []


def test_openssh_client_order_picks_chacha20_poly1305() -> None:
    """groundcontrol offers chacha20-poly1305 first, and a client with the stock OpenSSH
    order (chacha20-poly1305, CTR, then GCM) now negotiates it rather than aes128-ctr."""
    server, _client, _pump = connect(ciphers=OPENSSH_CLIENT_CIPHERS)
    assert server.supportedCiphers[0] == CHACHA
    assert server.currentEncryptions.inCipType == CHACHA
    assert server.currentEncryptions.outCipType == CHACHA
    assert server.strictKex


def test_agent_order_still_picks_aes128_gcm() -> None:
    """The agent's own order (its figures: cheaper per packet) keeps AES-128-GCM on the link."""
    server, _client, _pump = connect()
    assert server.currentEncryptions.inCipType == b"aes128-gcm@openssh.com"


@pytest.mark.parametrize("cipher", [CHACHA, b"aes128-gcm@openssh.com"])
def test_aead_needs_no_mac_in_common(cipher: bytes) -> None:
    """With an AEAD cipher the MAC lists are ignored (PROTOCOL.chacha20poly1305, "no MAC is
    required to be negotiated"): a client whose MACs we do not offer still connects, and the
    exchange hash still covers its KEXINIT as sent (else the host key signature would fail)."""
    server, client, pump = connect(ciphers=[cipher], macs=[b"umac-128-etm@openssh.com"])
    assert server.disconnects == client.disconnects == []
    assert server.currentEncryptions.inCipType == cipher
    assert server.otherKexInitPayload == client.ourKexInitPayload
    echo(client, pump, [b"implicit MAC"])
    client.sendKexInit()  # and again on a rekey
    pump.flush()
    echo(client, pump, [b"after rekey"])
    assert server.disconnects == client.disconnects == []


def test_ctr_still_needs_a_mac_in_common() -> None:
    """Without an AEAD cipher a MAC must still be agreed: no common MAC, no connection."""
    server, client, _pump = connect(ciphers=[b"aes128-ctr"], macs=[b"umac-128-etm@openssh.com"])
    failed = (transport.DISCONNECT_KEY_EXCHANGE_FAILED, b"couldn't match all kex parts")
    assert failed in server.disconnects + client.disconnects
    assert client.secured == 0


class RecordingConnection(connection.SSHConnection):
    """A connection service that records the channel messages it is given, in order."""

    def serviceStarted(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        self.got.append(("data", packet))

    def ssh_CHANNEL_EOF(self, packet: bytes) -> None:
        self.got.append(("eof", packet))


class OwnDispatchConnection(RecordingConnection):
    """A connection service with its own packetReceived: it must see every message."""

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.got.append(("packetReceived", messageNum))
        super().packetReceived(messageNum, packet)


def _serverWithService(svc: Any, direct: bool = True) -> tuple[Any, Any, iosim.IOPump, list[int]]:
    server, client, pump = connect()
    server.directChannelData = direct
    server.setService(svc)
    dispatched: list[int] = []
    original = server.dispatchMessage

    def spy(messageNum: int, payload: bytes) -> None:
        dispatched.append(messageNum)
        original(messageNum, payload)

    server.dispatchMessage = spy
    return server, client, pump, dispatched


def _sendDataEofData(client: Any, pump: iosim.IOPump) -> None:
    client.sendPacket(connection.MSG_CHANNEL_DATA, b"first")
    client.sendPacket(connection.MSG_CHANNEL_EOF, b"eof")
    client.sendPacket(connection.MSG_CHANNEL_DATA, b"second")
    pump.flush()


def test_channel_data_goes_straight_to_the_connection_service_in_order() -> None:
    """Under a connection service, CHANNEL_DATA reaches its ssh_CHANNEL_DATA without going
    through dispatchMessage, while other messages still do, and all arrive in the order
    they were sent (data, EOF, data read in one go)."""
    server, client, pump, dispatched = _serverWithService(RecordingConnection())
    _sendDataEofData(client, pump)
    assert server.service.got == [("data", b"first"), ("eof", b"eof"), ("data", b"second")]
    assert dispatched == [connection.MSG_CHANNEL_EOF]
    assert server.disconnects == []


def test_channel_data_keeps_the_generic_dispatch_when_it_is_not_stock() -> None:
    """A service with its own packetReceived, or a transport with directChannelData off,
    gets CHANNEL_DATA through dispatchMessage as Conch would deliver it; a service that is
    not a connection gets no direct handler at all."""
    server, client, pump, dispatched = _serverWithService(OwnDispatchConnection())
    _sendDataEofData(client, pump)
    assert dispatched == [94, 96, 94]
    assert server.service.got == [
        ("packetReceived", 94),
        ("data", b"first"),
        ("packetReceived", 96),
        ("eof", b"eof"),
        ("packetReceived", 94),
        ("data", b"second"),
    ]
    server, client, pump, dispatched = _serverWithService(RecordingConnection(), direct=False)
    _sendDataEofData(client, pump)
    assert dispatched == [94, 96, 94]
    assert server.service.got == [("data", b"first"), ("eof", b"eof"), ("data", b"second")]
    assert fastpath.channelDataHandler(EchoServerService()) is None
    assert fastpath.channelDataHandler(None) is None


def test_a_small_packet_is_one_write_a_large_one_its_parts() -> None:
    """A keystroke-sized packet goes down to the transport as one write of the whole
    packet; one above SMALL_WRITE_LIMIT as a writeSequence of its parts; both arrive."""
    _, client, pump = connect()
    calls: list[tuple[str, int]] = []
    serverIO = pump.serverIO
    write, writeSequence = serverIO.write, serverIO.writeSequence

    def recordWrite(data: bytes) -> None:
        calls.append(("write", 1))
        write(data)

    def recordWriteSequence(parts: list[bytes]) -> None:
        calls.append(("writeSequence", len(parts)))
        serverIO.write = write  # iosim's writeSequence writes through write()
        writeSequence(parts)
        serverIO.write = recordWrite

    serverIO.write, serverIO.writeSequence = recordWrite, recordWriteSequence
    small, large = b"k", b"L" * (fastpath.SMALL_WRITE_LIMIT + 1)
    echo(client, pump, [small, large])
    assert calls == [("write", 1), ("writeSequence", 2)]


GCM = b"aes128-gcm@openssh.com"
GCM_KEY = bytes(range(16))
GCM_IV = bytes(range(100, 112))


def _gcmPair() -> tuple[Any, Any]:
    sealer = fastpath.makeCodec(GCM, b"", GCM_IV, GCM_KEY, b"", True)
    opener = fastpath.makeCodec(GCM, b"", GCM_IV, GCM_KEY, b"", False)
    return sealer, opener


def _gcmPacket(counter: int, packetLen: int, padLen: int, body: bytes) -> bytes:
    """A packet as a peer would seal it, any fields it likes, with the right tag."""
    length = struct.pack(">L", packetLen)
    nonce = GCM_IV[:4] + counter.to_bytes(8, "big")
    return length + AESGCM(GCM_KEY).encrypt(nonce, bytes([padLen]) + body, length)


def test_aes_gcm_packets_match_the_standard() -> None:
    """
    A sealed AES-GCM packet is the length in clear, then padding length, message,
    payload and 4 to 19 bytes of padding to a multiple of 16, sealed under the fixed
    field and the counter, the counter going up by one per packet; it opens again,
    across a refill of the padding pool.
    """
    sealer, opener = _gcmPair()
    counter = int.from_bytes(GCM_IV[4:12], "big")
    buf = bytearray()
    fastpath._padding._pos = len(fastpath._padding._buf) - 3  # the pool runs out mid-way
    for n, payload in enumerate([b"", b"k", b"x" * 13, b"y" * 14, b"z" * 100]):
        length, sealed = sealer.seal(n, 94, payload)
        (packetLen,) = struct.unpack(">L", length)
        nonce = GCM_IV[:4] + (counter + n).to_bytes(8, "big")
        plain = AESGCM(GCM_KEY).decrypt(nonce, sealed, length)
        padLen = plain[0]
        assert packetLen == len(plain) and packetLen % 16 == 0
        assert 4 <= padLen <= 19
        assert plain[1] == 94 and plain[2 : len(plain) - padLen] == payload
        buf += length + sealed
    pos = 0
    for n, payload in enumerate([b"", b"k", b"x" * 13, b"y" * 14, b"z" * 100]):
        result = opener.open(buf, pos, n)
        assert result is not None
        messageNum, opened, pos = result
        assert (messageNum, opened) == (94, payload)
    assert pos == len(buf)


def test_aes_gcm_counter_wraps_at_64_bits() -> None:
    """The invocation counter wraps from 2^64 - 1 to 0 (RFC 5647 7.1), both ways."""
    sealer, opener = _gcmPair()
    sealer._counter = opener._counter = (1 << 64) - 1
    buf = bytearray()
    for payload in (b"last", b"first"):
        buf += b"".join(sealer.seal(0, 94, payload))
    assert sealer._counter == 1
    first = opener.open(buf, 0, 0)
    assert first is not None and first[1] == b"last"
    second = opener.open(buf, first[2], 0)
    assert second is not None and second[1] == b"first"
    # The second packet was sealed under counter 0.
    nonce = GCM_IV[:4] + bytes(8)
    AESGCM(GCM_KEY).decrypt(nonce, bytes(buf[first[2] + 4 :]), bytes(buf[first[2] : first[2] + 4]))


@pytest.mark.parametrize(
    ("packetLen", "why"),
    [(20, b"bad packet mod"), (4, b"bad packet length"), ((1 << 20) + 16, b"bad packet length")],
)
def test_aes_gcm_bad_length_is_refused(packetLen: int, why: bytes) -> None:
    """A length that is not a multiple of 16, too small or too large is refused before
    anything is waited for or decrypted."""
    _, opener = _gcmPair()
    with pytest.raises(fastpath.BadPacketError) as caught:
        opener.open(bytearray(struct.pack(">L", packetLen)), 0, 0)
    assert caught.value.description.startswith(why)


@pytest.mark.parametrize("padLen", [3, 15])
def test_aes_gcm_bad_padding_is_refused(padLen: int) -> None:
    """An authentic packet whose padding length is under 4 or leaves no message is refused."""
    _, opener = _gcmPair()
    counter = int.from_bytes(GCM_IV[4:12], "big")
    packet = _gcmPacket(counter, 16, padLen, bytes([94]) + bytes(14))
    with pytest.raises(fastpath.BadPacketError) as caught:
        opener.open(bytearray(packet), 0, 0)
    assert caught.value.description == b"bad padding length %d" % padLen
