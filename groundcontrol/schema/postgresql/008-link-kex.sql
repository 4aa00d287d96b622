-- 008: the key exchange each device's latest link negotiated. See the SQLite file of the
-- same number.
ALTER TABLE devices ADD COLUMN last_link_kex TEXT;
