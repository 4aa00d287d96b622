"""
What a lost SSH transport of ours lets go of, so reference counting frees it at once.

Both ends keep transports whose layers refer back to them: the running service
(userauth, then the connection; a client's requested service too), the keepalive (its
ping holds the connection, its verdict our C{peerSilent}), and the steady path's
shortcuts (accesstunnel.fastpath's C{enterSteadyState} stores bound methods of the
transport on the transport). Left in place once the connection is lost, each is a
reference cycle: the transport and all it holds (some 30 tracked objects, the ciphers,
the buffers) wait for a full pass of the cyclic collector. On groundcontrol that pass may
be put off to a reconnect storm's end (L{groundcontrol.stormgc}); on a small device
whose agent re-dials its link many times a day, it is memory held for nothing.
"""

from __future__ import annotations

from typing import Any


def letGo(sshTransport: Any) -> None:
    """
    Drop what refers back to C{sshTransport}, whose connection is over (its service
    stopped, its avatar logged out): call it last in C{connectionLost}.
    """
    # The running service (userauth or the connection) refers back to it; so does
    # a client's requested one (userauth, holding the connection), which Conch's
    # SSHClientTransport.requestService keeps as C{instance} for good.
    sshTransport.service = None
    vars(sshTransport).pop("instance", None)
    # The keepalive (stopped) holds its peerSilent, and its ping the connection.
    sshTransport.keepalive = None
    # The steady path's shortcuts (fastpath.enterSteadyState): bound methods of the
    # transport, stored on it.
    vars(sshTransport).pop("dataReceived", None)
    vars(sshTransport).pop("sendPacket", None)
