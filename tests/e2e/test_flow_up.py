"""
End to end: flow control holds from operator to device. A device command that
never reads its stdin makes neither groundcontrol nor the agent buffer what the
operator uploads: the agent holds at most its one receive window
(ENDPOINT_WINDOW, larger than a relay hop's), groundcontrol one of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from accesstunnel.channel import ENDPOINT_WINDOW
from tests.e2e.harness import Fleet

MiB = 1024 * 1024


def test_never_reading_device_command_bounds_memory(kiln7: Fleet) -> None:
    """
    The operator pipes 1 GiB into `sleep 60` on the device, which never reads
    its stdin: groundcontrol grows by less than 16 MiB, the agent by less than
    one ENDPOINT_WINDOW plus 8 MiB, the upload stays stalled (held back, not
    discarded), and a second session still answers meanwhile.
    """
    alice = kiln7.operators["alice"]
    server = kiln7.gc.process
    agent = kiln7.agents[0].process
    assert server is not None and agent is not None
    assert alice.ssh("dev_kiln7", "true").returncode == 0  # warm up every code path
    serverBase, agentBase = server.rssKiB(), agent.rssKiB()

    pipeline = ["bash", "-c", 'head -c 1G /dev/zero | "$@"', "upload"]
    upload = subprocess.Popen(
        [*pipeline, *alice.argv("dev_kiln7", "sleep 60")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        serverPeak, agentPeak = serverBase, agentBase
        answers = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            serverPeak = max(serverPeak, server.rssKiB())
            agentPeak = max(agentPeak, agent.rssKiB())
            answers.append(alice.ssh("dev_kiln7", "echo alive", timeout=30).stdout)
        assert upload.poll() is None, "the upload should still be held back"
        serverGrowth = (serverPeak - serverBase) * 1024
        agentGrowth = (agentPeak - agentBase) * 1024
        assert serverGrowth < 16 * MiB, f"server grew by {serverGrowth / MiB:.1f} MiB"
        assert agentGrowth < ENDPOINT_WINDOW + 8 * MiB, f"agent grew by {agentGrowth / MiB:.1f} MiB"
        assert all(out == "alive\n" for out in answers), answers
    finally:
        os.killpg(upload.pid, signal.SIGKILL)
        upload.wait()
