"""
End to end, two groundcontrol nodes sharing a PostgreSQL store, both with the same --webhook:
each fleet event is POSTed once, by the node holding the notifier's turn, and once that node
stops the other POSTs what comes next (groundcontrol.fleetturn). Skipped, saying what to
install, where the PostgreSQL server binaries are missing. All on 127.0.0.1.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from groundcontrol.store.pgtesting import ThrowawayPostgreSQL
from tests.e2e.harness import LOOPBACK, Agent, Fleet, WebhookReceiver, waitFor
from tests.e2e.test_device_wait_nodes import StoreNode

HOLDS_THE_TURN = "now notifies the fleet's events"


def test_each_event_posted_once_by_one_node(
    tmp_path: Path, postgresql: ThrowawayPostgreSQL
) -> None:
    """
    kiln7's agent links to node B and is approved by the CLI: its request, approval and
    online events are POSTed once each (every node POSTed each). The node holding the turn
    stops; the CLI revokes kiln7: the other node POSTs the revocation, once. Every POST's
    audit id is different.
    """
    url = postgresql.newDatabase()
    fleet = Fleet(tmp_path)
    nodeA = StoreNode(tmp_path, url, "gc")
    nodeA.init()
    shutil.copytree(nodeA.data, tmp_path / "gc-b")  # the same host key and CA
    nodeB = StoreNode(tmp_path, url, "gc-b")
    fleet.gc = nodeA
    receiver = WebhookReceiver()
    receiver.start()
    try:
        fleet.startServer("--webhook", receiver.url)
        nodeB.start("--webhook", receiver.url)
        agent = Agent(tmp_path, "kiln7")
        fleet.agents.append(agent)
        agent.start(
            f"tcp:{LOOPBACK}:{nodeB.port}",
            str(nodeB.data / "ssh_host_ed25519_key.pub"),
            "--serial",
            "SN-7",
        )
        fleet.waitPending("kiln7")
        nodeA.cli("device", "approve", "kiln7")

        def events() -> list[str]:
            return [b["event"] for b in receiver.bodies() if b["device"] == "kiln7"]

        waitFor(lambda: "device.online" in events(), 30, "kiln7's online event POSTed")
        nodes = {"A": nodeA, "B": nodeB}
        holders = [
            name
            for name, node in nodes.items()
            if node.process is not None and HOLDS_THE_TURN in node.process.output()
        ]
        first = holders[0] if holders else "A"  # checked below, after what was POSTed
        holder, other = nodes[first], nodes["B" if first == "A" else "A"]
        holder.stop()
        other.cli("device", "revoke", "kiln7")
        waitFor(lambda: "device.revoked" in events(), 30, "the revocation POSTed")
        other.stop()  # its stop POSTs what it has read: a second POST of anything would be in
        posted = events()
        ids = [b["id"] for b in receiver.bodies()]
        assert other.process is not None
        otherTookTheTurn = HOLDS_THE_TURN in other.process.output()
    finally:
        agent.stop()
        nodeA.stop()
        nodeB.stop()
        receiver.close()
    for event in ("device.pending", "device.approved", "device.online", "device.revoked"):
        assert posted.count(event) == 1, posted
    assert not [i for i, n in Counter(ids).items() if n > 1], ids
    assert len(holders) == 1, holders
    assert otherTookTheTurn
