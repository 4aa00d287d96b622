"""
End to end: every way a session can fail gives the operator a clear message
on stderr and a non-zero exit, never a hang (issue 2).
"""

from __future__ import annotations

import signal
import subprocess

from tests.e2e.harness import Fleet, readLine, waitFor


def test_unknown_device(fleet: Fleet) -> None:
    """A device the fleet has never heard of is named in the refusal."""
    result = fleet.operators["alice"].ssh("dev_nosuch", "true")
    assert result.returncode == 255
    assert "unknown device 'nosuch'" in result.stderr


def test_malformed_name_refused_without_lookup(fleet: Fleet) -> None:
    """A name outside dev_[a-z0-9][a-z0-9-]{0,62} is refused with the rule."""
    for user in ("dev_Kiln7", "dev_-x", "dev_" + "a" * 64, "kiln7"):
        result = fleet.operators["alice"].ssh(user, "true")
        assert result.returncode == 255, user
        assert "malformed device name" in result.stderr or "unknown user" in result.stderr, (
            user,
            result.stderr,
        )


def test_offline_device_says_when_last_seen(kiln7: Fleet) -> None:
    """
    A known device whose agent is gone is 'offline', with when it was last seen: at once
    with --device-wait 0 (the wait for a device seen recently: test_device_wait.py).
    """
    kiln7.agents[0].stop()
    kiln7.restartServer("--device-wait", "0")
    alice = kiln7.operators["alice"]

    def offline() -> str | None:
        result = alice.ssh("dev_kiln7", "true")
        return result.stderr if "offline" in result.stderr else None

    message = waitFor(offline, 15, "the device to be reported offline")
    assert "device 'kiln7' is offline (last seen" in message
    assert "ago" in message


def test_not_granted(kiln7: Fleet) -> None:
    """An operator without a grant is refused; after a grant, the same key gets in."""
    bob = kiln7.addOperator("bob")
    result = bob.ssh("dev_kiln7", "true")
    assert result.returncode == 255
    assert "unknown device 'kiln7', or account 'bob' has no grant for it" in result.stderr
    kiln7.gc.cli("grant", "bob", "kiln7")
    assert bob.ssh("dev_kiln7", "echo in").stdout == "in\n"


def test_unregistered_key_is_refused(fleet: Fleet, tmp_path) -> None:
    """A key that belongs to no account cannot log in at all."""
    alice = fleet.operators["alice"]
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    # The same client settings, with a key no account holds.
    config = tmp_path / "stranger_config"
    config.write_text(alice.configPath.read_text().replace(str(alice.keyPath), str(stranger)))
    result = subprocess.run(
        ["ssh", "-F", str(config), "dev_kiln7@groundcontrol", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_link_lost_mid_session_ends_it_with_a_message(kiln7: Fleet) -> None:
    """Killing the agent during a session ends the operator's ssh with a reason."""
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
        kiln7.agents[0].process.signal(signal.SIGKILL)
        _, stderr = session.communicate(timeout=30)
    finally:
        session.kill()
    assert session.returncode == 255
    assert "connection to device kiln7 was lost" in stderr
