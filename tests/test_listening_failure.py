"""
A listener that cannot listen stops groundcontrol with a non-zero exit status and one line
(groundcontrol.listening): with status 0 a service manager took it for a wanted stop
(systemd's Restart=on-failure never retried it). End to end with a real twistd:
tests/e2e/test_listen_failure.py.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from groundcontrol.listening import LISTEN_FAILED_STATUS, ListenService


@implementer(IStreamServerEndpoint)
class _TakenPort:
    """An endpoint whose port is taken, as Twisted's TCP endpoints fail then."""

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(
            error.CannotListenError("0.0.0.0", 22, OSError(98, "Address already in use"))
        )


class ListenFailureTests(SynchronousTestCase):
    def test_stopsWithAFailureStatus(self) -> None:
        """The service is asked to stop with a status that is not 0."""
        statuses: list[int] = []
        service = ListenService(_TakenPort(), Factory(), "ssh://0.0.0.0:22", statuses.append)
        with capturedLogs():
            service.startService()
        self.assertEqual(statuses, [LISTEN_FAILED_STATUS])
        self.assertNotEqual(LISTEN_FAILED_STATUS, 0)
        self.assertIsNone(service.port)

    def test_oneLineNoTraceback(self) -> None:
        """One critical line naming the listener and the system's reason, no traceback."""
        service = ListenService(_TakenPort(), Factory(), "ssh://0.0.0.0:22", lambda status: None)
        with capturedLogs() as seen:
            service.startService()
        self.assertEqual(
            [formatEvent(e) for e in seen],
            ["cannot listen on ssh://0.0.0.0:22: Address already in use; stopping (exit status 1)"],
        )
        self.assertEqual([e["log_level"].name for e in seen], ["critical"])
        self.assertFalse([e for e in seen if "log_failure" in e])

    def test_reasonWithAPeriodReadsCleanly(self) -> None:
        """
        A reason that ends in a period (tor's control port refused, as Twisted says it) is
        followed by '; stopping' without the period: once '...Connection refused.; stopping'.
        """

        @implementer(IStreamServerEndpoint)
        class RefusedTor:
            def listen(self, factory: Any) -> defer.Deferred[Any]:
                return defer.fail(error.ConnectionRefusedError("111: Connection refused"))

        service = ListenService(RefusedTor(), Factory(), "tor://:22", lambda status: None)
        with capturedLogs() as seen:
            service.startService()
        self.assertEqual(
            [formatEvent(e) for e in seen],
            [
                "cannot listen on tor://:22: Connection was refused by other side: 111: "
                "Connection refused; stopping (exit status 1)"
            ],
        )


class ExitStatusTests(SynchronousTestCase):
    def test_exitHandlerSetsTheStatusAfterTheOthers(self) -> None:
        """
        The exit handler ends the process with the status, after the other exit handlers
        (each once) and with what was written still flushed; in a process of its own.
        """
        program = (
            "import atexit, sys\n"
            "from groundcontrol.listening import _exitWith\n"
            "atexit.register(print, 'registered before')\n"
            "atexit.register(_exitWith, 3)\n"
            "sys.stdout.write('unflushed')\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertEqual(result.stdout, "unflushedregistered before\n")
