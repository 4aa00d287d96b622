"""
A re-key request's notification waits for the board serial its agent reports.

C{device.rekey-requested} is written when a new key logs in asking for an existing device's
name: at the login, before the agent's hello reports its board serial. So the row cannot
say whether that serial is the device's (C{serial_matches}), which is what tells the person
on call "same board, reflashed" from "another board". The row stays as it is, written in
the transaction that creates the request (no restart can part the two), with the device's
serial as C{deviceSerial}; the fleet watcher holds its notification until the serial
arrives through the same feed: the hello's C{device.serial-changed} row for the request's
key, written by whichever node the agent is linked to. It is then sent with C{serial} and
C{serial_matches} (L{groundcontrol.documents.serialsMatch}) added to its detail, under the
row's id and time.

A notification is held at most L{REKEY_SERIAL_WAIT}: an agent whose board has no serial,
an old agent, or one that drops before its hello is notified then, with C{serial} null and
C{serial_matches} C{unknown}. A feed event that names the key first (its approval,
rejection or expiry) sends the held notification before its own, so a receiver hears of a
request before its end. Every held notification is sent exactly once: with its serial,
before such an event, at the deadline, or when the watcher stops.

Why not write the event at the hello instead: a restart between the login and the hello
would lose it, unless each request remembered whether it had been announced (a schema
change on both backends, and a sweep for requests whose node died). Why not a second
event: two notifications for one request, the first without the answer. The cost here: a
held notification lives in the watcher's memory, so a crash within the wait loses it (a
stop sends it); as an event written while no watcher runs is not notified either (the
watcher starts from the newest row), and the row is in the audit log either way.
"""

from __future__ import annotations

import attrs

from groundcontrol.documents import serialsMatch
from groundcontrol.notify import FleetEvent

__all__ = ["REKEY_SERIAL_WAIT", "SERIAL_CHANGED", "HeldRekeys"]

#: Seconds a re-key notification waits for its agent's serial. An agent says hello as soon
#: as its login is accepted: one round trip, a few seconds over tor at worst.
REKEY_SERIAL_WAIT = 10.0

#: The audit event a hello's serial is stored with (L{groundcontrol.store.IStore.updateSerial}).
SERIAL_CHANGED = "device.serial-changed"


@attrs.frozen
class _Held:
    event: FleetEvent
    until: float


def _keyOf(event: FleetEvent) -> str | None:
    fingerprint = event.detail.get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) else None


def withSerial(event: FleetEvent, serial: str | None) -> FleetEvent:
    """C{event} (a re-key request's) saying which serial its key reported and if it matches."""
    matches = serialsMatch(serial, event.detail.get("deviceSerial"))
    return attrs.evolve(event, detail={**event.detail, "serial": serial, "serialMatches": matches})


class HeldRekeys:
    """The re-key notifications waiting for their serials, by key fingerprint."""

    def __init__(self, wait: float = REKEY_SERIAL_WAIT) -> None:
        self._wait = wait
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, event: FleetEvent, now: float) -> list[FleetEvent]:
        """
        Hold C{event}, a C{device.rekey-requested}, until its serial comes or C{now} plus
        the wait. Returns what is to be sent now: nothing, or C{event} itself if it names
        no key to wait for.
        """
        key = _keyOf(event)
        if key is None:
            return [event]
        released = self.release(key)
        self._held[key] = _Held(event, now + self._wait)
        return released

    def read(self, event: FleetEvent) -> list[FleetEvent]:
        """
        The held notifications that a later feed C{event} completes or ends: its key's
        serial (C{device.serial-changed}), or any other event naming its key.
        """
        key = _keyOf(event)
        if key is None or key not in self._held:
            return []
        if event.event == SERIAL_CHANGED:
            serial = event.detail.get("serial")
            return self.release(key, serial if isinstance(serial, str) else None)
        return self.release(key)

    def release(self, key: str, serial: str | None = None) -> list[FleetEvent]:
        """The notification held for C{key}, if any, with C{serial}; no longer held."""
        held = self._held.pop(key, None)
        return [] if held is None else [withSerial(held.event, serial)]

    def due(self, now: float) -> list[FleetEvent]:
        """The notifications whose wait is over at C{now}, without serials, oldest first."""
        keys = [key for key, held in self._held.items() if held.until <= now]
        return [event for key in keys for event in self.release(key)]

    def drain(self) -> list[FleetEvent]:
        """Every held notification, without serials (the watcher stops)."""
        return [event for key in list(self._held) for event in self.release(key)]
