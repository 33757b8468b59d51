-- Cheaper webhook deliveries (src/webhooks/deliver.rs): results are recorded in one statement per
-- batch, and a successful attempt lives on the delivery row itself (no webhook_attempts row), so a
-- first-try success costs one claim share and one finish share and no insert. webhook_attempts keeps
-- the attempts that failed; a delivered row's last attempt is read from these columns (and moved into
-- webhook_attempts when the delivery is sent again).
ALTER TABLE webhook_deliveries
    ADD COLUMN last_attempt_at  timestamptz,
    ADD COLUMN last_status      integer,
    ADD COLUMN last_latency_ms  integer;

-- The fan-out trigger's "is there any active subscription" and its join read only active rows.
CREATE INDEX webhook_subscriptions_active_idx ON webhook_subscriptions (id) INCLUDE (owner_key_id, events)
    WHERE active;

-- Fan-out, once per statement that inserted events: one INSERT … SELECT over the statement's
-- transition table. Without an active subscription it is one index probe of an empty partial index.
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
     WHERE s.owner_key_id IS NULL
        OR EXISTS (SELECT 1 FROM builds b WHERE b.id = e.build_id AND b.submitted_by = s.owner_key_id)
     ORDER BY e.id, s.id;
    IF FOUND THEN
        PERFORM pg_notify('expo_webhooks', '');
    END IF;
    RETURN NULL;
END $$;
