-- The audit log (identity.md, "Audit"): one row per change made by a person or a key, written in the
-- transaction of the change. Append-only: the application never updates a row and deletes rows only
-- through retention (CONTROLLER_AUDIT_RETENTION_DAYS, in the prune job).
CREATE TABLE audit_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- The key's id; NULL for the built-in admin key, the database-mode CLI and build tokens.
    actor       text,
    -- `admin`, the key's name, `cli:<os user>`, or `build-token`.
    actor_name  text NOT NULL,
    role        text NOT NULL,
    client_ip   text,
    user_agent  text,
    action      text NOT NULL,
    target_kind text,
    target_id   text,
    before      jsonb,
    after       jsonb
);

CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_actor ON audit_events (actor, id);
CREATE INDEX audit_events_actor_name ON audit_events (actor_name, id);
CREATE INDEX audit_events_action ON audit_events (action, id);
CREATE INDEX audit_events_target ON audit_events (target_id, id);
