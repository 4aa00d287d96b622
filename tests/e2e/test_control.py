"""
End to end: the control shell, ``ssh ctl@groundcontrol``, as exec, as a
script on stdin and at an interactive prompt; approval and revocation through
it take effect on live links.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime

import pexpect

from tests.e2e.harness import Fleet, readLine, waitFor


def test_ls_json_and_roles(kiln7: Fleet) -> None:
    """
    ls --json lists the device online, show --json its live link's transport and agent
    version; ls --kex post-quantum lists it by the hybrid key exchange its real agent linked
    with, --kex classical not; an operator is refused admin commands and shown no device
    without a grant.
    """
    alice = kiln7.operators["alice"]
    listing = json.loads(alice.ssh("ctl", "ls", "--json").stdout)
    assert [(d["name"], d["online"]) for d in listing] == [("kiln7", True)]
    quantumSafe = json.loads(alice.ssh("ctl", "ls", "--kex", "post-quantum", "--json").stdout)
    assert [(d["name"], d["last_link_kex"]) for d in quantumSafe] == [
        ("kiln7", "mlkem768x25519-sha256")
    ]
    assert json.loads(alice.ssh("ctl", "ls", "--kex", "classical", "--json").stdout) == []
    bob = kiln7.addOperator("bob")
    assert json.loads(bob.ssh("ctl", "ls", "--json").stdout) == []  # no grant, sees nothing
    refused = bob.ssh("ctl", "pending")
    assert refused.returncode == 1
    assert "only admins" in refused.stderr
    shown = json.loads(alice.ssh("ctl", "show", "kiln7", "--json").stdout)
    assert (shown["name"], shown["state"]) == ("kiln7", "approved")
    assert shown["online"] and shown["transport"] and shown["agent_version"], shown
    hidden = bob.ssh("ctl", "show", "kiln7")  # no grant: answered like a name no device has
    assert (hidden.returncode, hidden.stderr) == (1, "show: no device named 'kiln7'\n")


def test_script_on_stdin(kiln7: Fleet) -> None:
    """Commands piped on stdin run in order; the exit status is the last command's."""
    result = kiln7.operators["alice"].ssh("ctl", input="whoami\nusers\nnosuchcommand\n")
    assert "alice" in result.stdout
    assert "unknown command 'nosuchcommand'" in result.stderr
    assert result.returncode == 2


def test_interactive_prompt(kiln7: Fleet) -> None:
    """With a terminal there is a prompt; Ctrl-D on an empty line leaves with status 0."""
    argv = kiln7.operators["alice"].argv("ctl", tty=True)
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=20)
    child.expect_exact("ctl> ")
    child.sendline("ls")
    child.expect_exact("kiln7")
    child.expect_exact("ctl> ")
    child.send("\x04")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_approve_over_ctl_makes_waiting_device_routable(fleet: Fleet) -> None:
    """A connected pending device approved through ctl is reachable without reconnecting."""
    alice = fleet.operators["alice"]
    fleet.addAgent("oven2", approve=False)
    fleet.waitPending("oven2")
    pending = json.loads(alice.ssh("ctl", "pending", "--json").stdout)
    assert [(p["name"], p["connected"]) for p in pending] == [("oven2", True)]
    assert "unknown device" in alice.ssh("dev_oven2", "true").stderr
    assert alice.ssh("ctl", "approve", "oven2").returncode == 0
    fleet.waitRoutable(alice, "oven2", timeout=10)
    assert fleet.agents[0].process.output().count("link up over") == 1


def test_revoke_closes_live_session_within_a_second(kiln7: Fleet) -> None:
    """Revoking a device (CLI, another process) ends its live session within a second."""
    alice = kiln7.operators["alice"]
    session = subprocess.Popen(
        alice.argv("dev_kiln7", "echo started; sleep 60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert session.stdout is not None
        assert readLine(session.stdout, "the session on kiln7") == "started\n"
        kiln7.gc.cli("device", "revoke", "kiln7")
        started = time.monotonic()  # the revocation is in the store from here on
        session.wait(10)
    finally:
        session.kill()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed
    assert session.returncode == 255
    refused = waitFor(
        lambda: "revoked" in (r := alice.ssh("dev_kiln7", "true")).stderr and r, 10, "refusal"
    )
    assert refused.returncode == 255


def test_claim_renew_and_release(fleet: Fleet) -> None:
    """
    The owner of a claimed device renews its lease over ctl while the device stays
    approved (the agent shows no code then), and releases it: access ends at once.
    """
    from tests.e2e.test_enrollment import _startAgent

    bob = fleet.addOperator("bob")
    agent = _startAgent(fleet, "lse1")
    fleet.waitPending("lse1")

    code = agent.waitPairingCode()
    assert bob.ssh("ctl", "claim", code, "--for", "1h").returncode == 0
    fleet.waitRoutable(bob, "lse1", timeout=10)
    before = time.time()
    renewed = bob.ssh("ctl", "claim", "renew", "lse1", "--for", "2d", "--json")
    assert renewed.returncode == 0, renewed.stderr
    row = json.loads(renewed.stdout)
    assert (row["name"], row["owner"]) == ("lse1", "bob")
    until = datetime.strptime(row["lease_until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + 2 * 86400 - 5 < until.timestamp() < time.time() + 2 * 86400 + 5
    assert bob.ssh("dev_lse1", "true").returncode == 0
    released = bob.ssh("ctl", "claim", "release", "lse1")
    assert released.returncode == 0, released.stderr
    assert "released lse1" in released.stdout
    refused = bob.ssh("dev_lse1", "true")
    assert refused.returncode == 255
    assert "no grant" in refused.stderr
    again = bob.ssh("ctl", "claim", "renew", "lse1")
    assert again.returncode == 1
    assert "you hold no claim on it or grant for it" in again.stderr
