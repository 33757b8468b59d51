-- Issue #25, the fair-share row: one update of submitter_shares per claim instead of two. The claim
-- statement advanced its submitter's pass in a CTE (`share`) and then, at the end of the same statement,
-- the UPDATE trigger on builds took the claimed build out of the submitter's `queued` count: two new
-- versions of the same row per claim (non-HOT: `pass` and `queued` are in submitter_shares_active_idx,
-- so two index entries each), and the row locked from the middle of the statement until its commit —
-- with one heavy submitter, the row every submit and claim of the queue waits for.
--
-- The trigger now applies both: a build that this statement moved from a queued state to `assigned` (only
-- a claim does) advances its submitter's pass by 1 / weight (the built-in admin key and imported builds:
-- weight 1) in the same update that takes it out of `queued`. The pass after a claim is what it was; the
-- claim's statement no longer has the `share` CTE (src/queue/claim.rs). A statement never both claims
-- and queues builds of one submitter (a claim only moves builds to `assigned`), so the pass advance goes
-- with the decrement branch.
--
-- The branch that finds claimed builds joins the two transition tables. PL/pgSQL keeps one plan of the
-- statement per backend, estimated on the transition tables of the call that planned it (usually a
-- one-row claim): a nested loop that a later statement moving thousands of queued builds (a bulk cancel,
-- the promotion of due scheduled builds) would run in time quadratic in its rows. So the join runs only
-- when the statement moved some build to `assigned`: `claimed` is a parameter of the plan, and for every
-- other statement a one-time filter cuts the branch before the join starts.

CREATE OR REPLACE FUNCTION builds_shares_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    claimed boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows o WHERE o.state IN ('pending', 'scheduled', 'retryable'))
       AND NOT EXISTS (SELECT 1 FROM new_rows n WHERE n.state IN ('pending', 'scheduled', 'retryable')) THEN
        RETURN NULL;
    END IF;
    claimed := EXISTS (SELECT 1 FROM new_rows n WHERE n.state = 'assigned');
    WITH d AS (
        SELECT queue, submitter, sum(delta)::int AS delta, sum(served) AS served FROM (
            SELECT o.queue, COALESCE(o.submitted_by, 'admin') AS submitter, -1 AS delta, 0::numeric AS served
            FROM old_rows o WHERE o.state IN ('pending', 'scheduled', 'retryable')
            UNION ALL
            SELECT n.queue, COALESCE(n.submitted_by, 'admin'), 1, 0
            FROM new_rows n WHERE n.state IN ('pending', 'scheduled', 'retryable')
            UNION ALL
            -- claimed: from a queued state to assigned (its pass advance, as the claim's CTE made it)
            SELECT n.queue, COALESCE(n.submitted_by, 'admin'), 0,
                   1.0 / COALESCE((SELECT k.weight FROM api_keys k WHERE k.id = n.submitted_by), 1)
            FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE claimed AND n.state = 'assigned' AND o.state IN ('pending', 'scheduled', 'retryable')
        ) c GROUP BY 1, 2 HAVING sum(delta) <> 0 OR sum(served) <> 0
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
    UPDATE submitter_shares s SET queued = GREATEST(s.queued + d.delta, 0), pass = s.pass + d.served
    FROM d WHERE d.delta <= 0 AND s.queue = d.queue AND s.submitter = d.submitter;
    RETURN NULL;
END $$;
