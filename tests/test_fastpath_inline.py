"""
The AES-GCM seal and open that the fast packet layer writes out in C{sendPacket} and in its
read loop (accesstunnel.fastpath; AES-GCM carries every hop once logged in) against the
codec's own C{_AesGcm.seal} and C{_AesGcm.open}: a transport takes the written-out branch
when its codec is exactly C{_AesGcm}, and the codec's branch for any other codec class, so
each case runs twice, once with the codec as it is and once with the same codec under a
subclass, and the two must agree byte for byte: the packets sent (every size, a padding
pool refill, the counter's wrap, a large packet written as its parts), and for what is
received, good packets (whole, several in one read, split at every byte) and bad ones (a
length not a multiple of 16, too small, too large, bad padding, a bad tag), what reaches the
service, the disconnect sent and the counter. Our server and client transports over iosim.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from accesstunnel import fastpath
from tests.test_fastpath import MSG_ECHO, connect

GCM = b"aes128-gcm@openssh.com"


class _ViaCodec(fastpath._AesGcm):
    """The same AES-GCM codec, under another class: the transport calls its seal and open."""


BRANCHES = ["written out", "codec"]


def _gcmPair(branch: str) -> tuple[Any, Any, Any]:
    """A server and client on AES-GCM, logged into the echo service, on C{branch}."""
    server, client, pump = connect(ciphers=[GCM])
    for side in (server, client):
        assert type(side._fpIn) is fastpath._AesGcm and type(side._fpOut) is fastpath._AesGcm
        if branch == "codec":
            side._fpIn.__class__ = _ViaCodec
            side._fpOut.__class__ = _ViaCodec
    return server, client, pump


def _seal(codec: Any, body: bytes, padLen: int, packetLen: int | None = None) -> bytes:
    """A packet as a peer would seal it under C{codec}'s next nonce, any fields it likes."""
    n = 1 + len(body)
    length = struct.pack(">L", n if packetLen is None else packetLen)
    nonce = codec._fixed + codec._counter.to_bytes(8, "big")
    return length + codec._aead.encrypt(nonce, bytes([padLen]) + body, length)


def _peerCodec(server: Any) -> Any:
    """A sealer in step with C{server}'s incoming AES-GCM codec."""
    sealer = fastpath._AesGcm(b"\0" * 16, bytes(12))
    sealer._aead = server._fpIn._aead
    sealer._fixed = server._fpIn._fixed
    sealer._counter = server._fpIn._counter
    return sealer


def _echoPacket(sealer: Any, payload: bytes, padLen: int = 4) -> bytes:
    """A well-formed echo packet for C{payload}: padded to a multiple of 16, next counter."""
    n = 2 + len(payload) + padLen
    padLen += -n % 16
    packet = _seal(sealer, bytes([MSG_ECHO]) + payload + bytes(padLen), padLen)
    sealer._counter += 1
    return packet


def _received(branch: str, packets: Callable[[Any], list[bytes]]) -> dict[str, Any]:
    """
    Feed the server the reads C{packets(sealer)} gives, on C{branch}, and report what its
    echo service sent back to the client, the disconnects it sent and its counter.
    """
    server, client, pump = _gcmPair(branch)
    sealer = _peerCodec(server)
    for read in packets(sealer):
        server.dataReceived(read)
    pump.flush()
    return {
        "echoed": client.echo.received,
        "disconnects": server.disconnects,
        "counter": server._fpIn._counter - sealer._counter,
        "sequence": server.incomingPacketSequence,
    }


def _both(packets: Callable[[Any], list[bytes]]) -> dict[str, Any]:
    results = [_received(branch, packets) for branch in BRANCHES]
    assert results[0] == results[1]
    return results[0]


def test_good_packets_whole_together_and_split() -> None:
    """Packets of every size arrive the same, one per read, all in one read, or a byte a read."""
    payloads = [b"", b"k", b"x" * 13, b"y" * 14, b"z" * 15, b"w" * 100, b"v" * 40_000]

    def whole(sealer: Any) -> list[bytes]:
        return [_echoPacket(sealer, p) for p in payloads]

    def together(sealer: Any) -> list[bytes]:
        return [b"".join(whole(sealer))]

    def bytewise(sealer: Any) -> list[bytes]:
        data = b"".join(_echoPacket(sealer, p) for p in payloads[:5])
        return [data[i : i + 1] for i in range(len(data))]

    for feed, expected in ((whole, payloads), (together, payloads), (bytewise, payloads[:5])):
        result = _both(feed)
        assert result["echoed"] == expected
        assert result["disconnects"] == []
        assert result["counter"] == 0


