"""
End to end: a groundcontrol stopped by SIGTERM delivers the webhook notifications it has
queued, for at most groundcontrol.notify.STOP_DELIVERY_WAIT seconds, names in its log each
one it could not deliver, and sends at once the notifications it held for an agent's serial.
The pending device whose notification is held is a plain OpenSSH client logging in as an
agent (C{agent+NAME}): it never says hello, so no serial comes. All on 127.0.0.1.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from groundcontrol.notify import STOP_DELIVERY_WAIT
from tests.e2e.harness import LOOPBACK, Fleet, Process, run, waitFor
from tests.e2e.test_enrollment import _Hook


class _HangingHook:
    """A webhook receiver that reads each request and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self.listener.getsockname()[1]}/hook"
        self.received = b""
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.received += data

    def saw(self, text: str) -> bool:
        with self.lock:
            return text.encode() in self.received

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def hangingHook() -> Iterator[_HangingHook]:
    receiver = _HangingHook()
    try:
        yield receiver
    finally:
        receiver.close()


def _loginWithoutHello(fleet: Fleet, name: str) -> Process:
    """A new key logging in as an agent asking for C{name}, which never says hello."""
    key = fleet.base / f"{name}_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    argv = ["ssh", "-F", "/dev/null", "-N", "-i", str(key), "-p", str(fleet.gc.port)]
    argv += ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no"]
    argv += ["-o", "UserKnownHostsFile=/dev/null", f"agent+{name}@{LOOPBACK}"]
    return Process(argv, fleet.base / f"ssh-{name}.log", fleet.base)


def _terminate(fleet: Fleet) -> tuple[float, str]:
    """SIGTERM groundcontrol; seconds until it exited, and its log."""
    process = fleet.gc.process
    assert process is not None
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    try:
        process.popen.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("groundcontrol did not exit within 30 s of SIGTERM")
    return time.monotonic() - started, process.output()


def _notDelivered(log: str) -> list[str]:
    return sorted(
        line.split("webhook stopping: ")[1]
        for line in log.splitlines()
        if "webhook stopping: " in line and " not delivered" in line
    )


def test_stop_with_a_hanging_webhook(fleet: Fleet, hangingHook: _HangingHook) -> None:
    """
    A receiver that never answers (its attempts' timeout is 10 s) holds the stop for the
    bound only; the notification being attempted and the one held for a serial, sent at
    stop, are each named in the log as not delivered.
    """
    fleet.gc.stop()
    fleet.startServer("--webhook", hangingHook.url)
    silent = _loginWithoutHello(fleet, "held1")
    try:
        fleet.waitPending("held1")
        # Its serial's row comes after held1's in the feed: once it is POSTed, held1's row
        # has been read, and its notification is held (for 10 s).
        fleet.addAgent("sent1", approve=False, extraArgs=("--serial", "SN-1"))
        waitFor(lambda: hangingHook.saw('"sent1"'), 30, "the POST for sent1")
        assert not hangingHook.saw('"held1"')
        took, log = _terminate(fleet)
    finally:
        silent.stop()
    assert hangingHook.saw('"held1"'), "the held notification is sent at stop"
    assert took < STOP_DELIVERY_WAIT + 5, f"stop took {took:.1f} s"
    assert [line.split(" at ")[0] for line in _notDelivered(log)] == [
        "fleet event device.pending for held1",
        "fleet event device.pending for sent1",
    ], log


def test_stop_delivers_what_is_queued(fleet: Fleet) -> None:
    """
    A notification held for a serial when SIGTERM comes is POSTed at stop, serial null,
    and its retry after a 503 (within 1 s) still goes out before groundcontrol exits.
    """
    receiver = _Hook(failures=0)
    receiver.thread.start()
    try:
        fleet.gc.stop()
        fleet.startServer("--webhook", receiver.url)
        silent = _loginWithoutHello(fleet, "held2")
        try:
            fleet.waitPending("held2")
            # Once sent2's notification (after held2's row in the feed) is POSTed, held2's
            # is held; the next POST, held2's at stop, is answered 503.
            fleet.addAgent("sent2", approve=False, extraArgs=("--serial", "SN-2"))
            waitFor(receiver.snapshot, 30, "the POST for sent2")
            with receiver.lock:
                receiver.failures = len(receiver.posts) + 1
            _, log = _terminate(fleet)
        finally:
            silent.stop()
        posts = [p["body"] for p in receiver.snapshot() if p["body"]["device"] == "held2"]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.thread.join(5)
    assert [(p["event"], p["device"], p["detail"]["serial"]) for p in posts] == [
        ("device.pending", "held2", None)
    ] * 2, posts
    assert _notDelivered(log) == [], log
