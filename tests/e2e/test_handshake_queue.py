"""
End to end: with every handshake slot taken, connections wait for one instead of being
closed, and an operator who connects meanwhile is served before the connections that
were already waiting (issue 7, reconnect storm: handshake concurrency bounded so operators
are served meanwhile).

L{test_operator_served_ahead_of_a_crowd_of_agents}: groundcontrol runs with
``--max-handshakes 4 --max-handshakes-per-source 4`` (so one slot is reserved for
operators, three for agents) and a login grace time of 20 s. Twelve TCP connections send
an agent's SSH version line (ours, or Conch's as agents deployed before ours had its own
send it) and stall: three take the agents' slots, nine wait. The operator's OpenSSH
client, from the SAME address as that crowd (or, in the second case, with every agent from
its own address, as devices behind their own NATs are), runs `true` on a device: its
version line puts it in the operators' reserve, so it logs in at once, while the nine still
wait and the three still hold their slots. The source address alone could not tell it
from the crowd: first come first served within the source (or among quiet sources) would
keep it waiting three grace times, past its ConnectTimeout of 10 s. The third case,
``--max-handshakes 8 --max-handshakes-operators 4``, shows lending: the crowd takes its own
four slots and two of the idle reserve's four (all but the floor of two), six wait, and
the operator from the crowd's address logs in at once on the floor.

L{test_operator_served_while_the_bound_is_full} pins the limiter without the operators'
reserve (``--max-handshakes-operators 0``): four silent TCP connections (two each from
127.0.0.2 and 127.0.0.3) take every slot; eight more from the same sources wait. The
operator's OpenSSH client, from 127.0.0.1, then runs `true` on a device: it waits too, and
is served when the grace time ends the silent handshakes, ahead of the eight that waited
before it (first come first served, it would wait two more grace times, past its
ConnectTimeout of 10 s).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.harness import LOOPBACK, Fleet, run, waitFor

pytestmark = pytest.mark.slow

MAX_HANDSHAKES = 4
PER_SOURCE = 2
GRACE = 5
SOURCES = ("127.0.0.2", "127.0.0.3")


#: Our agent's version line (agent/link.py); what the crowd sends before it stalls.
AGENT_VERSION = b"SSH-2.0-AccessTunnelAgent_0.1.0 Twisted_26.10.0\r\n"
#: What agents deployed before it had a line of their own send (Conch's client).
LEGACY_AGENT_VERSION = b"SSH-2.0-Twisted_26.10.0\r\n"


class Silent:
    """
    A TCP connection from C{source} that sends C{hello} (by default nothing) and then never
    another byte; notes what it receives.
    """

    def __init__(self, port: int, source: str, hello: bytes = b"") -> None:
        self.sock = socket.create_connection(
            (LOOPBACK, port), timeout=10, source_address=(source, 0)
        )
        if hello:
            self.sock.sendall(hello)
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


CROWD = 12
CROWD_GRACE = 20


#: The crowd's version lines: ours, and Conch's (agents deployed before ours had its own).
BOTH_AGENT_VERSIONS = (AGENT_VERSION, LEGACY_AGENT_VERSION)


@pytest.mark.parametrize(
    ("crowdSource", "operatorSource", "slots", "reserve", "started"),
    [
        # 4 slots, 1 reserved (a quarter): nothing to lend, the crowd holds 3.
        (lambda n: "127.0.0.2", "127.0.0.2", MAX_HANDSHAKES, None, MAX_HANDSHAKES - 1),
        (lambda n: f"127.0.1.{n + 1}", "127.0.0.1", MAX_HANDSHAKES, None, MAX_HANDSHAKES - 1),
        # 8 slots, 4 reserved, floor max(2, 4 // 4) = 2: the crowd holds its own 4 and 2
        # borrowed from the idle reserve; 2 stay free.
        (lambda n: "127.0.0.2", "127.0.0.2", 8, 4, 8 - 2),
    ],
    ids=["same-address", "one-device-per-address", "lending"],
)
def test_operator_served_ahead_of_a_crowd_of_agents(
    fleet: Fleet,
    crowdSource: Callable[[int], str],
    operatorSource: str,
    slots: int,
    reserve: int | None,
    started: int,
) -> None:
    """
    Stalled agents (sending our agent's version line or Conch's) hold every slot agents may
    have, their own and (lending case) the reserve's all but its floor, and the rest of the
    twelve wait, all from the operator's own address (or each from its own): the operator's
    `ssh dev_kiln7 true` succeeds through a reserved slot while the rest still wait, the
    started ones still hold their slots, and none of the crowd was closed.
    """
    reserveArgs = [] if reserve is None else ["--max-handshakes-operators", str(reserve)]
    fleet.restartServer(
        "--max-handshakes",
        str(slots),
        "--max-handshakes-per-source",
        str(slots),
        *reserveArgs,
        "--login-grace-time",
        str(CROWD_GRACE),
    )
    alice = fleet.operators["alice"]
    fleet.addAgent("kiln7")
    fleet.waitRoutable(alice, "kiln7")
    assert fleet.gc.port is not None
    port = fleet.gc.port
    crowd: list[Silent] = []
    try:
        for n in range(CROWD):
            hello = BOTH_AGENT_VERSIONS[n % 2]
            crowd.append(Silent(port, crowdSource(n), hello=hello))
        waitFor(
            lambda: sum(c.started for c in crowd) == started,
            10,
            "the crowd to take the slots agents may have",
        )
        # The first of each source's queue started: the rest of the crowd waits.
        result = run(alice.argv("dev_kiln7", "true", options=["-b", operatorSource]), timeout=30)
        assert result.returncode == 0, result.stderr
        assert sum(c.started for c in crowd) == started, "the crowd went first"
        for c in crowd:
            c.poll()
            assert not c.closed, "a crowd connection was closed"
    finally:
        for c in crowd:
            c.close()
    # Once they are gone, nothing is left waiting: a login goes straight through.
    result = run(alice.argv("dev_kiln7", "true", options=["-b", LOOPBACK]), timeout=30)
    assert result.returncode == 0, result.stderr


def test_operator_served_while_the_bound_is_full(fleet: Fleet) -> None:
    """
    Without the operators' reserve, every handshake slot held by a silent connection: the
    operator's `ssh dev_kiln7 true` is not refused; it waits and succeeds once the grace
    time frees the slots, before the eight connections that were waiting already. No
    silent connection is ever closed unstarted (the old limiter closed every connection
    past the bound before a single byte).
    """
    fleet.restartServer(
        "--max-handshakes",
        str(MAX_HANDSHAKES),
        "--max-handshakes-per-source",
        str(PER_SOURCE),
        "--max-handshakes-operators",
        "0",
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
