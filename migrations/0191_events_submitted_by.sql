-- A deleted build's event still reaches its submitter's webhook subscriptions: the row is gone when the
-- fan-out trigger runs (the DELETE and the event are one statement), so the event carries the key that
-- submitted the build (not in its payload) for the trigger to match.
ALTER TABLE events ADD COLUMN submitted_by text;

CREATE OR REPLACE FUNCTION webhook_fanout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM webhook_subscriptions WHERE active LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (subscription_id, event_id, kind, build_id, worker_id, data, event_at)
    SELECT s.id, e.id, e.kind, e.build_id, e.worker_id, e.data, e.created_at
      FROM inserted e
      JOIN webhook_subscriptions s ON s.active AND webhook_matches(s.events, e.kind)
     WHERE (s.owner_key_id IS NULL
            OR e.submitted_by = s.owner_key_id
            OR EXISTS (SELECT 1 FROM builds b WHERE b.id = e.build_id AND b.submitted_by = s.owner_key_id))
       AND webhook_creator_valid(s.creator_key_id)
     ORDER BY e.id, s.id;
    IF FOUND THEN
        PERFORM pg_notify('expo_webhooks', '');
    END IF;
    RETURN NULL;
END $$;
