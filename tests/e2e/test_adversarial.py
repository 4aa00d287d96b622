"""
Attacks of the session-17 security review that need the real OpenSSH client.
"""

from __future__ import annotations

from tests.e2e.harness import Fleet, Operator, run


def _rsaOperator(fleet: Fleet, name: str) -> Operator:
    """An operator account whose key is RSA (the harness makes Ed25519 ones)."""
    key = fleet.base / f"{name}_rsa"
    run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(key)], check=True)
    fleet.gc.cli("user", "add", name, "--key", f"{key}.pub")
    operator = Operator(name, key, fleet.base / f"ssh_config-{name}")
    fleet.operators[name] = operator
    fleet.writeClientConfig(operator)
    return operator


def test_rsa_key_logs_in_with_sha2(fleet: Fleet) -> None:
    """
    SHA-1 (ssh-rsa) and DSA signatures are refused (tests/test_adversarial.py, in
    memory: OpenSSH's client does not even try ssh-rsa against groundcontrol's
    server-sig-algs). An operator with an RSA key still logs in with OpenSSH, by
    rsa-sha2-512 or rsa-sha2-256.
    """
    bob = _rsaOperator(fleet, "bob")
    for algorithm in ("rsa-sha2-512", "rsa-sha2-256"):
        login = bob.ssh("ctl", "whoami", options=["-o", f"PubkeyAcceptedAlgorithms={algorithm}"])
        assert login.returncode == 0, (algorithm, login.stderr)
        assert "bob" in login.stdout
