-- The event outbox (src/queue/emit.rs, src/events.rs). Every state change of a build, worker or queue
-- inserts one row here in the transaction that makes the change, so an event exists exactly when its
-- change committed. Ids come from a logged sequence and are never reused; they are allocated before
-- commit, so a reader may see id N+1 before N commits: the delivery loop holds back everything after a
-- gap until the transactions that could fill it have ended (see src/events.rs).
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    build_id    text,
    worker_id   text,
    -- platform, state and the kind-specific fields of the event
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE events SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0);

-- One wake-up per committing transaction that emitted (NOTIFY folds identical payloads of one
-- transaction into one, and delivers only at commit); statements that inserted nothing stay silent.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('expo_events', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
