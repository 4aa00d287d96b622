-- 004: a grant may allow ssh-agent forwarding (ssh -A) on the devices it names (SQLite
-- dialect; groundcontrol/schema/postgresql/004-agent-forwarding.sql is the same in
-- PostgreSQL). Off unless the grant says so; admins may always forward, and the server's
-- --permit-agent-forwarding must be on for anyone to.
ALTER TABLE grants ADD COLUMN agent_forwarding INTEGER NOT NULL DEFAULT 0;
