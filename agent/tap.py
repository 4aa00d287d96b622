"""
``twistd tunnel-agent``: options and service assembly.

Options become a L{AgentConfig}; L{buildService} is what tests call.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.conch.error import ConchError
from twisted.conch.ssh.connection import OPEN_RESOURCE_SHORTAGE
from twisted.logger import Logger
from twisted.python import usage

from accesstunnel.addresses import (
    DEFAULT_SERVERS,
    AddressError,
    Connector,
    clientConnector,
    parseAddress,
)
from accesstunnel.clocks import useMonotonicTimers
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL
from accesstunnel.logfilter import (
    DEFAULT_LEVEL,
    LEVELS,
    LogObserverService,
    parseLevel,
    useFilteredTwistdObserver,
)
from accesstunnel.names import isValidDeviceName
from accesstunnel.rekey import RekeyLimit, parseRekeyLimit
from accesstunnel.statefiles import removeStaleTemporaries
from agent import openfiles
from agent.config import AgentFileConfig, ConfigError, installReloadOnSIGHUP, loadConfig
from agent.enrollment import CA_FILE, CERTIFICATE_FILE, STATUS_FILE, Enrollment
from agent.failover import FailoverEndpoint
from agent.identity import (
    DEVICE_KEY_FILE,
    READ_ONLY_EXIT_STATUS,
    IdentityError,
    ReadOnlyStateError,
    ServerKeyPin,
    loadOrCreateDeviceKey,
)
from agent.launcher import stopThenOutliveSessions
from agent.link import AGENT_VERSION, AgentLinkFactory, LinkSettings, backoffPolicy, linkService
from agent.linklog import AnnouncedRetries
from agent.serial import readSerial

if TYPE_CHECKING:
    from accesstunnel.transports.proxy import ProxySettings
    from accesstunnel.transports.tls import ClientTLS


@attrs.frozen
class AgentConfig:
    """Everything the agent needs to start, independent of the command line."""

    stateDir: Path
    servers: tuple[str, ...]
    name: str
    serverKey: ServerKeyPin
    serial: str | None = None
    token: str | None = None
    home: str | None = None
    sftpServer: str | None = None
    keepaliveInterval: float = DEFAULT_INTERVAL
    keepaliveCount: int = DEFAULT_COUNT
    tlsCA: Path | None = None
    proxy: str | None = None
    configFile: Path | None = None
    torSocks: str | None = None
    tags: tuple[str, ...] = ()
    rekeyLimit: RekeyLimit = attrs.field(factory=RekeyLimit)


#: --help's text for the options a method handles. Twisted would take it from the method's
#: docstring, which python -OO strips (docs/systemd/tunnel-agent.service sets
#: PYTHONOPTIMIZE=2), as groundcontrol.tap does for its own.
HANDLED_OPTIONS_HELP = {
    "server": "groundcontrol address, tried in order (repeatable): ssh://HOST:PORT, "
    "tls://HOST:PORT, wss://HOST:PORT/PATH, ws://..., tor://ONION:PORT or an endpoint "
    "string such as tcp:HOST:PORT. Default: the ssh, tls and wss forms of "
    "groundcontrol.osoximeter.com",
    "tag": "A tag this device reports (repeatable), e.g. site-berlin; grants may name tag:TAG",
    "help": "Display this help and exit.",
    "version": "Display Twisted version and exit.",
}


class Options(usage.Options):
    """Command line of ``twistd tunnel-agent``."""

    synopsis = "--state DIR --name NAME --server-key KEY [--server ADDRESS ...]"
    optParameters = [
        ["state", "s", None, "State directory (device key, status)."],
        ["name", "n", None, "The name this device asks for."],
        [
            "server-key",
            "k",
            None,
            "groundcontrol's host key: a key line, a .pub file or SHA256:...",
        ],
        ["serial", None, None, "Override the serial number reported to groundcontrol."],
        ["token", None, None, "Enrollment token from 'groundcontrol token create'."],
        ["home", None, None, "HOME for sessions (default: the login user's home)."],
        [
            "sftp-server",
            None,
            None,
            "sftp-server to run for the sftp subsystem, or 'none' to serve SFTP from the agent "
            "(default: the first of the usual OpenSSH paths that exists).",
        ],
        ["keepalive-interval", None, DEFAULT_INTERVAL, "Seconds of silence before a ping.", float],
        [
            "keepalive-count",
            None,
            DEFAULT_COUNT,
            "Unanswered intervals before the link is dead.",
            int,
        ],
        ["tls-ca", None, None, "CA file to verify tls:// and wss:// servers (default: system)."],
        ["proxy", None, None, "HTTP CONNECT proxy for ws(s):// (default: HTTPS_PROXY)."],
        ["config", "c", None, "TOML file with servers/proxy; re-read on SIGHUP."],
        ["tor-socks", None, "tcp:127.0.0.1:9050", "tor's SOCKS port, for tor:// servers."],
        [
            "rekey-limit",
            None,
            "1G 1h",
            "Renew the session keys after SIZE bytes [and TIME] (like RekeyLimit; 'none').",
        ],
        [
            "log-level",
            None,
            DEFAULT_LEVEL,
            f"Lowest level of log events written ({', '.join(LEVELS)}); debug adds Conch's "
            "per-packet and per-request events.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.docs.update(HANDLED_OPTIONS_HELP)
        self["server"] = []
        self["tags"] = []

    def opt_tag(self, tag: str) -> None:
        """One --tag (help: HANDLED_OPTIONS_HELP)."""
        self["tags"].append(tag)

    def opt_server(self, address: str) -> None:
        """One --server (help: HANDLED_OPTIONS_HELP), checked now: a typo is a usage error."""
        try:
            parseAddress(address)
        except AddressError as e:
            raise usage.UsageError(str(e)) from None
        self["server"].append(address)

    def postOptions(self) -> None:
        for required in ("state", "name", "server-key"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        if self["config"]:
            try:
                self["file-config"] = loadConfig(Path(self["config"]))
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        if not isValidDeviceName(self["name"]):
            raise usage.UsageError(
                f"bad --name {self['name']!r}: 1-63 characters of a-z, 0-9 and '-', "
                "not starting with '-'"
            )
        try:
            self["server-key"] = ServerKeyPin.parse(self["server-key"])
        except IdentityError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["rekey-limit"] = parseRekeyLimit(self["rekey-limit"])
        except ValueError as e:
            raise usage.UsageError(f"--rekey-limit: {e}") from None
        try:
            self["log-level"] = parseLevel(self["log-level"])
        except ValueError as e:
            raise usage.UsageError(f"--log-level: {e}") from None

    def toConfig(self) -> AgentConfig:
        return AgentConfig(
            stateDir=Path(self["state"]),
            servers=tuple(self["server"]),
            name=self["name"],
            serverKey=self["server-key"],
            serial=self["serial"],
            token=self["token"],
            home=self["home"],
            sftpServer=self["sftp-server"],
            keepaliveInterval=self["keepalive-interval"],
            keepaliveCount=self["keepalive-count"],
            tlsCA=Path(self["tls-ca"]) if self["tls-ca"] else None,
            proxy=self["proxy"],
            configFile=Path(self["config"]) if self["config"] else None,
            torSocks=self["tor-socks"],
            tags=tuple(self["tags"]),
            rekeyLimit=self["rekey-limit"],
        )


class AgentService(LogObserverService):
    """
    The agent's top service. Its stop outlives the sessions' children
    (L{agent.launcher.stopThenOutliveSessions}): closing the link hangs each session's child
    up and kills it L{agent.session.KILL_GRACE} later, and twistd and C{tunnel-agentd} both
    wait for this stop before they stop the reactor. Without the wait a child that ignored the
    hang-up outlived the agent (its systemd unit signals the agent alone).
    """

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self._clock = clock

    def stopService(self) -> Any:
        return stopThenOutliveSessions(super().stopService, self._clock)


def buildService(config: AgentConfig, reactor: Any) -> LogObserverService:
    """Assemble the agent: the device key, and the service keeping the link."""
    from agent.session import SessionChannel, SessionEnvironment

    # What a power cut left half-written last time, before this process writes anything.
    removeStaleTemporaries(config.stateDir, STATE_FILES)
    try:
        deviceKey = loadOrCreateDeviceKey(config.stateDir)
    except ReadOnlyStateError as e:
        # A status the systemd unit does not restart on: nothing changes until someone acts.
        print(f"tunnel-agent: {e}", file=sys.stderr)
        raise SystemExit(READ_ONLY_EXIT_STATUS) from None
    except IdentityError as e:
        raise usage.UsageError(str(e)) from None
    environment = SessionEnvironment(home=config.home)
    if config.sftpServer is not None:
        paths = () if config.sftpServer == "none" else (config.sftpServer,)
        environment = attrs.evolve(environment, sftpServerPaths=paths)

    def sessionFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        if not openfiles.haveRoom(openfiles.SESSION_DESCRIPTORS):
            raise ConchError(openfiles.outOfDescriptors("session"), OPEN_RESOURCE_SHORTAGE)
        return SessionChannel(
            environment, reactor, remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=conn
        )

    def forwardFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        from agent.forward import ForwardChannel

        return openForward(ForwardChannel, conn, windowSize, maxPacket, data)

    def streamLocalFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        from agent.forward import StreamLocalChannel

        return openForward(StreamLocalChannel, conn, windowSize, maxPacket, data)

    def openForward(
        channelType: Any, conn: Any, windowSize: int, maxPacket: int, data: bytes
    ) -> Any:
        """ssh -L's channel (to a port or a UNIX socket), if a descriptor is free."""
        if not openfiles.haveRoom(1):
            raise ConchError(openfiles.outOfDescriptors("forward"), OPEN_RESOURCE_SHORTAGE)
        return channelType.open(
            reactor, data, remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=conn
        )

    serial = config.serial or readSerial()
    enrollment = Enrollment(
        config.stateDir,
        reactor,
        requestedName=config.name,
        serial=serial,
        version=AGENT_VERSION,
        token=config.token,
        tags=config.tags,
    )
    settings = LinkSettings(
        name=config.name,
        deviceKey=deviceKey,
        serverKey=config.serverKey,
        serial=serial,
        keepaliveInterval=config.keepaliveInterval,
        keepaliveCount=config.keepaliveCount,
        rekeyLimit=config.rekeyLimit,
    )
    factory = AgentLinkFactory(
        settings, reactor, sessionFactory, forwardFactory, enrollment, streamLocalFactory
    )
    fileConfig = loadConfig(config.configFile) if config.configFile else None
    endpoint = FailoverEndpoint(
        reactor,
        _connectors(reactor, config, fileConfig),
        config.stateDir / LAST_SERVER_FILE,
    )
    enrollment.transportName = lambda: endpoint.transport
    top = AgentService(reactor)
    retries = AnnouncedRetries(backoffPolicy(), endpoint)  # says each retry (agent.linklog)
    linkService(endpoint, factory, reactor, retries).setServiceParent(top)
    if config.configFile is not None:
        _ReloadOnSIGHUP(reactor, config, endpoint, fileConfig).setServiceParent(top)
    return top


