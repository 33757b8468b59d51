-- The fair-share UPDATE trigger of 0280 joins its two transition tables to find the builds a claim moved
-- from a queued state to `assigned`. PL/pgSQL keeps one plan of that statement per backend, with row
-- estimates from the transition tables of the call that planned it (usually a one-row claim): a nested
-- loop that a later statement moving thousands of queued builds (a bulk cancel, the promotion of due
-- scheduled builds) would run in time quadratic in its rows. The join now runs only when the statement
-- moved some build to `assigned` (only a claim does, one build per worker): `claimed` is a parameter of
-- the plan, so for every other statement the branch is cut by a one-time filter before the join starts.
-- Behaviour is unchanged.

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
