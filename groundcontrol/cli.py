"""The ``groundcontrol`` admin command: set up a data directory and edit the store offline.

It talks to the same store as the running server: the data directory's SQLite file (WAL +
busy timeout make that safe) or, with C{--store postgresql://...}, the PostgreSQL database
the nodes share; the servers notice approvals and revocations through the audit feed.
Errors are one line on stderr: exit status 2 for a malformed command line, 1 for a
well-formed request that cannot be done.
"""

from __future__ import annotations

import argparse
import getpass
import re
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from twisted.conch.ssh import keys
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from accesstunnel.durations import parseDuration
from accesstunnel.keys import fingerprint
from accesstunnel.names import isValidDeviceName
from accesstunnel.timetext import absoluteTime, relativeTime
from groundcontrol.accesslists import (
    grantedText,
    grantsTable,
    table,
    tokenCreatedText,
    tokensTable,
    ungrantedText,
)
from groundcontrol.auditlog import addAuditOptions, auditDocuments, auditTable, recentAudit
from groundcontrol.datadir import DataDir, HostKeyError, NotInitialised
from groundcontrol.devicedetail import (
    DeviceDetail,
    clean,
    detailJSON,
    detailText,
    grantsCovering,
    pendingState,
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
    rejectedRequestJSON,
    requestJSON,
    serialMatches,
    storeCompactJSON,
    tokenJSON,
    ungrantJSON,
)
from groundcontrol.kexfilter import addKexFilter, withKex
from groundcontrol.rekeyreview import refusalText, rekeyRefusal
from groundcontrol.store import (
    AmbiguousRequest,
    Device,
    EnrollmentRequest,
    InvalidName,
    RekeyNeedsKey,
    SQLStore,
    StoreError,
    compactSQLite,
    databaseErrors,
    hashSecret,
    openStore,
    parseSelector,
    sqlitePath,
    storeKind,
    synchronousRunner,
)

__all__ = ["main"]

_T = TypeVar("_T")
#: What --help says first; not the module docstring, which python -OO (PYTHONOPTIMIZE=2, as
#: the systemd units may run) strips, and which carries epytext markup.
DESCRIPTION = "groundcontrol: set up a data directory and edit the store offline."
_FINGERPRINT_RE = re.compile(r"\ASHA256:[A-Za-z0-9+/]{43}\Z")


class _UsageError(Exception):
    """The command line is malformed (exit status 2)."""


