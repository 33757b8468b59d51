-- Issue #25, PostgreSQL CPU per build: fewer index entries written per build, and updates of the small,
-- hot table workers that can be HOT (heap-only: no index entry, the old version
-- pruned within its page). A profile of the PostgreSQL backends during P12 put B-tree inserts at about a
-- sixth of their CPU; n_tup_hot_upd was 0 on every table.
--
-- submitter_shares (three updates per build of the same few rows: the submit's and the claim's count,
-- the claim's pass) stays non-HOT: its partial index on (queue, pass, submitter) is what lets the claim
-- walk submitters in pass order and stop at the first, and without it the claim sorts every submitter with
-- work (measured: +0.3 ms per claim with 1,000 submitters, F2's case; its target is a 2 ms p50).

-- workers: the claim and the completion update status and last_seen_at; the partial index on
-- last_seen_at (for the offline sweep, which reads a fleet-sized table) made both non-HOT.
DROP INDEX IF EXISTS workers_last_seen_idx;
ALTER TABLE workers SET (fillfactor = 50);

-- builds: builds_finished_idx (completed_at) is a prefix of builds_finished_state_idx (completed_at,
-- state) with the same predicate; the held VM-token index took a NULL entry at every claim (the token is
-- set later, and only looked up by value).
DROP INDEX IF EXISTS builds_finished_idx;
DROP INDEX IF EXISTS builds_held_vm_token;
CREATE INDEX builds_held_vm_token ON builds (vm_token_hash)
    WHERE vm_token_hash IS NOT NULL AND state IN ('assigned', 'building');

-- The statement-level fair-share trigger on UPDATE of builds fires for every UPDATE statement: the
-- claim's re-delivery branch (usually no row), the completion, heartbeats, logs, progress. Only a
-- statement that moves a build into or out of the queued states changes a count; the others now leave
-- after two probes of the transition tables instead of running the aggregate, the upsert and the update
-- (a transition table cannot be paired with a column list or a WHEN clause on a statement trigger).
CREATE OR REPLACE FUNCTION builds_shares_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows o WHERE o.state IN ('pending', 'scheduled', 'retryable'))
       AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.state IN ('pending', 'scheduled', 'retryable')) THEN
        RETURN NULL;
    END IF;
    WITH d AS (
        SELECT queue, submitter, sum(delta)::int AS delta FROM (
            SELECT o.queue, COALESCE(o.submitted_by, 'admin') AS submitter, -1 AS delta
            FROM old_rows o WHERE o.state IN ('pending', 'scheduled', 'retryable')
            UNION ALL
            SELECT n.queue, COALESCE(n.submitted_by, 'admin'), 1
            FROM new_rows n WHERE n.state IN ('pending', 'scheduled', 'retryable')
        ) c GROUP BY 1, 2 HAVING sum(delta) <> 0
    ), joined AS (
        INSERT INTO submitter_shares AS s (queue, submitter, pass, queued)
        SELECT d.queue, d.submitter,
               COALESCE((SELECT min(m.pass) FROM submitter_shares m WHERE m.queue = d.queue AND m.queued > 0),
                        (SELECT max(m.pass) FROM submitter_shares m WHERE m.queue = d.queue), 0),
               d.delta
        FROM d WHERE d.delta > 0
        ORDER BY d.queue, d.submitter
        ON CONFLICT (queue, submitter) DO UPDATE SET
            queued = s.queued + EXCLUDED.queued,
            pass = CASE WHEN s.queued > 0 THEN s.pass ELSE GREATEST(s.pass, EXCLUDED.pass) END
    )
    -- joined and this update touch different (queue, submitter) rows: each has one summed delta.
    UPDATE submitter_shares s SET queued = GREATEST(s.queued + d.delta, 0)
    FROM d WHERE d.delta < 0 AND s.queue = d.queue AND s.submitter = d.submitter;
    RETURN NULL;
END $$;
