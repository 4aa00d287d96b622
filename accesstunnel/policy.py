"""
The SSH algorithm policy of every Access Tunnel endpoint.

One list per algorithm kind, applied to transport subclasses as instance
attributes (never by mutating Conch's class-level lists, which other code in
the process may rely on). The project's DESIGN.md lists what is allowed and why: modern key
exchange only, ChaCha20-Poly1305, AES-GCM and CTR ciphers with SHA-2 MACs
(encrypt-then-MAC first), Ed25519/RSA-SHA2 host keys, no compression.

The AEAD ciphers and ETM MACs are implemented by our own packet layer
(accesstunnel.fastpath), which also offers strict key exchange (the Terrapin
fix) in every first KEXINIT, so they are never offered without it. Each list
below is filtered by what the transport class implements: a plain Conch
transport is offered the CTR ciphers and the plain MACs only.
"""

from __future__ import annotations

from typing import Any

from accesstunnel import hybridkex

#: Key exchange, strongest first. The post-quantum hybrid leads; the
#: libssh.org alias of curve25519 is the same algorithm under its older name.
KEY_EXCHANGES = [
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
]

#: Key exchanges that hold against a quantum computer (a post-quantum KEM in a hybrid): a
#: link made with another could be decrypted from a recording once one exists. Agents link
#: with mlkem768x25519-sha256 since dfa74d6; older agents with curve25519-sha256.
POST_QUANTUM_KEY_EXCHANGES = frozenset(
    {"mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com"}
)


def isPostQuantum(kex: str) -> bool:
    """Whether the key exchange named C{kex} (C{mlkem768x25519-sha256}) is post-quantum."""
    return kex in POST_QUANTUM_KEY_EXCHANGES


def negotiatedKex(transport: Any) -> str | None:
    """The key exchange an SSH transport negotiated (its C{kexAlg}), or None before one."""
    kex = getattr(transport, "kexAlg", None)
    return kex.decode("ascii", "replace") if isinstance(kex, bytes) else None


#: Server preference. The client's order decides in SSH, so what matters here
#: is what is offered: the stock OpenSSH client ranks chacha20-poly1305 first,
#: then aes128-ctr, and GCM last, so without chacha20-poly1305 it picks CTR +
#: HMAC, 1.6 times the CPU per 32 KiB packet (bench/RESULTS.md, "Performance
#: work"). After login groundcontrol moves a client that lists AES-GCM to it
#: (groundcontrol.cipherchoice): half chacha20-poly1305's cost with AES-NI.
#: chacha20-poly1305 is the Terrapin-affected cipher: it is only ever offered
#: by the fast packet layer, whose first KEXINIT always carries strict kex.
CIPHERS = [
    b"chacha20-poly1305@openssh.com",
    b"aes256-gcm@openssh.com",
    b"aes128-gcm@openssh.com",
    b"aes256-ctr",
    b"aes128-ctr",
]
MACS = [
    b"hmac-sha2-512-etm@openssh.com",
    b"hmac-sha2-256-etm@openssh.com",
    b"hmac-sha2-512",
    b"hmac-sha2-256",
]

#: When the agent is the client its order decides. AES-128-GCM costs a fifth
#: of AES-128-CTR with HMAC-SHA-256 per 32 KiB packet (bench/RESULTS.md), and
#: AES-128 with HMAC-SHA-256 half of AES-256 with HMAC-SHA-512, all still
#: strong, so the link between agent and server prefers the cheaper ones.
#: chacha20-poly1305 is not offered: 2.5 times GCM's CPU per 32 KiB packet and
#: 3 times per 48-byte one (with AES-NI; Poly1305 costs ~2 us a packet to key).
AGENT_CIPHERS = [
    b"aes128-gcm@openssh.com",
    b"aes256-gcm@openssh.com",
    b"aes128-ctr",
    b"aes256-ctr",
]
AGENT_MACS = [
    b"hmac-sha2-256-etm@openssh.com",
    b"hmac-sha2-512-etm@openssh.com",
    b"hmac-sha2-256",
    b"hmac-sha2-512",
]

HOST_KEY_ALGORITHMS = [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"]
COMPRESSIONS = [b"none"]


def _implemented(available: list[bytes], wanted: list[bytes]) -> list[bytes]:
    """C{wanted}, in its order, without what the transport cannot do."""
    return [name for name in wanted if name in available]


def _computable(exchanges: list[bytes]) -> list[bytes]:
    """
    C{exchanges} without the hybrid where this process's cryptography has no ML-KEM
    (hybridkex.canDoMLKEM): offered, it would fail every handshake that chose it.
    """
    if hybridkex.AVAILABLE:
        return list(exchanges)
    return [name for name in exchanges if name != hybridkex.MLKEM768X25519_SHA256]


def applyServerPolicy(transport: Any) -> None:
    """Restrict a server transport instance to the policy."""
    transport.supportedKeyExchanges = _computable(KEY_EXCHANGES)
    transport.supportedCiphers = _implemented(transport.supportedCiphers, CIPHERS)
    transport.supportedMACs = _implemented(transport.supportedMACs, MACS)
    transport.supportedPublicKeys = list(HOST_KEY_ALGORITHMS)
    transport.supportedCompressions = list(COMPRESSIONS)


#: The agent's link offers the post-quantum hybrid first, as operators get it: it
#: carries a device's sessions for months, the recording "store now, decrypt later"
#: is about. Conch's client cannot do it (Twisted issue 12624); the agent's transport
#: can (accesstunnel.hybridkex). curve25519 follows, for a server that does not offer
#: the hybrid. A plain Conch client transport under this policy (a test's) offers
#: curve25519 alone.
AGENT_KEY_EXCHANGES = list(KEY_EXCHANGES)


def applyClientPolicy(transport: Any) -> None:
    """Restrict a client transport instance to the policy, fastest first."""
    transport.supportedKeyExchanges = _implemented(
        transport.supportedKeyExchanges, _computable(AGENT_KEY_EXCHANGES)
    )
    transport.supportedCiphers = _implemented(transport.supportedCiphers, AGENT_CIPHERS)
    transport.supportedMACs = _implemented(transport.supportedMACs, AGENT_MACS)
    transport.supportedPublicKeys = list(HOST_KEY_ALGORITHMS)
    transport.supportedCompressions = list(COMPRESSIONS)
