"""
Authorisation as a property (hypothesis stateful; issue 8): no sequence of grant,
ungrant, revoke, approve, claim, renewal and release of a claim's lease (C{ctl claim renew
DEVICE --for D}, C{claim release DEVICE}), lease expiry (the clock moving, the lease sweep)
and token redemption lets an operator reach a device they may not, nor change a lease they
may not.

The model is deliberately simple and kept apart from the store: a device is reachable by
an account exactly when it is approved and the account is an admin, holds an unexpired
grant for it, or owns it by a claim whose lease has not ended. After every step the real
router (L{SessionRouter.reachableLink}: the store's device state and C{mayReach}, then the
registry) must agree with the model for every account and device. Every device has a live
link registered throughout, so "offline" never hides a wrong answer.

Renewing or releasing a lease is the model's own prediction, not read back from the store:
only the owner or an admin may, and only while the device is approved and the lease lasts;
everyone else is refused and the lease stays as it was. Renewal moves the lease's end and
keeps its owner; release ends it now (the owner then reaches the device only by a grant).
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.conch.error import ConchError
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from accesstunnel.keys import fingerprint
from groundcontrol.registry import Registry
from groundcontrol.router import SessionRouter
from groundcontrol.store import Account, ClaimRefused, StoreError, UnknownDevice, hashSecret
from groundcontrol.testing import newKey, openMemoryStore, publicLine

ACCOUNTS = ("alice", "bob", "root")
NAMES = ("d0", "d1", "d2")
DURATIONS = (1.0, 59.0, 3600.0, 8 * 86400.0)


def outcome(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred, or its Failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the synchronous store did not answer at once"
    return results[0]


@attrs.define
class FakeLink:
    deviceName: str
    fingerprint: str

    def close(self, reason: str) -> None:
        pass


@attrs.define
class ModelDevice:
    approved: bool = False
    owner: str | None = None
    leaseUntil: float | None = None


class Authorisation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = openMemoryStore()
        self.registry = Registry()
        self.router = SessionRouter(self.store, self.registry, self.clock)
        self.accounts: dict[str, Account] = {}
        for name in ACCOUNTS:
            self.accounts[name] = outcome(
                self.store.addAccount(name, [publicLine(newKey())], name == "root", self.now)
            )
        self.keys: dict[str, str] = {}
        self.devices: dict[str, ModelDevice] = {}
        #: (account, device) -> expiry (None: never)
        self.grants: dict[tuple[str, str], float | None] = {}
        self._codes = itertools.count()
        for name in NAMES:
            line = publicLine(newKey())
            self.keys[name] = line
            outcome(self.store.recordContact(name, line, fingerprint(line), None, "test", self.now))
            self.devices[name] = ModelDevice()
            self.registry.attach(FakeLink(name, fingerprint(line)))  # type: ignore[arg-type]

    @property
    def now(self) -> float:
        return self.clock.seconds()

    # -- the model --------------------------------------------------------------------

    def mayReach(self, account: str, name: str) -> bool:
        device = self.devices[name]
        if not device.approved:
            return False
        if self.accounts[account].isAdmin:
            return True
        expiry = self.grants.get((account, name), 0.0)
        if (account, name) in self.grants and (expiry is None or expiry > self.now):
            return True
        return device.owner == account and (device.leaseUntil or 0) > self.now

    def mayChangeLease(self, account: str, name: str) -> bool:
        """Whether C{account} may renew or release C{name}'s lease now."""
        device = self.devices[name]
        return (
            device.approved
            and device.owner is not None
            and (device.owner == account or self.accounts[account].isAdmin)
            and (device.leaseUntil or 0) > self.now
        )

    def observe(self, name: str, result: Any) -> None:
        """A device record the store returned: its owner and lease (the model's input)."""
        device = self.devices[name]
        device.owner = result.owner
        device.leaseUntil = result.leaseUntil

    # -- steps ------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def approve(self, name: str) -> None:
        result = outcome(self.store.approveDevice(name, "root", self.now))
        if not isinstance(result, Failure):
            self.devices[name].approved = True
            self.observe(name, result)

    @rule(name=st.sampled_from(NAMES))
    def revoke(self, name: str) -> None:
        result = outcome(self.store.revokeDevice(name, "root", self.now))
        if not isinstance(result, Failure):
            self.devices[name].approved = False
            self.observe(name, result)

    @rule(
        account=st.sampled_from(ACCOUNTS),
        name=st.sampled_from(NAMES),
        duration=st.none() | st.sampled_from(DURATIONS),
    )
    def grant(self, account: str, name: str, duration: float | None) -> None:
        expiresAt = None if duration is None else self.now + duration
        result = outcome(self.store.grant(account, name, "root", self.now, expiresAt=expiresAt))
        if not isinstance(result, Failure):
            self.grants[(account, name)] = expiresAt

    @rule(account=st.sampled_from(ACCOUNTS), name=st.sampled_from(NAMES))
    def ungrant(self, account: str, name: str) -> None:
        result = outcome(self.store.ungrant(account, name, "root", self.now))
        if result is True:
            del self.grants[(account, name)]
        elif not isinstance(result, Failure):
            assert (account, name) not in self.grants or self.grants[(account, name)] is not None

    @rule(
        account=st.sampled_from(ACCOUNTS[:2]),
        name=st.sampled_from(NAMES),
        lease=st.sampled_from(DURATIONS),
    )
    def claim(self, account: str, name: str, lease: float) -> None:
        code = hashSecret(f"CODE{next(self._codes)}")
        line = self.keys[name]
        registered = outcome(
            self.store.registerClaimCode(code, fingerprint(line), name, self.now + 600, self.now)
        )
        if isinstance(registered, Failure):
            registered.trap(StoreError)
            return
        result = outcome(
            self.store.claimDevice(code, self.accounts[account], self.now + lease, self.now)
        )
        if isinstance(result, Failure):
            result.trap(StoreError)
            return
        self.devices[name].approved = True
        self.observe(name, result)
        assert result.owner == account

    def changeLease(self, account: str, name: str, result: Any) -> bool:
        """
        Check the store's answer to C{account} renewing or releasing C{name}'s lease
        against the model: refused (and nothing changed) unless the model allows it.
        Returns whether it was allowed.
        """
        allowed = self.mayChangeLease(account, name)
        if not allowed:
            # A device not yet approved is still pending: not a device at all to the store.
            assert isinstance(result, Failure) and result.check(ClaimRefused, UnknownDevice), (
                f"{account} changed the lease on {name} at {self.now}: {result!r}; "
                f"model: {self.devices[name]}"
            )
        else:
            assert not isinstance(result, Failure), (
                f"{account} was refused the lease on {name} at {self.now}: {result!r}; "
                f"model: {self.devices[name]}"
            )
        return allowed

    @rule(
        account=st.sampled_from(ACCOUNTS),
        name=st.sampled_from(NAMES),
        duration=st.sampled_from(DURATIONS),
    )
    def renew(self, account: str, name: str, duration: float) -> None:
        until = self.now + duration
        result = outcome(self.store.renewLease(name, self.accounts[account], until, self.now))
        if self.changeLease(account, name, result):
            device = self.devices[name]
            assert (result.owner, result.leaseUntil) == (device.owner, until), result
            device.leaseUntil = until

    @rule(account=st.sampled_from(ACCOUNTS), name=st.sampled_from(NAMES))
    def release(self, account: str, name: str) -> None:
        result = outcome(self.store.releaseLease(name, self.accounts[account], self.now))
        if self.changeLease(account, name, result):
            assert (result.owner, result.leaseUntil) == (None, None), result
            device = self.devices[name]
            device.owner = device.leaseUntil = None

    @rule(seconds=st.sampled_from(DURATIONS))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def lease_sweep(self) -> None:
        for device in outcome(self.store.lapsedLeases(self.now)):
            result = outcome(self.store.endLease(device.name, self.now))
            if result is not None and not isinstance(result, Failure):
                self.observe(device.name, result)

    @rule(name=st.sampled_from(("t0", "t1")), uses=st.integers(1, 2))
    def redeem_token(self, name: str, uses: int) -> None:
        token = hashSecret(f"token-{name}-{next(self._codes)}")
        created = outcome(self.store.createToken(token, uses, self.now + 3600, "root", self.now))
        assert not isinstance(created, Failure)
        line = publicLine(newKey())
        result = outcome(
            self.store.redeemToken(
                token, fingerprint(line), line, name, None, "192.0.2.9:1", self.now
            )
        )
        if isinstance(result, Failure):
            result.trap(StoreError)
            return
        self.keys[name] = line
        self.devices[name] = ModelDevice(approved=True)
        self.observe(name, result)
        self.registry.attach(FakeLink(name, fingerprint(line)))  # type: ignore[arg-type]

    # -- the property -----------------------------------------------------------------

    @invariant()
    def leases_agree_with_model(self) -> None:
        """The store holds the owner and lease end the model predicts (renew, release)."""
        for name in NAMES:
            record = outcome(self.store.deviceByName(name))
            if record is not None:
                model = self.devices[name]
                assert (record.owner, record.leaseUntil) == (model.owner, model.leaseUntil), (
                    f"{name} at {self.now}: store {record.owner} until {record.leaseUntil}; "
                    f"model: {model}"
                )

    @invariant()
    def router_agrees_with_model(self) -> None:
        for account, name in itertools.product(ACCOUNTS, self.devices):
            result = outcome(
                defer.Deferred.fromCoroutine(
                    self.router.reachableLink(self.accounts[account], name)
                )
            )
            if isinstance(result, Failure):
                result.trap(ConchError)
                reached = False
            else:
                reached = True
            assert reached == self.mayReach(account, name), (
                f"{account} {'reached' if reached else 'could not reach'} {name} at "
                f"{self.now}; model: {self.devices[name]}, grant "
                f"{self.grants.get((account, name), 'none')}"
            )


Authorisation.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class AuthorisationProperty(Authorisation.TestCase):  # type: ignore[misc,valid-type]
    """No sequence of fleet changes lets an operator reach a device the model forbids."""
