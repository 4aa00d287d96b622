"""
Terminal safety (issue 8; DESIGN.md): text a device controls never reaches an operator's
terminal with its control characters. Golden tests with escape-sequence payloads: OSC 52
(writes the operator's clipboard), CSI 2J (clears the screen), the 8-bit CSI 0x9b, BEL and
NUL. Each one must come out as '?', and the rest of the text as it was.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.conch import error
from twisted.conch.ssh import connection
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.keys import fingerprint
from groundcontrol.control.commands import ControlContext, runCommand
from groundcontrol.testing import InMemoryFleet, newKey, publicLine, resultNow

#: What a hostile device sends: clipboard write, clear screen, 8-bit CSI, bell, NUL.
PAYLOAD = "\x1b]52;c;ZWNobyBoaQ==\x07\x1b[2J\x9b31m\x07\x00ok"
#: The same text as groundcontrol must print it.
GOLDEN = "?]52;c;ZWNobyBoaQ==??[2J?31m??ok"


def assertInert(testCase: SynchronousTestCase, text: str) -> None:
    testCase.assertFalse(
        [c for c in text if not c.isprintable() and c not in "\n"], f"control in {text!r}"
    )


class ChannelRefusalTests(SynchronousTestCase):
    """The agent's channel-open refusal text is what the operator's ssh prints."""

    def test_refusalTextFromDeviceIsCleaned(self) -> None:
        """A device refusing a session with escape sequences: the operator sees them inert."""
        fleet = InMemoryFleet()
        operatorKey = fleet.addOperator("alice", admin=True)
        deviceKey = fleet.enrollDevice("kiln7")

        def refuse(*args: Any) -> Any:
            raise error.ConchError(PAYLOAD.encode("utf-8"), connection.OPEN_CONNECT_FAILED)

        fleet.agent("kiln7", deviceKey, sessionFactory=refuse)
        operator = fleet.operator("dev_kiln7", operatorKey)
        session = fleet.session(operator)
        self.assertIsNotNone(session.openFailure)
        self.assertEqual(session.openFailureText, GOLDEN)


class ControlShellTests(SynchronousTestCase):
    """ctl's tables show what devices reported (serial, version, transport) inert."""

    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.fleet.addOperator("root", admin=True)
        accounts = resultNow(self.fleet.store.listAccounts())
        self.context = ControlContext(
            accounts[0], self.fleet.store, self.fleet.registry, self.fleet.clock
        )

    def ctl(self, *argv: str) -> Any:
        return resultNow(defer.Deferred.fromCoroutine(runCommand(self.context, list(argv))))

    def test_pendingSerial(self) -> None:
        """A pending device's serial (stored cleaned) and its table row carry no controls."""
        line = publicLine(newKey())
        resultNow(
            self.fleet.store.recordContact(
                "kiln7", line, fingerprint(line), PAYLOAD, "192.0.2.1:22", self.fleet.now
            )
        )
        result = self.ctl("pending")
        assertInert(self, result.stdout)
        self.assertIn("]52;c;ZWNobyBoaQ==", result.stdout)
        rows = json.loads(self.ctl("pending", "--json").stdout)
        assertInert(self, rows[0]["serial"])

    def test_lsAgentDetails(self) -> None:
        """The version and transport an agent reported in its hello are shown inert."""
        self.fleet.enrollDevice("kiln7")

        class Link:
            deviceName = "kiln7"
            fingerprint = "x"
            details = {"version": PAYLOAD, "transport": PAYLOAD}

            def close(self, reason: str) -> None:
                pass

        self.fleet.registry.attach(Link())  # type: ignore[arg-type]
        result = self.ctl("ls")
        assertInert(self, result.stdout)
        self.assertIn(GOLDEN, result.stdout)
        # JSON output escapes them (\u001b): a script gets the data, a terminal nothing.
        self.assertNotIn("\x1b", self.ctl("ls", "--json").stdout)
