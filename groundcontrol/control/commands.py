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
import secrets
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from accesstunnel.clocks import elapsedClock
from accesstunnel.durations import parseDuration
from accesstunnel.names import isValidDeviceName
from accesstunnel.timetext import relativeTime, whenText
from groundcontrol.accesslists import (
    grantedText,
    grantsTable,
    table,
    tokenCreatedText,
    tokensTable,
    ungrantedText,
)
from groundcontrol.control.claimguesses import claimWait, wrongCode
from groundcontrol.devicedetail import (
    DeviceDetail,
    detailJSON,
    detailText,
    grantsCovering,
    liveLink,
    onlineJSON,
    requestsFor,
    tagsText,
)
from groundcontrol.documents import (
    accountJSON,
    deviceJSON,
    grantJSON,
    groupJSON,
    groupRemovalJSON,
    jsonText,
    newTokenJSON,
    requestJSON,
    tokenJSON,
    ungrantJSON,
)
from groundcontrol.enrollment import hashSecret, normaliseCode
from groundcontrol.kexfilter import addKexFilter, withKex
from groundcontrol.registry import Registry
from groundcontrol.rekeyreview import refusalText, rekeyRefusal
from groundcontrol.store import (
    Account,
    ClaimCodeExpired,
    ClaimCodeInvalid,
    Device,
    IStore,
    RekeyNeedsKey,
    StoreError,
    UnknownDevice,
    parseSelector,
)


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
        if "-h" in args or "--help" in args:
            # "approve --help" asks how, before the arguments it would complain are missing.
            return CommandResult(stdout=entry.parser.format_help())
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
        return CommandResult(stderr=f"{name}: {refusalText(e)}\n", status=1)


def _clean(text: object) -> str:
    """Device- and user-supplied text with control characters removed."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """C{rows}' C{columns} as L{accesslists.table} lays them out; a None cell reads C{-}."""
    return table(
        [c.upper() for c in columns],
        [[_clean(row.get(c) if row.get(c) is not None else "-") for c in columns] for row in rows],
    )


def _output(
    options: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]
) -> CommandResult:
    if options.json:
        return _jsonDocument(rows)
    return CommandResult(stdout=_table(rows, columns))


def _jsonDocument(document: Any) -> CommandResult:
    """What --json prints: L{groundcontrol.documents.jsonText}, as the admin CLI's."""
    return CommandResult(stdout=jsonText(document))


def _deviceName(name: str) -> str:
    if name.startswith("dev_"):
        name = name[4:]
    if not isValidDeviceName(name):
        raise UsageError(f"malformed device name {_clean(name)!r}")
    return name


def _selector(text: str) -> str:
    """A grant's selector in its canonical spelling (device:, group:, tag:)."""
    try:
        return parseSelector(text)
    except StoreError as e:
        raise UsageError(str(e)) from None


def _done(options: argparse.Namespace, text: str, document: Any) -> CommandResult:
    """
    What a command that changed something prints: a line, or with --json the document of
    what it changed (the device, the grant, ...), as listing it would show it.
    """
    if options.json:
        return _jsonDocument(document)
    return CommandResult(stdout=text + "\n")


def _deviceDocument(context: ControlContext, device: Device) -> dict[str, Any]:
    """
    A device's document (as the admin CLI's C{device list} gives it) with what only the
    server knows: whether it is online, and its live link (L{onlineJSON}).
    """
    return {**deviceJSON(device), **onlineJSON(liveLink(context.registry.lookup(device.name)))}


def _lsCells(document: dict[str, Any], device: Device, now: float) -> dict[str, Any]:
    """C{ls}'s table row: last seen C{now} while online, else how long ago."""
    online = document["online"]
    return {
        "name": device.name,
        "online": "yes" if online else "no",
        "last_seen": "now" if online else relativeTime(device.lastSeen, now),
        "owner": device.owner,
        "tags": ",".join(device.allTags) or None,
        "transport": document["transport"],
        "version": document["agent_version"],
    }


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
        if options.json:
            return _jsonDocument(accountJSON(context.account))
        return _output(options, [accountJSON(context.account)], ["name", "role"])

    return run


