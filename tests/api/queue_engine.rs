//! The queue engine against a real PostgreSQL: exclusive claims, fencing, retries, rescue, cancel.
//! Time is moved by passing `now`, never by sleeping.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{Duration, Utc};
use expo_controller::config::QueueConfig;
use expo_controller::queue::{self, Failure, FailureKind, Holder, Platform, QueueError, ResultFile};

use crate::support::{enqueue, fresh_database, state_of, worker, worker_status};

fn result_file(id: &str) -> ResultFile {
    ResultFile {
        key: format!("builds/{id}/result-x.bin"),
        size: 1,
        sha256: "00".into(),
    }
}

#[tokio::test]
async fn fifty_concurrent_claimers_claim_each_of_2000_builds_exactly_once() {
    let (_, pool) = fresh_database(24).await;
    let settings = Arc::new(QueueConfig::default());
    for _ in 0..2000 {
        enqueue(&pool, Platform::Android, 0, 3).await;
    }
    let mut tasks = Vec::new();
    for n in 0..50 {
        let pool = pool.clone();
        let settings = settings.clone();
        tasks.push(tokio::spawn(async move {
            let w = worker(&pool, &format!("w{n}"), &[Platform::Android]).await;
            let mut claimed = Vec::new();
            while let Some(claim) = queue::claim(&pool, &w, &settings, Utc::now()).await.expect("claim") {
                assert!(
                    !claim.redelivered,
                    "a worker that completed its build must never be re-handed it"
                );
                let token = claim.build.lease_token.expect("lease token");
                let result = result_file(&claim.build.id);
                queue::record_writes(&pool, &[result.key.as_str()])
                    .await
                    .expect("pending");
                queue::complete(
                    &pool,
                    &claim.build.id,
                    Holder::attempt(&w.id, token),
                    &result,
                    Utc::now(),
                )
                .await
                .expect("complete");
                claimed.push(claim.build.id);
            }
            claimed
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        for id in task.await.expect("task") {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 2000, "every build claimed");
    assert!(seen.values().all(|&n| n == 1), "no build claimed twice");
    let (attempts, completed): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM build_attempts), count(*) FILTER (WHERE state = 'completed' AND attempt = 1) FROM builds")
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!((attempts, completed), (2000, 2000));
}

#[tokio::test]
async fn a_worker_never_holds_two_attempts_and_gets_its_attempt_again() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let a = enqueue(&pool, Platform::Ios, 0, 3).await;
    let _b = enqueue(&pool, Platform::Ios, 0, 3).await;
    let w = worker(&pool, "mac", &[Platform::Ios]).await;
    let first = queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    let again = queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    assert_eq!(first.build.id, a);
    assert_eq!(again.build.id, a, "re-delivery of the same attempt");
    assert!(again.redelivered);
    assert_eq!(again.build.attempt, 1);
    assert_eq!(again.build.lease_token, first.build.lease_token);
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM builds WHERE lease_owner = $1")
        .bind(&w.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 1);
}

#[tokio::test]
async fn claims_follow_platform_then_priority_then_age() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let old_low = enqueue(&pool, Platform::Ios, 0, 3).await;
    let android_high = enqueue(&pool, Platform::Android, 50, 3).await;
    let ios_high = enqueue(&pool, Platform::Ios, 10, 3).await;
    let mut order = Vec::new();
    for n in 0..2 {
        let w = worker(&pool, &format!("ios{n}"), &[Platform::Ios]).await;
        order.push(
            queue::claim(&pool, &w, &settings, Utc::now())
                .await
                .unwrap()
                .unwrap()
                .build
                .id,
        );
    }
    assert_eq!(
        order,
        vec![ios_high, old_low],
        "ios workers never get android builds; priority first"
    );
    assert_eq!(state_of(&pool, &android_high).await, "pending");
}

#[tokio::test]
async fn stale_attempts_are_fenced_off_and_change_nothing() {
    let (_, pool) = fresh_database(5).await;
    // The same worker claims the rescued build again (no retry elsewhere, though `other` is online).
    let settings = QueueConfig {
        retry_elsewhere_secs: 0,
        ..QueueConfig::default()
    };
    let id = enqueue(&pool, Platform::Ios, 0, 3).await;
    let w = worker(&pool, "mac", &[Platform::Ios]).await;
    let other = worker(&pool, "intruder", &[Platform::Ios]).await;
    let first = queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    let stale_token = first.build.lease_token.unwrap();

    // The lease expires, the build is rescued, promoted and claimed again by the same worker.
    let later = Utc::now() + Duration::minutes(11);
    assert_eq!(queue::rescue_expired(&pool, &settings, later, 100).await.unwrap(), 1);
    assert_eq!(
        queue::promote_due(&pool, later + Duration::minutes(1), 100)
            .await
            .unwrap(),
        1
    );
    let second = queue::claim(&pool, &w, &settings, later + Duration::minutes(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.build.attempt, 2);
    let before = state_snapshot(&pool, &id).await;

    let stale = Holder::attempt(&w.id, stale_token);
    let hb = queue::heartbeat(&pool, &id, stale, Some(50), None, &settings, Utc::now()).await;
    assert!(matches!(hb, Err(QueueError::Stale)), "{hb:?}");
    let done = queue::complete(&pool, &id, stale, &result_file(&id), Utc::now()).await;
    assert!(matches!(done, Err(QueueError::Stale)), "{done:?}");
    let failure = Failure {
        kind: FailureKind::Build,
        message: "late".into(),
    };
    let failed = queue::fail(&pool, &id, stale, &failure, &settings, Utc::now()).await;
    assert!(matches!(failed, Err(QueueError::Stale)), "{failed:?}");
    let never_held = queue::complete(&pool, &id, Holder::worker(&other.id), &result_file(&id), Utc::now()).await;
    assert!(matches!(never_held, Err(QueueError::NotHolder)), "{never_held:?}");
    assert_eq!(
        state_snapshot(&pool, &id).await,
        before,
        "refused operations changed nothing"
    );

    // The current attempt still works.
    let current = Holder::attempt(&w.id, second.build.lease_token.unwrap());
    queue::record_writes(&pool, &[result_file(&id).key.as_str()])
        .await
        .unwrap();
    queue::complete(&pool, &id, current, &result_file(&id), Utc::now())
        .await
        .unwrap();
    assert_eq!(state_of(&pool, &id).await, "completed");
    // And a final state never changes.
    let late = queue::fail(&pool, &id, current, &failure, &settings, Utc::now()).await;
    assert!(matches!(late, Err(QueueError::Stale)));
    assert_eq!(state_of(&pool, &id).await, "completed");
}

async fn state_snapshot(
    pool: &sqlx::PgPool,
    id: &str,
) -> (String, i32, Option<i64>, Option<i16>, serde_json::Value, i64) {
    let row: (
        String,
        i32,
        Option<i64>,
        Option<i16>,
        sqlx::types::Json<serde_json::Value>,
        i64,
    ) = sqlx::query_as(
        "SELECT state, attempt, lease_token, progress, errors, (SELECT count(*) FROM build_logs WHERE build_id = $1)
         FROM builds WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    (row.0, row.1, row.2, row.3, row.4.0, row.5)
}

#[tokio::test]
async fn infrastructure_failures_retry_with_backoff_until_attempts_run_out() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let id = enqueue(&pool, Platform::Android, 0, 3).await;
    let w = worker(&pool, "w", &[Platform::Android]).await;
    let infra = Failure {
        kind: FailureKind::Infrastructure,
        message: "VM crashed".into(),
    };
    let mut now = Utc::now();
    for attempt in 1..=3 {
        let claim = queue::claim(&pool, &w, &settings, now)
            .await
            .unwrap()
            .expect("claimable");
        assert_eq!(claim.build.attempt, attempt);
        let build = queue::fail(&pool, &id, Holder::worker(&w.id), &infra, &settings, now)
            .await
            .unwrap();
        if attempt < 3 {
            assert_eq!(build.state, "retryable");
            // backoff(attempt) = 15 s * 2^(attempt-1) ± 20 %
            let base = 15.0 * 2f64.powi(attempt - 1);
            let delay = (build.run_at - now).num_milliseconds() as f64 / 1000.0;
            assert!(
                delay >= base * 0.8 - 0.01 && delay <= base * 1.2 + 0.01,
                "attempt {attempt}: delay {delay}"
            );
            // Not claimable before run_at; promoted after it.
            assert!(queue::claim(&pool, &w, &settings, now).await.unwrap().is_none());
            now = build.run_at + Duration::seconds(1);
            assert_eq!(queue::promote_due(&pool, now, 100).await.unwrap(), 1);
            assert_eq!(state_of(&pool, &id).await, "pending");
        } else {
            assert_eq!(build.state, "failed");
            assert_eq!(build.finished_reason.as_deref(), Some("infrastructure"));
        }
    }
    let errors: sqlx::types::Json<serde_json::Value> = sqlx::query_scalar("SELECT errors FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let errors = errors.0.as_array().cloned().unwrap();
    assert_eq!(errors.len(), 3);
    assert_eq!(errors[2]["attempt"], 3);
    assert_eq!(errors[0]["kind"], "infrastructure");
    assert!(
        queue::claim(&pool, &w, &settings, now + Duration::hours(1))
            .await
            .unwrap()
            .is_none(),
        "failed is final"
    );
}

#[tokio::test]
async fn a_build_failure_is_final_by_default_and_retried_when_configured() {
    let (_, pool) = fresh_database(5).await;
    let mut settings = QueueConfig::default();
    let w = worker(&pool, "w", &[Platform::Ios]).await;
    let broken = Failure {
        kind: FailureKind::Build,
        message: "xcodebuild exited 65".into(),
    };

    let id = enqueue(&pool, Platform::Ios, 0, 3).await;
    queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    let build = queue::fail(&pool, &id, Holder::worker(&w.id), &broken, &settings, Utc::now())
        .await
        .unwrap();
    assert_eq!(build.state, "failed");
    assert_eq!(build.error_message.as_deref(), Some("xcodebuild exited 65"));

    settings.retry_build_failures = true;
    let id = enqueue(&pool, Platform::Ios, 0, 3).await;
    queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    let build = queue::fail(&pool, &id, Holder::worker(&w.id), &broken, &settings, Utc::now())
        .await
        .unwrap();
    assert_eq!(build.state, "retryable");
}

#[tokio::test]
async fn an_expired_lease_is_rescued_exactly_once_and_heartbeats_keep_it() {
    let (_, pool) = fresh_database(10).await;
    let settings = QueueConfig::default();
    let id = enqueue(&pool, Platform::Ios, 0, 3).await;
    let w = worker(&pool, "w", &[Platform::Ios]).await;
    let now = Utc::now();
    queue::claim(&pool, &w, &settings, now).await.unwrap().unwrap();

    // Within the first-heartbeat grace (10 min) nothing is rescued.
    assert_eq!(
        queue::rescue_expired(&pool, &settings, now + Duration::minutes(9), 100)
            .await
            .unwrap(),
        0
    );
    // A heartbeat moves the build to building and extends the lease by the lease timeout (5 min).
    let t1 = now + Duration::minutes(9);
    queue::heartbeat(
        &pool,
        &id,
        Holder::worker(&w.id),
        Some(10),
        Some("pod install"),
        &settings,
        t1,
    )
    .await
    .unwrap();
    assert_eq!(state_of(&pool, &id).await, "building");
    assert_eq!(
        queue::rescue_expired(&pool, &settings, t1 + Duration::minutes(4), 100)
            .await
            .unwrap(),
        0
    );

    // Past the lease: two sweepers race; exactly one rescues it.
    let late = t1 + Duration::minutes(6);
    let (a, b) = tokio::join!(
        queue::rescue_expired(&pool, &settings, late, 100),
        queue::rescue_expired(&pool, &settings, late, 100)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 1);
    assert_eq!(queue::rescue_expired(&pool, &settings, late, 100).await.unwrap(), 0);
    assert_eq!(state_of(&pool, &id).await, "retryable");
    let (outcome, started): (Option<String>, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as("SELECT outcome, started_at FROM build_attempts WHERE build_id = $1 AND attempt = 1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(outcome.as_deref(), Some("infrastructure"));
    assert!(started.is_some(), "the attempt row records when building started");
}

#[tokio::test]
async fn attempts_past_the_deadline_fail_as_timed_out_despite_heartbeats() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let id = enqueue(&pool, Platform::Ios, 0, 3).await;
    let w = worker(&pool, "w", &[Platform::Ios]).await;
    let now = Utc::now();
    queue::claim(&pool, &w, &settings, now).await.unwrap().unwrap();
    let late = now + Duration::hours(2) + Duration::minutes(1);
    queue::heartbeat(&pool, &id, Holder::worker(&w.id), None, None, &settings, late)
        .await
        .unwrap();
    assert_eq!(
        queue::fail_past_deadline(&pool, &settings, now + Duration::minutes(119), 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(queue::fail_past_deadline(&pool, &settings, late, 100).await.unwrap(), 1);
    let build = queue::find_build(&pool, &id).await.unwrap().unwrap();
    assert_eq!(build.state, "failed");
    assert_eq!(build.finished_reason.as_deref(), Some("timeout"));
}

#[tokio::test]
async fn a_cancelled_build_is_never_claimed_and_its_holder_is_told() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let w = worker(&pool, "w", &[Platform::Ios]).await;

    let queued = enqueue(&pool, Platform::Ios, 0, 3).await;
    queue::cancel(&pool, &queued, Utc::now(), &expo_controller::audit::Actor::cli())
        .await
        .unwrap();
    assert!(queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().is_none());
    assert!(matches!(
        queue::cancel(&pool, &queued, Utc::now(), &expo_controller::audit::Actor::cli()).await,
        Err(QueueError::AlreadyFinished)
    ));

    let held = enqueue(&pool, Platform::Ios, 0, 3).await;
    let claim = queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    let outcome = queue::cancel(&pool, &held, Utc::now(), &expo_controller::audit::Actor::cli())
        .await
        .unwrap();
    assert_eq!(outcome.interrupted_worker.as_deref(), Some(w.id.as_str()));
    let hb = queue::heartbeat(&pool, &held, Holder::worker(&w.id), None, None, &settings, Utc::now())
        .await
        .unwrap();
    assert!(hb.cancel_requested);
    let token = claim.build.lease_token.unwrap();
    let done = queue::complete(
        &pool,
        &held,
        Holder::attempt(&w.id, token),
        &result_file(&held),
        Utc::now(),
    )
    .await;
    assert!(matches!(done, Err(QueueError::Stale)));
    assert_eq!(state_of(&pool, &held).await, "cancelled");
    let status: String = worker_status(&pool, &w.id).await;
    assert_eq!(status, "idle", "the worker is freed");
}

#[tokio::test]
async fn scheduled_builds_wait_for_their_time() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let w = worker(&pool, "w", &[Platform::Ios]).await;
    let id = expo_controller::ids::new_id();
    let now = Utc::now();
    let new = queue::NewBuild {
        requirements: None,
        submitted_by: None,
        id: id.clone(),
        platform: Platform::Ios,
        priority: 0,
        max_attempts: 3,
        run_at: Some(now + Duration::minutes(30)),
        retry_build_failures: false,
        source_key: format!("builds/{id}/source.zip"),
        source_size: 1,
        certs_key: None,
        access_token_hash: vec![0; 32],
        original_build_id: None,
    };
    queue::enqueue(&mut pool.acquire().await.unwrap(), &new, now)
        .await
        .unwrap();
    assert_eq!(state_of(&pool, &id).await, "scheduled");
    assert!(queue::claim(&pool, &w, &settings, now).await.unwrap().is_none());
    let later = now + Duration::minutes(31);
    assert_eq!(
        queue::claim(&pool, &w, &settings, later)
            .await
            .unwrap()
            .unwrap()
            .build
            .id,
        id
    );
}

#[tokio::test]
async fn paused_queues_hand_out_nothing() {
    let (_, pool) = fresh_database(5).await;
    let settings = QueueConfig::default();
    let w = worker(&pool, "w", &[Platform::Ios]).await;
    enqueue(&pool, Platform::Ios, 0, 3).await;
    sqlx::query("UPDATE queues SET paused = true WHERE name = 'ios'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().is_none());
    sqlx::query("UPDATE queues SET paused = false WHERE name = 'ios'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().is_some());
}

/// Issue #25: the CHECK constraints of `builds` and `workers` are stored as array constants (migration
/// 0290), so PostgreSQL has no ARRAY expression to read and fold at the start of every statement on
/// them — and they still refuse every row they refused before, under the same names.
#[tokio::test]
async fn builds_and_workers_checks_are_stored_folded_and_still_refuse_bad_rows() {
    let (_, pool) = fresh_database(1).await;
    let unfolded: Vec<String> = sqlx::query_scalar(
        "SELECT conname::text FROM pg_constraint
         WHERE contype = 'c' AND conrelid IN ('builds'::regclass, 'workers'::regclass)
           AND pg_get_constraintdef(oid) LIKE '%ARRAY[%'
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("constraints");
    assert!(
        unfolded.is_empty(),
        "CHECK constraints still stored as ARRAY expressions: {unfolded:?}"
    );

    let build = enqueue(&pool, Platform::Ios, 0, 3).await;
    let w = worker(&pool, "checked", &[Platform::Ios]).await;
    let refusals = [
        (
            "UPDATE builds SET state = 'bogus' WHERE id = $1",
            &build,
            "builds_state_check",
        ),
        // a held state without a lease owner and token
        (
            "UPDATE builds SET state = 'assigned' WHERE id = $1",
            &build,
            "builds_check",
        ),
        // a lease owner on a queued build
        (
            "UPDATE builds SET lease_owner = 'w', lease_token = 1 WHERE id = $1",
            &build,
            "builds_check",
        ),
        (
            "UPDATE builds SET queue = 'windows' WHERE id = $1",
            &build,
            "builds_queue_check",
        ),
        (
            "UPDATE builds SET priority = 101 WHERE id = $1",
            &build,
            "builds_priority_check",
        ),
        (
            "UPDATE workers SET status = 'bogus' WHERE id = $1",
            &w.id,
            "workers_status_check",
        ),
        (
            "UPDATE workers SET admin_state = 'bogus' WHERE id = $1",
            &w.id,
            "workers_admin_state_check",
        ),
        (
            "UPDATE workers SET health = 'bogus' WHERE id = $1",
            &w.id,
            "workers_health_check",
        ),
    ];
    for (sql, id, constraint) in refusals {
        let refused = sqlx::query(sql).bind(id).execute(&pool).await;
        match refused {
            Err(sqlx::Error::Database(e)) => assert_eq!(e.constraint(), Some(constraint), "{sql}"),
            other => panic!("{sql}: not refused by {constraint}: {other:?}"),
        }
    }
    // every allowed value still passes
    for state in ["scheduled", "pending", "retryable", "completed", "failed", "cancelled"] {
        sqlx::query("UPDATE builds SET state = $2 WHERE id = $1")
            .bind(&build)
            .bind(state)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("state {state}: {e}"));
    }
    for (sql, value) in [
        ("UPDATE workers SET status = $2 WHERE id = $1", "busy"),
        ("UPDATE workers SET status = $2 WHERE id = $1", "offline"),
        ("UPDATE workers SET status = $2 WHERE id = $1", "idle"),
        ("UPDATE workers SET admin_state = $2 WHERE id = $1", "draining"),
        ("UPDATE workers SET admin_state = $2 WHERE id = $1", "disabled"),
        ("UPDATE workers SET admin_state = $2 WHERE id = $1", "revoked"),
        ("UPDATE workers SET admin_state = $2 WHERE id = $1", "active"),
        ("UPDATE workers SET health = $2 WHERE id = $1", "quarantined"),
        ("UPDATE workers SET health = $2 WHERE id = $1", "ok"),
    ] {
        sqlx::query(sql)
            .bind(&w.id)
            .bind(value)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql} ({value}): {e}"));
    }
}

/// The queued builds that one claim statement read, by `EXPLAIN (ANALYZE)` of the generic plan the
/// claim's pool uses: the actual rows of every walk of a claim index of `builds` (`builds_claim_*`).
async fn queued_builds_a_claim_reads(pool: &sqlx::PgPool, w: &queue::Worker) -> i64 {
    fn walked(node: &serde_json::Value) -> i64 {
        let own = match node["Index Name"].as_str() {
            Some(index) if index.starts_with("builds_claim") => {
                node["Actual Rows"].as_i64().unwrap_or(0) * node["Actual Loops"].as_i64().unwrap_or(0)
            }
            _ => 0,
        };
        let children = node["Plans"]
            .as_array()
            .map(|p| p.iter().map(walked).sum())
            .unwrap_or(0);
        own + children
    }
    let settings = QueueConfig::default();
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .expect("generic plan");
    let prepare = format!(
        "PREPARE claim_probe (text, timestamptz, text[], bigint, bytea, bigint, text, boolean, bigint, bigint) AS {}",
        queue::claim_sql(1)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
        .execute(&mut *tx)
        .await
        .expect("prepare the claim");
    // EXPLAIN EXECUTE takes no protocol parameters: the arguments as literals, quoted by PostgreSQL.
    let explain: String = sqlx::query_scalar(
        "SELECT format('EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim_probe (%L, %L, %L, %L, %L, %L, %L, %L, %L, %L)',
                       $1::text, $2::timestamptz, $3::text[], $4::bigint, $5::bytea, $6::bigint, $7::text,
                       $8::boolean, $9::bigint, $10::bigint)",
    )
    .bind(&w.id)
    .bind(Utc::now())
    .bind(&w.platforms)
    .bind(settings.first_heartbeat_grace_secs as i64)
    .bind(vec![0u8; 32])
    .bind(600i64)
    .bind(&w.name)
    .bind(w.accepts_work())
    .bind(settings.requeue_cooloff_secs as i64)
    .bind(settings.retry_elsewhere_secs as i64)
    .fetch_one(&mut *tx)
    .await
    .expect("the explain statement");
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_one(&mut *tx)
        .await
        .expect("explain the claim");
    sqlx::raw_sql("DEALLOCATE claim_probe")
        .execute(&mut *tx)
        .await
        .expect("deallocate");
    tx.rollback().await.expect("rollback");
    walked(&plan[0]["Plan"])
}

/// A worker that may not claim (draining here) gets nothing, and its poll reads no queued build: the
/// claim's last resort (`oldest`, the oldest eligible row when the fair pick found none locked-free) runs
/// only when the priority look-up (`top`) found an eligible build. It walked the whole queue, checking the
/// eligibility of every queued build, on every poll of such a worker.
#[tokio::test]
async fn a_worker_that_may_not_claim_reads_no_queued_build() {
    let (_, pool) = fresh_database(2).await;
    let settings = QueueConfig::default();
    for _ in 0..40 {
        enqueue(&pool, Platform::Ios, 0, 3).await;
    }
    let mut w = worker(&pool, "drained", &[Platform::Ios]).await;
    sqlx::query("UPDATE workers SET admin_state = 'draining' WHERE id = $1")
        .bind(&w.id)
        .execute(&pool)
        .await
        .expect("drain");
    w.admin_state = "draining".into();
    sqlx::query("VACUUM ANALYZE builds")
        .execute(&pool)
        .await
        .expect("analyze");
    assert!(!w.accepts_work());
    assert!(
        queue::claim(&pool, &w, &settings, Utc::now())
            .await
            .expect("claim")
            .is_none(),
        "a draining worker claims nothing"
    );
    assert_eq!(
        queued_builds_a_claim_reads(&pool, &w).await,
        0,
        "the claim of a draining worker read queued builds"
    );
    // The same worker active again: the claim reads the queue (the probe above can see a walk).
    w.admin_state = "active".into();
    sqlx::query("UPDATE workers SET admin_state = 'active' WHERE id = $1")
        .bind(&w.id)
        .execute(&pool)
        .await
        .expect("activate");
    assert!(queued_builds_a_claim_reads(&pool, &w).await > 0);
}
