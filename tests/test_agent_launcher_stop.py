"""
A stopping agent (``tunnel-agentd`` and ``twistd -n tunnel-agent``) outlives its sessions'
children (L{agent.launcher.stopThenOutliveSessions}): the services stop (the link closes;
each session hangs its child up and kills it L{agent.session.KILL_GRACE} later), then the
agent waits until no child is left, at most a grace, before the reactor stops. Without it
a child that ignored the hang-up outlived the agent (docs/systemd/tunnel-agent.service
signals the agent alone, KillMode=process).

In memory: a L{task.Clock}, a stand-in for the top service, a dict for Twisted's registry of
reaped processes.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.application.service import Application, IService, Service
from twisted.internet import defer, process, task
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from agent.launcher import SESSION_END_POLL, stopThenOutliveSessions
from agent.session import KILL_GRACE
from agent.tap import AgentService


class _Top:
    """The agent's top service: its stop fires when the test says (the link's close)."""

    def __init__(self) -> None:
        self.stopping: defer.Deferred[None] = defer.Deferred()
        self.stopCalls = 0

    def stopService(self) -> defer.Deferred[None]:
        self.stopCalls += 1
        return self.stopping


class StopThenOutliveSessionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.top = _Top()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_waitsForTheServicesThenTheChildren(self) -> None:
        """
        The stop fires only once the services have stopped and the last session child has
        been reaped, not before: the sessions' own kill after KILL_GRACE happens meanwhile.
        """
        children: dict[int, Any] = {4101: object(), 4102: object()}
        stopped = stopThenOutliveSessions(self.top.stopService, self.clock, children, grace=12.0)
        self.assertEqual(self.top.stopCalls, 1)
        self.assertNoResult(stopped)
        self.top.stopping.callback(None)
        self.assertNoResult(stopped)
        del children[4101]
        self.clock.advance(KILL_GRACE)
        self.assertNoResult(stopped)
        del children[4102]
        self.clock.advance(SESSION_END_POLL)
        self.successResultOf(stopped)

    def test_noChildrenNoWait(self) -> None:
        """With no session child, the stop fires with the services' stop."""
        stopped = stopThenOutliveSessions(self.top.stopService, self.clock, {}, grace=12.0)
        self.top.stopping.callback(None)
        self.successResultOf(stopped)

    def test_givesUpAfterTheGrace(self) -> None:
        """A child that will not go (not even for SIGKILL) holds the stop for the grace only."""
        children: dict[int, Any] = {4101: object()}
        stopped = stopThenOutliveSessions(self.top.stopService, self.clock, children, grace=12.0)
        self.top.stopping.callback(None)
        self.clock.pump([SESSION_END_POLL] * 119)
        self.assertNoResult(stopped)
        self.clock.pump([SESSION_END_POLL] * 2)
        self.successResultOf(stopped)
        warnings = [e for e in self.events if "still running" in e.get("log_format", "")]
        self.assertEqual([e["pids"] for e in warnings], [[4101]])

    def test_aFailedStopStillWaitsAndFails(self) -> None:
        """The services' failure is kept, after the wait."""
        children: dict[int, Any] = {4101: object()}
        stopped = stopThenOutliveSessions(self.top.stopService, self.clock, children, grace=12.0)
        self.top.stopping.errback(RuntimeError("stop failed"))
        self.assertNoResult(stopped)
        del children[4101]
        self.clock.advance(SESSION_END_POLL)
        self.failureResultOf(stopped, RuntimeError)

    def test_defaultsToTheReactorsChildrenAndKillGrace(self) -> None:
        """
        By default it watches Twisted's registry of the processes the reactor reaps (the
        sessions' children) and waits the sessions' KILL_GRACE and 2 s more.
        """
        pid = 2**22 + 17  # above any pid_max: no real process
        process.reapProcessHandlers[pid] = cast(Any, object())
        self.addCleanup(process.reapProcessHandlers.pop, pid, None)
        stopped = stopThenOutliveSessions(self.top.stopService, self.clock)
        self.top.stopping.callback(None)
        self.clock.advance(KILL_GRACE + 1.0)
        self.assertNoResult(stopped)
        self.clock.pump([SESSION_END_POLL] * 11)
        self.successResultOf(stopped)


class _Link(Service):
    """The link's service: its stop fires when the test says (the link's close)."""

    def __init__(self) -> None:
        self.stopping: defer.Deferred[None] = defer.Deferred()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.stopping


class AgentServiceTests(SynchronousTestCase):
    def test_twistdsStopOutlivesSessionChildren(self) -> None:
        """
        The agent's top service, in a twistd application (twistd -n tunnel-agent stops the
        application's service before the reactor), stops as tunnel-agentd does: once the link
        has closed and the last session child has been reaped. It stopped with the link.
        """
        clock = task.Clock()
        top = AgentService(clock)
        link = _Link()
        link.setServiceParent(top)
        application = Application("tunnel-agent")
        top.setServiceParent(application)
        IService(application).startService()
        pid = 2**22 + 17  # above any pid_max: no real process
        process.reapProcessHandlers[pid] = cast(Any, object())
        self.addCleanup(process.reapProcessHandlers.pop, pid, None)
        stopped = defer.maybeDeferred(IService(application).stopService)
        self.assertNoResult(stopped)
        link.stopping.callback(None)
        clock.advance(KILL_GRACE)
        self.assertNoResult(stopped)
        del process.reapProcessHandlers[pid]
        clock.advance(SESSION_END_POLL)
        self.successResultOf(stopped)
        self.assertFalse(top.running)
