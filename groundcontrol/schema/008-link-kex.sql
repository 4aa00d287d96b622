-- 008: the key exchange each device's latest link negotiated (SQLite dialect;
-- groundcontrol/schema/postgresql/008-link-kex.sql is the same in PostgreSQL).
--
-- Agents from 2026-11-27 on link with the post-quantum hybrid mlkem768x25519-sha256; older
-- ones with curve25519-sha256. Nothing else on the server tells which devices still run an
-- older agent. The store writes it in the UPDATE that records the link (006's columns), so a
-- link's login costs no extra statement; NULL until the device links under version 8.
-- `groundcontrol device show NAME` prints it.
ALTER TABLE devices ADD COLUMN last_link_kex TEXT;
