"""
The control shell's commands: what `ssh ctl@groundcontrol CMD` can do.

Each command is an async function taking the caller's L{ControlContext} and
its parsed arguments, returning a L{CommandResult}. The same commands serve
the interactive prompt and one-shot exec, and every one takes ``--json`` for
scripts. Admin-only commands refuse operators with a clear message; every
change goes through the store, which writes the audit event.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from accesstunnel.durations import parseDuration
from accesstunnel.names import isValidDeviceName
from groundcontrol.enrollment import hashSecret, normaliseCode
from groundcontrol.registry import Registry
from groundcontrol.store import Account, IStore, StoreError


@attrs.frozen
class CommandResult:
    """What a command printed, on which stream, and its exit status."""

    stdout: str = ""
    stderr: str = ""
    status: int = 0


@attrs.frozen
class ControlContext:
    """Who is asking, and the fleet they are asking about."""

    account: Account
    store: IStore
    registry: Registry
    clock: IReactorTime

    @property
    def actor(self) -> str:
        return self.account.name


class UsageError(Exception):
    """Bad arguments: the message says what is expected."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UsageError(message or self.format_help())


Handler = Callable[[ControlContext, argparse.Namespace], Awaitable[CommandResult]]


@attrs.frozen
class Command:
    name: str
    summary: str
    adminOnly: bool
    parser: _Parser
    handler: Handler


COMMANDS: dict[str, Command] = {}


def command(
    name: str, summary: str, adminOnly: bool = False
) -> Callable[[Callable[[_Parser], Handler]], None]:
    """Register a command; the decorated function adds arguments and returns the handler."""

    def register(build: Callable[[_Parser], Handler]) -> None:
        parser = _Parser(prog=name, description=summary, add_help=False)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.add_argument("-h", "--help", action="store_true", help="show this help")
        COMMANDS[name] = Command(name, summary, adminOnly, parser, build(parser))

    return register


async def runCommandLine(context: ControlContext, line: str) -> CommandResult:
    """Parse and run one command line."""
    try:
        argv = shlex.split(line)
    except ValueError as e:
        return CommandResult(stderr=f"cannot parse the command: {e}\n", status=2)
    if not argv:
        return CommandResult()
    return await runCommand(context, argv)


async def runCommand(context: ControlContext, argv: list[str]) -> CommandResult:
    """Run one command given as words."""
    name, args = argv[0], argv[1:]
    entry = COMMANDS.get(name)
    if entry is None:
        return CommandResult(
            stderr=f"unknown command {_clean(name)!r}; 'help' lists the commands\n", status=2
        )
    try:
        options = entry.parser.parse_args(args)
    except UsageError as e:
        return CommandResult(stderr=f"{e}\n{entry.parser.format_usage()}", status=2)
    if options.help:
        return CommandResult(stdout=entry.parser.format_help())
    if entry.adminOnly and not context.account.isAdmin:
        return CommandResult(stderr=f"{name}: only admins may do this\n", status=1)
    try:
        return await entry.handler(context, options)
    except UsageError as e:
        return CommandResult(stderr=f"{name}: {e}\n", status=2)
    except StoreError as e:
        return CommandResult(stderr=f"{name}: {e}\n", status=1)


