"""
groundcontrol's machine's wall clock steps while it runs (a VM resumed or migrated,
chrony's makestep, C{date -s}): libfaketime moves groundcontrol's C{CLOCK_REALTIME} by the
offset in a file, read at every call, and leaves C{CLOCK_MONOTONIC} alone, as a real step
does. The agent's clock and the operator's are not moved.

- A step forward by an hour fires no timer early: an open operator session and the agent
  link live on, and a client still logging in (its version line sent, the 30 s login grace
  time running) is not dropped at the step.
- After a step back by an hour, an agent that freezes (SIGSTOP) is dropped by groundcontrol
  within its keepalive deadline (interval x count, 2 s x 4 here), not an hour late.

Keepalives of 2 s x 4, not test_blackhole's 1 s x 3: on a loaded machine (two cores, other
tests running) a link renewing its keys after login could stay silent for 3 s, and the
link fell and came back before the step; a link that came up after the step would not
show its timers moved.

libfaketime, read from two threads at once (groundcontrol's store thread and its reactor),
now and then gives one of them the real time (a burst of 3 threads reading 100,000 times
each saw 9 such readings): its log may say a step back and forward again that no one made.
Timers are moved back and forward alike, so nothing here depends on it.

groundcontrol's timers are moved by each step (accesstunnel/stepwatch.py); the unit tests
in tests/test_clock_step_watch.py cover each part, this the whole on a real groundcontrol.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Agent, Fleet, waitFor
from tests.e2e.test_blackhole import devices
from tests.e2e.test_clock_steps import HOUR, SLACK, Session, libfaketime

pytestmark = pytest.mark.slow

KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 4
KEEPALIVE = (
    "--keepalive-interval",
    str(KEEPALIVE_INTERVAL),
    "--keepalive-count",
    str(KEEPALIVE_COUNT),
)
#: Silence after which either end declares the link dead.
DEAD_LINK_DEADLINE = KEEPALIVE_INTERVAL * KEEPALIVE_COUNT


class SteppedServer:
    """groundcontrol under libfaketime: its wall clock is offset by C{step}."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.offsetFile: Path = fleet.base / "gc-faketime-offset"
        self.offsetFile.write_text("+0\n")

    def start(self, *extra: str) -> None:
        self.fleet.gc.start(
            *extra,
            wrapper=[
                "env",
                f"LD_PRELOAD={libfaketime()}",
                f"FAKETIME_TIMESTAMP_FILE={self.offsetFile}",
                "FAKETIME_NO_CACHE=1",  # read the file at every call: steps while it runs
                "DONT_FAKE_MONOTONIC=1",  # a real step leaves CLOCK_MONOTONIC alone
            ],
        )
        for operator in self.fleet.operators.values():
            self.fleet.writeClientConfig(operator)

    def step(self, offset: int) -> None:
        """Set groundcontrol's wall clock to real time plus C{offset} seconds."""
        self.offsetFile.write_text(f"{offset:+d}\n")


@pytest.fixture
def stepped(fleet: Fleet) -> Iterator[tuple[SteppedServer, Agent]]:
    """
    groundcontrol with its wall clock under the test's control and device kiln7 approved
    and reachable; both ends with keepalives of 2 s x 4.
    """
    fleet.gc.stop()
    server = SteppedServer(fleet)
    server.start(*KEEPALIVE)
    agent = fleet.addAgent("kiln7", extraArgs=KEEPALIVE)
    fleet.waitRoutable(fleet.operators["alice"], "kiln7")
    yield server, agent
    if agent.process is not None:
        agent.process.signal(signal.SIGCONT)  # if the test stopped it


def loggingIn(fleet: Fleet) -> socket.socket:
    """A client that sent its version line and then nothing: its login grace time runs."""
    assert fleet.gc.port is not None
    client = socket.create_connection((LOOPBACK, fleet.gc.port), timeout=10)
    client.sendall(b"SSH-2.0-OpenSSH_9.2p1 stepped\r\n")
    client.recv(4096)  # groundcontrol's version line (and perhaps its KEXINIT)
    return client


def stillOpen(client: socket.socket) -> bool:
    """Whether groundcontrol has not closed C{client} (nothing but KEXINIT bytes to read)."""
    client.setblocking(False)
    try:
        while True:
            if not client.recv(65536):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_serverClockSteps(fleet: Fleet, stepped: tuple[SteppedServer, Agent]) -> None:
    """
    An hour forward: the session, the link and a client logging in live on. Then an hour
    back and the agent frozen: groundcontrol drops its link within the keepalive deadline.
    """
    server, agent = stepped
    gc, agentProcess = fleet.gc.process, agent.process
    assert gc is not None and agentProcess is not None
    session = Session(fleet.operators["alice"].argv("dev_kiln7", "cat"))
    client = loggingIn(fleet)
    try:
        assert session.echo("before") == "before"
        agentSaid = len(agentProcess.output())  # a link that fell before the step is not ours
        server.step(+int(HOUR))
        time.sleep(DEAD_LINK_DEADLINE)  # every timer had its chance to misfire
        assert "the clock stepped forward 1h00m00s" in gc.output(), "the step was seen"
        assert session.echo("an hour later") == "an hour later", "the session survived"
        assert "down after" not in agentProcess.output()[agentSaid:], "the link survived"
        assert stillOpen(client), "the login grace timer (30 s) did not fire at the step"
    finally:
        session.close()
        client.close()

    server.step(0)  # an hour back
    time.sleep(KEEPALIVE_INTERVAL)  # groundcontrol's pending timers were an hour ahead
    assert devices(fleet)["kiln7"]["online"] is True
    assert "down after" not in agentProcess.output()[agentSaid:], "the link from before the steps"
    os.killpg(agentProcess.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    waitFor(
        lambda: devices(fleet)["kiln7"]["online"] is False,
        DEAD_LINK_DEADLINE + SLACK,
        "groundcontrol to drop the frozen agent's link after its clock stepped back",
        interval=0.2,
    )
    print(f"clock stepped back: frozen agent dropped in {time.monotonic() - frozen:.1f} s")
    assert "no answer from" in gc.output(), "found by its keepalive"
    assert "the clock stepped back 1h00m00s" in gc.output(), "the step was seen"
