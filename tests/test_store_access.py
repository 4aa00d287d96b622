"""Tests for the store's access control: grants by device, group and tag, tags, groups."""

from __future__ import annotations

from typing import Any

from groundcontrol.store import (
    Account,
    Grant,
    InvalidName,
    StoreError,
    UnknownDevice,
    parseSelector,
    schemaUpgraders,
)
from tests.test_store import EVERY_TABLE, T0, StoreTestCase, bothBackends, newPublicKey


class SelectorTests(StoreTestCase):
    """What a grant may name, and how it is spelled once stored."""

    def test_parseSelector(self) -> None:
        """A bare or dev_ name is a device; group: and tag: keep their kind; junk is refused."""
        self.assertEqual(parseSelector("kiln7"), "device:kiln7")
        self.assertEqual(parseSelector("dev_kiln7"), "device:kiln7")
        self.assertEqual(parseSelector("device:kiln7"), "device:kiln7")
        self.assertEqual(parseSelector("group:ovens"), "group:ovens")
        self.assertEqual(parseSelector("tag:site-berlin"), "tag:site-berlin")
        for bad in ["host:kiln7", "tag:", "tag:Lab", "group:a b", "device:-x", "KILN", "tag:x\n"]:
            with self.assertRaises(InvalidName, msg=bad):
                parseSelector(bad)


class AccessTestCase(StoreTestCase):
    """Two devices, an admin and an operator."""

    def setUp(self) -> None:
        super().setUp()
        self.enroll("kiln7", T0)
        self.enroll("oven2", T0)
        self.admin = self.successResultOf(self.store.addAccount("root", [newPublicKey()], True, T0))
        self.alice = self.successResultOf(
            self.store.addAccount("alice", [newPublicKey()], False, T0)
        )

    def reach(self, name: str, now: float = T0, account: Account | None = None) -> bool:
        return self.successResultOf(self.store.mayReach(account or self.alice, name, now))

    def loginUser(self, name: str, now: float = T0) -> str | None:
        return self.successResultOf(self.store.loginUserFor(self.alice, name, now))

    def grant(self, selector: str, **kwargs: Any) -> Grant:
        return self.successResultOf(self.store.grant("alice", selector, "root", T0, **kwargs))

    def tag(self, name: str, add: list[str], remove: list[str] = []) -> Any:  # noqa: B006
        return self.successResultOf(self.store.tagDevice(name, add, remove, "root", T0))


