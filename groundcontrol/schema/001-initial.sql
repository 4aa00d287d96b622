-- 001: the initial groundcontrol schema (SQLite dialect).
--
-- Upgraders are the numbered files in this directory, applied in order inside one
-- transaction each; the `version` table (created by the migrator) records the last applied.
-- Times are epoch seconds (REAL). Booleans are INTEGER 0/1.
--
-- Shaped for what comes next without rework: certificates and enrollment tokens get their
-- own tables keyed by device name / fingerprint; claims with leases use
-- devices.owner_account_id + devices.lease_until; tags become grants.selector 'tag:x'
-- (beside 'device:NAME') plus a device_tags table; grants already expire.

CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    is_admin    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL    NOT NULL
);

CREATE TABLE account_keys (
    fingerprint TEXT    PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    public_key  TEXT    NOT NULL,
    added_at    REAL    NOT NULL
);
CREATE INDEX account_keys_by_account ON account_keys (account_id);

CREATE TABLE devices (
    name             TEXT    PRIMARY KEY,
    state            TEXT    NOT NULL CHECK (state IN ('approved', 'revoked')),
    fingerprint      TEXT    NOT NULL UNIQUE,
    public_key       TEXT    NOT NULL,
    serial           TEXT,
    approved_at      REAL    NOT NULL,
    approved_by      TEXT    NOT NULL,
    last_seen        REAL,
    created_at       REAL    NOT NULL,
    owner_account_id INTEGER REFERENCES accounts (id) ON DELETE SET NULL,
    lease_until      REAL
);

CREATE TABLE enrollment_requests (
    fingerprint    TEXT PRIMARY KEY,
    requested_name TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    serial         TEXT,
    source         TEXT NOT NULL,
    first_seen     REAL NOT NULL,
    last_seen      REAL NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('new', 'rekey'))
);
CREATE INDEX enrollment_requests_by_name ON enrollment_requests (requested_name);

CREATE TABLE grants (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    selector    TEXT    NOT NULL,
    login_user  TEXT,
    expires_at  REAL,
    created_at  REAL    NOT NULL,
    created_by  TEXT    NOT NULL
);
CREATE INDEX grants_by_account ON grants (account_id, selector);

-- AUTOINCREMENT: ids are never reused, so "everything after id N" is a sound change feed.
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL    NOT NULL,
    event   TEXT    NOT NULL,
    actor   TEXT,
    device  TEXT,
    detail  TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_by_device ON audit (device, id);
