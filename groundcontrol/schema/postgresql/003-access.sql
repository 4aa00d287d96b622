-- 003: access control (PostgreSQL dialect); see ../003-access.sql.

CREATE TABLE device_tags (
    device_name TEXT NOT NULL,
    tag         TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('admin', 'agent')),
    added_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_name, tag, source)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);

CREATE TABLE group_members (
    group_name  TEXT NOT NULL,
    device_name TEXT NOT NULL,
    added_at    DOUBLE PRECISION NOT NULL,
    added_by    TEXT NOT NULL,
    PRIMARY KEY (group_name, device_name)
);
CREATE INDEX group_members_by_device ON group_members (device_name);

DELETE FROM grants WHERE id NOT IN (SELECT MAX(id) FROM grants GROUP BY account_id, selector);
DROP INDEX grants_by_account;
CREATE UNIQUE INDEX grants_by_account ON grants (account_id, selector);
