"""
The --kex filter of device list and ctl ls (groundcontrol.kexfilter): which kind a link's
key exchange is, and which devices a set of kinds keeps.
"""

from __future__ import annotations

import argparse

import pytest

from groundcontrol.kexfilter import KEX_KINDS, addKexFilter, kexKind, withKex
from groundcontrol.store import Device


def device(name: str, kex: str | None) -> Device:
    return Device(
        name,
        "approved",
        "SHA256:x",
        "ssh-ed25519 AAAA",
        None,
        0.0,
        "root",
        None,
        0.0,
        lastLinkKex=kex,
    )


def test_kinds() -> None:
    """
    The hybrids are post-quantum, curve25519 (an old agent) and any other named exchange
    classical; no exchange recorded is unknown, never classical.
    """
    assert kexKind("mlkem768x25519-sha256") == "post-quantum"
    assert kexKind("sntrup761x25519-sha512@openssh.com") == "post-quantum"
    assert kexKind("curve25519-sha256") == "classical"
    assert kexKind("curve25519-sha256@libssh.org") == "classical"
    assert kexKind(None) == "unknown"
    assert set(KEX_KINDS) == {"post-quantum", "classical", "unknown"}


def test_withKex() -> None:
    """No filter keeps every device in order; kinds keep those of any of them."""
    fleet = [
        device("a", None),
        device("b", "curve25519-sha256"),
        device("c", "mlkem768x25519-sha256"),
    ]
    assert withKex(fleet, None) == fleet
    assert [d.name for d in withKex(fleet, ["classical"])] == ["b"]
    assert [d.name for d in withKex(fleet, ["unknown", "post-quantum"])] == ["a", "c"]
    assert withKex(fleet, []) == []


def test_option() -> None:
    """--kex is repeatable, None when absent, and takes only the three kinds."""
    parser = argparse.ArgumentParser()
    addKexFilter(parser)
    assert parser.parse_args([]).kex is None
    assert parser.parse_args(["--kex", "classical", "--kex", "unknown"]).kex == [
        "classical",
        "unknown",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--kex", "curve25519-sha256"])
