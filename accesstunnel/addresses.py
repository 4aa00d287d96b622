"""
Addresses are URLs for people and Twisted endpoint strings underneath.

``ssh://HOST[:PORT]`` is plain SSH over TCP. Anything without a URL scheme is
taken as a Twisted endpoint string (``tcp:HOST:PORT`` for clients,
``tcp:PORT:interface=HOST`` for servers), so every transport Twisted knows is
reachable without new code here. (TLS, WebSocket and Tor URLs come with the
transports that serve them.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_SSH_PORT = 22

#: Schemes understood here; anything else containing "://" is an error.
URL_SCHEMES = ("ssh",)


class AddressError(ValueError):
    """An address that is neither a known URL nor an endpoint string."""


def _hostPort(address: str, defaultPort: int) -> tuple[str, int]:
    parts = urlsplit(address)
    if not parts.hostname:
        raise AddressError(f"{address!r} has no host")
    try:
        port = parts.port or defaultPort
    except ValueError as e:
        raise AddressError(f"{address!r} has a bad port") from e
    return parts.hostname, port


def _escape(host: str) -> str:
    # Endpoint strings separate fields with ':'; IPv6 literals need escaping.
    return host.replace(":", "\\:")


def clientEndpointString(address: str) -> str:
    """The Twisted client endpoint string for an agent's C{--server} address."""
    if "://" not in address:
        return address
    scheme = address.split("://", 1)[0].lower()
    if scheme == "ssh":
        host, port = _hostPort(address, DEFAULT_SSH_PORT)
        return f"tcp:{_escape(host)}:{port}"
    raise AddressError(f"unsupported address scheme {scheme!r} in {address!r}")


def serverEndpointString(address: str) -> str:
    """The Twisted server endpoint string for groundcontrol's C{--listen}."""
    if "://" not in address:
        return address
    scheme = address.split("://", 1)[0].lower()
    if scheme == "ssh":
        host, port = _hostPort(address, DEFAULT_SSH_PORT)
        return f"tcp:{port}:interface={_escape(host)}"
    raise AddressError(f"unsupported address scheme {scheme!r} in {address!r}")
