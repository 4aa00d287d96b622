"""Tests for groundcontrol.usernames: what an SSH username asks for."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.usernames import (
    AgentTarget,
    ControlTarget,
    DeviceTarget,
    MalformedTarget,
    parseUsername,
)


class ParseUsernameTests(SynchronousTestCase):
    """Classification of usernames, without any lookup."""

    def test_device(self) -> None:
        """dev_NAME asks for device NAME."""
        self.assertEqual(parseUsername(b"dev_kiln7"), DeviceTarget("kiln7"))
        self.assertEqual(parseUsername(b"dev_0-a-b"), DeviceTarget("0-a-b"))

    def test_control(self) -> None:
        """ctl asks for the control shell."""
        self.assertEqual(parseUsername(b"ctl"), ControlTarget())

    def test_agent(self) -> None:
        """agent+NAME is an agent that would like to be called NAME."""
        self.assertEqual(parseUsername(b"agent+kiln7"), AgentTarget("kiln7"))

    def test_nameLengthLimit(self) -> None:
        """A device name may be 63 characters long, not 64."""
        self.assertEqual(parseUsername(b"dev_" + b"a" * 63), DeviceTarget("a" * 63))
        self.assertIsInstance(parseUsername(b"dev_" + b"a" * 64), MalformedTarget)

    def test_malformedDeviceNames(self) -> None:
        """Names outside [a-z0-9][a-z0-9-]{0,62} are malformed, with the rule in the reason."""
        for raw in (
            b"dev_",
            b"dev_-kiln",
            b"dev_Kiln7",
            b"dev_kiln_7",
            b"dev_kiln7\n",
            b"dev_kiln 7",
            b"dev_kiln.7",
            b"agent+",
            b"agent+UPPER",
        ):
            target = parseUsername(raw)
            self.assertIsInstance(target, MalformedTarget, raw)
            assert isinstance(target, MalformedTarget)
            self.assertIn("a-z, 0-9", target.reason)

    def test_unknownUser(self) -> None:
        """Any other username is refused with a hint at the accepted forms."""
        for raw in (b"root", b"DEV_kiln7", b"", b"ctl2", b"dev-kiln7"):
            target = parseUsername(raw)
            self.assertIsInstance(target, MalformedTarget, raw)
            assert isinstance(target, MalformedTarget)
            self.assertIn("dev_NAME", target.reason)

    def test_controlCharactersStripped(self) -> None:
        """A reason never echoes control characters from the username back to a terminal."""
        for raw in (b"\x1b[31mroot", b"dev_\x1b]0;pwned\x07", "r\u00f6\u0007ot".encode()):
            target = parseUsername(raw)
            assert isinstance(target, MalformedTarget)
            self.assertTrue(all(c.isprintable() for c in target.reason), target.reason)

    def test_reasonBounded(self) -> None:
        """A huge username does not make a huge refusal."""
        target = parseUsername(b"x" * 10_000)
        assert isinstance(target, MalformedTarget)
        self.assertLess(len(target.reason), 300)
        target = parseUsername(b"dev_" + b"y" * 10_000)
        assert isinstance(target, MalformedTarget)
        self.assertLess(len(target.reason), 300)
