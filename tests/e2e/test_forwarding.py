"""
End to end: port forwarding through groundcontrol, as an OpenSSH user does
it: -L, -D, -N, -R, and ProxyJump to the device's own sshd (issue 5).
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Fleet, allocatedRemotePort, run, waitFor
from tests.ports import closedPort, reservedPort


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(b"echo:" + data)


@pytest.fixture
def echoServer() -> Iterator[int]:
    """A TCP echo service on 127.0.0.1 (stands for a service on the device or operator)."""
    server = socketserver.ThreadingTCPServer((LOOPBACK, 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def roundTrip(connect: object, payload: bytes = b"ping") -> bytes:
    with connect() as s:  # type: ignore[operator]
        s.settimeout(10)
        s.sendall(payload)
        return s.recv(65536)


class Background:
    """An ssh process kept running for the test (ssh -N ...)."""

    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def close(self) -> str:
        self.popen.terminate()
        try:
            _, err = self.popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            _, err = self.popen.communicate()
        return err


def test_local_forward_reaches_service_on_device(
    kiln7: Fleet, echoServer: int, tmp_path: Path
) -> None:
    """ssh -N -L SOCKET:127.0.0.1:PORT dev_x: bytes reach a service on the device and back."""
    socketPath = tmp_path / "fwd.sock"
    ssh = Background(
        kiln7.operators["alice"].argv(
            "dev_kiln7",
            options=[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"{socketPath}:127.0.0.1:{echoServer}",
            ],
        )
    )
    try:
        waitFor(socketPath.exists, 20, "the forward's socket")

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(socketPath))
            return s

        assert roundTrip(connect) == b"echo:ping"
        assert roundTrip(connect, b"x" * 50000).startswith(b"echo:x")
    finally:
        ssh.close()


def test_local_forward_to_closed_port_is_refused_clearly(kiln7: Fleet) -> None:
    """A forward to a port nothing listens on fails with 'connect failed', not a hang."""
    port = closedPort()
    result = run(
        kiln7.operators["alice"].argv("dev_kiln7", options=["-W", f"127.0.0.1:{port}"]),
        timeout=30,
    )
    assert result.returncode == 255
    assert "open failed" in result.stderr


def test_dynamic_forward_socks(kiln7: Fleet, echoServer: int) -> None:
    """ssh -D: a SOCKS5 client reaches a service on the device through it."""
    port = reservedPort()
    ssh = Background(
        kiln7.operators["alice"].argv(
            "dev_kiln7",
            options=["-N", "-o", "ExitOnForwardFailure=yes", "-D", f"{LOOPBACK}:{port}"],
        )
    )
    try:

        def connect() -> socket.socket:
            s = socket.create_connection((LOOPBACK, port), timeout=10)
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(
                b"\x05\x01\x00\x01" + socket.inet_aton(LOOPBACK) + echoServer.to_bytes(2, "big")
            )
            reply = s.recv(10)
            assert reply[:2] == b"\x05\x00", reply
            return s

        waitFor(lambda: _listening(port), 20, "the SOCKS port")
        assert roundTrip(connect) == b"echo:ping"
    finally:
        ssh.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_remote_forward_back_to_operator(kiln7: Fleet, echoServer: int) -> None:
    """ssh -R 0:127.0.0.1:PORT: a connection made on the device reaches the operator's service."""
    ssh = Background(
        kiln7.operators["alice"].argv(
            "dev_kiln7",
            options=["-N", "-o", "ExitOnForwardFailure=yes", "-R", f"0:127.0.0.1:{echoServer}"],
        )
    )
    try:
        devicePort = allocatedRemotePort(ssh.popen.stderr)
        assert roundTrip(lambda: socket.create_connection((LOOPBACK, devicePort), timeout=10)) == (
            b"echo:ping"
        )
    finally:
        ssh.close()
    # The operator left: the device stops listening.
    waitFor(lambda: not _listening(devicePort), 10, "the remote forward to close")


@contextmanager
def plainSshd(base: Path, operatorKey: Path) -> Iterator[tuple[int, str]]:
    """A stock sshd on 127.0.0.1 that accepts C{operatorKey}: its port and host key line."""
    port = reservedPort()
    hostKey = base / "device_host_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostKey)], check=True)
    authorized = base / "authorized_keys"
    authorized.write_text(Path(f"{operatorKey}.pub").read_text())
    config = base / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress {LOOPBACK}\nHostKey {hostKey}\nPidFile none\nUsePAM no\n"
        f"AuthorizedKeysFile {authorized}\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL
    )
    try:
        waitFor(lambda: _listening(port), 20, "the device's sshd")
        yield port, Path(f"{hostKey}.pub").read_text().split(" #")[0].strip()
    finally:
        sshd.terminate()
        sshd.wait(10)


@pytest.fixture
def deviceSshd(kiln7: Fleet, tmp_path: Path) -> Iterator[int]:
    """The device's own sshd, on 127.0.0.1, accepting alice's key."""
    with plainSshd(tmp_path, kiln7.operators["alice"].keyPath) as (port, hostLine):
        with (kiln7.base / "known_hosts").open("a") as f:
            f.write(f"[dev_kiln7]:{port} {hostLine}\n")
        yield port


def test_proxyjump_reaches_device_sshd_end_to_end(kiln7: Fleet, deviceSshd: int) -> None:
    """ssh -J ctl@gc -p PORT root@dev_x: the session is the device sshd's own, end to end."""
    alice = kiln7.operators["alice"]
    result = run(
        [
            "ssh",
            "-F",
            str(alice.configPath),
            "-J",
            "ctl@groundcontrol",
            "-p",
            str(deviceSshd),
            # The device hop is outside the config's "Host groundcontrol" block.
            "-o",
            f"UserKnownHostsFile={kiln7.base / 'known_hosts'}",
            "-i",
            str(alice.keyPath),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "root@dev_kiln7",
            "echo through-device-sshd; echo $SSH_CONNECTION",
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("through-device-sshd\n")
    # The device's sshd saw the connection come from its own loopback (the agent).
    assert result.stdout.splitlines()[1].startswith("127.0.0.1 ")


def test_session_cap_per_connection(fleet: Fleet, echoServer: int, tmp_path: Path) -> None:
    """Past --max-sessions channels on one connection, the next is refused with the reason."""
    fleet.restartServer("--max-sessions", "2")
    alice = fleet.operators["alice"]
    fleet.addAgent("kiln7")
    fleet.waitRoutable(alice, "kiln7")
    socketPath = tmp_path / "fwd.sock"
    ssh = Background(
        alice.argv("dev_kiln7", options=["-N", "-L", f"{socketPath}:127.0.0.1:{echoServer}"])
    )
    held = []
    try:
        waitFor(socketPath.exists, 20, "the forward's socket")
        for _ in range(2):  # two channels, held open
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(socketPath))
            s.sendall(b"hold")
            s.settimeout(10)
            assert s.recv(100) == b"echo:hold"
            held.append(s)
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(socketPath))
        third.settimeout(10)
        assert third.recv(100) == b""  # closed: the channel was refused
        third.close()
    finally:
        for s in held:
            s.close()
        stderr = ssh.close()
    assert "too many channels on this connection (at most 2)" in stderr
