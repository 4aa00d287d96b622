"""
The agent's line before each retry of its link (agent.linklog.AnnouncedRetries), in place
of Twisted's ClientService line, which names the failover endpoint by its repr: the agent
as agent.tap assembles it, on an in-memory reactor whose connections groundcontrol refuses.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.logfilter import filtered
from agent import linklog
from agent.identity import ServerKeyPin
from agent.tap import AgentConfig, buildService

ADDRESSES = ("ssh://127.0.0.1:2222", "ssh://127.0.0.1:2223")


class RetryLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        state = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, state)
        self.reactor = MemoryReactorClock()
        config = AgentConfig(
            stateDir=state,
            servers=ADDRESSES,
            name="kiln7",
            serverKey=ServerKeyPin("SHA256:" + "A" * 43),
        )
        self.top = buildService(config, self.reactor)

    def written(self, level: Any) -> list[Any]:
        """
        The events an observer filtered at C{level} gets while the agent tries both
        addresses, each refused, and schedules its retry.
        """
        seen: list[Any] = []
        observer = filtered(seen.append, level)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.top.startService()
        self.addCleanup(self.top.stopService)
        for _ in ADDRESSES:
            factory = self.reactor.tcpClients[-1][2]
            factory.clientConnectionFailed(
                self.reactor.connectors[-1], Failure(ConnectionRefusedError())
            )
            self.reactor.advance(0.5)  # HostnameEndpoint reports the failure on its clock
        globalLogPublisher.removeObserver(observer)
        return seen

    def test_retryLine(self) -> None:
        """
        After both addresses failed, one info line says the retry's attempt, its delay
        (the backoff's first, 1 to 2 s) and the address tried first, and the event has
        the whole list; Twisted's line is not written at info.
        """
        lines = [formatEvent(e) for e in self.written(LogLevel.info)]
        self.assertIn(
            f"could not reach {ADDRESSES[1]}: Connection was refused by other side", lines
        )
        [retry] = [line for line in lines if "retry" in line]
        self.assertRegex(
            retry, r"\Alink retry 1 in [12]\.\d s, trying ssh://127\.0\.0\.1:2222 first\Z"
        )
        self.assertFalse([line for line in lines if re.search(r"object at 0x", line)], lines)

    def test_retryEventFields(self) -> None:
        """The line's event: attempt, delay as the policy gave it, the address and the list."""
        [event] = [e for e in self.written(LogLevel.info) if e["log_format"] == linklog.LINK_RETRY]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["attempt"], event["address"], event["addresses"]),
            (1, ADDRESSES[0], list(ADDRESSES)),
        )
        self.assertTrue(1.0 <= event["delay"] <= 2.0, event["delay"])

    def test_twistedsLineAtDebug(self) -> None:
        """At --log-level debug, Twisted's own "Scheduling retry" line is written as well."""
        lines = [formatEvent(e) for e in self.written(LogLevel.debug)]
        self.assertEqual(len([line for line in lines if line.startswith("Scheduling retry 1")]), 1)
