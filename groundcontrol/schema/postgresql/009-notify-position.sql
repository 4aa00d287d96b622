-- 009: how far the fleet's notifications have gone. See the SQLite file of the same number.
CREATE TABLE notify_position (
    fleet       INTEGER PRIMARY KEY CHECK (fleet = 1),
    notified_to BIGINT,
    node        TEXT,
    at          DOUBLE PRECISION
);
INSERT INTO notify_position (fleet) VALUES (1);
