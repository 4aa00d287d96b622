"""
Dead links end to end: the agent runs in a network namespace of its own, joined to
groundcontrol by veth pairs (L{tests.e2e.netns}), and a link is blackholed by setting the
namespace's veth end down, so packets vanish both ways with no reset and no ICMP. Only the
SSH keepalives can notice that.

The bounds checked are the ones docs/transports.md documents, with keepalives at 1 s x 3:

- each end declares the link dead within C{interval * count} of the last packet it got;
- once a path works again the agent is back within the per-attempt timeout plus the cap of
  its reconnect backoff (plus one handshake);
- with a second address on a path that still works, the agent is back on it within the
  dead-link deadline plus one backoff step and one handshake.

These are correctness bounds with slack for a loaded machine, not performance figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Agent, Fleet, Process, _uniqueLog, waitFor
from tests.e2e.netns import Namespace, NamespaceUnavailableError, VethLink

pytestmark = pytest.mark.slow

KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 3
KEEPALIVE = (
    "--keepalive-interval",
    str(KEEPALIVE_INTERVAL),
    "--keepalive-count",
    str(KEEPALIVE_COUNT),
)
#: Silence after which either end declares the link dead.
DEAD_LINK_DEADLINE = KEEPALIVE_INTERVAL * KEEPALIVE_COUNT
#: agent/failover.py DEFAULT_ATTEMPT_TIMEOUT and agent/link.py backoffPolicy's maxDelay.
ATTEMPT_TIMEOUT = 15.0
BACKOFF_CAP = 30.0
#: Room for a loaded machine: process scheduling, one SSH handshake, polling through ctl.
SLACK = 10.0


class NamespacedAgent(Agent):
    """A tunnel-agent run inside a network namespace (same arguments as the harness's)."""

    def __init__(self, base: Path, name: str, namespace: Namespace) -> None:
        super().__init__(base, name)
        self.namespace = namespace

    def start(self, server: str, serverKey: str, *extra: str) -> None:
        argv = self.argv(server, serverKey, *extra)
        self.process = Process(
            self.namespace.argv(argv), _uniqueLog(self.base, f"agent-{self.name}"), self.base
        )


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    """A network namespace of our own; deleted (with its veth pairs) even on failure."""
    ns = Namespace()
    try:
        ns.create()
    except NamespaceUnavailableError as e:
        pytest.skip(f"needs network namespaces: {e}")
    try:
        yield ns
    finally:
        ns.destroy()


def listeningPorts(fleet: Fleet) -> dict[str, int]:
    """Bound port of each listener by its spec, from DATA/run/listening.json."""
    data = json.loads((fleet.gc.data / "run" / "listening.json").read_text())
    return {e["spec"]: e["port"] for e in data["listening"]}


def devices(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """C{ctl ls} as alice sees it, by device name."""
    result = fleet.operators["alice"].ssh("ctl", "ls", "--json", timeout=20)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def startAgent(
    fleet: Fleet, namespace: Namespace, servers: list[str], *extra: str
) -> NamespacedAgent:
    agent = NamespacedAgent(fleet.base, "kiln7", namespace)
    more: list[str] = []
    for server in servers[1:]:
        more += ["--server", server]
    agent.start(
        servers[0], str(fleet.gc.data / "ssh_host_ed25519_key.pub"), *more, *KEEPALIVE, *extra
    )
    fleet.agents.append(agent)
    namespace.beforeDestroy.append(agent.stop)
    fleet.waitPending("kiln7")
    fleet.gc.cli("device", "approve", "kiln7")
    fleet.waitRoutable(fleet.operators["alice"], "kiln7")
    return agent


def blackholeAndWatch(fleet: Fleet, agent: Agent, link: VethLink) -> None:
    """
    Blackhole C{link}; both ends must notice within the dead-link deadline: groundcontrol
    shows the device offline, the agent logs that the server stopped answering.
    """
    process = agent.process
    assert process is not None
    assert devices(fleet)["kiln7"]["online"] is True
    link.blackhole()
    start = time.monotonic()
    waitFor(
        lambda: devices(fleet)["kiln7"]["online"] is False,
        DEAD_LINK_DEADLINE + SLACK,
        "groundcontrol to drop the blackholed link",
        interval=0.2,
    )
    serverNoticed = time.monotonic() - start
    assert fleet.gc.process is not None
    assert "no answer from" in fleet.gc.process.output(), "found by its keepalive"
    waitFor(
        lambda: "groundcontrol stopped answering" in process.output(),
        max(0.0, start + DEAD_LINK_DEADLINE + SLACK - time.monotonic()) + 0.1,
        "the agent to notice the blackholed link",
        interval=0.1,
    )
    print(f"blackholed link: groundcontrol noticed after {serverNoticed:.1f} s")


def test_blackholedLinkNoticedAndBack(fleet: Fleet, namespace: Namespace) -> None:
    """
    A link blackholed between the agent and groundcontrol (veth down: no RST) is noticed
    by both ends within keepalive interval x count (the device shows offline); when the
    path comes back the device is routable again within the per-attempt timeout plus the
    backoff cap, over the same address.
    """
    link = namespace.addLink()
    fleet.gc.stop()
    fleet.startServer("--listen", f"ssh://{link.hostAddress}:0", *KEEPALIVE)
    port = listeningPorts(fleet)[f"ssh://{link.hostAddress}:0"]
    agent = startAgent(fleet, namespace, [f"ssh://{link.hostAddress}:{port}"])

    blackholeAndWatch(fleet, agent, link)
    # The agent keeps trying (each attempt fails: no route) and backs off meanwhile.
    time.sleep(2 * KEEPALIVE_INTERVAL)
    assert agent.process is not None and agent.process.running()
    assert devices(fleet)["kiln7"]["online"] is False

    link.restore()
    restored = time.monotonic()
    fleet.waitRoutable(
        fleet.operators["alice"], "kiln7", timeout=ATTEMPT_TIMEOUT + BACKOFF_CAP + SLACK
    )
    print(f"blackholed link: routable again {time.monotonic() - restored:.1f} s after restore")
    row = devices(fleet)["kiln7"]
    assert row["online"] is True and row["transport"] == "ssh"
    result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "back")
    assert result.stdout.strip() == "back"


def test_blackholedLinkFailsOverToAnotherTransport(fleet: Fleet, namespace: Namespace) -> None:
    """
    With two server addresses on two paths (ssh:// first, wss:// second), blackholing the
    first path brings the agent back over wss:// on the second (with the fleet certificate
    it fetched over the first link) within the dead-link deadline plus one reconnect, while
    the first path is still dead.
    """
    first, second = namespace.addLink(), namespace.addLink()
    certFile, keyFile = fleet.serverCertificate([second.hostAddress])
    sshSpec, wssSpec = f"ssh://{first.hostAddress}:0", f"wss://{second.hostAddress}:0/tunnel"
    fleet.gc.stop()
    fleet.startServer(
        "--listen",
        sshSpec,
        "--listen",
        wssSpec,
        "--tls-cert",
        str(certFile),
        "--tls-key",
        str(keyFile),
        *KEEPALIVE,
    )
    ports = listeningPorts(fleet)
    agent = startAgent(
        fleet,
        namespace,
        [
            f"ssh://{first.hostAddress}:{ports[sshSpec]}",
            f"wss://{second.hostAddress}:{ports[wssSpec]}/tunnel",
        ],
        "--tls-ca",
        str(fleet.gc.data / "ca" / "ca.crt"),
    )
    assert devices(fleet)["kiln7"]["transport"] == "ssh"
    # Approved over ssh://, the agent asks for its fleet certificate (needed for mTLS).
    waitFor(lambda: (agent.state / "device.crt").exists(), 30, "the device certificate")

    blackholeAndWatch(fleet, agent, first)
    lost = time.monotonic()
    waitFor(
        lambda: devices(fleet).get("kiln7", {}).get("transport") == "wss",
        DEAD_LINK_DEADLINE + ATTEMPT_TIMEOUT + SLACK,
        "the agent to come back over wss://",
        interval=0.2,
    )
    print(f"failover: back over wss {time.monotonic() - lost:.1f} s after the server noticed")
    result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "over-the-other-path")
    assert result.stdout.strip() == "over-the-other-path"
    assert agent.process is not None
    assert f"link up over wss via wss://{second.hostAddress}" in agent.process.output()
