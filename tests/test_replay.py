"""
Replay and watch safety: golden tests of the escape neutraliser (what is dropped, what is
kept, sequences split across chunks), and the replay command's timing on a Clock.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.control import ControlContext, runCommand
from groundcontrol.recording import Recorder, RecordingPolicy, TerminalSanitizer, neutralise
from groundcontrol.sessions import SessionRegistry, attachSessions
from groundcontrol.testing import InMemoryFleet, resultNow

ESC = "\x1b"
BEL = "\x07"
ST = ESC + "\\"

#: (input, expected output): the golden cases.
GOLDEN = [
    # kept: text, SGR colours, cursor movement, erasing, modes, charsets, keypad
    ("plain text\r\n", "plain text\r\n"),
    (f"{ESC}[1;31mred{ESC}[0m", f"{ESC}[1;31mred{ESC}[0m"),
    (f"{ESC}[38;5;208mo{ESC}[48;2;1;2;3mb", f"{ESC}[38;5;208mo{ESC}[48;2;1;2;3mb"),
    (
        f"{ESC}[H{ESC}[2J{ESC}[10;5H{ESC}[K{ESC}[3A{ESC}[2C",
        f"{ESC}[H{ESC}[2J{ESC}[10;5H{ESC}[K{ESC}[3A{ESC}[2C",
    ),
    (f"{ESC}[?1049h{ESC}[?25l{ESC}[?2004h", f"{ESC}[?1049h{ESC}[?25l{ESC}[?2004h"),
    (f"{ESC}(B{ESC}7{ESC}8{ESC}={ESC}>", f"{ESC}(B{ESC}7{ESC}8{ESC}={ESC}>"),
    (f"{ESC}[2 q", f"{ESC}[2 q"),  # cursor style
    ("tab\tbell\x07back\x08", "tab\tbell\x07back\x08"),
    # dropped: OSC 52 clipboard, with BEL or ST
    (f"a{ESC}]52;c;cm0gLXJmIH4=\x07b", "ab"),
    (f"a{ESC}]52;c;cm0gLXJmIH4={ST}b", "ab"),
    # OSC 8 hyperlink: the link goes, its text stays
    (f"{ESC}]8;;https://evil.example/{ST}click{ESC}]8;;{ST}", "click"),
    # titles: set (OSC 0/1/2) and the report request (CSI 21 t), and other window ops
    (f"{ESC}]0;pwned{BEL}{ESC}]1;icon{BEL}{ESC}]2;title{ST}x", "x"),
    (f"{ESC}[21tx{ESC}[20t{ESC}[8;100;200t{ESC}[14t", "x"),
    # any other OSC (colours, cwd, notifications)
    (f"{ESC}]4;1;rgb:ff/00/00{BEL}{ESC}]7;file:///etc{BEL}{ESC}]777;notify;hi;there{BEL}y", "y"),
    # DCS (DECRQSS, sixel, tmux passthrough), SOS, PM, APC
    (f"{ESC}P$qm{ST}{ESC}Pq#0;2;0;0;0#0~~{ST}z", "z"),
    (f"{ESC}Ptmux;{ESC}{ESC}]52;c;eA=={BEL}{ST}z", "z"),
    (f"{ESC}Xsos{ST}{ESC}^pm{ST}{ESC}_apc{ST}z", "z"),
    # reports: DSR, DA, DECID, DECRQM, XTVERSION, keyboard query, DECREQTPARM, media copy
    (f"{ESC}[6n{ESC}[5n{ESC}[c{ESC}[>c{ESC}Z{ESC}[?25$p{ESC}[>q{ESC}[?u{ESC}[x{ESC}[5iq", "q"),
    # 8-bit C1 forms: OSC, DCS and CSI-introduced reports
    ("a\x9d52;c;eA==\x9cb\x90qdata\x9cc\x9b6nd\x9b31me", "abcd\x1b[31me"),
    # an unterminated OSC swallows nothing after a new escape begins
    (f"{ESC}]0;no end{ESC}[1mbold", f"{ESC}[1mbold"),
    # an over-long CSI is dropped whole
    (f"{ESC}[{'1;' * 100}mafter", "after"),
]


class NeutraliseTests(SynchronousTestCase):
    def test_golden(self) -> None:
        """Each golden input comes out exactly as expected."""
        for given, expected in GOLDEN:
            self.assertEqual(neutralise(given), expected, repr(given))

    def test_splitAnywhere(self) -> None:
        """Cut into pieces at every position, each golden case gives the same output."""
        for given, expected in GOLDEN:
            for cut in range(len(given) + 1):
                sanitizer = TerminalSanitizer()
                out = sanitizer.feed(given[:cut]) + sanitizer.feed(given[cut:])
                self.assertEqual(out, expected, (given, cut))

    def test_characterByCharacter(self) -> None:
        """Fed one character at a time, the result is the same as fed at once."""
        text = "".join(g for g, _ in GOLDEN)
        sanitizer = TerminalSanitizer()
        self.assertEqual("".join(sanitizer.feed(c) for c in text), neutralise(text))

    def test_noEscapeSurvivesInDroppedStrings(self) -> None:
        """Nothing between an OSC start and its end reaches the output, however long."""
        payload = "A" * 100_000
        self.assertEqual(neutralise(f"{ESC}]52;c;{payload}{BEL}ok"), "ok")


class ReplayCommandTests(SynchronousTestCase):
    """replay reads the recording named in the audit log and plays it on the clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.fleet = InMemoryFleet(clock=self.clock)
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory, True)
        recorder = Recorder(RecordingPolicy(directory=self.directory), self.clock)
        attachSessions(
            self.fleet.registry, SessionRegistry(self.fleet.store, self.clock, recorder=recorder)
        )
        self.fleet.addOperator("alice")
        self.fleet.addOperator("bob")
        self.fleet.enrollDevice("kiln7")
        relative = "2027/01/15/abcdefghij.cast"
        path = self.directory / relative
        path.parent.mkdir(parents=True)
        path.write_text(
            "\n".join(
                [
                    json.dumps({"version": 2, "width": 80, "height": 24}),
                    json.dumps([0.0, "o", "one "]),
                    json.dumps([2.0, "o", f"{ESC}]52;c;eA=={BEL}two "]),
                    json.dumps([2.0, "r", "100x30"]),
                    json.dumps([12.0, "o", "three"]),
                ]
            )
            + "\n"
        )
        detail = {"session": "abcdefghij", "id": "abcdefghij", "account": "alice"}
        detail["recording"] = relative
        resultNow(self.fleet.store.audit("session.ended", "alice", "kiln7", detail, 0))

    def run_(self, name: str, *argv: str) -> Any:
        account = next(a for a in resultNow(self.fleet.store.listAccounts()) if a.name == name)
        context = ControlContext(account, self.fleet.store, self.fleet.registry, self.clock)
        return resultNow(defer.Deferred.fromCoroutine(runCommand(context, list(argv))))

    def test_timingScaled(self) -> None:
        """--speed 2 plays a 12 s recording in 6 s, neutralised, in order."""
        result = self.run_("alice", "replay", "abcdefghij", "--speed", "2")
        sink = Sink()
        done = result.stream(sink)
        self.assertEqual(sink.text(), "one ")
        self.clock.advance(0.9)
        self.assertEqual(sink.text(), "one ")
        self.clock.advance(0.1)
        self.assertEqual(sink.text(), "one two ")
        self.clock.advance(4.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.assertEqual(sink.text(), "one two three")
        self.assertEqual(self.successResultOf(done), 0)

    def test_idleLimit(self) -> None:
        """--idle-limit caps long pauses."""
        result = self.run_("alice", "replay", "abcdefghij", "--idle-limit", "1")
        sink = Sink()
        done = result.stream(sink)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(sink.text(), "one two three")

    def test_cancel(self) -> None:
        """Cancelling (Ctrl-C) stops the replay and leaves no timer behind."""
        result = self.run_("alice", "replay", "abcdefghij")
        done = result.stream(Sink())
        done.cancel()
        self.failureResultOf(done, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_othersRefused(self) -> None:
        """bob cannot replay alice's session; a malformed id is a usage error."""
        self.assertEqual(self.run_("bob", "replay", "abcdefghij").status, 1)
        self.assertEqual(self.run_("alice", "replay", "../../x").status, 2)


class Sink:
    """What the replay writes to."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def whenWritable(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def text(self) -> str:
        return self.out.decode()
