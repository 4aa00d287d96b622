"""Exceptions the store raises (through its Deferreds) for requests it cannot honour."""

# The names are part of the agreed API and read well without an "Error" suffix.
# ruff: noqa: N818

from __future__ import annotations

from collections.abc import Sequence

from ._records import Device, EnrollmentRequest

__all__ = [
    "AlreadyExists",
    "AmbiguousRequest",
    "ClaimCodeExpired",
    "ClaimCodeInvalid",
    "ClaimRefused",
    "InvalidName",
    "NameTaken",
    "PendingLimitReached",
    "RekeyNeedsKey",
    "StoreError",
    "TokenExhausted",
    "TokenExpired",
    "TokenInvalid",
    "UnknownAccount",
    "UnknownDevice",
]


class StoreError(Exception):
    """Base class: the request was understood but the store's state does not allow it."""


class UnknownDevice(StoreError):
    """No device (and, where relevant, no pending request) has that name."""


class UnknownAccount(StoreError):
    """No operator account has that name."""


class AlreadyExists(StoreError):
    """The account, key or approval being created is already there."""


class InvalidName(StoreError):
    """A device name does not follow L{accesstunnel.names.DEVICE_NAME_RE}."""


class AmbiguousRequest(StoreError):
    """
    Several pending requests ask for the same device name and none was chosen.

    Approving one of them by name alone would let whichever agent asked first (or last)
    win, so the operator has to pick a fingerprint. The error carries what the pick needs:
    each request, the name's approved device if there is one (C{device}), and when the
    store refused (C{now}); the front ends lay the keys out side by side
    (L{groundcontrol.rekeyreview.refusalText}).
    """

    def __init__(
        self,
        name: str,
        requests: Sequence[EnrollmentRequest],
        device: Device | None,
        now: float,
    ) -> None:
        self.name = name
        self.requests = tuple(requests)
        self.fingerprints = tuple(r.fingerprint for r in self.requests)
        self.device = device
        self.now = now
        super().__init__(
            f"{len(self.fingerprints)} pending requests ask for {name!r}; "
            f"choose one by fingerprint: {', '.join(self.fingerprints)}"
        )


class RekeyNeedsKey(StoreError):
    """
    A request asks for an approved device's name with another key, and the approval named
    no key.

    Anyone can connect with a fresh key and ask for any name, so approving by name alone
    would let an admin's habit hand the device's identity (its operators' sessions, their
    forwarded agents, their files) to a stranger. Replacing an approved device's key is
    done by naming the new key: C{approve NAME --key SHA256:...}. L{device} and L{request}
    are what the admin needs to decide (L{groundcontrol.rekeyreview.rekeyRefusal} lays
    them out).
    """

    def __init__(self, device: Device, request: EnrollmentRequest) -> None:
        self.device = device
        self.request = request
        super().__init__(
            f"device {device.name!r} is approved with key {device.fingerprint}; a request "
            f"asks to replace it with {request.fingerprint}. If that is the device's new "
            f"key, approve it by fingerprint: approve {device.name} --key {request.fingerprint}"
        )


class NameTaken(StoreError):
    """
    The name belongs to a device with another key.

    Tokens and claims only ever create devices: taking over an existing name is a re-key,
    which needs an admin, so a stolen token or a shoulder-surfed code cannot hijack a device.
    """


class TokenInvalid(StoreError):
    """No such enrollment token, or this key has already redeemed it (a replay)."""


class TokenExpired(StoreError):
    """The enrollment token is past its expiry."""


class TokenExhausted(StoreError):
    """The enrollment token has no uses left."""


class ClaimCodeInvalid(StoreError):
    """No such claim code: never issued, already used, or replaced by a newer one."""


class ClaimCodeExpired(StoreError):
    """The claim code is past its expiry (they live minutes)."""


class ClaimRefused(StoreError):
    """
    The code is good but the device cannot be claimed: it is revoked, or it is already
    approved and not up for claiming (owned by someone else, or approved by an admin).
    """


class PendingLimitReached(StoreError):
    """Too many pending enrollment requests, in all or from one source host; refuse it."""
