"""
A faster SSH binary packet layer for our own transports, with AEAD and strict key exchange.

L{FastPathMixin} goes in front of Conch's L{SSHServerTransport} or
L{SSHClientTransport} and replaces how packets are framed, encrypted,
authenticated and parsed (C{sendPacket}, C{dataReceived}/C{getPacket}), while
Conch keeps the key exchange and message dispatch. What it changes, each with
a figure in bench/RESULTS.md ("Performance work"):

  - MACs are HMAC-SHA-2 with the key schedule done once per key: the inner and
    outer hash states are pre-keyed and copied per packet instead of a new
    C{hmac.new} (and its key setup) for every packet;
  - the receive buffer is one C{bytearray}, parsed at an offset and trimmed
    once per read, with the ciphertext handed to OpenSSL through memoryviews;
  - an outgoing packet is built once and written as its parts, a small one
    (a keystroke) as one string;
  - channel data goes from the packet loop straight to the connection
    service's handler (L{FastPathMixin});
  - random padding comes from C{os.urandom} in bulk (8 KiB at a time) sliced
    per packet, not one C{getrandom} syscall per packet;
  - aes128-gcm@openssh.com and aes256-gcm@openssh.com (RFC 5647 as amended by
    OpenSSH's PROTOCOL: the packet length is clear and authenticated as
    associated data, the MAC is implied) through C{cryptography}'s AESGCM,
    chacha20-poly1305@openssh.com (OpenSSH's PROTOCOL.chacha20poly1305: the
    packet length encrypted under its own key, Poly1305 over the encrypted
    length and payload) through C{cryptography}'s ChaCha20 and Poly1305, and
    the encrypt-then-MAC forms hmac-sha2-256-etm@openssh.com and
    hmac-sha2-512-etm@openssh.com;
  - strict key exchange (kex-strict-s-v00@openssh.com /
    kex-strict-c-v00@openssh.com, OpenSSH's fix for the Terrapin attack,
    CVE-2023-48795) is offered in the first KEXINIT of every connection, so the
    AEAD and ETM algorithms are never offered without it. When both sides
    offer it: the peer's KEXINIT must be its first packet; any packet that the
    key exchange does not need during the initial key exchange (including
    IGNORE, DEBUG, UNIMPLEMENTED) disconnects; the sequence numbers restart at
    zero after every NEWKEYS sent or received. We never send IGNORE, DEBUG or
    UNIMPLEMENTED during the initial key exchange.
  - a key exchange is started after 2^31 packets sent under one set of keys
    (OpenSSH's limit), so that chacha20-poly1305's nonce, the 32-bit sequence
    number, never repeats under one key whatever the rekey settings.

Keys switch per direction at the protocol's points: outgoing right after our
NEWKEYS is written, incoming right after the peer's NEWKEYS is read (Conch
switches both when it reads the peer's NEWKEYS). Rekeying and Conch's holding
back of non-key-exchange messages during a key exchange
(C{_blockedByKeyExchange}) work as in Conch.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from types import MethodType
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh import service as _service
from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS, ffs, getNS
from twisted.logger import Logger

from accesstunnel import writethrough
from accesstunnel.addresses import describeAddress
from accesstunnel.handlerfault import MALFORMED, classify

__all__ = [
    "AEAD_CIPHERS",
    "CHACHA20_POLY1305",
    "ETM_MACS",
    "FIRST_UPPER_LAYER_MESSAGE",
    "SMALL_WRITE_LIMIT",
    "STRICT_KEX_CLIENT",
    "STRICT_KEX_SERVER",
    "FastCiphers",
    "FastPathMixin",
    "channelDataHandler",
]

STRICT_KEX_SERVER = b"kex-strict-s-v00@openssh.com"
STRICT_KEX_CLIENT = b"kex-strict-c-v00@openssh.com"

CHACHA20_POLY1305 = b"chacha20-poly1305@openssh.com"
_GCM_CIPHERS = {b"aes128-gcm@openssh.com": 16, b"aes256-gcm@openssh.com": 32}
#: AEAD ciphers: name -> key size. Their MAC is implied (the negotiated MAC
#: name is ignored, RFC 5647 section 7.3 as OpenSSH implements it).
AEAD_CIPHERS = {CHACHA20_POLY1305: 64, **_GCM_CIPHERS}
_CTR_CIPHERS = {b"aes128-ctr": 16, b"aes192-ctr": 24, b"aes256-ctr": 32}
#: MAC name -> (hash constructor, encrypt-then-MAC?)
_MACS: dict[bytes, tuple[Callable[..., Any], bool]] = {
    b"hmac-sha2-256-etm@openssh.com": (hashlib.sha256, True),
    b"hmac-sha2-512-etm@openssh.com": (hashlib.sha512, True),
    b"hmac-sha2-256": (hashlib.sha256, False),
    b"hmac-sha2-512": (hashlib.sha512, False),
}
ETM_MACS = [name for name, (_, etm) in _MACS.items() if etm]

#: Largest packet accepted (the same bound as Conch's).
MAX_PACKET = 1 << 20

_uint32 = struct.Struct(">L")
_lenPad = struct.Struct(">LB")
_lenPadType = struct.Struct(">LBB")
_padType = struct.Struct(">BB")
_SEQ_MASK = 0xFFFFFFFF
#: A key exchange starts when our outgoing sequence number reaches a multiple
#: of 2^31: under strict kex after 2^31 packets under one set of keys
#: (OpenSSH's MAX_PACKETS), without it at least every 2^31 packets, so no key
#: ever sees its sequence number wrap.
_REKEY_SEQ_MASK = 0x7FFFFFFF
_MSG_CHANNEL_DATA = 94
_MSG_CHANNEL_EXTENDED_DATA = 95
#: Messages of the connection and authentication layers (RFC 4250 4.1.2): sending
#: one of these may start a key re-exchange (accesstunnel.rekey); sending a
#: transport or key exchange message never does.
FIRST_UPPER_LAYER_MESSAGE = 50
#: The messages whose small packets give up the CPU once written: a session's bytes,
#: not the transport's or the connection's bookkeeping (accesstunnel.writethrough).
_INTERACTIVE_DATA = frozenset([_MSG_CHANNEL_DATA, _MSG_CHANNEL_EXTENDED_DATA])
#: AES-GCM's invocation counter is 64 bits.
_COUNTER_MASK = 0xFFFFFFFFFFFFFFFF
#: A packet whose parts add up to at most this many bytes is written as one
#: string: one C{write} down the transport layers instead of a
#: C{writeSequence} (an interactive keystroke or echo; bulk keeps its parts).
SMALL_WRITE_LIMIT = 1024
#: The key exchange method's own messages (RFC 4250 4.1.2).
_FIRST_KEX_METHOD_MESSAGE = 30
_LAST_KEX_METHOD_MESSAGE = 49
#: What a strict peer may send before the first NEWKEYS: the exchange's messages, and
#: DISCONNECT, whose words say why a peer gave up the exchange (a reply it could not
#: use); OpenSSH reads it before its own strict check, so does this layer.
_STRICT_ALLOWED = frozenset(
    [
        transport.MSG_DISCONNECT,
        transport.MSG_NEWKEYS,
        *range(_FIRST_KEX_METHOD_MESSAGE, _LAST_KEX_METHOD_MESSAGE + 1),
    ]
)
_HELD_DURING_INITIAL_KEX = frozenset(
    [transport.MSG_IGNORE, transport.MSG_DEBUG, transport.MSG_UNIMPLEMENTED]
)


class BadPacketError(Exception):
    """The peer sent a packet that cannot be accepted; the connection must end."""

    def __init__(self, code: int, description: bytes) -> None:
        super().__init__(code, description)
        self.code = code
        self.description = description


def _badMAC() -> BadPacketError:
    return BadPacketError(transport.DISCONNECT_MAC_ERROR, b"bad MAC")


class _RandomPool:
    """Padding bytes: C{os.urandom} drawn 8 KiB at a time, each byte used once."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._buf = b""
        self._pos = 0

    def reset(self) -> None:
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            self._buf = os.urandom(self._size)
            pos, end = 0, n
        self._pos = end
        return self._buf[pos:end]


