-- P12's pgbench floor: the statements the controller runs for one build of the P12 cycle (captured with
-- pg_stat_statements), one build per pgbench transaction; each statement commits on its own.
-- submit: the full-queue check, then the insert (NOTIFY to the waiting pollers, event row)
SELECT q.name FROM queues q WHERE (SELECT count(*) FROM (SELECT 1 FROM builds WHERE queue = q.name AND state IN ('pending', 'scheduled', 'retryable') LIMIT 10000) AS queued) >= 10000;
WITH inserted AS (
    INSERT INTO builds (id, state, queue, priority, run_at, max_attempts, retry_build_failures,
                        submitted_at, source_key, source_size, certs_key, access_token_hash, original_build_id)
    SELECT 'pgb-' || nextval('pgbench_build_seq'), 'pending', 'ios', 0, now(), 3, false, now(), 'builds/pgb/source.zip', 10240, NULL, '\x00'::bytea, NULL
    WHERE NOT (SELECT count(*) FROM (SELECT 1 FROM builds WHERE queue = 'ios' AND state IN ('pending', 'scheduled', 'retryable') LIMIT 10000) AS queued) >= 10000
    RETURNING *
), notified AS (
    SELECT pg_notify('pgbench_ready', queue || ':' || id) FROM inserted WHERE state = 'pending'
), event AS (
    INSERT INTO events (kind, build_id, data)
    SELECT 'build.submitted', id, jsonb_build_object('platform', queue, 'state', state, 'attempt', attempt,
        'priority', priority, 'run_at', run_at, 'original_build_id', original_build_id)
    FROM inserted
)
SELECT inserted.* FROM inserted, (SELECT count(*) FROM notified) AS n;
-- poll: the claim
WITH held AS (
    UPDATE builds SET otp_hash = '\x01'::bytea, otp_expires_at = now() + 600 * interval '1 second'
    WHERE lease_owner = 'pgbw-' || (:client_id + 1) AND state IN ('assigned', 'building')
    RETURNING *
), picked AS (
    SELECT b.id FROM builds b
    WHERE true AND NOT EXISTS (SELECT 1 FROM held)
      AND EXISTS (SELECT 1 FROM workers w WHERE w.id = 'pgbw-' || (:client_id + 1) AND w.admin_state = 'active' AND w.unregistered_at IS NULL)
      AND b.state IN ('pending', 'scheduled', 'retryable')
      AND b.run_at <= now()
      AND b.queue = (ARRAY['ios'])[1]
      AND b.queue NOT IN (SELECT name FROM queues WHERE paused)
      AND (600 <= 0 OR NOT EXISTS (
          SELECT 1 FROM build_attempts a WHERE a.build_id = b.id AND a.worker_id = 'pgbw-' || (:client_id + 1) AND a.outcome = 'requeued'
            AND a.finished_at > now() - 600 * interval '1 second'))
    ORDER BY b.priority DESC, b.run_at, b.id
    LIMIT 1
    FOR UPDATE OF b SKIP LOCKED
), claimed AS (
    UPDATE builds b
    SET state = 'assigned', attempt = b.attempt + 1, lease_owner = 'pgbw-' || (:client_id + 1), worker_id = 'pgbw-' || (:client_id + 1),
        lease_token = nextval('lease_token_seq'),
        lease_expires_at = now() + 600 * interval '1 second',
        assigned_at = now(), started_at = now(), last_heartbeat_at = NULL, progress = NULL, stage = NULL,
        otp_hash = '\x01'::bytea, otp_expires_at = now() + 600 * interval '1 second',
        vm_token_hash = NULL, vm_token_sealed = NULL, vm_token_expires_at = NULL, vm_ready_at = NULL,
        log_seq = b.log_seq + 1
    FROM picked WHERE b.id = picked.id
    RETURNING b.*
), attempt_row AS (
    INSERT INTO build_attempts (build_id, attempt, worker_id, lease_token, assigned_at)
    SELECT id, attempt, lease_owner, lease_token, now() FROM claimed
), log_row AS (
    INSERT INTO build_logs (build_id, seq, ts, level, message)
    SELECT id, log_seq, now(), 'info', 'Build assigned to worker pgbench (attempt ' || attempt || ')'
    FROM claimed
), worker_row AS (
    UPDATE workers SET status = 'busy', last_seen_at = now() WHERE id = 'pgbw-' || (:client_id + 1) AND EXISTS (SELECT 1 FROM claimed)
), event AS (
    INSERT INTO events (kind, build_id, worker_id, data)
    SELECT 'build.assigned', id, lease_owner, jsonb_build_object('platform', queue, 'state', state,
        'attempt', attempt, 'log_seq', log_seq)
    FROM claimed
)
SELECT coalesce(max(id), '') AS cid FROM (SELECT id FROM held UNION ALL SELECT id FROM claimed) AS c
\gset
-- source download: the build, to check the caller holds it
SELECT * FROM builds WHERE id = :cid;
-- result upload: the fenced completion
WITH done AS (
    UPDATE builds SET state = 'completed', completed_at = now(), finished_reason = 'completed',
        progress = 100, result_key = 'builds/pgb/result.bin', result_size = 10240, result_sha256 = 'x', result_attempt = attempt,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
        otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = NULL, vm_token_sealed = NULL, vm_token_expires_at = NULL,
        log_seq = log_seq + 1
    WHERE id = :cid AND state IN ('assigned', 'building') AND lease_owner = 'pgbw-' || (:client_id + 1) AND (NULL::bigint IS NULL OR lease_token = NULL::bigint)
    RETURNING *
), attempt_row AS (
    UPDATE build_attempts a SET finished_at = now(), outcome = 'completed',
        started_at = coalesce(a.started_at, now())
    FROM done WHERE a.build_id = done.id AND a.attempt = done.attempt
), worker_row AS (
    UPDATE workers SET builds_completed = builds_completed + 1,
        status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END
    WHERE id = 'pgbw-' || (:client_id + 1) AND EXISTS (SELECT 1 FROM done)
), log_row AS (
    INSERT INTO build_logs (build_id, seq, ts, level, message)
    SELECT id, log_seq, now(), 'info', 'Build completed' FROM done
), event AS (
    INSERT INTO events (kind, build_id, worker_id, data)
    SELECT 'build.completed', id, 'pgbw-' || (:client_id + 1), jsonb_build_object('platform', queue, 'state', state,
        'attempt', attempt, 'log_seq', log_seq, 'result_size', result_size)
    FROM done
)
SELECT * FROM done;
-- status read
SELECT * FROM builds WHERE id = :cid;
