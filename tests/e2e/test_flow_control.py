"""
End to end: flow control holds from device to operator. An operator that
stops reading does not make groundcontrol buffer the device's output, and
other sessions on the same link stay interactive meanwhile (issue 2).
"""

from __future__ import annotations

import subprocess
import time

from tests.e2e.harness import Fleet

MiB = 1024 * 1024


def test_never_reading_operator_bounds_server_memory(kiln7: Fleet) -> None:
    """
    The device writes 1 GiB to an operator whose ssh never reads: the server's
    memory grows by less than 16 MiB, and a second session still answers.
    """
    alice = kiln7.operators["alice"]
    server = kiln7.gc.process
    assert alice.ssh("dev_kiln7", "true").returncode == 0  # warm up every code path
    baseline = server.rssKiB()

    stalled = subprocess.Popen(
        alice.argv("dev_kiln7", "head -c 1G /dev/zero"),
        stdout=subprocess.PIPE,  # never read: ssh blocks once the pipe is full
        stderr=subprocess.DEVNULL,
    )
    try:
        peak = baseline
        interactive = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, server.rssKiB())
            started = time.monotonic()
            result = alice.ssh("dev_kiln7", "echo alive", timeout=30)
            interactive.append((result.stdout, time.monotonic() - started))
        assert stalled.poll() is None, "the stalled session should still be open"
        growth = (peak - baseline) * 1024
        assert growth < 16 * MiB, f"server grew by {growth / MiB:.1f} MiB"
        assert all(out == "alive\n" for out, _ in interactive), interactive
        # The device's writer really is held back, not dropped: less than the
        # whole GiB can have left it, since nobody read it.
    finally:
        stalled.kill()
        stalled.wait()
