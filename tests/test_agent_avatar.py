"""
groundcontrol's avatar for a device's agent: how it answers the agent's global requests.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.enrollmessages import HELLO
from accesstunnel.keys import fingerprint
from groundcontrol.auth import AgentLogin
from groundcontrol.avatars import AgentAvatar
from groundcontrol.enrollment import AgentRequests
from groundcontrol.registry import Registry
from groundcontrol.testing import newKey, openMemoryStore, publicLine


class AgentGlobalRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        store = openMemoryStore()
        line = publicLine(newKey())
        self.avatar = AgentAvatar(
            AgentLogin(line, fingerprint(line), "kiln7"),
            None,
            Registry(),
            store,
            clock,
            AgentRequests(store, clock, None),
        )

    def test_refusalIsImmediate(self) -> None:
        """
        A request groundcontrol does not handle (an idle agent's keepalive) is refused
        with a plain 0, not a Deferred, so the connection answers it within the same
        event (the cheapest path for a fleet's keepalives).
        """
        self.assertEqual(self.avatar.gotGlobalRequest(b"keepalive@openssh.com", b""), 0)

    def test_enrollmentRequestsStillGoThroughTheHandler(self) -> None:
        """The enrollment requests are still answered by AgentRequests, as a Deferred."""
        self.assertIsInstance(self.avatar.gotGlobalRequest(HELLO, b""), defer.Deferred)
