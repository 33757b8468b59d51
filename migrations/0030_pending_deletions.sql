-- Stored objects whose build rows are gone but whose deletion from the artifact store has not
-- succeeded yet (store unreachable): the `storage_deletions` job retries them. A row is queued here in
-- the same transaction that deletes the build, so no row ever points to a deleted object and no object
-- outlives its row for longer than the store is down.
CREATE TABLE pending_deletions (
    key       text PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);
