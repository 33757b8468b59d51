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

CREATE FUNCTION builds_submitter_shares() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_queued boolean := false;
    is_queued  boolean := false;
    old_key    text;
    new_key    text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        was_queued := OLD.state IN ('pending', 'scheduled', 'retryable');
        old_key := COALESCE(OLD.submitted_by, 'admin');
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        is_queued := NEW.state IN ('pending', 'scheduled', 'retryable');
        new_key := COALESCE(NEW.submitted_by, 'admin');
    END IF;
    IF was_queued AND is_queued AND OLD.queue = NEW.queue AND old_key = new_key THEN
        RETURN NULL;
    END IF;
    IF was_queued THEN
        UPDATE submitter_shares SET queued = queued - 1 WHERE queue = OLD.queue AND submitter = old_key;
    END IF;
    IF is_queued THEN
        INSERT INTO submitter_shares AS s (queue, submitter, pass, queued)
        VALUES (NEW.queue, new_key,
                COALESCE((SELECT min(m.pass) FROM submitter_shares m WHERE m.queue = NEW.queue AND m.queued > 0),
                         (SELECT max(m.pass) FROM submitter_shares m WHERE m.queue = NEW.queue), 0),
                1)
        ON CONFLICT (queue, submitter) DO UPDATE SET
            queued = s.queued + 1,
            pass = CASE WHEN s.queued > 0 THEN s.pass ELSE GREATEST(s.pass, COALESCE(
                (SELECT min(m.pass) FROM submitter_shares m WHERE m.queue = NEW.queue AND m.queued > 0),
                (SELECT max(m.pass) FROM submitter_shares m WHERE m.queue = NEW.queue), 0)) END;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER builds_submitter_shares_insert AFTER INSERT ON builds FOR EACH ROW
    WHEN (NEW.state IN ('pending', 'scheduled', 'retryable'))
    EXECUTE FUNCTION builds_submitter_shares();
CREATE TRIGGER builds_submitter_shares_update AFTER UPDATE OF state, queue, submitted_by ON builds FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.queue IS DISTINCT FROM NEW.queue
          OR OLD.submitted_by IS DISTINCT FROM NEW.submitted_by)
    EXECUTE FUNCTION builds_submitter_shares();
CREATE TRIGGER builds_submitter_shares_delete AFTER DELETE ON builds FOR EACH ROW
    WHEN (OLD.state IN ('pending', 'scheduled', 'retryable'))
    EXECUTE FUNCTION builds_submitter_shares();

INSERT INTO submitter_shares (queue, submitter, queued)
SELECT queue, COALESCE(submitted_by, 'admin'), count(*) FROM builds
WHERE state IN ('pending', 'scheduled', 'retryable')
GROUP BY 1, 2;
