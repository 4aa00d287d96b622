"""
What a device session is told of the operator's connection: SSH_CLIENT and SSH_CONNECTION.

sshd gives every session the client's address and port and its own; scripts read
them, and bash (as Debian builds it) reads ~/.bashrc for a command run over ssh only
when SSH_CLIENT is set. The device's agent cannot see the operator's connection, so
groundcontrol tells it, in its own namespace (``client-address@accesstunnel``, which
an operator cannot send: L{groundcontrol.relay}), before any of the operator's requests.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from twisted.conch.ssh import common

CLIENT_ADDRESS_REQUEST = b"client-address@accesstunnel"


def _hostAndPort(address: Any) -> bytes | None:
    """One end as the request carries it, or None when it is no IP address (a UNIX socket)."""
    address = getattr(address, "address", address)  # Conch wraps it in SSHTransportAddress
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack listener, as sshd prints it
    return common.NS(str(ip).encode("ascii")) + struct.pack(">L", port)


def clientAddressPayload(operatorConn: Any) -> bytes | None:
    """
    The request's payload for the operator's connection: its peer (the operator) and
    its host (groundcontrol's listener), each an IP address and a port; None when
    either is not an IP address, and the device session then has neither variable.
    """
    transport = getattr(operatorConn, "transport", None)
    if transport is None:
        return None
    client = _hostAndPort(transport.getPeer())
    server = _hostAndPort(transport.getHost())
    if client is None or server is None:
        return None
    return client + server


__all__ = ["CLIENT_ADDRESS_REQUEST", "clientAddressPayload"]
