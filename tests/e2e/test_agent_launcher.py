"""
End to end: the agent started by its own launcher (the ``tunnel-agentd`` console script, also
``python -m agent``) instead of ``twistd -n tunnel-agent``, the way
docs/systemd/tunnel-agent.service starts it: under PYTHONOPTIMIZE=2 and PYTHONNODEBUGRANGES=1,
logging to standard output (the journal). Real groundcontrol, the real
OpenSSH client, over ssh://, tls:// and wss://; config reload on SIGHUP and a clean stop on
SIGTERM as under twistd.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from agent.session import KILL_GRACE
from tests.e2e.harness import LOOPBACK, PYTHON, Agent, Fleet, waitFor
from tests.e2e.test_transports import (
    approveAndReach,
    closedPort,
    issueDeviceCertificate,
    startServer,
)

#: The interpreter settings of docs/systemd/tunnel-agent.service.
UNIT_ENVIRONMENT = ("MALLOC_ARENA_MAX=1", "PYTHONOPTIMIZE=2", "PYTHONNODEBUGRANGES=1")

#: A twistd log line: "2026-11-25T18:04:21+0000 [agent.launcher#info] ...".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^]]+\] ")


#: What the tunnel-agentd console script runs (pip writes it at install).
TUNNEL_AGENTD = (PYTHON, "-c", "import sys; from agent.launcher import main; sys.exit(main())")


class LauncherAgent(Agent):
    """An agent started as the systemd unit starts it: tunnel-agentd, the unit's environment."""

    def argv(self, server: str, serverKey: str, *extra: str) -> list[str]:
        twistd = super().argv(server, serverKey, *extra)
        agentOptions = twistd[twistd.index("tunnel-agent") + 1 :]
        return ["env", *UNIT_ENVIRONMENT, *TUNNEL_AGENTD, *agentOptions]


def startLauncherAgent(fleet: Fleet, name: str, server: str, *extra: str) -> LauncherAgent:
    agent = LauncherAgent(fleet.base, name)
    agent.start(
        server,
        str(fleet.gc.data / "ssh_host_ed25519_key.pub"),
        "--tls-ca",
        str(fleet.gc.data / "ca" / "ca.crt"),
        *extra,
    )
    fleet.agents.append(agent)
    return agent


def test_sshLinkReloadAndStop(fleet: Fleet) -> None:
    """
    Started by the launcher with a config file naming a closed address, the agent takes the
    real ssh:// address from the file on SIGHUP and links; an operator reaches it; SIGTERM
    stops it cleanly (exit status 0, "Server Shut Down."), every line in twistd's log format.
    """
    config = fleet.base / "agent.toml"
    config.write_text(f'servers = ["ssh://{LOOPBACK}:{closedPort()}"]\n')
    agent = startLauncherAgent(
        fleet, "kiln7", f"ssh://{LOOPBACK}:{closedPort()}", "--config", str(config)
    )
    process = agent.process
    assert process is not None
    waitFor(lambda: "SIGHUP re-reads" in process.output(), 30, "the SIGHUP handler")
    config.write_text(f'servers = ["ssh://{LOOPBACK}:{fleet.gc.port}"]\n')
    process.signal(signal.SIGHUP)
    approveAndReach(fleet, "kiln7")
    result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "via-launcher")
    assert result.stdout.strip() == "via-launcher"
    assert process.running()

    process.signal(signal.SIGTERM)
    assert process.popen.wait(10) == 0
    output = process.output()
    assert "Server Shut Down." in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert [line for line in lines if not LOG_LINE.match(line)] == []


@pytest.mark.parametrize("scheme, path", [("tls", ""), ("wss", "/tunnel")])
def test_tlsTransports(fleet: Fleet, scheme: str, path: str) -> None:
    """
    The launcher's agent links over tls:// and over wss:// (pyOpenSSL, and for wss the
    WebSocket transport, imported only at the dial) and an operator reaches it.
    """
    ports = startServer(fleet, f"{scheme}://{LOOPBACK}:0{path}")
    agent = startLauncherAgent(fleet, "kiln7", f"{scheme}://{LOOPBACK}:{ports[scheme]}{path}")
    issueDeviceCertificate(fleet, agent)
    approveAndReach(fleet, "kiln7")
    result = fleet.operators["alice"].ssh("dev_kiln7", "echo", f"over-{scheme}")
    assert result.stdout.strip() == f"over-{scheme}"
    process = agent.process
    assert process is not None
    process.signal(signal.SIGTERM)
    assert process.popen.wait(10) == 0
    assert "Server Shut Down." in process.output()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["tunnel-agentd", "twistd"])
def test_stopOutlivesSessionChildren(fleet: Fleet, tmp_path: Path, how: str) -> None:
    """
    SIGTERM (systemd's stop: docs/systemd/tunnel-agent.service signals the agent alone,
    KillMode=process) while a session's shell ignores its hang-up: the agent exits only once
    it has killed that shell (KILL_GRACE after the hang-up), leaving no session child behind.
    Before agent.launcher.stopThenOutliveSessions it exited at once and the shell lived on;
    under twistd (python -m accesstunnel.twistd -n tunnel-agent) until agent.tap.AgentService.
    twistd ends by re-raising the SIGTERM it stopped for; tunnel-agentd exits 0.
    """
    server = f"ssh://{LOOPBACK}:{fleet.gc.port}"
    if how == "twistd":
        agent: Agent = fleet.addAgent("kiln7", approve=False)
        expectedStatus = -signal.SIGTERM
    else:
        agent = startLauncherAgent(fleet, "kiln7", server)
        expectedStatus = 0
    approveAndReach(fleet, "kiln7")
    process = agent.process
    assert process is not None
    marker = tmp_path / "shell.pid"
    command = f"trap '' HUP TERM; echo $$ > {marker}; sleep 300"
    session = subprocess.Popen(
        fleet.operators["alice"].argv("dev_kiln7", command, tty=True),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    shell = int(waitFor(lambda: marker.exists() and marker.read_text().strip(), 30, "the shell"))
    try:
        process.signal(signal.SIGTERM)
        assert process.popen.wait(KILL_GRACE + 10) == expectedStatus
        assert not _alive(shell)
        assert "ignored its hang-up; killing it" in process.output()
        session.wait(10)
    finally:
        if _alive(shell):
            os.killpg(shell, signal.SIGKILL)
        if session.poll() is None:
            session.kill()
