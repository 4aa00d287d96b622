-- 004: a grant may allow ssh-agent forwarding (ssh -A) on the devices it names. See the
-- SQLite file of the same number.
ALTER TABLE grants ADD COLUMN agent_forwarding BOOLEAN NOT NULL DEFAULT FALSE;
