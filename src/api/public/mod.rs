//! Anyone: health, readiness, fleet statistics, and the API document with its Swagger UI.

mod health;

use axum::Router;

use super::AppState;
use super::auth::Credential;
use super::group::{Caller, Group};

pub fn router(state: &AppState) -> Router<AppState> {
    Group::new(Caller::Public, state)
        .routes(Credential::Public, health::router())
        .routes(Credential::Public, super::openapi::router())
        .into_router()
}
