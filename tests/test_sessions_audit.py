"""
Audit before access: a relayed session's C{session.started} is committed to the store
before the operator's channel is confirmed, and a session whose start cannot be written
is refused (fail-closed) or goes on with a logged warning (fail-open, following
C{--recording-failure}). In memory: the real front door (InMemoryFleet) over a store
whose C{session.started} writes wait for the test (HeldAuditStore).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.recording import Recorder, RecordingPolicy
from groundcontrol.sessions import SessionRegistry, attachSessions
from groundcontrol.store import StoreError
from groundcontrol.testing import (
    HeldAuditStore,
    InMemoryFleet,
    echoScript,
    openMemoryStore,
    resultNow,
    scriptedSessions,
)

DISK_FULL = StoreError(
    "the database cannot be written (database or disk is full); nothing was changed"
)


class AuditBeforeAccessTestCase(SynchronousTestCase):
    """Device kiln7 with a scripted agent; alice granted; session.started writes held."""

    auditFailOpen: bool | None = None

    def setUp(self) -> None:
        self.store = HeldAuditStore(openMemoryStore(), frozenset({"session.started"}))
        self.fleet = InMemoryFleet(store=self.store)
        self.sessions = attachSessions(
            self.fleet.registry,
            SessionRegistry(self.store, self.fleet.clock, auditFailOpen=self.auditFailOpen),
        )
        deviceKey = self.fleet.enrollDevice("kiln7")
        aliceKey = self.fleet.addOperator("alice")
        self.fleet.grant("alice", "kiln7")
        self.device: list[Any] = []
        self.fleet.agent("kiln7", deviceKey, scriptedSessions(echoScript, record=self.device))
        self.alice = self.fleet.operator("dev_kiln7", aliceKey)

    def audit(self, event: str) -> list[Any]:
        return [e for e in resultNow(self.store.auditSince(0, 1000)) if e.event == event]


class FailClosedTests(AuditBeforeAccessTestCase):
    def test_confirmedOnlyAfterStartedCommitted(self) -> None:
        """
        While session.started is being written the device's channel is open but the
        operator's is not confirmed (no byte can flow); once the store's Deferred fires
        with the row committed, the channel is confirmed and the session runs.
        """
        session = self.fleet.session(self.alice)
        self.assertEqual(len(self.store.held), 1)
        self.assertEqual(len(self.device), 1)  # the device side is open
        self.assertFalse(session.isOpen)
        self.assertIsNone(session.openFailure)
        self.assertEqual(self.audit("session.started"), [])
        self.store.release()
        (started,) = self.audit("session.started")  # committed ...
        self.assertFalse(session.isOpen)  # ... before the confirmation went out
        self.fleet.flush()
        self.assertTrue(session.isOpen)
        self.assertEqual(started.actor, "alice")
        self.assertEqual(started.device, "kiln7")
        self.assertTrue(started.detail["client"].startswith("127.0.0.1:"))
        self.assertIsNotNone(started.detail["key_fingerprint"])
        session.exec(b"echo")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        (ended,) = self.audit("session.ended")
        self.assertEqual(ended.detail["id"], started.detail["id"])
        self.assertIsNone(ended.detail["audit_error"])

    def test_failedWriteRefusesSession(self) -> None:
        """
        Fail-closed: when session.started cannot be written (disk full, database locked)
        the operator's channel is refused with the reason, the device's channel is
        closed, and the session is neither live nor audited as ended.
        """
        session = self.fleet.session(self.alice)
        with capturedLogs() as logs:
            self.store.fail(DISK_FULL)
            self.fleet.flush()
        self.assertFalse(session.isOpen)
        self.assertEqual(
            session.openFailureText,
            "session refused: it cannot be audited: the database cannot be written "
            "(database or disk is full); nothing was changed",
        )
        self.assertTrue(self.device[0].isClosed)
        self.assertEqual(self.sessions.live, {})
        self.assertEqual(self.audit("session.ended"), [])
        self.assertTrue(any("refused: cannot audit it" in formatEvent(e) for e in logs))

    def test_operatorLeavesWhileWriting(self) -> None:
        """
        An operator who leaves while session.started is written gets no channel; the
        device's side is closed and the log holds a matching session.ended (no session
        stays 'open' in the log).
        """
        session = self.fleet.session(self.alice)
        self.fleet.network.cut(self.fleet.network.pumps[-1])
        self.fleet.flush()
        self.store.release()
        self.fleet.flush()
        self.assertFalse(session.isOpen)
        self.assertTrue(self.device[0].isClosed)
        self.assertEqual(self.sessions.live, {})
        (started,) = self.audit("session.started")
        (ended,) = self.audit("session.ended")
        self.assertEqual(ended.detail["id"], started.detail["id"])

    def test_deviceGoneWhileWriting(self) -> None:
        """
        A device link lost while session.started is written: the operator is refused
        (never confirmed into a dead session) and session.ended follows session.started.
        """
        session = self.fleet.session(self.alice)
        self.fleet.network.cut(self.fleet.network.pumps[0])  # the agent's link
        self.fleet.flush()
        self.store.release()
        self.fleet.flush()
        self.assertFalse(session.isOpen)
        self.assertIn("closed the channel", session.openFailureText)
        self.assertEqual(self.sessions.live, {})
        self.assertEqual(len(self.audit("session.ended")), 1)


class FailOpenTests(AuditBeforeAccessTestCase):
    auditFailOpen = True

    def test_failedWriteGoesOnAndSaysSo(self) -> None:
        """
        Fail-open: a session whose session.started could not be written runs, the log
        says it goes on unaudited, and its session.ended carries the reason.
        """
        session = self.fleet.session(self.alice)
        with capturedLogs() as logs:
            self.store.fail(DISK_FULL)
            self.fleet.flush()
        self.assertTrue(session.isOpen)
        self.assertTrue(any("goes on unaudited: cannot audit" in formatEvent(e) for e in logs))
        session.exec(b"echo")
        self.fleet.flush()
        self.fleet.clock.advance(0)
        self.fleet.flush()
        self.assertTrue(session.isClosed)
        self.assertEqual(self.audit("session.started"), [])
        (ended,) = self.audit("session.ended")
        self.assertIn("database or disk is full", ended.detail["audit_error"])


class PolicyTests(SynchronousTestCase):
    def test_followsRecordingFailurePolicy(self) -> None:
        """
        Unless set explicitly, the audit failure policy is --recording-failure's: open
        with a fail-open recorder, closed with a fail-closed one or none.
        """
        store, clock = openMemoryStore(), InMemoryFleet().clock

        def registry(failOpen: bool | None, **kwargs: Any) -> SessionRegistry:
            if failOpen is None:
                return SessionRegistry(store, clock, **kwargs)
            recorder = Recorder(RecordingPolicy(failOpen=failOpen), clock)
            return SessionRegistry(store, clock, recorder=recorder, **kwargs)

        self.assertTrue(registry(True).auditFailOpen)
        self.assertFalse(registry(False).auditFailOpen)
        self.assertFalse(registry(None).auditFailOpen)
        self.assertFalse(registry(True, auditFailOpen=False).auditFailOpen)
        self.assertTrue(registry(None, auditFailOpen=True).auditFailOpen)
