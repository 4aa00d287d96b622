"""
The SQL store's grants, and the tags and groups they may name: who may reach which device.

A grant names a device, a group or a tag (L{parseSelector}); the most specific one that
matches says the login user. Admins set tags and groups; agents report tags of their own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from ._dialect import Cursor, Row
from ._errors import InvalidName, StoreError, UnknownAccount, UnknownDevice
from ._records import Account, Device, Grant
from ._sqlcore import StoreCore
from ._sqlvalidation import _checkDeviceName

# Tags and group names: what an admin types and a config file holds, safe to print.
_TAG_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")
# A POSIX-portable user name (what useradd accepts by default, upper case allowed).
_LOGIN_USER_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
#: Tags an agent may report; more are dropped (a device must not bloat every listing).
MAX_REPORTED_TAGS = 32
#: How specific a selector is: a device grant beats a group grant beats a tag grant.
_SPECIFICITY = {"device": 0, "group": 1, "tag": 2}


def isValidTag(tag: object) -> bool:
    """A tag or group name: C{[a-z0-9][a-z0-9._-]{0,62}}."""
    return isinstance(tag, str) and _TAG_RE.match(tag) is not None


def isValidLoginUser(user: object) -> bool:
    """A user name a grant may name for the device session (portable POSIX spelling)."""
    return isinstance(user, str) and _LOGIN_USER_RE.match(user) is not None


def _checkTag(tag: str, what: str = "tag") -> None:
    if not isValidTag(tag):
        raise InvalidName(f"invalid {what} {tag!r}: must match [a-z0-9][a-z0-9._-]{{0,62}}")


def parseSelector(text: str) -> str:
    """
    The canonical spelling of what a grant names: C{device:NAME}, C{group:NAME} or
    C{tag:NAME}. A bare C{NAME} or C{dev_NAME} is a device, as grants always took.

    @raise InvalidName: anything else, or a malformed name.
    """
    kind, sep, name = text.partition(":")
    if not sep:
        kind, name = "device", text.removeprefix("dev_")
    if kind == "device":
        _checkDeviceName(name)
    elif kind in ("group", "tag"):
        _checkTag(name, f"{kind} name")
    else:
        raise InvalidName(f"invalid selector {text!r}: use device:NAME, group:NAME or tag:NAME")
    return f"{kind}:{name}"


def _grant(row: Row) -> Grant:
    return Grant(
        account=row["account"],
        selector=row["selector"],
        loginUser=row["login_user"],
        expiresAt=row["expires_at"],
        createdAt=row["created_at"],
        createdBy=row["created_by"],
        agentForwarding=bool(row["agent_forwarding"]),
    )


class GrantRows(StoreCore):
    """L{IStore}'s grants and what they are checked against: devices' tags and groups."""

    def grant(
        self,
        accountName: str,
        selector: str,
        actor: str,
        now: float,
        expiresAt: float | None = None,
        loginUser: str | None = None,
        agentForwarding: bool = False,
    ) -> Deferred[Grant]:
        return self._run(
            self._grant, accountName, selector, actor, now, expiresAt, loginUser, agentForwarding
        )

    def _grant(
        self,
        accountName: str,
        selector: str,
        actor: str,
        now: float,
        expiresAt: float | None,
        loginUser: str | None,
        agentForwarding: bool = False,
    ) -> Grant:
        selector = parseSelector(selector)
        kind, name = selector.split(":", 1)
        if loginUser is not None and not isValidLoginUser(loginUser):
            raise InvalidName(f"invalid login user {loginUser!r}")
        if expiresAt is not None and expiresAt <= now:
            raise StoreError("a grant must expire in the future")
        with self._write() as c:
            accountId = self._accountId(c, accountName)
            if kind == "device" and not self._deviceExists(c, name):
                raise UnknownDevice(f"no device named {name!r}")
            # Granting again replaces the grant: its expiry and its login user.
            c.execute(
                "DELETE FROM grants WHERE account_id = ? AND selector = ?", (accountId, selector)
            )
            c.execute(
                "INSERT INTO grants (account_id, selector, login_user, expires_at, created_at, "
                "created_by, agent_forwarding) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (accountId, selector, loginUser, expiresAt, now, actor, bool(agentForwarding)),
            )
            self._insertAudit(
                c,
                "grant.added",
                actor,
                name if kind == "device" else None,
                {
                    "account": accountName,
                    "selector": selector,
                    "expiresAt": expiresAt,
                    "loginUser": loginUser,
                    "agentForwarding": bool(agentForwarding),
                },
                now,
            )
        return Grant(accountName, selector, loginUser, expiresAt, now, actor, bool(agentForwarding))

    def ungrant(self, accountName: str, selector: str, actor: str, now: float) -> Deferred[bool]:
        return self._run(self._ungrant, accountName, selector, actor, now)

    def _ungrant(self, accountName: str, selector: str, actor: str, now: float) -> bool:
        selector = parseSelector(selector)
        kind, name = selector.split(":", 1)
        with self._write() as c:
            accountId = self._accountId(c, accountName)
            c.execute(
                "DELETE FROM grants WHERE account_id = ? AND selector = ?", (accountId, selector)
            )
            removed = c.rowcount > 0
            if removed:
                self._insertAudit(
                    c,
                    "grant.removed",
                    actor,
                    name if kind == "device" else None,
                    {"account": accountName, "selector": selector},
                    now,
                )
            return removed

    def listGrants(self, accountName: str | None = None) -> Deferred[list[Grant]]:
        return self._run(self._listGrants, accountName)

    def _listGrants(self, accountName: str | None) -> list[Grant]:
        sql = (
            "SELECT a.name AS account, g.selector, g.login_user, g.expires_at, g.created_at, "
            "g.created_by, g.agent_forwarding FROM grants g JOIN accounts a ON a.id = g.account_id"
        )
        args: tuple[Any, ...] = ()
        if accountName is not None:
            sql += " WHERE a.name = ?"
            args = (accountName,)
        return [_grant(r) for r in self._read(sql + " ORDER BY a.name, g.selector", args)]

    @staticmethod
    def _accountId(c: Cursor, name: str) -> int:
        row = c.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAccount(f"no account named {name!r}")
        return int(row["id"])

    @staticmethod
    def _matchingGrants(c: Cursor, account: Account, deviceName: str, now: float) -> list[Row]:
        """The account's unexpired grants whose selector names the device, its groups or tags."""
        return c.execute(
            "SELECT g.id, g.selector, g.login_user, g.agent_forwarding FROM grants g "
            "WHERE g.account_id = ? "
            "AND (g.expires_at IS NULL OR g.expires_at > ?) AND (g.selector = ? "
            "OR g.selector IN (SELECT 'group:' || m.group_name FROM group_members m "
            "WHERE m.device_name = ?) "
            "OR g.selector IN (SELECT 'tag:' || t.tag FROM device_tags t WHERE t.device_name = ?))",
            (account.id, now, f"device:{deviceName}", deviceName, deviceName),
        ).fetchall()

    def mayReach(self, account: Account, deviceName: str, now: float) -> Deferred[bool]:
        return self._run(self._mayReach, account, deviceName, now)

    def _mayReach(self, account: Account, deviceName: str, now: float) -> bool:
        if account.isAdmin:
            return True
        c = self._cursor()
        if self._matchingGrants(c, account, deviceName, now):
            return True
        return bool(
            c.execute(
                "SELECT 1 FROM devices WHERE name = ? AND owner_account_id = ? AND lease_until > ?",
                (deviceName, account.id, now),
            ).fetchone()
        )

    def loginUserFor(self, account: Account, deviceName: str, now: float) -> Deferred[str | None]:
        return self._run(self._loginUserFor, account, deviceName, now)

    def _loginUserFor(self, account: Account, deviceName: str, now: float) -> str | None:
        rows = self._matchingGrants(self._cursor(), account, deviceName, now)
        if not rows:
            return None

        def rank(row: Row) -> tuple[int, bool, str]:
            # Most specific first; among equals, one naming a user, then by name.
            user = row["login_user"]
            return (_SPECIFICITY[row["selector"].split(":", 1)[0]], user is None, user or "")

        return min(rows, key=rank)["login_user"]  # type: ignore[no-any-return]

    def agentForwardingAllowed(
        self, account: Account, deviceName: str, now: float
    ) -> Deferred[bool]:
        return self._run(self._agentForwardingAllowed, account, deviceName, now)

    def _agentForwardingAllowed(self, account: Account, deviceName: str, now: float) -> bool:
        if account.isAdmin:
            return True
        rows = self._matchingGrants(self._cursor(), account, deviceName, now)
        return any(bool(row["agent_forwarding"]) for row in rows)

    # -- tags and groups ------------------------------------------------------------

    def tagDevice(
        self,
        deviceName: str,
        add: Sequence[str],
        remove: Sequence[str],
        actor: str,
        now: float,
    ) -> Deferred[Device]:
        return self._run(self._tagDevice, deviceName, list(add), list(remove), actor, now)

    def _tagDevice(
        self, deviceName: str, add: list[str], remove: list[str], actor: str, now: float
    ) -> Device:
        for tag in add + remove:
            _checkTag(tag)
        with self._write() as c:
            before = set(self._deviceNamed(c, deviceName).tags)
            for tag in remove:
                c.execute(
                    "DELETE FROM device_tags WHERE device_name = ? AND tag = ? "
                    "AND source = 'admin'",
                    (deviceName, tag),
                )
            for tag in add:
                c.execute(
                    "INSERT INTO device_tags (device_name, tag, source, added_at) "
                    "VALUES (?, ?, 'admin', ?) ON CONFLICT DO NOTHING",
                    (deviceName, tag, now),
                )
            device = self._deviceNamed(c, deviceName)
            after = set(device.tags)
            if after != before:
                self._insertAudit(
                    c,
                    "device.tagged",
                    actor,
                    deviceName,
                    {
                        "added": sorted(after - before),
                        "removed": sorted(before - after),
                        "tags": sorted(after),
                    },
                    now,
                )
            return device

    def reportTags(self, deviceName: str, tags: Sequence[str], now: float) -> Deferred[bool]:
        return self._run(self._reportTags, deviceName, list(tags), now)

    def _reportTags(self, deviceName: str, tags: list[str], now: float) -> bool:
        # The device is not trusted to spell them well: malformed tags are dropped.
        wanted = sorted({t for t in tags if isValidTag(t)})[:MAX_REPORTED_TAGS]
        with self._write() as c:
            device = self._deviceNamed(c, deviceName)
            if list(device.reportedTags) == wanted:
                return False
            c.execute(
                "DELETE FROM device_tags WHERE device_name = ? AND source = 'agent'",
                (deviceName,),
            )
            for tag in wanted:
                c.execute(
                    "INSERT INTO device_tags (device_name, tag, source, added_at) "
                    "VALUES (?, ?, 'agent', ?)",
                    (deviceName, tag, now),
                )
            self._insertAudit(
                c,
                "device.tags-reported",
                None,
                deviceName,
                {"tags": wanted, "previous": list(device.reportedTags)},
                now,
            )
            return True

    def addToGroup(
        self, groupName: str, deviceNames: Sequence[str], actor: str, now: float
    ) -> Deferred[list[str]]:
        return self._run(self._addToGroup, groupName, list(deviceNames), actor, now)

    def _addToGroup(
        self, groupName: str, deviceNames: list[str], actor: str, now: float
    ) -> list[str]:
        _checkTag(groupName, "group name")
        if not deviceNames:
            raise StoreError("name at least one device to add to the group")
        with self._write() as c:
            added = []
            for name in dict.fromkeys(deviceNames):
                self._deviceNamed(c, name)
                c.execute(
                    "INSERT INTO group_members (group_name, device_name, added_at, added_by) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (groupName, name, now, actor),
                )
                if c.rowcount > 0:
                    added.append(name)
            if added:
                self._insertAudit(
                    c, "group.added", actor, None, {"group": groupName, "devices": added}, now
                )
            return self._groupMembers(c, groupName)

    def removeFromGroup(
        self, groupName: str, deviceNames: Sequence[str], actor: str, now: float
    ) -> Deferred[list[str]]:
        return self._run(self._removeFromGroup, groupName, list(deviceNames), actor, now)

    def _removeFromGroup(
        self, groupName: str, deviceNames: list[str], actor: str, now: float
    ) -> list[str]:
        _checkTag(groupName, "group name")
        with self._write() as c:
            members = self._groupMembers(c, groupName)
            removed = [n for n in members if not deviceNames or n in deviceNames]
            for name in removed:
                c.execute(
                    "DELETE FROM group_members WHERE group_name = ? AND device_name = ?",
                    (groupName, name),
                )
            if removed:
                self._insertAudit(
                    c,
                    "group.removed",
                    actor,
                    None,
                    {"group": groupName, "devices": removed, "whole": not deviceNames},
                    now,
                )
            return removed

    @staticmethod
    def _groupMembers(c: Cursor, groupName: str) -> list[str]:
        rows = c.execute(
            "SELECT device_name FROM group_members WHERE group_name = ? ORDER BY device_name",
            (groupName,),
        )
        return [r["device_name"] for r in rows]

    def listGroups(self) -> Deferred[dict[str, list[str]]]:
        return self._run(self._listGroups)

    def _listGroups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for row in self._read(
            "SELECT group_name, device_name FROM group_members ORDER BY group_name, device_name"
        ):
            groups.setdefault(row["group_name"], []).append(row["device_name"])
        return groups