_padding = _RandomPool()
os.register_at_fork(after_in_child=_padding.reset)


def _padLength(n: int, blockSize: int) -> int:
    """Padding for C{n} bytes that must end on a block boundary: 4 to 3 + blockSize."""
    pad = blockSize - (n % blockSize)
    return pad + blockSize if pad < 4 else pad


def _checkLength(packetLen: int, covered: int, blockSize: int) -> None:
    if packetLen > MAX_PACKET or packetLen < 8:
        raise BadPacketError(
            transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % packetLen
        )
    if covered % blockSize:
        raise BadPacketError(
            transport.DISCONNECT_PROTOCOL_ERROR,
            b"bad packet mod (%d%%%d == %d)" % (covered, blockSize, covered % blockSize),
        )


def _checkPadding(packetLen: int, padLen: int) -> None:
    if padLen < 4 or padLen + 2 > packetLen:
        raise BadPacketError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % padLen)


class PrekeyedHMAC:
    """HMAC (RFC 2104) with the inner and outer hash states keyed once, copied per packet.

    SSH takes the first C{digest_size} bytes of the derived key (RFC 4253 7.2).
    """

    def __init__(self, hashConstructor: Callable[..., Any], key: bytes) -> None:
        probe = hashConstructor()
        self.size: int = probe.digest_size
        key = key[: self.size].ljust(probe.block_size, b"\x00")
        self._inner = hashConstructor(key.translate(hmac.trans_36))
        self._outer = hashConstructor(key.translate(hmac.trans_5C))

    def digest(self, seq: int, first: Any, second: Any = b"") -> bytes:
        inner = self._inner.copy()
        inner.update(_uint32.pack(seq))
        inner.update(first)
        if second:
            inner.update(second)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()  # type: ignore[no-any-return]


class _Codec:
    """One direction of the binary packet protocol under one set of keys.

    C{seal} returns the wire bytes of one packet (as parts); C{open} parses one
    packet out of C{buf} at C{pos}, returning C{(messageNumber, payload,
    newPos)}, or None when more bytes are needed, or raising L{BadPacketError}.
    """

    blockSize = 8

    def seal(self, seq: int, messageType: int, payload: bytes) -> tuple[bytes, ...]:
        raise NotImplementedError

    def open(self, buf: bytearray, pos: int, seq: int) -> tuple[int, bytes, int] | None:
        raise NotImplementedError


class _Plain(_Codec):
    """No cipher, no MAC: the first key exchange only."""

    def seal(self, seq: int, messageType: int, payload: bytes) -> tuple[bytes, ...]:
        n = len(payload) + 6
        pad = _padLength(n, 8)
        return (_lenPadType.pack(n + pad - 4, pad, messageType) + payload + _padding.take(pad),)

    def open(self, buf: bytearray, pos: int, seq: int) -> tuple[int, bytes, int] | None:
        if len(buf) - pos < 5:
            return None
        packetLen, padLen = _lenPad.unpack_from(buf, pos)
        _checkLength(packetLen, packetLen + 4, 8)
        _checkPadding(packetLen, padLen)
        end = pos + 4 + packetLen
        if len(buf) < end:
            return None
        return buf[pos + 5], bytes(buf[pos + 6 : end - padLen]), end


