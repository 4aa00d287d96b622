"""
groundcontrol's handshake limiter options: what `--max-handshakes*` on the command line
becomes in the one HandshakeLimiter in front of every listener.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.limiter import (
    DEFAULT_MAX_WAITING,
    DEFAULT_MAX_WAITING_PER_SOURCE,
)
from groundcontrol.datadir import DataDir
from groundcontrol.tap import Options, buildService


class HandshakeOptionsTests(SynchronousTestCase):
    """The limiter gets the bounds and waiting-room sizes given on the command line."""

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.data.mkdir()
        DataDir(self.data).ensureInitialised()

    def limiterFor(self, *extra: str) -> object:
        options = Options()
        options.parseOptions(
            ["--data", str(self.data), "--listen", "tcp:0:interface=127.0.0.1", *extra]
        )
        top = buildService(options.toConfig(), MemoryReactorClock())
        return top.limiter  # type: ignore[attr-defined]

    def test_defaults(self) -> None:
        """Without options: 64 handshakes, 16 per source, the default waiting room."""
        limiter = self.limiterFor()
        self.assertEqual(
            (
                limiter.maxPending,
                limiter.maxPerSource,
                limiter.maxWaiting,
                limiter.maxWaitingPerSource,
            ),
            (64, 16, DEFAULT_MAX_WAITING, DEFAULT_MAX_WAITING_PER_SOURCE),
        )

    def test_given(self) -> None:
        """Every option reaches the limiter; a waiting room of 0 pauses the ports at the bound."""
        limiter = self.limiterFor(
            "--max-handshakes",
            "8",
            "--max-handshakes-per-source",
            "2",
            "--max-handshakes-waiting",
            "0",
            "--max-handshakes-waiting-per-source",
            "5",
        )
        self.assertEqual(
            (
                limiter.maxPending,
                limiter.maxPerSource,
                limiter.maxWaiting,
                limiter.maxWaitingPerSource,
            ),
            (8, 2, 0, 5),
        )

    def test_negativeWaitingRefused(self) -> None:
        """A negative waiting-room size is a usage error, not a crash at start."""
        options = Options()
        with self.assertRaises(usage.UsageError):
            options.parseOptions(["--data", str(self.data), "--max-handshakes-waiting", "-1"])

    def test_operatorReserve(self) -> None:
        """
        By default a quarter of the handshake slots are reserved for operators (16 of 64,
        2 of 8); --max-handshakes-operators sets it, 0 turns the split off.
        """
        self.assertEqual(self.limiterFor().operatorReserve, 16)
        self.assertEqual(self.limiterFor("--max-handshakes", "8").operatorReserve, 2)
        limiter = self.limiterFor("--max-handshakes-operators", "5")
        self.assertEqual((limiter.operatorReserve, limiter.agents.size), (5, 59))
        self.assertEqual(self.limiterFor("--max-handshakes-operators", "0").operatorReserve, 0)

    def test_reserveMustLeaveAgentsASlot(self) -> None:
        """A reserve of every slot (or a negative one) is a usage error."""
        for bad in ("4", "-1"):
            options = Options()
            with self.assertRaises(usage.UsageError):
                options.parseOptions(
                    [
                        "--data",
                        str(self.data),
                        "--max-handshakes",
                        "4",
                        "--max-handshakes-operators",
                        bad,
                    ]
                )
