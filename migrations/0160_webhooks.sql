-- Webhook subscriptions and their durable deliveries (webhooks.md, src/webhooks).
--
-- A subscription of an admin (owner_key_id null) carries every build's events; one of a `submitter`
-- key only its own builds' (builds.submitted_by = owner_key_id). The signing secret is kept sealed
-- with AES-256-GCM under the certs key: it must be used to sign, so a hash would not do.
CREATE TABLE webhook_subscriptions (
    id             text PRIMARY KEY,
    url            text NOT NULL,
    -- kinds (`build.completed`), families (`build.*`) or `*`
    events         text[] NOT NULL,
    description    text NOT NULL DEFAULT '',
    secret_sealed  bytea NOT NULL,
    owner_key_id   text REFERENCES api_keys (id) ON DELETE CASCADE,
    owner_name     text NOT NULL,
    active         boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_subscriptions_owner_idx ON webhook_subscriptions (owner_key_id);

-- One row per event and matching subscription, written by the trigger below in the transaction that
-- inserts the event (so a committed change is never missed and a rolled-back one never sent). The
-- event's fields are copied: the outbox is pruned sooner than a delivery may still be retrying.
--
-- A delivery is a durable job: `pending` rows whose run_at has passed are claimed with
-- FOR UPDATE SKIP LOCKED and become `delivering` with run_at = the end of their lease, so a delivery
-- whose instance died is claimed again once the lease is over (same message id: at least once).
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    subscription_id  text NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    event_id         bigint NOT NULL,
    kind             text NOT NULL,
    build_id         text,
    worker_id        text,
    data             jsonb NOT NULL,
    event_at         timestamptz NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivering', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- retries end at created_at + CONTROLLER_WEBHOOK_RETRY_HOURS (a redelivery starts a new period)
    retry_from       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (run_at) WHERE state IN ('pending', 'delivering');
CREATE INDEX webhook_deliveries_subscription_idx ON webhook_deliveries (subscription_id, id DESC);
ALTER TABLE webhook_deliveries SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);

-- Every attempt of a delivery: when, the answer's status (null: none), latency, error, next retry.
CREATE TABLE webhook_attempts (
    id             bigserial PRIMARY KEY,
    delivery_id    bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    at             timestamptz NOT NULL,
    status_code    integer,
    latency_ms     integer NOT NULL,
    error          text,
    next_retry_at  timestamptz
);
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, id);

-- Whether an event kind matches a subscription's patterns: the kind itself, `family.*`, or `*`.
CREATE FUNCTION webhook_matches(patterns text[], kind text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT EXISTS (
        SELECT 1 FROM unnest(patterns) AS p
        WHERE p = '*' OR p = kind OR (right(p, 2) = '.*' AND starts_with(kind, left(p, -1)))
    )
$$;

-- Fan-out: once per statement that inserted events (the outbox's inserts are spread over many
-- statements and CTEs; a statement trigger catches them all). Without an active subscription it
-- costs one index-less look at a tiny table.
CREATE FUNCTION webhook_fanout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhook_subscriptions WHERE active) THEN
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
CREATE TRIGGER webhook_fanout AFTER INSERT ON events REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_fanout();
