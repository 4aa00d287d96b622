"""Exceptions the store raises (through its Deferreds) for requests it cannot honour."""

# The names are part of the agreed API and read well without an "Error" suffix.
# ruff: noqa: N818

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyExists",
    "AmbiguousRequest",
    "InvalidName",
    "StoreError",
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
    win, so the operator has to pick a fingerprint.
    """

    def __init__(self, name: str, fingerprints: Sequence[str]) -> None:
        self.name = name
        self.fingerprints = tuple(fingerprints)
        super().__init__(
            f"{len(self.fingerprints)} pending requests ask for {name!r}; "
            f"choose one by fingerprint: {', '.join(self.fingerprints)}"
        )
