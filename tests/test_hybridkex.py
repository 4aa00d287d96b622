"""
The client side of mlkem768x25519-sha256 (accesstunnel.hybridkex) in memory: against
Conch's server side (the one groundcontrol runs) over iosim, with and without our packet
layer, the two ends agreeing on K and H; across rekeys; falling back to curve25519 with a
server that does not offer the hybrid; the agent's real link to a real groundcontrol
choosing it; and a server reply that is malformed (wrong length, a low-order X25519 point,
a forged ciphertext, a cut packet, another host key) ending the handshake with a
disconnect that says what was wrong, before any key is used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any, cast

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS, getNS
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.test import iosim

from accesstunnel import fastpath, hybridkex, policy
from accesstunnel.keys import fingerprint
from agent import linklog
from agent.identity import ServerKeyPin
from agent.link import AgentLinkFactory, LinkSettings
from groundcontrol.testing import (
    InMemoryFleet,
    publicLine,
    refuseForwards,
    scriptedSessions,
)
from tests.test_fastpath import (
    ConchClient,
    ConchServer,
    FastServer,
    _Recording,
    connect,
    echo,
    mixedPayloads,
)

MLKEM = hybridkex.MLKEM768X25519_SHA256


class _KeysRecorded:
    """Records each K and H the transport derives its keys from."""

    def connectionMade(self) -> None:
        self.keySetups: list[tuple[bytes, bytes]] = []
        super().connectionMade()  # type: ignore[misc]

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        self.keySetups.append((sharedSecret, exchangeHash))
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]


class HybridClient(
    _KeysRecorded,
    _Recording,
    fastpath.FastPathMixin,
    hybridkex.HybridKexClientMixin,
    transport.SSHClientTransport,
):
    """The agent's transport stack (packet layer, hybrid kex) under the client policy."""


class PlainHybridClient(
    _KeysRecorded, _Recording, hybridkex.HybridKexClientMixin, transport.SSHClientTransport
):
    """The hybrid on Conch's own packet layer (no strict kex, no AEAD)."""


class RecordedFastServer(_KeysRecorded, FastServer):
    """groundcontrol's packet layer over Conch's server transport."""


class RecordedConchServer(_KeysRecorded, ConchServer):
    """Conch's own server transport."""


class ClassicalServer(RecordedFastServer):
    """A server that does not offer the hybrid (curve25519 only)."""

    def sendKexInit(self) -> None:
        self.supportedKeyExchanges = [b"curve25519-sha256"]
        super().sendKexInit()


@pytest.mark.parametrize(
    ("serverClass", "clientClass"),
    [(RecordedFastServer, HybridClient), (RecordedConchServer, PlainHybridClient)],
)
def test_client_and_server_agree(serverClass: type, clientClass: type) -> None:
    """
    The client offers mlkem768x25519-sha256 first, Conch's server answers it, and both
    derive their keys from the same K (a 32-byte SHA-256, as an SSH string) and the same
    H; the server's echo service then carries packets both ways.
    """
    server, client, pump = connect(serverClass, clientClass)
    assert client.kexAlg == server.kexAlg == MLKEM
    assert client.supportedKeyExchanges[0] == MLKEM
    assert client.secured == 1
    [(clientK, clientH)] = client.keySetups
    assert server.keySetups == [(clientK, clientH)]
    assert len(getNS(clientK)[0]) == 32 and getNS(clientK)[1] == b""
    assert client.sessionID == server.sessionID == clientH
    assert client._hybridHalf is None  # the ephemeral keys are gone
    echo(client, pump, [b"post-quantum", b""])
    assert server.disconnects == client.disconnects == []


def test_rekeys_run_the_hybrid_again() -> None:
    """Each rekey, from either side, is a fresh hybrid exchange: new K and H, same session."""
    server, client, pump = connect(RecordedFastServer, HybridClient)
    rng = random.Random(1)
    for side in (client, server):
        side.sendKexInit()
        pump.flush()
        echo(client, pump, mixedPayloads(rng)[:6])
    assert client.secured == 3
    assert client.keySetups == server.keySetups
    assert len({k for k, _ in client.keySetups}) == 3
    assert len({h for _, h in client.keySetups}) == 3
    assert client.sessionID == server.sessionID == client.keySetups[0][1]
    assert server.disconnects == client.disconnects == []


