"""Tests for the agent's reconnection delays (agent.link.backoffPolicy and linkService)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent.link import AgentLinkFactory, backoffPolicy, linkService


class BackoffPolicyTests(SynchronousTestCase):
    """Exponential growth, a cap, and jitter confined to the upper half."""

    def test_growsExponentially(self) -> None:
        """With the jitter at its top, delays double from the initial delay."""
        policy = backoffPolicy(random=lambda: 1.0)
        self.assertEqual([policy(n) for n in range(5)], [1.0, 2.0, 4.0, 8.0, 16.0])

    def test_capped(self) -> None:
        """Delays never exceed about 30 s, however many attempts failed."""
        policy = backoffPolicy(random=lambda: 1.0)
        self.assertEqual(policy(5), 30.0)
        self.assertEqual(policy(6), 30.0)
        self.assertEqual(policy(10**6), 30.0)  # no overflow for huge attempt numbers

    def test_jitterBounds(self) -> None:
        """The random part spreads a delay over [ceiling/2, ceiling]."""
        low = backoffPolicy(random=lambda: 0.0)
        high = backoffPolicy(random=lambda: 0.999999)
        for attempt in range(12):
            ceiling = min(2.0**attempt, 30.0)
            self.assertEqual(low(attempt), ceiling / 2)
            self.assertLessEqual(high(attempt), ceiling)
            self.assertGreater(high(attempt), ceiling * 0.99)

    def test_customSettings(self) -> None:
        """Initial delay, factor and cap are honoured."""
        policy = backoffPolicy(initialDelay=0.5, maxDelay=5.0, factor=3.0, random=lambda: 1.0)
        self.assertEqual([policy(n) for n in range(4)], [0.5, 1.5, 4.5, 5.0])


class _RefusingEndpoint:
    """A client endpoint whose every connection attempt is refused."""

    attempts = 0

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.attempts += 1
        return defer.fail(ConnectionRefusedError())


class LinkServiceTests(SynchronousTestCase):
    """linkService's retry delay counts links that died before authenticating."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = _RefusingEndpoint()
        self.factory = AgentLinkFactory(None, self.clock, lambda *a: None, lambda *a: None)  # type: ignore[arg-type]
        self.asked: list[int] = []

        def policy(attempt: int) -> float:
            self.asked.append(attempt)
            return 7.0

        self.service = linkService(self.endpoint, self.factory, self.clock, policy)
        self.addCleanup(self.service.stopService)

    def test_delayGrowsWithFailedLinks(self) -> None:
        """
        The attempt number given to the policy is ClientService's count plus the
        factory's failedLinks, so a server that accepts TCP but refuses the login is
        retried with growing delays too.
        """
        self.service.startService()
        self.assertEqual(self.asked, [1])
        self.factory.failedLinks = 4
        self.clock.advance(7.0)
        self.assertEqual(self.endpoint.attempts, 2)
        self.assertEqual(self.asked, [1, 6])

    def test_defaultPolicyIsBackoff(self) -> None:
        """Without a policy the delay is the jittered exponential backoff, capped at 30 s."""
        self.factory.failedLinks = 40
        service = linkService(self.endpoint, self.factory, self.clock)
        service.startService()
        self.addCleanup(service.stopService)
        (call,) = self.clock.getDelayedCalls()
        delay = call.getTime()  # type: ignore[misc]
        self.assertGreaterEqual(delay, 15.0)
        self.assertLessEqual(delay, 30.0)
