#!/usr/bin/env python3
"""
bench/kex_micro.py: CPU of one key exchange, server and client, mlkem768x25519-sha256
against curve25519-sha256.

    flock -x /tmp/bench.lock .venv/bin/python bench/kex_micro.py [N]    (N: 1000)

One thread, no sockets (iosim): each handshake is a new server (accesstunnel.fastpath over
Conch's server transport, the server policy, an ed25519 host key: what groundcontrol's
transport is built on) and a new client (the agent's stack: fastpath, the hybrid of
accesstunnel.hybridkex, Conch's client transport, the client policy), from the version lines
to both NEWKEYS. A side's CPU is the thread CPU time spent in its connectionMade and
dataReceived: all it computes (parsing, key generation, encapsulation, signing or
verifying, key setup), no login. N handshakes of each, in blocks of 50 taking turns; then
the primitives on their own. Session 19's figures, and what they add to a reconnect
storm: SECURITY.md, the post-quantum row of the ssh-audit table.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from twisted.conch.ssh import factory, transport
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim

from accesstunnel import fastpath, hybridkex, policy
from groundcontrol.testing import newKey

HOST_KEY = newKey()
EXCHANGES = [hybridkex.MLKEM768X25519_SHA256, b"curve25519-sha256"]
BLOCK = 50


class _Factory(factory.SSHFactory):
    publicKeys = {b"ssh-ed25519": HOST_KEY.public()}
    privateKeys = {b"ssh-ed25519": HOST_KEY}

    def getPrimes(self) -> None:
        return None


class _Timed:
    """Adds up the thread CPU time this side spends handling its connection."""

    spentNs = 0

    def connectionMade(self) -> None:
        started = time.thread_time_ns()
        super().connectionMade()  # type: ignore[misc]
        self.spentNs += time.thread_time_ns() - started

    def dataReceived(self, data: bytes) -> None:
        started = time.thread_time_ns()
        super().dataReceived(data)  # type: ignore[misc]
        self.spentNs += time.thread_time_ns() - started


class _Server(_Timed, fastpath.FastPathMixin, transport.SSHServerTransport):
    exchange = b""

    def connectionMade(self) -> None:
        policy.applyServerPolicy(self)
        self.supportedPublicKeys = [b"ssh-ed25519"]
        self.supportedKeyExchanges = [self.exchange]
        super().connectionMade()


class _Client(
    _Timed, fastpath.FastPathMixin, hybridkex.HybridKexClientMixin, transport.SSHClientTransport
):
    secured = 0

    def connectionMade(self) -> None:
        policy.applyClientPolicy(self)
        super().connectionMade()

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> defer.Deferred[Any]:
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.secured += 1


def handshake(serverFactory: _Factory, exchange: bytes) -> tuple[float, float]:
    """One key exchange with C{exchange}: the server's and the client's CPU, in ms."""
    server = _Server()
    server.factory = serverFactory
    server.exchange = exchange
    client = _Client()
    serverAddress = IPv4Address("TCP", "127.0.0.1", 22)
    clientAddress = IPv4Address("TCP", "127.0.0.1", 40000)
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, True, serverAddress, clientAddress),
        client,
        iosim.FakeTransport(client, False, clientAddress, serverAddress),
        greet=False,
        clock=Clock(),
    )
    pump.flush()
    if not (client.secured == 1 and client.kexAlg == server.kexAlg == exchange):
        raise RuntimeError(f"handshake did not complete with {exchange!r}")
    return server.spentNs / 1e6, client.spentNs / 1e6


def _median(call: Callable[[], object], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.thread_time_ns()
        call()
        times.append((time.thread_time_ns() - started) / 1e6)
    return statistics.median(times)


def main(count: int) -> None:
    serverFactory = _Factory()
    serverFactory.doStart()
    for exchange in EXCHANGES:  # warm up
        for _ in range(BLOCK):
            handshake(serverFactory, exchange)
    spent: dict[bytes, tuple[list[float], list[float]]] = {e: ([], []) for e in EXCHANGES}
    for block in range(max(1, count // BLOCK)):
        for exchange in EXCHANGES if block % 2 == 0 else EXCHANGES[::-1]:
            for _ in range(BLOCK):
                serverMs, clientMs = handshake(serverFactory, exchange)
                spent[exchange][0].append(serverMs)
                spent[exchange][1].append(clientMs)
    for exchange, (server, client) in spent.items():
        print(
            f"{exchange.decode():24} n={len(server)}  server ms median "
            f"{statistics.median(server):.3f} mean {statistics.mean(server):.3f}  "
            f"client ms median {statistics.median(client):.3f} mean {statistics.mean(client):.3f}"
        )
    (hybridServer, hybridClient), (classicalServer, classicalClient) = spent.values()
    print(
        "added by the hybrid: server "
        f"{statistics.median(hybridServer) - statistics.median(classicalServer):+.3f} ms "
        f"(median), {statistics.mean(hybridServer) - statistics.mean(classicalServer):+.3f} ms "
        "(mean); client "
        f"{statistics.median(hybridClient) - statistics.median(classicalClient):+.3f} ms "
        f"(median), {statistics.mean(hybridClient) - statistics.mean(classicalClient):+.3f} ms "
        "(mean)"
    )
    key = mlkem.MLKEM768PrivateKey.generate()
    encapsulationKey = key.public_key().public_bytes_raw()
    _, ciphertext = key.public_key().encapsulate()
    peer = x25519.X25519PrivateKey.generate().public_key()

    def encapsulate() -> object:
        return mlkem.MLKEM768PublicKey.from_public_bytes(encapsulationKey).encapsulate()

    def classical() -> object:
        return x25519.X25519PrivateKey.generate().exchange(peer)

    generation = _median(mlkem.MLKEM768PrivateKey.generate, count)
    encapsulation = _median(encapsulate, count)
    decapsulation = _median(lambda: key.decapsulate(ciphertext), count)
    print(
        f"primitives, ms (median): ML-KEM-768 key generation {generation:.4f}, "
        f"encapsulation {encapsulation:.4f}, decapsulation {decapsulation:.4f}; "
        f"X25519 key generation and exchange {_median(classical, count):.4f}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