def test_falls_back_to_curve25519() -> None:
    """A server that does not offer the hybrid (an older one) gets curve25519-sha256."""
    server, client, pump = connect(ClassicalServer, HybridClient)
    assert client.kexAlg == server.kexAlg == b"curve25519-sha256"
    assert client.secured == 1
    echo(client, pump, [b"classical"])
    assert server.disconnects == client.disconnects == []


def test_plain_conch_client_is_not_offered_the_hybrid() -> None:
    """
    The client policy offers only what the transport implements: Conch's own client,
    which cannot do the hybrid, offers curve25519 (a test's client, groundcontrol.testing).
    """
    _, client, _ = connect(RecordedFastServer, ConchClient)
    assert MLKEM not in client.supportedKeyExchanges
    assert client.kexAlg == b"curve25519-sha256"
    assert policy.AGENT_KEY_EXCHANGES[0] == MLKEM


def test_shared_secret_is_the_drafts() -> None:
    """
    K from the client's half is SHA-256(K_PQ || K_CL) as a string, where K_PQ is what
    the ML-KEM encapsulation gave the server and K_CL the X25519 secret; C_INIT is the
    encapsulation key then the X25519 key (1184 + 32 bytes).
    """
    half = hybridkex.ClientHalf.generate()
    cInit = half.cInit
    assert len(cInit) == 1184 + 32
    encapsulationKey = mlkem.MLKEM768PublicKey.from_public_bytes(cInit[:1184])
    clientPoint = x25519.X25519PublicKey.from_public_bytes(cInit[1184:])
    pqSecret, ciphertext = encapsulationKey.encapsulate()
    serverKey = x25519.X25519PrivateKey.generate()
    classical = serverKey.exchange(clientPoint)
    sReply = ciphertext + serverKey.public_key().public_bytes_raw()
    expected = hashlib.sha256(pqSecret + classical).digest()
    assert half.finish(sReply) == NS(expected)


class _ForgingServer(RecordedFastServer):
    """Changes its KEX_HYBRID_REPLY's payload with C{forge} before sending it."""

    forge: Callable[[bytes], bytes] = staticmethod(lambda payload: payload)

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if messageType == hybridkex.MSG_KEX_HYBRID_REPLY and self.kexAlg == MLKEM:
            payload = type(self).forge(payload)
        super().sendPacket(messageType, payload)


def _forging(forge: Callable[[bytes], bytes]) -> type:
    return cast(Any, type("Forging", (_ForgingServer,), {"forge": staticmethod(forge)}))


