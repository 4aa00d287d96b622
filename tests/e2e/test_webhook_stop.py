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
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from groundcontrol.notify import STOP_DELIVERY_WAIT
from tests.e2e.harness import LOOPBACK, Fleet, Process, WebhookReceiver, closeServer, run, waitFor


class _HangingHook:
    """
    A webhook receiver that reads each request and never answers.

    L{close} shuts each socket down, joins the threads using it and only then closes it: a
    socket closed while another thread is about to call C{accept} or C{recv} on it frees its
    descriptor number, and that thread's call lands on whatever socket is opened next with
    the number, such as the next test's webhook receiver, whose POST it would swallow.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self.listener.getsockname()[1]}/hook"
        self.received = b""
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.readers: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # shut down
            reader = threading.Thread(target=self._read, args=(connection,), daemon=True)
            with self.lock:
                self.connections.append(connection)
                self.readers.append(reader)
            reader.start()

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
        closeServer(self.listener, self.thread, self.connections, self.readers)


def _refusesFirstAbout(device: str) -> Callable[[dict[str, Any], list[dict[str, Any]]], int]:
    """A webhook's answers: 503 to the first POST about C{device}, 200 otherwise."""

    def status(body: dict[str, Any], earlier: list[dict[str, Any]]) -> int:
        first = all(p["device"] != body["device"] for p in earlier)
        return 503 if first and body["device"] == device else 200

    return status


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


def _heldBehindAnApproval(
    fleet: Fleet, held: str, other: str, approvalPosted: Callable[[], bool]
) -> None:
    """
    Once C{held} is pending, approve C{other} and wait for its POST: its row comes after
    C{held}'s in the feed, so C{held}'s row has been read and its notification is held
    (for 10 s from then; an approval's is sent at once).
    """
    fleet.waitPending(held)
    fleet.gc.cli("device", "approve", other)
    waitFor(approvalPosted, 30, f"the POST of {other}'s approval")


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
    bound only; the notifications being attempted (sent1's request, its approval) and the
    one held for a serial, sent at stop, are each named in the log as not delivered.
    """
    fleet.gc.stop()
    fleet.startServer("--webhook", hangingHook.url)
    fleet.addAgent("sent1", approve=False, extraArgs=("--serial", "SN-1"))
    waitFor(lambda: hangingHook.saw('"sent1"'), 30, "the POST for sent1")
    silent = _loginWithoutHello(fleet, "held1")
    try:
        _heldBehindAnApproval(fleet, "held1", "sent1", lambda: hangingHook.saw("device.approved"))
        assert not hangingHook.saw('"held1"')
        took, log = _terminate(fleet)
    finally:
        silent.stop()
    assert hangingHook.saw('"held1"'), "the held notification is sent at stop"
    assert took < STOP_DELIVERY_WAIT + 5, f"stop took {took:.1f} s"
    named = {line.split(" at ")[0] for line in _notDelivered(log)}
    assert {
        "fleet event device.approved for sent1",
        "fleet event device.pending for held1",
        "fleet event device.pending for sent1",
    } <= named, log


def test_stop_delivers_what_is_queued(fleet: Fleet) -> None:
    """
    A notification held for a serial when SIGTERM comes is POSTed at stop, serial null,
    and its retry after a 503 (within 1 s) still goes out before groundcontrol exits.
    """
    receiver = WebhookReceiver(_refusesFirstAbout("held2"))
    receiver.start()
    try:
        fleet.gc.stop()
        fleet.startServer("--webhook", receiver.url)
        fleet.addAgent("sent2", approve=False, extraArgs=("--serial", "SN-2"))
        waitFor(receiver.bodies, 30, "the POST for sent2")
        silent = _loginWithoutHello(fleet, "held2")
        try:
            _heldBehindAnApproval(
                fleet,
                "held2",
                "sent2",
                lambda: any(p["event"] == "device.approved" for p in receiver.bodies()),
            )
            assert all(p["device"] != "held2" for p in receiver.bodies())
            _, log = _terminate(fleet)
        finally:
            silent.stop()
        posts = [p for p in receiver.bodies() if p["device"] == "held2"]
    finally:
        receiver.close()
    assert [(p["event"], p["device"], p["detail"]["serial"]) for p in posts] == [
        ("device.pending", "held2", None)
    ] * 2, posts
    assert _notDelivered(log) == [], log
