"""
The fleet watcher's audit retention sweep (--audit-max-age): every lease check it removes
one batch of audit rows older than the age, says so in one log line (the store writes the
audit row), keeps everything without an age, and goes on reading the feed after it.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.fleetwatch import (
    AUDIT_PRUNE_BATCH,
    DEFAULT_LEASE_CHECK_INTERVAL,
    FleetWatcher,
)
from groundcontrol.registry import Registry
from groundcontrol.store import AUDIT_PRUNED
from groundcontrol.tap import Options
from groundcontrol.testing import openMemoryStore, resultNow
from tests.test_enrollment import RecordingNotifier

DAY = 86400.0
YEAR = 365 * DAY
T0 = 1_700_000_000.0


class RetentionSweepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = openMemoryStore()
        self.clock = Clock()
        self.clock.advance(T0)
        self.notifier = RecordingNotifier()

    def watcher(self, auditMaxAge: float | None) -> FleetWatcher:
        watcher = FleetWatcher(
            self.store,
            Registry(),
            self.clock,
            notifier=self.notifier,
            auditMaxAge=auditMaxAge,
        )
        resultNow(watcher.poll())  # the first poll starts at the newest id
        return watcher

    def write(self, count: int, event: str = "device.online") -> list[int]:
        """Audit C{count} rows at the clock's time."""
        now = self.clock.seconds()
        return [
            resultNow(self.store.audit(event, None, "kiln7", {"n": n}, now)).id
            for n in range(count)
        ]

    def kinds(self) -> list[str]:
        return [e.event for e in resultNow(self.store.auditSince(0, 10_000))]

    def test_sweepRemovesOneBatchPerLeaseCheck(self) -> None:
        """
        Rows older than the age go, at most a batch per lease check, each batch with one
        audit.pruned row and one log line; rows younger than the age stay.
        """
        old = self.write(AUDIT_PRUNE_BATCH + 5)
        watcher = self.watcher(YEAR)
        self.clock.advance(YEAR - DAY)
        young = self.write(1)
        self.clock.advance(2 * DAY)
        with capturedLogs() as seen:
            resultNow(watcher.poll())
        lines = [formatEvent(e) for e in seen if "audit retention" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertIn(f"removed {AUDIT_PRUNE_BATCH} audit rows up to id {old[-6]}", lines[0])
        self.assertEqual(self.kinds().count("device.online"), 5 + 1)
        # Not before the next lease check.
        self.clock.advance(DEFAULT_LEASE_CHECK_INTERVAL / 2)
        resultNow(watcher.poll())
        self.assertEqual(self.kinds().count("device.online"), 5 + 1)
        self.clock.advance(DEFAULT_LEASE_CHECK_INTERVAL / 2)
        resultNow(watcher.poll())
        events = resultNow(self.store.auditSince(0, 10_000))
        self.assertEqual(
            [(e.event, e.id) for e in events if e.event == "device.online"],
            [("device.online", young[0])],
        )
        pruned = [e.detail["audit_rows"] for e in events if e.event == AUDIT_PRUNED]
        self.assertEqual(pruned, [AUDIT_PRUNE_BATCH, 5])
        # A third sweep finds nothing old enough: no row, no line.
        self.clock.advance(DEFAULT_LEASE_CHECK_INTERVAL)
        with capturedLogs() as seen:
            resultNow(watcher.poll())
        self.assertEqual([e for e in seen if "audit retention" in formatEvent(e)], [])
        self.assertEqual(self.kinds().count(AUDIT_PRUNED), 2)

    def test_withoutAnAgeEverythingStays(self) -> None:
        """The default keeps every row, however old."""
        self.write(3)
        watcher = self.watcher(None)
        self.clock.advance(10 * YEAR)
        resultNow(watcher.poll())
        self.assertEqual(self.kinds(), ["device.online"] * 3)

    def test_feedReadAfterTheSweep(self) -> None:
        """
        Events written since the watcher's last read are notified once each, in the poll
        whose sweep removed the rows before them.
        """
        self.write(3)
        watcher = self.watcher(YEAR)
        self.clock.advance(YEAR + DAY)
        self.write(2, "device.revoked")
        resultNow(watcher.poll())
        self.assertEqual([e.event for e in self.notifier.events], ["device.revoked"] * 2)
        self.assertEqual(self.kinds(), ["device.revoked"] * 2 + [AUDIT_PRUNED])
        self.clock.advance(DEFAULT_LEASE_CHECK_INTERVAL)
        resultNow(watcher.poll())
        self.assertEqual(len(self.notifier.events), 2)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--data", "/nonexistent", *argv])
    return options


def test_auditMaxAgeOption() -> None:
    """
    --audit-max-age takes a duration of at least a day, or never (the default: keep
    everything); anything else is refused, saying what it takes.
    """
    assert parse().toConfig().auditMaxAge is None
    assert parse("--audit-max-age", "never").toConfig().auditMaxAge is None
    assert parse("--audit-max-age", "365d").toConfig().auditMaxAge == YEAR
    assert parse("--audit-max-age", "1d").toConfig().auditMaxAge == DAY
    with pytest.raises(UsageError, match=r"--audit-max-age: .*or 'never'"):
        parse("--audit-max-age", "soon")
    with pytest.raises(UsageError, match="at least 1d"):
        parse("--audit-max-age", "23h")


def test_auditMaxAgeCapsRecordings() -> None:
    """
    A recording is found through its session's audit rows, so it may not outlive them:
    without --recording-max-age the audit's age applies; a longer one is refused.
    """
    assert parse("--audit-max-age", "90d").toConfig().recordingMaxAge == 90 * DAY
    config = parse("--audit-max-age", "90d", "--recording-max-age", "30d").toConfig()
    assert (config.auditMaxAge, config.recordingMaxAge) == (90 * DAY, 30 * DAY)
    with pytest.raises(UsageError, match="--recording-max-age cannot be longer"):
        parse("--audit-max-age", "90d", "--recording-max-age", "91d")
    assert parse("--recording-max-age", "30d").toConfig().recordingMaxAge == 30 * DAY
