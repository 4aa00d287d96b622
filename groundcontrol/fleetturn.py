"""
With several nodes on one PostgreSQL store, which node notifies the fleet's events: one.

Every node's fleet watcher reads the whole audit log, and applies each row to its own links
(a revocation closes the device's link wherever it is). If every node also notified each row,
a webhook receiver (a chat bridge, a pager) got each event once per node: three pages for one
pending device. So one node at a time holds the notifier's turn and notifies (log line and
webhook); the others only apply. The turn:

  - is a session-level PostgreSQL advisory lock on the node's store connection
    (L{IStore.takeNotifierTurn}), asked for every poll. PostgreSQL releases it when the
    session ends: a stop, a crash or kill (the socket closes), a machine gone or cut off
    (TCP keepalives, set to about 25 s while the turn is held) or a process hung (30 s
    without a statement, PostgreSQL 14 on). Another node's next poll takes it. No new
    infrastructure, no clocks compared across machines, no lease to renew.
  - comes with a position, the fleet's notified-up-to audit id in the store (schema 009),
    written by the node holding the turn each poll it has notified something (and every
    L{IDLE_RECORD_INTERVAL} otherwise): the id below which every notified row was
    delivered or given up by the webhook, and none is held for its serial. The node that
    takes the turn next reads on from there: a failover loses no row, and repeats only the
    rows in flight then (queued for the webhook, held for a serial, or notified since the
    last write); the webhook's C{id} lets receivers drop those. The position only moves
    forward in the store, so a node that lost its turn without knowing yet cannot take it
    back.

Why not a claim per row (C{UPDATE audit SET notified_by ... WHERE notified_by IS NULL}): a
node that claims a row and dies before its webhook delivers it loses that row, unless claims
expire, which brings back timeouts across machines; and every node would write to the audit
table, under the store's one write lock, for every row. The turn costs one read a poll per
node and one small write a poll on the notifying node.

The notifying node reads the feed for notification on its own cursor, beside the one every
node applies with: a node taking the turn after a day down catches up on a day of rows, at
most L{NOTIFY_PAGES_PER_POLL} pages a poll and not while the webhook has
L{NOTIFY_BACKLOG} events unfinished (its queue drops the oldest beyond 1,000), while
revocations go on being applied at once.

The log line goes once per fleet too, from the notifying node: with the logs of several
nodes gathered in one place (as they are, to be read), a line per node was the same
triplicate as the webhook's. A node's own links are in its own lines (link up, closed).

A single SQLite node has no turn: its watcher notifies as it always did, and its stop hands
the position over in run/feed.json (L{groundcontrol.feedhandover}). With a PostgreSQL store
the stop hands over through the store instead (a node down for a day re-notified a day of
rows the others had sent, with a file of its own), and feed.json is neither read nor written.
"""

from __future__ import annotations

import os
import socket

from twisted.logger import Logger

from groundcontrol.store import IStore

__all__ = ["IDLE_RECORD_INTERVAL", "NOTIFY_BACKLOG", "NOTIFY_PAGES_PER_POLL", "NotifierTurn"]

#: Pages of the feed the notifying node reads a poll on its notification cursor.
NOTIFY_PAGES_PER_POLL = 4

#: Events unfinished in the webhook above which the notifying node reads no more for now.
NOTIFY_BACKLOG = 400

#: Seconds between writes of a position that moved past rows nobody is told about only.
IDLE_RECORD_INTERVAL = 30.0


class NotifierTurn:
    """
    The fleet notifier's turn for one node, and the position its notifications reached.

    The fleet watcher asks L{take} every poll; while it holds the turn it reads from
    L{startingPosition} on and L{record}s how far it got.
    """

    _log = Logger()

    def __init__(self, store: IStore, node: str | None = None) -> None:
        """
        @param node: this node's name in the position's row, for people; the host's name
            and process id by default.
        """
        self._store = store
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self.holding = False
        self._recorded: int | None = None

    async def take(self) -> bool:
        """Whether this node holds the turn now (taking it if free); a change is logged."""
        holding = bool(await self._store.takeNotifierTurn())
        if holding != self.holding:
            self.holding = holding
            self._recorded = None
            if holding:
                self._log.info("this node ({node}) now notifies the fleet's events", node=self.node)
            else:
                self._log.warn(
                    "this node ({node}) lost the fleet notifier's turn (its store connection "
                    "was renewed); another node notifies from where it left off",
                    node=self.node,
                )
        return holding

    async def startingPosition(self) -> int:
        """
        The audit id to notify after: the fleet's stored position, or the newest row's if
        none was ever written (the first node, just upgraded) or it is past the newest (a
        store restored from a backup).
        """
        stored = await self._store.notifiedTo()
        newest = await self._store.lastAuditId()
        if stored is None or stored > newest:
            if stored is not None:
                self._log.warn(
                    "the fleet's notified position {stored} is past the newest audit row "
                    "({newest}): another store? notifying from the newest row",
                    stored=stored,
                    newest=newest,
                )
            self._recorded = None
            return newest
        self._recorded = stored
        self._log.info(
            "notifying the audit rows after id {stored} (the newest is {newest})",
            stored=stored,
            newest=newest,
        )
        return stored

    @property
    def recorded(self) -> int | None:
        """The position this node last wrote or read, None before."""
        return self._recorded

    async def record(self, position: int, now: float) -> None:
        """Write C{position} as the fleet's (forward only)."""
        await self._store.recordNotifiedTo(position, self.node, now)
        self._recorded = position

    async def leave(self) -> None:
        """Give the turn up (a stop), so another node takes it at its next poll."""
        if self.holding:
            self.holding = False
            await self._store.leaveNotifierTurn()
