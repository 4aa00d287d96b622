"""
Version skew on the device link: agents and groundcontrol of different releases.

A fleet is upgraded piecemeal: thousands of agents run older (or newer) code than the
server for weeks. Whatever one end sends that the other does not know must be refused or
ignored without costing the link. The real programs of three older releases were run
against today's in both directions (bench-free checks, H2 of session 17); these tests pin
the rules in memory, with real agent links on the in-memory fleet of test_enrollment.
"""

from __future__ import annotations

from typing import Any

from accesstunnel.enrollmessages import HELLO, decodeMessage, encodeMessage
from groundcontrol.testing import resultNow
from tests.test_enrollment import AgentUnderTest, EnrollmentTestCase


class SkewTestCase(EnrollmentTestCase):
    def agentConnection(self, agent: AgentUnderTest) -> Any:
        """The agent's end of its link (the SSH connection service)."""
        assert agent.pump is not None
        return agent.pump.client.service

    def serverConnection(self, name: str) -> Any:
        """groundcontrol's end of the device's link."""
        link = self.fleet.registry.lookup(name)
        assert link is not None, f"{name} is not routable"
        return link.conn

    def ask(self, connection: Any, request: bytes, body: bytes) -> list[Any]:
        """Send a global request wanting a reply; flush; return [reply] or [Failure]."""
        results: list[Any] = []
        connection.sendGlobalRequest(request, body, wantReply=1).addBoth(results.append)
        self.fleet.flush()
        return results


class OlderAgentTests(SkewTestCase):
    """What groundcontrol does with an agent that sends less, or other things, than today's."""

    def test_helloWithoutTagsKeepsReportedTags(self) -> None:
        """
        A hello with only version and serial (no transport, no tags: what an agent that
        predates them would send) is answered, and does not wipe the tags the device's
        agent reported before: a missing key is "not reported", not "no tags".
        """
        agent = self.world.enrolled("kiln7")
        connection = self.agentConnection(agent)
        (reply,) = self.ask(
            connection,
            HELLO,
            encodeMessage({"version": "0.1.0", "serial": "SN-1", "tags": ["lab"]}),
        )
        self.assertEqual(self.world.device("kiln7").reportedTags, ("lab",))
        (reply,) = self.ask(
            connection, HELLO, encodeMessage({"version": "0.0.1", "serial": "SN-1"})
        )
        answer = decodeMessage(reply)
        self.assertEqual(
            (answer["ok"], answer["state"], answer["name"]), (True, "approved", "kiln7")
        )
        self.assertEqual(self.world.device("kiln7").reportedTags, ("lab",))
        link: Any = self.fleet.registry.lookup("kiln7")
        self.assertEqual(link.details["transport"], "")
        self.assertRoutable(agent)

    def test_helloWithUnknownFields(self) -> None:
        """A newer agent's hello, with fields today's server does not know, is answered."""
        agent = self.world.enrolled("kiln7")
        (reply,) = self.ask(
            self.agentConnection(agent),
            HELLO,
            encodeMessage({"version": "9.0", "serial": "SN", "future": {"x": [1, 2]}}),
        )
        self.assertEqual(decodeMessage(reply)["state"], "approved")
        self.assertRoutable(agent)

    def test_unknownRequestRefusedLinkKept(self) -> None:
        """
        A request today's server does not know (a newer agent's) is refused, as SSH says
        an unknown global request is, and the device stays reachable on the same link.
        """
        agent = self.world.enrolled("kiln7")
        operator = self.world.operator("alice", admin=True)
        (failure,) = self.ask(
            self.agentConnection(agent), b"future-step@accesstunnel", encodeMessage({})
        )
        self.assertIsInstance(failure.value, Exception)
        self.assertTrue(agent.connected)
        self.assertTrue(self.world.reaches(operator, "kiln7", agent))

    def test_malformedBodyAnswered(self) -> None:
        """A hello whose body today's server cannot read is answered as an empty hello."""
        agent = self.world.enrolled("kiln7")
        (reply,) = self.ask(self.agentConnection(agent), HELLO, b"\x00\x00\x00\x02{]")
        self.assertEqual(decodeMessage(reply)["state"], "approved")
        self.assertTrue(agent.connected)


class OlderServerTests(SkewTestCase):
    """What the agent does with a server that sends it what today's agent does not know."""

    def test_unknownRequestRefusedLinkKept(self) -> None:
        """
        A global request the agent does not know (a newer server's) is refused and the
        link stays up: sessions still reach the device.
        """
        agent = self.world.enrolled("kiln7")
        operator = self.world.operator("alice", admin=True)
        (failure,) = self.ask(
            self.serverConnection("kiln7"), b"future-step@accesstunnel", encodeMessage({})
        )
        self.assertIsInstance(failure.value, Exception)
        self.assertTrue(agent.connected)
        self.assertTrue(self.world.reaches(operator, "kiln7", agent))

    def test_approvedWithUnknownFields(self) -> None:
        """An C{approved} notice with fields the agent does not know still approves it."""
        agent = self.world.start("kiln7")
        self.assertPending(agent)
        resultNow(self.fleet.store.approveDevice("kiln7", "admin", self.world.now))
        self.assertEqual(agent.enrollment.approved(encodeMessage({"name": "kiln7", "v": 2})), 1)
        self.assertEqual(agent.enrollment.state, "approved")
        self.assertEqual(agent.status["state"], "approved")
