"""
Pending requests that go stale are let go, and an admin can reject one: the fleet watcher's
expiry sweep and the control shell's and admin CLI's reject, with real agents in memory
(tests/test_enrollment.py's World: one task.Clock, no reactor, no sleeps).

Before, a request left the queue only by being approved or claimed: once the queue was
full (an attacker with a few dozen addresses, a rollout gone wrong) no device could enroll,
by token or claim either, until an admin cleared it by hand, which nothing let them do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from accesstunnel.keys import fingerprint
from groundcontrol.cli import main
from groundcontrol.datadir import DataDir
from groundcontrol.fleetwatch import (
    DEFAULT_LEASE_CHECK_INTERVAL,
    DEFAULT_PENDING_EXPIRY,
    FleetWatcher,
)
from groundcontrol.registry import Registry
from groundcontrol.store import PendingLimits, openSQLiteStore, synchronousRunner
from groundcontrol.tap import Options
from groundcontrol.testing import newKey, publicLine, resultNow
from tests.test_enrollment import DAY, HOUR, T0, EnrollmentTestCase, RecordingNotifier, World

#: Past the default expiry, by one sweep.
EXPIRED = DEFAULT_PENDING_EXPIRY + DEFAULT_LEASE_CHECK_INTERVAL


def removals(notifier: RecordingNotifier) -> list[tuple[str, str]]:
    """The request removals the notifier was told of, as (event, device)."""
    return [k for k in notifier.kinds() if k[0].startswith("enrollment.")]


class ExpirySweepTests(EnrollmentTestCase):
    """The fleet watcher removes requests nobody has seen for the pending expiry (7 d)."""

    def test_fullQueueOfStaleRequestsFreesUp(self) -> None:
        """
        The cap (3) is full of requests whose agents went away: a new device is refused.
        Past the expiry each stale request is removed and notified as enrollment.expired,
        and the new device gets in and waits as pending.
        """
        self.world = World(self.temporaryDirectory(), pendingLimits=PendingLimits(total=3))
        self.fleet = self.world.fleet
        for n in range(3):
            self.world.disconnect(self.world.start(f"junk{n}", host=f"10.0.0.{n + 1}"))
        refused = self.world.start("oven2", host="10.0.1.1")
        self.assertFalse(refused.connected)
        self.world.advance(DEFAULT_PENDING_EXPIRY - HOUR)
        self.world.poll()
        self.assertEqual(len(self.world.requests()), 3)

        self.world.advance(HOUR + DEFAULT_LEASE_CHECK_INTERVAL)
        self.world.poll()
        self.assertEqual(self.world.requests(), {})
        self.assertEqual(
            sorted(removals(self.world.notifier)),
            [("enrollment.expired", f"junk{n}") for n in range(3)],
        )
        expired = [e for e in self.world.notifier.events if e.event == "enrollment.expired"]
        self.assertEqual({e.actor for e in expired}, {None})
        self.world.connect(refused, host="10.0.1.1")
        self.assertPending(refused)

    def test_connectedAgentNeverExpires(self) -> None:
        """
        A pending agent that stays connected for twice the expiry is kept, and its request
        is seen at most an hour ago; once it goes away it expires a week later.
        """
        agent = self.world.start("oven2")
        for _ in range(int(2 * DEFAULT_PENDING_EXPIRY / HOUR)):
            self.world.advance(HOUR)
            self.world.poll()
        self.assertPending(agent)
        self.assertGreaterEqual(
            self.world.requests()[agent.fingerprint].lastSeen, self.world.now - HOUR
        )
        self.world.disconnect(agent)
        self.world.advance(EXPIRED)
        self.world.poll()
        self.assertEqual(self.world.requests(), {})
        self.assertEqual(removals(self.world.notifier), [("enrollment.expired", "oven2")])

    def test_connectedThroughAClockJump(self) -> None:
        """Time jumps past the expiry in one step: the connected agent's request is kept."""
        agent = self.world.start("oven2")
        self.world.advance(2 * DEFAULT_PENDING_EXPIRY)
        self.world.poll()
        self.assertPending(agent)
        self.assertEqual(self.world.requests()[agent.fingerprint].lastSeen, self.world.now)
        self.assertEqual(removals(self.world.notifier), [])

    def test_anotherNodeDoesNotExpireAConnectedAgent(self) -> None:
        """
        Two nodes share the store; the agent is connected to this one. The other node's
        sweep, every 30 min for two weeks, never finds the request stale: this node marks
        it seen every hour.
        """
        agent = self.world.start("oven2")
        other = FleetWatcher(self.fleet.store, Registry(), self.world.clock)
        resultNow(other.poll())
        for _ in range(int(2 * DEFAULT_PENDING_EXPIRY / (HOUR / 2))):
            self.world.advance(HOUR / 2)
            resultNow(other.poll())
            self.world.poll()
        self.assertPending(agent)
        self.assertEqual(removals(self.world.notifier), [])

    def test_expiryOff(self) -> None:
        """With no expiry (--pending-expiry never) a request waits until someone decides."""
        watcher = FleetWatcher(self.fleet.store, Registry(), self.world.clock, pendingExpiry=None)
        resultNow(watcher.poll())
        self.world.disconnect(self.world.start("oven2"))
        self.world.advance(10 * DEFAULT_PENDING_EXPIRY)
        resultNow(watcher.poll())
        self.assertEqual(len(self.world.requests()), 1)