@command("ls", "devices you may reach: online, last seen, owner, tags, transport, version")
def _ls(parser: _Parser) -> Handler:
    addKexFilter(parser)

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        documents, cells = [], []
        for device in withKex(await context.store.listDevices(), options.kex):
            if device.state != "approved":
                continue
            if not await context.store.mayReach(context.account, device.name, now):
                continue
            document = _deviceDocument(context, device)
            documents.append(document)
            cells.append(_lsCells(document, device, now))
        if options.json:
            return _jsonDocument(documents)
        return CommandResult(
            stdout=_table(
                cells, ["name", "online", "last_seen", "owner", "tags", "transport", "version"]
            )
        )

    return run


@command(
    "show",
    "one device in detail: state, online, last link and certificate, owner, tags, groups",
)
def _show(parser: _Parser) -> Handler:
    parser.add_argument("device")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.device)
        detail = await _deviceDetail(context, name)
        if detail is None:
            # A device an operator may not reach reads as one that does not exist (as in ls).
            return CommandResult(stderr=f"show: no device named {name!r}\n", status=1)
        if options.json:
            return _jsonDocument(detailJSON(detail))
        return CommandResult(stdout=detailText(detail))

    return run


async def _deviceDetail(context: ControlContext, name: str) -> DeviceDetail | None:
    """
    What C{show} may tell the caller about device C{name}, or None if nothing: admins see
    any device and the requests for its name and the grants that cover it; operators only an
    approved device they may reach, the rule C{ls} applies.
    """
    store, now, isAdmin = context.store, context.clock.seconds(), context.account.isAdmin
    device = await store.deviceByName(name)
    if not isAdmin and (
        device is None
        or device.state != "approved"
        or not await store.mayReach(context.account, name, now)
    ):
        return None
    requests = requestsFor(await store.listEnrollmentRequests(), name) if isAdmin else ()
    if device is None and not requests:
        return None
    grants = None
    if isAdmin and device is not None:
        grants = grantsCovering(await store.listGrants(), device, now)
    return DeviceDetail(
        name,
        now=now,
        device=device,
        lastLink=None if device is None else await store.lastLink(name),
        requests=requests,
        linksKnown=True,
        online=liveLink(context.registry.lookup(name)),
        grants=grants,
    )


@command("pending", "devices waiting for approval", adminOnly=True)
def _pending(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        requests = await context.store.listEnrollmentRequests()
        # Only the device of a re-key or a re-approval is looked up (a few, not the fleet):
        # serial_matches compares the request's serial with the device's.
        devices = {
            r.requestedName: await context.store.deviceByName(r.requestedName)
            for r in requests
            if r.kind in ("rekey", "reapprove")
        }
        documents = [
            {
                **requestJSON(r, devices.get(r.requestedName)),
                "connected": context.registry.pendingFor(r.fingerprint) is not None,
            }
            for r in requests
        ]
        if options.json:
            return _jsonDocument(documents)
        cells = [
            {
                **document,
                "last_seen": relativeTime(r.lastSeen, now),
                "connected": "yes" if document["connected"] else "no",
            }
            for document, r in zip(documents, requests, strict=True)
        ]
        return CommandResult(
            stdout=_table(
                cells,
                [
                    "name",
                    "kind",
                    "fingerprint",
                    "serial",
                    "serial_matches",
                    "source",
                    "last_seen",
                    "connected",
                ],
            )
        )

    return run


@command(
    "approve",
    "approve a pending device (an approved device's new key only with --key SHA256:...)",
    adminOnly=True,
)
def _approve(parser: _Parser) -> Handler:
    parser.add_argument("name")
    parser.add_argument(
        "--key",
        help="the fingerprint to approve: needed for a new key of an approved device, "
        "or when several ask for the name",
    )

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.name)
        now = context.clock.seconds()
        try:
            device = await context.store.approveDevice(
                name, context.actor, now, fingerprint=options.key
            )
        except RekeyNeedsKey as e:
            return CommandResult(stderr=f"approve: {rekeyRefusal(e, now)}\n", status=1)
        return _done(
            options,
            f"approved {device.name} ({device.fingerprint})",
            _deviceDocument(context, device),
        )

    return run


@command("revoke", "revoke a device: its link closes and it is refused from now on", adminOnly=True)
def _revoke(parser: _Parser) -> Handler:
    parser.add_argument("name")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.name)
        device = await context.store.revokeDevice(name, context.actor, context.clock.seconds())
        context.registry.drop(name, "device revoked")
        return _done(options, f"revoked {name}", _deviceDocument(context, device))

    return run


