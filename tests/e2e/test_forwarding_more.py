"""
End to end, long-lived and heavy sessions (issue 5): a quiet session through a
NAT that forgets idle connections, key re-exchange on both links in the middle
of a 1 GiB transfer, and sshfs through groundcontrol.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import LOOPBACK, Agent, Fleet, Operator, run, waitFor

# -- a NAT with an idle timeout ------------------------------------------------------------

NAT_IDLE_TIMEOUT = 3.0


class IdleNat:
    """
    A TCP relay on 127.0.0.1 standing for a NAT: any connection with no bytes
    in either direction for C{idleTimeout} seconds is forgotten, and both
    ends get a reset (as a NAT that lost the mapping answers the next packet).
    One thread, one selector, for every connection through it.
    """

    def __init__(self, targetPort: int, idleTimeout: float = NAT_IDLE_TIMEOUT) -> None:
        self.targetPort = targetPort
        self.idleTimeout = idleTimeout
        self.accepted = 0
        self.expired = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(10)
        self._listener.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        # socket -> (peer socket, shared [last activity])
        peers: dict[socket.socket, tuple[socket.socket, list[float]]] = {}

        def drop(sock: socket.socket, reset: bool) -> None:
            other, _ = peers.pop(sock)
            peers.pop(other, None)
            for s in (sock, other):
                with contextlib.suppress(OSError, KeyError, ValueError):
                    selector.unregister(s)
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

        while not self._stopping.is_set():
            for key, _ in selector.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self._listener:
                    inside, _ = sock.accept()
                    outside = socket.create_connection((LOOPBACK, self.targetPort))
                    activity = [time.monotonic()]
                    peers[inside] = (outside, activity)
                    peers[outside] = (inside, activity)
                    selector.register(inside, selectors.EVENT_READ)
                    selector.register(outside, selectors.EVENT_READ)
                    self.accepted += 1
                    continue
                if sock not in peers:
                    continue
                other, activity = peers[sock]
                try:
                    data = sock.recv(65536)
                    if data:
                        other.sendall(data)
                except OSError:
                    data = b""
                if not data:
                    drop(sock, reset=False)
                    continue
                activity[0] = time.monotonic()
            now = time.monotonic()
            for sock, (_, activity) in list(peers.items()):
                if sock in peers and now - activity[0] > self.idleTimeout:
                    self.expired += 1
                    drop(sock, reset=True)
        for sock in list(peers):
            if sock in peers:
                drop(sock, reset=True)


def clientConfigThrough(fleet: Fleet, operator: Operator, port: int, path: Path) -> Path:
    """The operator's ssh_config, pointed at C{port} (a relay in front of groundcontrol)."""
    knownHosts = path.with_suffix(".known_hosts")
    knownHosts.write_text(f"[{LOOPBACK}]:{port} {fleet.gc.serverKeyLine}\n")
    lines = []
    for line in operator.configPath.read_text().splitlines():
        key = line.strip().split(" ", 1)[0]
        if key == "Port":
            line = f"  Port {port}"
        elif key == "UserKnownHostsFile":
            line = f"  UserKnownHostsFile {knownHosts}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("interval", "survives"),
    [(1, True), (6, False)],
    ids=["keepalive-1s-survives", "keepalive-6s-dies"],
)
def test_quiet_session_across_nat_idle_timeout(
    fleet: Fleet, tmp_path: Path, interval: int, survives: bool
) -> None:
    """
    Operator and agent both reach groundcontrol through a NAT that forgets a
    connection after 3 s of silence. With --keepalive-interval 1 on
    groundcontrol and the agent, 'sleep 8; echo alive' comes back and the NAT
    forgot nothing; with keepalives slower than the NAT (6 s) the same session
    is cut, which shows the test measures the keepalives.
    """
    alice = fleet.operators["alice"]
    fleet.restartServer("--keepalive-interval", str(interval))
    assert fleet.gc.port is not None
    agentNat = IdleNat(fleet.gc.port)
    operatorNat = IdleNat(fleet.gc.port)
    try:
        agent = Agent(fleet.base, "kiln7")
        fleet.agents.append(agent)
        agent.start(
            f"tcp:{LOOPBACK}:{agentNat.port}",
            str(fleet.gc.data / "ssh_host_ed25519_key.pub"),
            "--keepalive-interval",
            str(interval),
        )
        fleet.waitPending("kiln7")
        fleet.gc.cli("device", "approve", "kiln7")
        fleet.waitRoutable(alice, "kiln7")
        config = clientConfigThrough(fleet, alice, operatorNat.port, tmp_path / "ssh_config-nat")
        result = run(
            ["ssh", "-F", str(config), "dev_kiln7@groundcontrol", "sleep 8; echo alive"],
            timeout=60,
        )
        assert operatorNat.accepted == 1
        assert agentNat.accepted >= 1
        if survives:
            assert result.returncode == 0, result.stderr
            assert result.stdout == "alive\n"
            assert (operatorNat.expired, agentNat.expired) == (0, 0)
            assert agentNat.accepted == 1  # the agent's link was never re-made
        else:
            assert result.returncode == 255
            assert "alive" not in result.stdout
            assert operatorNat.expired + agentNat.expired >= 1
    finally:
        operatorNat.close()
        agentNat.close()


# -- rekey in the middle of 1 GiB ------------------------------------------------------------

GiB = 1 << 30

#: 1 GiB of a reproducible pseudo-random stream (so a lost or repeated block shows).
STREAM = (
    "openssl enc -aes-128-ctr -nosalt -pass pass:e2e -pbkdf2 < /dev/zero 2>/dev/null "
    f"| head -c {GiB}"
)

AGENT_REKEYED = "session keys renewed"