def _withSReply(change: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    def forge(payload: bytes) -> bytes:
        hostKey, sReply, signature, rest = getNS(payload, 3)
        return NS(hostKey) + NS(change(sReply)) + NS(signature) + rest

    return forge


def _flipCiphertextBit(sReply: bytes) -> bytes:
    return bytes([sReply[0] ^ 1]) + sReply[1:]


_LENGTH_WORDS = (
    b"mlkem768x25519-sha256: the server's reply (S_REPLY) is %d bytes, not 1120 "
    b"(a 1088-byte ML-KEM-768 ciphertext and a 32-byte X25519 key)"
)


@pytest.mark.parametrize(
    ("forge", "expected"),
    [
        (
            _withSReply(lambda s: s[:-1]),
            (transport.DISCONNECT_KEY_EXCHANGE_FAILED, _LENGTH_WORDS % 1119),
        ),
        (
            _withSReply(lambda s: s[:1087] + s[1088:]),
            (transport.DISCONNECT_KEY_EXCHANGE_FAILED, _LENGTH_WORDS % 1119),
        ),
        (
            _withSReply(lambda s: s + b"\0"),
            (transport.DISCONNECT_KEY_EXCHANGE_FAILED, _LENGTH_WORDS % 1121),
        ),
        (
            _withSReply(lambda s: s[:1088] + b"\0" * 32),
            (
                transport.DISCONNECT_KEY_EXCHANGE_FAILED,
                b"mlkem768x25519-sha256: the server's X25519 key is a low-order point "
                b"(no shared secret)",
            ),
        ),
        (
            _withSReply(_flipCiphertextBit),
            (transport.DISCONNECT_KEY_EXCHANGE_FAILED, b"bad signature"),
        ),
        (
            lambda payload: payload[:100],
            (
                transport.DISCONNECT_KEY_EXCHANGE_FAILED,
                b"mlkem768x25519-sha256: the server's reply is cut short or malformed",
            ),
        ),
    ],
    ids=["short", "short-ciphertext", "long", "low-order-x25519", "forged-ciphertext", "cut"],
)
def test_malformed_reply_fails_the_handshake(
    forge: Callable[[bytes], bytes], expected: tuple[int, bytes]
) -> None:
    """
    A KEX_HYBRID_REPLY the client cannot use ends the connection with
    KEY_EXCHANGE_FAILED and words that say why, before NEWKEYS: no key is derived and
    nothing after it is accepted. A ciphertext of the right length but forged
    decapsulates to a secret the server does not have: the signature fails.
    """
    _, client, pump = connect(_forging(forge), HybridClient)
    assert client.disconnects == [expected]
    assert client.keySetups == [] and client.secured == 0
    assert client._hybridHalf is None
    assert pump.clientIO.disconnecting


def test_unpinned_host_key_is_refused() -> None:
    """The pin is checked before K is computed: another host key is HOST_KEY_NOT_VERIFIABLE."""

    class Refusing(HybridClient):
        def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Any:
            return defer.fail(ValueError("server host key does not match --server-key"))

    _, client, _ = connect(RecordedFastServer, Refusing)
    assert client.disconnects == [
        (
            transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
            b"bad host key [mlkem768x25519-sha256] server host key does not match --server-key",
        )
    ]
    assert client.keySetups == [] and client.secured == 0


def test_agent_link_to_groundcontrol_is_post_quantum() -> None:
    """
    The agent's real transport (agent.link) links to a real groundcontrol in memory with
    mlkem768x25519-sha256, and its line about the link says so (agent.linklog).
    """
    fleet = InMemoryFleet(clock=MemoryReactorClock())
    fleet.factory.doStart()
    deviceKey = fleet.enrollDevice("kiln7")
    settings = LinkSettings(
        name="kiln7",
        deviceKey=deviceKey,
        serverKey=ServerKeyPin(fingerprint(publicLine(fleet.hostKey))),
    )
    factory = AgentLinkFactory(settings, fleet.clock, scriptedSessions(), refuseForwards)
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        pump: iosim.IOPump = fleet.connect(factory)
        fleet.flush()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert fleet.registry.lookup("kiln7") is not None
    assert pump.client.kexAlg == pump.server.kexAlg == MLKEM
    [up] = [e for e in events if e.get("log_format") == linklog.LINK_UP]
    assert up["kex"] == "mlkem768x25519-sha256"


def test_server_reads_why_the_client_gave_up() -> None:
    """
    The client's DISCONNECT during the first, strict, key exchange reaches the server with
    its words (groundcontrol logs 'disconnected with code 3: ...'), as OpenSSH reads a
    DISCONNECT before its strict-kex check; our packet layer called it a strict KEX
    violation (unexpected packet type 1) and the agent's reason was lost.
    """
    lowOrder = _withSReply(lambda s: s[:1088] + b"\0" * 32)
    server, client, pump = connect(_forging(lowOrder), HybridClient)
    [said] = client.disconnects
    assert said[0] == transport.DISCONNECT_KEY_EXCHANGE_FAILED
    assert server.peerDisconnects == [said]
    assert server.disconnects == []
    assert pump.serverIO.disconnected


class _MLKEMUnsupported:
    """cryptography's mlkem module where its OpenSSL has no ML-KEM."""

    class MLKEM768PrivateKey:
        @staticmethod
        def generate() -> None:
            raise UnsupportedAlgorithm("ML-KEM-768 is not supported by this backend")


def test_can_do_mlkem_says_when_cryptography_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    ML-KEM is usable here; not with a cryptography before 47 (no mlkem module) or one
    whose OpenSSL lacks it (UnsupportedAlgorithm at key generation).
    """
    assert hybridkex.canDoMLKEM() and hybridkex.AVAILABLE
    monkeypatch.setattr(hybridkex, "mlkem", _MLKEMUnsupported)
    assert not hybridkex.canDoMLKEM()
    monkeypatch.setattr(hybridkex, "mlkem", None)
    assert not hybridkex.canDoMLKEM()


def test_without_mlkem_both_sides_offer_curve25519(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Where cryptography cannot do ML-KEM, neither the server policy nor the client policy
    offers the hybrid, and the two link with curve25519: offered, every handshake that
    chose it would fail (the server policy offered it whatever cryptography could do).
    """
    monkeypatch.setattr(hybridkex, "AVAILABLE", False)
    server, client, pump = connect(RecordedFastServer, HybridClient)
    assert MLKEM not in server.supportedKeyExchanges
    assert MLKEM not in client.supportedKeyExchanges
    assert client.kexAlg == server.kexAlg == b"curve25519-sha256"
    echo(client, pump, [b"classical"])