def _clean(text: str) -> str:
    """Device- and user-supplied text with control characters removed."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[c.upper() for c in columns]] + [
        [_clean(row.get(c) if row.get(c) is not None else "-") for c in columns] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
        for r in cells
    )


def _output(
    options: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]
) -> CommandResult:
    if options.json:
        return CommandResult(stdout=json.dumps(rows, indent=2, sort_keys=True) + "\n")
    return CommandResult(stdout=_table(rows, columns))


def _deviceName(name: str) -> str:
    if name.startswith("dev_"):
        name = name[4:]
    if not isValidDeviceName(name):
        raise UsageError(f"malformed device name {_clean(name)!r}")
    return name


# -- commands -------------------------------------------------------------------


@command("help", "list the commands")
def _help(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        rows = [
            {"command": c.name, "summary": c.summary + (" (admin)" if c.adminOnly else "")}
            for c in sorted(COMMANDS.values(), key=lambda c: c.name)
            if context.account.isAdmin or not c.adminOnly
        ]
        return _output(options, rows, ["command", "summary"])

    return run


@command("whoami", "the account this key belongs to")
def _whoami(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        row = {
            "account": context.account.name,
            "role": "admin" if context.account.isAdmin else "operator",
        }
        return _output(options, [row], ["account", "role"])

    return run


@command("ls", "devices you may reach: online, last seen, owner, agent version")
def _ls(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        rows = []
        for device in await context.store.listDevices():
            if device.state != "approved":
                continue
            if not await context.store.mayReach(context.account, device.name, now):
                continue
            link: Any = context.registry.lookup(device.name)
            details = getattr(link, "details", {}) if link is not None else {}
            rows.append(
                {
                    "name": device.name,
                    "online": link is not None,
                    "last_seen": "now" if link is not None else _when(device.lastSeen),
                    "owner": getattr(device, "owner", None),
                    "transport": details.get("transport") or None,
                    "version": details.get("version"),
                }
            )
        return _output(
            options, rows, ["name", "online", "last_seen", "owner", "transport", "version"]
        )

    return run


@command("pending", "devices waiting for approval", adminOnly=True)
def _pending(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        rows = [
            {
                "name": r.requestedName,
                "kind": r.kind,
                "fingerprint": r.fingerprint,
                "serial": r.serial,
                "source": r.source,
                "first_seen": _when(r.firstSeen),
                "last_seen": _when(r.lastSeen),
                "connected": context.registry.pendingFor(r.fingerprint) is not None,
            }
            for r in await context.store.listEnrollmentRequests()
        ]
        return _output(
            options,
            rows,
            ["name", "kind", "fingerprint", "serial", "source", "last_seen", "connected"],
        )

    return run


@command("approve", "approve a pending device (or a new key of a known one)", adminOnly=True)
def _approve(parser: _Parser) -> Handler:
    parser.add_argument("name")
    parser.add_argument("--key", help="the fingerprint to approve when several ask for the name")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.name)
        device = await context.store.approveDevice(
            name, context.actor, context.clock.seconds(), fingerprint=options.key
        )
        return CommandResult(stdout=f"approved {device.name} ({device.fingerprint})\n")

    return run


@command("revoke", "revoke a device: its link closes and it is refused from now on", adminOnly=True)
def _revoke(parser: _Parser) -> Handler:
    parser.add_argument("name")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.name)
        await context.store.revokeDevice(name, context.actor, context.clock.seconds())
        context.registry.drop(name, "device revoked")
        return CommandResult(stdout=f"revoked {name}\n")

    return run


@command("grant", "let an account reach a device", adminOnly=True)
def _grant(parser: _Parser) -> Handler:
    parser.add_argument("user")
    parser.add_argument("device")
    parser.add_argument("--for", dest="duration", help="expire after e.g. 8h, 7d")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        expiresAt = None
        if options.duration:
            try:
                expiresAt = now + parseDuration(options.duration)
            except ValueError as e:
                raise UsageError(str(e)) from None
        name = _deviceName(options.device)
        await context.store.grant(options.user, name, context.actor, now, expiresAt=expiresAt)
        until = f" until {_when(expiresAt)} UTC" if expiresAt else ""
        return CommandResult(stdout=f"granted {options.user} access to {name}{until}\n")

    return run


@command("ungrant", "take a grant away", adminOnly=True)
def _ungrant(parser: _Parser) -> Handler:
    parser.add_argument("user")
    parser.add_argument("device")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.device)
        removed = await context.store.ungrant(
            options.user, name, context.actor, context.clock.seconds()
        )
        if not removed:
            return CommandResult(stderr=f"{options.user} had no grant for {name}\n", status=1)
        return CommandResult(stdout=f"removed {options.user}'s grant for {name}\n")

    return run


@command("users", "accounts and their roles", adminOnly=True)
def _users(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        rows = [
            {"name": a.name, "role": "admin" if a.isAdmin else "operator"}
            for a in await context.store.listAccounts()
        ]
        return _output(options, rows, ["name", "role"])

    return run


@command("claim", "claim a device by the pairing code it shows, for a period")
def _claim(parser: _Parser) -> Handler:
    parser.add_argument("code", help="the code 'tunnel-agent pair' prints on the device")
    parser.add_argument("--for", dest="duration", default="7d", help="lease, e.g. 8h, 7d (7d)")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        try:
            lease = parseDuration(options.duration)
        except ValueError as e:
            raise UsageError(str(e)) from None
        now = context.clock.seconds()
        device = await context.store.claimDevice(
            hashSecret(normaliseCode(options.code)), context.account, now + lease, now
        )
        return CommandResult(
            stdout=f"claimed {device.name}: yours until {_when(now + lease)} UTC; "
            f"ssh dev_{device.name}@ to reach it\n"
        )

    return run


@command("tokens", "enrollment tokens; 'tokens create --uses N --expires 1d' makes one", True)
def _tokens(parser: _Parser) -> Handler:
    parser.add_argument("action", nargs="?", choices=["list", "create"], default="list")
    parser.add_argument("--uses", type=int, default=1, help="devices that may use it (1)")
    parser.add_argument("--expires", default="1d", help="lifetime, e.g. 1h, 1d (1d)")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        if options.action == "create":
            if options.uses < 1:
                raise UsageError("--uses must be at least 1")
            try:
                lifetime = parseDuration(options.expires)
            except ValueError as e:
                raise UsageError(str(e)) from None
            token = secrets.token_urlsafe(32)
            record = await context.store.createToken(
                hashSecret(token), options.uses, now + lifetime, context.actor, now
            )
            if options.json:
                row = {
                    "id": record.id,
                    "token": token,
                    "uses": record.uses,
                    "expires": _when(record.expiresAt),
                }
                return CommandResult(stdout=json.dumps(row, sort_keys=True) + "\n")
            return CommandResult(
                stdout=f"{token}\n",
                stderr=f"token {record.id}: {record.uses} use(s), expires "
                f"{_when(record.expiresAt)} UTC; shown once, pass it to agents with --token\n",
            )
        rows = [
            {
                "id": t.id,
                "uses": t.uses,
                "uses_left": t.usesLeft,
                "expires": _when(t.expiresAt),
                "expired": t.expiresAt <= now,
                "created_by": t.createdBy,
            }
            for t in await context.store.listTokens()
        ]
        return _output(
            options, rows, ["id", "uses", "uses_left", "expires", "expired", "created_by"]
        )

    return run
