"""
End to end, two groundcontrol nodes sharing a PostgreSQL store: an ssh through one node to a
device whose agent is linked to the other is answered at once (the device wait knows it is
linked elsewhere from the audit log's online event), not held for --device-wait in vain.
Skipped, saying what to install, where the PostgreSQL server binaries are missing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from groundcontrol.store.pgtesting import ThrowawayPostgreSQL
from tests.e2e.harness import LOOPBACK, Agent, Fleet, GroundControl, waitFor


class StoreNode(GroundControl):
    """A groundcontrol node on the shared store C{url}, its data directory C{base}/C{name}."""

    def __init__(self, base: Path, url: str, name: str) -> None:
        super().__init__(base)
        self.data = base / name
        self.url = url

    def cli(self, *args: str, check: bool = True) -> Any:
        return super().cli("--store", self.url, *args, check=check)

    def start(self, *extra: str, **kwargs: Any) -> None:
        super().start("--store", self.url, *extra, **kwargs)


def onlineEvents(node: GroundControl, device: str) -> list[dict[str, Any]]:
    """The shared audit log's device.online events of C{device}."""
    events = json.loads(node.cli("audit", "--limit", "1000", "--json").stdout)
    return [e for e in events if e.get("event") == "device.online" and e.get("device") == device]


def test_device_on_another_node_is_answered_at_once(
    tmp_path: Path, postgresql: ThrowawayPostgreSQL
) -> None:
    """
    kiln7's agent is linked to node B; alice's ssh to it through node A is refused at once,
    'waited 0.0 s ... its agent logged in elsewhere', where it was held for the whole
    --device-wait (15 s) and then refused as not back. Node A's log says the same.
    """
    url = postgresql.newDatabase()
    fleet = Fleet(tmp_path)  # its SQLite init made the host key and CA: kept by init --store
    nodeA = StoreNode(tmp_path, url, "gc")
    nodeA.init()
    shutil.copytree(nodeA.data, tmp_path / "gc-b")  # the same host key and CA
    nodeB = StoreNode(tmp_path, url, "gc-b")
    fleet.gc = nodeA
    try:
        alice = fleet.addOperator("alice", admin=True)
        fleet.startServer()  # node A: alice's ssh goes there
        nodeB.start()
        agent = Agent(tmp_path, "kiln7")
        fleet.agents.append(agent)
        agent.start(f"tcp:{LOOPBACK}:{nodeB.port}", str(nodeB.data / "ssh_host_ed25519_key.pub"))
        fleet.waitPending("kiln7")
        nodeA.cli("device", "approve", "kiln7")
        waitFor(lambda: onlineEvents(nodeA, "kiln7"), 30, "kiln7 online on node B", interval=0.2)
        result = alice.ssh("dev_kiln7", "true", timeout=30)
        assert result.returncode == 255, result
        assert re.search(
            r"open failed: connect failed: device 'kiln7' is offline \(last seen \S+Z, [^)]*\); "
            r"waited 0\.0 s for it to reconnect: its agent logged in elsewhere \(another "
            r"groundcontrol node routes it\) or was refused",
            result.stderr,
        ), result.stderr
        assert nodeA.process is not None
        assert re.search(
            r"alice waited 0\.0 s for device kiln7 to reconnect: it logged in elsewhere",
            nodeA.process.output(),
        )
    finally:
        nodeB.stop()
        fleet.close()