#: Where the agent remembers the address that last worked.
LAST_SERVER_FILE = "last-server.json"

#: The files the agent writes in its state directory (README, "Where state lives").
STATE_FILES = (
    DEVICE_KEY_FILE,
    DEVICE_KEY_FILE + ".pub",
    CERTIFICATE_FILE,
    CA_FILE,
    STATUS_FILE,
    LAST_SERVER_FILE,
)


def _connectors(
    reactor: Any, config: AgentConfig, fileConfig: AgentFileConfig | None
) -> list[Connector]:
    """The addresses to try, in order: the config file's, else --server's, else the default."""
    servers: tuple[str, ...] = (
        (fileConfig.servers if fileConfig else ()) or config.servers or tuple(DEFAULT_SERVERS)
    )
    tlsCA = (fileConfig.tlsCA if fileConfig else None) or config.tlsCA
    proxyOverride = (fileConfig.proxy if fileConfig else None) or config.proxy
    # Each transport's module is imported only if an address uses it (see addresses.py).
    schemes = {s.strip().lower().split("://", 1)[0] for s in servers if "://" in s}
    tls: ClientTLS | None = None
    proxy: ProxySettings | None = None
    if schemes & {"tls", "wss"}:
        from accesstunnel.transports.tls import ClientTLS

        tls = ClientTLS(
            caFile=tlsCA,
            clientCertificateFile=config.stateDir / CERTIFICATE_FILE,
            clientKeyFile=config.stateDir / DEVICE_KEY_FILE,
        )
    if schemes & {"ws", "wss"}:
        from accesstunnel.transports.proxy import ProxySettings

        proxy = ProxySettings.fromEnvironment(override=proxyOverride)
    tor = None
    if "tor" in schemes:
        # txtorcon is imported only by agents that dial tor:// (a few MB of RSS).
        from accesstunnel.transports.tor import DEFAULT_SOCKS, TorSettings

        socks = (fileConfig.torSocks if fileConfig else None) or config.torSocks
        tor = TorSettings(socks=socks or DEFAULT_SOCKS)
    try:
        return [clientConnector(reactor, s, tls=tls, proxy=proxy, tor=tor) for s in servers]
    except AddressError as e:
        raise usage.UsageError(str(e)) from None


