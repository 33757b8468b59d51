//! A build's log for its owner (B5).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::AppState;
use crate::api::auth::OwnedBuild;
use crate::api::error::ApiResult;
use crate::api::extract::{QueryParams, bounded_int};
use crate::queue;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/builds/{id}/logs", get(read_logs))
}

#[derive(Deserialize)]
struct LogsQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// B5: every line, oldest first, or an incremental page with `?after=<seq>&limit=`.
async fn read_logs(
    State(state): State<AppState>,
    OwnedBuild { build, .. }: OwnedBuild,
    QueryParams(q): QueryParams<LogsQuery>,
) -> ApiResult<Json<Value>> {
    let id = build.id;
    let after = bounded_int(q.after.as_deref(), "after", 0, i64::MAX)?.unwrap_or(0);
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 100_000)?;
    let lines = queue::read_logs(&state.pool, &id, after, limit).await?;
    let logs: Vec<Value> = lines
        .iter()
        .map(|l| json!({ "seq": l.seq, "timestamp": l.ts.timestamp_millis(), "level": l.level, "message": l.message }))
        .collect();
    Ok(Json(json!({ "build_id": id, "logs": logs })))
}
