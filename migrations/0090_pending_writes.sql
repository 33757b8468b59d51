-- Objects being written to the artifact store whose build row does not name them yet. A key is
-- recorded here before its object is written and forgotten in the same transaction that links it to
-- its row (the build's insert, or its completion), so a kill, a lost commit answer or a failed
-- cleanup can never leave an object that neither a row nor this table names. The `sweep_unlinked`
-- job deletes the objects of keys older than the staging cut-off that no row names.
CREATE TABLE pending_writes (
    key       text PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pending_writes_queued_at ON pending_writes (queued_at);
