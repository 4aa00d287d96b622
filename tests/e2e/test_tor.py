"""
End to end over Tor: a private Tor network on loopback (L{tests.e2e.tornet}), groundcontrol
publishing its onion service through tor's control port, the agent dialling the C{.onion}
address through tor's SOCKS port, and the real OpenSSH client reaching the device.

Tor is slow to start by design (the first consensus comes after a vote), so every wait
here is long but bounded, and the agent's own reconnect-with-backoff does the retrying.
The network is started once for the run (conftest's C{torNetwork}, C{tornet}), shared
with L{tests.e2e.test_transports_walk}.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from typing import Any, cast

import pytest

from accesstunnel.transports.tor import UPLOAD_WAIT
from tests.e2e.harness import Agent, Fleet, HarnessError, closeServer, waitFor
from tests.e2e.tornet import TorNetwork

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("tor") is None or shutil.which("tor-gencert") is None,
        reason="tor and tor-gencert are required (apt-get install tor)",
    ),
]

#: Public port of the onion service.
ONION_PORT = 2222

#: From a bootstrapped network to a published onion service, and from there to a link.
PUBLISH_TIMEOUT = 120.0
LINK_TIMEOUT = 150.0


def onionListener(fleet: Fleet, published: bool = True) -> dict[str, Any] | None:
    """
    The tor:// entry of DATA/run/listening.json once groundcontrol has written it; with
    C{published}, only once its onion service is published (C{"ready": true}).
    """
    try:
        data = json.loads((fleet.gc.data / "run" / "listening.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    entry = next((e for e in data["listening"] if e["spec"].startswith("tor://")), None)
    if entry is None or (published and not entry.get("ready", True)):
        return None
    return entry


def restartWithOnionListener(fleet: Fleet, network: TorNetwork) -> None:
    """Restart groundcontrol with a tor:// listener published through C{network}'s tor."""
    fleet.gc.stop()
    fleet.startServer("--listen", f"tor://:{ONION_PORT}", "--tor-control", network.controlEndpoint)


def startOnionServer(fleet: Fleet, network: TorNetwork) -> dict[str, Any]:
    """
    Restart groundcontrol with a tor:// listener and return listening.json's entry for it
    once its onion service is published.
    """
    restartWithOnionListener(fleet, network)
    return waitPublished(fleet, network)


def waitingFor(fleet: Fleet, why: str) -> bool:
    """Whether listening.json says the onion service waits, for C{why}."""
    entry = onionListener(fleet, published=False)
    return entry is not None and entry.get("waiting") == why


def waitPublished(fleet: Fleet, network: TorNetwork) -> dict[str, Any]:
    """
    Wait until groundcontrol's onion service is published: listening.json's tor:// entry
    turns C{"ready": true} after the first descriptor upload (groundcontrol keeps trying
    while tor is not ready).
    """

    def published() -> dict[str, Any] | None:
        process = fleet.gc.process
        if process is None or not process.running():
            raise HarnessError(f"groundcontrol exited:\n{process and process.output()[-3000:]}")
        return onionListener(fleet)

    try:
        return cast(dict[str, Any], waitFor(published, PUBLISH_TIMEOUT, "the onion service"))
    except HarnessError as e:
        output = fleet.gc.process and fleet.gc.process.output()[-3000:]
        raise HarnessError(f"{e}\n{output}\n{network.logs()}") from None


def diagnosis(fleet: Fleet, network: TorNetwork, agent: Agent) -> str:
    """The agent's, groundcontrol's and tor's recent logs, for a failure."""
    server = fleet.gc.process.output()[-3000:] if fleet.gc.process else ""
    client = agent.process.output()[-3000:] if agent.process else ""
    return f"--- agent\n{client}\n--- groundcontrol\n{server}\n{network.logs()}"


