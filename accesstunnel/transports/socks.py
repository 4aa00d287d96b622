"""
A SOCKS5 client endpoint (RFC 1928, CONNECT, no authentication), for reaching onion
services through tor's SOCKS port.

The host name goes to the SOCKS server unresolved (address type DOMAINNAME): tor must see
the C{.onion} name itself, and nothing about it may leak to a local resolver. Tor's own
reply codes for onion services (0xF0-0xF7, tor's socks-extensions) are turned into
messages an operator can act on.

Why not txtorcon's C{TorClientEndpoint}: it keeps bytes that arrive in the same read as the
SOCKS reply until the next read. An SSH server speaks first, so its version line and
KEXINIT often share a segment with tor's reply, and the link then hangs until the server's
login grace time ends it (see L{accesstunnel.transports.tunnel}).
"""

from __future__ import annotations

import struct

from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint

from accesstunnel.transports.tunnel import ProxyError, TunnelEndpoint, TunnelProtocol

__all__ = ["SOCKS5Endpoint", "SOCKSError"]

VERSION = 5
NO_AUTHENTICATION = 0
CONNECT = 1
ATYP_IPV4, ATYP_DOMAINNAME, ATYP_IPV6 = 1, 3, 4

#: Reply codes: RFC 1928's, then tor's for onion services.
REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired (tor: the stream timed out)",
    0x07: "command not supported",
    0x08: "address type not supported",
    0xF0: "onion service descriptor can not be found (not published, or not yet)",
    0xF1: "onion service descriptor is invalid",
    0xF2: "onion service introduction failed",
    0xF3: "onion service rendezvous failed",
    0xF4: "onion service needs client authorization",
    0xF5: "onion service client authorization is wrong",
    0xF6: "not a valid onion address",
    0xF7: "onion service introduction timed out",
}


class SOCKSError(ProxyError):
    """The SOCKS server refused the connection; C{code} is its reply code, if it sent one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _SOCKS5Protocol(TunnelProtocol):
    """Greets (no authentication), asks to CONNECT, and opens on the success reply."""

    def __init__(self, endpoint: SOCKS5Endpoint, factory: IProtocolFactory) -> None:
        super().__init__(factory)
        self._endpoint = endpoint
        self._greeted = False

    def opening(self) -> bytes:
        return bytes([VERSION, 1, NO_AUTHENTICATION])

    def step(self, buffer: bytes) -> tuple[int, bool]:
        if not self._greeted:
            if len(buffer) < 2:
                return 0, False
            version, method = buffer[0], buffer[1]
            if version != VERSION:
                raise SOCKSError(f"not a SOCKS5 server (version byte {version})")
            if method != NO_AUTHENTICATION:
                raise SOCKSError(f"the SOCKS server wants authentication (method {method})")
            self._greeted = True
            self.transport.write(self._endpoint.request())  # type: ignore[union-attr]
            return 2, False
        if len(buffer) < 2:
            return 0, False
        version, reply = buffer[0], buffer[1]
        if version != VERSION:
            raise SOCKSError(f"not a SOCKS5 reply (version byte {version})")
        if reply != 0:  # refused: whatever follows (some servers send no address) is moot
            text = REPLIES.get(reply, "unknown reply code")
            raise SOCKSError(
                f"SOCKS server: {text} (0x{reply:02x}) for "
                f"{self._endpoint.host}:{self._endpoint.port}",
                reply,
            )
        if len(buffer) < 5:
            return 0, False
        addressType = buffer[3]
        if addressType == ATYP_IPV4:
            length = 4 + 4 + 2
        elif addressType == ATYP_IPV6:
            length = 4 + 16 + 2
        elif addressType == ATYP_DOMAINNAME:
            length = 4 + 1 + buffer[4] + 2
        else:
            raise SOCKSError(f"SOCKS reply with unknown address type {addressType}")
        if len(buffer) < length:
            return 0, False
        return length, True


class SOCKS5Endpoint(TunnelEndpoint):
    """Connect to C{host:port} through the SOCKS5 server at C{proxyEndpoint}."""

    def __init__(
        self,
        proxyEndpoint: IStreamClientEndpoint,
        host: str,
        port: int,
        proxyName: str = "the SOCKS server",
    ) -> None:
        super().__init__(proxyEndpoint, proxyName)
        name = host.encode("idna")
        if not 0 < len(name) <= 255:
            raise ValueError(f"host name {host!r} cannot be sent over SOCKS5")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        self.host = host
        self.port = port
        self._name = name

    def request(self) -> bytes:
        """CONNECT to the host by name (resolved, or looked up as an onion, by the server)."""
        header = bytes([VERSION, CONNECT, 0, ATYP_DOMAINNAME, len(self._name)])
        return header + self._name + struct.pack(">H", self.port)

    def buildTunnel(self, factory: IProtocolFactory) -> TunnelProtocol:
        return _SOCKS5Protocol(self, factory)

    def __repr__(self) -> str:
        return f"<SOCKS5Endpoint {self.host}:{self.port} via {self.proxyEndpoint!r}>"
