"""
End to end: a key added to ssh-agent with destination constraints (ssh-add -h, OpenSSH 8.9+)
logs in to groundcontrol through a forwarded agent, as it does to an sshd.

The operator's agent holds alice's key for "the bastion, and from the bastion on to
groundcontrol" only; alice reaches the bastion (a stock sshd) with -A and runs ssh to
groundcontrol there. Her agent signs that second login only if the signature names the
server's host key (publickey-hostbound-v00@openssh.com, groundcontrol.hostbound); before,
groundcontrol did not offer that form and the agent refused: "refusing use of
destination-constrained key: no hostkey recorded in signature for forwarded connection".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Fleet, run, sshAgentRunning
from tests.e2e.test_forwarding import plainSshd


@pytest.fixture
def constrainedAgent(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[dict[str, str], int, Path]]:
    """
    A bastion sshd that accepts alice's key, and an ssh-agent holding that key for the
    bastion and for bastion>groundcontrol only: the client environment, the bastion's
    port, and the known_hosts file naming both.
    """
    if os.geteuid() != 0:
        pytest.skip("a real sshd needs root here")
    alice = fleet.operators["alice"]
    with plainSshd(tmp_path, alice.keyPath) as (bastionPort, bastionHostLine):
        knownHosts = tmp_path / "known_hosts_both"
        knownHosts.write_text(
            f"[{LOOPBACK}]:{fleet.gc.port} {fleet.gc.serverKeyLine}\n"
            f"[{LOOPBACK}]:{bastionPort} {bastionHostLine}\n"
        )
        with sshAgentRunning(tmp_path) as env:
            bastion = f"[{LOOPBACK}]:{bastionPort}"
            server = f"[{LOOPBACK}]:{fleet.gc.port}"
            added = run(
                [
                    "ssh-add",
                    "-H",
                    str(knownHosts),
                    "-h",
                    bastion,
                    "-h",
                    f"{bastion}>{server}",
                    str(alice.keyPath),
                ],
                env=env,
            )
            assert added.returncode == 0, added.stderr
            yield env, bastionPort, knownHosts


def sshCommand(port: int, knownHosts: Path, *rest: str) -> list[str]:
    """ssh to root@127.0.0.1:PORT with nothing but the agent's keys."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        f"UserKnownHostsFile={knownHosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-p",
        str(port),
        *rest,
    ]


def test_constrained_key_through_a_bastion(
    fleet: Fleet, constrainedAgent: tuple[dict[str, str], int, Path]
) -> None:
    """From the bastion, with alice's forwarded agent, ssh ctl@gc whoami is alice."""
    env, bastionPort, knownHosts = constrainedAgent
    onBastion = " ".join(sshCommand(fleet.gc.port or 0, knownHosts, f"ctl@{LOOPBACK}", "whoami"))
    result = run(sshCommand(bastionPort, knownHosts, "-A", f"root@{LOOPBACK}", onBastion), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["alice", "admin"], result.stdout
