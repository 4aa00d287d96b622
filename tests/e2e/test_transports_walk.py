"""
End to end, the transport settings a fleet operator writes that used to fail (session 17's
walk of the transports): groundcontrol on both address families at one port, and its
onion service outliving a restart of tor.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.e2e.harness import Agent, Fleet, run, waitFor
from tests.e2e.netns import Namespace
from tests.e2e.test_blackhole import NamespacedAgent, listeningPorts, namespace, startAgent
from tests.e2e.test_tor import LINK_TIMEOUT, ONION_PORT, startOnionServer
from tests.e2e.tornet import TorNetwork
from tests.test_transports_walk import ipv6Available

__all__ = ["namespace"]  # the fixture, from test_blackhole


#: Any port: the namespace is the test's own, so nothing else can hold it there.
PORT_IN_NAMESPACE = 2222


def namespaceHasIPv6Loopback(namespace: Namespace) -> bool:
    """Whether ::1 is on the namespace's loopback (IPv6 may be disabled for new ones)."""
    shown = run(["ip", "-n", namespace.name, "-6", "addr", "show", "dev", "lo"], timeout=30)
    return "inet6 ::1/128" in shown.stdout


@pytest.mark.skipif(not ipv6Available(), reason="needs IPv6 on loopback")
def test_bothFamiliesOnOnePort(fleet: Fleet, namespace: Namespace) -> None:
    """
    --listen ssh://0.0.0.0:P --listen ssh://[::]:P (as sshd_config writes it) starts; an
    agent links over each family and ssh -4 and ssh -6 both reach both devices.

    groundcontrol, the agents and the ssh clients run in a network namespace of the test's
    own (its loopback only): the wildcards are bound there, never on the host's interfaces,
    where they would listen on every address (against the tests' loopback-only rule) and
    P might be another program's on either family.
    """
    if not namespaceHasIPv6Loopback(namespace):
        pytest.skip("no ::1 in a new network namespace here (IPv6 disabled for them)")
    port = PORT_IN_NAMESPACE
    fleet.gc.stop()
    namespace.beforeDestroy.append(fleet.gc.stop)
    fleet.gc.start(
        "--listen",
        f"ssh://0.0.0.0:{port}",
        "--listen",
        f"ssh://[::]:{port}",
        wrapper=namespace.argv([]),
    )
    serverKey = str(fleet.gc.data / "ssh_host_ed25519_key.pub")
    for name, url in (("four", f"ssh://127.0.0.1:{port}"), ("six", f"ssh://[::1]:{port}")):
        agent = NamespacedAgent(fleet.base, name, namespace)
        agent.start(url, serverKey)
        fleet.agents.append(agent)
        namespace.beforeDestroy.append(agent.stop)
        fleet.waitPending(name)
        fleet.gc.cli("device", "approve", name)
    alice = fleet.operators["alice"]
    knownHosts = fleet.base / "known_hosts_both"
    knownHosts.write_text(
        f"[127.0.0.1]:{port} {fleet.gc.serverKeyLine}\n[::1]:{port} {fleet.gc.serverKeyLine}\n"
    )
    for flag, host in (("-4", "127.0.0.1"), ("-6", "::1")):
        for device in ("four", "six"):
            argv = namespace.argv(
                [
                    "ssh",
                    flag,
                    "-p",
                    str(port),
                    "-i",
                    str(alice.keyPath),
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    f"UserKnownHostsFile={knownHosts}",
                    "-o",
                    "BatchMode=yes",
                    f"dev_{device}@{host}",
                    "echo",
                    "reached",
                ]
            )

            def reached(argv: list[str] = argv) -> bool:
                return run(argv, timeout=20).stdout.strip() == "reached"

            waitFor(
                reached,
                30,
                f"ssh {flag} to dev_{device}",
                interval=0.3,
            )
    assert fleet.gc.process is not None
    output = fleet.gc.process.output()
    assert f"listening on 0.0.0.0:{port}" in output
    assert f"listening on [::]:{port}" in output


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("tor") is None or shutil.which("tor-gencert") is None,
    reason="tor and tor-gencert are required (apt-get install tor)",
)
def test_onionServiceOutlivesTorRestart(fleet: Fleet, tornet: TorNetwork) -> None:
    """
    The tor hosting groundcontrol's onion service restarts: groundcontrol says so and
    publishes the service again (same .onion) once tor is back, and an agent that dials
    only that address is routable again (before, the service stayed gone). The network is
    the run's shared one (conftest's C{tornet}); only its client tor is restarted.
    """
    onion = startOnionServer(fleet, tornet)["host"]
    onlyOnion = (
        f"tor://{onion}:{ONION_PORT}",
        str(fleet.gc.data / "ssh_host_ed25519_key.pub"),
        "--tor-socks",
        tornet.socksEndpoint,
    )
    agent = Agent(fleet.base, "kiln7")
    agent.start(*onlyOnion)
    fleet.agents.append(agent)
    waitFor(
        lambda: any(d.get("name") == "kiln7" for d in fleet.gc.devices()),
        LINK_TIMEOUT,
        "the agent to link over tor",
        interval=0.5,
    )
    fleet.gc.cli("device", "approve", "kiln7")
    alice = fleet.operators["alice"]
    fleet.waitRoutable(alice, "kiln7", timeout=LINK_TIMEOUT)

    # The agent waits while tor restarts: the private network's one tor is both the
    # agent's client and the service's host, and a client that fetches the service's
    # old descriptor in the gap stalls each connect until its timeout (seen in the
    # walk; a tor matter, not what this test is about).
    agent.stop()
    tornet.stopClient()
    tornet.start()  # the client tor again, bootstrapped with every relay's microdescriptor
    server = fleet.gc.process
    assert server is not None
    published = f"onion service {onion}:{ONION_PORT} published"
    waitFor(lambda: server.output().count(published) >= 2, 60, "the service published again")
    assert "lost tor's control port" in server.output()
    back = time.monotonic()
    agent.start(*onlyOnion)
    fleet.waitRoutable(alice, "kiln7", timeout=LINK_TIMEOUT)
    print(f"routable again {time.monotonic() - back:.1f} s after the service was back")


