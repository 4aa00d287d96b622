"""
End to end: groundcontrol under a real twistd, told to listen on a port another process holds
(the host's sshd on port 22, as found walking the systemd unit), exits with a non-zero status
and one clear line, so that a service manager sees a failure (docs/systemd/groundcontrol.service,
Restart=on-failure). It exited 0 before, after a traceback. Both ways the README runs it:
``python -m accesstunnel.twistd`` and plain ``twistd``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from groundcontrol.listening import LISTEN_FAILED_STATUS
from tests.e2e.harness import LOOPBACK, TWISTD, TWISTD_ON_OUR_REACTOR, GroundControl, run


@pytest.mark.parametrize("twistd", [TWISTD_ON_OUR_REACTOR, [TWISTD]], ids=["ours", "plain"])
def test_portTakenIsAFailure(tmp_path: Path, twistd: list[str]) -> None:
    gc = GroundControl(tmp_path)
    gc.init()
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = run(
            [
                *twistd,
                "--nodaemon",
                "--pidfile=",
                "groundcontrol",
                "--data",
                str(gc.data),
                "--listen",
                f"ssh://{LOOPBACK}:{taken}",
                "--listen",
                f"tcp:0:interface={LOOPBACK}",
            ],
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == LISTEN_FAILED_STATUS != 0, output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert lines[0].endswith(
        f"cannot listen on ssh://{LOOPBACK}:{taken}: Address already in use; "
        f"stopping (exit status {LISTEN_FAILED_STATUS})"
    )
    assert "Traceback" not in output
    assert "Server Shut Down." in output  # twistd's own shutdown ran to its end
