-- 002: device identity and enrollment (SQLite dialect): certificates, enrollment tokens,
-- claim codes, pending caps by source host, re-approval after certificate expiry.
-- groundcontrol/schema/postgresql/002-identity-enrollment.sql is the same in PostgreSQL.

-- What the fleet CA issued, for certificate state checks and revocation; not the bytes.
-- fingerprint: the SSH fingerprint of the device key the certificate binds, so a re-key
-- leaves the old key's certificates behind (and revoked).
CREATE TABLE certificates (
    serial_number TEXT PRIMARY KEY,
    device_name   TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    not_before    REAL NOT NULL,
    not_after     REAL NOT NULL,
    issued_at     REAL NOT NULL,
    revoked_at    REAL
);
CREATE INDEX certificates_by_device ON certificates (device_name, fingerprint, not_after);

-- Enrollment tokens: only the SHA-256 (hex) of the token is kept.
CREATE TABLE tokens (
    id          INTEGER PRIMARY KEY,
    token_hash  TEXT    NOT NULL UNIQUE,
    uses        INTEGER NOT NULL CHECK (uses > 0),
    uses_left   INTEGER NOT NULL CHECK (uses_left >= 0),
    expires_at  REAL    NOT NULL,
    created_at  REAL    NOT NULL,
    created_by  TEXT    NOT NULL
);

-- One use per device key: a replay by the same key is refused, whatever uses are left.
CREATE TABLE token_redemptions (
    token_id    INTEGER NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    fingerprint TEXT    NOT NULL,
    device_name TEXT    NOT NULL,
    redeemed_at REAL    NOT NULL,
    PRIMARY KEY (token_id, fingerprint)
);

-- Pairing codes an agent shows for a claim; single use, minutes long. One live code per key.
CREATE TABLE claim_codes (
    code_hash      TEXT PRIMARY KEY,
    fingerprint    TEXT NOT NULL UNIQUE,
    requested_name TEXT NOT NULL,
    expires_at     REAL NOT NULL,
    created_at     REAL NOT NULL
);

-- Leases: lapsedLeases scans owned devices by lease end.
CREATE INDEX devices_by_lease ON devices (lease_until) WHERE owner_account_id IS NOT NULL;

-- enrollment_requests gains kind 'reapprove' and source_host (the host part of the first
-- contact's source, for the per-host cap). SQLite cannot alter a CHECK: rebuild the table.
CREATE TABLE enrollment_requests_002 (
    fingerprint    TEXT PRIMARY KEY,
    requested_name TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    serial         TEXT,
    source         TEXT NOT NULL,
    source_host    TEXT NOT NULL,
    first_seen     REAL NOT NULL,
    last_seen      REAL NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('new', 'rekey', 'reapprove'))
);
INSERT INTO enrollment_requests_002 (
    fingerprint, requested_name, public_key, serial, source, source_host, first_seen,
    last_seen, kind
)
SELECT
    fingerprint, requested_name, public_key, serial, source,
    CASE
        WHEN source LIKE '[%]:%' THEN substr(source, 2, instr(source, ']') - 2)
        WHEN length(source) - length(replace(source, ':', '')) = 1
            THEN substr(source, 1, instr(source, ':') - 1)
        ELSE source
    END,
    first_seen, last_seen, kind
FROM enrollment_requests;
DROP TABLE enrollment_requests;
ALTER TABLE enrollment_requests_002 RENAME TO enrollment_requests;
CREATE INDEX enrollment_requests_by_name ON enrollment_requests (requested_name);
CREATE INDEX enrollment_requests_by_host ON enrollment_requests (source_host, first_seen);
