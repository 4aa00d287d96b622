"""
A private Tor network on 127.0.0.1 for end-to-end tests (../shared/TOR-TESTNET.md).

Six tor processes: one directory authority, four relays, and one tor that is both the
client (SOCKS port, for the agent) and the host of onion services (control port, for
groundcontrol). Fewer relays cannot build rendezvous circuits; this layout publishes and
reaches a v3 onion service in about 12-18 s on an idle machine.

Everything lives in one temporary directory; every tor runs in the foreground in its own
session (L{tests.e2e.harness.Process}) and L{TorNetwork.stop} kills each one by its process
group. Ports are taken at random below the kernel's ephemeral range (so they cannot collide
with the port-0 listeners of tests running next to us), each checked free by binding it and
reserved for this run against the other test processes (L{tests.ports}); a
tor that still loses its port to a race exits, and L{TorNetwork.start} then builds the whole
network again (the client tor keeps its SOCKS and control ports: they are known from the
start, so groundcontrol can be pointed at a tor that is not running yet).

The client tor can be stopped and started on its own (L{TorNetwork.stopClient},
L{TorNetwork.startClient}): the tor a server runs next to it, booted late or restarted,
while the network (the relays) stays up.

Tor's first consensus is late by design (the authority votes on a 10 s schedule): callers
wait for L{TorNetwork.waitBootstrapped} and still retry onion connections.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs

from tests.e2e.harness import LOOPBACK, HarnessError, Process, waitFor
from tests.ports import reservedPort

#: Settings every node of the test network shares.
COMMON = """\
TestingTorNetwork 1
RunAsDaemon 0
ShutdownWaitLength 0
SafeLogging 0
AssumeReachable 1
PathsNeededToBuildCircuits 0.25
TestingDirAuthVoteExit *
TestingDirAuthVoteGuard *
TestingDirAuthVoteHSDir *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
EnforceDistinctSubnets 0
ClientUseIPv6 0
"""

#: Relays and authorities: reachable on loopback, no exits (onion services need none).
RELAY = """\
Address {address}
ORPort {address}:{orport}
DirPort {address}:{dirport}
SocksPort 0
ExitRelay 0
ExitPolicy reject *:*
TestingServerDownloadInitialDelay 0
TestingServerConsensusDownloadInitialDelay 0
"""

#: The authority votes every 10 s (the first time after 5 s).
AUTHORITY = """\
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
TestingV3AuthInitialVotingInterval 5
V3AuthVotingInterval 10
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVoteDelay 2
V3AuthDistDelay 2
"""

#: The client-and-service tor.
CLIENT = """\
SocksPort {address}:{socks}
ControlPort {address}:{control}
CookieAuthentication 1
"""


class TorUnavailableError(Exception):
    """tor or tor-gencert is not installed."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TorUnavailableError(f"{name} is required (apt-get install tor)")
    return path


def freePort(taken: set[int]) -> int:
    """
    A loopback port below the ephemeral range that nobody listens on right now, reserved
    as the test harness reserves groundcontrol's (L{tests.ports.reservedPort}): a port
    only checked free could be one reserved for a groundcontrol stopped for a restart.
    """
    port = reservedPort()
    taken.add(port)
    return port