@command(
    "grant",
    "let an account reach a device, group:NAME or tag:NAME [--for 8h] [--as LOGIN]",
    adminOnly=True,
)
def _grant(parser: _Parser) -> Handler:
    parser.add_argument("user")
    parser.add_argument("selector", help="NAME (a device), device:NAME, group:NAME or tag:NAME")
    parser.add_argument("--for", dest="duration", help="expire after e.g. 8h, 7d")
    parser.add_argument(
        "--as", dest="loginUser", help="the user sessions run as on the device (agent as root)"
    )
    parser.add_argument(
        "--agent-forwarding",
        action="store_true",
        help="let the user forward their ssh-agent (ssh -A; the server must permit it too)",
    )

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        expiresAt = None
        if options.duration:
            try:
                expiresAt = now + parseDuration(options.duration)
            except ValueError as e:
                raise UsageError(str(e)) from None
        selector = _selector(options.selector)
        grant = await context.store.grant(
            options.user,
            selector,
            context.actor,
            now,
            expiresAt=expiresAt,
            loginUser=options.loginUser,
            agentForwarding=options.agent_forwarding,
        )
        return _done(options, grantedText(grant, now), grantJSON(grant, now))

    return run


@command("ungrant", "take a grant away: ungrant USER SELECTOR", adminOnly=True)
def _ungrant(parser: _Parser) -> Handler:
    parser.add_argument("user")
    parser.add_argument("selector", help="NAME (a device), device:NAME, group:NAME or tag:NAME")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        selector = _selector(options.selector)
        removed = await context.store.ungrant(
            options.user, selector, context.actor, context.clock.seconds()
        )
        text = ungrantedText(options.user, selector, removed)
        if not removed:
            return CommandResult(stderr=f"ungrant: {text}\n", status=1)
        return _done(options, text, ungrantJSON(options.user, selector))

    return run


@command("grants", "grants: all of them (admins, optionally of one USER) or your own")
def _grants(parser: _Parser) -> Handler:
    parser.add_argument("user", nargs="?")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        if context.account.isAdmin:
            account = options.user
        elif options.user not in (None, context.account.name):
            return CommandResult(stderr="grants: operators see only their own grants\n", status=1)
        else:
            account = context.account.name
        now = context.clock.seconds()
        grants = await context.store.listGrants(account)
        if not options.json:
            return CommandResult(stdout=grantsTable(grants, now))
        return _jsonDocument([grantJSON(g, now) for g in grants])

    return run


@command("tag", "show or change a device's tags: tag DEVICE +lab -old", adminOnly=True)
def _tag(parser: _Parser) -> Handler:
    parser.add_argument("device")
    # REMAINDER: "-old" is a change, not an option.
    parser.add_argument("changes", nargs=argparse.REMAINDER, help="+TAG to add, -TAG to remove")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        name = _deviceName(options.device)
        add, remove = [], []
        for change in options.changes:
            if change == "--json":
                options.json = True
            elif change[:1] == "+" and len(change) > 1:
                add.append(change[1:])
            elif change[:1] == "-" and len(change) > 1:
                remove.append(change[1:])
            else:
                raise UsageError(f"expected +TAG or -TAG, not {_clean(change)!r}")
        if add or remove:
            device = await context.store.tagDevice(
                name, add, remove, context.actor, context.clock.seconds()
            )
        else:
            found = await context.store.deviceByName(name)
            if found is None:
                return CommandResult(stderr=f"tag: no device named {name!r}\n", status=1)
            device = found
        return _done(options, tagsText(device), _deviceDocument(context, device))

    return run


@command(
    "group",
    "device groups: group list | group add NAME DEVICE... | group remove NAME [DEVICE...]",
    adminOnly=True,
)
def _group(parser: _Parser) -> Handler:
    parser.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    parser.add_argument("group", nargs="?")
    parser.add_argument("devices", nargs="*")

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        if options.action == "list":
            groups = await context.store.listGroups()
            if options.group is not None:
                groups = {options.group: groups.get(options.group, [])}
            if options.json:
                return _jsonDocument([groupJSON(name, m) for name, m in groups.items()])
            rows = [{"group": name, "devices": " ".join(m)} for name, m in groups.items()]
            return CommandResult(stdout=_table(rows, ["group", "devices"]))
        if options.group is None:
            raise UsageError(f"group {options.action} needs a group name")
        devices = [_deviceName(d) for d in options.devices]
        if options.action == "add":
            if not devices:
                raise UsageError("group add NAME DEVICE...: name at least one device")
            members = await context.store.addToGroup(options.group, devices, context.actor, now)
            return _done(
                options,
                f"group {options.group}: {' '.join(members)}",
                groupJSON(options.group, members),
            )
        removed = await context.store.removeFromGroup(options.group, devices, context.actor, now)
        if not removed:
            what = " ".join(devices) if devices else "no devices"
            return CommandResult(
                stderr=f"group: {options.group} has {what}; nothing removed\n", status=1
            )
        return _done(
            options,
            f"removed {' '.join(removed)} from group {options.group}",
            groupRemovalJSON(options.group, removed),
        )

    return run


