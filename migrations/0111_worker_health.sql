-- Fleet health (fleet-health.md). A worker whose recent attempts are mostly infrastructure failures, or
-- whose diagnostics report is critical, is quarantined: `health = 'quarantined'` until
-- `quarantined_until` (NULL: until a healthy/warning report or an operator's release); once that time
-- passes it is on probation. `quarantine_secs` is the length of the last quarantine (doubled on a relapse
-- during probation, capped at 24 h); attempts assigned before `reputation_since` no longer count.
ALTER TABLE workers
    ADD COLUMN health            text NOT NULL DEFAULT 'ok' CHECK (health IN ('ok', 'quarantined')),
    ADD COLUMN quarantined_until timestamptz,
    ADD COLUMN quarantine_reason text,
    ADD COLUMN quarantine_secs   bigint,
    ADD COLUMN reputation_since  timestamptz;

-- Retry elsewhere: the claim and the idle poll look up attempts a worker ended by an infrastructure
-- failure, gave back for its owner, or had requeued by an operator, recently. Only those are indexed.
CREATE INDEX build_attempts_elsewhere_idx ON build_attempts (worker_id, finished_at)
    WHERE outcome IN ('requeued', 'infrastructure', 'released');

-- Giving a build back for its owner (`reason: owner_reclaimed`): times a build was released.
ALTER TABLE builds ADD COLUMN releases integer NOT NULL DEFAULT 0;
