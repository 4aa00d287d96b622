-- 009: how far the fleet's notifications have gone (SQLite dialect;
-- groundcontrol/schema/postgresql/009-notify-position.sql is the same in PostgreSQL).
--
-- With several nodes on one PostgreSQL store, one node at a time notifies the audit log's
-- rows (log line and webhook), the one holding the notifier's advisory lock
-- (groundcontrol.fleetturn says why). It writes here the audit id up to which every row was
-- notified (delivered or given up by the webhook), so the node that takes its turn next
-- (after a stop, a crash, or a lost connection) reads on from there: each row notified once
-- per fleet, none lost. One row; notified_to NULL until a node has notified (the first
-- begins at the newest row). A single SQLite node keeps its run/feed.json and leaves this
-- row alone.
CREATE TABLE notify_position (
    fleet       INTEGER PRIMARY KEY CHECK (fleet = 1),
    notified_to INTEGER,
    node        TEXT,
    at          REAL
);
INSERT INTO notify_position (fleet) VALUES (1);
