-- 006: how each device's latest link authenticated, and the certificate it last linked with.
-- See the SQLite file of the same number.
ALTER TABLE devices ADD COLUMN last_link_auth TEXT
    CONSTRAINT devices_last_link_auth_check CHECK (last_link_auth IN ('certificate', 'key'));
ALTER TABLE devices ADD COLUMN last_certificate_serial TEXT;
ALTER TABLE devices ADD COLUMN last_certificate_fingerprint TEXT;
ALTER TABLE devices ADD COLUMN last_certificate_not_after DOUBLE PRECISION;
ALTER TABLE devices ADD COLUMN last_certificate_at DOUBLE PRECISION;
