"""
An enrollment request's notification waits for the board serial its agent reports.

C{device.pending} (a new device asking to be enrolled) and C{device.rekey-requested} (a
new key asking for an existing device's name) are written at the login, before the
agent's hello reports its board serial. So their rows cannot say it: the person approving
a new device wants the serial to match it with the sticker on the board, and for a re-key
whether it is the device's serial (C{serial_matches}) tells "same board, reflashed" from
"another board". The rows stay as they are, written in the transaction that creates the
request (no restart can part the two); a re-key's carries the device's serial as
C{deviceSerial}. The fleet watcher holds their notifications until the serial arrives
through the same feed: the hello's C{device.serial-changed} row for the request's key,
written by whichever node the agent is linked to. A notification is then sent with
C{serial} (and, for a re-key, C{serial_matches} by L{groundcontrol.documents.serialsMatch})
in its detail, under the row's id and time.

A device whose certificate ran out asks again with its own key (a C{device.pending} of
kind C{reapprove}, whose row carries the device's serial as C{deviceSerial}, as a re-key's
does): its hello stores the serial on the request (the device keeps its own until the
approval), but writes a row only if it is not the device's (another board with the
device's key), so the watcher also reads the request's stored serial while it holds one
(L{HeldRequests.awaitingStoredSerial}). It is then sent with C{serial} and
C{serial_matches}, as a re-key's: C{no} tells a copied state directory.

A notification is held at most L{SERIAL_WAIT}: an agent whose board has no serial, an old
agent, or one that drops before its hello is notified then, with C{serial} null (and
C{serial_matches} C{unknown}). A feed event that names the key first (its approval, claim,
rejection or expiry) sends the held notification before its own, so a receiver hears of a
request before its end. Every held notification is sent exactly once: with its serial,
before such an event, at the deadline, or when the watcher stops (with the serial stored
on its request by then, if any: a hello since the last poll); or, if the store does not
answer the stop in time, by the next start, which holds it for what was left of its wait
(L{HeldRequests.handOver}, L{groundcontrol.feedhandover}).

A re-approval's approval or claim (C{device.approved}, C{device.claimed}, kind
C{reapprove}) says the same: its row carries the request's C{serial} and the device's
C{deviceSerial} (the device keeps the serial it was approved with until then), and its
notification C{serial_matches} (L{withSerialsCompared}).

Why not write the event at the hello instead: a restart between the login and the hello
would lose it, unless each request remembered whether it had been announced (a schema
change on both backends, and a sweep for requests whose node died). Why not a second
event: two notifications for one request, the first without the answer. The cost here: a
held notification lives in the watcher's memory, so a crash within the wait loses it (a
stop sends it or leaves it to the next start); as an event written after the last poll
before a crash is not notified either (the start after a crash begins at the newest row),
and the row is in the audit log either way.
"""

from __future__ import annotations

import attrs

from groundcontrol.documents import serialsMatch
from groundcontrol.notify import DEVICE_PENDING, DEVICE_REKEY_REQUESTED, FleetEvent

__all__ = ["HELD_EVENTS", "SERIAL_CHANGED", "SERIAL_WAIT", "HeldRequests", "withSerialsCompared"]

#: Seconds a request's notification waits for its agent's serial. An agent says hello as
#: soon as its login is accepted: one round trip, a few seconds over tor at worst.
SERIAL_WAIT = 10.0

#: The audit event a hello's serial is stored with (L{groundcontrol.store.IStore.updateSerial}).
SERIAL_CHANGED = "device.serial-changed"

#: The events whose notifications wait for the serial (L{HeldRequests.hold}).
HELD_EVENTS = frozenset({DEVICE_PENDING, DEVICE_REKEY_REQUESTED})

#: Feed events whose detail's C{serial} is the one the request's agent reported.
_SAYS_THE_REQUESTS_SERIAL = frozenset(
    {SERIAL_CHANGED, "device.approved", "enrollment.rejected", "enrollment.expired"}
)


@attrs.frozen
class _Held:
    event: FleetEvent
    until: float


def _keyOf(event: FleetEvent) -> str | None:
    fingerprint = event.detail.get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) else None