def linkOverTor(fleet: Fleet, network: TorNetwork, onion: str) -> Agent:
    """
    Start agent kiln7 given only C{tor://ONION:PORT} and C{network}'s SOCKS port, wait until
    it is pending, approve it and wait until alice's ssh reaches it.
    """
    agent = Agent(fleet.base, "kiln7")
    agent.start(
        f"tor://{onion}:{ONION_PORT}",
        str(fleet.gc.data / "ssh_host_ed25519_key.pub"),
        "--tor-socks",
        network.socksEndpoint,
    )
    fleet.agents.append(agent)
    process = agent.process
    assert process is not None

    def pending() -> bool:
        assert process.running(), process.output()
        return any(
            d.get("name") == "kiln7" and "pending" in d.get("state", "") for d in fleet.gc.devices()
        )

    try:
        waitFor(pending, LINK_TIMEOUT, "the agent to link over tor", interval=0.5)
    except HarnessError as e:
        raise HarnessError(f"{e}\n{diagnosis(fleet, network, agent)}") from None
    fleet.gc.cli("device", "approve", "kiln7")
    try:
        fleet.waitRoutable(fleet.operators["alice"], "kiln7", timeout=LINK_TIMEOUT)
    except HarnessError as e:
        raise HarnessError(f"{e}\n{diagnosis(fleet, network, agent)}") from None
    return agent


def echoOverTor(fleet: Fleet, agent: Agent) -> None:
    """alice's real ssh runs a command on the device; its link is a tor link."""
    result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "over-tor", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "over-tor"
    assert agent.process is not None and "link up over tor" in agent.process.output()
    (row,) = [r for r in ctlList(fleet) if r["name"] == "kiln7"]
    assert row["online"] is True and row["transport"] == "tor"


def ctlList(fleet: Fleet) -> list[dict[str, Any]]:
    result = fleet.operators["alice"].ssh("ctl", "ls", "--json", timeout=30)
    return json.loads(result.stdout) if result.returncode == 0 else []


