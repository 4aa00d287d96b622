"""
End to end: the agent's open-file limit (agent.openfiles), with the agent started under a
limit as a service manager would set it. It raises its own soft limit up to the hard one and
its sessions' children get the one it started with; when its descriptors run out, a session
is refused with a reason the operator reads, and the agent goes on.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from agent import openfiles
from tests.e2e import test_access
from tests.e2e.harness import PYTHON, Agent, Fleet, readLine, waitFor
from tests.e2e.test_transports import approveAndReach

#: A throwaway login for a grant's --as (the fixture of tests/e2e/test_access.py).
loginUser = test_access.loginUser

#: Runs a command under an open-file limit (soft, hard), as systemd's LimitNOFILE= does.
UNDER_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execvp(sys.argv[3], sys.argv[3:])"
)


class LimitedAgent(Agent):
    """A twistd agent started under an open-file limit."""

    limit = (1024, 1024)

    def argv(self, server: str, serverKey: str, *extra: str) -> list[str]:
        soft, hard = self.limit
        return [PYTHON, "-c", UNDER_LIMIT, str(soft), str(hard), *super().argv(server, serverKey)]


def startLimitedAgent(fleet: Fleet, name: str, soft: int, hard: int) -> LimitedAgent:
    agent = LimitedAgent(fleet.base, name)
    agent.limit = (soft, hard)
    agent.start(fleet.serverAddress, str(fleet.gc.data / "ssh_host_ed25519_key.pub"))
    fleet.agents.append(agent)
    approveAndReach(fleet, name)
    return agent


def childPid(marker: Path) -> str | None:
    """The pid a session's shell wrote, once it has."""
    return marker.read_text().strip() or None if marker.exists() else None


def hasLimit(pid: int, limit: list[str]) -> bool:
    return openFilesLimit(pid) == limit


def openFilesLimit(pid: int) -> list[str]:
    """A process's soft and hard open-file limits, from /proc."""
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line.split()[3:5] for line in limits if line.startswith("Max open files"))


def test_raisedForTheAgentNotItsSessions(fleet: Fleet, tmp_path: Path) -> None:
    """
    Started with 256 of a hard 4096, the agent runs with 4096 and says so once; a pty
    session's shell and an exec's command (both started with posix_spawn) get 256, read
    from /proc once each has started (that they have it from their first instruction needs
    the child's steps ordered before the agent's: tests/test_agent_spawn_parity.py).
    """
    agent = startLimitedAgent(fleet, "kiln7", 256, 4096)
    process = agent.process
    assert process is not None
    assert openFilesLimit(process.pid) == ["4096", "4096"]
    raised = [line for line in process.output().splitlines() if "open-file limit" in line]
    assert len(raised) == 1
    assert raised[0].endswith(
        f"open-file limit raised from 256 to 4096 (hard limit 4096, below the "
        f"{openfiles.WANTED} wanted); sessions get 256"
    )
    alice = fleet.operators["alice"]
    sessions = []
    try:
        for tty in (False, True):
            marker = tmp_path / f"child-{tty}.pid"
            command = f"echo $$ > {marker}; exec sleep 300"
            sessions.append(
                subprocess.Popen(
                    alice.argv("dev_kiln7", command, tty=tty),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            child = int(waitFor(functools.partial(childPid, marker), 30, "the child's pid"))
            waitFor(functools.partial(hasLimit, child, ["256", "4096"]), 30, "its limit")
    finally:
        for session in sessions:
            session.kill()
            session.wait(30)


def test_outOfDescriptorsRefusesASession(fleet: Fleet) -> None:
    """
    Under a hard limit of 64, sessions that each hold three descriptors (a command's pipes)
    are opened until one is refused: the operator reads why, the agent runs on, and once the
    others end a session opens again.
    """
    agent = startLimitedAgent(fleet, "kiln7", 64, 64)
    process = agent.process
    assert process is not None
    alice = fleet.operators["alice"]
    held: list[subprocess.Popen[str]] = []
    refused = None
    try:
        for _ in range(30):
            session = subprocess.Popen(
                alice.argv("dev_kiln7", "echo started; exec sleep 300"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert session.stdout is not None
            held.append(session)  # ended below even if its first line never comes
            if readLine(session.stdout, "a session's 'started'") == "started\n":
                continue
            held.pop()
            refused = session.communicate(timeout=30)[1]
            assert session.returncode == 255
            break
        assert refused is not None, "no session was refused"
        assert len(held) >= 3
        assert "open failed: resource shortage: the device's agent has too many files open" in (
            refused
        )
        assert "(its open-file limit is 64)" in refused
        assert process.running()
        assert "refused a session: too many files open (limit 64)" in process.output()
    finally:
        for session in held:
            session.kill()
            session.communicate(timeout=30)

    def opens() -> bool:
        return alice.ssh("dev_kiln7", "echo", "again").stdout.strip() == "again"

    waitFor(opens, 30, "a session to open again")
    assert process.running()


def test_forkedSessionChild(fleet: Fleet, loginUser: str) -> None:
    """
    A session run as another login (a grant's --as: forked, to switch users) has the
    agent's limit at start from its first instruction: set in the child before the exec.
    """
    startLimitedAgent(fleet, "kiln7", 256, 4096)
    alice = fleet.operators["alice"]
    bob = fleet.addOperator("bob")
    assert alice.ssh("ctl", "grant", "bob", "kiln7", "--as", loginUser).returncode == 0
    result = bob.ssh("dev_kiln7", "id -un; ulimit -Sn; ulimit -Hn", timeout=30)
    assert result.stdout.split() == [loginUser, "256", "4096"], result.stderr
