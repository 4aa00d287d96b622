"""
accesstunnel.reactor: TunnelEPollReactor dispatches reads, writes and disconnects as Twisted's
EPollReactor does, logs a failing selectable's exception with its log prefix and disconnects
it, as stock; twistd finds it by name and the agent's launcher installs it.

Every scenario runs on a private reactor of each class (never the global one), over a
socketpair, driven by hand with ``doPoll(0)`` (nothing waits), and the two records must match.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

from twisted.application.reactors import IReactorInstaller
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionFdescWentAway, ConnectionLost
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.reactor import REACTOR_NAME, TunnelEPollReactor

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "Recorder,7,127.0.0.1"


class BoomError(Exception):
    """What a failing selectable raises."""


class Recorder:
    """A read/write descriptor over one end of a socketpair that records what it is asked."""

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        self.reactor = reactor
        self.sock = sock
        self.events: list[tuple[Any, ...]] = []
        self.failRead = False
        self.failLost = False
        self.closed = False

    def logPrefix(self) -> str:
        return PREFIX

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def doRead(self) -> object:
        if self.failRead:
            raise BoomError("doRead")
        data = self.sock.recv(4096)
        self.events.append(("read", data))
        return None if data else CONNECTION_DONE

    def doWrite(self) -> None:
        self.events.append(("write",))
        self.reactor.removeWriter(self)  # all written, as a FileDescriptor stops writing

    def connectionLost(self, reason: Failure) -> None:
        self.events.append(("lost", reason.type, str(reason.value)))
        if self.failLost:
            raise BoomError("connectionLost")


def scenario(test: SynchronousTestCase, reactorType: type, steps: Any) -> dict[str, Any]:
    """
    Run C{steps(reactor, recorder, peer)} on a private C{reactorType} with a L{Recorder} on
    one end of a socketpair, and return what the recorder was asked, what was logged as an
    error (system and exception type) and whether the reactor still watches it.
    """
    reactor = reactorType()
    ours, peer = socket.socketpair()
    test.addCleanup(ours.close)
    test.addCleanup(peer.close)
    test.addCleanup(reactor._poller.close)
    test.addCleanup(reactor.waker.connectionLost, None)
    logged: list[tuple[Any, ...]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("isError") and "failure" in event:
            logged.append((event.get("log_system"), event["failure"].type))

    recorder = Recorder(reactor, ours)
    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        steps(reactor, recorder, peer)
    finally:
        globalLogPublisher.removeObserver(observer)
    return {
        "events": recorder.events,
        "logged": logged,
        "reading": recorder in reactor.getReaders(),
        "writing": recorder in reactor.getWriters(),
    }


def both(test: SynchronousTestCase, steps: Any) -> dict[str, Any]:
    """The record of C{steps} on a L{TunnelEPollReactor}, after asserting stock's is equal."""
    stock = scenario(test, EPollReactor, steps)
    ours = scenario(test, TunnelEPollReactor, steps)
    test.assertEqual(ours, stock)
    return ours


class DispatchTests(SynchronousTestCase):
    def test_readsThenCleanClose(self) -> None:
        """
        Readable data reaches doRead; the peer's close reaches doRead as EOF and then
        connectionLost with ConnectionDone, and the reactor stops watching: as stock.
        """

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            reactor.addReader(recorder)
            reactor.doPoll(0)  # nothing to read yet
            peer.sendall(b"keystroke")
            reactor.doPoll(0)
            peer.close()
            reactor.doPoll(0)

        record = both(self, steps)
        self.assertEqual(
            record["events"],
            [
                ("read", b"keystroke"),
                ("read", b""),
                ("lost", ConnectionDone, str(ConnectionDone())),
            ],
        )
        self.assertEqual(record["logged"], [])
        self.assertFalse(record["reading"])

    def test_writes(self) -> None:
        """A writable descriptor gets doWrite, once per poll while it is a writer: as stock."""

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            reactor.addWriter(recorder)
            reactor.doPoll(0)
            reactor.doPoll(0)  # removed itself as a writer: nothing more
            reactor.addWriter(recorder)
            reactor.doPoll(0)

        record = both(self, steps)
        self.assertEqual(record["events"], [("write",), ("write",)])
        self.assertFalse(record["writing"])

    def test_hangUpWhileOnlyWriting(self) -> None:
        """
        A hang-up on a descriptor that is only writing (no read pending) is connectionLost
        with ConnectionLost, without doRead or doWrite: as stock.
        """

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            reactor.addWriter(recorder)
            peer.close()
            reactor.doPoll(0)

        record = both(self, steps)
        self.assertEqual(record["events"], [("lost", ConnectionLost, str(ConnectionLost()))])
        self.assertFalse(record["writing"])

    def test_readableWithoutADescriptor(self) -> None:
        """
        A readable event for a selectable whose fileno() is already -1 disconnects it
        without doRead (connectionLost with the no-descriptor reason): as stock.
        """

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            reactor.addReader(recorder)
            peer.sendall(b"x")
            recorder.closed = True
            reactor.doPoll(0)

        record = both(self, steps)
        self.assertEqual(len(record["events"]), 1)
        self.assertEqual(record["events"][0][:2], ("lost", ConnectionFdescWentAway))
        self.assertEqual(record["logged"], [])

    def test_aReadGoesStraightToDoRead(self) -> None:
        """
        An event that is a read and nothing else goes from doPoll to doRead without
        _doReadOrWrite (one frame fewer before a keystroke's read); a write still goes
        through it. The records above prove that both branches behave as stock.
        """

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            routed: list[int] = []
            reactor._doReadOrWrite = lambda selectable, fd, event: routed.append(event)
            reactor.addReader(recorder)
            peer.sendall(b"keystroke")
            reactor.doPoll(0)
            self.assertEqual(routed, [])
            reactor.removeReader(recorder)
            reactor.addWriter(recorder)
            reactor.doPoll(0)
            self.assertEqual(len(routed), 1)

        record = scenario(self, TunnelEPollReactor, steps)
        self.assertEqual(record["events"], [("read", b"keystroke")])


