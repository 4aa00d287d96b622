"""The SQL store's accounts: operators, their SSH keys, and who is an admin."""

from __future__ import annotations

import re
from collections.abc import Sequence

from twisted.internet.defer import Deferred

from ._dialect import Cursor, Row
from ._errors import AlreadyExists, InvalidName, UnknownAccount
from ._records import Account
from ._sqlcore import StoreCore
from ._sqlvalidation import _parseKey

_ACCOUNT_NAME_RE = re.compile(r"\A[a-z_][a-z0-9_.-]{0,31}\Z")


def _account(row: Row) -> Account:
    return Account(id=int(row["id"]), name=row["name"], isAdmin=bool(row["is_admin"]))


class AccountRows(StoreCore):
    """L{IStore}'s accounts: adding them and their keys, and finding one by key."""

    def addAccount(
        self, name: str, publicKeys: Sequence[str], isAdmin: bool, now: float
    ) -> Deferred[Account]:
        return self._run(self._addAccount, name, list(publicKeys), isAdmin, now)

    def _addAccount(self, name: str, publicKeys: list[str], isAdmin: bool, now: float) -> Account:
        if _ACCOUNT_NAME_RE.match(name) is None:
            raise InvalidName(
                f"invalid account name {name!r}: must match [a-z_][a-z0-9_.-]{{0,31}}"
            )
        parsed = [_parseKey(k) for k in publicKeys]
        with self._write() as c:
            if c.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
                raise AlreadyExists(f"account {name!r} already exists")
            row = c.execute(
                "INSERT INTO accounts (name, is_admin, created_at) VALUES (?, ?, ?) RETURNING id",
                (name, int(isAdmin), now),
            ).fetchone()
            accountId = int(row["id"])
            for line, fp in parsed:
                self._insertAccountKey(c, accountId, line, fp, now)
            self._insertAudit(
                c,
                "account.added",
                None,
                None,
                {"account": name, "admin": isAdmin, "keys": [fp for _, fp in parsed]},
                now,
            )
        return Account(accountId, name, isAdmin)

    @staticmethod
    def _insertAccountKey(c: Cursor, accountId: int, line: str, fp: str, now: float) -> None:
        if c.execute("SELECT 1 FROM account_keys WHERE fingerprint = ?", (fp,)).fetchone():
            raise AlreadyExists(f"key {fp} already belongs to an account")
        if c.execute("SELECT 1 FROM devices WHERE fingerprint = ?", (fp,)).fetchone():
            raise AlreadyExists(f"key {fp} is a device key")
        c.execute(
            "INSERT INTO account_keys (fingerprint, account_id, public_key, added_at) "
            "VALUES (?, ?, ?, ?)",
            (fp, accountId, line, now),
        )

    def addAccountKey(self, name: str, publicKey: str, now: float) -> Deferred[Account]:
        return self._run(self._addAccountKey, name, publicKey, now)

    def _addAccountKey(self, name: str, publicKey: str, now: float) -> Account:
        line, fp = _parseKey(publicKey)
        with self._write() as c:
            row = c.execute(
                "SELECT id, name, is_admin FROM accounts WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise UnknownAccount(f"no account named {name!r}")
            self._insertAccountKey(c, int(row["id"]), line, fp, now)
            self._insertAudit(c, "account.key_added", None, None, {"account": name, "key": fp}, now)
        return _account(row)

    def accountForKey(self, fingerprint: str) -> Deferred[Account | None]:
        return self._run(self._accountForKey, fingerprint)

    def _accountForKey(self, fingerprint: str) -> Account | None:
        rows = self._read(
            "SELECT a.id, a.name, a.is_admin FROM accounts a "
            "JOIN account_keys k ON k.account_id = a.id WHERE k.fingerprint = ?",
            (fingerprint,),
        )
        return _account(rows[0]) if rows else None

    def listAccounts(self) -> Deferred[list[Account]]:
        return self._run(self._listAccounts)

    def _listAccounts(self) -> list[Account]:
        rows = self._read("SELECT id, name, is_admin FROM accounts ORDER BY name")
        return [_account(r) for r in rows]
