"""
The control shell's C{audit}: the audit log for admins, as the admin CLI's C{audit} gives
it (L{groundcontrol.auditlog}).
"""

from __future__ import annotations

import argparse

from groundcontrol.auditlog import auditDocuments, auditTable, recentAudit
from groundcontrol.control.commands import (
    CommandResult,
    ControlContext,
    Handler,
    UsageError,
    _jsonDocument,
    _Parser,
    command,
)

__all__: list[str] = []


@command(
    "audit",
    "the audit log, oldest first: the latest events [--limit 50], or those [--after ID]",
    adminOnly=True,
)
def _audit(parser: _Parser) -> Handler:
    parser.add_argument("--limit", type=int, default=50, help="at most N events (50)")
    parser.add_argument("--after", type=int, help="the events after this id")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        if options.limit < 1 or (options.after is not None and options.after < 0):
            raise UsageError("--limit must be at least 1 and --after a whole number")
        events = await recentAudit(context.store, options.limit, options.after)
        if options.json:
            return _jsonDocument(auditDocuments(events))
        return CommandResult(stdout=auditTable(events))

    return run