@bothBackends
class SelectorGrantTests(AccessTestCase):
    """mayReach honours grants on a device, a group and a tag, each with its expiry."""

    def test_deviceGrant(self) -> None:
        """device:NAME (or the bare name) reaches that device only."""
        self.grant("device:kiln7")
        self.assertTrue(self.reach("kiln7"))
        self.assertFalse(self.reach("oven2"))

    def test_groupGrant(self) -> None:
        """group:NAME reaches the group's members, including ones added later, not removed ones."""
        self.grant("group:ovens")
        self.assertFalse(self.reach("oven2"))
        members = self.successResultOf(self.store.addToGroup("ovens", ["oven2"], "root", T0))
        self.assertEqual(members, ["oven2"])
        self.assertTrue(self.reach("oven2"))
        self.assertFalse(self.reach("kiln7"))
        self.successResultOf(self.store.removeFromGroup("ovens", ["oven2"], "root", T0))
        self.assertFalse(self.reach("oven2"))

    def test_tagGrant(self) -> None:
        """tag:NAME reaches devices with that tag, and stops when the tag goes."""
        self.grant("tag:lab")
        self.assertFalse(self.reach("kiln7"))
        self.tag("kiln7", ["lab"])
        self.assertTrue(self.reach("kiln7"))
        self.assertFalse(self.reach("oven2"))
        self.tag("kiln7", [], ["lab"])
        self.assertFalse(self.reach("kiln7"))

    def test_expiryAppliesToEveryKind(self) -> None:
        """A group or tag grant with an expiry reaches before it and not from it on."""
        self.tag("kiln7", ["lab"])
        self.successResultOf(self.store.addToGroup("ovens", ["oven2"], "root", T0))
        self.grant("tag:lab", expiresAt=T0 + 3600)
        self.grant("group:ovens", expiresAt=T0 + 60)
        self.assertTrue(self.reach("kiln7", T0 + 3599))
        self.assertFalse(self.reach("kiln7", T0 + 3600))
        self.assertTrue(self.reach("oven2", T0 + 59))
        self.assertFalse(self.reach("oven2", T0 + 60))

    def test_grantAgainReplaces(self) -> None:
        """Granting the same selector again replaces its expiry and login user: one grant."""
        self.grant("tag:lab", expiresAt=T0 + 60, loginUser="pi")
        self.grant("tag:lab")
        (only,) = self.successResultOf(self.store.listGrants("alice"))
        self.assertEqual((only.selector, only.expiresAt, only.loginUser), ("tag:lab", None, None))

    def test_refusals(self) -> None:
        """A device grant needs the device; expiry must be ahead; names must be well formed."""
        self.failureResultOf(self.store.grant("alice", "ghost", "root", T0), UnknownDevice)
        self.failureResultOf(
            self.store.grant("alice", "kiln7", "root", T0, expiresAt=T0), StoreError
        )
        self.failureResultOf(
            self.store.grant("alice", "kiln7", "root", T0, loginUser="pi;rm"), InvalidName
        )
        self.failureResultOf(self.store.grant("alice", "bogus:x", "root", T0), InvalidName)
        # A tag nobody has yet may be granted ahead of the devices.
        self.grant("tag:future")

    def test_ungrantAndList(self) -> None:
        """listGrants shows each grant once; ungrant by selector removes just that one."""
        self.grant("kiln7", loginUser="pi")
        self.grant("tag:lab", expiresAt=T0 + 10)
        grants = self.successResultOf(self.store.listGrants())
        self.assertEqual(
            grants,
            [
                Grant("alice", "device:kiln7", "pi", None, T0, "root"),
                Grant("alice", "tag:lab", None, T0 + 10, T0, "root"),
            ],
        )
        self.assertTrue(self.successResultOf(self.store.ungrant("alice", "tag:lab", "root", T0)))
        self.assertFalse(self.successResultOf(self.store.ungrant("alice", "tag:lab", "root", T0)))
        self.assertEqual(len(self.successResultOf(self.store.listGrants("alice"))), 1)
        self.assertEqual(self.successResultOf(self.store.listGrants("root")), [])

    def test_changesAudited(self) -> None:
        """Grants, ungrants, tags and group changes are audit events naming what changed."""
        start = self.successResultOf(self.store.lastAuditId())
        self.grant("tag:lab", loginUser="pi", expiresAt=T0 + 5)
        self.tag("kiln7", ["lab", "berlin"])
        self.tag("kiln7", ["lab"])  # no change: no event
        self.successResultOf(self.store.addToGroup("ovens", ["oven2", "kiln7"], "root", T0))
        self.successResultOf(self.store.removeFromGroup("ovens", [], "root", T0))
        self.successResultOf(self.store.ungrant("alice", "tag:lab", "root", T0))
        events = self.events(start)
        self.assertEqual(
            [e.event for e in events],
            ["grant.added", "device.tagged", "group.added", "group.removed", "grant.removed"],
        )
        self.assertEqual(
            events[0].detail,
            {
                "account": "alice",
                "selector": "tag:lab",
                "loginUser": "pi",
                "expiresAt": T0 + 5,
                "agentForwarding": False,
            },
        )
        self.assertEqual(events[1].detail["added"], ["berlin", "lab"])
        self.assertEqual(events[2].detail["devices"], ["oven2", "kiln7"])
        self.assertEqual(events[3].detail["devices"], ["kiln7", "oven2"])
        self.assertTrue(all(e.actor == "root" for e in events))


