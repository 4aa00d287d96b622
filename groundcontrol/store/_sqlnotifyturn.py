"""
The SQL store's notifier turn: which node notifies the fleet's audit rows, and how far it got.

With several nodes on one PostgreSQL store each node's fleet watcher reads the whole audit
log; only the node holding the turn notifies it (L{groundcontrol.fleetturn} says why this
way). The turn is a session-level advisory lock on the node's store connection, released
by PostgreSQL when that connection ends (a stop, a crash, a lost network), so another node
can take it; the position (schema 009's one C{notify_position} row) is written by the node
holding it. SQLite is one node: the turn is always its own, and it takes no lock.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from ._sqlcore import StoreCore


class NotifyTurnRows(StoreCore):
    """The notifier turn and the fleet's notified-up-to position (schema 009)."""

    def takeNotifierTurn(self) -> Deferred[bool]:
        return self._run(self._takeNotifierTurn)

    def _takeNotifierTurn(self) -> bool:
        return True  # one node (SQLite): PostgreSQLStore takes the fleet's lock

    def leaveNotifierTurn(self) -> Deferred[None]:
        return self._run(self._leaveNotifierTurn)

    def _leaveNotifierTurn(self) -> None:
        return None

    def notifiedTo(self) -> Deferred[int | None]:
        return self._run(self._notifiedTo)

    def _notifiedTo(self) -> int | None:
        rows = self._read("SELECT notified_to FROM notify_position WHERE fleet = 1")
        if not rows or rows[0]["notified_to"] is None:
            return None
        return int(rows[0]["notified_to"])

    def recordNotifiedTo(self, position: int, node: str, now: float) -> Deferred[bool]:
        return self._run(self._recordNotifiedTo, position, node, now)

    def _recordNotifiedTo(self, position: int, node: str, now: float) -> bool:
        # Only forward: a node that lost its turn without knowing yet (its connection gone)
        # must not take the position back under the rows the next one notified.
        with self._write() as c:
            c.execute(
                "UPDATE notify_position SET notified_to = ?, node = ?, at = ? "
                "WHERE fleet = 1 AND (notified_to IS NULL OR notified_to < ?)",
                (position, node, now, position),
            )
            return c.rowcount > 0