@attrs.define
class _Node:
    name: str
    directory: Path
    orport: int = 0
    dirport: int = 0
    process: Process | None = None

    @property
    def log(self) -> Path:
        return self.directory / "notice.log"

    def logText(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class TorNetwork:
    """
    A private Tor network under C{base}.

    @ivar socksPort: the client's SOCKS port (the agent's C{--tor-socks}).
    @ivar controlPort: the control port of the tor that hosts onion services
        (groundcontrol's C{--tor-control}).
    """

    def __init__(self, base: Path, relays: int = 4) -> None:
        self.base = base
        self.relayCount = relays
        self.nodes: list[_Node] = []
        self.client: _Node | None = None
        self._taken: set[int] = set()
        self.socksPort = freePort(self._taken)
        self.controlPort = freePort(self._taken)
        self._attempts = 0
        #: Where the client tor's current run starts in its log (it appends on restart).
        self._clientLogStart = 0

    @property
    def socksEndpoint(self) -> str:
        return f"tcp:{LOOPBACK}:{self.socksPort}"

    @property
    def controlEndpoint(self) -> str:
        return f"tcp:{LOOPBACK}:{self.controlPort}"

    def start(self, timeout: float = 120.0, attempts: int = 3) -> None:
        """
        Start whatever of the network is not running (all of it, the first time) and wait
        until the client tor has bootstrapped.

        A network that does not bootstrap in time (a port lost to a race, a tor that died)
        is torn down and built again, up to C{attempts} times.
        """
        last: Exception | None = None
        for _ in range(attempts):
            try:
                self.startRelays()
                self.startClient()
                self.waitBootstrapped(timeout)
                return
            except HarnessError as e:
                last = e
                self.stop()
        raise HarnessError(f"the tor test network did not come up: {last}")

    def startRelays(self) -> None:
        """
        Start the authority and the relays (building the network first if needed), not
        the client tor; return at once (L{waitBootstrapped} waits).
        """
        if not self.nodes:
            self._build(self.base / f"net{self._attempts}")
            self._attempts += 1
        for node in self.nodes:
            if node is not self.client:
                self._launch(node)

    def startClient(self) -> None:
        """Start the client-and-service tor (on its ports, known from the start)."""
        if not self.nodes:
            self.startRelays()
        client = self.client
        assert client is not None
        if client.process is None or not client.process.running():
            self._clientLogStart = len(client.logText())
            self._launch(client)

    def stopClient(self) -> None:
        """Stop the client-and-service tor, if it runs; the relays stay up."""
        if self.client is not None and self.client.process is not None:
            self.client.process.stop(timeout=5)
            self.client.process = None

    def _launch(self, node: _Node) -> None:
        if node.process is None or not node.process.running():
            node.process = Process(
                [_tool("tor"), "-f", str(node.directory / "torrc")],
                node.directory / "stdout.log",
                node.directory,
            )

    def _build(self, root: Path) -> None:
        root.mkdir(parents=True)
        taken = {self.socksPort, self.controlPort}
        authority = _Node("auth0", root / "auth0")
        relays = [_Node(f"relay{i}", root / f"relay{i}") for i in range(self.relayCount)]
        for node in [authority, *relays]:
            node.directory.mkdir(mode=0o700)
            node.orport, node.dirport = freePort(taken), freePort(taken)
        v3ident = self._authorityKeys(authority)
        fingerprint = self._fingerprint(authority)
        dirAuthority = (
            f"DirAuthority {authority.name} orport={authority.orport} no-v2 "
            f"v3ident={v3ident} {LOOPBACK}:{authority.dirport} {fingerprint}\n"
        )
        client = _Node("client", root / "client")
        client.directory.mkdir(mode=0o700)
        for node in [authority, *relays, client]:
            torrc = COMMON + dirAuthority + f"Nickname {node.name}\n"
            torrc += f"DataDirectory {node.directory}\nLog notice file {node.log}\n"
            # Onion-service steps (descriptor uploads and fetches, circuits) for failures.
            torrc += f"Log [rend]info file {node.directory / 'rend.log'}\n"
            if node is client:
                torrc += CLIENT.format(
                    address=LOOPBACK, socks=self.socksPort, control=self.controlPort
                )
            else:
                torrc += RELAY.format(address=LOOPBACK, orport=node.orport, dirport=node.dirport)
            if node is authority:
                torrc += AUTHORITY
            (node.directory / "torrc").write_text(torrc)
        self.nodes = [authority, *relays, client]
        self.client = client

    def _authorityKeys(self, node: _Node) -> str:
        """Make the authority's v3 identity and signing keys; return the v3 identity."""
        keys = node.directory / "keys"
        keys.mkdir(mode=0o700)
        subprocess.run(
            [
                _tool("tor-gencert"),
                "--create-identity-key",
                "-m",
                "12",
                "-a",
                f"{LOOPBACK}:{node.dirport}",
                "--passphrase-fd",
                "0",
                "-i",
                str(keys / "authority_identity_key"),
                "-s",
                str(keys / "authority_signing_key"),
                "-c",
                str(keys / "authority_certificate"),
            ],
            input=b"\n",
            capture_output=True,
            check=True,
            timeout=60,
        )
        certificate = (keys / "authority_certificate").read_text()
        match = re.search(r"^fingerprint ([0-9A-F]{40})$", certificate, re.MULTILINE)
        if match is None:
            raise HarnessError("tor-gencert wrote no fingerprint")
        return match.group(1)

    def _fingerprint(self, node: _Node) -> str:
        """Make the node's relay identity key; return its fingerprint."""
        subprocess.run(
            [
                _tool("tor"),
                "--list-fingerprint",
                "--DataDirectory",
                str(node.directory),
                "--ORPort",
                "1",
                "--DirAuthority",
                "dummy 127.0.0.1:1 " + "f" * 40,
                "--Log",
                "err stderr",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return (node.directory / "fingerprint").read_text().split()[1]

    def waitBootstrapped(self, timeout: float) -> None:
        """
        Wait until the client tor has bootstrapped (Bootstrapped 100%, in this run of it)
        and holds the microdescriptor of every relay of the network.

        Why the second: with C{PathsNeededToBuildCircuits 0.25} tor reports 100% while it
        still lacks some relays' microdescriptors. An onion connect made then can pick a
        rendezvous point the service side cannot build its four-hop circuit to ("Failed to
        find node for hop #3"), and tor keeps the client's stream waiting on that
        rendezvous circuit, retry after retry: the test's occasional 150 s timeouts.
        """

        def ready() -> bool:
            for node in self.nodes:
                if node.process is None or not node.process.running():
                    raise HarnessError(
                        f"tor {node.name} exited:\n{node.logText()[-2000:]}"
                        f"{node.process and node.process.output()[-2000:]}"
                    )
            assert self.client is not None
            if "Bootstrapped 100%" not in self.client.logText()[self._clientLogStart :]:
                return False
            try:
                return not self.missingMicrodescriptors()
            except OSError:  # the control port not answering yet: ask again
                return False

        started = time.monotonic()
        waitFor(ready, timeout, "the tor client to bootstrap", interval=0.2)
        self.bootstrapSeconds = time.monotonic() - started

    def missingMicrodescriptors(self) -> list[str]:
        """The relays whose microdescriptor the client tor does not have (control port)."""
        relays = [n.name for n in self.nodes if n is not self.client]
        answers = self.control(*(f"GETINFO md/name/{name}" for name in relays))
        return [name for name, answer in zip(relays, answers, strict=True) if answer != "250"]

    def control(self, *commands: str) -> list[str]:
        """Each command's final status code, from the client tor's control port."""
        assert self.client is not None
        cookie = (self.client.directory / "control_auth_cookie").read_bytes().hex()
        codes: list[str] = []
        with socket.create_connection((LOOPBACK, self.controlPort), timeout=10) as s:
            reader = s.makefile("rb")
            for command in (f"AUTHENTICATE {cookie}", *commands, "QUIT"):
                s.sendall(command.encode() + b"\r\n")
                while True:  # "250-"/"250+" continue a reply; "NNN " ends it
                    line = reader.readline()
                    if not line:
                        raise HarnessError(f"tor's control port closed after {command!r}")
                    if line[3:4] == b"+":  # a data block, ended by a lone "."
                        while reader.readline().rstrip(b"\r\n") != b".":
                            pass
                    elif line[3:4] == b" ":
                        codes.append(line[:3].decode())
                        break
        if codes[0] != "250":
            raise HarnessError(f"tor refused the control cookie: {codes[0]}")
        return codes[1:-1]

    def logs(self) -> str:
        """The tail of every node's log, and of the client's onion-service log, for a failure."""
        tails = [f"--- {n.name}\n{n.logText()[-1500:]}" for n in self.nodes]
        if self.client is not None:
            rend = self.client.directory / "rend.log"
            if rend.exists():
                tails.append(f"--- client (rend)\n{rend.read_text(errors='replace')[-4000:]}")
        return "\n".join(tails)

    def stop(self) -> None:
        """Kill every tor of the network (each by its own process group)."""
        for node in self.nodes:
            if node.process is not None:
                with contextlib.suppress(Exception):
                    node.process.stop(timeout=5)
        self.nodes = []
        self.client = None
        self._clientLogStart = 0
