"""
``twistd groundcontrol``: options and service assembly.

Options are unpacked into a L{ServerConfig} here and never reach domain code;
L{buildService} is what tests call.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import endpoints
from twisted.python import usage

from accesstunnel.addresses import AddressError, serverEndpointString
from accesstunnel.durations import parseDuration
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL
from groundcontrol.datadir import DataDir, HostKeyError, NotInitialised
from groundcontrol.enrollment import CertificatePolicy
from groundcontrol.fleetwatch import FleetWatcher
from groundcontrol.listening import ListenService, listenAll
from groundcontrol.notify import makeNotifier
from groundcontrol.pki import CAError
from groundcontrol.router import SessionPolicy
from groundcontrol.sshserver import ServerSettings, buildFrontDoor
from groundcontrol.store import IStore, PendingLimits, openStoreBlocking, threadRunner

DEFAULT_LISTEN = "tcp:2222:interface=127.0.0.1"


@attrs.frozen
class ServerConfig:
    """Everything groundcontrol needs to start, independent of the command line."""

    dataDir: DataDir
    listen: tuple[str, ...]
    settings: ServerSettings
    certificateLifetime: float = 30 * 86400.0
    webhook: str | None = None
    store: str | None = None


class Options(usage.Options):
    """Command line of ``twistd groundcontrol``."""

    synopsis = "--data DIR [--listen ADDRESS ...]"
    optParameters = [
        ["data", "d", None, "Data directory made by 'groundcontrol --data DIR init'."],
        ["login-grace-time", None, 30.0, "Seconds a client has to log in.", float],
        ["max-auth-tries", None, 6, "Authentication attempts per connection.", int],
        ["keepalive-interval", None, DEFAULT_INTERVAL, "Seconds of silence before a ping.", float],
        [
            "keepalive-count",
            None,
            DEFAULT_COUNT,
            "Unanswered intervals before a peer is dead.",
            int,
        ],
        ["certificate-lifetime", None, "30d", "Lifetime of device certificates (e.g. 30d)."],
        ["max-pending", None, 100, "Devices that may wait for approval at once.", int],
        ["max-pending-per-host", None, 10, "New pending devices per source host per hour.", int],
        ["webhook", None, None, "URL to POST fleet events to (JSON), retried with backoff."],
        ["max-sessions", None, 10, "Channels per operator connection (like MaxSessions).", int],
        ["max-channels-per-device", None, 1000, "Channels one device link may carry.", int],
        ["store", None, None, "Store URL: postgresql://... for several nodes (default: SQLite)."],
    ]

    optFlags = [
        ["permit-agent-forwarding", None, "Let operators forward their ssh-agent (-A)."],
        ["no-remote-forwarding", None, "Refuse ssh -R."],
        ["no-port-forwarding", None, "Refuse ssh -L, -D and ProxyJump."],
        ["no-x11-forwarding", None, "Refuse ssh -X."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, address: str) -> None:
        """Address to serve operators and agents on (repeatable), e.g.
        tcp:2222:interface=127.0.0.1 or ssh://0.0.0.0:22"""
        try:
            self["listen"].append(serverEndpointString(address))
        except AddressError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if not self["data"]:
            raise usage.UsageError("--data DIR is required")
        if self["keepalive-interval"] <= 0 or self["keepalive-count"] < 1:
            raise usage.UsageError("keepalive interval must be > 0 and count >= 1")
        if self["max-auth-tries"] < 1:
            raise usage.UsageError("--max-auth-tries must be at least 1")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["certificate-lifetime"] = float(parseDuration(self["certificate-lifetime"]))
        except ValueError as e:
            raise usage.UsageError(f"--certificate-lifetime: {e}") from None
        if self["max-sessions"] < 1 or self["max-channels-per-device"] < 1:
            raise usage.UsageError("session caps must be at least 1")
        if self["max-pending"] < 0 or self["max-pending-per-host"] < 0:
            raise usage.UsageError("pending caps cannot be negative")

    def toConfig(self) -> ServerConfig:
        return ServerConfig(
            dataDir=DataDir(self["data"]),
            listen=tuple(self["listen"]),
            settings=ServerSettings(
                loginGraceTime=self["login-grace-time"],
                maxAuthAttempts=self["max-auth-tries"],
                keepaliveInterval=self["keepalive-interval"],
                keepaliveCount=self["keepalive-count"],
                pendingLimits=PendingLimits(
                    total=self["max-pending"], perHost=self["max-pending-per-host"]
                ),
                sessions=SessionPolicy(
                    maxSessionsPerConnection=self["max-sessions"],
                    maxChannelsPerLink=self["max-channels-per-device"],
                    permitLocalForwarding=not self["no-port-forwarding"],
                    permitRemoteForwarding=not self["no-remote-forwarding"],
                    permitAgentForwarding=bool(self["permit-agent-forwarding"]),
                    permitX11Forwarding=not self["no-x11-forwarding"],
                ),
            ),
            certificateLifetime=self["certificate-lifetime"],
            webhook=self["webhook"],
            store=self["store"],
        )


def openStore(config: ServerConfig, reactor: Any) -> IStore:
    """
    Open and migrate the store now (start-up may block, and should fail fast
    with the real error), then serve every call from a thread.
    """
    url = config.store or str(config.dataDir.databasePath)
    try:
        return openStoreBlocking(url, threadRunner(reactor))
    except Exception as e:
        raise usage.UsageError(f"cannot open the store {_redacted(url)}: {e}") from None


def _redacted(url: str) -> str:
    """A store URL fit for a log line: no password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def buildService(
    config: ServerConfig, reactor: Any, store: IStore | None = None
) -> service.MultiService:
    """Assemble groundcontrol: front door on every listen address, fleet watcher."""
    if not config.dataDir.isInitialised():
        raise usage.UsageError(
            f"{config.dataDir.path} is not initialised: run 'groundcontrol --data "
            f"{config.dataDir.path} init' first"
        )
    try:
        (hostKey,) = config.dataDir.loadHostKeys().values()
    except (NotInitialised, HostKeyError) as e:
        raise usage.UsageError(str(e)) from None
    try:
        certificates = CertificatePolicy(
            config.dataDir.loadFleetCA(), timedelta(seconds=config.certificateLifetime)
        )
    except CAError as e:
        raise usage.UsageError(f"fleet CA: {e}") from None
    if store is None:
        store = openStore(config, reactor)
    factory, registry = buildFrontDoor(
        store, hostKey, reactor, config.settings, certificates=certificates
    )
    notifier = makeNotifier(reactor, config.webhook)
    top = service.MultiService()
    listeners = [
        ListenService(endpoints.serverFromString(reactor, address), factory, address)
        for address in config.listen
    ]
    listenAll(top, config.dataDir.path / "run", listeners)
    FleetWatcher(store, registry, reactor, notifier=notifier).setServiceParent(top)
    top.registry = registry  # type: ignore[attr-defined]
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    try:
        return buildService(options.toConfig(), reactor)
    except usage.UsageError as e:
        # A setup problem, not a bug: one clear line, no traceback.
        raise SystemExit(f"groundcontrol: {e}") from None
