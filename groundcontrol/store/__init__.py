"""The store: groundcontrol's durable state (devices, accounts, grants, enrollment, audit).

Everything goes through L{IStore}, whose methods return Deferreds; the SQL implementations
(SQLite by default, PostgreSQL when several nodes share a fleet) run their blocking calls
through an injected runner (L{threadRunner} in the server, L{synchronousRunner} in tests and
the CLI). L{openStore} picks the implementation from a URL.
"""

from ._errors import (
    AlreadyExists,
    AmbiguousRequest,
    ClaimCodeExpired,
    ClaimCodeInvalid,
    ClaimRefused,
    InvalidName,
    NameTaken,
    PendingLimitReached,
    StoreError,
    TokenExhausted,
    TokenExpired,
    TokenInvalid,
    UnknownAccount,
    UnknownDevice,
)
from ._interface import IStore
from ._open import databaseErrors, openStore, openStoreBlocking, sqlitePath, storeKind
from ._postgresql import (
    PostgreSQLStore,
    connectPostgreSQL,
    migratePostgreSQL,
    openPostgreSQLStore,
)
from ._records import (
    SESSION_ENDED,
    SESSION_STARTED,
    Account,
    AuditEvent,
    Certificate,
    CertificateState,
    Device,
    EnrollmentRequest,
    Grant,
    LastLink,
    LinkAuth,
    LinkCertificate,
    PendingLimits,
    SessionEvents,
    TokenRecord,
)
from ._runner import Runner, ThreadRunner, synchronousRunner, threadRunner
from ._sql import (
    SQLStore,
    cleanSerial,
    hashSecret,
    isValidLoginUser,
    isValidTag,
    parseSelector,
    sourceHost,
)
from ._sqlite import SQLiteStore, connect, migrate, openSQLiteStore, schemaUpgraders

__all__ = [
    "SESSION_ENDED",
    "SESSION_STARTED",
    "Account",
    "AlreadyExists",
    "AmbiguousRequest",
    "AuditEvent",
    "Certificate",
    "CertificateState",
    "ClaimCodeExpired",
    "ClaimCodeInvalid",
    "ClaimRefused",
    "Device",
    "EnrollmentRequest",
    "Grant",
    "IStore",
    "InvalidName",
    "LastLink",
    "LinkAuth",
    "LinkCertificate",
    "NameTaken",
    "PendingLimitReached",
    "PendingLimits",
    "PostgreSQLStore",
    "Runner",
    "SQLStore",
    "SQLiteStore",
    "SessionEvents",
    "StoreError",
    "ThreadRunner",
    "TokenExhausted",
    "TokenExpired",
    "TokenInvalid",
    "TokenRecord",
    "UnknownAccount",
    "UnknownDevice",
    "cleanSerial",
    "connect",
    "connectPostgreSQL",
    "databaseErrors",
    "hashSecret",
    "isValidLoginUser",
    "isValidTag",
    "migrate",
    "migratePostgreSQL",
    "openPostgreSQLStore",
    "openSQLiteStore",
    "openStore",
    "openStoreBlocking",
    "parseSelector",
    "schemaUpgraders",
    "sourceHost",
    "sqlitePath",
    "storeKind",
    "synchronousRunner",
    "threadRunner",
]