class _ReloadOnSIGHUP(service.Service):
    """Re-read the config file on SIGHUP; new addresses apply to the next connect."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        endpoint: FailoverEndpoint,
        initial: AgentFileConfig | None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._endpoint = endpoint
        self._initial = initial
        self._uninstall: Any = None

    def startService(self) -> None:
        super().startService()
        assert self._config.configFile is not None

        def changed(fileConfig: AgentFileConfig) -> None:
            self._endpoint.replace(_connectors(self._reactor, self._config, fileConfig))

        self._uninstall = installReloadOnSIGHUP(
            self._reactor, self._config.configFile, changed, initial=self._initial
        )
        self._log.info("SIGHUP re-reads {path}", path=str(self._config.configFile))

    def stopService(self) -> Any:
        if self._uninstall is not None:
            self._uninstall()
        return super().stopService()


def configureLogging(top: LogObserverService, options: Options) -> None:
    """
    Under twistd, write through twistd's own observer (C{-l}, C{--syslog}, standard
    output) only events of C{--log-level} and above, as groundcontrol does: Conch's
    debug events (every keepalive, every channel request) are not written to the
    device's storage by default. C{python -m agent} filters its own observer.
    """
    useFilteredTwistdObserver(top, options, options["log-level"])


def makeService(options: Options) -> service.Service:
    from twisted.internet import reactor

    # Timers on the monotonic clock, the wall clock kept for dates (accesstunnel.clocks):
    # a device's clock steps (NTP's first sync, date -s), and a step must move no timer.
    # Here, not in buildService, so twistd's reactor and tunnel-agentd's both get it.
    useMonotonicTimers(reactor)
    openfiles.raiseForTheAgent()  # one line; the sessions' children keep today's limit
    try:
        top = buildService(options.toConfig(), reactor)
    except usage.UsageError as e:
        raise SystemExit(f"tunnel-agent: {e}") from None
    configureLogging(top, options)
    return top
