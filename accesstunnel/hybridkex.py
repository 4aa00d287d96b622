"""
The client side of the post-quantum hybrid key exchange mlkem768x25519-sha256.

Conch's server answers it (C{SSHServerTransport._ssh_KEX_HYBRID_INIT}), but its client
does not offer it (Twisted issue 12624). The agent's link carries every session of a
device for months: under curve25519 alone, a recording of it could be decrypted by
whoever later has a quantum computer ("store now, decrypt later"). L{HybridKexClientMixin}
gives a Conch client transport the client's half, as draft-ietf-sshm-mlkem-hybrid-kex
and OpenSSH 9.9+ define it (and as Conch's server answers)::

    client: SSH_MSG_KEX_HYBRID_INIT (30)
              string C_INIT = C_PK2 (ML-KEM-768 encapsulation key, 1184 bytes)
                              || C_PK1 (X25519 public key, 32 bytes)
    server: SSH_MSG_KEX_HYBRID_REPLY (31)
              string K_S (host key), string S_REPLY = S_CT2 (ML-KEM-768
              ciphertext, 1088 bytes) || S_PK1 (X25519 public key, 32 bytes),
              string signature of H
    K = SHA-256(K_PQ || K_CL), encoded as a string (not an mpint)
    H = SHA-256(V_C, V_S, I_C, I_S, K_S, C_INIT, S_REPLY as strings, then K)

The link stays as safe as the stronger of the two: X25519 protects it if ML-KEM is
broken, ML-KEM if X25519 falls to a quantum computer.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
from collections.abc import Callable
from typing import Any, cast

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import x25519
from twisted.conch.ssh import keys, transport
from twisted.conch.ssh.common import NS, ffs, getNS
from twisted.internet import defer
from twisted.python.failure import Failure

try:
    from cryptography.hazmat.primitives.asymmetric import mlkem
except ImportError:  # cryptography before 47 (a distribution's, say)
    mlkem = None  # type: ignore[assignment]

#: The algorithm's name in KEXINIT.
MLKEM768X25519_SHA256 = b"mlkem768x25519-sha256"

#: Lengths the draft fixes (FIPS 203 for ML-KEM-768, RFC 7748 for X25519).
MLKEM768_ENCAPSULATION_KEY_LENGTH = 1184
MLKEM768_CIPHERTEXT_LENGTH = 1088
X25519_KEY_LENGTH = 32
S_REPLY_LENGTH = MLKEM768_CIPHERTEXT_LENGTH + X25519_KEY_LENGTH

#: The messages share their numbers with KEXDH_INIT and KEXDH_REPLY (as ECDH's do).
MSG_KEX_HYBRID_INIT = 30
MSG_KEX_HYBRID_REPLY = 31


def canDoMLKEM() -> bool:
    """
    Whether this cryptography can do ML-KEM-768: one before 47 has no ML-KEM, one built
    on an OpenSSL without it raises UnsupportedAlgorithm at key generation. A process
    that cannot would fail every handshake that chose the hybrid, on either side: the
    policy (accesstunnel.policy) then offers curve25519 alone, as before the hybrid.
    """
    if mlkem is None:
        return False
    try:
        mlkem.MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


#: This process can do the hybrid (L{canDoMLKEM}).
AVAILABLE = canDoMLKEM()


class HybridReplyError(ValueError):
    """The server's S_REPLY cannot be used: its words are the disconnect's description."""


def sharedSecret(pqSecret: bytes, classicalSecret: bytes) -> bytes:
    """
    K as the exchange hash and the key derivation take it: SHA-256 of the ML-KEM and
    X25519 secrets, encoded as an SSH string (the draft's K is a string, unlike
    curve25519's mpint).
    """
    return NS(hashlib.sha256(pqSecret + classicalSecret).digest())


def exchangeHash(
    *,
    clientVersion: bytes,
    serverVersion: bytes,
    clientKexInit: bytes,
    serverKexInit: bytes,
    hostKey: bytes,
    cInit: bytes,
    sReply: bytes,
    secret: bytes,
) -> bytes:
    """H, which the server signs and from which the session's keys come."""
    h = hashlib.sha256()
    for field in (clientVersion, serverVersion, clientKexInit, serverKexInit, hostKey):
        h.update(NS(field))
    h.update(NS(cInit))
    h.update(NS(sReply))
    h.update(secret)
    return h.digest()


def checkReplyLength(sReply: bytes) -> None:
    """
    @raise HybridReplyError: S_REPLY is not an ML-KEM-768 ciphertext and an X25519 key
        (a server that speaks another draft, or a reply cut or padded on the way).
    """
    if len(sReply) != S_REPLY_LENGTH:
        raise HybridReplyError(
            f"{MLKEM768X25519_SHA256.decode()}: the server's reply (S_REPLY) is "
            f"{len(sReply)} bytes, not {S_REPLY_LENGTH} "
            f"(a {MLKEM768_CIPHERTEXT_LENGTH}-byte ML-KEM-768 ciphertext and "
            f"a {X25519_KEY_LENGTH}-byte X25519 key)"
        )


@attrs.frozen
class ClientHalf:
    """The client's ephemeral keys for one exchange, and C_INIT, which offers them."""

    mlkemKey: mlkem.MLKEM768PrivateKey
    x25519Key: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> ClientHalf:
        return cls(mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    @property
    def cInit(self) -> bytes:
        """C_PK2 || C_PK1: the ML-KEM encapsulation key first, as the draft orders them."""
        return (
            self.mlkemKey.public_key().public_bytes_raw()
            + self.x25519Key.public_key().public_bytes_raw()
        )

    def finish(self, sReply: bytes) -> bytes:
        """
        K from the server's S_REPLY (S_CT2 || S_PK1).

        @raise HybridReplyError: S_REPLY is not 1120 bytes, or S_PK1 is a point that
            gives X25519 no secret (a low-order point, which RFC 7748 says to refuse).
            A ciphertext of the right length always decapsulates (ML-KEM's implicit
            rejection gives a secret the server cannot know), so a forged one fails
            at the signature.
        """
        checkReplyLength(sReply)
        ciphertext, serverPoint = (
            sReply[:MLKEM768_CIPHERTEXT_LENGTH],
            sReply[MLKEM768_CIPHERTEXT_LENGTH:],
        )
        try:
            classical = self.x25519Key.exchange(
                x25519.X25519PublicKey.from_public_bytes(serverPoint)
            )
        except ValueError:
            raise HybridReplyError(
                f"{MLKEM768X25519_SHA256.decode()}: the server's X25519 key is "
                "a low-order point (no shared secret)"
            ) from None
        return sharedSecret(self.mlkemKey.decapsulate(ciphertext), classical)


def _peerKeyExchanges(packet: bytes) -> list[bytes] | None:
    """The key exchange names of a KEXINIT payload, or None if it cannot be read."""
    try:
        names, _ = getNS(packet[16:])
    except (struct.error, IndexError, ValueError):
        return None
    return names.split(b",")


class HybridKexClientMixin:
    """
    mlkem768x25519-sha256 for a Conch client transport (before
    C{SSHClientTransport} in its bases). Offered where the transport's policy lists it.
    """

    supportedKeyExchanges: list[bytes] = [
        MLKEM768X25519_SHA256,
        *transport.SSHClientTransport.supportedKeyExchanges,
    ]
    #: The exchange in progress's keys, from our C_INIT until K is computed.
    _hybridHalf: ClientHalf | None = None

    # Conch's attributes this mixin uses (declared for type checkers).
    kexAlg: bytes | None
    ourVersionString: bytes
    otherVersionString: bytes
    ourKexInitPayload: bytes
    otherKexInitPayload: bytes
    sendPacket: Callable[[int, bytes], None]
    sendDisconnect: Callable[[int, bytes], None]
    verifyHostKey: Callable[[bytes, bytes], defer.Deferred[Any]]
    _keySetup: Callable[[bytes, bytes], None]

    def ssh_KEXINIT(self, packet: bytes) -> Any:
        """
        The server's KEXINIT. C{SSHClientTransport.ssh_KEXINIT} is Conch's negotiation
        (C{SSHTransportBase.ssh_KEXINIT}) followed by the first message of the chosen
        exchange, picked by its kind; it knows no hybrid and would ask for a
        Diffie-Hellman group. When the server's list makes the hybrid the choice (the
        client's first that the server offers, as Conch's negotiation picks), the
        negotiation is Conch's all the same and the first message is C_INIT.
        """
        peer = _peerKeyExchanges(packet)
        if peer is None or ffs(self.supportedKeyExchanges, peer) != MLKEM768X25519_SHA256:
            return super().ssh_KEXINIT(packet)  # type: ignore[misc]
        if transport.SSHTransportBase.ssh_KEXINIT(cast(Any, self), packet) is None:
            return None  # disconnected: nothing in common
        half = ClientHalf.generate()
        self._hybridHalf = half
        self.sendPacket(MSG_KEX_HYBRID_INIT, NS(half.cInit))
        return None

    def ssh_KEX_DH_GEX_GROUP(self, packet: bytes) -> Any:
        """Message 31: under the hybrid, the server's KEX_HYBRID_REPLY."""
        if self.kexAlg == MLKEM768X25519_SHA256:
            return self._ssh_KEX_HYBRID_REPLY(packet)
        return super().ssh_KEX_DH_GEX_GROUP(packet)  # type: ignore[misc]

    def _ssh_KEX_HYBRID_REPLY(self, packet: bytes) -> defer.Deferred[None] | None:
        """
        K_S, S_REPLY and the signature: the host key is checked first (the pin), then
        K and H computed and the signature verified, as Conch does for curve25519.
        """
        half = self._hybridHalf
        if half is None:
            self._hybridFailed(b"key exchange reply without our KEX_HYBRID_INIT")
            return None
        try:
            hostKey, sReply, signature, _ = getNS(packet, 3)
        except (struct.error, IndexError, ValueError):
            self._hybridFailed(
                MLKEM768X25519_SHA256 + b": the server's reply is cut short or malformed"
            )
            return None
        try:
            checkReplyLength(sReply)  # before the host key is looked at
        except HybridReplyError as e:
            self._hybridFailed(str(e).encode())
            return None
        fingerprint = b":".join(
            binascii.hexlify(bytes([byte])) for byte in hashlib.md5(hostKey).digest()
        )
        d = self.verifyHostKey(hostKey, fingerprint)
        d.addCallbacks(
            lambda _: self._continueHybridReply(half, hostKey, sReply, signature),
            self._hostKeyRefused,
        )
        return d

    def _continueHybridReply(
        self, half: ClientHalf, hostKey: bytes, sReply: bytes, signature: bytes
    ) -> None:
        self._hybridHalf = None  # the ephemeral keys go once K is known
        try:
            secret = half.finish(sReply)
        except HybridReplyError as e:
            self._hybridFailed(str(e).encode())
            return
        digest = exchangeHash(
            clientVersion=self.ourVersionString,
            serverVersion=self.otherVersionString,
            clientKexInit=self.ourKexInitPayload,
            serverKexInit=self.otherKexInitPayload,
            hostKey=hostKey,
            cInit=half.cInit,
            sReply=sReply,
            secret=secret,
        )
        try:
            signed = keys.Key.fromString(hostKey).verify(signature, digest)
        except (keys.BadKeyError, ValueError):
            signed = False
        if not signed:
            self._hybridFailed(b"bad signature")
            return
        self._keySetup(secret, digest)

    def _hostKeyRefused(self, failure: Failure) -> None:
        self._hybridHalf = None
        self.sendDisconnect(
            transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
            f"bad host key [{MLKEM768X25519_SHA256.decode()}] {failure.value}".encode(),
        )

    def _hybridFailed(self, description: bytes) -> None:
        self._hybridHalf = None
        self.sendDisconnect(transport.DISCONNECT_KEY_EXCHANGE_FAILED, description)
