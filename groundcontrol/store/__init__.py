"""The store: groundcontrol's durable state (devices, accounts, grants, enrollment, audit).

Everything goes through L{IStore}, whose methods return Deferreds; the SQLite implementation
runs its blocking calls through an injected runner (L{threadRunner} in the server,
L{synchronousRunner} in tests and the CLI).
"""

from ._errors import (
    AlreadyExists,
    AmbiguousRequest,
    InvalidName,
    StoreError,
    UnknownAccount,
    UnknownDevice,
)
from ._interface import IStore
from ._records import Account, AuditEvent, Device, EnrollmentRequest
from ._runner import Runner, synchronousRunner, threadRunner
from ._sqlite import SQLiteStore, connect, migrate, openSQLiteStore, schemaUpgraders

__all__ = [
    "Account",
    "AlreadyExists",
    "AmbiguousRequest",
    "AuditEvent",
    "Device",
    "EnrollmentRequest",
    "IStore",
    "InvalidName",
    "Runner",
    "SQLiteStore",
    "StoreError",
    "UnknownAccount",
    "UnknownDevice",
    "connect",
    "migrate",
    "openSQLiteStore",
    "schemaUpgraders",
    "synchronousRunner",
    "threadRunner",
]
