"""
Fuzzing groundcontrol's server transport before authentication (hypothesis; issue 8).

Three depths, each a fresh GroundControlTransport of the real front door:

  - raw bytes after a valid version line, on a StringTransport;
  - well-framed unencrypted packets of any type and payload (so every message handler
    Conch has before key exchange is reached, KEXINIT above all);
  - after a real key exchange with a Conch client in memory, encrypted packets of any
    type and payload, including the ssh-userauth service and USERAUTH_REQUESTs with any
    user name, method and key blob (so the userauth service, the key checker, the
    username parser and the realm see hostile input).

The properties: no exception escapes the transport, nothing is logged as a failure
(an unexpected error, or an unhandled error in a Deferred), the connection is either
dropped or still sane (its buffer bounded by the pre-auth packet limit), and no
malformed input authenticates anyone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import common, transport, userauth
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.preauth import PenaltyPolicy, PreauthGuard, guardOf
from groundcontrol.testing import InMemoryFleet, _PinningClientTransport, publicLine
from tests.test_preauth import CLIENT_VERSION, RawClient, kexInit, plainPacket

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FUZZ_KEX = settings(FUZZ, max_examples=120)

NS_USERAUTH = common.NS(b"ssh-userauth")

FLEET = InMemoryFleet()
# Every example breaks rules (or closes after a key exchange) from the same few addresses:
# penalties would refuse the rest.
FLEET.factory.preauthGuard = PreauthGuard(
    FLEET.clock, penalties=PenaltyPolicy(freeFailures=2**62, noauthRate=0)
)
OPERATOR_KEY = FLEET.addOperator("alice")


@contextmanager
def noFailuresLogged() -> Iterator[list[dict[str, Any]]]:
    """Collect log events carrying a failure; the test asserts there are none."""
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [(e.get("log_format"), e["log_failure"].getTraceback()) for e in failures]


def bufferBound() -> int:
    limits = guardOf(FLEET.factory).limits
    return limits.maxPacketLength + 4 + 64


def checkSane(client: RawClient) -> None:
    assert len(client.proto.buf) <= max(bufferBound(), 4096)
    assert getattr(client.proto, "avatar", None) is None


class RawBytesFuzz(SynchronousTestCase):
    """Arbitrary bytes after the version line."""

    @FUZZ
    @given(st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=8))
    @example([struct.pack(">LB", 1_000_000, 4)])
    @example([b"\0\0\0\x0c\x04\x14\0\0\0\0\0\0\0"])  # KEXINIT with no body at all
    def test_anyBytes(self, chunks: list[bytes]) -> None:
        """Whatever the bytes, no exception escapes and the buffer stays bounded."""
        with noFailuresLogged():
            client = RawClient(FLEET)
            client.send(CLIENT_VERSION)
            for chunk in chunks:
                client.send(chunk)
            checkSane(client)
            client.lose()

    @FUZZ
    @given(st.binary(max_size=400))
    def test_anyVersionLine(self, line: bytes) -> None:
        """Whatever comes instead of a version line, the connection is dropped or waits."""
        with noFailuresLogged():
            client = RawClient(FLEET)
            client.send(line + b"\r\n")
            checkSane(client)
            client.lose()


_messageTypes = st.one_of(
    st.sampled_from(
        [
            transport.MSG_DISCONNECT,
            transport.MSG_IGNORE,
            transport.MSG_UNIMPLEMENTED,
            transport.MSG_DEBUG,
            transport.MSG_SERVICE_REQUEST,
            transport.MSG_KEXINIT,
            transport.MSG_NEWKEYS,
            30,  # KEXDH_INIT / KEX_ECDH_INIT
            31,
            34,  # KEX_DH_GEX_REQUEST
            50,  # USERAUTH_REQUEST
        ]
    ),
    st.integers(0, 255),
)

_nameLists = st.lists(
    st.lists(
        st.sampled_from(
            [
                b"curve25519-sha256",
                b"mlkem768x25519-sha256",
                b"ssh-ed25519",
                b"aes128-ctr",
                b"hmac-sha2-256",
                b"none",
                b"zlib",
                b"ext-info-c",
                b"x" * 70,
                b"",
            ]
        ),
        max_size=4,
    ).map(lambda names: b",".join(names)),
    min_size=10,
    max_size=10,
)


class PacketFuzz(SynchronousTestCase):
    """Well-framed packets of any type before key exchange."""

    @FUZZ
    @given(
        st.lists(
            st.one_of(
                st.tuples(_messageTypes, st.binary(max_size=300)),
                st.tuples(st.just(transport.MSG_KEXINIT), _nameLists.map(kexInit)),
            ),
            min_size=1,
            max_size=6,
        )
    )
    @example([(transport.MSG_KEXINIT, kexInit()), (30, common.NS(b"\x01" * 32))])
    @example([(transport.MSG_KEXINIT, kexInit()), (30, common.NS(b"short"))])
    def test_anyPackets(self, packets: list[tuple[int, bytes]]) -> None:
        """Any sequence of unencrypted packets leaves the transport dropped or sane."""
        with noFailuresLogged():
            client = RawClient(FLEET)
            client.send(CLIENT_VERSION)
            for messageType, payload in packets:
                client.send(plainPacket(messageType, payload))
                if client.dropped:
                    break
            checkSane(client)
            client.lose()


class _SecureClient(_PinningClientTransport):
    """A Conch client that stops once the key exchange is done; the test sends the rest."""

    secure = False

    def connectionSecure(self) -> None:
        self.secure = True
        self.factory.client = self

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if self.secure and messageNum not in (transport.MSG_DISCONNECT, transport.MSG_KEXINIT):
            return  # the server's answers to what the fuzzer sent: not our concern
        super().dispatchMessage(messageNum, payload)


class _SecureClientFactory:
    protocol = _SecureClient
    hostKey = None
    client: _SecureClient | None = None
    disconnectReason: str | None = None
    lost = False

    def buildProtocol(self, addr: Any) -> _SecureClient:
        p = _SecureClient()
        p.factory = self
        return p

    def doStart(self) -> None:
        pass


_userauthPayload = st.one_of(
    st.binary(max_size=300),
    st.tuples(
        st.one_of(st.sampled_from([b"ctl", b"dev_kiln7", b"agent+kiln7"]), st.binary(max_size=80)),
        st.sampled_from([b"ssh-connection", b"ssh-userauth", b"x"]),
        st.sampled_from([b"publickey", b"none", b"password", b"keyboard-interactive", b"x"]),
        st.binary(max_size=200),
    ).map(lambda t: common.NS(t[0]) + common.NS(t[1]) + common.NS(t[2]) + t[3]),
    st.tuples(
        st.one_of(st.sampled_from([b"ctl", b"dev_x", b"agent+x"]), st.binary(max_size=40)),
        st.booleans(),
        st.sampled_from([b"ssh-ed25519", b"rsa-sha2-256", b"ssh-rsa", b"x"]),
        st.one_of(st.just(publicLine(OPERATOR_KEY).encode()), st.binary(max_size=120)),
        st.binary(max_size=100),
    ).map(
        lambda t: (
            common.NS(t[0])
            + common.NS(b"ssh-connection")
            + common.NS(b"publickey")
            + bytes((t[1],))
            + common.NS(t[2])
            + common.NS(t[3])
            + t[4]
        )
    ),
)


class EncryptedFuzz(SynchronousTestCase):
    """Packets after a real key exchange, before authentication."""

    @FUZZ_KEX
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just(transport.MSG_SERVICE_REQUEST), st.just(NS_USERAUTH)),
                st.tuples(st.just(userauth.MSG_USERAUTH_REQUEST), _userauthPayload),
                st.tuples(_messageTypes, st.binary(max_size=200)),
            ),
            min_size=1,
            max_size=8,
        )
    )
    @example([(transport.MSG_SERVICE_REQUEST, b"\0\0\0\x0cssh-userauth"), (50, b"\0\0\0\x01")])
    def test_anyEncryptedPackets(self, packets: list[tuple[int, bytes]]) -> None:
        """
        After key exchange, no sequence of packets makes the transport raise or log a
        failure, and none authenticates anyone without a valid signature.
        """
        with noFailuresLogged():
            factory = _SecureClientFactory()
            pump = FLEET.network.connect(FLEET.factory, factory)  # type: ignore[arg-type]
            client = factory.client
            assert client is not None and client.secure
            server = pump.server
            for messageType, payload in packets:
                if pump.clientIO.disconnected or pump.serverIO.disconnecting:
                    break
                client.sendPacket(messageType, payload)
                FLEET.flush()
            assert getattr(server, "avatar", None) is None
            assert len(server.buf) <= bufferBound()
            FLEET.network.cut(pump)

    def test_oversizedEncryptedPacket(self) -> None:
        """After key exchange, an unfinished packet over the pre-auth limit drops the client."""
        factory = _SecureClientFactory()
        pump = FLEET.network.connect(FLEET.factory, factory)  # type: ignore[arg-type]
        assert factory.client is not None
        factory.client.sendPacket(transport.MSG_IGNORE, common.NS(b"x" * 50_000))
        FLEET.flush()
        self.assertTrue(pump.serverIO.disconnecting)
        self.assertIn("packet of more than", pump.server._preauthViolation)
        FLEET.network.cut(pump)
