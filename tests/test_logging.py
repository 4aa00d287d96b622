"""
Tests for groundcontrol.logging and --log-level: debug events are not written by default,
through twistd's own observer (-l FILE) as through the JSON --logger factories.
"""

from __future__ import annotations

import json
import signal
import sys
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import twisted.logger
from twisted.application import service
from twisted.logger import (
    ILogObserver,
    LogBeginner,
    Logger,
    LogLevel,
    LogPublisher,
)
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions, _SomeApplicationRunner
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol import logging as gclogging
from groundcontrol.tap import GroundControlService, Options, configureLogging

#: Conch's connection logs its keepalive debug events under this namespace.
CONCH = "twisted.conch.ssh.connection.SSHConnection"


def emitAll(observer: Any) -> None:
    """One event of each level, as Conch and groundcontrol emit them, to C{observer}."""
    log = Logger(namespace=CONCH, observer=observer)
    log.debug("got global {requestType} request", requestType=b"keepalive@openssh.com")
    log.info("info-event")
    log.warn("warn-event")
    log.error("error-event")
    log.critical("critical-event")


class MinimumLevelTests(SynchronousTestCase):
    """The level filter itself."""

    def events(self, level: Any) -> list[str]:
        seen: list[Any] = []
        emitAll(gclogging.filtered(seen.append, level))
        return [e["log_format"].split(" ")[0] for e in seen]

    def test_debugDroppedInfoUpKept(self) -> None:
        """At info, the debug event is dropped; info, warn, error and critical pass."""
        self.assertEqual(
            self.events(LogLevel.info),
            ["info-event", "warn-event", "error-event", "critical-event"],
        )

    def test_debugKeepsAll(self) -> None:
        """At debug, every event passes."""
        self.assertEqual(len(self.events(LogLevel.debug)), 5)

    def test_warnDropsInfo(self) -> None:
        """At warn, debug and info are dropped."""
        self.assertEqual(
            self.events(LogLevel.warn), ["warn-event", "error-event", "critical-event"]
        )

    def test_eventsWithoutLevelKept(self) -> None:
        """Events without a level (e.g. captured standard output) are not dropped."""
        seen: list[Any] = []
        gclogging.filtered(seen.append, LogLevel.critical)({"log_namespace": "stdout"})
        self.assertEqual(len(seen), 1)

    def test_parseLevel(self) -> None:
        """Level names map to LogLevel constants; anything else is a ValueError."""
        self.assertIs(gclogging.parseLevel("debug"), LogLevel.debug)
        self.assertIs(gclogging.parseLevel("warn"), LogLevel.warn)
        self.assertRaises(ValueError, gclogging.parseLevel, "loud")
        self.assertRaises(ValueError, gclogging.parseLevel, "INFO")


class OptionsTests(SynchronousTestCase):
    """--log-level on groundcontrol's command line."""

    def parse(self, *extra: str) -> Options:
        options = Options()
        options.parseOptions(["--data", "/nonexistent", *extra])
        return options

    def test_defaultInfo(self) -> None:
        """Without --log-level, the level is info."""
        self.assertEqual(self.parse()["log-level"], "info")

    def test_debugAccepted(self) -> None:
        """--log-level debug is accepted."""
        self.assertEqual(self.parse("--log-level", "debug")["log-level"], "debug")

    def test_unknownLevelRefused(self) -> None:
        """An unknown level is a usage error naming the option."""
        e = self.assertRaises(usage.UsageError, self.parse, "--log-level", "chatty")
        self.assertIn("--log-level", str(e))