def test_publishesWhenTorComes(fleet: Fleet, torNetwork: TorNetwork) -> None:
    """
    groundcontrol started before tor (a host that boots it first, or tor broken): it
    serves its other listener at once (an operator's ssh reaches ctl), and says in
    listening.json and one warning line that the onion service is not published yet;
    retrying adds no lines. tor starts (and is restarted before its first descriptor
    upload: listening.json says so each time): the service is published with no restart
    (listening.json turns ready), an agent links over it and an operator's ssh reaches
    the device. (tor restarting once the service is published:
    L{tests.e2e.test_transports_walk.test_onionServiceOutlivesTorRestart}.)
    """
    torNetwork.stopClient()  # groundcontrol's tor is not running (whatever ran before)
    torNetwork.startRelays()  # the Tor network is: it votes while groundcontrol waits
    restartWithOnionListener(fleet, torNetwork)
    control = torNetwork.controlEndpoint
    entry = waitFor(lambda: onionListener(fleet, published=False), 30, "listening.json")
    assert entry["ready"] is False and entry["host"] is None and entry["port"] == ONION_PORT
    assert f"cannot reach tor's control port {control}" in entry["waiting"]
    result = fleet.operators["alice"].ssh("ctl", "ls", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    time.sleep(3.5)  # two retries (after 1 and 2 s), both refused
    process = fleet.gc.process
    assert process is not None and process.running(), process and process.output()
    output = process.output()
    assert output.count("not published yet") == 1, output
    assert "cannot publish the onion service yet" not in output, output
    assert "listening on 127.0.0.1:" in output and "not reachable there yet" in output, output

    # tor starts, and is restarted before its first descriptor upload (while it
    # bootstraps): groundcontrol saw it answer, and must not wait for that upload for ever.
    torNetwork.startClient()
    waitFor(lambda: waitingFor(fleet, UPLOAD_WAIT), 60, "groundcontrol to wait for the upload")
    torNetwork.stopClient()
    lostEarly = f"lost tor's control port {control} before the onion service was published"
    waitFor(lambda: waitingFor(fleet, lostEarly), 30, "groundcontrol to see tor go")
    torNetwork.start()
    entry = waitPublished(fleet, torNetwork)
    onion = entry["host"]
    assert onion.endswith(".onion") and entry["port"] == ONION_PORT
    assert process.running() and f"onion service {onion}:{ONION_PORT} published" in (
        process.output()
    )
    agent = linkOverTor(fleet, torNetwork, onion)
    echoOverTor(fleet, agent)


def test_agentLinksOverTor(fleet: Fleet, tornet: TorNetwork) -> None:
    """
    groundcontrol started with tor running publishes a v3 onion service (its .onion
    address in listening.json); an agent given only C{tor://ONION:PORT} links through
    tor's SOCKS port, is approved, and the operator's real ssh reaches C{dev_kiln7}
    through groundcontrol; the link is reported as a tor link.
    """
    entry = startOnionServer(fleet, tornet)
    onion = entry["host"]
    assert onion.endswith(".onion") and len(onion) == len("x" * 56 + ".onion")
    assert entry["port"] == ONION_PORT
    assert (fleet.gc.data / "onion_key").exists()
    agent = linkOverTor(fleet, tornet, onion)
    echoOverTor(fleet, agent)


class SilentPort:
    """
    A loopback port that takes every connection and never says a word (a hung tor, or a
    wrong --tor-control port): it records each connection and when the other side hung up.

    L{close} shuts each socket down, joins the threads using it and only then closes it:
    groundcontrol keeps retrying the port until the fleet stops, after the test's
    C{close}, so the accepting thread is in C{accept} then, and a socket closed under it
    frees its descriptor number for the next socket opened (the next test's), which that
    thread's call could land on (as 2e497e3's webhook receiver did); a socket only closed
    also kept listening, its thread blocked in C{accept} for the rest of the run.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.hungUp = 0
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._holders: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # shut down: the test is over
                return
            holder = threading.Thread(target=self._hold, args=(connection,), daemon=True)
            with self._lock:
                self.accepted += 1
                self._connections.append(connection)
                self._holders.append(holder)
            holder.start()

    def _hold(self, connection: socket.socket) -> None:
        while connection.recv(4096):  # what txtorcon asks goes unanswered
            pass
        with self._lock:
            self.hungUp += 1

    def counts(self) -> tuple[int, int]:
        """Connections accepted and hung up so far, read together."""
        with self._lock:
            return self.accepted, self.hungUp

    def close(self) -> None:
        closeServer(self.listener, self._acceptor, self._connections, self._holders)


def test_silentControlPort(fleet: Fleet) -> None:
    """
    --tor-control names a port that takes the connection and never answers: groundcontrol
    says so within 5 s (listening.json and one warning), hangs each attempt up and tries
    again with the usual delays. It used to wait on the first connection for ever, with no
    line after the first and no retry. (No Tor network needed.)
    """
    silent = SilentPort()
    try:
        fleet.gc.stop()
        control = f"tcp:127.0.0.1:{silent.port}"
        fleet.startServer("--listen", f"tor://:{ONION_PORT}", "--tor-control", control)
        why = (
            f"tor's control port {control} took the connection but did not answer in 5 s "
            "(is tor hung, or is something other than tor listening there?)"
        )
        entry = waitFor(lambda: onionListener(fleet, published=False), 30, "listening.json")
        assert entry["ready"] is False and entry["waiting"] == why, entry

        def twoHungUp() -> bool:
            accepted, hungUp = silent.counts()
            return hungUp >= 2 and accepted >= 3

        waitFor(twoHungUp, 30, "two attempts hung up")
        process = fleet.gc.process
        assert process is not None and process.running(), process and process.output()
        output = process.output()
        assert output.count(f"not published yet: {why}") == 1, output
        assert "cannot publish the onion service yet" not in output, output  # same cause
        accepted, hungUp = silent.counts()
        assert accepted - hungUp <= 1  # only the attempt in progress is open
    finally:
        silent.close()
