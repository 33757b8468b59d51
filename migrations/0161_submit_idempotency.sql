-- Idempotent submits (webhooks.md "Idempotent submit", src/queue/idempotency.rs): one row per
-- (submitter, Idempotency-Key), written just before the build's insert, naming the build it creates.
-- A replay within 24 h answers with that build and its token (kept sealed under the certs key, since
-- only its hash is on the build); the same key with another request (platform, source size) is 422.
CREATE TABLE submit_idempotency (
    -- the submitting key's id; '' for the built-in admin key
    submitter     text NOT NULL,
    key           text NOT NULL,
    fingerprint   text NOT NULL,
    build_id      text NOT NULL,
    token_sealed  bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (submitter, key)
);
CREATE INDEX submit_idempotency_created_idx ON submit_idempotency (created_at);
