"""
``twistd tunnel-agent``: options and service assembly.

Options become a L{AgentConfig}; L{buildService} is what tests call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import endpoints
from twisted.python import usage

from accesstunnel.addresses import AddressError, clientEndpointString
from accesstunnel.keepalive import DEFAULT_COUNT, DEFAULT_INTERVAL
from accesstunnel.names import isValidDeviceName
from agent.enrollment import Enrollment
from agent.identity import IdentityError, ServerKeyPin, loadOrCreateDeviceKey
from agent.link import AGENT_VERSION, AgentLinkFactory, LinkSettings, linkService
from agent.serial import readSerial


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


class Options(usage.Options):
    """Command line of ``twistd tunnel-agent``."""

    synopsis = "--state DIR --server ADDRESS --name NAME --server-key KEY"
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["server"] = []

    def opt_server(self, address: str) -> None:
        """groundcontrol address (repeatable), e.g. ssh://gc.example.com or tcp:HOST:PORT"""
        try:
            self["server"].append(clientEndpointString(address))
        except AddressError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        for required in ("state", "name", "server-key"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        if not self["server"]:
            raise usage.UsageError("at least one --server is required")
        if not isValidDeviceName(self["name"]):
            raise usage.UsageError(
                f"bad --name {self['name']!r}: 1-63 characters of a-z, 0-9 and '-', "
                "not starting with '-'"
            )
        try:
            self["server-key"] = ServerKeyPin.parse(self["server-key"])
        except IdentityError as e:
            raise usage.UsageError(str(e)) from None

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
        )


def buildService(config: AgentConfig, reactor: Any) -> service.Service:
    """Assemble the agent: the device key, and the service keeping the link."""
    from agent.session import SessionChannel, SessionEnvironment

    try:
        deviceKey = loadOrCreateDeviceKey(config.stateDir)
    except IdentityError as e:
        raise usage.UsageError(str(e)) from None
    environment = SessionEnvironment(home=config.home)
    if config.sftpServer is not None:
        paths = () if config.sftpServer == "none" else (config.sftpServer,)
        environment = attrs.evolve(environment, sftpServerPaths=paths)

    def sessionFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        return SessionChannel(
            environment, reactor, remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=conn
        )

    def forwardFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        from agent.forward import ForwardChannel

        return ForwardChannel.open(
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
    )
    settings = LinkSettings(
        name=config.name,
        deviceKey=deviceKey,
        serverKey=config.serverKey,
        serial=serial,
        keepaliveInterval=config.keepaliveInterval,
        keepaliveCount=config.keepaliveCount,
    )
    factory = AgentLinkFactory(settings, reactor, sessionFactory, forwardFactory, enrollment)
    # Several --server addresses are tried in order by the failover issue's
    # work; until then the first one is used.
    endpoint = endpoints.clientFromString(reactor, config.servers[0])
    return linkService(endpoint, factory, reactor)


def makeService(options: Options) -> service.Service:
    from twisted.internet import reactor

    try:
        return buildService(options.toConfig(), reactor)
    except usage.UsageError as e:
        raise SystemExit(f"tunnel-agent: {e}") from None
