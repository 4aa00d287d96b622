"""
End to end: what an OpenSSH user does beyond the basics, each as under a plain sshd.

The promise: exit codes, the command line, the environment, the terminal, a shared
connection's forwards, escape commands, copies between devices, resumed transfers and
ProxyJump through a device work as if the device were directly reachable. What other
files pin (exec, shell, scp, sftp, rsync, sshfs, -L/-D/-R, -A, -X) is not repeated here.
One fleet (devices kiln7 and kiln8) serves the whole module: each test takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.e2e.harness import LOOPBACK, Fleet, Operator, readLine, run, waitFor
from tests.e2e.test_forwarding import (
    Background,
    _Echo,
    _listening,
    echoServer,
    plainSshd,
    roundTrip,
)
from tests.ports import reservedPort

__all__ = ["echoServer"]  # a fixture, used by name


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """groundcontrol, admin alice, and devices kiln7 and kiln8, both reachable."""
    fleet = Fleet(tmp_path_factory.mktemp("openssh_user"))
    try:
        alice = fleet.addOperator("alice", admin=True)
        fleet.startServer()
        for name in ("kiln7", "kiln8"):
            fleet.addAgent(name)
        for name in ("kiln7", "kiln8"):
            fleet.waitRoutable(alice, name)
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def alice(devices: Fleet) -> Operator:
    return devices.operators["alice"]


def home(fleet: Fleet, name: str) -> Path:
    return next(agent.home for agent in fleet.agents if agent.name == name)


def test_exit_codes_and_a_long_command_line(alice: Operator) -> None:
    """exit 255 and a missing command (127) come back as they are; a 100 KiB command runs."""
    assert alice.ssh("dev_kiln7", "exit 255").returncode == 255
    missing = alice.ssh("dev_kiln7", "no-such-command-here")
    assert missing.returncode == 127
    assert "command not found" in missing.stderr
    word = "x" * 100_000
    long = alice.ssh("dev_kiln7", f"echo {word} | wc -c", timeout=30)
    assert (long.returncode, long.stdout) == (0, "100001\n"), long.stderr


def test_ssh_connection_variables_and_bashrc(devices: Fleet, alice: Operator) -> None:
    """
    SSH_CLIENT and SSH_CONNECTION say where the operator came from and which port it
    reached, as sshd sets them; with them bash reads ~/.bashrc for a command, as it does
    for a command run through sshd (Debian's bash), so PATH set there is found.
    """
    bashrc = home(devices, "kiln7") / ".bashrc"
    bashrc.write_text('PATH="$HOME/bin:$PATH"\n')
    tool = home(devices, "kiln7") / "bin" / "devtool"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text("#!/bin/sh\necho devtool ran\n")
    tool.chmod(0o755)
    try:
        result = alice.ssh("dev_kiln7", 'echo "$SSH_CLIENT|$SSH_CONNECTION"; devtool')
    finally:
        bashrc.unlink()
    assert result.returncode == 0, result.stderr
    client, connection = result.stdout.splitlines()[0].split("|")
    port = str(devices.gc.port)
    clientHost, clientPort, serverPort = client.split()
    assert (clientHost, serverPort) == (LOOPBACK, port)
    assert connection.split() == [LOOPBACK, clientPort, LOOPBACK, port]
    assert result.stdout.splitlines()[1] == "devtool ran"


def test_terminal_modes_and_size_from_the_client(alice: Operator) -> None:
    """
    ssh -t from a terminal with intr ^G and eol switched off: the device's pty has the
    same modes (eol <undef>, not byte 255), the client's size, and its TERM.
    """
    shell = pexpect.spawn(
        "bash", ["--norc", "--noprofile"], dimensions=(33, 101), encoding="utf-8", timeout=20
    )
    try:
        shell.sendline("stty intr ^G eol undef; export TERM=vt220")
        command = "stty -a; echo TERM=$TERM; echo END''MARK"
        shell.sendline(" ".join([*alice.argv("dev_kiln7", options=["-t"]), f"'{command}'"]))
        shell.expect(r"ENDMARK\r?\n")
        seen = shell.before
    finally:
        shell.close(force=True)
    assert "rows 33; columns 101;" in seen
    assert "intr = ^G;" in seen
    assert "eol = <undef>;" in seen
    assert "eol2 = <undef>;" in seen
    assert "TERM=vt220" in seen


def test_requested_terminal_or_none(alice: Operator) -> None:
    """-T runs without a terminal; -tt gives one, with SSH_TTY naming it."""
    without = alice.ssh("dev_kiln7", "tty", options=["-T"])
    assert (without.returncode, without.stdout) == (1, "not a tty\n")
    forced = alice.ssh("dev_kiln7", 'tty; echo "$SSH_TTY"', options=["-tt"])
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.split()
    assert len(lines) == 2, forced
    ttyName, sshTty = lines
    assert ttyName.startswith("/dev/pts/") and sshTty == ttyName


def test_server_alive_messages_are_answered(alice: Operator) -> None:
    """ServerAliveInterval 1: ssh's keepalive@openssh.com requests are answered, never a timeout."""
    options = ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=1"]
    result = alice.ssh("dev_kiln7", "sleep 2.5; echo alive", options=options, timeout=30)
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_control_master_forwards_added_and_cancelled(
    alice: Operator, echoServer: int, tmp_path: Path
) -> None:
    """
    With a ControlMaster: -O check, -O forward -L and -R (one of them a reverse SOCKS
    forward) work at once, -O cancel -R stops the device listening, -O exit ends it.
    """
    mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={tmp_path / 'cm'}"]
    master = subprocess.Popen(
        alice.argv("dev_kiln7", options=[*mux, "-N"]),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waitFor((tmp_path / "cm").exists, 20, "the shared connection")
        assert alice.ssh("dev_kiln7", options=[*mux, "-O", "check"]).returncode == 0
        local = reservedPort()
        forward = f"{LOOPBACK}:{local}:{LOOPBACK}:{echoServer}"
        added = alice.ssh("dev_kiln7", options=[*mux, "-O", "forward", "-L", forward])
        assert added.returncode == 0, added.stderr
        assert roundTrip(lambda: socket.create_connection((LOOPBACK, local), timeout=10)) == (
            b"echo:ping"
        )
        remote = alice.ssh(
            "dev_kiln7", options=[*mux, "-O", "forward", "-R", f"0:{LOOPBACK}:{echoServer}"]
        )
        assert remote.returncode == 0, remote.stderr
        devicePort = int(remote.stdout.strip())
        assert roundTrip(lambda: socket.create_connection((LOOPBACK, devicePort), timeout=10)) == (
            b"echo:ping"
        )
        socks = alice.ssh("dev_kiln7", options=[*mux, "-O", "forward", "-R", "0"])
        assert socks.returncode == 0, socks.stderr
        assert roundTrip(lambda: socks5(int(socks.stdout.strip()), echoServer)) == b"echo:ping"
        cancel = alice.ssh(
            "dev_kiln7",
            # As the forward was asked for: port 0 (ssh maps it to the allocated port).
            options=[*mux, "-O", "cancel", "-R", f"0:{LOOPBACK}:{echoServer}"],
        )
        assert cancel.returncode == 0, cancel.stderr
        waitFor(lambda: not _listening(devicePort), 10, "the cancelled forward to close")
        assert alice.ssh("dev_kiln7", options=[*mux, "-O", "exit"]).returncode == 0
        master.wait(10)
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()


def socks5(port: int, target: int) -> socket.socket:
    """A SOCKS5 connection through the listener on C{port} to 127.0.0.1:C{target}."""
    s = socket.create_connection((LOOPBACK, port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOOPBACK) + target.to_bytes(2, "big"))
    assert s.recv(10)[:2] == b"\x05\x00"
    return s


def test_escape_command_line_forwards_then_drop(alice: Operator, echoServer: int) -> None:
    """
    In a session: ~C -R adds a remote forward, ~C -KR cancels it, ~# lists the
    connection, ~. drops it (ssh exits 255), as with sshd.
    """
    session = pexpect.spawn(
        "ssh",
        alice.argv("dev_kiln7", options=["-tt", "-o", "EnableEscapeCommandline=yes"])[1:],
        encoding="utf-8",
        timeout=20,
    )
    try:
        session.sendline("echo READ''Y")
        session.expect("READY")
        devicePort = reservedPort()
        session.send("\r~C")
        session.expect("ssh>")
        session.sendline(f"-R {LOOPBACK}:{devicePort}:{LOOPBACK}:{echoServer}")
        session.expect("Forwarding port")
        connect = lambda: socket.create_connection((LOOPBACK, devicePort), timeout=10)  # noqa: E731
        waitFor(lambda: _listening(devicePort), 10, "the forward added by ~C")
        assert roundTrip(connect) == b"echo:ping"
        session.send("\r~C")
        session.expect("ssh>")
        session.sendline(f"-KR {LOOPBACK}:{devicePort}")
        waitFor(lambda: not _listening(devicePort), 10, "the forward cancelled by ~C -KR")
        session.send("\r~#")
        session.expect("The following connections are open:")
        session.send("\r~.")
        session.expect(pexpect.EOF)
    finally:
        session.close(force=True)
    assert session.exitstatus == 255


def test_local_forward_to_a_unix_socket_on_the_device(alice: Operator, tmp_path: Path) -> None:
    """ssh -L PORT:/path/to/socket: bytes reach a UNIX socket service on the device and back."""
    path = tmp_path / "service.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = reservedPort()
    ssh = Background(
        alice.argv(
            "dev_kiln7",
            options=["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{LOOPBACK}:{local}:{path}"],
        )
    )
    try:
        waitFor(lambda: _listening(local), 20, "the local end of the forward")
        connect = lambda: socket.create_connection((LOOPBACK, local), timeout=10)  # noqa: E731
        assert roundTrip(connect) == b"echo:ping"
    finally:
        ssh.close()
        server.shutdown()
        server.server_close()


def test_remote_forward_from_a_unix_socket_on_the_device(
    alice: Operator, echoServer: int, tmp_path: Path
) -> None:
    """
    ssh -R /path/on/device.sock:HOST:PORT: the device gets a socket only its owner may use
    (mode 0600, as sshd makes it) whose connections reach the operator's service; it goes
    when the operator leaves.
    """
    path = tmp_path / "from-device.sock"
    ssh = Background(
        alice.argv(
            "dev_kiln7",
            options=[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                f"{path}:{LOOPBACK}:{echoServer}",
            ],
        )
    )
    try:
        waitFor(path.exists, 20, "the socket on the device")
        assert path.stat().st_mode & 0o777 == 0o600

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            return s

        assert roundTrip(connect) == b"echo:ping"
    finally:
        ssh.close()
    waitFor(lambda: not path.exists(), 10, "the socket to go with the operator")


def test_scp_3_between_two_devices(devices: Fleet, alice: Operator) -> None:
    """scp -3 copies a file from one device to another through the operator's machine."""
    payload = hashlib.sha256(b"scp-3").digest() * 40_000  # 1.25 MB
    (home(devices, "kiln7") / "firmware.bin").write_bytes(payload)
    result = run(
        [
            "scp",
            "-F",
            str(alice.configPath),
            "-3",
            "dev_kiln7@groundcontrol:firmware.bin",
            "dev_kiln8@groundcontrol:firmware.bin",
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (home(devices, "kiln8") / "firmware.bin").read_bytes() == payload


def test_sftp_resumes_with_reget_and_reput(devices: Fleet, alice: Operator, tmp_path: Path) -> None:
    """sftp reget and reput carry on from where a partial copy stopped, byte exact."""
    payload = hashlib.sha256(b"resume").digest() * 50_000  # 1.6 MB
    deviceHome = home(devices, "kiln7")
    (deviceHome / "log.bin").write_bytes(payload)
    (tmp_path / "log.bin").write_bytes(payload[:600_000])
    (tmp_path / "upload.bin").write_bytes(payload)
    (deviceHome / "upload.bin").write_bytes(payload[:700_000])
    batch = tmp_path / "batch"
    batch.write_text(f"reget log.bin {tmp_path / 'log.bin'}\nreput {tmp_path / 'upload.bin'}\n")
    result = run(
        ["sftp", "-F", str(alice.configPath), "-b", str(batch), "dev_kiln7@groundcontrol"],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log.bin").read_bytes() == payload
    assert (deviceHome / "upload.bin").read_bytes() == payload


@pytest.fixture(scope="module")
def sshdBehindDevice(
    devices: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, Path]]:
    """An sshd on the device's network (here its loopback) that accepts alice's key."""
    base = tmp_path_factory.mktemp("behind")
    with plainSshd(base, devices.operators["alice"].keyPath) as (port, hostLine):
        knownHosts = base / "known_hosts"
        knownHosts.write_text(f"[{LOOPBACK}]:{port} {hostLine}\n")
        yield port, knownHosts


def test_proxyjump_through_a_device_to_a_host_behind_it(
    alice: Operator, sshdBehindDevice: tuple[int, Path]
) -> None:
    """ssh -J dev_kiln7@gc root@HOST: a host only the device reaches, through the device."""
    port, knownHosts = sshdBehindDevice
    result = run(
        [
            "ssh",
            "-F",
            str(alice.configPath),
            "-J",
            "dev_kiln7@groundcontrol",
            "-p",
            str(port),
            "-o",
            f"UserKnownHostsFile={knownHosts}",
            "-i",
            str(alice.keyPath),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            f"root@{LOOPBACK}",
            "echo behind the device",
        ],
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "behind the device\n"), result.stderr


def test_detached_background_child_does_not_hold_the_session(alice: Operator) -> None:
    """A command that leaves a daemon with its streams elsewhere returns at once, as with sshd."""
    result = alice.ssh(
        "dev_kiln7", "sleep 60 >/dev/null 2>&1 </dev/null & echo $!; echo started", timeout=30
    )
    assert result.returncode == 0, result.stderr
    pid, started = result.stdout.split()
    assert started == "started"
    alice.ssh("dev_kiln7", f"kill {pid}")


def test_reader_that_stops_ends_the_command(alice: Operator, tmp_path: Path) -> None:
    """
    ssh dev_x@gc yes | head -1 returns, as against sshd, and the device's yes is gone:
    OpenSSH's client sends eow@openssh.com when its stdout closes (only to a server that
    calls itself OpenSSH), and the agent closes the command's stdout, so yes dies of
    SIGPIPE. Before, both ran until ^C.
    """
    marker = tmp_path / "yes.pid"
    command = alice.argv("dev_kiln7", f"sh -c 'echo $$ > {marker}; exec yes'")
    result = run(["bash", "-c", f"{shlex.join(command)} | head -1"], timeout=30)
    assert (result.returncode, result.stdout) == (0, "y\n"), result.stderr
    # The session ends only after the agent reaped its child, so it is gone by now.
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)


def _bytesWritten(pid: int) -> int:
    """What process C{pid} has written so far (C{wchar} in /proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def test_reader_that_stops_stops_a_terminal_session(alice: Operator, tmp_path: Path) -> None:
    """
    ssh -tt dev_x@gc yes | head -1: once the operator's ssh takes no more output
    (eow@openssh.com), the agent no longer reads the device's pty, so yes blocks on
    the full pty instead of its output crossing the link for ssh to drop; the pty
    is not closed (it is the child's stdin too), so yes lives, as under sshd, until
    the operator leaves, which hangs it up.
    """
    marker = tmp_path / "yes.pid"
    ssh = Background(
        alice.argv("dev_kiln7", f"sh -c 'echo $$ > {marker}; exec yes'", options=["-tt"])
    )
    try:
        assert ssh.popen.stdout is not None
        assert readLine(ssh.popen.stdout, "yes on kiln7's pty") == "y\n"
        ssh.popen.stdout.close()  # as head -1 exits: ssh's next write fails, it sends eow
        pid = int(marker.read_text())
        samples = [-2, -1]  # three equal samples in a row: it writes no more

        def stalled() -> bool:
            samples.append(_bytesWritten(pid))
            return samples[-1] == samples[-2] == samples[-3]

        # Before the agent stopped reading a pty at eow, yes never stopped writing.
        waitFor(stalled, 10, "the device's yes to block on its unread pty", interval=0.2)
        os.kill(pid, 0)  # blocked, not gone
    finally:
        ssh.close()
    waitFor(lambda: not Path(f"/proc/{pid}").exists(), 20, "yes to end with the session")
