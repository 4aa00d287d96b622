"""
End to end: an operator's ssh (a session, or an -R forward) to a device whose link just
dropped waits for it to come back (groundcontrol --device-wait) instead of failing at once,
and fails saying how long it waited when the device is not back in time.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from groundcontrol.devicewait import ALIVE_FILE
from groundcontrol.metrics import METRICS_FILE
from tests.e2e.harness import LOOPBACK, Fleet, Operator, allocatedRemotePort, waitFor
from tests.e2e.test_forwarding import Background, echoServer, roundTrip

__all__ = ["echoServer"]  # the fixture, used here by name

#: groundcontrol's metrics, where the tests see a channel held for the device.
METRICS = ("--metrics", "tcp:0:interface=127.0.0.1")


def channelsWaiting(fleet: Fleet) -> float | None:
    """groundcontrol_channels_waiting, scraped now (None before the metrics listen)."""
    try:
        listening = json.loads((fleet.gc.data / "run" / METRICS_FILE).read_text())
        port = listening["listening"][0]["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError, KeyError, IndexError):
        return None
    found = re.search(r"^groundcontrol_channels_waiting (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def offlineInLs(fleet: Fleet) -> bool:
    """C{ctl ls} shows kiln7 offline (the agent's link is gone from groundcontrol)."""
    result = fleet.operators["alice"].ssh("ctl", "ls", "--json", timeout=20)
    rows = json.loads(result.stdout) if result.returncode == 0 else []
    return any(row["name"] == "kiln7" and row["online"] is False for row in rows)


def sshInBackground(operator: Operator, stderr: Path, *command: str) -> subprocess.Popen[str]:
    """ssh -v to kiln7 running C{command}; its debug lines go to C{stderr}."""
    with stderr.open("w") as errors:
        return subprocess.Popen(
            operator.argv("dev_kiln7", *command, options=["-v"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )


def waitLines(fleet: Fleet) -> list[str]:
    """groundcontrol's log lines saying how a wait for a device ended."""
    assert fleet.gc.process is not None
    return re.findall(
        r"alice waited [\d.]+ s for device kiln7 to reconnect: [a-z ]+", fleet.gc.process.output()
    )


def runsOnceTheAgentIsBack(fleet: Fleet, tmp_path: Path) -> None:
    """
    With kiln7's agent stopped and groundcontrol's metrics on: an ssh started now is
    held (the metrics count its channel); the agent started again, the command runs and
    ssh exits 0.
    """
    alice = fleet.operators["alice"]
    (agent,) = fleet.agents
    stderr = tmp_path / "ssh.stderr"
    earlier = len(waitLines(fleet))  # getting kiln7 routable may have waited too
    ssh = sshInBackground(alice, stderr, "echo", "back")
    try:
        waitFor(
            lambda: channelsWaiting(fleet) == 1,
            20,
            "groundcontrol to hold the ssh's session for kiln7",
            interval=0.1,
        )
        assert ssh.poll() is None, stderr.read_text()  # waiting, not refused
        agent.start(fleet.serverAddress, str(fleet.gc.data / "ssh_host_ed25519_key.pub"))
        stdout, _ = ssh.communicate(timeout=30)
    finally:
        ssh.kill()
        ssh.wait()
    assert (ssh.returncode, stdout) == (0, "back\n"), stderr.read_text()
    (line,) = waitLines(fleet)[earlier:]
    assert line.endswith(": it did"), line


def test_ssh_runs_once_the_agent_is_back(kiln7: Fleet, tmp_path: Path) -> None:
    """An ssh started while the agent is away runs once it is back (the default wait)."""
    kiln7.restartServer(*METRICS)
    kiln7.waitRoutable(kiln7.operators["alice"], "kiln7")
    kiln7.agents[0].stop()
    waitFor(lambda: offlineInLs(kiln7), 10, "kiln7 to be offline", interval=0.2)
    runsOnceTheAgentIsBack(kiln7, tmp_path)


def test_not_back_in_time(kiln7: Fleet) -> None:
    """
    A device not back within --device-wait is refused as offline, saying how long the
    channel waited (2 s and what the timer and the store's read of the device took after:
    a tenth more on a loaded machine, so no exact figure is asserted); ssh exits 255.
    """
    alice = kiln7.operators["alice"]
    kiln7.agents[0].stop()
    kiln7.restartServer("--device-wait", "2")
    result = alice.ssh("dev_kiln7", "true", timeout=30)
    assert result.returncode == 255
    assert re.search(
        r"open failed: connect failed: device 'kiln7' is offline \(last seen \S+Z, \d+ s ago\); "
        r"waited 2\.\d s for it to reconnect",
        result.stderr,
    ), result.stderr
    (line,) = waitLines(kiln7)
    assert re.fullmatch(r"alice waited 2\.\d s for device kiln7 to reconnect: it did not", line)


def test_ssh_right_after_groundcontrol_restarts(kiln7: Fleet, tmp_path: Path) -> None:
    """
    Just after groundcontrol restarts, before the device's agent (online when it stopped)
    is back, an ssh to it waits for it and runs.
    """
    port = kiln7.gc.port
    kiln7.gc.stop()  # the agent is online as groundcontrol stops: its stop is recorded
    stopped = json.loads((kiln7.gc.data / "run" / "stopped.json").read_text())
    assert stopped["stoppedAt"] > 0
    kiln7.agents[0].stop()
    kiln7.gc.start(*METRICS, port=port or 0)
    runsOnceTheAgentIsBack(kiln7, tmp_path)


def aliveRecord(fleet: Fleet) -> dict[str, Any]:
    """groundcontrol's run/alive.json now ({} before its first write)."""
    try:
        document = json.loads((fleet.gc.data / "run" / ALIVE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def test_ssh_after_groundcontrol_was_killed(kiln7: Fleet, tmp_path: Path) -> None:
    """
    groundcontrol is killed (kill -9: no stop record, and no last-seen time set as the
    links end) while kiln7 has been online longer than --device-wait-recent (15 s here),
    and started again: an ssh to kiln7 before its agent is back waits for it and runs.
    Its run/alive.json (every 3 s, a fifth of the window) named kiln7; without it, kiln7,
    last seen as its link began, was refused at once as offline.
    """
    recent = ("--device-wait-recent", "15s")
    kiln7.restartServer(*METRICS, *recent)
    kiln7.waitRoutable(kiln7.operators["alice"], "kiln7")
    linked = time.time()  # kiln7's last seen is no later than this: its login
    waitFor(
        lambda: (
            aliveRecord(kiln7).get("aliveAt", 0) > linked + 16
            and "kiln7" in aliveRecord(kiln7).get("online", [])
        ),
        30,
        "groundcontrol to record kiln7 online 16 s after its login",
        interval=0.5,
    )
    port = kiln7.gc.port
    assert kiln7.gc.process is not None
    kiln7.gc.process.kill()
    assert not (kiln7.gc.data / "run" / "stopped.json").exists()
    kiln7.agents[0].stop()
    kiln7.gc.start(*METRICS, *recent, port=port or 0)
    runsOnceTheAgentIsBack(kiln7, tmp_path)


def test_remote_forward_made_once_the_agent_is_back(kiln7: Fleet, echoServer: int) -> None:
    """
    ssh -N -R with ExitOnForwardFailure, started while the agent is away: the forward is
    held (it was refused at once: 'Error: remote port forwarding failed', ssh exiting
    255), then made on the device once the agent is back, and reaches the operator's
    service.
    """
    kiln7.restartServer(*METRICS)
    kiln7.waitRoutable(kiln7.operators["alice"], "kiln7")
    (agent,) = kiln7.agents
    agent.stop()
    waitFor(lambda: offlineInLs(kiln7), 10, "kiln7 to be offline", interval=0.2)
    earlier = len(waitLines(kiln7))
    ssh = Background(
        kiln7.operators["alice"].argv(
            "dev_kiln7",
            options=[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                # Keepalives of 1 s x 1: ssh gives up after 2 s with no packet from groundcontrol
                # (the forward's answer, and theirs behind it, wait for the agent).
                "-o",
                "ServerAliveInterval=1",
                "-o",
                "ServerAliveCountMax=1",
                "-R",
                f"0:127.0.0.1:{echoServer}",
            ],
        )
    )
    try:
        waitFor(
            lambda: channelsWaiting(kiln7) == 1 or ssh.popen.poll() is not None,
            20,
            "groundcontrol to hold the ssh's remote forward for kiln7",
            interval=0.1,
        )
        assert ssh.popen.poll() is None, ssh.close()  # waiting, not refused
        # 4 s of ssh's keepalives (two deadlines) while the forward waits: ssh stays.
        quietUntil = time.monotonic() + 4
        waitFor(
            lambda: ssh.popen.poll() is not None or time.monotonic() > quietUntil,
            10,
            "4 s of keepalives",
            interval=0.1,
        )
        assert ssh.popen.poll() is None, ssh.close()
        agent.start(kiln7.serverAddress, str(kiln7.gc.data / "ssh_host_ed25519_key.pub"))
        devicePort = allocatedRemotePort(ssh.popen.stderr)
        assert roundTrip(lambda: socket.create_connection((LOOPBACK, devicePort), timeout=10)) == (
            b"echo:ping"
        )
    finally:
        ssh.close()
    (ended,) = waitLines(kiln7)[earlier:]
    assert ended.endswith(": it did"), ended