@pytest.mark.slow
def test_silentFirstAddress(fleet: Fleet, namespace: Namespace) -> None:
    """
    An agent (in a network namespace) whose first server address is silent (the server's
    answers go to a blackhole route: no RST, no ICMP) links over the second after the 15 s
    attempt timeout, says so in plain words, and after a restart goes to the remembered
    second address at once.
    """
    first, second = namespace.addLink(), namespace.addLink()
    specs = [f"ssh://{first.hostAddress}:0", f"ssh://{second.hostAddress}:0"]
    fleet.gc.stop()
    fleet.startServer("--listen", specs[0], "--listen", specs[1])
    ports = listeningPorts(fleet)
    servers = [
        f"ssh://{first.hostAddress}:{ports[specs[0]]}",
        f"ssh://{second.hostAddress}:{ports[specs[1]]}",
    ]
    blackhole = ["blackhole", f"{first.namespaceAddress}/32"]
    run(["ip", "route", "add", *blackhole], check=True)
    try:
        started = time.monotonic()
        agent = startAgent(fleet, namespace, servers)
        took = time.monotonic() - started
        assert agent.process is not None
        output = agent.process.output()
        assert f"could not reach {servers[0]}: no connection in 15 s" in output
        assert took >= 15
        agent.stop()
        fleet.agents.remove(agent)
        again = NamespacedAgent(fleet.base, "kiln7", namespace)
        again.start(
            servers[0], str(fleet.gc.data / "ssh_host_ed25519_key.pub"), "--server", servers[1]
        )
        fleet.agents.append(again)
        namespace.beforeDestroy.append(again.stop)
        process = again.process
        assert process is not None
        waitFor(lambda: "link up" in process.output(), 10, "the agent on the remembered address")
        assert f"trying {servers[1]} first" in process.output()
        assert "could not reach" not in process.output()
    finally:
        run(["ip", "route", "del", *blackhole])
