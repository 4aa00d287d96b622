"""
What an admin needs to decide a re-key: a request asking for a device's name with another
key.

Anyone can connect with a fresh key and ask for any name, and approving such a request
gives the stranger the device's identity (its operators' sessions, their forwarded agents,
their files). So an approved device's key is replaced only by an approval that names the
new key (the store refuses one by name alone: L{RekeyNeedsKey}), and the refusal shows,
side by side, the key the device has and the key that asks: fingerprints, serials, when
each was seen, where the request came from. The control shell's C{approve} and the admin
CLI's C{device approve} print it; C{pending} and C{device list} show whether the
serials match (L{groundcontrol.documents.serialMatches}).
"""

from __future__ import annotations

from groundcontrol.devicedetail import clean
from groundcontrol.documents import serialMatches
from groundcontrol.store import RekeyNeedsKey
from groundcontrol.timetext import whenText

__all__ = ["rekeyRefusal"]


def rekeyRefusal(refusal: RekeyNeedsKey, now: float, command: str = "") -> str:
    """
    Why C{approve NAME} did nothing, what to compare, and the commands that decide, in
    lines for the caller to prefix (C{approve: }). C{command} is what the admin types
    before C{approve} (the control shell: nothing; the CLI: C{groundcontrol --data DIR
    device }).
    """
    device, request = refusal.device, refusal.request
    name, key = device.name, request.fingerprint
    lastSeen = whenText(device.lastSeen, now, absent="never")
    return "\n".join(
        (
            f"{name} is an approved device with another key: not approved.",
            f"  device's key   {device.fingerprint}  serial {clean(device.serial or '-')}  "
            f"last seen {lastSeen}",
            f"  request's key  {key}  serial {clean(request.serial or '-')} "
            f"(matches: {serialMatches(request, device)})  from {clean(request.source)}  "
            f"first seen {whenText(request.firstSeen, now)}",
            f"Approving it gives {name}'s name, its operators' sessions and their forwarded "
            "agents to the machine",
            "holding the request's key. Anyone can ask for any name with a new key, and a "
            "serial is what the agent says.",
            f"If {name} was re-installed or its board replaced, approve its new key:",
            f"  {command}approve {name} --key {key}",
            "If not, turn the request away:",
            f"  {command}reject {name} --key {key}",
        )
    )
