-- Fair share between submitters (scheduling.md): stride scheduling per platform queue. Each submitter (an
-- api_keys id; 'admin' for the built-in admin key and imported builds) has a `pass` per queue, advanced by
-- 1 / weight by the claim statement with each of its claims; the claim takes, after priority, the
-- submitter with the lowest pass. `queued` counts its queued builds in that queue (kept by the trigger
-- below, whichever statement changes a build), so the claim walks only submitters with work, in pass
-- order. A submitter whose count goes from 0 to 1 rejoins at the queue's current minimum pass (the
-- highest pass in the queue when nobody has work): idle time is not banked for a burst.
CREATE TABLE submitter_shares (
    queue     text NOT NULL REFERENCES queues (name),
    submitter text NOT NULL,
    pass      double precision NOT NULL DEFAULT 0,
    queued    integer NOT NULL DEFAULT 0 CHECK (queued >= 0),
    PRIMARY KEY (queue, submitter)
);
CREATE INDEX submitter_shares_active_idx ON submitter_shares (queue, pass, submitter) WHERE queued > 0;

-- One submitter's queued builds of a queue in claim order, and its running builds (max running).
CREATE INDEX builds_claim_submitter_idx ON builds (queue, (COALESCE(submitted_by, 'admin')), priority DESC, run_at, id)
    WHERE state IN ('pending', 'scheduled', 'retryable');
CREATE INDEX builds_running_submitter_idx ON builds (submitted_by)
    WHERE state IN ('assigned', 'building') AND submitted_by IS NOT NULL;

-- Statement-level, over the statement's transition tables: one aggregated change per (queue, submitter)
-- whatever the number of rows (a row-level counter would update the same row once per build, and a bulk
-- insert or cancel in one transaction would walk an ever longer chain of its own row versions).
CREATE FUNCTION submitter_shares_apply(deltas jsonb) RETURNS void LANGUAGE sql AS $$
    -- deltas: [{"queue", "submitter", "delta"}], one per (queue, submitter), never 0
    WITH d AS (
        SELECT x.queue, x.submitter, x.delta FROM jsonb_to_recordset(deltas) AS x(queue text, submitter text, delta int)
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
            -- rejoining (nothing queued before): at the queue's current minimum pass, idle time not banked
            pass = CASE WHEN s.queued > 0 THEN s.pass ELSE GREATEST(s.pass, EXCLUDED.pass) END
        RETURNING 1
    )
    UPDATE submitter_shares s SET queued = GREATEST(s.queued + d.delta, 0)
    FROM d WHERE d.delta < 0 AND s.queue = d.queue AND s.submitter = d.submitter
      AND (SELECT count(*) FROM joined) >= 0;
$$;

CREATE FUNCTION builds_shares_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM submitter_shares_apply((SELECT jsonb_agg(t) FROM (
        SELECT queue, COALESCE(submitted_by, 'admin') AS submitter, count(*)::int AS delta FROM new_rows
        WHERE state IN ('pending', 'scheduled', 'retryable') GROUP BY 1, 2) t));
    RETURN NULL;
END $$;

CREATE FUNCTION builds_shares_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM submitter_shares_apply((SELECT jsonb_agg(t) FROM (
        SELECT queue, COALESCE(submitted_by, 'admin') AS submitter, -count(*)::int AS delta FROM old_rows
        WHERE state IN ('pending', 'scheduled', 'retryable') GROUP BY 1, 2) t));
    RETURN NULL;
END $$;

CREATE FUNCTION builds_shares_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    SELECT jsonb_agg(t) INTO deltas FROM (
        SELECT queue, submitter, sum(delta)::int AS delta FROM (
            SELECT o.queue, COALESCE(o.submitted_by, 'admin') AS submitter, -1 AS delta
            FROM old_rows o WHERE o.state IN ('pending', 'scheduled', 'retryable')
            UNION ALL
            SELECT n.queue, COALESCE(n.submitted_by, 'admin'), 1
            FROM new_rows n WHERE n.state IN ('pending', 'scheduled', 'retryable')
        ) c GROUP BY 1, 2 HAVING sum(delta) <> 0) t;
    IF deltas IS NOT NULL THEN
        PERFORM submitter_shares_apply(deltas);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER builds_shares_insert AFTER INSERT ON builds REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION builds_shares_insert();
CREATE TRIGGER builds_shares_delete AFTER DELETE ON builds REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION builds_shares_delete();
CREATE TRIGGER builds_shares_update AFTER UPDATE ON builds REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION builds_shares_update();

INSERT INTO submitter_shares (queue, submitter, queued)
SELECT queue, COALESCE(submitted_by, 'admin'), count(*) FROM builds
WHERE state IN ('pending', 'scheduled', 'retryable')
GROUP BY 1, 2;
