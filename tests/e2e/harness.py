"""
Real processes for end-to-end tests: groundcontrol and tunnel-agent under
twistd, and the real OpenSSH client, all on 127.0.0.1.

Every process is started in its own session and killed with its whole
process group at teardown, so a failing test leaves nothing behind. Ports are
never guessed: groundcontrol listens on a port reserved for it (L{tests.ports}),
so a restart can bind it again, and writes the port to its data directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import attrs

from tests.ports import reservedPort

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).parent / "twistd")
#: twistd as groundcontrol's systemd unit runs it: on accesstunnel.reactor's reactor,
#: installed before twistd starts (accesstunnel/twistd.py); the suite tests what is deployed.
TWISTD_ON_OUR_REACTOR = [sys.executable, "-m", "accesstunnel.twistd"]
TUNNEL_AGENT = str(Path(sys.executable).parent / "tunnel-agent")
LOOPBACK = "127.0.0.1"


class HarnessError(AssertionError):
    """Something the test environment needed did not happen in time."""


def waitFor(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll C{condition} until it returns something true, or fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


#: How long a child's next line (or chunk) may take before the test fails: a hang detector,
#: so that a regression fails one test with what it read instead of stalling the whole
#: suite on a read that never returns; not a timing assertion, hence generous.
READ_TIMEOUT = 30.0


def _readable(fd: int, deadline: float) -> bool:
    """Whether C{fd} has bytes (or its end) before C{deadline}."""
    poller = select.poll()  # not select.select: a descriptor number may be above 1023
    poller.register(fd, select.POLLIN)
    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(poller.poll(remaining * 1000))


def allocatedRemotePort(stderr: IO[Any] | None) -> int:
    """The port an C{ssh -R 0:...} says the server allocated (its first stderr line)."""
    assert stderr is not None
    line = readLine(stderr, "ssh -R's 'Allocated port' line")
    match = re.search(r"Allocated port (\d+) for remote forward", line)
    assert match, line
    return int(match.group(1))


def closeServer(
    listener: socket.socket,
    acceptor: threading.Thread,
    connections: Sequence[socket.socket],
    workers: Sequence[threading.Thread],
) -> None:
    """
    Close a threaded test server: shut each socket down, join the threads using it, and only
    then close it. A socket closed while another thread is about to call C{accept} or C{recv}
    on it frees its descriptor number, and that thread's call lands on whatever socket is
    opened next with the number (another test's server, whose connections it would swallow).
    C{connections} and C{workers} are read after C{acceptor} has ended, so none is missed.
    """
    listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (EINVAL on Linux)
    acceptor.join(5)
    assert not acceptor.is_alive(), "the accepting thread did not end"
    listener.close()
    connections, workers = list(connections), list(workers)
    for connection in connections:
        with contextlib.suppress(OSError):  # ENOTCONN once the peer reset it
            connection.shutdown(socket.SHUT_RDWR)  # wakes recv()
    for worker in workers:
        worker.join(5)
        assert not worker.is_alive(), "a thread serving a connection did not end"
    for connection in connections:
        connection.close()


def readLine(stream: IO[Any], what: str, timeout: float = READ_TIMEOUT) -> str:
    """
    The next line from a child's output pipe, newline included (shorter at its end, as
    C{readline} gives; a text stream's CRLF, a pty's, read as LF as it reads them), or
    fail the test if it has not come in C{timeout} seconds.

    It reads the descriptor a byte at a time, never past the line, so the stream's own
    reads and C{communicate} after it see the rest; read the stream only with this until
    then (a line already in the stream's buffer is not seen here).
    """
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while not line.endswith(b"\n"):
        if not _readable(fd, deadline):
            raise HarnessError(
                f"no line from {what} in {timeout:g} s; read so far: {bytes(line)!r}"
            )
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    text = line.decode("utf-8", "replace")
    return text.replace("\r\n", "\n") if isinstance(stream, io.TextIOBase) else text


def readChunk(stream: IO[Any], what: str, size: int, timeout: float = READ_TIMEOUT) -> bytes:
    """
    Up to C{size} bytes from a child's output pipe (empty at its end), failing the test if
    none come in C{timeout} seconds: a bulk reader's loop, bounded while nothing moves.
    """
    fd = stream.fileno()
    if not _readable(fd, time.monotonic() + timeout):
        raise HarnessError(f"nothing more from {what} in {timeout:g} s")
    return os.read(fd, size)


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SSH_AUTH_SOCK", None)
    if extra:
        env.update(extra)
    return env


class Process:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, argv: Sequence[str], log: Path, cwd: Path) -> None:
        self.argv = list(argv)
        self.log = log
        self._logFile = log.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._logFile,
            stderr=subprocess.STDOUT,
            env=_environment(),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, number: int) -> None:
        if self.running():
            os.killpg(self.popen.pid, number)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left."""
        if self.running():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, as far as the peers can tell)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._logFile.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rssKiB(self) -> int:
        """Resident memory of the process now, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise HarnessError("no VmRSS")


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """
    C{subprocess.run} for the tests: output captured as text, a timeout, the harness's
    environment, and standard input empty unless given (C{input} or C{stdin}). Never the
    test runner's own: under C{pytest -s} that is a terminal or a pipe, which ssh reads and
    sends on, and with C{-tt} the device's pty echoes what came into the command's output.
    """
    if "input" not in kwargs:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    kwargs.setdefault("env", _environment())
    return subprocess.run(list(argv), **kwargs)


@contextlib.contextmanager
def sshAgentRunning(directory: Path, program: str = "ssh-agent") -> Iterator[dict[str, str]]:
    """
    An ssh-agent of the test's own (C{program}: another OpenSSH's, say) on
    C{directory}/agent.sock, stopped afterwards; yields the environment that reaches it
    (C{SSH_AUTH_SOCK}), for ssh-add and ssh.
    """
    sock = directory / "agent.sock"
    agent = subprocess.Popen(
        [program, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        waitFor(sock.exists, 10, "ssh-agent's socket")
        yield dict(os.environ, SSH_AUTH_SOCK=str(sock))
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


class WebhookReceiver:
    """
    groundcontrol's --webhook receiver, on loopback in a thread of its own: it keeps each POST
    (its path, content type and JSON body) and answers it C{status(body, earlier)}, C{earlier}
    being the bodies POSTed before it (200 to all by default). L{start} it; L{close} it.
    """

    def __init__(
        self, status: Callable[[dict[str, Any], list[dict[str, Any]]], int] | None = None
    ) -> None:
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self
        answer = status or (lambda body, earlier: 200)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with receiver.lock:
                    earlier = [p["body"] for p in receiver.posts]
                    receiver.posts.append(
                        {"path": self.path, "type": self.headers.get("Content-Type"), "body": body}
                    )
                self.send_response(answer(body, earlier))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def snapshot(self) -> list[dict[str, Any]]:
        """The POSTs so far: C{path}, C{type} (Content-Type) and C{body} of each."""
        with self.lock:
            return list(self.posts)

    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies POSTed so far."""
        return [p["body"] for p in self.snapshot()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class GroundControl:
    """A groundcontrol data directory and, when started, its server process."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "gc"
        self.process: Process | None = None
        self.port: int | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = run([PYTHON, "-m", "groundcontrol.cli", "--data", str(self.data), *args])
        if check and result.returncode != 0:
            raise HarnessError(f"groundcontrol {' '.join(args)} failed: {result.stderr}")
        return result

    def init(self) -> None:
        self.cli("init")

    @property
    def serverKeyLine(self) -> str:
        return (self.data / "ssh_host_ed25519_key.pub").read_text().strip()

    def start(self, *extra: str, port: int = 0, wrapper: Sequence[str] = ()) -> None:
        """
        Start twistd groundcontrol and wait until it listens; under C{wrapper} (a command
        that runs the rest, e.g. C{env LD_PRELOAD=...}) if given. On C{port}, as a restart
        does, or else on a port reserved now: not on port 0, whose port, freed by the stop
        before a restart, the next bind to port 0 on the machine may get.
        """
        port = port or reservedPort()
        listening = self.data / "run" / "listening.json"
        if listening.exists():
            listening.unlink()
        self.process = Process(
            [
                *wrapper,
                *TWISTD_ON_OUR_REACTOR,
                "-n",
                "--pidfile=",
                "-l",
                "-",
                "groundcontrol",
                "--data",
                str(self.data),
                "--listen",
                f"tcp:{port}:interface={LOOPBACK}",
                *extra,
            ],
            _uniqueLog(self.base, "groundcontrol"),
            ROOT,
        )

        def bound() -> int | None:
            if not self.process or not self.process.running():
                raise HarnessError(
                    f"groundcontrol exited:\n{self.process and self.process.output()}"
                )
            try:
                return json.loads(listening.read_text())["listening"][0]["port"]
            except (FileNotFoundError, ValueError, KeyError, IndexError):
                return None

        self.port = waitFor(bound, 30, "groundcontrol to listen")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def devices(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("device", "list", "--json").stdout)


def _uniqueLog(base: Path, stem: str) -> Path:
    """A log file name not used before in this test (restarts get their own)."""
    n = 0
    while (base / f"{stem}.{n}.log").exists():
        n += 1
    return base / f"{stem}.{n}.log"


class Agent:
    """A tunnel-agent process for one device name."""

    def __init__(self, base: Path, name: str, stateName: str | None = None) -> None:
        self.base = base
        self.name = name
        self.state = base / f"agent-{stateName or name}"
        self.home = base / f"home-{stateName or name}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.process: Process | None = None

    def argv(self, server: str, serverKey: str, *extra: str) -> list[str]:
        """The twistd command line of this agent."""
        return [
            *TWISTD_ON_OUR_REACTOR,
            "-n",
            "--pidfile=",
            "-l",
            "-",
            "tunnel-agent",
            "--state",
            str(self.state),
            "--server",
            server,
            "--name",
            self.name,
            "--server-key",
            serverKey,
            "--home",
            str(self.home),
            *extra,
        ]

    def start(self, server: str, serverKey: str, *extra: str) -> None:
        self.process = Process(
            self.argv(server, serverKey, *extra),
            _uniqueLog(self.base, f"agent-{self.name}"),
            ROOT,
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def waitPairingCode(self, timeout: float = 20) -> str:
        """The pairing code the agent shows while pending (C{tunnel-agent pair})."""

        def pairingCode() -> str | None:
            result = run([TUNNEL_AGENT, "pair", "--state", str(self.state)])
            return result.stdout.strip() if result.returncode == 0 else None

        return waitFor(pairingCode, timeout, "a pairing code", interval=0.2)


@attrs.define
class Operator:
    """An operator account with its own key and an ssh_config pinned to the server."""

    name: str
    keyPath: Path
    configPath: Path

    def argv(
        self, user: str, *args: str, tty: bool = False, options: Sequence[str] = ()
    ) -> list[str]:
        base = ["ssh", "-F", str(self.configPath), *options]
        if tty:
            base.append("-tt")
        return [*base, f"{user}@groundcontrol", *args]

    def ssh(
        self, user: str, *args: str, options: Sequence[str] = (), **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(user, *args, options=options), **kwargs)


class Fleet:
    """groundcontrol with operators and agents, torn down as one."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.gc = GroundControl(base)
        self.agents: list[Agent] = []
        self.operators: dict[str, Operator] = {}
        self.gc.init()

    def addOperator(self, name: str, admin: bool = False) -> Operator:
        key = self.base / f"{name}_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
        self.gc.cli("user", "add", name, "--key", f"{key}.pub", *(["--admin"] if admin else []))
        operator = Operator(name, key, self.base / f"ssh_config-{name}")
        self.operators[name] = operator
        self.writeClientConfig(operator)
        return operator

    def writeClientConfig(self, operator: Operator) -> None:
        """Point the operator's ssh at the server's current port, host key pinned."""
        port = self.gc.port or 1
        knownHosts = self.base / "known_hosts"
        knownHosts.write_text(f"[{LOOPBACK}]:{port} {self.gc.serverKeyLine}\n")
        operator.configPath.write_text(
            "\n".join(
                [
                    "Host groundcontrol",
                    f"  HostName {LOOPBACK}",
                    f"  Port {port}",
                    f"  IdentityFile {operator.keyPath}",
                    "  IdentitiesOnly yes",
                    f"  UserKnownHostsFile {knownHosts}",
                    "  GlobalKnownHostsFile /dev/null",
                    "  StrictHostKeyChecking yes",
                    "  BatchMode yes",
                    "  LogLevel INFO",
                    "  ControlMaster no",
                    "  ControlPath none",
                    "  ConnectTimeout 10",
                    "",
                ]
            )
        )

    def startServer(self, *extra: str) -> None:
        self.gc.start(*extra)
        for operator in self.operators.values():
            self.writeClientConfig(operator)

    def restartServer(self, *extra: str) -> None:
        """Stop groundcontrol and start it again on the same port."""
        port = self.gc.port
        self.gc.stop()
        self.gc.start(*extra, port=port or 0)

    @property
    def serverAddress(self) -> str:
        return f"tcp:{LOOPBACK}:{self.gc.port}"

    def addAgent(
        self,
        name: str,
        approve: bool = True,
        stateName: str | None = None,
        extraArgs: Sequence[str] = (),
    ) -> Agent:
        extra = tuple(extraArgs)
        agent = Agent(self.base, name, stateName)
        agent.start(self.serverAddress, str(self.gc.data / "ssh_host_ed25519_key.pub"), *extra)
        self.agents.append(agent)
        if approve:
            self.waitPending(name)
            self.gc.cli("device", "approve", name)
        return agent

    def waitPending(self, name: str) -> dict[str, Any]:
        return waitFor(
            lambda: next(
                (
                    d
                    for d in self.gc.devices()
                    if d.get("name") == name and "pending" in d.get("state", "")
                ),
                None,
            ),
            30,
            f"device {name} to show up pending",
            interval=0.1,
        )

    def waitRoutable(self, operator: Operator, name: str, timeout: float = 30) -> None:
        waitFor(
            lambda: operator.ssh(f"dev_{name}", "true", timeout=20).returncode == 0,
            timeout,
            f"device {name} to be reachable",
            interval=0.2,
        )

    def serverCertificate(self, hostnames: Sequence[str]) -> tuple[Path, Path]:
        """A TLS server certificate for C{hostnames} from the fleet CA made by init."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from groundcontrol import pki

        ca = pki.FleetCA.load(self.gc.data / "ca")
        key = ed25519.Ed25519PrivateKey.generate()
        issued = pki.issueServerCertificate(ca, list(hostnames), key, datetime.now(UTC))
        certFile, keyFile = self.base / "server.crt", self.base / "server.key"
        certFile.write_bytes(issued.pem)
        keyFile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        keyFile.chmod(0o600)
        return certFile, keyFile

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.gc.stop()
