"""
Loopback ports for tests that cannot listen on port 0 and read back what they got.

A port bound to 0 and freed at once ("free port" helpers) is anyone's again: the kernel
hands it to the next bind to port 0 on the machine (another test's groundcontrol, echo
server or ssh -R, here or in a run beside this one), so a "closed" port could answer and a
port given to sshd could be taken before sshd binds it. These helpers hold what they give.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

LOOPBACK = "127.0.0.1"

#: Reserved ports are drawn from below the kernel's ephemeral range (never given to a bind
#: to port 0 or a connect's source port), from here up.
RESERVED_LOW = 10000

#: One lock file per reserved port, shared by every test process on the machine.
RESERVATIONS = Path(tempfile.gettempdir()) / "accesstunnel-test-ports"

#: What this process holds until it exits: the sockets holding closed ports, and the locks
#: of reserved ports (the kernel drops both when the process ends, however it ends).
_held: list[socket.socket | int] = []


def closedPort() -> int:
    """
    A loopback port nothing listens on, and nothing will while this process runs: a socket
    bound to it that never listens holds it, so a connection to it is refused.
    """
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    _held.append(holder)
    return int(holder.getsockname()[1])


def ephemeralRange() -> tuple[int, int]:
    """The kernel's range of ports for binds to port 0 and connects' source ports."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def reservedPort() -> int:
    """
    A loopback port for a program that binds it itself (sshd, ssh -L and -D, tinyproxy),
    free now and promised to nobody else: it is below the ephemeral range, so the kernel
    gives it to no bind to port 0, and its lock file, held until this process exits, keeps
    every other test process that asks here from choosing it too.
    """
    top = ephemeralRange()[0]
    if top - RESERVED_LOW < 1000:
        raise RuntimeError(f"the ephemeral range starts at {top}: too few ports below it")
    _makeReservations()
    for _ in range(200):
        port = random.randrange(RESERVED_LOW, top)
        lock = os.open(RESERVATIONS / str(port), os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another test process holds it
            os.close(lock)
            continue
        if _bindable(port):
            _held.append(lock)
            return port
        os.close(lock)  # a program outside the tests has it
    raise RuntimeError(f"no loopback port free between {RESERVED_LOW} and {top}")


def _makeReservations() -> None:
    """The lock files' directory, shared by every user's test runs as /tmp is."""
    try:
        RESERVATIONS.mkdir()
    except FileExistsError:
        return
    RESERVATIONS.chmod(0o1777)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True
