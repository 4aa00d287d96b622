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
serials match (L{groundcontrol.documents.serialMatches}). Several keys asking for one
name, approved or rejected by name alone, are refused with the same facts
(L{AmbiguousRequest}, through L{refusalText}).

The store's errors carry the facts; laying them out for people is done here, for both
front ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from accesstunnel.timetext import whenText
from groundcontrol.devicedetail import clean, serialText
from groundcontrol.store import AmbiguousRequest, Device, EnrollmentRequest, RekeyNeedsKey

__all__ = ["keysSideBySide", "refusalText", "rekeyRefusal"]


def rekeyRefusal(refusal: RekeyNeedsKey, now: float, command: str = "") -> str:
    """
    Why C{approve NAME} did nothing, what to compare, and the commands that decide, in
    lines for the caller to prefix (C{approve: }). C{command} is what the admin types
    before C{approve} (the control shell: nothing; the CLI: C{groundcontrol --data DIR
    device }).
    """
    device, request = refusal.device, refusal.request
    name, key = device.name, request.fingerprint
    return "\n".join(
        (
            f"{name} is an approved device with another key: not approved.",
            *keysSideBySide(device, [request], now),
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


def refusalText(error: BaseException) -> str:
    """
    What a front end prints for a store's refusal: for several keys asking for one name
    (L{AmbiguousRequest}), what to do and the keys side by side, in lines; for any other
    error, its own text.
    """
    if not isinstance(error, AmbiguousRequest):
        return str(error)
    heading = (
        f"{len(error.requests)} pending requests ask for {error.name!r}; "
        "choose one by fingerprint (--key SHA256:...):"
    )
    return "\n".join([heading, *keysSideBySide(error.device, error.requests, error.now)])


def keysSideBySide(
    device: Device | None, requests: Sequence[EnrollmentRequest], now: float
) -> list[str]:
    """
    The key C{device} has (when the name is an approved device's) above each key that asks
    for its name: fingerprints, serials (whether each is the device's), when each was
    seen, where each request came from. What L{rekeyRefusal} and L{refusalText} (for
    L{AmbiguousRequest}) show, so an admin compares the same facts in both.
    """
    lines = []
    if device is not None:
        lastSeen = whenText(device.lastSeen, now, absent="never")
        lines.append(
            f"  device's key   {device.fingerprint}  serial {clean(device.serial or '-')}  "
            f"last seen {lastSeen}"
        )
    lines += [
        f"  request's key  {r.fingerprint}  serial {serialText(r, device)}  "
        f"from {clean(r.source)}  first seen {whenText(r.firstSeen, now)}"
        for r in requests
    ]
    return lines