@pytest.fixture(scope="module")
def streamDigest() -> str:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required for the rekey test's data stream")
    digest = hashlib.sha256()
    with subprocess.Popen(STREAM, shell=True, stdout=subprocess.PIPE) as source:
        assert source.stdout is not None
        while chunk := source.stdout.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_rekey_on_both_links_mid_transfer(fleet: Fleet, streamDigest: str) -> None:
    """
    1 GiB up and 1 GiB down through groundcontrol while both links renew
    their keys mid-transfer. Operator link: up, the operator's ssh starts
    them (RekeyLimit=64M); down, groundcontrol does (--rekey-limit 300M,
    ssh left at its default). Agent link: the agent starts them
    (--rekey-limit 256M), as its log shows, during each transfer. The
    checksums match and no link was re-made.
    """
    alice = fleet.operators["alice"]
    fleet.restartServer("--rekey-limit", "300M")
    agent = fleet.addAgent("kiln7", extraArgs=["--rekey-limit", "256M"])
    fleet.waitRoutable(alice, "kiln7")
    assert agent.process is not None and fleet.gc.process is not None

    def agentRenewals() -> int:
        return agent.process.output().count(AGENT_REKEYED)  # type: ignore[union-attr]

    def serverStarted() -> int:
        # By its byte limit: not the renewal to AES-GCM after login (cipherchoice).
        log = fleet.gc.process.output()  # type: ignore[union-attr]
        return log.count("renewing the session keys: bytes limit reached")

    def ssh(*options: str) -> str:
        return shlex.join(alice.argv("dev_kiln7", options=["-v", *options]))

    before = agentRenewals()
    # The exit status is ssh's (the stream's source dies of SIGPIPE at the end, as it should).
    up = run(["bash", "-c", f"{STREAM} | {ssh('-o', 'RekeyLimit=64M')} sha256sum"], timeout=600)
    assert up.returncode == 0, up.stderr[-2000:]
    assert up.stdout.split()[0] == streamDigest
    assert up.stderr.count("SSH2_MSG_NEWKEYS received") >= 1 + 8  # 1 GiB / 64M, and more
    assert agentRenewals() - before >= 3  # 1 GiB / 256M

    before, serverBefore = agentRenewals(), serverStarted()
    down = run(
        ["bash", "-c", f"{ssh()} {shlex.quote(STREAM)} | sha256sum; exit ${{PIPESTATUS[0]}}"],
        timeout=600,
    )
    assert down.returncode == 0, down.stderr[-2000:]
    assert down.stdout.split()[0] == streamDigest
    assert down.stderr.count("SSH2_MSG_NEWKEYS received") >= 1 + 3  # 1 GiB / 300M
    assert serverStarted() - serverBefore >= 3
    assert agentRenewals() - before >= 3

    log = agent.process.output()
    assert log.count("link up over") == 1
    assert "renewing the session keys: bytes limit reached" in log  # the agent started them


# -- sshfs -----------------------------------------------------------------------------------

_FUSE_REFUSALS = ("fuse: device not found", "fusermount", "/dev/fuse", "Operation not permitted")


@pytest.fixture
def sshfsMount(kiln7: Fleet, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The device directory DIR mounted with sshfs through groundcontrol: yields (DIR, MNT)."""
    for program in ("sshfs", "fusermount"):
        if shutil.which(program) is None:
            pytest.fail(f"missing {program}: apt-get install sshfs (Makefile)")
    remote = kiln7.base / "sshfs-remote"
    remote.mkdir()
    mount = tmp_path / "mnt"
    mount.mkdir()
    sshfs = subprocess.Popen(
        [
            "sshfs",
            "-f",
            "-o",
            f"ssh_command=ssh -F {kiln7.operators['alice'].configPath}",
            f"dev_kiln7@groundcontrol:{remote}",
            str(mount),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waitFor(lambda: os.path.ismount(mount) or sshfs.poll() is not None, 30, "sshfs to mount")
        if not os.path.ismount(mount):
            error = (sshfs.communicate(timeout=30)[1] or "").strip()
            if any(refusal in error for refusal in _FUSE_REFUSALS):
                pytest.skip(f"FUSE is refused in this sandbox: {error}")
            pytest.fail(f"sshfs exited {sshfs.returncode}: {error}")
        yield remote, mount
    finally:
        if os.path.ismount(mount):
            subprocess.run(["fusermount", "-u", str(mount)], capture_output=True, timeout=30)
        try:
            sshfs.wait(10)
        except subprocess.TimeoutExpired:
            sshfs.kill()
            sshfs.wait()


def test_sshfs_read_write_unmount(sshfsMount: tuple[Path, Path]) -> None:
    """sshfs through groundcontrol: files read and written through the mount match; it unmounts."""
    remote, mount = sshfsMount
    onDevice = os.urandom(1_500_000)
    (remote / "from-device.bin").write_bytes(onDevice)
    assert hashlib.sha256((mount / "from-device.bin").read_bytes()).digest() == (
        hashlib.sha256(onDevice).digest()
    )
    fromOperator = os.urandom(2_500_000)
    (mount / "sub").mkdir()
    (mount / "sub" / "from-operator.bin").write_bytes(fromOperator)
    os.rename(mount / "sub" / "from-operator.bin", mount / "sub" / "renamed.bin")
    assert sorted(p.name for p in mount.iterdir()) == ["from-device.bin", "sub"]
    assert (remote / "sub" / "renamed.bin").read_bytes() == fromOperator
    (mount / "from-device.bin").unlink()
    assert not (remote / "from-device.bin").exists()
    unmounted = subprocess.run(["fusermount", "-u", str(mount)], capture_output=True, text=True)
    assert unmounted.returncode == 0, unmounted.stderr
    assert not os.path.ismount(mount)