class FailureTests(SynchronousTestCase):
    def test_doReadRaises(self) -> None:
        """
        An exception from doRead is logged as an error with the selectable's log prefix as its
        system, and the selectable is disconnected with that exception as the reason: as stock.
        """

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            reactor.addReader(recorder)
            recorder.failRead = True
            peer.sendall(b"x")
            reactor.doPoll(0)

        record = both(self, steps)
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 2)  # one per reactor
        self.assertEqual(record["events"], [("lost", BoomError, "doRead")])
        self.assertEqual(record["logged"], [(PREFIX, BoomError)])
        self.assertFalse(record["reading"])

    def test_connectionLostRaises(self) -> None:
        """
        An exception from connectionLost is logged with the selectable's log prefix and does
        not leave doPoll, so the next event is still dispatched: as stock.
        """

        def steps(reactor: Any, recorder: Recorder, peer: socket.socket) -> None:
            other, otherPeer = socket.socketpair()
            self.addCleanup(other.close)
            self.addCleanup(otherPeer.close)
            second = Recorder(reactor, other)
            reactor.addReader(recorder)
            reactor.addReader(second)
            recorder.failLost = True
            peer.close()
            otherPeer.sendall(b"next")
            reactor.doPoll(0)
            recorder.events.extend(second.events)

        record = both(self, steps)
        self.assertEqual(len(self.flushLoggedErrors(BoomError)), 2)
        self.assertIn(("read", b"next"), record["events"])
        self.assertIn(("lost", ConnectionDone, str(ConnectionDone())), record["events"])
        self.assertEqual(record["logged"], [(PREFIX, BoomError)])


class InstallTests(SynchronousTestCase):
    def test_pluginNamesTheModule(self) -> None:
        """twistd's --reactor finds accesstunnel-epoll, implemented by accesstunnel.reactor."""
        installers = {r.shortName: r for r in getPlugins(IReactorInstaller)}
        self.assertIn(REACTOR_NAME, installers)
        self.assertEqual(installers[REACTOR_NAME].moduleName, "accesstunnel.reactor")

    def installed(self, code: str) -> str:
        """The reactor class a fresh Python process installs by running C{code}."""
        done = subprocess.run(
            [sys.executable, "-c", code + "\nprint(type(reactor).__name__)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def test_twistdReactorOption(self) -> None:
        """Installing the reactor by its name, as twistd --reactor does, installs ours."""
        code = (
            "from twisted.application.reactors import installReactor\n"
            f"reactor = installReactor({REACTOR_NAME!r})"
        )
        self.assertEqual(self.installed(code), "TunnelEPollReactor")

    def test_launcherInstallsIt(self) -> None:
        """The agent's launcher (tunnel-agentd) runs on TunnelEPollReactor."""
        code = "from agent import launcher\nreactor = launcher.importReactor()"
        self.assertEqual(self.installed(code), "TunnelEPollReactor")

    def test_defaultUnchanged(self) -> None:
        """A process that asks for no reactor still gets Twisted's own epoll reactor."""
        code = "from twisted.internet import reactor"
        self.assertEqual(self.installed(code), "EPollReactor")

    def test_accesstunnelTwistdInstallsItFirst(self) -> None:
        """
        C{python -m accesstunnel.twistd} installs ours before twistd runs, so a plugin that
        imports the reactor while Twisted rebuilds its plugin cache (txtorcon's does) gets
        ours instead of installing the default. twistd's C{run} is replaced here by that
        import.
        """
        code = (
            "import twisted.scripts.twistd as twistd\n"
            "twistd.run = lambda: __import__('twisted.plugins.txtorcon_endpoint_parser')\n"
            "from accesstunnel.twistd import main\n"
            "main()\n"
            "from twisted.internet import reactor"
        )
        self.assertEqual(self.installed(code), "TunnelEPollReactor")

    def test_reactorOptionFailsAfterAPluginScan(self) -> None:
        """
        Why the units do not use C{twistd --reactor accesstunnel-epoll}: once a plugin-cache
        rebuild has imported txtorcon's plugin, the default reactor is installed and naming
        ours fails.
        """
        code = (
            "import twisted.plugins.txtorcon_endpoint_parser\n"
            "from twisted.application.reactors import installReactor\n"
            "from twisted.internet.error import ReactorAlreadyInstalledError\n"
            "try:\n"
            f"    installReactor({REACTOR_NAME!r})\n"
            "except ReactorAlreadyInstalledError:\n"
            "    pass\n"
            "from twisted.internet import reactor"
        )
        self.assertEqual(self.installed(code), "EPollReactor")
