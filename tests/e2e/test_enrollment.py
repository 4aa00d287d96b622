"""
End to end: enrollment with the real programs. Enrollment tokens and pairing-code
claims made through ``ssh ctl@groundcontrol``, the fleet certificate in the agent's
state dir, the webhook reaching a real local HTTP server with retries, and
``groundcontrol init`` keeping an existing fleet's keys. All on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from accesstunnel.keys import fingerprint
from accesstunnel.timetext import isoTime
from groundcontrol.pki import FleetCA, verifyDeviceCertificate
from tests.e2e.harness import (
    TUNNEL_AGENT,
    Agent,
    Fleet,
    GroundControl,
    WebhookReceiver,
    run,
    waitFor,
)


def _startAgent(fleet: Fleet, name: str, *extra: str) -> Agent:
    """Start an agent for C{name} (with extra options) and leave it to enroll itself."""
    agent = Agent(fleet.base, name)
    agent.start(fleet.serverAddress, str(fleet.gc.data / "ssh_host_ed25519_key.pub"), *extra)
    fleet.agents.append(agent)  # stopped with the fleet
    return agent


def _agentLog(agent: Agent) -> str:
    assert agent.process is not None
    return agent.process.output()


def test_token_enrollment(fleet: Fleet) -> None:
    """
    'tokens create --uses 1 --expires 1h' over ctl prints a token; an agent started with
    it is reachable at once, no approval needed; a second agent with the same token is
    refused (no uses left) and stays pending, unreachable, until an admin rejects its
    request (ctl reject): the server disconnects it, saying why.
    """
    alice = fleet.operators["alice"]
    created = alice.ssh("ctl", "tokens", "create", "--uses", "1", "--expires", "1h")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert len(token) > 30 and "\n" not in token
    assert "shown only now" in created.stderr

    first = _startAgent(fleet, "tok1", "--token", token)
    fleet.waitRoutable(alice, "tok1", timeout=20)
    (device,) = [d for d in fleet.gc.devices() if d["name"] == "tok1"]
    assert (device["state"], device["approved_by"]) == ("approved", "token:1"), device
    assert "enrolled with a token as tok1" in _agentLog(first)

    second = _startAgent(fleet, "tok2", "--token", token)
    fleet.waitPending("tok2")
    waitFor(lambda: "enrollment token refused" in _agentLog(second), 20, "the refusal")
    assert "no uses left" in _agentLog(second)
    refused = alice.ssh("dev_tok2", "true")
    assert refused.returncode == 255
    assert "unknown device 'tok2'" in refused.stderr
    pending = json.loads(alice.ssh("ctl", "pending", "--json").stdout)
    assert [(p["name"], p["connected"]) for p in pending] == [("tok2", True)]
    listed = json.loads(alice.ssh("ctl", "tokens", "--json").stdout)
    assert [t["uses_left"] for t in listed] == [0]
    # An admin rejects the pending request: the running server disconnects the agent.
    assert alice.ssh("ctl", "reject", "tok2").returncode == 0
    waitFor(lambda: "rejected by an admin" in _agentLog(second), 20, "the rejection")


def test_claim_with_pairing_code(fleet: Fleet) -> None:
    """
    An agent without a token shows a pairing code ('tunnel-agent pair --state DIR'); a
    non-admin operator claims it over ctl for 1h, then reaches the device and 'ls' shows
    them as its owner; another operator cannot reach it; the code is used up.
    """
    bob = fleet.addOperator("bob")
    carol = fleet.addOperator("carol")
    agent = _startAgent(fleet, "clm1")
    fleet.waitPending("clm1")

    code = agent.waitPairingCode()
    assert len(code) == 9 and code[4] == "-", code
    assert code in _agentLog(agent)

    claimed = bob.ssh("ctl", "claim", code, "--for", "1h")
    assert claimed.returncode == 0, claimed.stderr
    assert "claimed clm1" in claimed.stdout
    fleet.waitRoutable(bob, "clm1", timeout=10)
    listing = json.loads(bob.ssh("ctl", "ls", "--json").stdout)
    assert [(d["name"], d["owner"], d["online"]) for d in listing] == [("clm1", "bob", True)]
    assert "no grant" in carol.ssh("dev_clm1", "true").stderr
    again = carol.ssh("ctl", "claim", code, "--for", "1h")
    assert again.returncode == 1
    assert "no such claim code" in again.stderr
    # The agent learnt it was approved: no code left to show.
    waitFor(
        lambda: (
            "approved as clm1" in run([TUNNEL_AGENT, "pair", "--state", str(agent.state)]).stdout
        ),
        10,
        "the agent to know",
    )


def test_certificate_in_state_dir(kiln7: Fleet) -> None:
    """
    After approval the agent's state dir holds device.crt, issued over the link by the
    fleet CA: it verifies against DATA/ca/ca.crt, names the device (CN) and certifies
    the agent's own key.
    """
    agent = kiln7.agents[0]
    certificatePath = agent.state / "device.crt"
    waitFor(certificatePath.exists, 20, "the device certificate")
    pem = certificatePath.read_bytes()
    caCertificate = x509.load_pem_x509_certificate((kiln7.gc.data / "ca" / "ca.crt").read_bytes())
    certificate = x509.load_pem_x509_certificate(pem)
    certificate.verify_directly_issued_by(caCertificate)
    (cn,) = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "kiln7"
    verified = verifyDeviceCertificate(FleetCA.load(kiln7.gc.data / "ca"), pem, datetime.now(UTC))
    assert verified.deviceName == "kiln7"
    publicLine = (agent.state / "device_ed25519_key.pub").read_text().strip()
    assert verified.publicKeyFingerprint == fingerprint(publicLine)
    device = next(d for d in kiln7.gc.devices() if d["name"] == "kiln7")
    assert device["fingerprint"] == fingerprint(publicLine)
    assert device["certificate_expires_at"] == isoTime(verified.notAfter.timestamp())
    assert (agent.state / "fleet-ca.crt").read_bytes() == (
        kiln7.gc.data / "ca" / "ca.crt"
    ).read_bytes()


@pytest.fixture
def hook() -> Iterator[WebhookReceiver]:
    """A receiver answering 503 to the first two POSTs, then 200."""
    receiver = WebhookReceiver(lambda body, earlier: 503 if len(earlier) < 2 else 200)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.close()


def test_webhook_retried_until_delivered(fleet: Fleet, hook: WebhookReceiver) -> None:
    """
    With --webhook, a new pending device is POSTed as JSON (event device.pending, with the
    serial its agent reported) to a real local HTTP server; the two 503 answers are
    retried, and the third attempt delivers it. Once it is approved, another board's new
    key asking for its name is POSTed as device.rekey-requested saying its serial does
    not match (serial_matches).
    """
    fleet.gc.stop()
    fleet.startServer("--webhook", hook.url)
    _startAgent(fleet, "hooked1", "--serial", "SN-1")
    fleet.waitPending("hooked1")
    posts = waitFor(lambda: len(p := hook.snapshot()) >= 3 and p, 30, "three webhook attempts")
    assert [p["body"]["event"] for p in posts[:3]] == ["device.pending"] * 3
    assert all(p["body"]["device"] == "hooked1" for p in posts[:3])
    assert all(p["path"] == "/hook" and p["type"] == "application/json" for p in posts)
    assert posts[0]["body"]["detail"]["kind"] == "new"
    assert posts[0]["body"]["detail"]["serial"] == "SN-1"  # its agent's hello's
    assert len({json.dumps(p["body"], sort_keys=True) for p in posts[:3]}) == 1
    log = fleet.gc.process.output() if fleet.gc.process else ""
    assert "webhook attempt 1/" in log and "HTTP 503" in log

    fleet.gc.cli("device", "approve", "hooked1")
    fleet.addAgent("hooked1", approve=False, stateName="hooked1-b", extraArgs=("--serial", "SN-2"))
    rekey = waitFor(
        lambda: next(
            (p for p in hook.snapshot() if p["body"]["event"] == "device.rekey-requested"), None
        ),
        30,
        "the re-key request's webhook",
    )
    assert (rekey["body"]["device"], rekey["body"]["detail"]["serial"]) == ("hooked1", "SN-2")
    assert rekey["body"]["detail"]["serial_matches"] == "no"


def test_init_keeps_existing_keys(tmp_path: Path) -> None:
    """'groundcontrol init' on an initialised data dir keeps its fleet CA and host key."""
    gc = GroundControl(tmp_path)
    gc.init()
    kept = {
        path: path.read_bytes()
        for path in (
            gc.data / "ca" / "ca.key",
            gc.data / "ca" / "ca.crt",
            gc.data / "ssh_host_ed25519_key",
            gc.data / "ssh_host_ed25519_key.pub",
        )
    }
    assert (gc.data / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = gc.cli("init")
    assert "kept existing host key" in again.stdout
    for path, data in kept.items():
        assert path.read_bytes() == data, path
    assert (gc.data / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600


def test_reapproval_webhook_says_the_serial(fleet: Fleet) -> None:
    """
    A device offline past its certificate's end comes back pending with its own key
    (device.pending, kind reapprove): the POST says the serial its agent reported and that
    it is the device's (serial_matches yes, device_serial), and its re-approval's
    device.approved says the serial too (both were null).
    """
    receiver = WebhookReceiver()
    receiver.start()
    try:
        fleet.gc.stop()
        fleet.startServer("--webhook", receiver.url, "--certificate-lifetime", "6s")
        agent = fleet.addAgent("again1", extraArgs=("--serial", "SN-1"))
        waitFor((agent.state / "device.crt").exists, 30, "the device certificate")
        agent.stop()
        fleet.agents.remove(agent)
        certificate = x509.load_pem_x509_certificate((agent.state / "device.crt").read_bytes())
        # Away until its last certificate has run out.
        time.sleep(max(0.0, certificate.not_valid_after_utc.timestamp() - time.time()) + 1)
        fleet.addAgent("again1", approve=False, extraArgs=("--serial", "SN-1"))

        def posted(event: str, kind: str) -> dict[str, Any] | None:
            return next(
                (
                    p["body"]
                    for p in receiver.snapshot()
                    if (p["body"]["event"], p["body"]["detail"].get("kind")) == (event, kind)
                ),
                None,
            )

        pending = waitFor(lambda: posted("device.pending", "reapprove"), 30, "the POST")
        assert pending["device"] == "again1"
        detail = pending["detail"]
        assert (detail["serial"], detail["device_serial"], detail["serial_matches"]) == (
            "SN-1",
            "SN-1",
            "yes",
        )
        fleet.gc.cli("device", "approve", "again1")
        approved = waitFor(lambda: posted("device.approved", "reapprove"), 30, "the approval")
        assert approved["detail"]["serial"] == "SN-1"
    finally:
        receiver.close()
