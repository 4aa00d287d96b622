-- 005: an index of relayed sessions over the audit log (SQLite dialect;
-- groundcontrol/schema/postgresql/005-session-index.sql is the same in PostgreSQL).
--
-- A session is written to the audit log twice, as session.started and session.ended
-- (detail: the session record, with its short id under "session"). Listing the latest
-- sessions (`ssh ctl@gc sessions --all`) or finding one by id (`replay ID`) scanned the
-- whole log, which grows without bound (10,000 devices, months of audit). This table points
-- at each session's two events, one row per session, kept by the store in the transaction
-- that writes the event; the audit log stays the only copy of the details.
CREATE TABLE session_index (
    id            TEXT    PRIMARY KEY,
    -- The record's started_at (0 if it has none): the listing's order.
    started_at    REAL    NOT NULL DEFAULT 0,
    started_event INTEGER REFERENCES audit (id),
    ended_event   INTEGER REFERENCES audit (id)
);
CREATE INDEX session_index_by_start ON session_index (started_at, id);

-- The sessions already in the log: the latest event of each kind per session id.
INSERT INTO session_index (id, started_event, ended_event)
SELECT sid,
       MAX(CASE WHEN event = 'session.started' THEN id END),
       MAX(CASE WHEN event = 'session.ended' THEN id END)
FROM (
    SELECT id, event,
           CASE WHEN json_type(detail, '$.session') = 'text'
                THEN json_extract(detail, '$.session')
                WHEN json_type(detail, '$.id') = 'text'
                THEN json_extract(detail, '$.id') END AS sid
    FROM audit
    WHERE event IN ('session.started', 'session.ended')
)
WHERE sid IS NOT NULL
GROUP BY sid;

UPDATE session_index SET started_at = COALESCE(
    (SELECT json_extract(detail, '$.started_at') FROM audit
     WHERE audit.id = session_index.ended_event
       AND json_type(detail, '$.started_at') IN ('real', 'integer')),
    (SELECT json_extract(detail, '$.started_at') FROM audit
     WHERE audit.id = session_index.started_event
       AND json_type(detail, '$.started_at') IN ('real', 'integer')),
    0
);