@bothBackends
class LoginUserTests(AccessTestCase):
    """loginUserFor: the most specific unexpired grant's login user."""

    def test_noGrantNoUser(self) -> None:
        """Without a grant (or with one naming no user) the session runs as the agent's user."""
        self.assertIsNone(self.loginUser("kiln7"))
        self.grant("kiln7")
        self.assertIsNone(self.loginUser("kiln7"))

    def test_mostSpecificWins(self) -> None:
        """A device grant beats a group grant beats a tag grant, whichever names a user."""
        self.tag("kiln7", ["lab"])
        self.successResultOf(self.store.addToGroup("ovens", ["kiln7"], "root", T0))
        self.grant("tag:lab", loginUser="labuser")
        self.assertEqual(self.loginUser("kiln7"), "labuser")
        self.grant("group:ovens", loginUser="oven")
        self.assertEqual(self.loginUser("kiln7"), "oven")
        self.grant("kiln7", loginUser="pi")
        self.assertEqual(self.loginUser("kiln7"), "pi")
        self.grant("kiln7")  # the device grant now names nobody: it still wins
        self.assertIsNone(self.loginUser("kiln7"))

    def test_expiredGrantIgnored(self) -> None:
        """An expired grant's user no longer applies; the next most specific one does."""
        self.tag("kiln7", ["lab"])
        self.grant("tag:lab", loginUser="labuser")
        self.grant("kiln7", loginUser="pi", expiresAt=T0 + 60)
        self.assertEqual(self.loginUser("kiln7", T0 + 59), "pi")
        self.assertEqual(self.loginUser("kiln7", T0 + 60), "labuser")

    def test_tiesPreferANamedUser(self) -> None:
        """Among tag grants, one naming a user wins over one that does not, then by name."""
        self.tag("kiln7", ["a", "b", "c"])
        self.grant("tag:a")
        self.grant("tag:b", loginUser="zed")
        self.grant("tag:c", loginUser="pi")
        self.assertEqual(self.loginUser("kiln7"), "pi")


@bothBackends
class AgentForwardingTests(AccessTestCase):
    """agentForwardingAllowed: admins always; operators only through a grant that says so."""

    def allowed(self, name: str, now: float = T0, account: Account | None = None) -> bool:
        return self.successResultOf(
            self.store.agentForwardingAllowed(account or self.alice, name, now)
        )

    def test_offUnlessAGrantSaysSo(self) -> None:
        """A plain grant reaches the device but does not allow ssh -A; one that says so does."""
        self.assertFalse(self.allowed("kiln7"))
        self.grant("kiln7")
        self.assertTrue(self.reach("kiln7"))
        self.assertFalse(self.allowed("kiln7"))
        grant = self.grant("kiln7", agentForwarding=True)
        self.assertTrue(grant.agentForwarding)
        self.assertTrue(self.allowed("kiln7"))
        self.assertFalse(self.allowed("oven2"))

    def test_byTagAndExpiry(self) -> None:
        """A tag grant allowing it covers tagged devices, until it expires."""
        self.tag("oven2", ["lab"])
        self.grant("tag:lab", agentForwarding=True, expiresAt=T0 + 60)
        self.assertTrue(self.allowed("oven2", T0 + 59))
        self.assertFalse(self.allowed("oven2", T0 + 60))

    def test_adminsAlways(self) -> None:
        """Admins reach everything, and may forward their agent everywhere."""
        self.assertTrue(self.allowed("kiln7", account=self.admin))

    def test_listedInGrants(self) -> None:
        """listGrants shows which grants allow agent forwarding."""
        self.grant("kiln7", agentForwarding=True)
        self.grant("oven2")
        grants = {
            g.selector: g.agentForwarding
            for g in self.successResultOf(self.store.listGrants("alice"))
        }
        self.assertEqual(grants, {"device:kiln7": True, "device:oven2": False})


