"""
Remote forwarding (ssh -R) on the device: listeners for "tcpip-forward" requests.

groundcontrol relays the operator's C{tcpip-forward} and C{cancel-tcpip-forward}
global requests (RFC 4254 7.1) to the agent unchanged. The agent listens on the
device like sshd with C{GatewayPorts no}: always on loopback, whatever address
was asked (C{::1} for IPv6 forms, C{127.0.0.1} for everything else), and like
sshd only root may take a port below 1024. Every accepted connection opens a
C{forwarded-tcpip} channel to groundcontrol with the standard payload::

    string  address that was bound, as the operator named it
    uint32  port that was bound (the allocated one when port 0 was asked)
    string  originator IP address
    uint32  originator port

which groundcontrol routes to the operator who asked, by (address, port).
Listeners live as long as the link (or until cancelled); connections already
accepted live on after a cancel, as with sshd.

ssh -R from a UNIX socket path on the device is the same with OpenSSH's names
(C{streamlocal-forward@openssh.com} and its cancel, C{forwarded-streamlocal@openssh.com}
channels with the path and a reserved string): a socket only its owner may use (sshd's
C{StreamLocalBindMask 0177}), never over a file that exists (C{StreamLocalBindUnlink no}).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

from agent.forward import AcceptingFactory
from agent.session import _Payload

TCPIP_FORWARD = b"tcpip-forward"
CANCEL_TCPIP_FORWARD = b"cancel-tcpip-forward"
FORWARDED_TCPIP = b"forwarded-tcpip"
SOCKET_FORWARD = b"streamlocal-forward@openssh.com"
CANCEL_SOCKET_FORWARD = b"cancel-streamlocal-forward@openssh.com"
FORWARDED_SOCKET = b"forwarded-streamlocal@openssh.com"

#: The mode of a socket made for ssh -R (sshd: StreamLocalBindMask 0177).
SOCKET_MODE = 0o600

#: Listeners one link may hold at once.
MAX_LISTENERS = 64

#: Ports below this need root (sshd: IPPORT_RESERVED).
RESERVED_PORTS = 1024


def loopbackFor(address: str) -> str:
    """
    The interface a forward listens on: loopback of the family the operator
    named (sshd's C{GatewayPorts no}). C{""}, C{"localhost"}, C{"0.0.0.0"},
    C{"*"}, a host name or an IPv4 address give C{127.0.0.1}; an IPv6 form
    (C{"::"}, C{"::1"}, C{"[::1]"}) gives C{::1}.
    """
    return "::1" if ":" in address else "127.0.0.1"


def parseForwardRequest(data: bytes) -> tuple[bytes, int]:
    """
    The C{tcpip-forward} / C{cancel-tcpip-forward} payload: the address as
    sent (kept as bytes, it is echoed in every channel open) and the port.
    Raises L{ValueError} when it does not parse.
    """
    payload = _Payload(data)
    address = payload.string()
    port = payload.uint32()
    try:
        address.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("address is not UTF-8") from e
    if port > 0xFFFF:
        raise ValueError(f"bad port {port}")
    return address, port


def parseSocketForwardRequest(data: bytes) -> str:
    """
    The C{streamlocal-forward@openssh.com} / C{cancel-...} payload: the socket's path.
    Raises L{ValueError} when it does not parse.
    """
    path = _Payload(data).text()
    if not path:
        raise ValueError("empty socket path")
    return path


def forwardedTCPIPPayload(address: bytes, port: int, peer: IAddress) -> bytes:
    """The C{forwarded-tcpip} open payload for a connection from C{peer}."""
    host = getattr(peer, "host", "")
    peerPort = getattr(peer, "port", 0)
    return (
        common.NS(address)
        + struct.pack(">L", port)
        + common.NS(host.encode())
        + struct.pack(">L", peerPort)
    )


class RemoteForwarder:
    """
    The remote forwards of one link.

    C{AgentConnection.gotGlobalRequest} passes the two requests on::

        forwarder.forward(data)  # tcpip-forward -> True, (True, port) or False
        forwarder.cancel(data)   # cancel-tcpip-forward -> True or False

    and calls L{stopAll} when the link goes.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        conn: Any,
        *,
        allowPrivilegedPorts: bool = False,
        maxListeners: int = MAX_LISTENERS,
    ) -> None:
        self.reactor = reactor
        self.conn = conn
        self.allowPrivilegedPorts = allowPrivilegedPorts
        self.maxListeners = maxListeners
        #: (address as named, port bound) -> listening port
        self.listeners: dict[tuple[bytes, int], Any] = {}
        #: socket path -> listening port
        self.socketListeners: dict[str, Any] = {}

    def forward(self, data: bytes) -> bool | tuple[bool, bytes]:
        """
        Answer a C{tcpip-forward}: listen on loopback, reply with the port
        bound when port 0 was asked, fail if the port cannot be had.
        """
        try:
            address, port = parseForwardRequest(data)
        except ValueError as e:
            self.log.warn("malformed tcpip-forward request: {why}", why=str(e))
            return False
        name = address.decode("utf-8")
        if 0 < port < RESERVED_PORTS and not self.allowPrivilegedPorts:
            self.log.info("refused remote forward to privileged port {port}", port=port)
            return False
        if self._full():
            return False
        interface = loopbackFor(name)
        bound: list[int] = []
        factory = AcceptingFactory(
            self.conn,
            FORWARDED_TCPIP,
            lambda peer: forwardedTCPIPPayload(address, bound[0], peer),
        )
        try:
            listening = self.reactor.listenTCP(port, factory, interface=interface)
        except CannotListenError as e:
            self.log.info(
                "remote forward {address!r}:{port} cannot listen: {why}",
                address=name,
                port=port,
                why=str(e.socketError),
            )
            return False
        actual = listening.getHost().port if port == 0 else port
        bound.append(actual)
        self.listeners[(address, actual)] = listening
        self.log.info(
            "remote forward {address!r}:{port} listening on {interface} port {actual}",
            address=name,
            port=port,
            interface=interface,
            actual=actual,
        )
        if port == 0:
            return True, struct.pack(">L", actual)
        return True

    def _full(self) -> bool:
        count = len(self.listeners) + len(self.socketListeners)
        if count >= self.maxListeners:
            self.log.warn("refused remote forward: {count} already", count=count)
            return True
        return False

    def forwardSocket(self, data: bytes) -> bool:
        """Answer a C{streamlocal-forward@openssh.com}: listen on the socket path it names."""
        try:
            path = parseSocketForwardRequest(data)
        except ValueError as e:
            self.log.warn("malformed streamlocal-forward request: {why}", why=str(e))
            return False
        if self._full():
            return False
        factory = AcceptingFactory(
            self.conn, FORWARDED_SOCKET, lambda peer: common.NS(path.encode()) + common.NS(b"")
        )
        try:
            listening = self.reactor.listenUNIX(path, factory, mode=SOCKET_MODE, wantPID=False)
        except CannotListenError as e:
            self.log.info(
                "remote forward {path!r} cannot listen: {why}", path=path, why=str(e.socketError)
            )
            return False
        self.socketListeners[path] = listening
        self.log.info("remote forward listening on UNIX socket {path!r}", path=path)
        return True

    def cancelSocket(self, data: bytes) -> bool:
        """Answer a C{cancel-streamlocal-forward@openssh.com}: stop listening, remove the socket."""
        try:
            path = parseSocketForwardRequest(data)
        except ValueError as e:
            self.log.warn("malformed cancel-streamlocal-forward request: {why}", why=str(e))
            return False
        listening = self.socketListeners.pop(path, None)
        if listening is None:
            return False
        self.log.info("remote forward on UNIX socket {path!r} cancelled", path=path)
        self._stop(listening)
        return True

    def cancel(self, data: bytes) -> bool:
        """Answer a C{cancel-tcpip-forward}: stop the listener it names."""
        try:
            key = parseForwardRequest(data)
        except ValueError as e:
            self.log.warn("malformed cancel-tcpip-forward request: {why}", why=str(e))
            return False
        listening = self.listeners.pop(key, None)
        if listening is None:
            return False
        self.log.info(
            "remote forward {address!r}:{port} cancelled",
            address=key[0].decode("utf-8"),
            port=key[1],
        )
        self._stop(listening)
        return True

    def _stop(self, listening: Any) -> None:
        defer.maybeDeferred(listening.stopListening).addErrback(
            lambda f: self.log.failure("could not stop a remote forward", f)
        )

    def stopAll(self) -> defer.Deferred[Any]:
        """The link went: close every listener."""
        listeners = [*self.listeners.values(), *self.socketListeners.values()]
        self.listeners, self.socketListeners = {}, {}
        return defer.gatherResults(
            [defer.maybeDeferred(listening.stopListening) for listening in listeners]
        )


__all__ = [
    "CANCEL_SOCKET_FORWARD",
    "CANCEL_TCPIP_FORWARD",
    "FORWARDED_SOCKET",
    "FORWARDED_TCPIP",
    "MAX_LISTENERS",
    "SOCKET_FORWARD",
    "TCPIP_FORWARD",
    "RemoteForwarder",
    "forwardedTCPIPPayload",
    "loopbackFor",
    "parseForwardRequest",
    "parseSocketForwardRequest",
]
