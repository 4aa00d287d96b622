"""
The device's wall clock steps while the agent runs (NTP's first sync on a board without a
real-time clock, a dead RTC battery, someone's C{date -s}): libfaketime moves the agent's
C{CLOCK_REALTIME} by the offset in a file, read at every call, and leaves C{CLOCK_MONOTONIC}
alone, as a real step does. groundcontrol's clock is not moved.

- A step forward by a day does not drop the link, nor an operator's open session over it.
- After a step back by an hour, a groundcontrol that stops answering (SIGSTOP) is still
  found within the keepalive's deadline (interval x count, here 1 s x 3 as in
  test_blackhole), not an hour late.

The agent schedules its timers on the monotonic clock (accesstunnel/clocks.py); the unit
tests in tests/test_clock_steps.py cover each part, this the whole on a real agent.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, Fleet, Process, _uniqueLog, readLine, waitFor
from tests.e2e.test_blackhole import DEAD_LINK_DEADLINE, KEEPALIVE, KEEPALIVE_INTERVAL

pytestmark = pytest.mark.slow

#: Room for a loaded machine (process scheduling, polling the agent's log).
SLACK = 5.0
DAY = 86400
HOUR = 3600


def libfaketime() -> str:
    """libfaketime's preload library (Debian package faketime); the test fails without it."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    found += sorted(glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is required (make test installs the Debian package faketime)")
    return found[0]


class SteppedAgent(Agent):
    """A tunnel-agent whose wall clock is offset by what the test writes to C{offsetFile}."""

    def __init__(self, base: Path, name: str) -> None:
        super().__init__(base, name)
        self.offsetFile = base / "faketime-offset"
        self.offsetFile.write_text("+0\n")

    def start(self, server: str, serverKey: str, *extra: str) -> None:
        environment = [
            f"LD_PRELOAD={libfaketime()}",
            f"FAKETIME_TIMESTAMP_FILE={self.offsetFile}",
            "FAKETIME_NO_CACHE=1",  # read the file at every call: steps while it runs
            "DONT_FAKE_MONOTONIC=1",  # a real step leaves CLOCK_MONOTONIC alone
        ]
        argv = ["env", *environment, *self.argv(server, serverKey, *extra)]
        self.process = Process(argv, _uniqueLog(self.base, f"agent-{self.name}"), self.base)

    def step(self, offset: int) -> None:
        """Set the agent's wall clock to real time plus C{offset} seconds."""
        self.offsetFile.write_text(f"{offset:+d}\n")


class Session:
    """An operator's open C{ssh dev_NAME cat}: each line sent comes back."""

    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def echo(self, line: str) -> str:
        """Send C{line}; what came back (empty if the session ended; fails if it is silent)."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except BrokenPipeError:
            return ""
        return readLine(self.popen.stdout, f"the session's echo of {line!r}").strip()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


@pytest.fixture
def stepped(fleet: Fleet) -> Iterator[SteppedAgent]:
    """
    Device kiln7, approved and reachable, its agent's wall clock under the test's control;
    both ends with keepalives of 1 s x 3.
    """
    fleet.gc.stop()
    fleet.startServer(*KEEPALIVE)
    agent = SteppedAgent(fleet.base, "kiln7")
    agent.start(fleet.serverAddress, str(fleet.gc.data / "ssh_host_ed25519_key.pub"), *KEEPALIVE)
    fleet.agents.append(agent)
    fleet.waitPending("kiln7")
    fleet.gc.cli("device", "approve", "kiln7")
    fleet.waitRoutable(fleet.operators["alice"], "kiln7")
    yield agent
    assert fleet.gc.process is not None
    fleet.gc.process.signal(signal.SIGCONT)  # if the test stopped it


def test_wallClockSteps(fleet: Fleet, stepped: SteppedAgent) -> None:
    """
    A day forward: the link and an open session live on. Then an hour back and
    groundcontrol frozen: the agent finds the dead link within the keepalive deadline.
    """
    process, server = stepped.process, fleet.gc.process
    assert process is not None and server is not None
    session = Session(fleet.operators["alice"].argv("dev_kiln7", "cat"))
    try:
        assert session.echo("before") == "before"
        stepped.step(+DAY)
        time.sleep(2 * DEAD_LINK_DEADLINE)  # every keepalive timer had its chance to misfire
        assert session.echo("a day later") == "a day later", "the session survived the step"
        assert "down after" not in process.output(), "the link survived the step"
        # Every timer pending at the step used to fire at once: the hourly rekey among them.
        assert "time limit reached" not in process.output(), "no timer fired early"
    finally:
        session.close()

    stepped.step(+DAY - HOUR)
    time.sleep(KEEPALIVE_INTERVAL)  # the agent's pending timers are now an hour away on wall time
    os.killpg(server.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    waitFor(
        lambda: "groundcontrol stopped answering" in process.output(),
        DEAD_LINK_DEADLINE + SLACK,
        "the agent to find the frozen groundcontrol after its clock stepped back",
        interval=0.1,
    )
    print(f"clock stepped back: frozen groundcontrol found in {time.monotonic() - frozen:.1f} s")
    # The link's length is measured on the monotonic clock too (not "23h02m09s").
    assert re.search(r"down after [0-9.]+ s: groundcontrol stopped answering", process.output())
