-- A subscription carries events only while the key that created it is valid: revoking a key pauses its
-- subscriptions (identity::revoke, same transaction), and an expired or revoked creator stops the
-- fan-out and the delivery of what is already queued. `creator_key_id` is NULL only for the built-in
-- admin key and the CLI; a stored admin key's subscriptions (owner NULL: every build) are tied to it too.
ALTER TABLE webhook_subscriptions ADD COLUMN creator_key_id text REFERENCES api_keys (id) ON DELETE CASCADE;
UPDATE webhook_subscriptions SET creator_key_id = owner_key_id WHERE owner_key_id IS NOT NULL;

CREATE FUNCTION webhook_creator_valid(key_id text) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT key_id IS NULL OR EXISTS (
        SELECT 1 FROM api_keys k
         WHERE k.id = key_id AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()))
$$;

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
            OR EXISTS (SELECT 1 FROM builds b WHERE b.id = e.build_id AND b.submitted_by = s.owner_key_id))
       AND webhook_creator_valid(s.creator_key_id)
     ORDER BY e.id, s.id;
    IF FOUND THEN
        PERFORM pg_notify('expo_webhooks', '');
    END IF;
    RETURN NULL;
END $$;