PLAIN = _Plain()


class _CtrHmac(_Codec):
    """AES-CTR with HMAC-SHA-2 over the plaintext (encrypt-and-MAC, RFC 4253)."""

    blockSize = 16

    def __init__(self, context: Any, mac: PrekeyedHMAC) -> None:
        self._update = context.update
        self._mac = mac
        self._first: bytes | None = None

    def seal(self, seq: int, messageType: int, payload: bytes) -> tuple[bytes, ...]:
        n = len(payload) + 6
        pad = _padLength(n, 16)
        packet = b"".join(
            (_lenPadType.pack(n + pad - 4, pad, messageType), payload, _padding.take(pad))
        )
        return self._update(packet), self._mac.digest(seq, packet)

    def open(self, buf: bytearray, pos: int, seq: int) -> tuple[int, bytes, int] | None:
        avail = len(buf) - pos
        first = self._first
        if first is None:
            if avail < 16:
                return None
            first = self._first = self._update(buf[pos : pos + 16])
        packetLen, padLen = _lenPad.unpack_from(first)
        _checkLength(packetLen, packetLen + 4, 16)
        total = 4 + packetLen
        ms = self._mac.size
        if avail < total + ms:
            return None
        self._first = None
        with memoryview(buf) as view:
            rest = self._update(view[pos + 16 : pos + total])
            mac = self._mac.digest(seq, first, rest)
            if not hmac.compare_digest(mac, view[pos + total : pos + total + ms]):
                raise _badMAC()
        _checkPadding(packetLen, padLen)
        end = total - padLen
        if end <= 16:
            payload = first[6:end]
        else:
            with memoryview(first) as f, memoryview(rest) as r:
                payload = b"".join((f[6:], r[: end - 16]))
        return first[5], payload, pos + total + ms


class _CtrEtm(_Codec):
    """AES-CTR with HMAC-SHA-2 over the ciphertext (encrypt-then-MAC, OpenSSH PROTOCOL 1.5)."""

    blockSize = 16

    def __init__(self, context: Any, mac: PrekeyedHMAC) -> None:
        self._update = context.update
        self._mac = mac

    def seal(self, seq: int, messageType: int, payload: bytes) -> tuple[bytes, ...]:
        n = len(payload) + 2
        pad = _padLength(n, 16)
        length = _uint32.pack(n + pad)
        encrypted = self._update(
            b"".join((_padType.pack(pad, messageType), payload, _padding.take(pad)))
        )
        return length, encrypted, self._mac.digest(seq, length, encrypted)

    def open(self, buf: bytearray, pos: int, seq: int) -> tuple[int, bytes, int] | None:
        avail = len(buf) - pos
        if avail < 4:
            return None
        (packetLen,) = _uint32.unpack_from(buf, pos)
        _checkLength(packetLen, packetLen, 16)
        total = 4 + packetLen
        ms = self._mac.size
        if avail < total + ms:
            return None
        with memoryview(buf) as view:
            encrypted = view[pos + 4 : pos + total]
            mac = self._mac.digest(seq, view[pos : pos + 4], encrypted)
            if not hmac.compare_digest(mac, view[pos + total : pos + total + ms]):
                encrypted.release()
                raise _badMAC()
            plain = self._update(encrypted)
            encrypted.release()
        padLen = plain[0]
        _checkPadding(packetLen, padLen)
        return plain[1], plain[2 : packetLen - padLen], pos + total + ms


class _AesGcm(_Codec):
    """aes{128,256}-gcm@openssh.com: RFC 5647 with the length as associated data.

    The 12-byte nonce is a 4-byte fixed field and an 8-byte invocation counter
    (from the derived IV), the counter incremented after every packet.
    """

    blockSize = 16

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    # seal and open run once per packet (AES-GCM carries every hop once logged in):
    # the padding length, the nonce (the counter, used once, then incremented), the
    # padding bytes and the checks are written out here rather than called
    # (_padLength, _padding.take, _checkLength, _checkPadding: the same arithmetic
    # and checks, the helpers still raising the errors), a frame each fewer per
    # packet, paid cold after every keystroke's pause (bench/RESULTS.md, "Echo
    # latency (session 8)").

    def seal(self, seq: int, messageType: int, payload: bytes) -> tuple[bytes, ...]:
        n = len(payload) + 2
        pad = 16 - n % 16
        if pad < 4:
            pad += 16
        length = _uint32.pack(n + pad)
        pool = _padding
        start = pool._pos
        stop = start + pad
        if stop <= len(pool._buf):
            pool._pos = stop
            padding = pool._buf[start:stop]
        else:
            padding = pool.take(pad)
        counter = self._counter
        self._counter = (counter + 1) & _COUNTER_MASK
        plain = b"".join((_padType.pack(pad, messageType), payload, padding))
        return length, self._aead.encrypt(self._fixed + counter.to_bytes(8, "big"), plain, length)

    def open(self, buf: bytearray, pos: int, seq: int) -> tuple[int, bytes, int] | None:
        avail = len(buf) - pos
        if avail < 4:
            return None
        (packetLen,) = _uint32.unpack_from(buf, pos)
        if packetLen > MAX_PACKET or packetLen < 8 or packetLen % 16:
            _checkLength(packetLen, packetLen, 16)
        end = pos + 4 + packetLen + 16
        if len(buf) < end:
            return None
        counter = self._counter
        self._counter = (counter + 1) & _COUNTER_MASK
        nonce = self._fixed + counter.to_bytes(8, "big")
        with memoryview(buf) as view:
            try:
                plain = self._aead.decrypt(nonce, view[pos + 4 : end], view[pos : pos + 4])
            except InvalidTag:
                raise _badMAC() from None
        padLen = plain[0]
        if padLen < 4 or padLen + 2 > packetLen:
            _checkPadding(packetLen, padLen)
        return plain[1], plain[2 : packetLen - padLen], end


