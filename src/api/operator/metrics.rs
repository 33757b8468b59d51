//! `/metrics`: Prometheus text format, for the admin key (`X-API-Key` or `Authorization: Bearer`,
//! enforced by the operator group).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa_axum::routes;

use crate::api::group::ApiRouter;
use crate::api::{ApiResult, AppState};

pub fn router() -> ApiRouter {
    ApiRouter::new().routes(routes!(prometheus))
}

/// Prometheus metrics (queue depth, claim latency, outcomes, HTTP durations, …).
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String)))]
async fn prometheus(State(state): State<AppState>) -> ApiResult<Response> {
    let body = crate::metrics::render(&state.pool, state.events.subscribers()).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
