"""
Tests for tunnel-agent's --log-level: Conch's debug events (every keepalive, every channel
request) are not written to the device's log by default, under twistd (-l FILE) as under
``python -m agent`` (agent.launcher).
"""

from __future__ import annotations

import sys
from io import StringIO
from types import SimpleNamespace
from typing import Any

import twisted.logger
from twisted.logger import LogBeginner, LogLevel, LogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import tests.test_logging as gclogging
from accesstunnel.logfilter import LogObserverService
from agent.launcher import _startLogging
from agent.tap import Options, configureLogging

#: The options an agent cannot start without (no file is read while parsing them).
REQUIRED = ("--state", "/nonexistent", "--name", "kiln7", "--server-key", "SHA256:" + "A" * 43)


class OptionsTests(SynchronousTestCase):
    """--log-level on the agent's command line."""

    def parse(self, *extra: str) -> Options:
        options = Options()
        options.parseOptions([*REQUIRED, *extra])
        return options

    def test_defaultInfo(self) -> None:
        """Without --log-level, the agent writes info and up."""
        self.assertIs(self.parse()["log-level"], LogLevel.info)

    def test_levelParsed(self) -> None:
        """--log-level debug and --log-level warn give those levels."""
        self.assertIs(self.parse("--log-level", "debug")["log-level"], LogLevel.debug)
        self.assertIs(self.parse("--log-level", "warn")["log-level"], LogLevel.warn)

    def test_unknownLevelRefused(self) -> None:
        """An unknown level is a usage error naming the option and the levels there are."""
        e = self.assertRaises(usage.UsageError, self.parse, "--log-level", "chatty")
        self.assertIn("--log-level", str(e))
        self.assertIn("debug, info, warn, error, critical", str(e))


class AgentTwistdPlumbingTests(gclogging.TwistdPlumbingTests):
    """
    groundcontrol's twistd plumbing tests, run on ``twistd tunnel-agent``: parse a twistd
    command line, what the agent's makeService does with its top service, the application,
    twistd's AppLogger. The filter applies to what -l writes; with --logger, twistd's
    choice is left alone.
    """

    program = ("tunnel-agent", *REQUIRED)

    def topService(self, options: Any) -> Any:
        top = LogObserverService()  # the class of buildService's top service
        configureLogging(top, options)  # what makeService does
        return top


class LauncherLoggingTests(SynchronousTestCase):
    """``python -m agent`` filters the observer it logs to standard output or -l FILE with."""

    def setUp(self) -> None:
        self.publisher = LogPublisher()  # a private one, instead of the global one
        stdio = SimpleNamespace(stdout=sys.stdout, stderr=sys.stderr)
        warnings = SimpleNamespace(showwarning=lambda *a, **k: None)
        beginner = LogBeginner(self.publisher, StringIO(), stdio, warnings)
        self.patch(twisted.logger, "globalLogBeginner", beginner)
        self.out = StringIO()
        self.patch(sys, "stdout", self.out)

    def written(self, level: Any) -> str:
        """What the launcher's observer at C{level} writes of one event of each level."""
        _startLogging("-", None, level)
        gclogging.emitAll(self.publisher)
        return self.out.getvalue()

    def test_debugNotWrittenByDefault(self) -> None:
        """At info (the default), Conch's debug event is not written; info and up are."""
        options = Options()
        options.parseOptions(list(REQUIRED))
        text = self.written(options["log-level"])
        self.assertNotIn("keepalive@openssh.com", text)
        for word in ("info-event", "warn-event", "error-event", "critical-event"):
            self.assertIn(word, text)

    def test_debugWrittenWithOption(self) -> None:
        """At debug, it is written too."""
        text = self.written(LogLevel.debug)
        self.assertIn("got global b'keepalive@openssh.com' request", text)
        self.assertIn("info-event", text)
