#!/usr/bin/env python3
"""
bench/packet_micro.py: CPU per SSH packet, Conch's packet layer against accesstunnel.fastpath.

    .venv/bin/python bench/packet_micro.py

One thread, no sockets: for 48-byte and 32 KiB payloads, the microseconds to
seal one packet (build, pad, encrypt, MAC) and to open it (parse, decrypt,
verify), the fast path's seal on its own (open = the rest, less one copy of
the packet into the receive buffer), and the MAC constructions on their own.
Best of 40 short repeats, so background load inflates it less than the
end-to-end figures. The ratios are what bench/RESULTS.md ("Performance work")
quotes per lever.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys
import timeit
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from twisted.conch.ssh import transport
from twisted.internet.interfaces import ITransport

from accesstunnel import fastpath


class _Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def writeSequence(self, seq: Any) -> None:
        self.data.extend(seq)


def conchPair(cipher: bytes, mac: bytes) -> tuple[Any, Any]:
    """Two of Conch's own transports keyed to talk to each other."""
    sender = transport.SSHTransportBase()
    receiver = transport.SSHTransportBase()
    for t in (sender, receiver):
        # write and writeSequence are all the packet layer calls on its transport.
        t.transport = cast(ITransport, _Sink())
        t._keyExchangeState = t._KEY_EXCHANGE_NONE
    k = os.urandom(64)
    iv, integ = os.urandom(64), os.urandom(64)
    sender.currentEncryptions = transport.SSHCiphers(cipher, cipher, mac, mac)
    sender.currentEncryptions.setKeys(iv, k, iv, k, integ, integ)
    receiver.currentEncryptions = transport.SSHCiphers(cipher, cipher, mac, mac)
    receiver.currentEncryptions.setKeys(iv, k, iv, k, integ, integ)
    return sender, receiver


def fastPair(cipher: bytes, mac: bytes) -> tuple[Any, Any]:
    k = os.urandom(64)
    iv, integ = os.urandom(64), os.urandom(64)
    return (
        fastpath.makeCodec(cipher, mac, iv, k, integ, True),
        fastpath.makeCodec(cipher, mac, iv, k, integ, False),
    )


def timeIt(f: Any, n: int) -> float:
    n = max(n // 10, 50)
    return min(timeit.repeat(f, number=n, repeat=40)) / n * 1e6


def main() -> None:
    print(
        f"{'construction':52} {'48 B':>8} {'32 KiB':>8}  {'seal 48 B':>9} {'seal 32 KiB':>11}"
        "  (us per packet: seal + open, seal alone)"
    )
    for cipher, mac in [
        (b"aes128-ctr", b"hmac-sha2-256"),
        (b"aes256-ctr", b"hmac-sha2-512"),
        (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
        (b"aes128-gcm@openssh.com", b"hmac-sha2-256"),
        (b"aes256-gcm@openssh.com", b"hmac-sha2-256"),
        (b"chacha20-poly1305@openssh.com", b"hmac-sha2-256"),
    ]:
        row = []
        for size in (48, 32768):
            payload = os.urandom(size)
            n = 20000 if size < 100 else 2000
            if not mac.endswith(b"etm@openssh.com") and cipher.endswith(b"-ctr"):
                s, r = conchPair(cipher, mac)

                def conch(s: Any = s, r: Any = r, payload: bytes = payload) -> None:
                    s.sendPacket(94, payload)
                    r.buf = s.transport.data.pop()
                    assert r.getPacket()
                    s.incomingPacketSequence = 0

                row.append(("conch", timeIt(conch, n)))
            enc, dec = fastPair(cipher, mac)
            buf = bytearray()

            def fast(
                enc: Any = enc, dec: Any = dec, payload: bytes = payload, buf: bytearray = buf
            ) -> None:
                buf[:] = b"".join(enc.seal(0, 94, payload))
                assert dec.open(buf, 0, 0)

            row.append(("fastpath", timeIt(fast, n)))

            def seal(enc: Any = enc, payload: bytes = payload) -> None:
                enc.seal(0, 94, payload)

            row.append(("seal", timeIt(seal, n)))
        for label in ("conch", "fastpath"):
            vals = [v for (lab, v) in row if lab == label]
            if vals:
                implicit = cipher in fastpath.AEAD_CIPHERS
                name = f"{label} {cipher.decode()}" + ("" if implicit else f" + {mac.decode()}")
                line = f"{name:52} {vals[0]:8.2f} {vals[1]:8.2f}"
                if label == "fastpath":
                    seals = [v for (lab, v) in row if lab == "seal"]
                    line += f"  {seals[0]:9.2f} {seals[1]:11.2f}"
                print(line)

    print()
    print(f"{'HMAC-SHA-256 of seq + data':52} {'48 B':>8} {'32 KiB':>8}  (us)")
    key = os.urandom(32)
    seq = struct.pack(">L", 5)
    stdBase = hmac.HMAC(key, digestmod=hashlib.sha256)
    cBase = chmac.HMAC(key, hashes.SHA256())
    pre = fastpath.PrekeyedHMAC(hashlib.sha256, key)
    # The tuples below run two updates and a digest in one expression; mypy objects to
    # the Nones in them, but they stay so the figures compare with earlier runs'.
    for label, make in [
        ("hmac.new per packet (Conch)", lambda d: hmac.new(key, seq + d, hashlib.sha256).digest()),
        (
            "hmac.HMAC pre-keyed, .copy() per packet",
            lambda d: (lambda h: (h.update(seq), h.update(d), h.digest())[2])(stdBase.copy()),  # type: ignore[func-returns-value]
        ),
        (
            "cryptography HMAC pre-keyed, .copy() per packet",
            lambda d: (lambda h: (h.update(seq), h.update(d), h.finalize())[2])(cBase.copy()),  # type: ignore[func-returns-value]
        ),
        ("hashlib inner/outer states copied (fastpath)", lambda d: pre.digest(5, d)),
    ]:
        vals = []
        for size in (48, 32768):
            d = os.urandom(size)
            vals.append(timeIt(lambda make=make, d=d: make(d), 20000 if size < 100 else 2000))
        print(f"{label:52} {vals[0]:8.2f} {vals[1]:8.2f}")
    print()
    n = 20000
    print(f"padding: os.urandom(8) per packet {timeIt(lambda: os.urandom(8), n):.3f} us;")
    pool = fastpath._RandomPool()
    print(f"         8 KiB pool sliced        {timeIt(lambda: pool.take(8), n):.3f} us")


if __name__ == "__main__":
    main()
