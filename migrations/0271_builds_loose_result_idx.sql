-- The staging sweep (queue::pending::doom_stale_writes) looks a stale loose result key
-- (`results/<upload>.bin`, recorded ahead by a completion) up by `builds.result_key`: without an index
-- that is a scan of `builds` per key, inside the statement that holds the batch's pending rows.
-- Partial: only builds whose result is stored loose have an entry.
CREATE INDEX IF NOT EXISTS builds_loose_result_idx ON builds (result_key) WHERE result_key LIKE 'results/%';