class TwistdPlumbingTests(SynchronousTestCase):
    """
    What twistd does with groundcontrol's service, step by step as in twistd's
    ApplicationRunner (parse, makeService, Application, AppLogger.start), with a private
    log beginner instead of the global one: the filter applies to what -l writes.
    """

    def setUp(self) -> None:
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        self.addCleanup(gclogging.setLevel, LogLevel.info)
        self.publisher = LogPublisher()
        stdio = SimpleNamespace(stdout=sys.stdout, stderr=sys.stderr)
        warnings = SimpleNamespace(showwarning=lambda *a, **k: None)
        beginner = LogBeginner(self.publisher, StringIO(), stdio, warnings)
        self.patch(twisted.logger, "globalLogBeginner", beginner)
        self.logFile = Path(self.mktemp())

    #: The twistd plugin run, with the options it cannot parse without.
    program: tuple[str, ...] = ("groundcontrol", "--data", "/nonexistent")

    def topService(self, options: Any) -> Any:
        """The program's top service, given the logging its makeService gives it."""
        top = GroundControlService()
        configureLogging(top, options)  # what makeService does
        return top

    def runTwistd(self, *programArgs: str, twistdArgs: tuple[str, ...] = ()) -> Any:
        """Parse a twistd command line, attach our service, start twistd's logger."""
        config = ServerOptions()
        config.parseOptions(
            ["-n", "-l", str(self.logFile), *twistdArgs, *self.program, *programArgs]
        )
        self.assertIs(config.subOptions.parent, config)
        application = service.Application(self.program[0])
        self.topService(config.subOptions).setServiceParent(application)
        appLogger = _SomeApplicationRunner.loggerFactory(config)
        appLogger.start(application)  # begins logging to self.publisher only
        return application, appLogger

    def written(self, appLogger: Any) -> str:
        appLogger._observer._observer._outFile.close()
        return self.logFile.read_text()

    def test_debugNotWrittenByDefault(self) -> None:
        """With twistd -l FILE, info and up reach the file; Conch's debug event does not."""
        application, appLogger = self.runTwistd()
        self.assertIs(appLogger._observer, application.getComponent(ILogObserver))
        emitAll(self.publisher)
        text = self.written(appLogger)
        for word in ("info-event", "warn-event", "error-event", "critical-event"):
            self.assertIn(word, text)
        self.assertNotIn("keepalive@openssh.com", text)

    def test_debugWrittenWithOption(self) -> None:
        """With --log-level debug, the debug event reaches the file too."""
        _, appLogger = self.runTwistd("--log-level", "debug")
        emitAll(self.publisher)
        text = self.written(appLogger)
        self.assertIn("got global b'keepalive@openssh.com' request", text)
        self.assertIn("info-event", text)

    def test_warnLevel(self) -> None:
        """--log-level warn drops info too."""
        _, appLogger = self.runTwistd("--log-level", "warn")
        emitAll(self.publisher)
        text = self.written(appLogger)
        self.assertNotIn("info-event", text)
        self.assertIn("warn-event", text)

    def test_loggerOptionLeftToTwistd(self) -> None:
        """
        With twistd --logger, groundcontrol does not replace twistd's choice: the named
        factory's observer is used (ours filter by --log-level themselves, below).
        """
        out = StringIO()
        self.patch(sys, "stdout", out)
        application, _ = self.runTwistd(twistdArgs=("--logger", "groundcontrol.logging.jsonLogger"))
        self.assertIsNone(application.getComponent(ILogObserver, None))
        emitAll(self.publisher)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            [e["log_format"] for e in lines if e.get("log_namespace") == CONCH],
            ["info-event", "warn-event", "error-event", "critical-event"],
        )


class JSONLoggerTests(SynchronousTestCase):
    """The --logger factories filter at the level makeService set."""

    def setUp(self) -> None:
        self.addCleanup(gclogging.setLevel, LogLevel.info)
        self.out = StringIO()
        self.patch(sys, "stdout", self.out)

    def formats(self) -> list[str]:
        return [json.loads(line)["log_format"] for line in self.out.getvalue().splitlines()]

    def test_jsonDropsDebugByDefault(self) -> None:
        """jsonLogger writes info and up, not debug, unless told otherwise."""
        emitAll(gclogging.jsonLogger())
        self.assertEqual(
            self.formats(), ["info-event", "warn-event", "error-event", "critical-event"]
        )

    def test_jsonKeepsDebugWhenSet(self) -> None:
        """After setLevel(debug) (--log-level debug), jsonLogger writes debug events too."""
        observer = gclogging.jsonLogger()
        gclogging.setLevel(LogLevel.debug)
        emitAll(observer)
        self.assertEqual(len(self.formats()), 5)

    def test_jsonSeqFiltersToo(self) -> None:
        """jsonSeqLogger (RFC 7464) drops debug events the same way."""
        emitAll(gclogging.jsonSeqLogger())
        records = [r for r in self.out.getvalue().split("\x1e") if r.strip()]
        self.assertEqual(len(records), 4)
