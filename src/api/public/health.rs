//! Public health, readiness and fleet statistics (R22, B21): no credential.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::api::error::ErrorBody;
use crate::api::group::ApiRouter;
use crate::api::{ApiError, ApiResult, AppState};
use crate::queue;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(health_alias))
        .routes(routes!(ready))
        .routes(routes!(stats))
}

/// How long `/api/stats` answers from its cache.
const STATS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /api/stats` (B21): real numbers, never synthetic.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Workers seen recently and not offline.
    pub nodes_online: i64,
    /// Builds waiting (pending, scheduled, retryable).
    pub builds_queued: i64,
    /// Builds held by workers.
    pub active_builds: i64,
    /// Builds completed since UTC midnight.
    pub builds_today: i64,
    pub total_builds: i64,
    /// Sum of build durations of completed builds, in milliseconds.
    pub total_build_time_ms: i64,
    /// CPU time measured by the VM monitors, in core-seconds.
    pub total_cpu_cycles: i64,
}

/// Public fleet statistics, measured from rows and cached for up to 10 s.
#[utoipa::path(get, path = "/api/stats", responses((status = 200, description = "Fleet statistics", body = Stats)))]
async fn stats(State(state): State<AppState>) -> ApiResult<Json<Stats>> {
    let mut cache = state.stats_cache.lock().await;
    if let Some((at, value)) = cache.as_ref()
        && at.elapsed() < STATS_TTL
    {
        return Ok(Json(value.clone()));
    }
    let s = queue::fleet_stats(&state.pool, chrono::Utc::now()).await?;
    let value = Stats {
        nodes_online: s.nodes_online,
        builds_queued: s.builds_queued,
        active_builds: s.active_builds,
        builds_today: s.builds_today,
        total_builds: s.total_builds,
        total_build_time_ms: s.total_build_time_ms,
        total_cpu_cycles: s.total_cpu_seconds,
    };
    *cache = Some((std::time::Instant::now(), value.clone()));
    Ok(Json(value))
}

/// Queue depth of `/health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueueDepth {
    /// Builds waiting (pending, scheduled, retryable).
    pub pending: i64,
    /// Builds held by workers.
    pub active: i64,
}

/// `GET /health`: `ok` with the queue depth, or `degraded` with `queue: null` when the database
/// does not answer. Never reveals paths or configuration.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    pub queue: Option<QueueDepth>,
}

async fn health_answer(state: &AppState) -> Json<Health> {
    match queue::queue_counts(&state.pool).await {
        Ok(counts) => Json(Health {
            status: "ok".into(),
            queue: Some(QueueDepth {
                pending: counts.pending,
                active: counts.active,
            }),
        }),
        Err(_) => Json(Health {
            status: "degraded".into(),
            queue: None,
        }),
    }
}

/// Liveness with queue depth.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Alive", body = Health)))]
async fn health(State(state): State<AppState>) -> Json<Health> {
    health_answer(&state).await
}

/// Liveness with queue depth (alias of `/health`).
#[utoipa::path(get, path = "/api/health", responses((status = 200, description = "Alive", body = Health)))]
async fn health_alias(State(state): State<AppState>) -> Json<Health> {
    health_answer(&state).await
}

/// `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: String,
    /// `ok`.
    pub storage: String,
}

/// How long `/ready` waits for the artifact store.
const STORE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// 200 only when the database answers, every migration is applied and the artifact store answers;
/// 503 otherwise (`Storage unavailable` with `Retry-After` for the store).
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, description = "Ready to serve", body = Ready),
    (status = 503, description = "`Database unavailable`, `Migrations pending` or `Storage unavailable`", body = ErrorBody),
))]
async fn ready(State(state): State<AppState>) -> ApiResult<Json<Ready>> {
    let applied: Result<i64, sqlx::Error> = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&state.pool)
        .await;
    let expected = crate::db::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count() as i64;
    match applied {
        Ok(n) if n >= expected => match tokio::time::timeout(STORE_CHECK_TIMEOUT, state.storage.check()).await {
            Ok(Ok(())) => Ok(Json(Ready {
                status: "ready".into(),
                storage: "ok".into(),
            })),
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
