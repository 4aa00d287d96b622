"""
The control shell as an SSH session channel: ``ssh ctl@groundcontrol``.

``ssh ctl@gc CMD`` runs one command: its output on stdout, errors on stderr,
its status as the exit status. ``ssh ctl@gc`` with a terminal gives a prompt
with line editing and history (Conch's insults/recvline); without a terminal
it reads commands line by line from stdin, as a script would feed them.

A command may stream (``watch``, ``replay``): its result then has a
C{stream} callable, given this channel to write to, whose Deferred fires with
the exit status. Ctrl-C (a 0x03 byte) or the channel closing cancels it.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.insults import insults
from twisted.conch.recvline import HistoricRecvLine
from twisted.conch.ssh import common, connection
from twisted.internet import defer
from twisted.logger import Logger

from accesstunnel.channel import FlowChannel
from groundcontrol.control.commands import CommandResult, ControlContext, runCommandLine
from groundcontrol.recording import playableSize

PROMPT = b"ctl> "
_EXIT_WORDS = {"exit", "quit", "logout"}


class _ChannelTerminalTransport:
    """What the terminal protocol writes to: the channel."""

    def __init__(self, channel: ControlChannel) -> None:
        self._channel = channel

    def write(self, data: bytes) -> None:
        self._channel.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._channel.write(b"".join(data))

    def loseConnection(self) -> None:
        self._channel.finish(0)

    def getPeer(self) -> Any:
        return self._channel.getPeer()

    def getHost(self) -> Any:
        return self._channel.getHost()


class ControlPrompt(HistoricRecvLine):
    """The interactive prompt: edit a line, run it, show the result."""

    ps = (PROMPT, PROMPT)

    def __init__(self, channel: ControlChannel) -> None:
        super().__init__()
        self._channel = channel
        self._busy = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.keyHandlers[b"\x04"] = self._endOfInput  # Ctrl-D
        self.keyHandlers[b"\x03"] = self._cancelLine  # Ctrl-C

    def initializeScreen(self) -> None:
        # Keep the operator's screen; just greet and prompt.
        self.terminal.write(
            f"groundcontrol control shell for {self._channel.context.account.name}; "
            "'help' lists the commands\r\n".encode()
        )
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def _endOfInput(self) -> None:
        if not self.lineBuffer:
            self.terminal.write(b"\r\n")
            self._channel.finish(0)

    def _cancelLine(self) -> None:
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self.terminal.write(b"^C\r\n" + self.ps[self.pn])

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:
        if not self._busy:
            super().keystrokeReceived(keyID, modifier)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if text in _EXIT_WORDS:
            self._channel.finish(0)
            return
        self._busy = True
        d = defer.Deferred.fromCoroutine(runCommandLine(self._channel.context, text))
        d.addCallback(self._show)

    def _show(self, result: CommandResult) -> None:
        for stream in (result.stdout, result.stderr):
            if stream:
                self.terminal.write(stream.replace("\n", "\r\n").encode("utf-8", "replace"))
        if getattr(result, "stream", None) is not None:
            self._channel.runStream(result).addCallback(lambda _: self._prompt())
            return
        self._prompt()

    def _prompt(self) -> None:
        self._busy = False
        self.terminal.write(self.ps[self.pn])


class ControlChannel(FlowChannel):
    """A session channel served by groundcontrol itself."""

    name = b"session"
    _log = Logger()

    def __init__(self, context: ControlContext, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context = context
        self._terminalSize: tuple[int, int] | None = None
        self._terminal: insults.ServerProtocol | None = None
        self._lines = b""
        self._lastStatus = 0
        self._started = False
        self._execMode = False
        self._finished = False
        self._scriptLines: defer.Deferred[Any] = defer.succeed(None)
        self._streaming: defer.Deferred[int] | None = None
        self._writable: list[defer.Deferred[None]] = []

    # -- requests ------------------------------------------------------------

    def request_pty_req(self, data: bytes) -> bool:
        try:
            _term, rest = common.getNS(data)
            cols, rows = struct.unpack(">2L", rest[:8])
        except (struct.error, ValueError):
            return False
        self._terminalSize = playableSize(cols, rows)
        return True

    @property
    def terminalSize(self) -> tuple[int, int] | None:
        """The caller's terminal (columns, rows), or None without one (no pty-req)."""
        return self._terminalSize

    def request_env(self, data: bytes) -> bool:
        return False  # nothing here reads the environment

    def request_window_change(self, data: bytes) -> bool:
        try:
            cols, rows = struct.unpack(">2L", data[:8])
        except struct.error:
            return False
        if self._terminalSize is not None:
            self._terminalSize = playableSize(cols, rows)
        if self._terminal is not None and self._terminal.terminalProtocol is not None:
            self._terminal.terminalProtocol.terminalSize(cols, rows)
        return True

    def request_shell(self, data: bytes) -> bool:
        if self._started:
            return False
        self._started = True
        if self._terminalSize is not None:
            terminal = insults.ServerProtocol(ControlPrompt, self)
            terminal.makeConnection(_ChannelTerminalTransport(self))
            prompt = terminal.terminalProtocol
            assert prompt is not None  # makeConnection built it
            prompt.terminalSize(*self._terminalSize)
            self._terminal = terminal
        return True

    def request_exec(self, data: bytes) -> bool:
        if self._started:
            return False
        self._started = True
        self._execMode = True
        try:
            command = common.getNS(data)[0].decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        # Run after this request has been answered: a command that finishes
        # at once must not send its exit status and close before the reply.
        self.context.clock.callLater(0, self._runExec, command)
        return True

    def _runExec(self, command: str) -> None:
        d = defer.Deferred.fromCoroutine(runCommandLine(self.context, command))
        d.addCallback(self._finishWith)
        d.addErrback(self._failed)

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.consumed(len(data))
        if self._streaming is not None and (self._terminal is not None or self._execMode):
            if b"\x03" in data:
                self._streaming.cancel()
            return
        if self._terminal is not None:
            self._terminal.dataReceived(data)
            return
        if not self._started or self._execMode:
            return
        self._lines += data
        if len(self._lines) > 65536:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, b"line too long\n")
            self.finish(2)
            return
        while b"\n" in self._lines:
            line, self._lines = self._lines.split(b"\n", 1)
            self._runScriptLine(line)

    def eofReceived(self) -> None:
        if self._terminal is not None or self._execMode:
            return  # a terminal ignores EOF like sshd; exec ends when its command does
        if self._lines.strip():
            self._runScriptLine(self._lines)
        self._lines = b""
        # Finish after every queued line has run.
        self._scriptLines.addCallback(lambda _: self.finish(self._lastStatus))

    def _runScriptLine(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()

        async def run(_: Any) -> None:
            if self._finished:
                return
            if text in _EXIT_WORDS:
                self.finish(self._lastStatus)
                return
            result = await runCommandLine(self.context, text)
            self._emit(result)
            status = result.status
            if getattr(result, "stream", None) is not None:
                status = await self.runStream(result)
            if text:
                self._lastStatus = status

        self._scriptLines.addCallback(lambda _: defer.Deferred.fromCoroutine(run(_)))
        self._scriptLines.addErrback(self._failed)

    # -- output --------------------------------------------------------------

    def _emit(self, result: CommandResult) -> None:
        if result.stdout:
            self.write(result.stdout.encode("utf-8", "replace"))
        if result.stderr:
            self.writeExtended(
                connection.EXTENDED_DATA_STDERR, result.stderr.encode("utf-8", "replace")
            )

    def _finishWith(self, result: CommandResult) -> None:
        self._emit(result)
        if getattr(result, "stream", None) is not None:
            self.runStream(result).addCallback(self.finish)
            return
        self.finish(result.status)

    # -- streaming commands ----------------------------------------------------

    def runStream(self, result: CommandResult) -> defer.Deferred[int]:
        """
        Run a streaming result: C{result.stream(self)} writes to this channel
        and fires with the exit status; cancelled, the status is 130.
        """
        try:
            d: defer.Deferred[int] = result.stream(self)  # type: ignore[attr-defined]
        except Exception:
            d = defer.fail()
        self._streaming = d

        def done(outcome: Any) -> int:
            self._streaming = None
            if isinstance(outcome, int):
                return outcome
            if outcome.check(defer.CancelledError):
                self.write(b"\r\n")
                return 130
            self._log.failure("streaming command failed", outcome)
            self.writeExtended(connection.EXTENDED_DATA_STDERR, b"internal error\n")
            return 1

        return d.addBoth(done)

    def whenWritable(self) -> defer.Deferred[None]:
        """Fires once queued output is below the high-water mark (at once if it is)."""
        if self.queuedBytes <= self.highWater:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._writable.append(d)
        return d

    def outputResumed(self) -> None:
        waiting, self._writable = self._writable, []
        for d in waiting:
            d.callback(None)

    def closed(self) -> None:
        super().closed()
        if self._streaming is not None:
            self._streaming.cancel()

    def _failed(self, failure: Any) -> None:
        self._log.failure("control command failed", failure)
        self.writeExtended(connection.EXTENDED_DATA_STDERR, b"internal error\n")
        self.finish(1)

    def finish(self, status: int) -> None:
        """Send the exit status and close, once."""
        if self._finished:
            return
        self._finished = True
        self.sendRequestInOrder(b"exit-status", struct.pack(">L", status))
        self.writeEOF()
        self.loseConnection()
