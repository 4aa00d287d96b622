"""
The agent's config file: which servers to dial and how, re-read on SIGHUP.

Why a file as well as options: a fleet's server address changes (new host, a proxy added)
long after the devices were installed, and restarting a device remotely is a risk. An admin
edits the file (configuration management does) and sends SIGHUP; the agent takes the new
list for its next connection without dropping the link it has.

The file is TOML::

    servers = ["tls://gc.example.com", "wss://gc.example.com/tunnel"]
    proxy = "http://user:secret@proxy.example.com:3128"   # optional; else HTTPS_PROXY
    tls-ca = "/etc/accesstunnel/fleet-ca.crt"               # optional pinned CA
    tor-socks = "tcp:127.0.0.1:9050"                        # optional
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from accesstunnel.addresses import AddressError, parseAddress

__all__ = ["AgentFileConfig", "ConfigError", "installReloadOnSIGHUP", "loadConfig"]

_log = Logger()

_KEYS = {"servers", "proxy", "tls-ca", "tor-socks"}


class ConfigError(ValueError):
    """The config file cannot be read or says something we cannot use."""


@attrs.frozen
class AgentFileConfig:
    """What the config file says; empty fields mean "as on the command line"."""

    servers: tuple[str, ...] = ()
    proxy: str | None = None
    tlsCA: Path | None = None
    torSocks: str | None = None


def loadConfig(path: Path) -> AgentFileConfig:
    """
    Read and check the config file.

    @raise ConfigError: unreadable, not TOML, unknown keys, or a bad address (so a typo is
        reported instead of silently dialling nothing).
    """
    import tomllib  # only agents with a config file need the parser

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    servers = data.get("servers", [])
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise ConfigError(f"{path}: servers must be a list of addresses")
    for server in servers:
        try:
            parseAddress(server)
        except AddressError as e:
            raise ConfigError(f"{path}: {e}") from None
    return AgentFileConfig(
        servers=tuple(servers),
        proxy=_optionalString(data, "proxy", path),
        tlsCA=Path(ca) if (ca := _optionalString(data, "tls-ca", path)) else None,
        torSocks=_optionalString(data, "tor-socks", path),
    )


def _optionalString(data: dict[str, Any], key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}: {key} must be a string")
    return value or None


def installReloadOnSIGHUP(
    reactor: Any,
    path: Path,
    onChange: Callable[[AgentFileConfig], None],
    initial: AgentFileConfig | None = None,
) -> Callable[[], None]:
    """
    Re-read C{path} on SIGHUP and call C{onChange} (in the reactor thread) when it changed.

    A file that fails to load is logged and ignored: the agent keeps its working addresses
    rather than lose its link to a typo. Returns a function that restores the previous
    handler (and a function C{reload} attribute on it for tests and manual use).
    """
    state = {"config": initial}

    def reload() -> None:
        try:
            config = loadConfig(path)
        except ConfigError as e:
            _log.error("config reload failed, keeping the old settings: {error}", error=str(e))
            return
        if config == state["config"]:
            _log.info("config {path} unchanged", path=str(path))
            return
        state["config"] = config
        _log.info(
            "config {path} reloaded: servers {servers}", path=str(path), servers=config.servers
        )
        try:
            onChange(config)
        except Exception:
            _log.failure("applying the reloaded config failed")

    def handler(signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes of whatever the reactor was doing; hand the
        # work to the reactor loop instead of doing it here.
        reactor.callFromThread(reload)

    previous = signal.signal(signal.SIGHUP, handler)

    def uninstall() -> None:
        signal.signal(signal.SIGHUP, previous)

    uninstall.reload = reload  # type: ignore[attr-defined]
    uninstall.handler = handler  # type: ignore[attr-defined]
    return uninstall
