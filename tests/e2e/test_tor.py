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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def onionListener(fleet: Fleet) -> dict[str, Any] | None:
    """The tor:// entry of DATA/run/listening.json, once groundcontrol has written it."""
    try:
        data = json.loads((fleet.gc.data / "run" / "listening.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return next((e for e in data["listening"] if e["spec"].startswith("tor://")), None)


def startOnionServer(fleet: Fleet, network: TorNetwork) -> dict[str, Any]:
    """
    Restart groundcontrol with a tor:// listener and wait until its onion service is
    published (groundcontrol writes listening.json only after the first descriptor upload).
    A groundcontrol that gave up because tor was not ready yet is started again.
    """
    extra = ("--listen", f"tor://:{ONION_PORT}", "--tor-control", network.controlEndpoint)
    deadline = time.monotonic() + PUBLISH_TIMEOUT
    while True:
        fleet.gc.stop()
        try:
            fleet.startServer(*extra)
        except HarnessError:
            # Not published within the harness's 30 s, or exited: keep waiting while it
            # runs, start it again if it gave up.
            process = fleet.gc.process
            while process is not None and process.running() and time.monotonic() < deadline:
                if onionListener(fleet) is not None:
                    break
                time.sleep(0.2)
        entry = onionListener(fleet)
        if entry is not None:
            return entry
        if time.monotonic() > deadline:
            raise HarnessError(
                f"no onion service in {PUBLISH_TIMEOUT:g} s:\n"
                f"{fleet.gc.process and fleet.gc.process.output()[-3000:]}\n{network.logs()}"
            )


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