class _CommandError(Exception):
    """The command is well formed but cannot be carried out (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so main() owns the exit status."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message}\n{self.format_usage().strip()}")


def _buildParser() -> _Parser:
    parser = _Parser(prog="groundcontrol", description=DESCRIPTION)
    parser.add_argument("--data", required=True, metavar="DIR", help="the data directory")
    parser.add_argument(
        "--store",
        metavar="URL",
        help="the store, if not the data directory's SQLite file: postgresql://... "
        "(shared by several nodes) or sqlite:///PATH",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("init", help="create the host key and the store (idempotent)")
    commands.add_parser("server-key", help="print the host public key line agents pin")

    user = commands.add_parser("user", help="operator accounts").add_subparsers(
        dest="userCommand", required=True, parser_class=_Parser
    )
    userAdd = user.add_parser("add", help="add an operator account")
    userAdd.add_argument("name")
    userAdd.add_argument(
        "--key", required=True, action="append", metavar="FILE", help="public key file"
    )
    userAdd.add_argument("--admin", action="store_true", help="may reach and manage everything")
    _jsonFlag(userAdd)
    user.add_parser("list", help="list operator accounts").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )

    device = commands.add_parser("device", help="devices and enrollment").add_subparsers(
        dest="deviceCommand", required=True, parser_class=_Parser
    )
    deviceList = device.add_parser(
        "list", help="devices and pending requests (with --kex: only the devices of that kind)"
    )
    deviceList.add_argument("--json", action="store_true", help="machine-readable output")
    addKexFilter(deviceList)
    show = device.add_parser(
        "show", help="one device in detail: how it last linked, and with which certificate"
    )
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    approve = device.add_parser(
        "approve",
        help="approve a pending request or revoked device (an approved device's new key "
        "only with --key)",
    )
    approve.add_argument("name")
    approve.add_argument(
        "--key",
        metavar="FINGERPRINT",
        help="which request: needed for an approved device's new key, or when several ask for NAME",
    )
    _jsonFlag(approve)
    reject = device.add_parser(
        "reject", help="turn a pending request away (its agent may ask again)"
    )
    reject.add_argument("name")
    reject.add_argument(
        "--key", metavar="FINGERPRINT", help="which request, when several ask for NAME"
    )
    _jsonFlag(reject)
    revoke = device.add_parser("revoke", help="make a device unreachable")
    revoke.add_argument("name")
    _jsonFlag(revoke)

    grant = commands.add_parser(
        "grant", help="let an operator reach a device, a group:NAME or a tag:NAME"
    )
    grant.add_argument("user")
    grant.add_argument("selector", help="NAME (a device), device:NAME, group:NAME or tag:NAME")
    expiry = grant.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", type=float, metavar="SECONDS", help="the grant lapses after this long"
    )
    expiry.add_argument(
        "--for", dest="duration", type=_duration, metavar="DURATION", help="e.g. 8h, 7d"
    )
    grant.add_argument(
        "--as",
        dest="loginUser",
        metavar="LOGIN",
        help="the user sessions run as on the device (when the agent runs as root)",
    )
    grant.add_argument(
        "--agent-forwarding",
        action="store_true",
        help="let the user forward their ssh-agent (ssh -A; the server must permit it too)",
    )
    _jsonFlag(grant)
    ungrant = commands.add_parser("ungrant", help="remove an operator's grant")
    ungrant.add_argument("user")
    ungrant.add_argument("selector", help="NAME (a device), device:NAME, group:NAME or tag:NAME")
    _jsonFlag(ungrant)
    grants = commands.add_parser("grants", help="list grants")
    grants.add_argument("user", nargs="?", help="only this operator's")
    grants.add_argument("--json", action="store_true", help="machine-readable output")

    tag = commands.add_parser("tag", help="show or change a device's tags: tag DEVICE +lab -old")
    tag.add_argument("device")
    tag.add_argument("changes", nargs=argparse.REMAINDER, help="+TAG to add, -TAG to remove")
    _jsonFlag(tag)

    group = commands.add_parser("group", help="device groups").add_subparsers(
        dest="groupCommand", required=True, parser_class=_Parser
    )
    groupAdd = group.add_parser("add", help="put devices into a group (creating it)")
    groupAdd.add_argument("group")
    groupAdd.add_argument("devices", nargs="+", metavar="DEVICE")
    _jsonFlag(groupAdd)
    groupRemove = group.add_parser(
        "remove", help="take devices out of a group; with no devices, remove the group"
    )
    groupRemove.add_argument("group")
    groupRemove.add_argument("devices", nargs="*", metavar="DEVICE")
    _jsonFlag(groupRemove)
    groupList = group.add_parser("list", help="groups and their devices")
    groupList.add_argument("--json", action="store_true", help="machine-readable output")

    token = commands.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="tokenCommand", required=True, parser_class=_Parser
    )
    tokenCreate = token.add_parser(
        "create", help="make a token agents enroll with (--token); printed once"
    )
    tokenCreate.add_argument(
        "--uses", type=_positiveInt, default=1, metavar="N", help="devices it may enroll"
    )
    tokenCreate.add_argument(
        "--expires",
        type=_duration,
        default="1d",
        metavar="DURATION",
        help="lifetime, e.g. 30m, 8h, 1d, 7d (default 1d)",
    )
    _jsonFlag(tokenCreate)
    tokenList = token.add_parser("list", help="tokens with their uses left and expiry")
    tokenList.add_argument("--json", action="store_true", help="machine-readable output")

    audit = commands.add_parser(
        "audit", help="the audit log, oldest first: the latest events, or those after an id"
    )
    addAuditOptions(audit)
    audit.add_argument("--json", action="store_true", help="machine-readable output")

    store = commands.add_parser("store", help="the store itself").add_subparsers(
        dest="storeCommand", required=True, parser_class=_Parser
    )
    compact = store.add_parser(
        "compact",
        help="give the SQLite store's free space back to the disk (with groundcontrol "
        "stopped); from then on pruning gives it back as it goes",
    )
    _jsonFlag(compact)
    return parser


def _jsonFlag(parser: argparse.ArgumentParser) -> None:
    """A change command's --json: print the changed object's document, as the shell's does."""
    parser.add_argument("--json", action="store_true", help="print what changed as a JSON document")


