"""
accesstunnel.reaping, the reactor's SIGCHLD handling, reaps only the children that exited
(reapExited), each through its own Twisted handler, not every child Twisted knows (stock
reapAllProcesses); a child no handler knows makes it do what stock does. Real children
(C{cat}, waiting on a pipe), Twisted's handler table replaced by the test's own; no reactor
runs.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import process
from twisted.internet._signals import _ChildSignalHandling
from twisted.trial.unittest import SynchronousTestCase

import accesstunnel.reactor
from accesstunnel import reaping
from accesstunnel.reactor import TunnelEPollReactor
from accesstunnel.reaping import ExitedChildHandling, ExitedChildWaker, reapExited


class Handler:
    """A Twisted reap handler (C{reapProcess} as C{_BaseProcess}'s) that records its calls."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tried = 0
        self.status: int | None = None

    def reapProcess(self) -> None:
        self.tried += 1
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            process.unregisterReapProcessHandler(pid, self)
            self.status = status


class ReapExitedTests(SynchronousTestCase):
    """L{reapExited} with children that run, exit, and one that no handler knows."""

    def setUp(self) -> None:
        self.patch(process, "reapProcessHandlers", {})

    def child(self, register: bool = True) -> Handler:
        """A running C{cat} on a pipe, with a handler registered unless not C{register}."""
        read, write = os.pipe()
        self.addCleanup(os.close, write)
        pid = os.posix_spawn("/bin/cat", ["cat"], {}, file_actions=[(os.POSIX_SPAWN_DUP2, read, 0)])
        os.close(read)
        handler = Handler(pid)
        if register:
            process.registerReapProcessHandler(pid, handler)

        def end() -> None:
            try:
                if not os.waitpid(pid, os.WNOHANG)[0]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped by the test

        self.addCleanup(end)
        return handler

    def exit(self, handler: Handler) -> None:
        """Kill the child and wait until it has exited, without reaping it."""
        os.kill(handler.pid, signal.SIGTERM)
        os.waitid(os.P_PID, handler.pid, os.WEXITED | os.WNOWAIT)

    def test_onlyTheExitedChildIsTried(self) -> None:
        """
        Of three children, the one that exited is reaped through its handler;
        the two still running are not even tried (stock would waitpid each).
        """
        first, second, third = self.child(), self.child(), self.child()
        self.exit(second)
        reapExited()
        self.assertEqual((first.tried, second.tried, third.tried), (0, 1, 0))
        assert second.status is not None
        self.assertEqual(os.waitstatus_to_exitcode(second.status), -signal.SIGTERM)
        self.assertEqual(set(process.reapProcessHandlers), {first.pid, third.pid})

    def test_everyExitedChildIsReaped(self) -> None:
        """Two children exited before one SIGCHLD was handled: both are reaped."""
        first, second, third = self.child(), self.child(), self.child()
        self.exit(first)
        self.exit(third)
        reapExited()
        self.assertEqual((first.tried, second.tried, third.tried), (1, 0, 1))
        self.assertEqual(set(process.reapProcessHandlers), {second.pid})

    def test_nothingExited(self) -> None:
        """A SIGCHLD with no child exited (a stopped child) reaps nothing and tries nothing."""
        first = self.child()
        reapExited()
        self.assertEqual(first.tried, 0)
        self.assertEqual(set(process.reapProcessHandlers), {first.pid})

    def test_unknownChildAsStock(self) -> None:
        """
        An exited child no handler knows: every known child is tried, as stock
        Twisted does, the exited known one is reaped, and the unknown one is left
        for whoever started it.
        """
        known, unknown, running = self.child(), self.child(register=False), self.child()
        self.exit(unknown)
        self.exit(known)
        reapExited()
        self.assertEqual((known.tried, running.tried), (1, 1))
        self.assertEqual(set(process.reapProcessHandlers), {running.pid})
        self.assertEqual(os.waitpid(unknown.pid, os.WNOHANG)[0], unknown.pid)


class SignalHandlingTests(SynchronousTestCase):
    """The reactor's SIGCHLD handling is the one that reaps with L{reapExited}."""

    def test_reactorReapsExitedOnly(self) -> None:
        """
        L{TunnelEPollReactor}'s signal handling holds L{ExitedChildHandling},
        whose waker reaps with L{reapExited}, and still the base handling
        (SIGINT/SIGTERM).
        """
        reactor = TunnelEPollReactor()
        self.addCleanup(reactor._poller.close)
        handlings: Any = reactor._signalsFactory()._signalHandlings  # type: ignore[attr-defined]
        self.assertEqual(len(handlings), 2)
        child = handlings[1]
        self.assertIsInstance(child, ExitedChildHandling)
        added: list[Any] = []
        child._addInternalReader = added.append
        child._removeInternalReader = added.remove
        reaped: list[int] = []
        self.patch(process, "reapAllProcesses", lambda: reaped.append(0))
        child.install()
        self.addCleanup(child.uninstall)
        [waker] = added
        self.assertIsInstance(waker, ExitedChildWaker)
        self.assertEqual(reaped, [0])  # once at install, for children that ended before
        calls: list[int] = []
        self.patch(reaping, "reapExited", lambda: calls.append(1))
        os.write(waker.o, b"x")
        waker.doRead()
        self.assertEqual(calls, [1])

    def test_stockWithoutTwistedsPrivateClasses(self) -> None:
        """
        If L{accesstunnel.reaping} could not be imported (a Twisted release moved its private
        signal classes), the reactor handles signals as Twisted's own does.
        """
        self.patch(accesstunnel.reactor, "reapingSignals", None)
        reactor = TunnelEPollReactor()
        self.addCleanup(reactor._poller.close)
        handlings: Any = reactor._signalsFactory()._signalHandlings  # type: ignore[attr-defined]
        self.assertFalse(any(isinstance(h, ExitedChildHandling) for h in handlings))
        self.assertTrue(any(isinstance(h, _ChildSignalHandling) for h in handlings))
