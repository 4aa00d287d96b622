"""
groundcontrol's pre-authentication options: what `--max-handshakes*` on the command line
becomes in the one HandshakeLimiter in front of every listener, and what
`--penalty-exempt`, `--noauth-allowance`, `--noauth-rate`, `--early-close-allowance` and
`--early-close-rate` become in the front door's per-source penalties.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.transports.limiter import (
    DEFAULT_MAX_WAITING,
    DEFAULT_MAX_WAITING_PER_SOURCE,
)
from groundcontrol.datadir import DataDir
from groundcontrol.preauth import PenaltyPolicy, guardOf
from groundcontrol.tap import Options, buildService


class _OptionsTestCase(SynchronousTestCase):
    """An initialised data directory, and groundcontrol built from a command line."""

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.data.mkdir()
        DataDir(self.data).ensureInitialised()

    def limiterFor(self, *extra: str) -> Any:
        """The limiter of groundcontrol built with C{extra} options, on a fake reactor."""
        options = Options()
        options.parseOptions(
            ["--data", str(self.data), "--listen", "tcp:0:interface=127.0.0.1", *extra]
        )
        top = buildService(options.toConfig(), MemoryReactorClock())
        return top.limiter  # type: ignore[attr-defined]


class HandshakeOptionsTests(_OptionsTestCase):
    """The limiter gets the bounds and waiting-room sizes given on the command line."""

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


class PenaltyOptionsTests(_OptionsTestCase):
    """The front door's penalties get the exempt networks and the noauth bound given."""

    def policyFor(self, *extra: str) -> PenaltyPolicy:
        # The limiter wraps the front door's SSH factory, which holds the penalties.
        return guardOf(self.limiterFor(*extra).wrappedFactory).penalties.policy

    def test_defaults(self) -> None:
        """
        Without options: 30 key exchanges without a login, then one a second; 20
        connections closed before a key exchange, then two a second; no exemption.
        """
        policy = self.policyFor()
        self.assertEqual((policy.noauthAllowance, policy.noauthRate, policy.exempt), (30, 1.0, ()))
        self.assertEqual((policy.earlyCloseAllowance, policy.earlyCloseRate), (20, 2.0))

    def test_given(self) -> None:
        """--penalty-exempt (repeated, IPv4 and IPv6) and the noauth bound reach the policy."""
        policy = self.policyFor(
            "--penalty-exempt",
            "198.51.100.0/24",
            "--penalty-exempt",
            "2001:db8:5::/48",
            "--noauth-allowance",
            "5",
            "--noauth-rate",
            "0.25",
            "--early-close-allowance",
            "50",
            "--early-close-rate",
            "0",
        )
        self.assertEqual(
            policy.exempt,
            (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:5::/48")),
        )
        self.assertEqual((policy.noauthAllowance, policy.noauthRate), (5, 0.25))
        self.assertEqual((policy.earlyCloseAllowance, policy.earlyCloseRate), (50, 0))

    def test_malformedRefused(self) -> None:
        """
        A malformed exempt network, an allowance below 1 or a negative rate is a usage
        error at start, naming the option and what is wrong.
        """
        for args, says in (
            (["--penalty-exempt", "10.1.2.3/8"], "--penalty-exempt: '10.1.2.3/8' has host bits"),
            (["--penalty-exempt", "2001:db8::/96"], "per /64"),
            (["--penalty-exempt", "nat-gateway"], "not an IPv4 or IPv6 address"),
            (["--noauth-allowance", "0"], "--noauth-allowance"),
            (["--noauth-rate", "-1"], "--noauth-rate"),
            (["--early-close-allowance", "0"], "--early-close-allowance must be at least 1"),
            (["--early-close-rate", "-0.5"], "--early-close-rate at least 0"),
        ):
            options = Options()
            with self.assertRaises(usage.UsageError) as caught:
                options.parseOptions(["--data", str(self.data), *args])
            self.assertIn(says, str(caught.exception))

    def test_help(self) -> None:
        """`twistd groundcontrol --help` lists the five options."""
        text = str(Options())
        for option in (
            "--penalty-exempt=",
            "--noauth-allowance=",
            "--noauth-rate=",
            "--early-close-allowance=",
            "--early-close-rate=",
        ):
            self.assertIn(option, text)
