"""
The chain of transports under a protocol.

SSH's transport may be the handshake limiter's wrapper, over a WebSocket adapter,
over TLS, over TCP; each layer's own C{transport} leads to the next. Code that needs
something only one layer has (the TLS peer certificate, the listening port of a TCP
server connection, the TCP connection itself) walks down this chain, bounded so that
a cycle or an unexpectedly deep stack cannot loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: Layers walked at most: TCP, TLS, WebSocket, the limiter and spare.
MAX_DEPTH = 8


def transportLayers(transport: Any, depth: int = MAX_DEPTH) -> Iterator[Any]:
    """C{transport}, then the transport under it, and so on (at most C{depth})."""
    for _ in range(depth):
        if transport is None:
            return
        yield transport
        transport = getattr(transport, "transport", None)


__all__ = ["MAX_DEPTH", "transportLayers"]
