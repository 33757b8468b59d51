-- Keys with a role (identity.md). Only a SHA-256 of the secret and a short display prefix are stored;
-- the secret itself is shown once, at creation.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('worker', 'submitter', 'viewer', 'operator', 'admin')),
    prefix       text NOT NULL,
    secret_hash  bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    weight       integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 100),
    max_running  integer NOT NULL DEFAULT 0 CHECK (max_running >= 0),
    max_queued   integer NOT NULL DEFAULT 0 CHECK (max_queued >= 0),
    -- An enrollment key registers exactly one worker, then it is spent.
    enroll       boolean NOT NULL DEFAULT false,
    spent_at     timestamptz
);

-- The key that submitted a build (null: the built-in admin key, imported builds).
ALTER TABLE builds ADD COLUMN submitted_by text REFERENCES api_keys (id);
ALTER TABLE builds ADD COLUMN submitted_by_name text;
CREATE INDEX builds_submitted_by_idx ON builds (submitted_by, submitted_at DESC, id DESC) WHERE submitted_by IS NOT NULL;
-- The worker key a worker was registered with: G0 calls with that key act only for its workers.
ALTER TABLE workers ADD COLUMN registered_by text REFERENCES api_keys (id);

-- Dashboard sessions remember who signed in (the built-in admin key: no key id) and with which role; a
-- session of a revoked or expired key stops working with it.
ALTER TABLE dashboard_sessions ADD COLUMN key_id text REFERENCES api_keys (id) ON DELETE CASCADE;
ALTER TABLE dashboard_sessions ADD COLUMN key_name text NOT NULL DEFAULT 'admin';
ALTER TABLE dashboard_sessions ADD COLUMN role text NOT NULL DEFAULT 'admin';
