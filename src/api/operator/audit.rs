//! `/api/v2/audit`: the audit log (identity.md, "Audit"), for the admin (the role table in
//! `api::group` says so). Rows are written by the layer that makes each change; this only reads.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::routes;

use crate::api::error::{ApiResult, CodedError};
use crate::api::extract::{QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::api::{AppState, operations};
use crate::audit::AuditPage;

pub fn router() -> ApiRouter {
    ApiRouter::new().routes(routes!(list))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// A key id or an actor name (`admin`, a key's name, `cli:alice`).
    actor: Option<String>,
    /// An action (`build.cancel`), or every action of a kind (`build.*`).
    action: Option<String>,
    /// A target id (a build, worker, key or queue).
    target: Option<String>,
    /// Rows at or after this RFC 3339 time.
    since: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// 1–500 (default 50).
    limit: Option<String>,
}

/// The audit log, newest first: `{"items": [...], "next_cursor": <id or null>}`.
#[utoipa::path(get, path = "/api/v2/audit", params(AuditQuery), responses(
    (status = 200, description = "Audit rows, newest first", body = AuditPage),
    (status = 400, description = "A filter that does not parse", body = CodedError)))]
async fn list(State(state): State<AppState>, QueryParams(q): QueryParams<AuditQuery>) -> ApiResult<Json<AuditPage>> {
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 500)?.unwrap_or(50);
    let page = operations::list_audit(
        &state.pool,
        q.actor.as_deref(),
        q.action.as_deref(),
        q.target.as_deref(),
        q.since.as_deref(),
        q.cursor.as_deref(),
        limit,
    )
    .await?;
    Ok(Json(page))
}
