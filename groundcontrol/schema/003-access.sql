-- 003: access control (SQLite dialect): device tags, device groups, one grant per
-- (account, selector). groundcontrol/schema/postgresql/003-access.sql is the same in
-- PostgreSQL.
--
-- A grant's selector is 'device:NAME', 'group:NAME' or 'tag:NAME'; its optional login_user
-- names the user the device session runs as (when the agent runs as root).

-- Tags on a device. source 'admin': set with 'tag DEVICE +t'; source 'agent': reported in
-- the agent's hello from its own config. Both are kept apart (an agent replaces only its
-- own) and both match a 'tag:' grant. Rows go with the device name, not its key: a re-key
-- keeps the admin's tags, and the agent reports its own again on its next hello.
CREATE TABLE device_tags (
    device_name TEXT NOT NULL,
    tag         TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('admin', 'agent')),
    added_at    REAL NOT NULL,
    PRIMARY KEY (device_name, tag, source)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);

-- Named groups of devices; a group exists while it has members.
CREATE TABLE group_members (
    group_name  TEXT NOT NULL,
    device_name TEXT NOT NULL,
    added_at    REAL NOT NULL,
    added_by    TEXT NOT NULL,
    PRIMARY KEY (group_name, device_name)
);
CREATE INDEX group_members_by_device ON group_members (device_name);

-- Granting again replaces a grant (its expiry and login user): keep the newest of any
-- duplicates, then make (account, selector) unique.
DELETE FROM grants WHERE id NOT IN (SELECT MAX(id) FROM grants GROUP BY account_id, selector);
DROP INDEX grants_by_account;
CREATE UNIQUE INDEX grants_by_account ON grants (account_id, selector);
