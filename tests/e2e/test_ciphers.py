"""
End to end: every cipher and MAC groundcontrol offers works with the real
OpenSSH client (10 MB each way, sha256 compared), with strict key exchange
negotiated (the Terrapin fix); the stock client picks chacha20-poly1305 and is
moved to AES-GCM after login (groundcontrol.cipherchoice); the agent link runs
AES-128-GCM (accesstunnel.fastpath, issue 7).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from accesstunnel import fastpath, policy
from tests.e2e.harness import Fleet

COMBINATIONS = [
    (cipher.decode(), mac.decode())
    for cipher in policy.CIPHERS
    for mac in (policy.MACS if cipher not in fastpath.AEAD_CIPHERS else policy.MACS[:1])
]
SIZE = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def kiln(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One groundcontrol and agent 'kiln7' for the whole module (10 handshakes, not 10 fleets)."""
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is required (make test installs it)")
    fleet = Fleet(tmp_path_factory.mktemp("ciphers"))
    try:
        fleet.addOperator("alice", admin=True)
        fleet.startServer()
        fleet.addAgent("kiln7")
        fleet.waitRoutable(fleet.operators["alice"], "kiln7")
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("payload") / "payload"
    block = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)) * 128  # 1 MiB
    with path.open("wb") as f:
        for i in range(SIZE // len(block)):
            f.write(bytes([i]) + block[1:])
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("cipher", "mac"), COMBINATIONS)
def test_cipher_and_mac_round_trip(
    kiln: Fleet, payload: tuple[Path, str], cipher: str, mac: str
) -> None:
    """The OpenSSH client forced to one cipher and MAC: strict kex is negotiated, that cipher
    and MAC are used, and 10 MB go up and come back down unchanged."""
    alice = kiln.operators["alice"]
    path, expected = payload
    options = ["-o", f"Ciphers={cipher}", "-o", f"MACs={mac}", "-vvv"]
    up = subprocess.run(
        alice.argv("dev_kiln7", "sha256sum", options=options),
        stdin=path.open("rb"),
        capture_output=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr[-2000:]
    assert up.stdout.decode().split()[0] == expected
    log = up.stderr.decode(errors="replace")
    assert "will use strict KEX ordering" in log
    assert f"kex: client->server cipher: {cipher} MAC: " in log
    used = "<implicit>" if cipher.encode() in fastpath.AEAD_CIPHERS else mac
    assert f"kex: server->client cipher: {cipher} MAC: {used} compression: none" in log

    down = subprocess.run(
        alice.argv("dev_kiln7", f"cat {path}", options=options[:4]),
        capture_output=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr[-2000:]
    assert len(down.stdout) == SIZE
    assert hashlib.sha256(down.stdout).hexdigest() == expected


def test_agent_link_uses_gcm(kiln: Fleet) -> None:
    """
    The agent (client of its link) picks AES-128-GCM both ways from groundcontrol's offer,
    with strict kex: what its line about the link, at the default log level, tells an
    operator (agent.linklog).
    """
    agent = kiln.agents[0]
    assert agent.process is not None
    lines = [line for line in agent.process.output().splitlines() if "link up over" in line]
    assert lines
    for line in lines:
        assert "strict kex on; out aes128-gcm@openssh.com MAC <implicit>, " in line, line
        assert "in aes128-gcm@openssh.com MAC <implicit>, compression none" in line, line


def test_openssh_client_moves_from_chacha20_poly1305_to_aes_gcm(kiln: Fleet) -> None:
    """With no cipher option, the stock OpenSSH client negotiates chacha20-poly1305 in both
    directions, with strict kex; once it has logged in, groundcontrol renews the keys
    offering AES-GCM only (this CPU has AES instructions, --operator-aes-gcm auto), the
    client takes aes128-gcm both ways, and 1 MB comes back byte-exact."""
    alice = kiln.operators["alice"]
    data = hashlib.sha256(b"chacha").digest() * (1 << 15)
    result = subprocess.run(
        alice.argv("dev_kiln7", "cat", options=["-vvv"]),
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == data
    log = result.stderr.decode(errors="replace")
    assert "will use strict KEX ordering" in log
    for direction in ("client->server", "server->client"):
        first = log.find(
            f"kex: {direction} cipher: chacha20-poly1305@openssh.com MAC: <implicit> "
            "compression: none"
        )
        renewed = log.find(
            f"kex: {direction} cipher: aes128-gcm@openssh.com MAC: <implicit> compression: none"
        )
        assert 0 <= first < renewed, log[-3000:]
    assert log.find("Authenticated to") < log.find(
        "SSH2_MSG_KEXINIT received", log.find("Authenticated to")
    )
    assert "switching to AES-GCM" in kiln.gc.process.output()  # type: ignore[union-attr]


def test_aead_needs_no_common_mac(kiln: Fleet) -> None:
    """A client whose MACs groundcontrol does not offer (umac-128-etm only) connects with
    chacha20-poly1305, whose MAC is implied, as it would to OpenSSH's sshd; with a CTR cipher,
    which needs a MAC, it is still refused."""
    alice = kiln.operators["alice"]
    umac = ["-o", "MACs=umac-128-etm@openssh.com", "-v"]
    ok = subprocess.run(
        alice.argv("dev_kiln7", "echo", "hello", options=umac),
        capture_output=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout == b"hello\n"
    assert b"cipher: chacha20-poly1305@openssh.com MAC: <implicit>" in ok.stderr
    refused = subprocess.run(
        alice.argv("dev_kiln7", "true", options=["-o", "Ciphers=aes128-ctr", *umac]),
        capture_output=True,
        timeout=60,
    )
    assert refused.returncode == 255
    assert b"no matching MAC found" in refused.stderr
