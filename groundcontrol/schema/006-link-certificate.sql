-- 006: how each device's latest link authenticated, and the certificate it last linked with
-- (SQLite dialect; groundcontrol/schema/postgresql/006-link-certificate.sql is the same in
-- PostgreSQL).
--
-- The certificates table says what the fleet CA issued; nothing said which of those a device
-- actually presents, nor whether it linked with one at all or by its enrolled key alone. The
-- store writes these columns in the same UPDATE that records the contact (last_seen), so a
-- link's login costs no extra statement. `groundcontrol device show NAME` prints them.
ALTER TABLE devices ADD COLUMN last_link_auth TEXT
    CHECK (last_link_auth IN ('certificate', 'key'));
-- The certificate of the latest link that presented one: serial number (lower-case hex),
-- SHA-256 fingerprint of the certificate, its not-after, and when it was presented.
ALTER TABLE devices ADD COLUMN last_certificate_serial TEXT;
ALTER TABLE devices ADD COLUMN last_certificate_fingerprint TEXT;
ALTER TABLE devices ADD COLUMN last_certificate_not_after REAL;
ALTER TABLE devices ADD COLUMN last_certificate_at REAL;
