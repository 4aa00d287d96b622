"""
The control shell's C{reject}: an admin turns a pending enrollment request away, as the
admin CLI's C{device reject} does.

Before it, a request only ever left the queue by being approved or claimed, so a queue
filled by requests nobody would approve stayed full (the fleet watcher now also expires
those not seen for a week). The key is not barred: its agent is disconnected by the fleet
watcher and may come back as a new request, as after any refusal; C{revoke} is for a key
that must stay out.
"""

from __future__ import annotations

import argparse

from groundcontrol.control.commands import (
    CommandResult,
    ControlContext,
    Handler,
    _deviceName,
    _done,
    _Parser,
    command,
)
from groundcontrol.documents import rejectedRequestJSON

__all__: list[str] = []


@command(
    "reject",
    "turn a pending request away: its agent is disconnected and may ask again [--key SHA256:...]",
    adminOnly=True,
)
def _reject(parser: _Parser) -> Handler:
    parser.add_argument("name")
    parser.add_argument("--key", help="the fingerprint to reject when several ask for the name")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.name)
        request = await context.store.rejectRequest(
            name, context.actor, context.clock.seconds(), fingerprint=options.key
        )
        return _done(
            options,
            f"rejected the request for {name} ({request.fingerprint})",
            rejectedRequestJSON(request),
        )

    return run
