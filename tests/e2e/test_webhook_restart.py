"""
End to end: an audit event written while groundcontrol is stopped (here the admin CLI's
approval) is POSTed to the webhook by its next start, once, and the events the stop had
sent are not sent again: a SIGTERM leaves the audit id it read up to in DATA/run/feed.json
(groundcontrol.feedhandover). All on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.harness import Fleet, WebhookReceiver, waitFor


def _about(bodies: list[dict[str, Any]], device: str) -> list[str]:
    return [b["event"] for b in bodies if b["device"] == device]


def test_approval_made_while_stopped_is_posted_by_the_next_start(fleet: Fleet) -> None:
    """
    kiln9's request is POSTed; groundcontrol stops (SIGTERM); the CLI approves kiln9; the
    next start POSTs the approval, and not the request again. Before feed.json the start
    began at the newest row, and the approval was never POSTed.
    """
    receiver = WebhookReceiver()
    receiver.start()
    try:
        fleet.gc.stop()
        fleet.startServer("--webhook", receiver.url)
        fleet.addAgent("kiln9", approve=False, extraArgs=("--serial", "SN-9"))
        waitFor(lambda: "device.pending" in _about(receiver.bodies(), "kiln9"), 30, "the request")
        fleet.gc.stop()
        assert (fleet.gc.data / "run" / "feed.json").exists()
        fleet.gc.cli("device", "approve", "kiln9")
        fleet.startServer("--webhook", receiver.url)
        waitFor(lambda: "device.approved" in _about(receiver.bodies(), "kiln9"), 30, "the approval")
        fleet.gc.stop()  # what it would POST of the approval, it has POSTed by now
        events = _about(receiver.bodies(), "kiln9")
    finally:
        receiver.close()
    assert events.count("device.pending") == 1, events
    assert events.count("device.approved") == 1, events
