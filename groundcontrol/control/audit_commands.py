"""
The control shell's C{audit}: the audit log for admins, as the admin CLI's C{audit} gives
it (L{groundcontrol.auditlog}).
"""

from __future__ import annotations

import argparse

from groundcontrol.auditlog import addAuditOptions, auditDocuments, auditTable, recentAudit
from groundcontrol.control.commands import (
    CommandResult,
    ControlContext,
    Handler,
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
    addAuditOptions(parser)

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        events = await recentAudit(context.store, options.limit, options.after)
        if options.json:
            return _jsonDocument(auditDocuments(events))
        return CommandResult(stdout=auditTable(events))

    return run
