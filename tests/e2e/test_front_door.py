"""
End to end: the front door's promises with the real OpenSSH client:
the algorithm policy, at most six authentication attempts, and a login
grace time (issue 2; DESIGN.md security promises).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Fleet


def kexinitOffer(fleet: Fleet) -> dict[str, str]:
    """What groundcontrol offers in its KEXINIT, as `ssh -vv` reports it."""
    alice = fleet.operators["alice"]
    result = subprocess.run(
        alice.argv("dev_x", "true", options=["-vv"]), capture_output=True, text=True, timeout=30
    )
    lines = result.stderr.split("peer server KEXINIT proposal", 1)[1].splitlines()
    offer = {}
    for line in lines[1:9]:
        key, _, value = line.removeprefix("debug2: ").partition(": ")
        offer[key] = value.strip()
    return offer


def test_exact_algorithm_offer(fleet: Fleet) -> None:
    """Only the modern algorithms of DESIGN.md are offered, in this order."""
    assert kexinitOffer(fleet) == {
        "KEX algorithms": "mlkem768x25519-sha256,curve25519-sha256,"
        "curve25519-sha256@libssh.org,kex-strict-s-v00@openssh.com,ext-info-s",
        "host key algorithms": "ssh-ed25519",
        "ciphers ctos": "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
        "aes128-gcm@openssh.com,aes256-ctr,aes128-ctr",
        "ciphers stoc": "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
        "aes128-gcm@openssh.com,aes256-ctr,aes128-ctr",
        "MACs ctos": "hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,"
        "hmac-sha2-512,hmac-sha2-256",
        "MACs stoc": "hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,"
        "hmac-sha2-512,hmac-sha2-256",
        "compression ctos": "none",
        "compression stoc": "none",
    }


@pytest.mark.parametrize(
    "option",
    [
        "Ciphers=aes128-cbc",
        "Ciphers=3des-cbc",
        # A MAC only matters with a non-AEAD cipher: with chacha20-poly1305 or
        # GCM (what a default client picks) no MAC is used at all, as with sshd.
        "Ciphers=aes128-ctr MACs=hmac-sha1",
        "Ciphers=aes128-ctr MACs=hmac-md5",
        "KexAlgorithms=diffie-hellman-group14-sha1",
        "KexAlgorithms=diffie-hellman-group-exchange-sha1",
        "KexAlgorithms=ecdh-sha2-nistp256",
        "HostKeyAlgorithms=ssh-rsa",
        "Compression=yes",
    ],
)
def test_weak_algorithms_refused(fleet: Fleet, option: str) -> None:
    """A client that insists on a weak algorithm cannot connect (compression is just off)."""
    alice = fleet.operators["alice"]
    options = [arg for setting in option.split() for arg in ("-o", setting)]
    result = subprocess.run(
        alice.argv("dev_x", "true", options=[*options, "-v"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if option == "Compression=yes":
        assert "compression: none" in result.stderr
    else:
        assert result.returncode == 255
        assert "no matching" in result.stderr, result.stderr[-500:]


def test_at_most_six_authentication_attempts(fleet: Fleet, tmp_path: Path) -> None:
    """With six unknown keys offered first, the seventh (valid) key is never tried."""
    alice = fleet.operators["alice"]
    options = []
    for n in range(6):
        key = tmp_path / f"unknown{n}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        options += ["-i", str(key)]
    options += ["-i", str(alice.keyPath)]
    result = subprocess.run(
        alice.argv("dev_x", "true", options=options), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 255
    assert "too many bad auths" in result.stderr or "Too many authentication failures" in (
        result.stderr
    ), result.stderr
    # The same valid key alone gets in.
    assert "unknown device" in alice.ssh("dev_x", "true").stderr


def test_login_grace_time(fleet: Fleet) -> None:
    """A client that connects and never logs in is dropped after the grace time."""
    fleet.restartServer("--login-grace-time", "1")
    with socket.create_connection((LOOPBACK, fleet.gc.port), timeout=10) as client:
        started = time.monotonic()
        client.settimeout(10)
        received = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
    assert received.startswith(b"SSH-2.0-")
    assert 0.5 < elapsed < 5, elapsed