@bothBackends
class TagTests(AccessTestCase):
    """Admin tags and agent-reported tags are kept apart and both match tag grants."""

    def test_reportedTagsMatch(self) -> None:
        """A tag the agent reported reaches like an admin's, and goes when it stops reporting."""
        self.grant("tag:lab")
        self.assertTrue(self.successResultOf(self.store.reportTags("kiln7", ["lab"], T0)))
        self.assertTrue(self.reach("kiln7"))
        self.assertTrue(self.successResultOf(self.store.reportTags("kiln7", [], T0)))
        self.assertFalse(self.reach("kiln7"))

    def test_keptApart(self) -> None:
        """An agent report never removes an admin tag, nor an admin removal a reported one."""
        self.tag("kiln7", ["lab", "berlin"])
        self.successResultOf(self.store.reportTags("kiln7", ["lab", "sensor"], T0))
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(device.tags, ("berlin", "lab"))
        self.assertEqual(device.reportedTags, ("lab", "sensor"))
        self.assertEqual(device.allTags, ("berlin", "lab", "sensor"))

        self.successResultOf(self.store.reportTags("kiln7", [], T0))
        self.assertEqual(self.successResultOf(self.store.deviceByName("kiln7")).tags, device.tags)
        self.successResultOf(self.store.reportTags("kiln7", ["lab"], T0))
        self.tag("kiln7", [], ["lab"])
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual((device.tags, device.reportedTags), (("berlin",), ("lab",)))
        self.grant("tag:lab")
        self.assertTrue(self.reach("kiln7"))

    def test_reportedTagsCleaned(self) -> None:
        """Malformed reported tags are dropped, at most 32 kept; an unchanged report is quiet."""
        start = self.successResultOf(self.store.lastAuditId())
        tags = ["ok", "Bad", "x\x1b[2J", "", "a" * 64] + [f"t{i:02}" for i in range(40)]
        self.successResultOf(self.store.reportTags("kiln7", tags, T0))
        device = self.successResultOf(self.store.deviceByName("kiln7"))
        self.assertEqual(len(device.reportedTags), 32)
        self.assertNotIn("Bad", device.reportedTags)
        self.assertFalse(
            self.successResultOf(self.store.reportTags("kiln7", list(device.reportedTags), T0))
        )
        self.assertEqual([e.event for e in self.events(start)], ["device.tags-reported"])

    def test_listDevicesCarriesTagsAndGroups(self) -> None:
        """listDevices fills in each device's tags, reported tags and groups."""
        self.tag("kiln7", ["lab"])
        self.successResultOf(self.store.reportTags("oven2", ["berlin"], T0))
        self.successResultOf(self.store.addToGroup("ovens", ["oven2"], "root", T0))
        self.successResultOf(self.store.addToGroup("all", ["oven2", "kiln7"], "root", T0))
        byName = {d.name: d for d in self.successResultOf(self.store.listDevices())}
        self.assertEqual(byName["kiln7"].tags, ("lab",))
        self.assertEqual(byName["kiln7"].groups, ("all",))
        self.assertEqual(byName["oven2"].reportedTags, ("berlin",))
        self.assertEqual(byName["oven2"].groups, ("all", "ovens"))
        self.assertEqual(
            self.successResultOf(self.store.listGroups()),
            {"all": ["kiln7", "oven2"], "ovens": ["oven2"]},
        )

    def test_unknownDevice(self) -> None:
        """Tagging, reporting for, or grouping an unknown device fails clearly."""
        self.failureResultOf(self.store.tagDevice("ghost", ["x"], [], "root", T0), UnknownDevice)
        self.failureResultOf(self.store.reportTags("ghost", ["x"], T0), UnknownDevice)
        self.failureResultOf(
            self.store.addToGroup("g", ["kiln7", "ghost"], "root", T0), UnknownDevice
        )
        # All or nothing: kiln7 was not added either.
        self.assertEqual(self.successResultOf(self.store.listGroups()), {})


@bothBackends
class UpgradeTo003Tests(StoreTestCase):
    """A version 2 database keeps its grants when it gains tags and groups."""

    def test_duplicateGrantsCollapse(self) -> None:
        """Duplicate (account, selector) grants from version 2 collapse to the newest one."""
        for table in EVERY_TABLE:
            self.rawQuery(f"DROP TABLE {table}")
        self.assertEqual(self.rawMigrate(upTo=2), 2)
        self.rawQuery(
            "INSERT INTO accounts (id, name, is_admin, created_at) VALUES (1, 'al', 0, 0)"
        )
        for i, expires in [(1, 10.0), (2, 20.0)]:
            self.rawQuery(
                "INSERT INTO grants (id, account_id, selector, login_user, expires_at, "
                "created_at, created_by) VALUES (?, 1, 'device:kiln7', NULL, ?, 0, 'x')",
                (i, expires),
            )
        self.assertEqual(self.rawMigrate(), schemaUpgraders()[-1][0])
        store = self.openAnother()
        (kept,) = self.successResultOf(store.listGrants())
        self.assertEqual(kept.expiresAt, 20.0)
