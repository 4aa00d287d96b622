"""
Listening on both address families the way sshd and nginx do: C{0.0.0.0:22} for IPv4 and
C{[::]:22} for IPv6, side by side.

Linux opens an IPv6 wildcard socket for both families (C{net.ipv6.bindv6only=0}), so the
second of those two listeners failed with "Address already in use" and groundcontrol did
not start. sshd and nginx set C{IPV6_V6ONLY} on their IPv6 sockets for this reason. Here
an C{[::]} listener is made IPv6-only only when the same list also listens on the IPv4
wildcard at its port; alone, C{[::]} keeps the system's default (both families on Linux),
which existing configurations rely on.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

from accesstunnel.writethrough import WriteThroughPort

__all__ = ["IPv6OnlyEndpoint", "ipv4WildcardPorts"]

#: How an IPv4 wildcard listener's host may be written: C{ssh://0.0.0.0:22}, C{ssh://:22}.
_IPV4_WILDCARDS = ("", "0.0.0.0")


def ipv4WildcardPorts(addresses: Iterable[str]) -> set[int]:
    """
    The ports on which C{addresses} (groundcontrol's C{--listen} list) listen on every
    IPv4 interface: URL forms with host C{0.0.0.0} or none, and C{tcp:PORT} endpoint
    strings without an interface or with C{interface=0.0.0.0}. Unparsable entries are
    skipped (they are refused on their own).
    """
    from accesstunnel.addresses import AddressError, parseAddress

    ports: set[int] = set()
    for address in addresses:
        try:
            parsed = parseAddress(address)
        except AddressError:
            continue
        if parsed.isURL:
            if parsed.scheme != "tor" and parsed.host in _IPV4_WILDCARDS and parsed.port:
                ports.add(parsed.port)
            continue
        fields = re.split(r"(?<!\\):", address.strip())
        if fields[0].lower() != "tcp" or len(fields) < 2 or not fields[1].isdigit():
            continue
        options = dict(f.split("=", 1) for f in fields[2:] if "=" in f)
        if options.get("interface", "") in _IPV4_WILDCARDS:
            ports.add(int(fields[1]))
    return ports


class _IPv6OnlyPort(WriteThroughPort):
    """A listening port whose socket takes IPv6 connections only (C{IPV6_V6ONLY})."""

    def createInternetSocket(self) -> socket.socket:
        listening: socket.socket = super().createInternetSocket()
        listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return listening


@implementer(IStreamServerEndpoint)
@attrs.frozen
class IPv6OnlyEndpoint:
    """
    Listen on an IPv6 C{interface} (C{::}) for IPv6 only, next to an IPv4 listener on the
    same port. Accepted connections are the same write-through TCP connections as any
    other listener's.
    """

    reactor: Any
    port: int
    backlog: int
    interface: str = "::"

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        def listen() -> IListeningPort:
            port = _IPv6OnlyPort(
                self.port, protocolFactory, self.backlog, self.interface, self.reactor
            )
            port.startListening()
            return port

        return defer.execute(listen)
