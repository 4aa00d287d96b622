"""
End to end: the Prometheus endpoint of a real groundcontrol (--metrics on a kernel-chosen
loopback port, found in DATA/run/metrics.json) shows the session that just ran and the
connections its front door refused, and --logger groundcontrol.logging.jsonLogger makes
twistd log JSON lines.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import LOOPBACK, Fleet, Operator, run, waitFor


def scrape(fleet: Fleet) -> str:
    port = json.loads((fleet.gc.data / "run" / "metrics.json").read_text())["listening"][0]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_show_the_session_that_just_ran(kiln7: Fleet) -> None:
    """After one exec session, the scraped counters include it, its bytes and logins."""
    kiln7.restartServer("--metrics", "tcp:0:interface=127.0.0.1")
    alice = kiln7.operators["alice"]
    kiln7.waitRoutable(alice, "kiln7")
    before = scrape(kiln7)
    assert sample(before, "groundcontrol_agents_connected") == 1
    result = alice.ssh("dev_kiln7", "head -c 100000 /dev/zero | tr '\\0' x", timeout=30)
    assert result.returncode == 0 and len(result.stdout) == 100000

    def counted() -> str | None:
        text = scrape(kiln7)
        ended = sample(text, "groundcontrol_sessions_ended_total")
        return text if ended > sample(before, "groundcontrol_sessions_ended_total") else None

    after = waitFor(counted, 10, "the session to be counted")
    relayed = 'groundcontrol_relayed_bytes_total{direction="to_operator"}'
    assert sample(after, relayed) - sample(before, relayed) >= 100000
    opened = 'groundcontrol_sessions_total{type="session"}'
    assert sample(after, opened) > sample(before, opened)
    logins = 'groundcontrol_handshake_seconds_count{peer="operator"}'
    assert sample(after, logins) > sample(before, logins)
    assert sample(after, "groundcontrol_sessions_live") == 0


def test_auth_failure_counted(kiln7: Fleet) -> None:
    """A key groundcontrol does not know shows up in groundcontrol_auth_failures_total."""
    kiln7.restartServer("--metrics", "tcp:0:interface=127.0.0.1")
    key = kiln7.base / "stranger_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    stranger = Operator("stranger", key, kiln7.base / "ssh_config-stranger")
    kiln7.writeClientConfig(stranger)
    before = sample(scrape(kiln7), "groundcontrol_auth_failures_total")
    assert stranger.ssh("ctl", "whoami", timeout=30).returncode != 0
    waitFor(
        lambda: sample(scrape(kiln7), "groundcontrol_auth_failures_total") == before + 1,
        10,
        "the failure to be counted",
    )


def bannerGrab(fleet: Fleet, source: str) -> bytes:
    """Connect from C{source}, read what groundcontrol sends first, close (a banner grab)."""
    with socket.create_connection(
        (LOOPBACK, fleet.gc.port), timeout=10, source_address=(source, 0)
    ) as s:
        try:
            return s.recv(64)
        except ConnectionResetError:
            return b""


def test_refused_connections_counted(fleet: Fleet) -> None:
    """
    With an early-close allowance of 2 (and a refill every 100 s), two banner grabs from
    127.0.0.2 get groundcontrol's version line and the third is closed before it; the
    scrape shows the refusal by its reason, 127.0.0.2 among the sources refused now, the
    other reasons at 0, and the handshake gauges of the limiter's pools.
    """
    fleet.restartServer(
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--early-close-allowance",
        "2",
        "--early-close-rate",
        "0.01",
    )
    assert [bannerGrab(fleet, "127.0.0.2")[:8] for _ in range(2)] == [b"SSH-2.0-"] * 2
    # Counted from the accept: the third is refused whether or not the closes are read.
    assert bannerGrab(fleet, "127.0.0.2") == b""
    text = waitFor(
        lambda: (
            (t := scrape(fleet))
            and sample(t, "groundcontrol_connections_refused_total", '{reason="early_close"}')
            and t
        ),
        10,
        "the refusal to be counted",
    )
    refused = "groundcontrol_connections_refused_total"
    assert sample(text, refused, '{reason="early_close"}') == 1
    for reason in ("handshake_limit", "failures", "noauth"):
        assert f'{refused}{{reason="{reason}"}} 0.0' in text, text
    assert sample(text, "groundcontrol_penalised_sources") == 1
    for pool in ("agents", "operators"):
        assert f'groundcontrol_handshakes_in_progress{{pool="{pool}"}}' in text
    assert 'groundcontrol_handshakes_waiting{pool="awaiting_version"} 0.0' in text


def test_json_logs(kiln7: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd --logger groundcontrol.logging.jsonLogger logs one JSON object per line."""
    original = harness.Process

    class JSONProcess(original):  # type: ignore[misc,valid-type]
        def __init__(self, argv: list[str], *args: Any) -> None:
            at = argv.index("groundcontrol")
            super().__init__(
                [*argv[:at], "--logger", "groundcontrol.logging.jsonLogger", *argv[at:]], *args
            )

    monkeypatch.setattr(harness, "Process", JSONProcess)
    kiln7.restartServer()
    alice = kiln7.operators["alice"]
    kiln7.waitRoutable(alice, "kiln7")
    assert kiln7.gc.process is not None
    lines = [line for line in kiln7.gc.process.output().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]
    assert any(e.get("log_namespace") == "groundcontrol.sessions.SessionRegistry" for e in events)
    assert all("log_format" in e or "log_io" in e for e in events)
