//! `/metrics`: Prometheus text format, for the admin key (`X-API-Key` or `Authorization: Bearer`,
//! enforced by the operator group).

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::{ApiResult, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(prometheus))
}

async fn prometheus(State(state): State<AppState>) -> ApiResult<Response> {
    let body = crate::metrics::render(&state.pool, state.events.subscribers()).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
