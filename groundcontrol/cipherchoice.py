"""
After an operator logs in, move the connection to AES-GCM when both ends can.

In SSH the client's order picks the cipher: the server only decides what it offers.
The stock OpenSSH client ranks chacha20-poly1305 first, then the CTR ciphers, and
AES-GCM last, so an OpenSSH operator gets chacha20-poly1305 from groundcontrol. On a
CPU with AES instructions AES-GCM costs about half as much per packet, at both ends,
and groundcontrol relays every byte of every session, so its per-packet cost is the
product's capacity: measured here, bulk download 220-257 -> 349-364 MB/s through one
session and groundcontrol's CPU per GB halved; keystroke echo -9% (bench/RESULTS.md,
"Echo latency (session 6)" and "AES-GCM on the operator hop").

Offering AES-GCM alone from the start would lock out clients without it (PuTTY before
0.76, paramiko, Conch's client). Waiting for the client's KEXINIT before sending ours,
to tailor our offer, would deadlock with a client that waits for ours. So the first key
exchange stays as it is (every cipher of the policy, strict kex), and once the client
has logged in, if it listed AES-GCM in both directions and this CPU has AES
instructions, groundcontrol renews the keys offering only the AES-GCM ciphers the
client listed. Renewing keys is ordinary SSH (either side may, at any time); it costs
one key exchange and one round trip before the session's first channel opens.

Not while connections wait for a handshake slot (a reconnect storm): every round trip
then waits for a turn of a busy reactor, and setting up quickly is what matters then,
so the connection keeps what it negotiated (the storm runs with and without the renewal,
bench/RESULTS.md, "Session 6 end runs at `ee88b83`", do not establish how much it costs
during a storm; the gate costs nothing outside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.conch.ssh.common import getNS
from twisted.logger import Logger

__all__ = ["AES_GCM_CIPHERS", "AESGCMAfterLoginMixin", "cpuHasAES"]

#: The AES-GCM ciphers, in the order we would offer them.
AES_GCM_CIPHERS = (b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com")

_CPUINFO = Path("/proc/cpuinfo")


def cpuHasAES(cpuinfo: Path = _CPUINFO) -> bool:
    """
    Whether this CPU has AES instructions (x86's C{aes} flag, ARMv8's C{aes} feature),
    as Linux reports them. Without them AES-GCM is slower than chacha20-poly1305, so
    anything unreadable counts as no.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


class AESGCMAfterLoginMixin:
    """
    Mix into groundcontrol's server transport, before Conch's, next to
    L{accesstunnel.rekey}'s mixin, whose C{renewKeys} it calls. It reads the front
    door's setting (C{factory.settings.aesGCMAfterLogin}) and the client's ciphers
    from the KEXINIT Conch keeps for the exchange hash (C{otherKexInitPayload}).
    """

    _cipherLog = Logger()

    # Provided by the Conch transport this is mixed into.
    currentEncryptions: Any
    factory: Any
    otherKexInitPayload: bytes
    supportedCiphers: list[bytes]
    transport: Any

    def _clientCiphers(self) -> tuple[list[bytes], list[bytes]]:
        """The client's ciphers, client to server and server to client, from its KEXINIT."""
        try:
            lists = getNS(self.otherKexInitPayload[17:], 4)
        except Exception:
            return [], []
        return lists[2].split(b","), lists[3].split(b",")

    def preferAESGCM(self) -> bool:
        """
        Logged in: renew the keys offering only AES-GCM, if that is on, the
        connection does not run AES-GCM already and the client listed an AES-GCM
        cipher both ways. Whether a key exchange was started.
        """
        if not self.factory.settings.aesGCMAfterLogin:
            return False
        current = self.currentEncryptions
        running = (getattr(current, "outCipType", None), getattr(current, "inCipType", None))
        if all(name in AES_GCM_CIPHERS for name in running):
            return False
        toServer, toClient = self._clientCiphers()
        offer = [
            name
            for name in self.supportedCiphers
            if name in AES_GCM_CIPHERS and name in toServer and name in toClient
        ]
        if not offer:
            return False
        waiting = self.factory.handshakesWaiting()
        if waiting:
            self._cipherLog.info(
                "not switching to AES-GCM: {waiting} connections wait for a handshake slot",
                waiting=waiting,
            )
            return False
        offered, self.supportedCiphers = self.supportedCiphers, offer
        why = "switching to AES-GCM, which the client can do and this CPU runs fastest"
        if self.renewKeys(why):  # type: ignore[attr-defined]
            return True
        self.supportedCiphers = offered
        return False