class RejectTests(EnrollmentTestCase):
    """An admin rejects a pending request with ctl reject NAME [--key SHA256:...]."""

    def test_rejectDisconnectsAndMayAskAgain(self) -> None:
        """
        The request goes, audited and notified as enrollment.rejected by the admin; the
        fleet watcher disconnects the pending agent; connecting again it is a new request.
        """
        agent = self.world.start("oven2")
        status, out, err = self.world.ctl(self.admin, "reject oven2")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"rejected the request for oven2 ({agent.fingerprint})\n")
        self.assertEqual(self.world.requests(), {})
        self.world.poll()
        self.assertFalse(agent.connected)
        (rejected,) = [e for e in self.world.notifier.events if e.event == "enrollment.rejected"]
        self.assertEqual((rejected.device, rejected.actor), ("oven2", "root"))
        self.assertEqual(rejected.detail["fingerprint"], agent.fingerprint)
        self.world.advance(5)
        self.world.connect(agent)
        self.assertPending(agent)
        self.assertEqual(self.world.requests()[agent.fingerprint].firstSeen, self.world.now)

    def test_reconnectedBeforeTheWatcherLooked(self) -> None:
        """
        An agent that was rejected, went away and came back before the watcher's next poll
        has made a new request: its new link is left alone.
        """
        agent = self.world.start("oven2")
        self.world.ctl(self.admin, "reject oven2")
        self.world.disconnect(agent)
        self.world.advance(1)
        self.world.connect(agent)
        self.world.poll()
        self.assertPending(agent)

    def test_rejectByKeyAndJSON(self) -> None:
        """
        Two keys ask for one name: reject alone refuses and lists both; --key rejects one,
        and --json prints its request document in state rejected.
        """
        first, second = self.world.start("oven2"), self.world.start("oven2")
        status, _, err = self.world.ctl(self.admin, "reject oven2")
        self.assertEqual(status, 1)
        self.assertIn(first.fingerprint, err)
        self.assertIn(second.fingerprint, err)
        status, out, _ = self.world.ctl(
            self.admin, f"reject oven2 --key {second.fingerprint} --json"
        )
        self.assertEqual(status, 0)
        document = json.loads(out)
        self.assertEqual(
            (document["name"], document["state"], document["fingerprint"]),
            ("oven2", "rejected", second.fingerprint),
        )
        self.world.poll()
        self.assertFalse(second.connected)
        self.assertPending(first)

    def test_adminsOnly(self) -> None:
        """An operator may not reject; nothing changes."""
        agent = self.world.start("oven2")
        bob = self.world.operator("bob")
        status, _, err = self.world.ctl(bob, "reject oven2")
        self.assertEqual(status, 1)
        self.assertIn("only admins", err)
        self.world.poll()
        self.assertPending(agent)

    def test_unknownName(self) -> None:
        """No request for the name: status 1 and a line saying so."""
        status, _, err = self.world.ctl(self.admin, "reject ghost")
        self.assertEqual((status, err), (1, "reject: no pending request for 'ghost'\n"))


@pytest.fixture
def data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An initialised data directory."""
    path = tmp_path / "gc"
    assert main(["--data", str(path), "init"]) == 0
    capsys.readouterr()
    return path


def test_cliReject(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    groundcontrol device reject NAME removes the request, audited with the CLI's actor;
    --key picks one of several; --json prints the request in state rejected.
    """
    store = resultNow(openSQLiteStore(str(DataDir(data).databasePath), synchronousRunner))
    lines = [publicLine(newKey()) for _ in range(3)]
    for name, line in zip(("kiln7", "oven2", "oven2"), lines, strict=True):
        resultNow(store.recordContact(name, line, fingerprint(line), None, "192.0.2.1:1", T0))
    argv = ["--data", str(data), "device", "reject"]
    assert main([*argv, "kiln7"], now=lambda: T0 + 1) == 0
    assert capsys.readouterr().out == f"rejected the request for kiln7 ({fingerprint(lines[0])})\n"
    assert main([*argv, "oven2"]) == 1
    assert "choose one by fingerprint" in capsys.readouterr().err
    assert main([*argv, "oven2", "--key", fingerprint(lines[2]), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["state"], document["fingerprint"]) == ("rejected", fingerprint(lines[2]))
    assert main([*argv, "oven2", "--key", "MD5:aa"]) == 2
    (left,) = resultNow(store.listEnrollmentRequests())
    assert left.fingerprint == fingerprint(lines[1])
    events = [e for e in resultNow(store.auditSince(0)) if e.event == "enrollment.rejected"]
    assert [e.device for e in events] == ["kiln7", "oven2"]
    assert all(e.actor.startswith("cli") for e in events)
    store.close()


def test_pendingExpiryOption() -> None:
    """--pending-expiry takes a duration (default 7d) or never; anything else is refused."""

    def parse(*argv: str) -> Options:
        options = Options()
        options.parseOptions(["--data", "/nonexistent", *argv])
        return options

    assert parse()["pending-expiry"] == DEFAULT_PENDING_EXPIRY == 7 * DAY
    assert parse("--pending-expiry", "36h").toConfig().pendingExpiry == 36 * HOUR
    assert parse("--pending-expiry", "never").toConfig().pendingExpiry is None
    with pytest.raises(UsageError, match="--pending-expiry"):
        parse("--pending-expiry", "soon")
    assert parse("--pending-expiry", "Never").toConfig().pendingExpiry is None


def test_pendingExpiryRefusalSaysNever() -> None:
    """A bad --pending-expiry is refused with every form it takes, 'never' among them."""
    with pytest.raises(UsageError) as refused:
        Options().parseOptions(["--data", "/nonexistent", "--pending-expiry", "soon"])
    assert str(refused.value) == (
        "--pending-expiry: bad duration 'soon': use a whole number and a unit, "
        "e.g. 30m, 8h, 7d, 2w, or 'never'"
    )
