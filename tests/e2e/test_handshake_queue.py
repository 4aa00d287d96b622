"""
End to end: with every handshake slot taken, connections wait for one instead of being
closed, and an operator who connects meanwhile is served before the connections that
were already waiting (issue 7, reconnect storm: handshake concurrency bounded so operators
are served meanwhile).

groundcontrol runs with ``--max-handshakes 4 --max-handshakes-per-source 2`` and a login
grace time of 5 s. Four silent TCP connections (two each from 127.0.0.2 and 127.0.0.3) take
every slot; eight more from the same sources wait. The operator's OpenSSH client, from
127.0.0.1, then runs `true` on a device: it waits too, and is served when the grace time
ends the silent handshakes, ahead of the eight that waited before it (first come first
served, it would wait two more grace times, past its ConnectTimeout of 10 s).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.harness import LOOPBACK, Fleet, run, waitFor

pytestmark = pytest.mark.slow

MAX_HANDSHAKES = 4
PER_SOURCE = 2
GRACE = 5
SOURCES = ("127.0.0.2", "127.0.0.3")


class Silent:
    """A TCP connection from C{source} that never sends a byte; notes what it receives."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(
            (LOOPBACK, port), timeout=10, source_address=(source, 0)
        )
        self.sock.setblocking(False)
        self.received = b""
        self.closed = False

    def poll(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while not self.closed:
                data = self.sock.recv(65536)
                if not data:
                    self.closed = True
                else:
                    self.received += data

    @property
    def started(self) -> bool:
        """groundcontrol gave it a handshake slot: its SSH version line arrived."""
        self.poll()
        return self.received.startswith(b"SSH-2.0-")

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def silentConnections(port: int, count: int) -> Iterator[list[Silent]]:
    conns: list[Silent] = []
    try:
        for n in range(count):
            conns.append(Silent(port, SOURCES[n % len(SOURCES)]))
        yield conns
    finally:
        for c in conns:
            c.close()


def test_operator_served_while_the_bound_is_full(fleet: Fleet) -> None:
    """
    Every handshake slot held by a silent connection: the operator's `ssh dev_kiln7 true`
    is not refused; it waits and succeeds once the grace time frees the slots, before the
    eight connections that were waiting already. No silent connection is ever closed unstarted
    (the old limiter closed every connection past the bound before a single byte).
    """
    fleet.restartServer(
        "--max-handshakes",
        str(MAX_HANDSHAKES),
        "--max-handshakes-per-source",
        str(PER_SOURCE),
        "--login-grace-time",
        str(GRACE),
    )
    alice = fleet.operators["alice"]
    fleet.addAgent("kiln7")
    fleet.waitRoutable(alice, "kiln7")
    assert fleet.gc.port is not None
    with silentConnections(fleet.gc.port, MAX_HANDSHAKES) as first:
        # The bound is full: all four hold a slot (the server has spoken to each).
        waitFor(lambda: all(c.started for c in first), 10, "the silent connections to start")
        with silentConnections(fleet.gc.port, 2 * MAX_HANDSHAKES) as waiting:
            operator = subprocess.Popen(
                alice.argv("dev_kiln7", "true", options=["-b", LOOPBACK]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                _, stderr = operator.communicate(timeout=GRACE * 6)
            finally:
                if operator.poll() is None:
                    operator.kill()
                    operator.wait()
            assert operator.returncode == 0, stderr
            # The grace time ended the first four; the operator took one of their slots
            # ahead of the eight waiting, which got the other three and the operator's
            # once it logged in: four, until those four run out their grace time.
            assert sum(c.started for c in waiting) <= MAX_HANDSHAKES
            for c in first + waiting:
                c.poll()
                assert not (c.closed and not c.started), "a connection was closed unstarted"
    # Once they are gone, nothing is left waiting: a login goes straight through.
    result = run(alice.argv("dev_kiln7", "true", options=["-b", LOOPBACK]), timeout=30)
    assert result.returncode == 0, result.stderr
