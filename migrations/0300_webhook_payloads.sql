-- One payload per event, not one per delivery (issue #25, W1c).
--
-- The fan-out copied the event (kind, build and worker ids, data, time) into every delivery row: ten
-- subscriptions to an event were ten copies, and each copy was written again by the claim (a HOT
-- update) and by the record of the outcome (a new row version). The event now goes once into
-- `webhook_payloads`, written by the fan-out in the same statement as its deliveries (so it commits and
-- rolls back with them), and a delivery row is only what is per delivery: the subscription, the event
-- id, state, attempts, times and the last attempt. Rows written before this migration keep their own
-- copy (read when the event has no payload row); a test delivery (`webhook.test`, event id 0) carries
-- its own data in the row as before.
--
-- The outbox (`events`) cannot be the payload: it is pruned after CONTROLLER_EVENT_RETENTION_HOURS,
-- while a delivery is kept (listed, redeliverable) as long as a finished build.
CREATE TABLE webhook_payloads (
    event_id    bigint PRIMARY KEY,
    kind        text NOT NULL,
    build_id    text,
    worker_id   text,
    data        jsonb NOT NULL,
    event_at    timestamptz NOT NULL,
    -- the deliveries that still reference it: the payload is deleted with the last of them
    deliveries  integer NOT NULL
);

ALTER TABLE webhook_deliveries
    ALTER COLUMN kind DROP NOT NULL,
    ALTER COLUMN data DROP NOT NULL,
    ALTER COLUMN event_at DROP NOT NULL;

-- One event: a delivery row per active subscription that matches it, then (if any) its payload, in the
-- event's transaction. The filters are those of migration 0241.
CREATE OR REPLACE FUNCTION webhook_fanout_row() RETURNS trigger LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    written integer;
BEGIN
    INSERT INTO webhook_deliveries (subscription_id, event_id)
    SELECT s.id, NEW.id
      FROM webhook_subscriptions s
     WHERE s.active
       -- '*', the kind itself, and `prefix.*` for every prefix ending at a dot (webhook_matches)
       AND s.events && (ARRAY['*', NEW.kind] || ARRAY(
            SELECT left(NEW.kind, i) || '*' FROM generate_series(1, length(NEW.kind)) AS i
             WHERE substr(NEW.kind, i, 1) = '.'))
       -- webhook_creator_valid, inline
       AND (s.creator_key_id IS NULL OR EXISTS (
            SELECT 1 FROM api_keys k WHERE k.id = s.creator_key_id AND k.revoked_at IS NULL
               AND (k.expires_at IS NULL OR k.expires_at > now())))
       AND (s.owner_key_id IS NULL
            OR s.owner_key_id = NEW.submitted_by
            OR s.owner_key_id = (SELECT b.submitted_by FROM builds b WHERE b.id = NEW.build_id))
     ORDER BY s.id;
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written > 0 THEN
        INSERT INTO webhook_payloads (event_id, kind, build_id, worker_id, data, event_at, deliveries)
        VALUES (NEW.id, NEW.kind, NEW.build_id, NEW.worker_id, NEW.data, NEW.created_at, written);
        PERFORM pg_notify('expo_webhooks', '');
    END IF;
    RETURN NULL;
END $$;

-- Deleted deliveries (the prune, a deleted subscription's cascade, orphans) release their payloads:
-- the count goes down by the deleted rows of each event, and a payload no delivery references is
-- deleted. The payload rows are locked in event order first, so two deletions never deadlock on them.
CREATE FUNCTION webhook_deliveries_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM webhook_payloads
      WHERE event_id IN (SELECT event_id FROM gone WHERE event_id > 0)
      ORDER BY event_id FOR UPDATE;
    UPDATE webhook_payloads p SET deliveries = p.deliveries - g.n
      FROM (SELECT event_id, count(*)::integer AS n FROM gone WHERE event_id > 0 GROUP BY event_id) g
     WHERE p.event_id = g.event_id;
    DELETE FROM webhook_payloads
     WHERE event_id IN (SELECT event_id FROM gone WHERE event_id > 0) AND deliveries <= 0;
    RETURN NULL;
END $$;
CREATE TRIGGER webhook_deliveries_deleted AFTER DELETE ON webhook_deliveries
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION webhook_deliveries_deleted();