@pytest.mark.parametrize(
    ("packetLen", "why"),
    [(20, b"bad packet mod"), (4, b"bad packet length"), ((1 << 20) + 16, b"bad packet length")],
)
def test_bad_length_is_refused_alike(packetLen: int, why: bytes) -> None:
    """A length that is not a multiple of 16, too small or too large: the same disconnect,
    nothing decrypted, after the good packet before it was delivered."""

    def feed(sealer: Any) -> list[bytes]:
        return [_echoPacket(sealer, b"ok") + struct.pack(">L", packetLen) + bytes(32)]

    result = _both(feed)
    assert result["echoed"] == [b"ok"]
    [(_code, description)] = result["disconnects"]
    assert description.startswith(why)
    assert result["counter"] == 0


@pytest.mark.parametrize("padLen", [3, 15])
def test_bad_padding_is_refused_alike(padLen: int) -> None:
    """An authentic packet whose padding length is under 4 or leaves no message."""

    def feed(sealer: Any) -> list[bytes]:
        return [_seal(sealer, bytes([MSG_ECHO]) + bytes(14), padLen)]

    result = _both(feed)
    assert result["echoed"] == []
    assert result["disconnects"] == [
        (fastpath.transport.DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % padLen)
    ]


def test_bad_tag_is_a_mac_error_alike() -> None:
    """One flipped bit in the ciphertext: the same MAC error, nothing delivered."""

    def feed(sealer: Any) -> list[bytes]:
        packet = bytearray(_echoPacket(sealer, b"tampered"))
        packet[9] ^= 0x01
        return [bytes(packet)]

    result = _both(feed)
    assert result["echoed"] == []
    assert result["disconnects"] == [(fastpath.transport.DISCONNECT_MAC_ERROR, b"bad MAC")]


def _sent(client: Any, pump: Any, branch: str, payload: bytes, poolPos: int, counter: int) -> Any:
    """The bytes C{client} writes for one echo packet on C{branch}, and its next counter,
    from the given padding pool position and counter (the same keys for both branches)."""
    codec = client._fpOut
    codec.__class__ = _ViaCodec if branch == "codec" else fastpath._AesGcm
    pool = fastpath._padding
    pool._buf = bytes(range(256)) * 32
    pool._pos = poolPos
    codec._counter = counter
    pump.clientIO.stream.clear()
    client.sendPacket(MSG_ECHO, payload)
    return b"".join(pump.clientIO.stream), codec._counter


@pytest.mark.parametrize("size", [0, 1, 11, 12, 13, 14, 15, 16, 100, 1024, 1025, 40_000])
@pytest.mark.parametrize("poolPos", [0, 8192 - 3])
def test_sealed_bytes_are_the_codecs(size: int, poolPos: int, monkeypatch: Any) -> None:
    """
    What sendPacket writes for a packet of every size is byte for byte what the codec's seal
    gives, with the pool refilled mid-way (its os.urandom made repeatable here) and the
    counter wrapping at 2^64; the packet opens under the standard AES-GCM.
    """
    monkeypatch.setattr(fastpath.os, "urandom", lambda n: bytes([7]) * n)
    payload = bytes([size % 251]) * size
    _server, client, pump = _gcmPair("written out")
    aead = client._fpOut._aead
    fixed = client._fpOut._fixed
    for counter in (5, (1 << 64) - 1):
        written = [_sent(client, pump, branch, payload, poolPos, counter) for branch in BRANCHES]
        assert written[0] == written[1]
        wire, after = written[0]
        assert after == (counter + 1) & ((1 << 64) - 1)
        (packetLen,) = struct.unpack(">L", wire[:4])
        plain = aead.decrypt(fixed + counter.to_bytes(8, "big"), wire[4:], wire[:4])
        padLen = plain[0]
        assert packetLen == len(plain) and packetLen % 16 == 0 and 4 <= padLen <= 19
        assert plain[1] == MSG_ECHO and plain[2 : len(plain) - padLen] == payload


def test_large_packets_are_written_as_their_parts() -> None:
    """Past SMALL_WRITE_LIMIT the length and the sealed rest go down as a writeSequence of
    two parts, on both branches; a keystroke is one write."""
    for branch in BRANCHES:
        _server, client, pump = _gcmPair(branch)
        calls: list[tuple[str, int]] = []
        io = pump.clientIO
        realWrite = io.write

        def write(data: bytes, _w: Any = realWrite, _calls: Any = calls) -> None:
            _calls.append(("write", 1))
            _w(data)

        def writeSequence(parts: Any, _w: Any = realWrite, _calls: Any = calls) -> None:
            _calls.append(("writeSequence", len(parts)))
            _w(b"".join(parts))

        io.write, io.writeSequence = write, writeSequence
        client.sendPacket(MSG_ECHO, b"k")
        client.sendPacket(MSG_ECHO, b"x" * (fastpath.SMALL_WRITE_LIMIT + 1))
        assert calls == [("write", 1), ("writeSequence", 2)], branch
        pump.flush()
        assert client.echo.received == [b"k", b"x" * (fastpath.SMALL_WRITE_LIMIT + 1)]
