"""
End to end over Tor: a private Tor network on loopback (L{tests.e2e.tornet}), groundcontrol
publishing its onion service through tor's control port, the agent dialling the C{.onion}
address through tor's SOCKS port, and the real OpenSSH client reaching the device.

Tor is slow to start by design (the first consensus comes after a vote), so every wait
here is long but bounded, and the agent's own reconnect-with-backoff does the retrying.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.e2e.harness import Agent, Fleet, HarnessError, waitFor
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


@pytest.fixture
def tornet(tmp_path: Path) -> Iterator[TorNetwork]:
    """A bootstrapped private Tor network; every tor is killed afterwards."""
    network = TorNetwork(tmp_path / "tor")
    try:
        network.start()
        yield network
    finally:
        network.stop()


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


def startOnionServer(fleet: Fleet, network: TorNetwork) -> dict[str, Any]:
    """
    Restart groundcontrol with a tor:// listener and wait until its onion service is
    published (listening.json's tor:// entry turns C{"ready": true} after the first
    descriptor upload; groundcontrol keeps trying while tor is not ready).
    """
    extra = ("--listen", f"tor://:{ONION_PORT}", "--tor-control", network.controlEndpoint)
    fleet.gc.stop()
    fleet.startServer(*extra)

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


def test_startsWithoutTor(fleet: Fleet) -> None:
    """
    tor's control port not answering (nothing listens there): groundcontrol starts anyway,
    serves its other listener (an operator's ssh reaches ctl), and says in listening.json
    and one warning line that the onion service is not published yet; retrying adds no
    lines.
    """
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        control = f"tcp:127.0.0.1:{unused.getsockname()[1]}"
    fleet.gc.stop()
    fleet.startServer("--listen", f"tor://:{ONION_PORT}", "--tor-control", control)
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


def ctlList(fleet: Fleet) -> list[dict[str, Any]]:
    result = fleet.operators["alice"].ssh("ctl", "ls", "--json", timeout=30)
    return json.loads(result.stdout) if result.returncode == 0 else []


def test_agentLinksOverTor(fleet: Fleet, tornet: TorNetwork) -> None:
    """
    groundcontrol publishes a v3 onion service (its .onion address in listening.json); an
    agent given only C{tor://ONION:PORT} links through tor's SOCKS port, is approved, and
    the operator's real ssh reaches C{dev_kiln7} through groundcontrol; the link is
    reported as a tor link.
    """
    entry = startOnionServer(fleet, tornet)
    onion = entry["host"]
    assert onion.endswith(".onion") and len(onion) == len("x" * 56 + ".onion")
    assert entry["port"] == ONION_PORT
    assert (fleet.gc.data / "onion_key").exists()

    agent = Agent(fleet.base, "kiln7")
    agent.start(
        f"tor://{onion}:{ONION_PORT}",
        str(fleet.gc.data / "ssh_host_ed25519_key.pub"),
        "--tor-socks",
        tornet.socksEndpoint,
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
        server = fleet.gc.process.output()[-3000:] if fleet.gc.process else ""
        raise HarnessError(
            f"{e}\n--- agent\n{process.output()[-3000:]}\n--- groundcontrol\n{server}\n"
            f"{tornet.logs()}"
        ) from None
    fleet.gc.cli("device", "approve", "kiln7")
    operator = fleet.operators["alice"]
    fleet.waitRoutable(operator, "kiln7", timeout=LINK_TIMEOUT)

    result = operator.ssh("dev_kiln7", "echo", "over-tor", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "over-tor"
    assert "link up over tor" in process.output()
    (row,) = [r for r in ctlList(fleet) if r["name"] == "kiln7"]
    assert row["online"] is True and row["transport"] == "tor"