def _printDone(asJSON: bool, text: str, document: Any) -> None:
    """
    What a command that changed something prints: a line, or with --json the document of
    what it changed (L{groundcontrol.documents}), as the control shell's same command does.
    """
    print(jsonText(document) if asJSON else text + "\n", end="")


def _positiveInt(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _duration(text: str) -> int:
    try:
        return parseDuration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None, *, now: Callable[[], float] = time.time) -> int:
    """
    Run the command line C{argv} (default: C{sys.argv[1:]}); return the exit status.

    @param now: the clock, injectable so tests get predictable timestamps.
    """
    try:
        args = _buildParser().parse_args(argv)
        return _dispatch(args, now)
    except _UsageError as e:
        print(f"groundcontrol: error: {e}", file=sys.stderr)
        return 2
    except _CommandError as e:
        print(f"groundcontrol: error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


def _dispatch(args: argparse.Namespace, now: Callable[[], float]) -> int:
    dataDir = DataDir(args.data)
    if args.store is not None:
        try:
            storeKind(args.store)
        except StoreError as e:
            raise _UsageError(str(e)) from None
    if args.command == "init":
        return _init(dataDir, args.store)
    if args.command == "server-key":
        print(_call(dataDir.hostPublicKeyLine))
        return 0
    if args.command == "store":
        return _compactStore(dataDir, args.store, args.json)
    if args.command == "device":
        _checkDeviceNameArg(getattr(args, "name", None))
    if args.command in ("grant", "ungrant"):
        try:
            args.selector = parseSelector(args.selector)
        except InvalidName as e:
            raise _UsageError(str(e)) from None
    if args.command == "tag":
        _checkDeviceNameArg(args.device)
        # REMAINDER keeps a --json after the changes among them; read it as the shell's tag does.
        args.json = args.json or "--json" in args.changes
        args.add, args.remove = _tagChanges([c for c in args.changes if c != "--json"])
    if args.command == "group":
        for name in args.devices if args.groupCommand != "list" else ():
            _checkDeviceNameArg(name)
    approveKey = getattr(args, "key", None) if args.command == "device" else None
    if approveKey is not None and not _FINGERPRINT_RE.match(approveKey):
        raise _UsageError(f"--key must be a fingerprint like SHA256:..., not {args.key!r}")

    store = _openStore(dataDir, args.store)
    try:
        return _storeCommand(store, args, now)
    finally:
        _result(store.close())


def _storeCommand(store: SQLStore, args: argparse.Namespace, now: Callable[[], float]) -> int:
    actor = _actor()
    if args.command == "user":
        if args.userCommand == "add":
            publicKeys = [_readPublicKey(path) for path in args.key]
            account = _result(store.addAccount(args.name, publicKeys, args.admin, now()))
            role = "admin" if account.isAdmin else "operator"
            text = f"added {role} {account.name} with {len(publicKeys)} key(s)"
            _printDone(args.json, text, accountJSON(account))
        else:
            accounts = [accountJSON(a) for a in _result(store.listAccounts())]
            if args.json:
                print(jsonText(accounts), end="")
            else:  # NAME<tab>ROLE lines: scripts/demo cuts the names out
                print("".join(f"{a['name']}\t{a['role']}\n" for a in accounts), end="")
    elif args.command == "device":
        if args.deviceCommand == "list":
            _listDevices(store, args.json, now(), args.kex)
        elif args.deviceCommand == "show":
            _showDevice(store, args.name, args.json, now())
        elif args.deviceCommand == "approve":
            device = _approveDevice(store, args, actor, now())
            text = f"approved {device.name} ({device.fingerprint})"
            _printDone(args.json, text, deviceJSON(device))
        elif args.deviceCommand == "reject":
            request = _result(store.rejectRequest(args.name, actor, now(), fingerprint=args.key))
            text = f"rejected the request for {args.name} ({request.fingerprint})"
            _printDone(args.json, text, rejectedRequestJSON(request))
        else:
            device = _result(store.revokeDevice(args.name, actor, now()))
            _printDone(args.json, f"revoked {device.name}", deviceJSON(device))
    elif args.command == "grant":
        t = now()
        lifetime = args.expires_in if args.expires_in is not None else args.duration
        expiresAt = None if lifetime is None else t + lifetime
        grant = _result(
            store.grant(
                args.user,
                args.selector,
                actor,
                t,
                expiresAt=expiresAt,
                loginUser=args.loginUser,
                agentForwarding=args.agent_forwarding,
            )
        )
        _printDone(args.json, grantedText(grant, t), grantJSON(grant, t))
    elif args.command == "ungrant":
        removed = _result(store.ungrant(args.user, args.selector, actor, now()))
        if not removed:
            raise _CommandError(ungrantedText(args.user, args.selector, removed))
        text = ungrantedText(args.user, args.selector, removed)
        _printDone(args.json, text, ungrantJSON(args.user, args.selector))
    elif args.command == "grants":
        _listGrants(store, args.user, args.json, now())
    elif args.command == "tag":
        if args.add or args.remove:
            device = _result(store.tagDevice(args.device, args.add, args.remove, actor, now()))
        else:
            found = _result(store.deviceByName(args.device))
            if found is None:
                raise _CommandError(f"no device named {args.device!r}")
            device = found
        _printDone(args.json, tagsText(device), deviceJSON(device))
    elif args.command == "group":
        _groupCommand(store, args, actor, now())
    elif args.command == "token":
        if args.tokenCommand == "create":
            _createToken(store, args.uses, args.expires, actor, now(), args.json)
        else:
            _listTokens(store, args.json, now())
    elif args.command == "audit":
        events = _result(Deferred.fromCoroutine(recentAudit(store, args.limit, args.after)))
        print(jsonText(auditDocuments(events)) if args.json else auditTable(events), end="")
    return 0


def _tagChanges(changes: list[str]) -> tuple[list[str], list[str]]:
    add, remove = [], []
    for change in changes:
        if change[:1] == "+" and len(change) > 1:
            add.append(change[1:])
        elif change[:1] == "-" and len(change) > 1:
            remove.append(change[1:])
        else:
            raise _UsageError(f"expected +TAG or -TAG, not {clean(change)!r}")
    return add, remove


def _listGrants(store: SQLStore, user: str | None, asJSON: bool, t: float) -> None:
    grants = _result(store.listGrants(user))
    if not asJSON:
        print(grantsTable(grants, t), end="")
        return
    print(jsonText([grantJSON(g, t) for g in grants]), end="")


def _groupCommand(store: SQLStore, args: argparse.Namespace, actor: str, t: float) -> None:
    if args.groupCommand == "add":
        members = _result(store.addToGroup(args.group, args.devices, actor, t))
        text = f"group {args.group}: {' '.join(members)}"
        _printDone(args.json, text, groupJSON(args.group, members))
    elif args.groupCommand == "remove":
        removed = _result(store.removeFromGroup(args.group, args.devices, actor, t))
        if not removed:
            raise _CommandError(f"group {args.group} has none of those devices; nothing removed")
        text = f"removed {' '.join(removed)} from group {args.group}"
        _printDone(args.json, text, groupRemovalJSON(args.group, removed))
    else:
        groups = _result(store.listGroups())
        if args.json:
            print(jsonText([groupJSON(g, m) for g, m in groups.items()]), end="")
            return
        _printTable(("GROUP", "DEVICES"), [(g, " ".join(m)) for g, m in groups.items()])


def _createToken(
    store: SQLStore, uses: int, lifetime: int, actor: str, t: float, asJSON: bool
) -> None:
    """
    Make a token: 32 random bytes, URL-safe base64. Only its hash is stored, so this is the
    one time it is shown: the token alone goes to stdout (for scripts), the rest to stderr;
    with --json, its record and the token as one document on stdout.
    """
    token = secrets.token_urlsafe(32)
    record = _result(store.createToken(hashSecret(token), uses, t + lifetime, actor, t))
    if asJSON:
        print(jsonText(newTokenJSON(record, token, t)), end="")
        return
    print(token)
    print(tokenCreatedText(record, t), file=sys.stderr)


def _listTokens(store: SQLStore, asJSON: bool, t: float) -> None:
    tokens = _result(store.listTokens())
    if not asJSON:
        print(tokensTable(tokens, t), end="")
        return
    print(jsonText([tokenJSON(r, t) for r in tokens]), end="")


def _init(dataDir: DataDir, storeURL: str | None) -> int:
    result = _call(lambda: dataDir.ensureInitialised(storeURL))
    if result.createdHostKey:
        print(f"created host key {dataDir.hostKeyPath}")
    else:
        print(f"kept existing host key {dataDir.hostKeyPath} (never overwritten)")
    store = dataDir.databasePath if storeURL is None else _redact(storeURL)
    print(f"store {store} at schema version {result.schemaVersion}")
    (key,) = _call(dataDir.loadHostKeys).values()
    print(f"server key fingerprint {fingerprint(key)}")
    return 0


def _compactStore(dataDir: DataDir, storeURL: str | None, asJSON: bool) -> int:
    """
    C{store compact}: rewrite the SQLite store without its free pages, alone (it refuses
    while groundcontrol or another command has the store open). PostgreSQL needs nothing.
    """
    if storeURL is not None and storeKind(storeURL) == "postgresql":
        text = (
            "the store is PostgreSQL: its autovacuum makes the space of deleted rows "
            "reusable; nothing to compact"
        )
        _printDone(asJSON, text, storeCompactJSON("postgresql", _redact(storeURL), None))
        return 0
    if storeURL is None:
        _requireInitialised(dataDir)
    path = str(dataDir.databasePath) if storeURL is None else sqlitePath(storeURL)
    done = _call(lambda: compactSQLite(path))
    text = (
        f"compacted {path}: {done.bytesBefore:,} bytes before, {done.bytesAfter:,} after, "
        f"{done.bytesGivenBack:,} given back; pruning (--audit-max-age) now gives space "
        "back as it goes"
    )
    _printDone(asJSON, text, storeCompactJSON("sqlite", path, done))
    return 0


def _approveDevice(store: SQLStore, args: argparse.Namespace, actor: str, now: float) -> Device:
    """
    C{device approve}; a re-key asked for by name alone is refused with what to compare
    and the commands to type, these options included (L{rekeyRefusal}).
    """
    d = store.approveDevice(args.name, actor, now, fingerprint=args.key)

    def refused(failure: Failure) -> NoReturn:
        failure.trap(RekeyNeedsKey)
        options = ["--data", args.data] + (["--store", args.store] if args.store else [])
        command = f"groundcontrol {shlex.join(options)} device "
        raise _CommandError(rekeyRefusal(failure.value, now, command))

    return _result(d.addErrback(refused))  # type: ignore[no-any-return]


def _listDevices(
    store: SQLStore, asJSON: bool, now: float, kexKinds: list[str] | None = None
) -> None:
    """
    The devices, then the pending requests: one list, as documents or as a table. With
    C{kexKinds} (C{--kex}) only the devices whose last link's key exchange is of one of
    those kinds, and no requests: a request has no link recorded.
    """
    allDevices = _result(store.listDevices())
    named = {d.name: d for d in allDevices}
    devices = withKex(allDevices, kexKinds)
    requests = [] if kexKinds is not None else _result(store.listEnrollmentRequests())
    if asJSON:
        rows = [deviceJSON(d) for d in devices]
        rows += [requestJSON(r, named.get(r.requestedName)) for r in requests]
        print(jsonText(rows), end="")
        return
    _printTable(
        (
            "NAME",
            "STATE",
            "FINGERPRINT",
            "SERIAL",
            "SERIAL_MATCHES",
            "LAST_SEEN",
            "SOURCE",
            "OWNER",
            "CERT_EXPIRES",
        ),
        [_deviceCells(d, now) for d in devices]
        + [_requestCells(r, named.get(r.requestedName), now) for r in requests],
    )


def _deviceCells(d: Device, now: float) -> tuple[str, ...]:
    owner = "-" if d.owner is None else f"{clean(d.owner)} until {absoluteTime(d.leaseUntil)}"
    return (
        clean(d.name),
        d.state,
        d.fingerprint,
        clean(d.serial or "-"),
        "-",
        relativeTime(d.lastSeen, now),
        "-",
        owner,
        absoluteTime(d.certificateExpiresAt),
    )


def _requestCells(r: EnrollmentRequest, device: Device | None, now: float) -> tuple[str, ...]:
    return (
        clean(r.requestedName),
        pendingState(r.kind),
        r.fingerprint,
        clean(r.serial or "-"),
        serialMatches(r, device) or "-",
        relativeTime(r.lastSeen, now),
        clean(r.source),
        "-",
        "-",
    )


def _showDevice(store: SQLStore, name: str, asJSON: bool, now: float) -> None:
    """
    One device's record, with how its latest link authenticated, its last certificate, the
    requests for its name and the grants that cover it (the control shell's C{show}, less
    the live link: the CLI has no registry).
    """
    d = _result(store.deviceByName(name))
    link = _result(store.lastLink(name))
    if d is None or link is None:
        raise _CommandError(f"no device named {name!r} (pending requests: device list)")
    requests = _result(store.listEnrollmentRequests())
    grants = _result(store.listGrants())
    detail = DeviceDetail(
        name,
        now=now,
        device=d,
        lastLink=link,
        requests=requestsFor(requests, name),
        grants=grantsCovering(grants, d, now),
    )
    if asJSON:
        print(jsonText(detailJSON(detail)), end="")
    else:
        print(detailText(detail), end="")


def _printTable(header: tuple[str, ...], body: list[tuple[str, ...]]) -> None:
    print(table(header, body), end="")


# -- helpers -----------------------------------------------------------------------


def _openStore(dataDir: DataDir, storeURL: str | None) -> SQLStore:
    """The data directory's SQLite store, or the one C{--store} names (migrated on open)."""
    if storeURL is not None:
        return _result(openStore(storeURL, synchronousRunner))
    _requireInitialised(dataDir)
    return _result(openStore(str(dataDir.databasePath), synchronousRunner))


def _requireInitialised(dataDir: DataDir) -> None:
    try:
        initialised = dataDir.isInitialised()
    except HostKeyError as e:
        raise _CommandError(str(e)) from None
    if not initialised:
        raise _CommandError(
            f"{dataDir.path} is not initialised; run: groundcontrol --data {dataDir.path} init"
        )


def _redact(url: str) -> str:
    """A store URL fit to print: any password in it replaced."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _result(d: Deferred[_T]) -> _T:
    """
    Unwrap a Deferred from the synchronous runner, turning store errors into command errors.
    """
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if not outcome:
        raise RuntimeError("the store answered asynchronously; the CLI needs synchronousRunner")
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(InvalidName):
            raise _UsageError(result.getErrorMessage())
        if result.check(AmbiguousRequest):
            # The keys side by side, one a line, as the control shell and the re-key
            # refusal print them (not run together on the line below).
            raise _CommandError(refusalText(result.value))
        if result.check(StoreError, OSError, NotInitialised, HostKeyError, *databaseErrors()):
            # One line, even for a driver's multi-line message (libpq's hints).
            lines = [line.strip() for line in result.getErrorMessage().splitlines()]
            raise _CommandError("; ".join(line for line in lines if line))
        result.raiseException()
    return result  # type: ignore[no-any-return]


def _call(f: Callable[[], _T]) -> _T:
    """Run a blocking data-directory operation with the same error mapping as the store."""
    return _result(synchronousRunner(f))


def _checkDeviceNameArg(name: str | None) -> None:
    if name is not None and not isValidDeviceName(name):
        raise _UsageError(
            f"invalid device name {clean(name)!r}: use a-z, 0-9 and '-', "
            "not starting with '-', at most 63 characters"
        )


def _readPublicKey(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024).strip()
    except OSError as e:
        raise _CommandError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        key = keys.Key.fromString(data)
    except (keys.BadKeyError, ValueError, IndexError) as e:
        raise _CommandError(
            f"{path} is not an SSH public key ({str(e) or 'unrecognised format'})"
        ) from None
    except keys.EncryptedKeyError:
        raise _CommandError(f"{path} is a private key; give the .pub file") from None
    if not key.isPublic():
        raise _CommandError(f"{path} is a private key; give the .pub file")
    return key.toString("OPENSSH").decode("ascii")


def _actor() -> str:
    """Who the audit log says did it: the local login name, prefixed to mark the CLI."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def run() -> None:
    """The console script: like a Unix tool, end quietly when the reader goes away
    (``groundcontrol ... device list --json | head``)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


if __name__ == "__main__":
    run()
