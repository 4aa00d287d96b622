"""
The ssh-connection service both ends of Access Tunnel run.

It differs from Conch's L{SSHConnection} in three ways, each needed by a relay:

  - channels that manage their own window (L{FlowChannel}) are not given
    window back on receipt: they give it back as the data is passed on;
  - a channel open may be answered later: C{getChannel} may return a Deferred,
    so groundcontrol can open the device's side first and confirm or refuse
    the operator's channel with the device's real answer;
  - channel requests reach L{FlowChannel.requestReceivedWithReply} with the
    want-reply flag, so they can be passed on unchanged.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch import error
from twisted.conch.ssh import common, connection
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from accesstunnel import writethrough
from accesstunnel.channel import packOpenFailure
from accesstunnel.linkflow import LinkFlow

#: The keepalive request OpenSSH and our L{accesstunnel.keepalive} send.
KEEPALIVE = b"keepalive@openssh.com"

_unpack_2uint32 = struct.Struct(">2L").unpack
_unpack_3uint32 = struct.Struct(">3L").unpack
_unpack_uint32 = struct.Struct(">L").unpack


class TunnelConnection(connection.SSHConnection):
    """ssh-connection with end-to-end flow control and asynchronous opens."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._pendingOpens: set[defer.Deferred[Any]] = set()
        self._globalReplies: defer.Deferred[None] = defer.succeed(None)
        self.stopped = False
        #: Back-pressure from the socket under the link, once the service runs.
        self.linkFlow: LinkFlow | None = None

    def serviceStarted(self) -> None:
        """
        Authenticated: from now on the link carries sessions, so let the TCP
        connection under it send small writes at once (see
        L{accesstunnel.writethrough}) instead of one reactor turn later.
        """
        super().serviceStarted()
        writethrough.enable(getattr(self.transport, "transport", None))
        self.linkFlow = LinkFlow.attach(self)

    # -- incoming data -------------------------------------------------------

    def _channelFor(self, localChannel: int) -> Any:
        channel = self.channels.get(localChannel)
        if channel is None:
            # A peer naming a channel that does not exist is broken or hostile;
            # Conch would raise KeyError from deep in the dispatcher.
            self._log.warn("packet for unknown channel {channel}", channel=localChannel)
            self.transport.sendDisconnect(
                2,
                b"packet for a channel that does not exist",  # PROTOCOL_ERROR
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
        channel = self._channelFor(localChannel)
        if channel is None:
            return
        data = packet[8 : 8 + dataLength]
        if self._accept(channel, data, dataLength):
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

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        if self._channelFor(_unpack_uint32(packet[:4])[0]) is not None:
            super().ssh_CHANNEL_OPEN_CONFIRMATION(packet)

    def ssh_CHANNEL_OPEN_FAILURE(self, packet: bytes) -> None:
        if self._channelFor(_unpack_uint32(packet[:4])[0]) is not None:
            super().ssh_CHANNEL_OPEN_FAILURE(packet)

    # -- global requests that may be answered later ----------------------------

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        """
        Like Conch's, but C{gotGlobalRequest} may return a Deferred. Replies
        must go out in the order the requests came (RFC 4254 4), so each
        reply waits for the ones before it.
        """
        requestType, rest = common.getNS(packet)
        wantReply, data = rest[0:1] not in (b"", b"\x00"), rest[1:]
        if requestType == KEEPALIVE and self._globalReplies.called:
            # The peer's keepalive, the most frequent request by far, with no
            # reply pending before it: refuse it now (as OpenSSH does; either
            # answer is proof of life) without the Deferred path below. Behind
            # a pending reply it takes that path, to keep its place in line.
            if wantReply and not self.stopped:
                self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")
            return
        result = defer.maybeDeferred(self.gotGlobalRequest, requestType, data)
        if not wantReply:
            result.addErrback(lambda f: self._log.failure("global request failed", f))
            return

        def reply(ret: Any) -> None:
            if self.stopped:
                return
            if ret:
                payload = ret[1] if isinstance(ret, (tuple, list)) else b""
                self.transport.sendPacket(connection.MSG_REQUEST_SUCCESS, payload)
            else:
                self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")

        def failed(reason: Failure) -> int:
            self._log.failure("global request {request} failed", reason, request=requestType)
            return 0

        result.addErrback(failed)
        previous = self._globalReplies
        self._globalReplies = defer.Deferred()
        mine = self._globalReplies

        def inOrder(_: Any) -> Any:
            result.addCallback(reply)
            result.addBoth(lambda _: mine.callback(None))
            return None

        previous.addCallback(inOrder)

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
