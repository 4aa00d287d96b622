"""The device-name rule, shared by the server, the agent and the admin CLI.

A name ends up in usernames (``dev_NAME``), log lines and file names, so it is deliberately
narrow: lower-case letters, digits and hyphens, not starting with a hyphen, at most 63 long
(a DNS label).
"""

from __future__ import annotations

import re

__all__ = ["DEVICE_NAME_RE", "isValidDeviceName"]

#: Anchored with ``\A`` / ``\Z`` (not ``^`` / ``$``, which accept a trailing newline), so
#: ``match``, ``fullmatch`` and ``search`` all agree.
DEVICE_NAME_RE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")


def isValidDeviceName(name: object) -> bool:
    """Return whether C{name} is a well-formed device name (without the ``dev_`` prefix)."""
    return isinstance(name, str) and DEVICE_NAME_RE.match(name) is not None
