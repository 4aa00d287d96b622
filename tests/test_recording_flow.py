"""
Back-pressure from a session's recording to the device, in memory: while the recording's
writer is behind (a runner whose writes are completed by hand), groundcontrol stops
crediting the device's channel, so the device's output pauses; once the writes are done
it resumes, and the session ends normally with every byte recorded.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from twisted.conch.ssh import common
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.channel import DEFAULT_WINDOW
from groundcontrol.recording import Recorder, RecordingPolicy, parseCast
from groundcontrol.sessions import SessionRegistry, attachSessions
from groundcontrol.testing import InMemoryFleet, Script, resultNow, scriptedSessions
from tests.test_recording import HeldRunner

#: More than the device's window plus its own queue, so that it must wait for credit.
STREAM = 4 * DEFAULT_WINDOW


def stream(command: bytes | None) -> Script | None:
    return Script(stream=STREAM)


class RecordingBackPressureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(__import__("shutil").rmtree, self.directory, True)
        self.runner = HeldRunner()
        policy = RecordingPolicy(directory=self.directory, maxBacklog=256 * 1024)
        recorder = Recorder(policy, self.fleet.clock, runner=self.runner)
        attachSessions(
            self.fleet.registry,
            SessionRegistry(self.fleet.store, self.fleet.clock, recorder=recorder),
        )
        deviceKey = self.fleet.enrollDevice("kiln7")
        aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        self.device: list = []
        self.fleet.agent("kiln7", deviceKey, scriptedSessions(stream, record=self.device))
        self.alice = self.fleet.operator("dev_kiln7", aliceKey)

    def pump(self) -> None:
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()

    def test_outputPausesWhileBehindAndResumes(self) -> None:
        """
        The writer never completes: the device stops after about one window of output
        (it is not credited), far short of the stream. Completing the writes releases
        it; the session ends with status 0 and the cast holds every byte.
        """
        session = self.fleet.session(self.alice)
        pty = common.NS(b"xterm") + struct.pack(">4L", 80, 24, 0, 0) + common.NS(b"")
        session.request(b"pty-req", pty)
        session.exec(b"stream")
        self.pump()
        for _ in range(5):  # whatever the clock does, nothing moves while held
            self.fleet.clock.advance(1.0)
            self.pump()
        (device,) = self.device
        held = len(session.output)
        self.assertGreater(held, 0)
        self.assertLessEqual(held, DEFAULT_WINDOW + 256 * 1024)
        self.assertLess(device.produced, STREAM)
        self.assertFalse(session.isClosed)
        (deviceSide,) = [c for c in self.fleet.relayChannels() if not c.towardsOperator]
        self.assertIsNotNone(deviceSide._heldCredit)

        rounds = 0
        while not session.isClosed and rounds < 1000:
            rounds += 1
            self.runner.runAll()  # the writer catches up: credit flows again
            self.fleet.clock.advance(1.0)
            self.pump()
        self.runner.runAll()
        self.assertTrue(session.isClosed)
        self.assertEqual(len(session.output), STREAM)
        self.assertEqual(session.exitStatus, 0)
        self.assertGreater(rounds, 2)  # it was held back more than once on the way
        (path,) = self.directory.rglob("*.cast")
        cast = parseCast(path.read_bytes())
        self.assertEqual(sum(len(t) for _, c, t in cast.events if c == "o"), STREAM)
        ended = [
            e for e in resultNow(self.fleet.store.auditSince(0, 1000)) if e.event == "session.ended"
        ]
        self.assertEqual(len(ended), 1)
        self.assertIsNone(ended[0].detail.get("recording_error"))