class _ChaChaPoly(_Codec):
    """chacha20-poly1305@openssh.com (OpenSSH's PROTOCOL.chacha20poly1305).

    The 64-byte key is K_2 (its first 32 bytes: payload and Poly1305 key) and
    K_1 (its last 32: the packet length). The nonce is the 32-bit sequence
    number as a big-endian uint64; cryptography's ChaCha20 takes it after an
    8-byte little-endian block counter (zero here). Block 0 of the K_2
    keystream gives the Poly1305 key, the payload is encrypted from block 1
    on; the tag covers the encrypted length and payload. One ChaCha20 context
    per key, re-nonced per packet (C{reset_nonce}), not built per packet.
    """

    blockSize = 8

    def __init__(self, key: bytes) -> None:
        zero = bytes(16)
        self._main = Cipher(algorithms.ChaCha20(key[:32], zero), None).encryptor()
        self._header = Cipher(algorithms.ChaCha20(key[32:64], zero), None).encryptor()
        #: The decrypted length of the packet being received, until it is whole.
        self._pendingLen = -1

    def seal(self, seq: int, messageType: int, payload: bytes) -> tuple[bytes, ...]:
        n = len(payload) + 2
        pad = _padLength(n, 8)
        nonce = _chachaNonce(seq)
        header = self._header
        header.reset_nonce(nonce)
        length = header.update(_uint32.pack(n + pad))
        main = self._main
        main.reset_nonce(nonce)
        polyKey = main.update(_ZERO_BLOCK)[:32]
        encrypted = main.update(
            b"".join((_padType.pack(pad, messageType), payload, _padding.take(pad)))
        )
        return length, encrypted, Poly1305.generate_tag(polyKey, length + encrypted)

    def open(self, buf: bytearray, pos: int, seq: int) -> tuple[int, bytes, int] | None:
        packetLen = self._pendingLen
        if packetLen < 0:
            if len(buf) - pos < 4:
                return None
            header = self._header
            header.reset_nonce(_chachaNonce(seq))
            (packetLen,) = _uint32.unpack(header.update(buf[pos : pos + 4]))
            _checkLength(packetLen, packetLen, 8)
            self._pendingLen = packetLen
        macStart = pos + 4 + packetLen
        end = macStart + 16
        if len(buf) < end:
            return None
        self._pendingLen = -1
        main = self._main
        main.reset_nonce(_chachaNonce(seq))
        polyKey = main.update(_ZERO_BLOCK)[:32]
        with memoryview(buf) as view:
            try:
                Poly1305.verify_tag(polyKey, view[pos:macStart], bytes(view[macStart:end]))
            except InvalidSignature:
                raise _badMAC() from None
            # Authenticated: decrypt the padding length and message number,
            # then the payload alone (the padding is never decrypted).
            padLen, messageNum = main.update(view[pos + 4 : pos + 6])
            _checkPadding(packetLen, padLen)
            payload = main.update(view[pos + 6 : macStart - padLen])
        return messageNum, payload, end


_ZERO_BLOCK = bytes(64)
_chachaNonce = struct.Struct(">8xQ").pack


def makeCodec(
    cipher: bytes, mac: bytes, iv: bytes, key: bytes, integrity: bytes, encrypt: bool
) -> _Codec:
    """The codec for one direction of a negotiated cipher and MAC with derived keys."""
    if cipher == CHACHA20_POLY1305:
        return _ChaChaPoly(key[:64])
    if cipher in _GCM_CIPHERS:
        return _AesGcm(key[: _GCM_CIPHERS[cipher]], iv[:12])
    if cipher not in _CTR_CIPHERS or mac not in _MACS:
        raise ValueError(f"the fast path does not implement {cipher!r} with {mac!r}")
    ctr = Cipher(algorithms.AES(key[: _CTR_CIPHERS[cipher]]), modes.CTR(iv[:16]))
    context = ctr.encryptor() if encrypt else ctr.decryptor()
    hashConstructor, etm = _MACS[mac]
    macState = PrekeyedHMAC(hashConstructor, integrity)
    return _CtrEtm(context, macState) if etm else _CtrHmac(context, macState)


class FastCiphers(transport.SSHCiphers):
    """Conch's negotiated-algorithms record, keyed into fast-path codecs.

    C{outCodec}/C{inCodec} are taken (and cleared) by the transport when it
    switches each direction to the new keys.
    """

    outCodec: _Codec | None = None
    inCodec: _Codec | None = None

    def setKeys(
        self,
        outIV: bytes,
        outKey: bytes,
        inIV: bytes,
        inKey: bytes,
        outInteg: bytes,
        inInteg: bytes,
    ) -> None:
        self.outCodec = makeCodec(self.outCipType, self.outMACType, outIV, outKey, outInteg, True)
        self.inCodec = makeCodec(self.inCipType, self.inMACType, inIV, inKey, inInteg, False)
        # What Conch reads from this record elsewhere (the client checks
        # encBlockSize to see whether its keys are ready).
        self.encBlockSize = self.outCodec.blockSize
        self.decBlockSize = self.inCodec.blockSize
        self.verifyDigestSize = getattr(getattr(self.inCodec, "_mac", None), "size", 0)

    def encrypt(self, blocks: bytes) -> bytes:
        raise NotImplementedError("the fast path encrypts whole packets")

    def decrypt(self, blocks: bytes) -> bytes:
        raise NotImplementedError("the fast path decrypts whole packets")


