-- Dashboard sign-ins, shared by every controller instance. Only a SHA-256 of the session id is stored;
-- the cookie carries the id, never the admin key.
CREATE TABLE dashboard_sessions (
    id_hash    bytea PRIMARY KEY,
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_expiry_idx ON dashboard_sessions (expires_at);

-- Dashboard read model on a large history: the builds page filtered by state or platform walks one of
-- these newest-first instead of the whole submitted index, and the overview's "recent failures" reads the
-- newest failed builds only.
CREATE INDEX builds_state_submitted_idx ON builds (state, submitted_at DESC, id DESC);
CREATE INDEX builds_queue_submitted_idx ON builds (queue, submitted_at DESC, id DESC);
-- The throughput chart counts the last day's finished builds from the index alone.
CREATE INDEX builds_finished_state_idx ON builds (completed_at, state) WHERE state IN ('completed', 'failed', 'cancelled');
CREATE INDEX builds_failed_recent_idx ON builds (completed_at DESC) WHERE state = 'failed';
