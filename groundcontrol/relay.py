"""
Splicing one operator channel to one device channel.

Everything passes through unchanged and in order: data, extended data, EOF,
channel requests (with want-reply honoured end to end), close. Flow control is
end to end: a side's receive window is re-opened only as the other side sends
the bytes on (L{FlowChannel.sent} -> L{FlowChannel.consumed}), so a session
holds at most about one window of data per direction in groundcontrol,
whatever the speeds at either end, and a slow session never stalls another on
the same link.

The relay knows nothing of authentication or the store.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch import error
from twisted.conch.ssh import connection
from twisted.internet import defer
from twisted.logger import Logger

from accesstunnel.channel import FlowChannel

#: Exit status an operator's ssh sees when groundcontrol, not the device,
#: ended the session (the same value ssh uses for its own failures).
RELAY_FAILURE_STATUS = 255


class _Ended:
    """The type of L{ENDED}."""

    def __repr__(self) -> str:
        return "ENDED"


#: What an observer's C{relayRequest} returns when it ended the session itself (said why
#: to the operator and closed both sides, L{RelayChannel.endWithMessage}): the request is
#: neither passed on nor answered.
ENDED = _Ended()

_EXIT_REQUESTS = (b"exit-status", b"exit-signal")

#: What a side keeps while it has no peer yet (L{RelayChannel.passOnEarly}).
_EARLY_DATA, _EARLY_EXTENDED, _EARLY_EOF = "data", "extended", "eof"

#: Session requests after which the device may open channels back to the
#: operator, and the channel type each allows.
_OPENS_BACK = {b"auth-agent-req@openssh.com": b"auth-agent@openssh.com", b"x11-req": b"x11"}

#: Channel requests named in the project's own namespace (``login-user@accesstunnel``:
#: the user a grant's ``--as`` runs a session as) are groundcontrol's word to the agent.
#: From an operator they are refused: passed on, one would choose its own login user.
_PRIVATE_REQUEST_SUFFIX = b"@accesstunnel"


class RelayChannel(FlowChannel):
    """
    One side of a spliced pair. Whatever it receives, its L{peer} sends on.
    """

    _log = Logger()

    #: Told of this side's opening, received data, requests and closing (a
    #: L{groundcontrol.sessions.LiveSession}). Unobserved, the data path pays
    #: one attribute check per packet and allocates nothing.
    observer: Any = None

    def __init__(
        self, *args: Any, label: str = "", towardsOperator: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.towardsOperator = towardsOperator
        #: Requests groundcontrol's policy refuses instead of passing on.
        self.refusedRequests: frozenset[bytes] = frozenset()
        #: Channel types the device may open back for this (operator) session.
        self.permittedBack: set[bytes] = set()
        self.peer: RelayChannel | None = None
        self.label = label
        self.exitReported = False
        self.bytesReceived = 0
        #: Fires (with None) when the channel is open, fails if the open is refused.
        self.opened: defer.Deferred[None] = defer.Deferred(self._cancelOpen)
        self._abandoned = False
        #: The answer to the latest request passed on, until it comes.
        self._lastReply: defer.Deferred[Any] | None = None
        #: Credit withheld by L{holdCredit} (None: credit flows).
        self._heldCredit: int | None = None
        #: What the peer said before L{splice} joined this side to the other (a service
        #: that speaks first: an sshd's version line, an SMTP greeting), passed on at the
        #: splice; None once joined or done with, when there is nothing more to keep.
        self._early: list[tuple[Any, ...]] | None = []

    # -- opening (device side) ------------------------------------------------

    def _cancelOpen(self, d: defer.Deferred[Any]) -> None:
        # The operator went away before the device answered; close the device
        # channel as soon as it exists rather than leave it running.
        self._abandoned = True

    def channelOpen(self, specificData: bytes) -> None:
        super().channelOpen(specificData)
        if self._abandoned:
            self.loseConnection()
            return
        if self.observer is not None:
            self.observer.relayOpened(self)
        if not self.opened.called:
            self.opened.callback(None)

    def openFailed(self, reason: Any) -> None:
        if not self.opened.called:
            if not isinstance(reason, error.ConchError):
                reason = error.ConchError(
                    "the device's link closed while opening the session",
                    connection.OPEN_CONNECT_FAILED,
                )
            else:
                # The peer's refusal text reaches the operator's terminal: make it inert.
                reason = error.ConchError(inertText(reason.value), reason.data)
            self.opened.errback(reason)

    def abandoned(self) -> None:
        """The operator's connection ended before its channel was confirmed."""
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.loseConnection()

    # -- holding the sender back -------------------------------------------------

    def holdCredit(self) -> None:
        """
        Stop re-opening this side's receive window: its sender stops once the
        window in flight is used up. A session's recording does this while the
        disk is behind, so fast output is slowed rather than the session ended.
        """
        if self._heldCredit is None:
            self._heldCredit = 0

    def releaseCredit(self) -> None:
        """Give back the credit held since L{holdCredit}, and let it flow again."""
        held, self._heldCredit = self._heldCredit, None
        if held:
            super().consumed(held)
            self.flushWindow()

    def consumed(self, count: int) -> None:
        if self._heldCredit is not None:
            self._heldCredit += count
            return
        super().consumed(count)

    # -- passing things on -------------------------------------------------------

    # The observer (recording, watchers) is told after the bytes were passed
    # on, so that its work is not on the path of an interactive echo.

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        peer = self.peer
        if peer is None:
            self._beforeSplice((_EARLY_DATA, data), len(data))
        else:
            peer.write(data)
        if self.observer is not None:
            self.observer.relayData(self, data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.bytesReceived += len(data)
        peer = self.peer
        if peer is None:
            self._beforeSplice((_EARLY_EXTENDED, data, dataType), len(data))
        else:
            peer.writeExtended(dataType, data)
        if self.observer is not None:
            self.observer.relayData(self, data)

    def _beforeSplice(self, item: tuple[Any, ...], size: int) -> None:
        """
        Something arrived with no peer to pass it to. Before the splice, keep it for the
        peer to come, without re-opening the window: what is kept is bounded by the
        window this side gave. After (the peer closed), let it go and re-open the window,
        so the sender is not blocked.
        """
        early = self._early
        if early is not None:
            early.append(item)
        elif size:
            self.consumed(size)

    def passOnEarly(self) -> None:
        """Joined to a peer (L{splice}): hand it what arrived before, in order."""
        early, self._early = self._early, None
        peer = self.peer
        if not early or peer is None:
            return
        for item in early:
            kind = item[0]
            if kind == _EARLY_DATA:
                peer.write(item[1])
            elif kind == _EARLY_EXTENDED:
                peer.writeExtended(item[2], item[1])
            else:
                peer.writeEOF()

    def sent(self, count: int) -> None:
        peer = self.peer
        if peer is not None:
            peer.consumed(count)

    def eofReceived(self) -> None:
        if self.peer is not None:
            self.peer.writeEOF()
        else:
            self._beforeSplice((_EARLY_EOF,), 0)

    def requestReceivedWithReply(self, requestType: bytes, data: bytes, wantReply: bool) -> Any:
        peer = self.peer
        if peer is None:
            return False
        if requestType in self.refusedRequests or (
            self.towardsOperator and requestType.endswith(_PRIVATE_REQUEST_SUFFIX)
        ):
            return self._refuseInOrder()
        verdict = (
            True if self.observer is None else self.observer.relayRequest(self, requestType, data)
        )
        if verdict is ENDED:
            # Not refused: OpenSSH's client exits at a refused shell or exec without
            # writing the stderr it already holds, so the operator would not learn why
            # whenever the message and the refusal arrive in one read. The observer has
            # written its message and closed the channel; the client drops the request's
            # reply when the channel closes, so none is ever sent.
            return defer.Deferred()
        if not verdict:
            return self._refuseInOrder()
        back = _OPENS_BACK.get(requestType)
        if back is not None:
            self.permittedBack.add(back)
        if requestType in _EXIT_REQUESTS:
            peer.exitReported = True
        result = peer.sendRequestInOrder(requestType, data, wantReply)
        if wantReply:
            self._lastReply = result
        return result if wantReply else True

    def _refuseInOrder(self) -> Any:
        """
        Refuse a request here, but answer only after the requests before it:
        clients match channel-request replies to requests in order.
        """
        last = self._lastReply
        if last is None or last.called:
            return False
        refused: defer.Deferred[bool] = defer.Deferred()
        self._lastReply = refused

        def answerAfter(result: object) -> object:
            refused.callback(False)
            return result

        last.addBoth(answerAfter)
        return refused

    def closeReceived(self) -> None:
        super().closeReceived()
        peer = self.peer
        if peer is not None:
            peer.loseConnection()

    def closed(self) -> None:
        super().closed()
        self._early = None
        observer, self.observer = self.observer, None
        if observer is not None:
            observer.relayClosed(self)
        if self.opened.called:
            # Done with: it holds this channel (its result, and the canceller bound to
            # it), a cycle that would keep the channel, its session and the operator's
            # whole connection for the cyclic collector.
            self.opened = defer.succeed(None)
        peer, self.peer = self.peer, None
        if peer is None:
            return
        peer.peer = None
        if peer.towardsOperator and getattr(self.conn, "stopped", False) and not peer.exitReported:
            # The device's link died under us: tell the operator, and end
            # the session with a status rather than leave ssh hanging.
            peer.endWithMessage(self.lostMessage())
        else:
            peer.loseConnection()

    def lostMessage(self) -> str:
        return f"groundcontrol: the connection to {self.label or 'the peer'} was lost"

    def endWithMessage(self, message: str) -> None:
        """Tell the operator why the session ended, give a status, and close."""
        self.writeExtended(connection.EXTENDED_DATA_STDERR, (message + "\r\n").encode())
        self.exitReported = True
        self.sendRequestInOrder(b"exit-status", struct.pack(">L", RELAY_FAILURE_STATUS))
        self.writeEOF()
        self.loseConnection()


def inertText(text: Any, limit: int = 512) -> str:
    """Peer-supplied text fit for a terminal: control characters as '?', bounded length."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


def splice(operatorSide: RelayChannel, deviceSide: RelayChannel) -> None:
    """
    Join two channels so that each passes on what the other receives, starting with what
    each received while it waited for the other (the device's channel is open while the
    session's start is written to the store, before the operator's is confirmed).
    """
    operatorSide.peer = deviceSide
    deviceSide.peer = operatorSide
    deviceSide.passOnEarly()
    operatorSide.passOnEarly()


def refusal(text: str, code: int = connection.OPEN_ADMINISTRATIVELY_PROHIBITED) -> error.ConchError:
    """A channel-open refusal the operator's ssh prints as it is."""
    return error.ConchError(text, code)


__all__ = ["ENDED", "RELAY_FAILURE_STATUS", "RelayChannel", "refusal", "splice"]
