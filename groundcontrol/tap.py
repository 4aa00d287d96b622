"""
``twistd groundcontrol``: options and service assembly.

Options are unpacked into a L{ServerConfig} here and never reach domain code;
L{buildService} is what tests call.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
from twisted.application import service
from twisted.python import usage

from accesstunnel.addresses import AddressError, parseAddress, serverListener
from accesstunnel.durations import parseDuration
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL
from accesstunnel.logfilter import LogObserverService, useFilteredTwistdObserver
from accesstunnel.rekey import parseRekeyLimit
from accesstunnel.statefiles import removeStaleTemporaries
from accesstunnel.stepwatch import watchClockSteps
from accesstunnel.transports.limiter import (
    DEFAULT_MAX_WAITING,
    DEFAULT_MAX_WAITING_PER_SOURCE,
    HandshakeLimiter,
)
from accesstunnel.transports.tls import ServerTLS, TLSConfigError
from accesstunnel.transports.tor import TorSettings
from groundcontrol.cipherchoice import cpuHasAES
from groundcontrol.datadir import DataDir, HostKeyError, NotInitialised
from groundcontrol.devicewait import (
    ALIVE_FILE,
    DEFAULT_DEVICE_WAIT,
    DEFAULT_MAX_WAITERS,
    DEFAULT_MAX_WAITERS_PER_DEVICE,
    DEFAULT_SHARED_STORE_POLL,
    STOPPED_FILE,
    DeviceWaitPolicy,
    StopRecord,
)
from groundcontrol.enrollment import CertificatePolicy
from groundcontrol.feedhandover import FEED_HANDOVER_FILE
from groundcontrol.fleetturn import NotifierTurn
from groundcontrol.fleetwatch import DEFAULT_PENDING_EXPIRY, FleetWatcher
from groundcontrol.listening import LISTENING_FILE, ListenService, listenAll
from groundcontrol.logging import DEFAULT_LEVEL, LEVELS, parseLevel, setLevel
from groundcontrol.metrics import METRICS_FILE, Metrics, metricsService
from groundcontrol.notify import NotifierService, makeNotifier
from groundcontrol.pki import CA_CERTIFICATE_FILE, CA_KEY_FILE, CAError
from groundcontrol.preauth import (
    DEFAULT_EARLY_CLOSE_ALLOWANCE,
    DEFAULT_EARLY_CLOSE_RATE,
    DEFAULT_NOAUTH_ALLOWANCE,
    DEFAULT_NOAUTH_RATE,
    PenaltyPolicy,
    PreauthGuard,
    parseExemptNetwork,
)
from groundcontrol.recording import (
    RECORDINGS_DIRECTORY,
    Recorder,
    RecordingPolicy,
    parseSize,
    writerThread,
)
from groundcontrol.revocations import RevokedCertificates
from groundcontrol.router import SessionPolicy
from groundcontrol.sessions import SessionRegistry, SessionService, attachSessions
from groundcontrol.sshserver import ServerSettings, buildFrontDoor
from groundcontrol.store import (
    IStore,
    PendingLimits,
    StoreError,
    openStoreBlocking,
    storeKind,
    threadRunner,
)
from groundcontrol.stormgc import StormCollector

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
    tlsCertificate: str | None = None
    tlsKey: str | None = None
    torControl: str = "tcp:127.0.0.1:9051"
    onionKey: str | None = None
    maxHandshakes: int = 64
    maxHandshakesPerSource: int = 16
    maxHandshakesWaiting: int = DEFAULT_MAX_WAITING
    maxHandshakesWaitingPerSource: int = DEFAULT_MAX_WAITING_PER_SOURCE
    #: Handshake slots for operators only (None: a quarter of maxHandshakes; 0: no split).
    maxHandshakesOperators: int | None = None
    #: Per-source penalties: no-auth key exchange bound, networks never refused.
    penalties: PenaltyPolicy = attrs.field(factory=PenaltyPolicy)
    #: Session recording under DATA/recordings (see groundcontrol.recording).
    recordingFailOpen: bool = False
    recordingMaxAge: float | None = None
    recordingMaxBytes: int | None = None
    #: Endpoint of the Prometheus metrics listener, if any.
    metrics: str | None = None
    #: Seconds a pending request may go unseen before it is removed (None: never).
    pendingExpiry: float | None = DEFAULT_PENDING_EXPIRY
    #: Seconds audit rows, sessions and expired certificates are kept (None: forever).
    auditMaxAge: float | None = None


#: --help's text for the options a method handles. Twisted would take it from the method's
#: docstring, which python -OO (PYTHONOPTIMIZE=2, as the systemd units may run) strips.
HANDLED_OPTIONS_HELP = {
    "listen": "Address to serve operators and agents on (repeatable): ssh://HOST:PORT, "
    "tls://HOST:PORT, wss://HOST:PORT/PATH, ws://HOST:PORT/PATH, tor://:PORT, or an "
    "endpoint string such as tcp:2222:interface=127.0.0.1; an IPv6 HOST in brackets, "
    "ssh://[::]:22",
    "penalty-exempt": "A network the penalties never refuse (repeatable): a NAT, 198.51.100.0/24",
    "help": "Display this help and exit.",
    "version": "Display Twisted version and exit.",
}


class Options(usage.Options):
    """Command line of ``twistd groundcontrol``."""

    synopsis = "--data DIR [--listen ADDRESS ...]"
    optParameters = [
        ["data", "d", None, "Data directory made by 'groundcontrol --data DIR init'."],
        ["login-grace-time", None, 30.0, "Seconds a client has to log in.", float],
        ["max-auth-tries", None, 6, "Authentication attempts per connection.", int],
        [
            "keepalive-interval",
            None,
            DEFAULT_INTERVAL,
            "Seconds of silence before a ping to an operator; agents ping every other "
            "interval themselves and are asked only after longer silence. Either is "
            "dropped after interval x count seconds of silence.",
            float,
        ],
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
        [
            "pending-expiry",
            None,
            "7d",
            "Remove a pending request not seen for this long (e.g. 7d; 'never').",
        ],
        ["webhook", None, None, "URL to POST fleet events to (JSON), retried with backoff."],
        ["max-sessions", None, 10, "Channels per operator connection (like MaxSessions).", int],
        ["max-channels-per-device", None, 1000, "Channels one device link may carry.", int],
        [
            "device-wait",
            None,
            DEFAULT_DEVICE_WAIT,
            "Seconds a channel to an offline device seen recently waits for it to reconnect "
            "(0: refuse at once).",
            float,
        ],
        [
            "device-wait-recent",
            None,
            "5m",
            "Wait only for devices seen within this long (e.g. 5m), or seen within it before "
            "groundcontrol started, while it has run less than that.",
        ],
        [
            "max-device-waits",
            None,
            DEFAULT_MAX_WAITERS,
            "Channels that may wait for devices to reconnect, in all.",
            int,
        ],
        [
            "max-device-waits-per-device",
            None,
            DEFAULT_MAX_WAITERS_PER_DEVICE,
            "Of those, for one device.",
            int,
        ],
        ["store", None, None, "Store URL: postgresql://... for several nodes (default: SQLite)."],
        ["tls-cert", None, None, "PEM certificate (and chain) for tls:// and wss:// listeners."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["tor-control", None, "tcp:127.0.0.1:9051", "tor's control port, for tor:// listeners."],
        ["onion-key", None, None, "Onion service key file (default DATA/onion_key)."],
        ["max-handshakes", None, 64, "Connections that may be logging in at once.", int],
        ["max-handshakes-per-source", None, 16, "Of those, from one source address.", int],
        [
            "max-handshakes-waiting",
            None,
            DEFAULT_MAX_WAITING,
            "Connections held, unread, until a handshake slot frees (then the listeners pause).",
            int,
        ],
        [
            "max-handshakes-waiting-per-source",
            None,
            DEFAULT_MAX_WAITING_PER_SOURCE,
            "Of those, from one source address; beyond it they are closed at accept.",
            int,
        ],
        [
            "max-handshakes-operators",
            None,
            None,
            "Of --max-handshakes, slots kept for operators (clients that are not our agent, "
            "by their SSH version line); agents borrow idle ones, all but a quarter of them "
            "(at least 2) (default a quarter of --max-handshakes; 0: no reserve).",
            int,
        ],
        [
            "noauth-allowance",
            None,
            DEFAULT_NOAUTH_ALLOWANCE,
            "Key exchanges one source may have computed for connections that close without "
            "trying to log in (ssh-keyscan, ssh-audit) before it is refused...",
            int,
        ],
        [
            "noauth-rate",
            None,
            DEFAULT_NOAUTH_RATE,
            "...and how many more per second it may have after that (0: no bound).",
            float,
        ],
        [
            "early-close-allowance",
            None,
            DEFAULT_EARLY_CLOSE_ALLOWANCE,
            "Connections one source may close before any key exchange (a banner grab, a TCP "
            "health check: exempt a load balancer's checkers) before it is refused...",
            int,
        ],
        [
            "early-close-rate",
            None,
            DEFAULT_EARLY_CLOSE_RATE,
            "...and how many more per second it may close after that (0: no bound).",
            float,
        ],
        [
            "recording-failure",
            None,
            "closed",
            "closed: refuse or end a session whose "
            "recording fails; open: let it go on unrecorded (audited).",
        ],
        ["recording-max-age", None, None, "Delete recordings older than this (e.g. 90d)."],
        [
            "audit-max-age",
            None,
            "never",
            "Delete audit rows, sessions and expired certificates older than this "
            "(e.g. 365d, at least 1d; 'never'). Caps --recording-max-age.",
        ],
        ["recording-max-bytes", None, None, "Keep all recordings under this size (e.g. 10G)."],
        ["metrics", None, None, "Serve Prometheus metrics: tcp:9100:interface=127.0.0.1."],
        [
            "rekey-limit",
            None,
            "1G 1h",
            "Renew the session keys after SIZE bytes [and TIME] (like RekeyLimit; 'none').",
        ],
        [
            "operator-aes-gcm",
            None,
            "auto",
            "After an operator logs in, renew the keys with AES-GCM if the client lists it "
            "(OpenSSH does, last): yes, no, or auto (when this CPU has AES instructions).",
        ],
        [
            "log-level",
            None,
            DEFAULT_LEVEL,
            f"Lowest level of log events written ({', '.join(LEVELS)}); debug adds Conch's "
            "per-packet events.",
        ],
    ]

    optFlags = [
        ["permit-agent-forwarding", None, "Let operators forward their ssh-agent (-A)."],
        ["no-remote-forwarding", None, "Refuse ssh -R."],
        ["no-port-forwarding", None, "Refuse ssh -L, -D and ProxyJump."],
        ["no-x11-forwarding", None, "Refuse ssh -X."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.docs.update(HANDLED_OPTIONS_HELP)
        self["listen"] = []
        self["penalty-exempt"] = []

    def opt_listen(self, address: str) -> None:
        """One --listen (help: HANDLED_OPTIONS_HELP), checked now: a typo is a usage error."""
        try:
            parseAddress(address)
        except AddressError as e:
            raise usage.UsageError(str(e)) from None
        self["listen"].append(address)

    def opt_penalty_exempt(self, network: str) -> None:
        """One --penalty-exempt (help: HANDLED_OPTIONS_HELP), checked now."""
        try:
            self["penalty-exempt"].append(parseExemptNetwork(network))
        except ValueError as e:
            raise usage.UsageError(f"--penalty-exempt: {e}") from None

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
        needsTLS = any(a.split("://", 1)[0].lower() in ("tls", "wss") for a in self["listen"])
        if needsTLS and not (self["tls-cert"] and self["tls-key"]):
            raise usage.UsageError("tls:// and wss:// listeners need --tls-cert and --tls-key")
        if self["max-handshakes"] < 1 or self["max-handshakes-per-source"] < 1:
            raise usage.UsageError("handshake limits must be at least 1")
        if self["max-handshakes-waiting"] < 0 or self["max-handshakes-waiting-per-source"] < 0:
            raise usage.UsageError("handshake waiting limits cannot be negative")
        operators = self["max-handshakes-operators"]
        if operators is not None and not 0 <= operators < self["max-handshakes"]:
            raise usage.UsageError(
                "--max-handshakes-operators must be at least 0 and below --max-handshakes"
            )
        for bound in ("noauth", "early-close"):
            if self[f"{bound}-allowance"] < 1 or self[f"{bound}-rate"] < 0:
                raise usage.UsageError(
                    f"--{bound}-allowance must be at least 1 and --{bound}-rate at least 0"
                )
        if self["max-sessions"] < 1 or self["max-channels-per-device"] < 1:
            raise usage.UsageError("session caps must be at least 1")
        if not (math.isfinite(self["device-wait"]) and self["device-wait"] >= 0):
            # nan would pass a "< 0" test and put a timer the heap cannot order; inf holds
            # a channel for ever.
            raise usage.UsageError(
                "--device-wait takes a number of seconds, 0 or more (0: do not wait)"
            )
        try:
            self["device-wait-recent"] = float(parseDuration(self["device-wait-recent"]))
        except ValueError as e:
            raise usage.UsageError(f"--device-wait-recent: {e}") from None
        if self["max-device-waits"] < 1 or self["max-device-waits-per-device"] < 1:
            raise usage.UsageError("device wait caps must be at least 1")
        if self["max-pending"] < 0 or self["max-pending-per-host"] < 0:
            raise usage.UsageError("pending caps cannot be negative")
        self["pending-expiry"] = durationOrNever("pending-expiry", self["pending-expiry"])
        if self["recording-failure"] not in ("closed", "open"):
            raise usage.UsageError("--recording-failure is 'closed' or 'open'")
        try:
            if self["recording-max-age"]:
                self["recording-max-age"] = float(parseDuration(self["recording-max-age"]))
            if self["recording-max-bytes"]:
                self["recording-max-bytes"] = parseSize(self["recording-max-bytes"])
        except ValueError as e:
            raise usage.UsageError(f"recording retention: {e}") from None
        self["audit-max-age"] = durationOrNever("audit-max-age", self["audit-max-age"])
        if (self["audit-max-age"] or MIN_AUDIT_MAX_AGE) < MIN_AUDIT_MAX_AGE:
            raise usage.UsageError("--audit-max-age must be at least 1d (or 'never')")
        if self["audit-max-age"] is not None:
            # A recording is found through its session's audit rows (replay ID): it must
            # not outlive them.
            if (self["recording-max-age"] or 0) > self["audit-max-age"]:
                raise usage.UsageError("--recording-max-age cannot be longer than --audit-max-age")
            self["recording-max-age"] = self["recording-max-age"] or self["audit-max-age"]
        try:
            self["rekey-limit"] = parseRekeyLimit(self["rekey-limit"])
        except ValueError as e:
            raise usage.UsageError(f"--rekey-limit: {e}") from None
        choice = self["operator-aes-gcm"]
        if choice not in ("auto", "yes", "no"):
            raise usage.UsageError("--operator-aes-gcm is 'auto', 'yes' or 'no'")
        self["operator-aes-gcm"] = choice == "yes" or (choice == "auto" and cpuHasAES())
        try:
            parseLevel(self["log-level"])
        except ValueError as e:
            raise usage.UsageError(f"--log-level: {e}") from None

    def toConfig(self) -> ServerConfig:
        return ServerConfig(
            dataDir=DataDir(self["data"]),
            listen=tuple(self["listen"]),
            settings=ServerSettings(
                loginGraceTime=self["login-grace-time"],
                maxAuthAttempts=self["max-auth-tries"],
                keepaliveInterval=self["keepalive-interval"],
                keepaliveCount=self["keepalive-count"],
                rekeyLimit=self["rekey-limit"],
                aesGCMAfterLogin=self["operator-aes-gcm"],
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
                deviceWait=DeviceWaitPolicy(
                    maxWait=self["device-wait"],
                    recentWindow=self["device-wait-recent"],
                    maxWaiters=self["max-device-waits"],
                    maxWaitersPerDevice=self["max-device-waits-per-device"],
                    sharedStorePoll=(
                        DEFAULT_SHARED_STORE_POLL if _sharedStore(self["store"]) else None
                    ),
                ),
            ),
            certificateLifetime=self["certificate-lifetime"],
            webhook=self["webhook"],
            store=self["store"],
            tlsCertificate=self["tls-cert"],
            tlsKey=self["tls-key"],
            torControl=self["tor-control"],
            onionKey=self["onion-key"],
            maxHandshakes=self["max-handshakes"],
            maxHandshakesPerSource=self["max-handshakes-per-source"],
            maxHandshakesWaiting=self["max-handshakes-waiting"],
            maxHandshakesWaitingPerSource=self["max-handshakes-waiting-per-source"],
            maxHandshakesOperators=self["max-handshakes-operators"],
            penalties=PenaltyPolicy(
                noauthAllowance=self["noauth-allowance"],
                noauthRate=self["noauth-rate"],
                earlyCloseAllowance=self["early-close-allowance"],
                earlyCloseRate=self["early-close-rate"],
                exempt=tuple(self["penalty-exempt"]),
            ),
            recordingFailOpen=self["recording-failure"] == "open",
            recordingMaxAge=self["recording-max-age"] or None,
            recordingMaxBytes=self["recording-max-bytes"] or None,
            metrics=self["metrics"],
            pendingExpiry=self["pending-expiry"],
            auditMaxAge=self["audit-max-age"],
        )


#: The shortest --audit-max-age: the fleet watchers of every node read the audit log as a
#: change feed, and must never find unread rows gone because they lagged.
MIN_AUDIT_MAX_AGE = 86400.0


def _sharedStore(url: str | None) -> bool:
    """Whether the store URL is one several nodes may share (PostgreSQL)."""
    try:
        return url is not None and storeKind(url) == "postgresql"
    except StoreError:
        return False  # openStore says what is wrong with it


def durationOrNever(option: str, text: str) -> float | None:
    """Parse a C{--OPTION} that is a duration (C{30m}, C{7d}) or C{never} (None)."""
    if text.strip().lower() == "never":
        return None
    try:
        return float(parseDuration(text))
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}, or 'never'") from None


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


class GroundControlService(LogObserverService):
    """
    groundcontrol's top service: gives twistd's application the filtered log
    observer (see L{accesstunnel.logfilter} and L{groundcontrol.logging}).
    """


def configureLogging(top: GroundControlService, options: Options) -> None:
    """
    Write only events of C{--log-level} and above: through twistd's own observer
    (C{-l}, C{--syslog}, standard output), and through this package's ``--logger``
    factories. C{options.parent} is twistd's ServerOptions (absent outside twistd).
    """
    level = parseLevel(options["log-level"])
    setLevel(level)
    useFilteredTwistdObserver(top, options, level)


def removeTemporariesLeft(dataDir: DataDir, onionKeyFile: Path) -> None:
    """
    Remove the temporary files a power cut (or a kill) between a write and its rename or
    link left beside the state files groundcontrol writes through L{accesstunnel.statefiles}
    (its host key, fleet CA, run/listening.json, run/metrics.json, run/stopped.json,
    run/alive.json and run/feed.json, the onion service's key), as the agent does at its
    start. Before any of them is written again.
    """
    stateFiles: dict[Path, set[str]] = {
        dataDir.path: {dataDir.hostKeyPath.name, dataDir.hostPublicKeyPath.name},
        dataDir.caDirectory: {CA_KEY_FILE, CA_CERTIFICATE_FILE},
        dataDir.path / "run": {
            LISTENING_FILE,
            METRICS_FILE,
            STOPPED_FILE,
            ALIVE_FILE,
            FEED_HANDOVER_FILE,
        },
    }
    stateFiles.setdefault(onionKeyFile.parent, set()).add(onionKeyFile.name)
    for directory, names in stateFiles.items():
        removeStaleTemporaries(directory, names)


def buildService(
    config: ServerConfig, reactor: Any, store: IStore | None = None
) -> GroundControlService:
    """Assemble groundcontrol: front door on every listen address, fleet watcher."""
    try:
        initialised = config.dataDir.isInitialised(config.store)
    except HostKeyError as e:
        raise usage.UsageError(str(e)) from None
    if not initialised:
        storeOption = "" if config.store is None else " --store URL"
        raise usage.UsageError(
            f"{config.dataDir.path} is not initialised: run 'groundcontrol --data "
            f"{config.dataDir.path}{storeOption} init' first"
        )
    onionKeyFile = Path(config.onionKey or config.dataDir.path / "onion_key")
    removeTemporariesLeft(config.dataDir, onionKeyFile)
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
    revoked = RevokedCertificates(store)
    factory, registry = buildFrontDoor(
        store, hostKey, reactor, config.settings, certificates=certificates
    )
    factory.preauthGuard = PreauthGuard(reactor, penalties=config.penalties)  # type: ignore[attr-defined]
    notifier = makeNotifier(reactor, config.webhook)
    top = GroundControlService()
    if registry.waits is not None:
        # After a restart, the devices online when groundcontrol stopped are waited for.
        StopRecord(registry.waits, config.dataDir.path / "run", reactor).setServiceParent(top)
    # First, so that it stops last: after the fleet watcher has handed over what it holds.
    NotifierService(notifier).setServiceParent(top)
    # One limiter for every listener, innermost: it counts SSH handshakes,
    # whatever transport carries them.
    limited = HandshakeLimiter(
        factory,
        maxPending=config.maxHandshakes,
        maxPerSource=config.maxHandshakesPerSource,
        maxWaiting=config.maxHandshakesWaiting,
        maxWaitingPerSource=config.maxHandshakesWaitingPerSource,
        operatorReserve=config.maxHandshakesOperators,
    )
    factory.handshakesWaiting = lambda: limited.waiting
    StormCollector(reactor, factory.handshakesWaiting).setServiceParent(top)
    tls = None
    if config.tlsCertificate and config.tlsKey:
        tls = ServerTLS(
            config.tlsCertificate,
            config.tlsKey,
            config.dataDir.caDirectory / CA_CERTIFICATE_FILE,
            isRevoked=revoked.isRevoked,
        )
    tor = TorSettings(
        control=config.torControl,
        onionKeyFile=onionKeyFile,
    )
    listeners = []
    for address in config.listen:
        try:
            listener = serverListener(reactor, address, tls=tls, tor=tor, alongside=config.listen)
        except (AddressError, TLSConfigError) as e:
            raise usage.UsageError(str(e)) from None
        listeners.append(ListenService(listener.endpoint, listener.wrapFactory(limited), address))
    listenAll(top, config.dataDir.path / "run", listeners)
    FleetWatcher(
        store,
        registry,
        reactor,
        notifier=notifier,
        revocations=revoked,
        pendingExpiry=config.pendingExpiry,
        auditMaxAge=config.auditMaxAge,
        handOverFile=config.dataDir.path / "run" / FEED_HANDOVER_FILE,
        # Several nodes may share it: one at a time notifies (groundcontrol.fleetturn).
        turn=NotifierTurn(store) if _sharedStore(config.store) else None,
    ).setServiceParent(top)
    recordings = RecordingPolicy(
        config.dataDir.path / RECORDINGS_DIRECTORY,
        failOpen=config.recordingFailOpen,
        maxAge=config.recordingMaxAge,
        maxBytes=config.recordingMaxBytes,
    )
    recorder = Recorder(recordings, reactor, writerThread(reactor))
    sessions = attachSessions(registry, SessionRegistry(store, reactor, recorder=recorder))
    SessionService(sessions).setServiceParent(top)
    if config.metrics:
        metricsService(
            reactor,
            config.metrics,
            Metrics(),
            registry,
            sessions,
            factory,
            config.dataDir.path / "run",
            limiter=limited,
        ).setServiceParent(top)
    top.registry = registry  # type: ignore[attr-defined]
    top.limiter = limited  # type: ignore[attr-defined]
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    # Its timers keep their delays through a step of the wall clock, which stays the
    # reactor's clock for the dates it stores (accesstunnel.stepwatch).
    watchClockSteps(reactor)
    try:
        top = buildService(options.toConfig(), reactor)
    except usage.UsageError as e:
        # A setup problem, not a bug: one clear line, no traceback.
        raise SystemExit(f"groundcontrol: {e}") from None
    configureLogging(top, options)
    return top