@command("users", "accounts and their roles", adminOnly=True)
def _users(parser: _Parser) -> Handler:
    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        rows = [accountJSON(a) for a in await context.store.listAccounts()]
        return _output(options, rows, ["name", "role"])

    return run


@command(
    "claim",
    "claim a device by the pairing code it shows, for a period; "
    "claim renew DEVICE [--for 7d] | claim release DEVICE (its owner, or an admin)",
)
def _claim(parser: _Parser) -> Handler:
    parser.add_argument(
        "code", help="the code 'tunnel-agent pair' prints on the device, or renew or release"
    )
    parser.add_argument("device", nargs="?", help="with renew or release: the claimed device")
    parser.add_argument(
        "--for", dest="duration", default="7d", help="lease from now, e.g. 8h, 7d (7d)"
    )

    async def run(context: ControlContext, options: argparse.Namespace) -> CommandResult:
        now = context.clock.seconds()
        action = options.code
        if action in _LEASE_ACTIONS:
            if options.device is None:
                raise UsageError(f"claim {action} DEVICE: name the claimed device")
            name = _deviceName(options.device)
            await _leaseVisible(context, name, now)
            if action == "release":
                device = await context.store.releaseLease(name, context.account, now)
                return _done(
                    options,
                    f"released {name}: its lease ended now; only grants reach it from now on",
                    _deviceDocument(context, device),
                )
            until = now + _lease(options.duration)
            device = await context.store.renewLease(name, context.account, until, now)
            return _done(
                options,
                f"renewed {name}: {device.owner}'s until {whenText(until, now)}",
                _deviceDocument(context, device),
            )
        if options.device is not None:
            raise UsageError("claim CODE takes no device name (claim renew|release DEVICE does)")
        until = now + _lease(options.duration)
        elapsed = elapsedClock(context.clock)()  # a rate: a clock step must not owe codes
        wait = claimWait(context.registry, context.actor, elapsed)
        if wait:
            return CommandResult(
                stderr="claim: too many wrong pairing codes; try again "
                f"{relativeTime(now + wait, now)}\n",
                status=1,
            )
        try:
            device = await context.store.claimDevice(
                hashSecret(normaliseCode(options.code)), context.account, until, now
            )
        except (ClaimCodeInvalid, ClaimCodeExpired):
            wrongCode(context.registry, context.actor, elapsed)
            raise
        return _done(
            options,
            f"claimed {device.name}: yours until {whenText(until, now)}; "
            f"ssh dev_{device.name}@ to reach it",
            _deviceDocument(context, device),
        )

    return run


#: Words after C{claim} that act on a claimed device's lease (never a code: those are 8
#: letters and digits).
_LEASE_ACTIONS = ("renew", "release")


async def _leaseVisible(context: ControlContext, name: str, now: float) -> None:
    """
    Refuse a lease change on C{name} in the same words as for a device that does not
    exist, unless the caller may know of it: an admin, the lease's owner (until the fleet
    watcher clears a lapsed lease), or an account that may reach the device. The store's
    own refusals ("claimed by carol, not by you") would otherwise tell anyone which names
    exist and who holds them, which C{ls} and C{show} hide.
    """
    account = context.account
    if account.isAdmin:
        return
    device = await context.store.deviceByName(name)
    if device is not None and (
        device.owner == account.name or await context.store.mayReach(account, name, now)
    ):
        return
    raise UnknownDevice(f"unknown device {name!r}, or you hold no claim on it or grant for it")


def _lease(duration: str) -> float:
    try:
        return parseDuration(duration)
    except ValueError as e:
        raise UsageError(str(e)) from None


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
                return _jsonDocument(newTokenJSON(record, token, now))
            return CommandResult(stdout=f"{token}\n", stderr=tokenCreatedText(record, now) + "\n")
        tokens = await context.store.listTokens()
        if not options.json:
            return CommandResult(stdout=tokensTable(tokens, now))
        return _jsonDocument([tokenJSON(t, now) for t in tokens])

    return run