def _isReapproval(event: FleetEvent) -> bool:
    """A device's own key asking again after its certificate ran out."""
    return event.event == DEVICE_PENDING and event.detail.get("kind") == "reapprove"


def withSerial(event: FleetEvent, serial: str | None) -> FleetEvent:
    """
    C{event} (a request's) saying which serial its key reported; a re-key's or a
    re-approval's also whether it is the device's.
    """
    detail = {**event.detail, "serial": serial}
    if event.event == DEVICE_REKEY_REQUESTED or _isReapproval(event):
        detail["serialMatches"] = serialsMatch(serial, event.detail.get("deviceSerial"))
    return attrs.evolve(event, detail=detail)


def withSerialsCompared(event: FleetEvent) -> FleetEvent:
    """
    C{event}, one not held, saying whether the serial its key reported is the device's
    (C{serialMatches}) when its row says both (C{serial}, C{deviceSerial}): a re-approval's
    approval or claim, as its request's notification did.
    """
    detail = event.detail
    if "deviceSerial" not in detail or "serialMatches" in detail:
        return event
    serial, deviceSerial = detail.get("serial"), detail["deviceSerial"]
    matches = serialsMatch(
        serial if isinstance(serial, str) else None,
        deviceSerial if isinstance(deviceSerial, str) else None,
    )
    return attrs.evolve(event, detail={**detail, "serialMatches": matches})


class HeldRequests:
    """The request notifications waiting for their serials, by key fingerprint."""

    def __init__(self, wait: float = SERIAL_WAIT) -> None:
        self._wait = wait
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, event: FleetEvent, now: float, wait: float | None = None) -> list[FleetEvent]:
        """
        Hold C{event}, one of L{HELD_EVENTS}, until its serial comes or C{now} plus the
        wait (C{wait}: what a stop left of it, L{handOver}). Returns what is to be sent
        now: nothing, or C{event} itself if it names no key whose serial could come.
        """
        key = _keyOf(event)
        if key is None or event.event not in HELD_EVENTS:
            return [event]
        released = self.release(key)
        self._held[key] = _Held(event, now + (self._wait if wait is None else wait))
        return released

    def read(self, event: FleetEvent) -> list[FleetEvent]:
        """
        The held notifications that a later feed C{event} completes or ends: its key's
        serial (C{device.serial-changed}), or any other event naming its key; one that
        ends the request says the serial the request had (a re-approval's, which no serial
        change may have said, when the approval is read in the same poll as the request).
        """
        key = _keyOf(event)
        if key is None or key not in self._held:
            return []
        if event.event in _SAYS_THE_REQUESTS_SERIAL:
            serial = event.detail.get("serial")
            return self.release(key, serial if isinstance(serial, str) else None)
        return self.release(key)

    def keys(self) -> frozenset[str]:
        """The keys of every held notification (the watcher stops: their stored serials)."""
        return frozenset(self._held)

    def awaitingStoredSerial(self) -> frozenset[str]:
        """
        The keys of the held re-approvals: their hello's serial, unless it changed, is only
        in the store's request row (L{release} them with it).
        """
        return frozenset(key for key, held in self._held.items() if _isReapproval(held.event))

    def release(self, key: str, serial: str | None = None) -> list[FleetEvent]:
        """The notification held for C{key}, if any, with C{serial}; no longer held."""
        held = self._held.pop(key, None)
        return [] if held is None else [withSerial(held.event, serial)]

    def due(self, now: float) -> list[FleetEvent]:
        """The notifications whose wait is over at C{now}, without serials, oldest first."""
        keys = [key for key, held in self._held.items() if held.until <= now]
        return [event for key in keys for event in self.release(key)]

    def handOver(self, now: float) -> list[tuple[FleetEvent, float]]:
        """
        Every held notification, as held (without a serial), with what is left of its wait
        at C{now}: for the next start, when a stopping watcher could not read the serials
        (L{groundcontrol.feedhandover}). No longer held.
        """
        held, self._held = self._held, {}
        return [(h.event, max(0.0, h.until - now)) for h in held.values()]

    def drain(self) -> list[FleetEvent]:
        """Every held notification, without serials (the watcher stops)."""
        return [event for key in list(self._held) for event in self.release(key)]