def channelDataHandler(service: Any) -> Callable[[bytes], None] | None:
    """
    The method Conch's dispatch would give an SSH_MSG_CHANNEL_DATA payload to
    under C{service}, when that dispatch is the stock one: the service's
    C{ssh_CHANNEL_DATA}, if it runs L{SSHService.packetReceived} unchanged and
    names message 94 C{MSG_CHANNEL_DATA} (an C{SSHConnection}); else None.
    """
    if service is None or type(service).packetReceived is not _service.SSHService.packetReceived:
        return None
    if getattr(service, "protocolMessages", {}).get(_MSG_CHANNEL_DATA) != "MSG_CHANNEL_DATA":
        return None
    return getattr(service, "ssh_CHANNEL_DATA", None)


class FastPathMixin:
    """
    The fast packet layer; put it before Conch's server or client transport in the bases.

    Once the connection service runs, SSH_MSG_CHANNEL_DATA goes from the
    packet loop straight to its C{ssh_CHANNEL_DATA} (L{channelDataHandler}),
    in order with every other message, which still goes through
    C{dispatchMessage}: the same call Conch's dispatch ends in, without its
    three method lookups per packet. A transport class whose own
    C{dispatchMessage} must see channel data after login sets
    L{directChannelData} to False.
    """

    _fpLog = Logger()

    #: What this layer implements; the policy picks from these
    #: (accesstunnel.policy), so a plain Conch transport is never offered them.
    supportedCiphers = [*AEAD_CIPHERS, *_CTR_CIPHERS]
    supportedMACs = list(_MACS)
    supportedCompressions = [b"none"]

    _fpIn: _Codec = PLAIN
    _fpOut: _Codec = PLAIN
    _fpBuf: bytearray
    _fpClosed = False
    _fpProcessing = False
    _fpNewKeysRead = False
    _fpAwaitingKeys = False
    _fpOfferedStrict = False
    _fpKexinitReceived = False
    #: The peer's KEXINIT of the key exchange now running was read (until its NEWKEYS).
    _fpPeerKexinitRead = False
    #: Strict key exchange negotiated (both sides offered it in their first KEXINIT).
    strictKex = False
    #: Until our first NEWKEYS is sent.
    _fpInitialOut = True
    #: Give channel data straight to the connection service (see the class docstring).
    directChannelData = True
    _fpChannelData: Callable[[bytes], None] | None = None
    #: The steady path is installed (see L{enterSteadyState}).
    steady = False
    #: What this class's own C{dataReceived} and C{sendPacket} do per read and per
    #: packet once steady is what the steady path does (see L{enterSteadyState}).
    steadyCovers = frozenset({"dataReceived", "sendPacket"})
    # What the steady path does for the layers above it, when they are mixed in
    # (accesstunnel.keepalive's and accesstunnel.rekey's state; inert without them).
    keepalive: Any = None
    _rekeyBytes = 0
    _rekeyBytesLimit = 0

    # Conch's attributes this mixin uses (declared for type checkers).
    transport: Any
    isClient: bool
    gotVersion: bool
    buf: bytes
    sessionID: bytes | None
    nextEncryptions: Any
    supportedKeyExchanges: list[bytes]
    incomingPacketSequence: int
    outgoingPacketSequence: int
    outgoingCompression: Any
    _keyExchangeState: str
    _KEY_EXCHANGE_NONE: str
    otherKexInitPayload: bytes
    #: None, or during a key exchange the (type, payload) messages held back. Any: Conch
    #: declares it as a bare None, which a narrower type here would conflict with.
    _blockedByKeyExchange: Any

    def connectionMade(self) -> None:
        self._fpBuf = bytearray()
        super().connectionMade()  # type: ignore[misc]

    def connectionLost(self, reason: Any = None) -> None:
        self._fpClosed = True
        self._fpChannelData = None
        super().connectionLost(reason)  # type: ignore[misc]

    def setService(self, service: Any) -> None:
        super().setService(service)  # type: ignore[misc]
        self._fpChannelData = (
            channelDataHandler(getattr(self, "service", None)) if self.directChannelData else None
        )

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        super().sendDisconnect(reason, desc)  # type: ignore[misc]
        self._fpClosed = True

    # -- key exchange -----------------------------------------------------

    def sendKexInit(self) -> None:
        if self.sessionID is not None or self._fpOfferedStrict:
            super().sendKexInit()  # type: ignore[misc]
            return
        # First KEXINIT: offer strict key exchange as a pseudo-algorithm. The
        # list Conch negotiates from stays without it.
        exchanges = self.supportedKeyExchanges
        self.supportedKeyExchanges = [
            *exchanges,
            STRICT_KEX_CLIENT if self.isClient else STRICT_KEX_SERVER,
        ]
        try:
            super().sendKexInit()  # type: ignore[misc]
        finally:
            self.supportedKeyExchanges = exchanges
        self._fpOfferedStrict = True

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        """
        Conch's dispatch, but two key exchange messages out of place end the
        connection with a protocol error, which no correct peer sends:

          - a key exchange method's message (30-49) outside a key exchange:
            Conch would answer it from the last exchange's state, send NEWKEYS
            and switch its own keys alone;
          - the peer's KEXINIT again before its NEWKEYS ended the exchange its
            first one began: Conch negotiates again from the second (and the
            client sends a second key exchange init), and raises RuntimeError
            out of the read at the third ("Cannot send KEXINIT while key
            exchange state is '_KEY_EXCHANGE_PROGRESSING'").

        OpenSSH's kex_protocol_error logs either, answers UNIMPLEMENTED and
        goes on, but for a strict first exchange, which it ends ("strict KEX
        violation: unexpected packet type 20"), as L{getPacket} does here for
        a second KEXINIT before this sees it. Channel data comes through here
        only until the connection service runs, or when L{directChannelData}
        is off (L{_fpSteadyRead}).
        """
        if messageNum == transport.MSG_KEXINIT:
            if self._fpPeerKexinitRead:
                self._fpRefuseKexinitAgain()
                return
            self._fpPeerKexinitRead = True
        elif (
            _FIRST_KEX_METHOD_MESSAGE <= messageNum <= _LAST_KEX_METHOD_MESSAGE
            and self._keyExchangeState == self._KEY_EXCHANGE_NONE
        ):
            self.sendDisconnect(
                transport.DISCONNECT_PROTOCOL_ERROR,
                b"key exchange message %d outside a key exchange" % messageNum,
            )
            return
        super().dispatchMessage(messageNum, payload)  # type: ignore[misc]

    def _fpRefuseKexinitAgain(self) -> None:
        """The peer sent KEXINIT twice in one key exchange: say so, and disconnect."""
        self._fpLog.info(
            "{peer} sent KEXINIT again during a key exchange; disconnecting",
            peer=describeAddress(getattr(self.transport, "getPeer", lambda: None)()),
        )
        self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"KEXINIT during a key exchange")

    def ssh_KEXINIT(self, packet: bytes) -> Any:
        negotiable = self._fpImplicitMACs(packet)
        if negotiable is packet:
            return self._fpKexinit(packet)
        try:
            return self._fpKexinit(negotiable)
        finally:
            # The exchange hash covers the peer's KEXINIT as it was sent.
            self.otherKexInitPayload = bytes((transport.MSG_KEXINIT,)) + packet

    def _fpImplicitMACs(self, packet: bytes) -> bytes:
        """
        The peer's KEXINIT, with its MAC list for a direction replaced by our
        first MAC where that direction negotiates an AEAD cipher and no MAC is
        in common: an AEAD cipher's MAC is implied, so, as OpenSSH does, no
        MAC needs to be negotiated for it (Conch's negotiation would otherwise
        fail the key exchange). Unchanged (the same object) in every other case.
        """
        ourMACs = self.supportedMACs
        try:
            *lists, rest = getNS(packet[16:], 10)
        except Exception:
            return packet  # Conch's own parsing reports it
        changed = False
        for cipherIndex, macIndex in ((2, 4), (3, 5)):
            peerCiphers = lists[cipherIndex].split(b",")
            peerMACs = lists[macIndex].split(b",")
            if self.isClient:
                cipher = ffs(self.supportedCiphers, peerCiphers)
                mac = ffs(ourMACs, peerMACs)
            else:
                cipher = ffs(peerCiphers, self.supportedCiphers)
                mac = ffs(peerMACs, ourMACs)
            if cipher in AEAD_CIPHERS and mac is None and ourMACs:
                lists[macIndex] = ourMACs[0]
                changed = True
        if not changed:
            return packet
        return packet[:16] + b"".join(NS(names) for names in lists) + rest

    def _fpKexinit(self, packet: bytes) -> Any:
        if not self._fpKexinitReceived:
            self._fpKexinitReceived = True
            try:
                peerExchanges = getNS(packet[16:])[0].split(b",")
            except Exception:
                peerExchanges = []
            peerMarker = STRICT_KEX_SERVER if self.isClient else STRICT_KEX_CLIENT
            if self._fpOfferedStrict and peerMarker in peerExchanges:
                self.strictKex = True
                if self.incomingPacketSequence != 1:
                    self.sendDisconnect(
                        transport.DISCONNECT_PROTOCOL_ERROR,
                        b"strict KEX violation: KEXINIT was not the first packet",
                    )
                    return None
            result = super().ssh_KEXINIT(packet)  # type: ignore[misc]
            if not self.strictKex:
                self._fpWarnTerrapin()
            return result
        return super().ssh_KEXINIT(packet)  # type: ignore[misc]

    def _fpWarnTerrapin(self) -> None:
        """
        chacha20-poly1305 was negotiated with a peer that did not offer strict
        kex (e.g. an OpenSSH older than 9.6 without the backported fix). We
        offered it, so the peer could have had it; refusing would lock such
        clients out, so, as OpenSSH's sshd does, the connection goes on, and
        the log says it is exposed to Terrapin (CVE-2023-48795) prefix
        truncation.
        """
        negotiated = self.nextEncryptions
        if CHACHA20_POLY1305 in (
            getattr(negotiated, "outCipType", None),
            getattr(negotiated, "inCipType", None),
        ):
            peer = getattr(self.transport, "getPeer", lambda: None)()
            self._fpLog.warn(
                "{peer} negotiated chacha20-poly1305@openssh.com without strict key exchange: "
                "exposed to the Terrapin attack (CVE-2023-48795); its SSH software needs an update",
                peer=peer,
            )

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        negotiated = self.nextEncryptions
        self.nextEncryptions = FastCiphers(
            negotiated.outCipType, negotiated.inCipType, negotiated.outMACType, negotiated.inMACType
        )
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]

    def _newKeys(self) -> None:
        # The peer's NEWKEYS was read: switch the incoming direction.
        codec = getattr(self.nextEncryptions, "inCodec", None)
        if codec is None:
            self.sendDisconnect(
                transport.DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS without a key exchange"
            )
            return
        self.nextEncryptions.inCodec = None
        self._fpIn = codec
        # The peer's exchange is over: its next KEXINIT starts another.
        self._fpPeerKexinitRead = False
        if self.strictKex:
            self.incomingPacketSequence = 0
        self._fpNewKeysRead = False
        if self.buf:
            # What followed NEWKEYS in Conch's buffer is ours to parse now.
            self._fpBuf += self.buf
            self.buf = b""
        resume = self._fpAwaitingKeys
        self._fpAwaitingKeys = False
        super()._newKeys()  # type: ignore[misc]
        if resume and not self._fpProcessing:
            self._fpSteadyRead(b"", False)

    def _sentNewKeys(self) -> None:
        # Our NEWKEYS is on the wire: switch the outgoing direction.
        codec = getattr(self.nextEncryptions, "outCodec", None)
        if codec is not None:
            self.nextEncryptions.outCodec = None
            self._fpOut = codec
        if self.strictKex:
            self.outgoingPacketSequence = 0
        self._fpInitialOut = False

    def _allowedKeyExchangeMessageType(self, messageType: int) -> bool:
        if self._fpInitialOut and messageType in _HELD_DURING_INITIAL_KEX:
            return False  # a strict peer would disconnect
        return super()._allowedKeyExchangeMessageType(messageType)  # type: ignore[misc,no-any-return]

    # -- the steady state -------------------------------------------------

    def _steadyReady(self) -> bool:
        """
        Whether every layer of this transport has nothing left to do per read but
        what the steady path does; layers above this one that act only for a while
        (quick ACKs, pre-login limits) add their condition and call this one.
        """
        return self._fpIn is not PLAIN and not self._fpClosed

    def enterSteadyState(self) -> bool:
        """
        Install the steady path, if this transport is ready for it: whether it runs.

        Between the socket and the packet loop, every read goes down one method per
        layer (quick ACKs, the keepalive's clock, the rekey byte count, the pre-login
        limits, this layer's buffer), and every packet sent through two. Once the
        connection is logged in and on its keys, what they do per read and per packet
        is fixed, so instance attributes shadow C{dataReceived} with
        L{_fpSteadyRead}, which does all of it in one frame, and C{sendPacket} with
        this layer's own, which also counts for the rekey layer. Each of those frames
        is paid cold by every keystroke after its pause (bench/RESULTS.md, "Echo
        latency (session 8)").

        Installed only when each class above this one that defines C{dataReceived}
        or C{sendPacket} lists it in its own C{steadyCovers} (a subclass that adds
        per-read work keeps the full chain), when L{_steadyReady} says so, and when
        neither method is already shadowed on the instance. A layer below that
        already calls this transport's C{dataReceived} directly (a wrapper that
        stepped aside) is pointed at the steady read too. Nothing needs undoing:
        none of the conditions can become false again on a connection.
        """
        if self.steady:
            return True
        if "dataReceived" in vars(self) or "sendPacket" in vars(self):
            return False
        for cls in type(self).__mro__:
            if cls is FastPathMixin:
                break
            covers = vars(cls).get("steadyCovers", frozenset())
            if any(name in vars(cls) and name not in covers for name in self.steadyCovers):
                return False
        if not self._steadyReady():
            return False
        chain = self.dataReceived
        self.steady = True
        self.dataReceived = self._fpSteadyRead  # type: ignore[method-assign]
        self.sendPacket = MethodType(FastPathMixin.sendPacket, self)  # type: ignore[method-assign]
        # Layers below that kept a reference to the chain (Twisted's endpoint wrapper,
        # the handshake limiter once it steps aside) call the steady read instead.
        layer: Any = self.transport
        for _ in range(8):
            if layer is None:
                break
            callers: tuple[Any, ...] = (layer, getattr(layer, "protocol", None))
            for caller in callers:
                if getattr(caller, "__dict__", {}).get("dataReceived") == chain:
                    caller.dataReceived = self._fpSteadyRead
            layer = getattr(layer, "transport", None)
        return True

    def _fpSteadyRead(self, data: bytes, account: bool = True) -> None:
        """
        C{dataReceived} once steady: the keepalive's clock (L{Keepalive.received}),
        the rekey layer's byte count and its limit, this layer's buffer and packet
        loop, in that order, as the layers' own methods would, in one frame.

        With C{account} false, the packet layer's own part alone (the buffer and the
        loop: L{dataReceived} below the layers' chain, and L{_newKeys} resuming with
        C{b""}). A read that arrives while the loop runs (a handler that reads) is
        only buffered: the running loop takes it. The loop stops at the end of the
        buffer without asking the codec, which would only say it needs more.
        """
        if account:
            keepalive = self.keepalive
            if keepalive is not None:
                keepalive.lastReceived = keepalive.now()
            self._rekeyBytes += len(data)
        buf = self._fpBuf
        buf += data
        if not self._fpProcessing:
            pos = 0
            messageNum = -1
            self._fpProcessing = True
            try:
                while pos < len(buf) and not (self._fpClosed or self._fpAwaitingKeys):
                    codec = self._fpIn
                    try:
                        result = codec.open(buf, pos, self.incomingPacketSequence)
                    except BadPacketError as e:
                        self.sendDisconnect(e.code, e.description)
                        break
                    if result is None:
                        break
                    messageNum, payload, pos = result
                    self.incomingPacketSequence = (self.incomingPacketSequence + 1) & _SEQ_MASK
                    if messageNum == _MSG_CHANNEL_DATA:
                        channelData = self._fpChannelData
                        if channelData is not None:
                            channelData(payload)
                            continue
                    self.dispatchMessage(messageNum, payload)
                    if (
                        messageNum == transport.MSG_NEWKEYS
                        and self._fpIn is codec
                        and not self._fpClosed
                    ):
                        # A re-exchange whose keys are not ready on our side yet:
                        # read nothing more until they are.
                        self._fpAwaitingKeys = True
            except MALFORMED as e:
                # A message its handler cannot parse (a payload too short for its
                # fields, a name that is not ASCII: what Conch's and our parsers raise
                # then): the peer is broken or hostile. End the connection as for a bad
                # packet, with one line, not an exception out of the read (a traceback
                # per attempt). The same types raised in our own code are a bug of ours:
                # a failure, traceback and all (accesstunnel.handlerfault). Either way
                # the line says where.
                fault = classify(e)
                if fault.ours:
                    self._fpLog.failure(
                        "message {messageNum} failed in our handler at {module}.{function}"
                        " line {line}; disconnecting",
                        messageNum=messageNum,
                        **fault.where(),
                    )
                    self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"internal error")
                else:
                    self._fpLog.info(
                        "malformed message {messageNum} from the peer ({error!r} in"
                        " {module}.{function} line {line}); disconnecting",
                        messageNum=messageNum,
                        error=e,
                        **fault.where(),
                    )
                    self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"malformed message")
            finally:
                self._fpProcessing = False
                if pos:
                    del buf[:pos]
        if account and self._rekeyBytesLimit and self._rekeyBytes >= self._rekeyBytesLimit:
            self._startRekey("bytes")  # type: ignore[attr-defined]

    # -- sending ----------------------------------------------------------

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if (
            self._keyExchangeState != self._KEY_EXCHANGE_NONE
            and not self._allowedKeyExchangeMessageType(messageType)
        ):
            assert self._blockedByKeyExchange is not None
            self._blockedByKeyExchange.append((messageType, payload))
        else:
            seq = self.outgoingPacketSequence
            parts = self._fpOut.seal(seq, messageType, payload)
            if len(parts) == 1:
                self.transport.write(parts[0])
            elif len(payload) <= SMALL_WRITE_LIMIT:
                self.transport.write(b"".join(parts))
            else:
                self.transport.writeSequence(parts)
            seq = self.outgoingPacketSequence = (seq + 1) & _SEQ_MASK
            if messageType == transport.MSG_NEWKEYS:
                self._sentNewKeys()
            elif not seq & _REKEY_SEQ_MASK:
                self._fpRekeyForSequence()
            if (
                len(payload) <= writethrough.YIELD_AFTER_SEND_LIMIT
                and messageType in _INTERACTIVE_DATA
            ):  # the size first: a bulk packet stops at the cheaper test
                # A keystroke or its echo, just written: the process it woke may run
                # ahead of the rest of this turn (accesstunnel.writethrough).
                writethrough.yieldAfterSend()
        if self.steady:
            # Called directly once steady (L{enterSteadyState}): the rekey layer's
            # count and limit (accesstunnel.rekey's sendPacket), held packets included.
            self._rekeyBytes += len(payload)
            if (
                self._rekeyBytesLimit
                and self._rekeyBytes >= self._rekeyBytesLimit
                and messageType >= FIRST_UPPER_LAYER_MESSAGE
            ):
                self._startRekey("bytes")  # type: ignore[attr-defined]

    def _fpRekeyForSequence(self) -> None:
        """2^31 packets sent under these keys: renew them before the sequence number wraps."""
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE or self._fpClosed:
            return
        startRekey = getattr(self, "_startRekey", None)  # accesstunnel.rekey, when mixed in
        if startRekey is not None:
            startRekey("packets")
        else:
            self.sendKexInit()

    # -- receiving --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._fpIn is PLAIN:
            # Until the peer's first NEWKEYS: Conch's own loop (the version
            # line, the first key exchange) over self.buf, through getPacket
            # below, so that wrappers of getPacket see what they expect.
            super().dataReceived(data)  # type: ignore[misc]
            return
        self._fpSteadyRead(data, False)

    def getPacket(self) -> bytes | None:
        """Conch's API: the next packet (message number and payload), if it is whole."""
        if self._fpIn is PLAIN:
            if self._fpClosed or self._fpAwaitingKeys:
                return None
            if self._fpNewKeysRead:
                # The peer's NEWKEYS was read but our keys are not ready yet
                # (the client is still checking the host key): read nothing
                # more until they are.
                self._fpAwaitingKeys = True
                return None
            packet: bytes | None = super().getPacket()  # type: ignore[misc]
            if not packet:
                return packet
            messageNum = packet[0]
            if self.strictKex and messageNum not in _STRICT_ALLOWED:
                self.sendDisconnect(
                    transport.DISCONNECT_PROTOCOL_ERROR,
                    b"strict KEX violation: unexpected packet type %d" % messageNum,
                )
                return None
            if messageNum == transport.MSG_NEWKEYS:
                self._fpNewKeysRead = True
            return packet
        if self.buf:
            self._fpBuf += self.buf
            self.buf = b""
        if self._fpClosed or self._fpAwaitingKeys:
            return None
        try:
            result = self._fpIn.open(self._fpBuf, 0, self.incomingPacketSequence)
        except BadPacketError as e:
            self.sendDisconnect(e.code, e.description)
            return None
        if result is None:
            return None
        messageNum, payload, end = result
        del self._fpBuf[:end]
        self.incomingPacketSequence = (self.incomingPacketSequence + 1) & _SEQ_MASK
        return bytes((messageNum,)) + payload
