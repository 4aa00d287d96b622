"""
End to end: the device's card went read-only (ext4's errors=remount-ro, or a read-only
root), and the operator still gets in.

The agent's state directory and its sessions' HOME are on a small tmpfs made here, which
is remounted read-only once the agent holds its key and certificate; the agent is
restarted there (a device rebooted with its card read-only). What happens to each write
(status.json, the remembered address, a renewal, the key at first start, the log file) is
tested in memory in tests/test_agent_readonly.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.enrollment import CERTIFICATE_FILE, STATUS_FILE
from tests.e2e.harness import TUNNEL_AGENT, Agent, Fleet, Operator, run, waitFor
from tests.e2e.test_faults import smallDisk

pytestmark = pytest.mark.slow


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def startApproved(fleet: Fleet, operator: Operator, agent: Agent) -> str:
    """
    Start C{agent}, approve its device and wait until C{operator} reaches it and it holds
    its certificate; the server key it pins (for its restarts).
    """
    serverKey = str(fleet.gc.data / "ssh_host_ed25519_key.pub")
    agent.start(fleet.serverAddress, serverKey)
    fleet.waitPending(agent.name)
    fleet.gc.cli("device", "approve", agent.name)
    fleet.waitRoutable(operator, agent.name)
    waitFor(
        lambda: (
            "certificate_expires_at" in json.loads((agent.state / STATUS_FILE).read_text() or "{}")
        ),
        20,
        "the agent to store its certificate",
    )
    return serverKey


def test_operatorGetsInToAReadOnlyDevice(tmp_path: Path) -> None:
    """
    An agent restarted with its state directory read-only links, and the operator gets a
    shell (a pty) and runs a command; the state files are as they were; the agent's log
    says once that status.json cannot be written, naming the read-only file system. A
    first start there without a key exits at once with a status systemd does not restart
    (docs/systemd/tunnel-agent.service), saying why.
    """
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is required")
    with smallDisk(tmp_path / "disk", size="4m") as disk:
        base = tmp_path / "fleet"
        base.mkdir()
        fleet = Fleet(base)
        try:
            alice = fleet.addOperator("alice", admin=True)
            fleet.startServer()
            agent = Agent(disk, "kiln7")
            fleet.agents.append(agent)
            serverKey = startApproved(fleet, alice, agent)
            agent.stop()
            before = {p.name: p.read_bytes() for p in agent.state.iterdir()}
            unkeyed = disk / "agent-oven2"  # a device first started once the card is read-only
            unkeyed.mkdir()

            remount(disk, "ro")
            agent.base = base  # its log: on the card, it would stop the test's own harness
            agent.start(fleet.serverAddress, serverKey)
            fleet.waitRoutable(alice, "kiln7")
            shell = run(
                alice.argv("dev_kiln7", tty=True),
                input="echo shell-on-a-read-only-card\nexit\n",
                timeout=30,
            )
            assert shell.returncode == 0, shell.stderr
            assert "\nshell-on-a-read-only-card" in shell.stdout.replace("\r", "")
            command = alice.ssh("dev_kiln7", f"cat {agent.state / CERTIFICATE_FILE}", timeout=30)
            assert command.returncode == 0, command.stderr
            assert command.stdout.encode() == before[CERTIFICATE_FILE]

            assert {p.name: p.read_bytes() for p in agent.state.iterdir()} == before
            assert agent.process is not None and agent.process.running()
            log = agent.process.log.read_text()
            said = [line for line in log.splitlines() if STATUS_FILE in line]
            assert len(said) == 1 and "Read-only file system" in said[0], said

            first = run(
                [
                    TUNNEL_AGENT + "d",
                    "--state",
                    str(unkeyed),
                    "--name",
                    "oven2",
                    "--server-key",
                    serverKey,
                    "--server",
                    fleet.serverAddress,
                ],
                timeout=30,
            )
            assert first.returncode == 73, (first.returncode, first.stderr)
            assert "read-only file system" in first.stdout, first.stdout  # the log: stdout
            assert list(unkeyed.iterdir()) == []
        finally:
            fleet.close()
