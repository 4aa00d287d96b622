"""
End to end: the device's disk is full (a small tmpfs made and removed here), and the
operator still gets in to clean up.

The agent's state directory, its sessions' HOME and its log are all on the full disk; the
agent is restarted there (a device rebooted with its card full). What happens to each
write on the way (status.json, the remembered address, a certificate, the key at first
start) is tested in memory in tests/test_agent_disk.py.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from agent.enrollment import CERTIFICATE_FILE
from tests.e2e.harness import Agent, Fleet, run
from tests.e2e.test_agent_readonly import startApproved
from tests.e2e.test_faults import smallDisk

pytestmark = pytest.mark.slow


def fill(disk: Path) -> Path:
    """Write zeros to C{disk} until it is full; the file that holds them."""
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert shutil.disk_usage(disk).free == 0
    return filler


def test_operatorGetsInToAFullDevice(tmp_path: Path) -> None:
    """
    An agent restarted with its disk full links, and the operator gets a shell (a pty)
    and copies files off the device; copying a file to it fails at once with the remote's
    error instead of hanging; the state files are whole and as they were, no temporary
    file left; the agent still runs.
    """
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is required")
    with smallDisk(tmp_path / "disk", size="4m") as disk:
        base = tmp_path / "fleet"
        base.mkdir()
        fleet = Fleet(base)  # groundcontrol's own disk is not the full one
        try:
            alice = fleet.addOperator("alice", admin=True)
            fleet.startServer()
            agent = Agent(disk, "kiln7")  # state, HOME and log on the small disk
            fleet.agents.append(agent)
            serverKey = startApproved(fleet, alice, agent)
            before = {p.name: p.read_bytes() for p in agent.state.iterdir()}

            fill(disk)
            agent.stop()
            agent.start(fleet.serverAddress, serverKey)
            fleet.waitRoutable(alice, "kiln7")

            shell = run(
                alice.argv("dev_kiln7", tty=True),
                input="echo shell-on-a-full-disk\nexit\n",
                timeout=30,
            )
            assert shell.returncode == 0, shell.stderr
            assert "\nshell-on-a-full-disk" in shell.stdout.replace("\r", "")

            copied = tmp_path / "device.crt"
            scp = ["scp", "-F", str(alice.configPath)]
            remote = f"dev_kiln7@groundcontrol:{agent.state / CERTIFICATE_FILE}"
            assert run([*scp, remote, str(copied)], timeout=30).returncode == 0
            assert copied.read_bytes() == before[CERTIFICATE_FILE]

            upload = tmp_path / "upload.bin"
            upload.write_bytes(b"x" * 200_000)
            put = run([*scp, str(upload), f"dev_kiln7@groundcontrol:{agent.home}/"], timeout=30)
            assert put.returncode != 0
            assert "Failure" in put.stderr, put.stderr  # sftp's word for ENOSPC

            after = {p.name: p.read_bytes() for p in agent.state.iterdir()}
            assert after == before
            assert agent.process is not None and agent.process.running()
        finally:
            fleet.close()
