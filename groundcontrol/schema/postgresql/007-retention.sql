-- 007: what the audit retention sweep (--audit-max-age) deletes by (PostgreSQL dialect;
-- groundcontrol/schema/007-retention.sql is the same in SQLite).
--
-- The sweep removes the oldest audit rows, a bounded batch at a time, and with them the
-- session index rows that point only at removed rows (the others lose the pointer to their
-- removed event). Without these indexes each batch would scan the whole session index; the
-- certificates past their not-after by the age go too, found by this index rather than a
-- scan of every certificate ever issued.
CREATE INDEX session_index_by_started_event ON session_index (started_event);
CREATE INDEX session_index_by_ended_event ON session_index (ended_event);
CREATE INDEX certificates_by_not_after ON certificates (not_after);
