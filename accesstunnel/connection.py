"""
The ssh-connection service both ends of Access Tunnel run.

It differs from Conch's L{SSHConnection} in these ways, the first three needed by a relay:

  - channels that manage their own window (L{FlowChannel}) are not given
    window back on receipt: they give it back as the data is passed on;
  - a channel open may be answered later: C{getChannel} may return a Deferred,
    so groundcontrol can open the device's side first and confirm or refuse
    the operator's channel with the device's real answer;
  - channel requests reach L{FlowChannel.requestReceivedWithReply} with the
    want-reply flag, so they can be passed on unchanged;
  - a global request may be answered later (C{gotGlobalRequest} may return a
    Deferred), its reply still sent in the order the requests came;
  - a packet for a channel that does not exist, or a second answer to a
    channel open, ends the connection (Conch would raise or re-point the channel);
  - the service attaches the link's back-pressure (L{LinkFlow}) when it starts.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from twisted.conch import error
from twisted.conch.ssh import common, connection
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR, MSG_IGNORE
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from accesstunnel.channel import packOpenFailure
from accesstunnel.linkflow import LinkFlow

_unpack_2uint32 = struct.Struct(">2L").unpack
_unpack_3uint32 = struct.Struct(">3L").unpack
_unpack_uint32 = struct.Struct(">L").unpack

#: The request OpenSSH (ServerAliveInterval, ClientAliveInterval) and L{accesstunnel.keepalive}
#: ping with.
KEEPALIVE_REQUEST = b"keepalive@openssh.com"


class _Reply:
    """A global request's place in the line of replies."""

    __slots__ = ("ready", "result")

    def __init__(self, ready: bool = False, result: Any = None) -> None:
        self.ready = ready
        self.result = result


