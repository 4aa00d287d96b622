"""
What the SSH username asks for.

Operators write ``dev_NAME`` to reach a device and ``ctl`` for the control
shell; agents log in as ``agent+NAME``, where NAME is only the name they
would like (the routing name always comes from the device record bound to
the key). A malformed name is refused with a reason and never looked up.
"""

from __future__ import annotations

import attrs

from accesstunnel.names import isValidDeviceName

DEVICE_PREFIX = "dev_"
AGENT_PREFIX = "agent+"
CONTROL_USER = "ctl"


@attrs.frozen
class DeviceTarget:
    """An operator asked for device C{name}."""

    name: str


@attrs.frozen
class ControlTarget:
    """An operator asked for the control shell."""


@attrs.frozen
class MalformedTarget:
    """The username was not one we understand; C{reason} says why."""

    reason: str


@attrs.frozen
class AgentTarget:
    """A device's agent, which would like to be called C{requestedName}."""

    requestedName: str


Target = DeviceTarget | ControlTarget | MalformedTarget | AgentTarget


def _printable(raw: bytes) -> str:
    """The username as text safe to show back: no control characters."""
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:80]


def parseUsername(raw: bytes) -> Target:
    """Classify an SSH username without touching the store."""
    try:
        user = raw.decode("ascii")
    except UnicodeDecodeError:
        return MalformedTarget(f"malformed user name {_printable(raw)!r}")
    if user == CONTROL_USER:
        return ControlTarget()
    for prefix, kind in ((DEVICE_PREFIX, DeviceTarget), (AGENT_PREFIX, AgentTarget)):
        if user.startswith(prefix):
            name = user[len(prefix) :]
            if isValidDeviceName(name):
                return kind(name)
            return MalformedTarget(
                f"malformed device name {_printable(name.encode())!r}: a device name is "
                "1-63 characters of a-z, 0-9 and '-', not starting with '-'"
            )
    return MalformedTarget(
        f"unknown user {_printable(raw)!r}: log in as dev_NAME to reach device NAME, "
        "or as ctl for the control shell"
    )
