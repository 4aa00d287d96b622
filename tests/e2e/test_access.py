"""
End to end: access control with the real OpenSSH client. An admin grants an operator a
tag for a while over ``ssh ctl@gc``; the operator then reaches (and lists) the tagged
device only; a grant naming a login user runs the device session as that user.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.harness import Fleet, Operator


@pytest.fixture
def lab(fleet: Fleet) -> Fleet:
    """Devices lab1 (tagged lab over ctl) and plain2 (untagged); operator bob, no grants."""
    alice = fleet.operators["alice"]
    for name in ("lab1", "plain2"):
        fleet.addAgent(name)
        fleet.waitRoutable(alice, name)
    tagged = alice.ssh("ctl", "tag", "lab1", "+lab")
    assert tagged.returncode == 0, tagged.stderr
    fleet.addOperator("bob")
    return fleet


def _reach(operator: Operator, device: str, *command: str) -> subprocess.CompletedProcess[str]:
    return operator.ssh(f"dev_{device}", *(command or ("true",)), timeout=30)


def test_tag_grant_reaches_tagged_device_only(lab: Fleet) -> None:
    """
    'ssh ctl@gc grant bob tag:lab --for 1h' lets bob reach the tagged device and not the
    untagged one (refused for want of a grant), and bob's 'ls --json' lists only lab1.
    """
    alice, bob = lab.operators["alice"], lab.operators["bob"]
    assert "no grant" in _reach(bob, "lab1").stderr
    granted = alice.ssh("ctl", "grant", "bob", "tag:lab", "--for", "1h")
    assert granted.returncode == 0, granted.stderr
    assert "granted bob access to tag:lab until" in granted.stdout

    reached = _reach(bob, "lab1", "echo", "hello")
    assert (reached.returncode, reached.stdout) == (0, "hello\n"), reached.stderr
    refused = _reach(bob, "plain2")
    assert refused.returncode != 0
    assert "unknown device 'plain2', or account 'bob' has no grant for it" in refused.stderr

    listing = json.loads(bob.ssh("ctl", "ls", "--json").stdout)
    assert [(d["name"], d["online"], d["tags"]) for d in listing] == [("lab1", True, ["lab"])]
    assert listing[0]["agent_version"]  # reported by the agent's hello

    grants = json.loads(bob.ssh("ctl", "grants", "--json").stdout)
    assert [(g["user"], g["selector"], g["state"]) for g in grants] == [
        ("bob", "tag:lab", "active")
    ]
    refusedAdmin = bob.ssh("ctl", "grant", "bob", "tag:other")
    assert refusedAdmin.returncode == 1
    assert "only admins" in refusedAdmin.stderr


@pytest.fixture
def loginUser() -> Iterator[str]:
    """A throwaway local user with a real shell (the agent under test runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("a login user needs the agent to run as root")
    name = f"atl{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "-s", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_grant_as_login_user(lab: Fleet, loginUser: str) -> None:
    """
    'grant bob tag:lab --as USER': bob's session on lab1 runs as USER (id -un, HOME, a
    pty shell too); alice (admin, no grant naming a user) still gets the agent's root; a
    grant naming a user the device does not have is refused outright, never run as root.
    """
    alice, bob = lab.operators["alice"], lab.operators["bob"]
    assert alice.ssh("ctl", "grant", "bob", "tag:lab", "--as", loginUser).returncode == 0

    who = _reach(bob, "lab1", "id -un; echo $HOME; pwd")
    assert who.returncode == 0, who.stderr
    assert who.stdout.split() == [loginUser, "/nonexistent", "/"]
    shell = bob.ssh("dev_lab1", input="id -un\nexit\n", options=["-tt"], timeout=30)
    assert loginUser in shell.stdout, shell.stdout + shell.stderr
    assert _reach(alice, "lab1", "id -un").stdout == "root\n"

    assert alice.ssh("ctl", "grant", "bob", "lab1", "--as", "no-such-user-x").returncode == 0
    refused = _reach(bob, "lab1", "id -un")
    assert refused.returncode != 0
    assert "cannot run sessions as 'no-such-user-x'" in refused.stderr
    assert "root" not in refused.stdout


def test_agent_reported_tag_matches_a_tag_grant(fleet: Fleet) -> None:
    """A tag the agent reports (--tag) makes the device match a tag: grant."""
    alice = fleet.operators["alice"]
    fleet.addAgent("oven5", extraArgs=["--tag", "bakery"])
    fleet.waitRoutable(alice, "oven5")
    bob = fleet.addOperator("bob")
    assert "no grant" in bob.ssh("dev_oven5", "true").stderr
    assert alice.ssh("ctl", "grant", "bob", "tag:bakery").returncode == 0
    result = bob.ssh("dev_oven5", "echo tagged")
    assert result.stdout == "tagged\n", result.stderr
