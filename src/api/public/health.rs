//! Public health, readiness and fleet statistics (R22, B21): no credential.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::api::{ApiError, ApiResult, AppState};
use crate::queue;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/api/health", get(health))
        .route("/ready", get(ready))
        .route("/api/stats", get(stats))
}

/// How long `/api/stats` answers from its cache.
const STATS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// B21: public fleet statistics, measured from rows and cached for up to 10 s.
async fn stats(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let mut cache = state.stats_cache.lock().await;
    if let Some((at, value)) = cache.as_ref()
        && at.elapsed() < STATS_TTL
    {
        return Ok(Json(value.clone()));
    }
    let s = queue::fleet_stats(&state.pool, chrono::Utc::now()).await?;
    let value = json!({
        "nodesOnline": s.nodes_online,
        "buildsQueued": s.builds_queued,
        "activeBuilds": s.active_builds,
        "buildsToday": s.builds_today,
        "totalBuilds": s.total_builds,
        "totalBuildTimeMs": s.total_build_time_ms,
        "totalCpuCycles": s.total_cpu_seconds,
    });
    *cache = Some((std::time::Instant::now(), value.clone()));
    Ok(Json(value))
}

/// Liveness with queue depth; never reveals paths or configuration.
async fn health(State(state): State<AppState>) -> Json<Value> {
    match queue::queue_counts(&state.pool).await {
        Ok(counts) => Json(json!({ "status": "ok", "queue": counts })),
        Err(_) => Json(json!({ "status": "degraded", "queue": null })),
    }
}

/// How long `/ready` waits for the artifact store.
const STORE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// 200 only when the database answers, every migration is applied and the artifact store answers;
/// 503 otherwise (`Storage unavailable` with `Retry-After` for the store).
async fn ready(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let applied: Result<i64, sqlx::Error> = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&state.pool)
        .await;
    let expected = crate::db::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count() as i64;
    match applied {
        Ok(n) if n >= expected => match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.storage.check()).await {
            Ok(Ok(())) => Ok(Json(json!({ "status": "ready", "storage": "ok" }))),
            Ok(Err(e)) => Err(ApiError::storage_unavailable(e)),
            Err(_) => Err(ApiError::storage_unavailable(anyhow::anyhow!(
                "artifact store did not answer within {STORE_CHECK_TIMEOUT:?}"
            ))),
        },
        Ok(_) => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "Migrations pending",
        )),
        Err(_) => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "Database unavailable",
        )),
    }
}
