//! A build's log for its owner (B5).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;

use crate::api::AppState;
use crate::api::auth::OwnedBuild;
use crate::api::error::ApiResult;
use crate::api::error::ErrorBody;
use crate::api::extract::{QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::queue;

pub fn router() -> ApiRouter {
    ApiRouter::new().routes(routes!(read_logs))
}

/// One log line (B5).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Increases by one per stored line; pass the last one as `?after=`.
    pub seq: i64,
    /// Epoch milliseconds.
    pub timestamp: i64,
    /// `info`, `warn`, `error` or `debug`.
    pub level: String,
    pub message: String,
}

/// `GET /api/builds/:id/logs` (B5).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Logs {
    pub build_id: String,
    pub logs: Vec<LogLine>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// B5: every line, oldest first, or an incremental page with `?after=<seq>&limit=`.
#[utoipa::path(get, path = "/api/builds/{id}/logs", params(("id" = String, Path, description = "Build id"), LogsQuery), responses(
    (status = 200, description = "Log lines, oldest first", body = Logs),
    (status = 404, description = "`Build not found`", body = ErrorBody)))]
async fn read_logs(
    State(state): State<AppState>,
    OwnedBuild { build, .. }: OwnedBuild,
    QueryParams(q): QueryParams<LogsQuery>,
) -> ApiResult<Json<Logs>> {
    let id = build.id;
    let after = bounded_int(q.after.as_deref(), "after", 0, i64::MAX)?.unwrap_or(0);
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 100_000)?;
    let lines = queue::read_logs(&state.pool, &id, after, limit).await?;
    let logs = lines
        .iter()
        .map(|l| LogLine {
            seq: l.seq,
            timestamp: l.ts.timestamp_millis(),
            level: l.level.clone(),
            message: l.message.clone(),
        })
        .collect();
    Ok(Json(Logs { build_id: id, logs }))
}
