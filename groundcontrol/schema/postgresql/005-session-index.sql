-- 005: an index of relayed sessions over the audit log. See the SQLite file of the same
-- number.
CREATE TABLE session_index (
    id            TEXT    PRIMARY KEY,
    started_at    DOUBLE PRECISION NOT NULL DEFAULT 0,
    started_event BIGINT  REFERENCES audit (id),
    ended_event   BIGINT  REFERENCES audit (id)
);
CREATE INDEX session_index_by_start ON session_index (started_at, id);

INSERT INTO session_index (id, started_event, ended_event)
SELECT sid,
       MAX(CASE WHEN event = 'session.started' THEN id END),
       MAX(CASE WHEN event = 'session.ended' THEN id END)
FROM (
    SELECT id, event,
           CASE WHEN jsonb_typeof(detail::jsonb -> 'session') = 'string'
                THEN detail::jsonb ->> 'session'
                WHEN jsonb_typeof(detail::jsonb -> 'id') = 'string'
                THEN detail::jsonb ->> 'id' END AS sid
    FROM audit
    WHERE event IN ('session.started', 'session.ended')
) AS session_events
WHERE sid IS NOT NULL
GROUP BY sid;

UPDATE session_index SET started_at = COALESCE(
    (SELECT (detail::jsonb ->> 'started_at')::DOUBLE PRECISION FROM audit
     WHERE audit.id = session_index.ended_event
       AND jsonb_typeof(detail::jsonb -> 'started_at') = 'number'),
    (SELECT (detail::jsonb ->> 'started_at')::DOUBLE PRECISION FROM audit
     WHERE audit.id = session_index.started_event
       AND jsonb_typeof(detail::jsonb -> 'started_at') = 'number'),
    0
);
