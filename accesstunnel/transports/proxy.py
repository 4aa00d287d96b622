"""
Getting out through an HTTP CONNECT proxy: which proxy applies (C{HTTPS_PROXY},
C{NO_PROXY}), and an endpoint that opens a tunnel through it.

Devices on corporate networks often reach the outside only through such a proxy; the
tunnel it opens is a plain byte stream, so TLS and WebSocket run inside it unchanged and
the proxy sees only the host name and port.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet import endpoints
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger

from accesstunnel.addresses import bracketsHint, hostPort
from accesstunnel.transports.tunnel import ProxyError, TunnelEndpoint, TunnelProtocol

__all__ = [
    "HTTPConnectEndpoint",
    "ProxyError",
    "ProxySettings",
    "matchesNoProxy",
]

#: The proxy's response head may not be larger than this (bounded memory before the tunnel).
MAX_RESPONSE_HEAD = 16 * 1024


@attrs.frozen
class ProxyURL:
    """A parsed C{http://[user:password@]host[:port]} proxy address."""

    host: str
    port: int
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """
        Parse a proxy URL; credentials are percent-decoded (C{p%40ss} is C{p@ss}).

        @raise ValueError: not an C{http://} URL, or no host or a bad port; the message
            shows the URL without its password (it goes to the log).
        """
        if "://" not in url:
            url = "http://" + url  # curl's habit; people write HTTPS_PROXY=host:3128
        parts = urlsplit(url)
        shown = _withoutPassword(url)
        if parts.scheme.lower() != "http":
            raise ValueError(f"proxy {shown!r}: only http:// proxies are supported")
        if not parts.hostname:
            raise ValueError(f"proxy {shown!r} has no host{bracketsHint(parts.netloc)}")
        try:
            port = parts.port or 80
        except ValueError:
            hint = bracketsHint(parts.netloc) or (
                " (percent-escape @ : / ? # in a password)" if "@" in url else ""
            )
            raise ValueError(f"proxy {shown!r} has a bad port{hint}") from None
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, port, username, password)

    def authorization(self) -> bytes | None:
        """The C{Proxy-Authorization} value for Basic auth, if the URL carries credentials."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(raw)


def _withoutPassword(url: str) -> str:
    """C{url} with everything between the scheme and the last C{@} but the user name hidden."""
    scheme, separator, rest = url.partition("://")
    credentials, at, hostPart = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0].split("/", 1)[0]
    return f"{scheme}{separator}{user}:***@{hostPart}"


@attrs.frozen
class ProxySettings:
    """
    Which proxy to use, and for which hosts not to.

    @ivar httpsProxy: proxy for C{wss://} (C{HTTPS_PROXY}).
    @ivar httpProxy: proxy for C{ws://} (C{HTTP_PROXY}).
    @ivar noProxy: C{NO_PROXY} as written.
    @ivar httpsSource: where C{httpsProxy} came from (C{--proxy}, C{https_proxy}, ...), for
        the message when it cannot be used; C{httpSource} the same for C{httpProxy}.
    """

    httpsProxy: str | None = None
    httpProxy: str | None = None
    noProxy: str = ""
    httpsSource: str = "the HTTPS proxy"
    httpSource: str = "the HTTP proxy"

    @classmethod
    def fromEnvironment(
        cls, environ: Mapping[str, str] | None = None, override: str | None = None
    ) -> ProxySettings:
        """
        The settings from C{environ} (default C{os.environ}); C{override} (C{--proxy}) wins
        for both schemes. Lower-case names win over upper-case, as in curl.
        """
        env = os.environ if environ is None else environ

        def pick(name: str) -> tuple[str | None, str]:
            if override:
                return override, "--proxy"
            for variable in (name.lower(), name.upper()):
                if env.get(variable):
                    return env[variable], variable
            return None, name.upper()

        httpsProxy, httpsSource = pick("https_proxy")
        httpProxy, httpSource = pick("http_proxy")
        return cls(
            httpsProxy=httpsProxy,
            httpProxy=httpProxy,
            noProxy=env.get("no_proxy") or env.get("NO_PROXY") or "",
            httpsSource=httpsSource,
            httpSource=httpSource,
        )

    def proxyFor(self, scheme: str, host: str, port: int) -> ProxyURL | None:
        """
        The proxy to reach C{host:port} with C{scheme} (C{ws}/C{wss}), or C{None}.

        @raise ValueError: the proxy that applies is unusable; the message names the
            setting it came from (C{HTTPS_PROXY}, C{--proxy}...).
        """
        secure = scheme in ("wss", "https", "tls")
        url = self.httpsProxy if secure else self.httpProxy
        if not url or matchesNoProxy(self.noProxy, host, port):
            return None
        try:
            return ProxyURL.parse(url)
        except ValueError as e:
            raise ValueError(f"{self.httpsSource if secure else self.httpSource}: {e}") from None


def matchesNoProxy(noProxy: str, host: str, port: int) -> bool:
    """
    Whether C{NO_PROXY} says to connect to C{host:port} directly.

    Entries are separated by commas or spaces: C{*} (everything), a host name (itself and
    its subdomains; a leading dot or C{*.} means the same), an IP address or CIDR block, each
    optionally with C{:PORT} to apply to that port only. Case does not matter.
    """
    host = host.strip("[]").lower().rstrip(".")
    try:
        hostIP: Any = ipaddress.ip_address(host)
    except ValueError:
        hostIP = None
    for raw in noProxy.replace(",", " ").split():
        entry = raw.lower()
        if entry == "*":
            return True
        entryPort: int | None = None
        if entry.startswith("["):  # [::1]:8080
            close = entry.find("]")
            rest = entry[close + 1 :]
            entry, entryPort = entry[1:close], int(rest[1:]) if rest.startswith(":") else None
        elif entry.count(":") == 1:
            name, _, portText = entry.partition(":")
            if portText.isdigit():
                entry, entryPort = name, int(portText)
        if entryPort is not None and entryPort != port:
            continue
        if hostIP is not None:
            try:
                if hostIP in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.removeprefix("*").lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


class _ConnectProtocol(TunnelProtocol):
    """Speaks the CONNECT request; the proxy's 2xx response head opens the tunnel."""

    _log = Logger()
    maxHandshakeBytes = MAX_RESPONSE_HEAD

    def __init__(self, endpoint: HTTPConnectEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(factory)
        self._endpoint = endpoint

    def opening(self) -> bytes:
        host, port = self._endpoint.host, self._endpoint.port
        target = hostPort(host, port).encode("ascii" if ":" in host else "idna")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        authorization = self._endpoint.proxy.authorization()
        if authorization is not None:
            lines.append(b"Proxy-Authorization: " + authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def unanswered(self) -> str:
        return f"{self._endpoint.proxyName} took the connection but did not answer the CONNECT"

    def step(self, buffer: bytes) -> tuple[int, bool]:
        head, separator, _ = buffer.partition(b"\r\n\r\n")
        if not separator:
            if len(buffer) > MAX_RESPONSE_HEAD:
                raise ProxyError("the proxy's response head is too long")
            return 0, False
        statusLine = head.split(b"\r\n", 1)[0]
        parts = statusLine.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProxyError(f"not an HTTP response from the proxy: {statusLine[:80]!r}")
        if not (parts[1].isdigit() and 200 <= int(parts[1]) < 300):
            reason = statusLine.decode("latin-1", "replace")[:120]
            raise ProxyError(f"the proxy refused CONNECT: {reason}{self._hint(parts[1])}")
        self._log.debug(
            "proxy {proxy} opened a tunnel to {target}",
            proxy=hostPort(self._endpoint.proxy.host, self._endpoint.proxy.port),
            target=hostPort(self._endpoint.host, self._endpoint.port),
        )
        return len(head) + len(separator), True

    def _hint(self, status: bytes) -> str:
        """What the refusal means: the status alone does not say whose fault it is."""
        target = hostPort(self._endpoint.host, self._endpoint.port)
        if status == b"403":
            return f" (the proxy does not let this device reach {target}: ask its admin)"
        if status in (b"502", b"503", b"504"):
            return (
                f" (the proxy could not reach {target}: is the server up, and the address right?)"
            )
        if status != b"407":
            return ""
        if self._endpoint.proxy.username is None:
            return " (the proxy wants credentials: http://USER:PASSWORD@HOST:PORT)"
        return f" (it refused the credentials of {self._endpoint.proxy.username!r})"


class HTTPConnectEndpoint(TunnelEndpoint):
    """Connect to C{host:port} through an HTTP proxy's CONNECT tunnel."""

    def __init__(self, proxyEndpoint: IStreamClientEndpoint, proxy: ProxyURL, host: str, port: int):
        super().__init__(proxyEndpoint, f"the proxy {hostPort(proxy.host, proxy.port)}")
        self.proxy = proxy
        self.host = host
        self.port = port

    @classmethod
    def create(cls, reactor: Any, proxy: ProxyURL, host: str, port: int) -> HTTPConnectEndpoint:
        return cls(endpoints.HostnameEndpoint(reactor, proxy.host, proxy.port), proxy, host, port)

    def buildTunnel(self, factory: IProtocolFactory) -> TunnelProtocol:
        return _ConnectProtocol(self, factory)

    def __repr__(self) -> str:
        via = hostPort(self.proxy.host, self.proxy.port)
        return f"<HTTPConnectEndpoint {hostPort(self.host, self.port)} via {via}>"