class TunnelConnection(connection.SSHConnection):
    """ssh-connection with end-to-end flow control and asynchronous opens."""

    _log = Logger()
    #: The SSH transport under the service (Conch's is Optional: unset before it
    #: starts): one of ours, with its mixins' methods (keepalive, renewal, link flow).
    transport: Any

    def __init__(self) -> None:
        super().__init__()
        self._pendingOpens: set[defer.Deferred[Any]] = set()
        #: Replies to global requests not yet sent, oldest first.
        self._pendingReplies: deque[_Reply] = deque()
        self.stopped = False
        #: Back-pressure from the socket under the link, once the service runs.
        self.linkFlow: LinkFlow | None = None

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.linkFlow = LinkFlow.attach(self)

    # -- incoming data -------------------------------------------------------

    def _channelFor(self, localChannel: int) -> Any:
        channel = self.channels.get(localChannel)
        if channel is None:
            # A peer naming a channel that does not exist is broken or hostile;
            # Conch would raise KeyError from deep in the dispatcher.
            self._log.warn("packet for unknown channel {channel}", channel=localChannel)
            self.transport.sendDisconnect(
                DISCONNECT_PROTOCOL_ERROR, b"packet for a channel that does not exist"
            )
        return channel

    def _accept(self, channel: Any, data: bytes, claimedLength: int) -> bool:
        """
        Window and size checks for incoming (extended) data, and the window
        bookkeeping. A peer that overruns the window or lies about the
        length gets the channel closed.
        """
        if len(data) != claimedLength:
            self._log.error("peer's data packet is shorter than it claims; closing channel")
            self.sendClose(channel)
            return False
        if claimedLength > channel.localWindowLeft or claimedLength > channel.localMaxPacket:
            self._log.error("peer sent more than the window allows; closing channel")
            self.sendClose(channel)
            return False
        channel.localWindowLeft -= claimedLength
        if (
            not getattr(channel, "managesOwnWindow", False)
            and channel.localWindowLeft < channel.localWindowSize // 2
        ):
            self.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)
        return True

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        localChannel, dataLength = _unpack_2uint32(packet[:8])
        channel = self.channels.get(localChannel)
        if channel is None:
            self._channelFor(localChannel)  # the disconnect
            return
        data = packet[8 : 8 + dataLength]
        # Every keystroke comes this way: _accept's checks and bookkeeping written
        # out for a packet that passes them, _accept itself (its errors) otherwise.
        if (
            len(data) == dataLength
            and dataLength <= channel.localWindowLeft
            and dataLength <= channel.localMaxPacket
        ):
            channel.localWindowLeft -= dataLength
            if channel.localWindowLeft < channel.localWindowSize // 2 and not getattr(
                channel, "managesOwnWindow", False
            ):
                self.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)
            channel.dataReceived(data)
        elif self._accept(channel, data, dataLength):
            channel.dataReceived(data)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        localChannel, typeCode, dataLength = _unpack_3uint32(packet[:12])
        channel = self._channelFor(localChannel)
        if channel is None:
            return
        data = packet[12 : 12 + dataLength]
        if self._accept(channel, data, dataLength):
            channel.extReceived(typeCode, data)

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:
        localChannel, bytesToAdd = _unpack_2uint32(packet[:8])
        channel = self._channelFor(localChannel)
        if channel is not None:
            channel.addWindowBytes(bytesToAdd)

    def ssh_CHANNEL_EOF(self, packet: bytes) -> None:
        channel = self._channelFor(_unpack_uint32(packet[:4])[0])
        if channel is not None:
            channel.eofReceived()

    def ssh_CHANNEL_CLOSE(self, packet: bytes) -> None:
        channel = self._channelFor(_unpack_uint32(packet[:4])[0])
        if channel is None:
            return
        channel.closeReceived()
        channel.remoteClosed = True
        if channel.localClosed and channel.remoteClosed:
            self.channelClosed(channel)

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> defer.Deferred[Any] | None:
        localChannel = _unpack_uint32(packet[:4])[0]
        requestType, rest = common.getNS(packet[4:])
        wantReply = rest[0:1] not in (b"", b"\x00")
        channel = self._channelFor(localChannel)
        if channel is None:
            return None
        handler = getattr(channel, "requestReceivedWithReply", None)
        if handler is not None:
            d = defer.maybeDeferred(handler, requestType, rest[1:], wantReply)
        else:
            d = defer.maybeDeferred(channel.requestReceived, requestType, rest[1:])
        if wantReply:
            d.addCallback(self._cbChannelRequest, localChannel)
            d.addErrback(self._ebChannelRequest, localChannel)
        else:
            d.addErrback(lambda f: None)
        return d

    def _cbChannelRequest(self, result: Any, localChannel: int) -> None:
        if localChannel in self.localToRemoteChannel:
            super()._cbChannelRequest(result, localChannel)

    def _ebChannelRequest(self, result: Any, localChannel: int) -> None:
        if localChannel in self.localToRemoteChannel:
            super()._ebChannelRequest(result, localChannel)

    def _openingChannel(self, localChannel: int) -> Any:
        """
        Our channel C{localChannel} that waits for the peer's answer to its open,
        or None after disconnecting: an answer for a channel that does not exist,
        or that is open already (Conch would re-point it, or forget it while it is
        still open), is broken or hostile.
        """
        channel = self._channelFor(localChannel)
        if channel is not None and channel in self.channelsToRemoteChannel:
            self._log.warn("second answer to the open of channel {channel}", channel=localChannel)
            self.transport.sendDisconnect(
                DISCONNECT_PROTOCOL_ERROR, b"answer to a channel open that was answered"
            )
            return None
        return channel

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        if self._openingChannel(_unpack_uint32(packet[:4])[0]) is not None:
            super().ssh_CHANNEL_OPEN_CONFIRMATION(packet)

    def ssh_CHANNEL_OPEN_FAILURE(self, packet: bytes) -> None:
        if self._openingChannel(_unpack_uint32(packet[:4])[0]) is not None:
            super().ssh_CHANNEL_OPEN_FAILURE(packet)

    # -- global requests that may be answered later ----------------------------

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        """
        Conch's dispatch (to the avatar on a server, else to a C{global_*}
        method), without its debug event per request: the most frequent by far
        is a keepalive, one every 30 s on each of thousands of agent links.
        """
        avatar = getattr(self.transport, "avatar", None)
        if avatar is not None:
            return avatar.gotGlobalRequest(requestType, data)
        name = requestType.replace(b"-", b"_").decode("ascii", "replace")
        handler = getattr(self, "global_" + name, None)
        return 0 if handler is None else handler(data)

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        """
        Like Conch's, but C{gotGlobalRequest} may return a Deferred. Replies
        must go out in the order the requests came (RFC 4254 4): each request
        that wants one takes a place in line, and a reply leaves only once
        every reply before it has. So an answer that is ready at once (a
        plain value, or a Deferred that has already fired: a keepalive, any
        unknown request) goes out at once when nothing is pending before it,
        with no Deferred of ours; behind a pending reply it waits its turn.

        A keepalive whose answer has to wait is met at once with an C{SSH_MSG_IGNORE}
        (L{_aliveWhileRepliesWait}): the peer pinged to learn whether we are alive, and
        its deadline runs while the answer waits behind a reply that waits for the store.
        """
        requestType, rest = common.getNS(packet)
        wantReply, data = rest[0:1] not in (b"", b"\x00"), rest[1:]
        try:
            result = self.gotGlobalRequest(requestType, data)
        except Exception:
            self._log.failure("global request {request} failed", request=requestType)
            result = 0
        if not wantReply:
            if isinstance(result, defer.Deferred):
                result.addErrback(self._globalRequestFailed, requestType)
            return
        if not isinstance(result, defer.Deferred):
            if self._pendingReplies:
                self._pendingReplies.append(_Reply(True, result))
            else:
                self._sendGlobalReply(result)
        else:
            reply = _Reply()
            self._pendingReplies.append(reply)
            result.addCallbacks(
                self._settleGlobalReply,
                self._failGlobalReply,
                callbackArgs=(reply,),
                errbackArgs=(reply, requestType),
            )
        if self._pendingReplies and requestType == KEEPALIVE_REQUEST:
            self._aliveWhileRepliesWait()

    def _aliveWhileRepliesWait(self) -> None:
        """
        Say we are alive to a peer whose keepalive's answer waits in line (an agent's
        hello, pairing code or certificate request before it waits for the store).

        The peer counts any packet as proof of life (OpenSSH and L{Keepalive} alike), and
        an C{SSH_MSG_IGNORE} is one every implementation takes and drops, at any time,
        key exchanges included. Without it the peer's deadline ran as long as the store
        took: with keepalives of 1 s x 3 the agent has one second for the answer to a
        ping, and declared a live groundcontrol dead when the store (a write under load,
        another process holding the database) took longer.
        """
        if not self.stopped:
            self.transport.sendPacket(MSG_IGNORE, common.NS(b""))

    def _globalRequestFailed(self, reason: Failure, requestType: bytes) -> int:
        self._log.failure("global request {request} failed", reason, request=requestType)
        return 0

    def _failGlobalReply(self, reason: Failure, reply: _Reply, requestType: bytes) -> None:
        self._settleGlobalReply(self._globalRequestFailed(reason, requestType), reply)

    def _settleGlobalReply(self, result: Any, reply: _Reply) -> None:
        reply.result, reply.ready = result, True
        pending = self._pendingReplies
        while pending and pending[0].ready:
            self._sendGlobalReply(pending.popleft().result)

    def _sendGlobalReply(self, result: Any) -> None:
        if self.stopped:
            return
        if result:
            payload = result[1] if isinstance(result, (tuple, list)) else b""
            self.transport.sendPacket(connection.MSG_REQUEST_SUCCESS, payload)
        else:
            self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")

    # -- channel opens that may be answered later -----------------------------

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channelType, rest = common.getNS(packet)
        senderChannel, windowSize, maxPacket = _unpack_3uint32(rest[:12])
        extra = rest[12:]
        d = defer.maybeDeferred(self.getChannel, channelType, windowSize, maxPacket, extra)
        if d.called:
            # The common, synchronous case: answer at once, in order.
            d.addCallbacks(
                self._confirmOpen,
                self._refuseOpen,
                callbackArgs=(senderChannel, extra),
                errbackArgs=(senderChannel,),
            )
            return
        self._pendingOpens.add(d)

        def settled(result: Any) -> Any:
            self._pendingOpens.discard(d)
            return result

        d.addBoth(settled)
        d.addCallbacks(
            self._confirmOpen,
            self._refuseOpen,
            callbackArgs=(senderChannel, extra),
            errbackArgs=(senderChannel,),
        )

    def _confirmOpen(self, channel: Any, senderChannel: int, extra: bytes) -> None:
        if self.stopped:
            # The operator left while the device's side was being opened.
            closeAbandoned = getattr(channel, "abandoned", None)
            if closeAbandoned is not None:
                closeAbandoned()
            return
        channel.conn = self
        localChannel = self.localChannelID
        self.localChannelID += 1
        channel.id = localChannel
        self.channels[localChannel] = channel
        self.channelsToRemoteChannel[channel] = senderChannel
        self.localToRemoteChannel[localChannel] = senderChannel
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(
                ">4L",
                senderChannel,
                localChannel,
                channel.localWindowSize,
                channel.localMaxPacket,
            )
            + channel.specificData,
        )
        channel.channelOpen(extra)

    def _refuseOpen(self, reason: Failure, senderChannel: int) -> None:
        if self.stopped:
            return
        if reason.check(error.ConchError):
            text, code = reason.value.args[0], reason.value.args[1:2]
            if isinstance(text, int):  # Conch's historical argument order
                text, code = code[0] if code else "refused", (text,)
            reasonCode = code[0] if code else connection.OPEN_CONNECT_FAILED
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
        elif reason.check(defer.CancelledError):
            return
        else:
            self._log.failure("channel open failed", reason)
            reasonCode, text = connection.OPEN_CONNECT_FAILED, "internal error"
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            packOpenFailure(senderChannel, reasonCode, str(text)),
        )

    def serviceStopped(self) -> None:
        self.stopped = True
        for d in list(self._pendingOpens):
            d.cancel()
        super().serviceStopped()


__all__ = ["TunnelConnection"]
