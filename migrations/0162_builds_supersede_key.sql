-- Superseding submits (webhooks.md "Supersede", src/queue/supersede.rs): a build submitted with a
-- supersede_key cancels its submitter's older queued (optionally running) builds with that key and
-- platform. Only builds that carry a key are indexed.
ALTER TABLE builds ADD COLUMN supersede_key text;
CREATE INDEX builds_supersede_key_idx ON builds (supersede_key, queue, submitted_at)
    WHERE supersede_key IS NOT NULL AND state IN ('pending', 'scheduled', 'retryable', 'assigned', 'building');
