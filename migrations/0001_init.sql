-- The durable build queue: the `builds` row *is* the job (see src/queue/mod.rs for the state machine).

CREATE TABLE workers (
    id               text PRIMARY KEY,
    name             text NOT NULL,
    capabilities     jsonb NOT NULL DEFAULT '{}'::jsonb,
    platforms        text[] NOT NULL DEFAULT ARRAY['ios', 'android'],
    -- idle | busy | offline
    status           text NOT NULL DEFAULT 'idle' CHECK (status IN ('idle', 'busy', 'offline')),
    -- operator control: active | draining | disabled | revoked
    admin_state      text NOT NULL DEFAULT 'active' CHECK (admin_state IN ('active', 'draining', 'disabled', 'revoked')),
    token_hash       bytea,
    token_expires_at timestamptz,
    registered_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    builds_completed bigint NOT NULL DEFAULT 0,
    builds_failed    bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX workers_token_hash_idx ON workers (token_hash) WHERE token_hash IS NOT NULL;
CREATE INDEX workers_last_seen_idx ON workers (last_seen_at) WHERE status <> 'offline';

-- Fencing tokens: one fresh value per attempt, monotonically increasing across the whole database.
CREATE SEQUENCE lease_token_seq;

CREATE TABLE builds (
    id                    text PRIMARY KEY,
    state                 text NOT NULL CHECK (state IN ('scheduled', 'pending', 'assigned', 'building',
                                                         'retryable', 'completed', 'failed', 'cancelled')),
    queue                 text NOT NULL CHECK (queue IN ('ios', 'android')),
    priority              integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    run_at                timestamptz NOT NULL,
    attempt               integer NOT NULL DEFAULT 0,
    max_attempts          integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 10),
    retry_build_failures  boolean NOT NULL DEFAULT false,
    -- worker of the latest attempt (kept after it ends, for status and stats)
    worker_id             text,
    lease_owner           text,
    lease_token           bigint,
    lease_expires_at      timestamptz,
    assigned_at           timestamptz,
    last_heartbeat_at     timestamptz,
    progress              smallint CHECK (progress BETWEEN 0 AND 100),
    stage                 text,
    cancel_requested_at   timestamptz,
    errors                jsonb NOT NULL DEFAULT '[]'::jsonb,
    submitted_at          timestamptz NOT NULL,
    started_at            timestamptz,
    completed_at          timestamptz,
    finished_reason       text,
    error_message         text,
    -- credentials (hashes only)
    access_token_hash     bytea,
    otp_hash              bytea,
    otp_expires_at        timestamptz,
    vm_token_hash         bytea,
    -- the VM token sealed with the certs key, so vm-status can hand it to the holding worker
    vm_token_sealed       bytea,
    vm_token_expires_at   timestamptz,
    vm_ready_at           timestamptz,
    -- stored objects
    source_key            text,
    source_size           bigint,
    certs_key             text,
    result_key            text,
    result_size           bigint,
    result_sha256         text,
    result_attempt        integer,
    original_build_id     text,
    -- logs: next sequence number, and lines refused past the cap
    log_seq               bigint NOT NULL DEFAULT 0,
    log_dropped           bigint NOT NULL DEFAULT 0,
    log_marker_seq        bigint,
    CHECK ((state IN ('assigned', 'building')) = (lease_owner IS NOT NULL AND lease_token IS NOT NULL))
);
-- Claim: only queued rows are indexed, so finished history never slows it down. Workers of one platform
-- walk their queue's index; workers of both walk the global one. Either way the first eligible entry wins.
CREATE INDEX builds_claim_queue_idx ON builds (queue, priority DESC, run_at, id)
    WHERE state IN ('pending', 'scheduled', 'retryable');
CREATE INDEX builds_claim_idx ON builds (priority DESC, run_at, id)
    WHERE state IN ('pending', 'scheduled', 'retryable');
-- Re-delivery and "what does this worker hold".
CREATE UNIQUE INDEX builds_held_by_idx ON builds (lease_owner) WHERE state IN ('assigned', 'building');
-- Rescue and deadline sweeps.
CREATE INDEX builds_lease_expiry_idx ON builds (lease_expires_at) WHERE state IN ('assigned', 'building');
CREATE INDEX builds_started_idx ON builds (started_at) WHERE state IN ('assigned', 'building');
-- Promotion of due scheduled/retryable rows.
CREATE INDEX builds_due_idx ON builds (run_at) WHERE state IN ('scheduled', 'retryable');
-- Certs purge and prune of finished builds.
CREATE INDEX builds_certs_final_idx ON builds (completed_at)
    WHERE certs_key IS NOT NULL AND state IN ('completed', 'failed', 'cancelled');
CREATE INDEX builds_finished_idx ON builds (completed_at) WHERE state IN ('completed', 'failed', 'cancelled');
-- Listings, newest first (all builds, and per worker).
CREATE INDEX builds_submitted_idx ON builds (submitted_at DESC, id DESC);
CREATE INDEX builds_worker_idx ON builds (worker_id, submitted_at DESC) WHERE worker_id IS NOT NULL;

CREATE TABLE build_attempts (
    build_id     text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    worker_id    text NOT NULL,
    lease_token  bigint NOT NULL,
    assigned_at  timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    -- completed | build_failure | infrastructure | timeout | cancelled
    outcome      text,
    error_message text,
    PRIMARY KEY (build_id, attempt)
);
CREATE INDEX build_attempts_worker_idx ON build_attempts (worker_id, assigned_at DESC);

CREATE TABLE build_logs (
    build_id  text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    seq       bigint NOT NULL,
    ts        timestamptz NOT NULL,
    level     text NOT NULL,
    message   text NOT NULL,
    PRIMARY KEY (build_id, seq)
);

CREATE TABLE cpu_snapshots (
    build_id     text NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    ts           timestamptz NOT NULL,
    cpu_percent  double precision NOT NULL,
    memory_mb    double precision NOT NULL
);
CREATE INDEX cpu_snapshots_build_idx ON cpu_snapshots (build_id, ts);

CREATE TABLE diagnostics (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    worker_id   text NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    status      text NOT NULL CHECK (status IN ('healthy', 'warning', 'critical')),
    run_at      timestamptz NOT NULL,
    duration_ms bigint NOT NULL,
    auto_fixed  boolean NOT NULL DEFAULT false,
    checks      jsonb NOT NULL
);
CREATE INDEX diagnostics_worker_idx ON diagnostics (worker_id, run_at DESC);

-- Platform queues that operators can pause.
CREATE TABLE queues (
    name      text PRIMARY KEY CHECK (name IN ('ios', 'android')),
    paused    boolean NOT NULL DEFAULT false,
    paused_at timestamptz
);
INSERT INTO queues (name) VALUES ('ios'), ('android');

-- Once-per-tick guard for maintenance jobs across controller instances.
CREATE TABLE cron_ticks (
    job     text NOT NULL,
    tick    timestamptz NOT NULL,
    ran_at  timestamptz NOT NULL DEFAULT now(),
    ran_by  text NOT NULL,
    PRIMARY KEY (job, tick)
);
