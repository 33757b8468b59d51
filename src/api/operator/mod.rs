//! Operators: the admin API (`/api/v2`, the G0 admin endpoints, diagnostics) and `/metrics`. Every
//! route here is behind the admin key, enforced by the group's layer.

mod builds;
mod diagnostics;
mod fleet;
mod legacy;
mod metrics;
pub mod views;

use axum::Router;

use super::AppState;
use super::auth::Credential;
use super::group::{Caller, Group};

pub fn router(state: &AppState) -> Router<AppState> {
    let admin = Router::new()
        .merge(builds::router())
        .merge(fleet::router())
        .merge(legacy::router())
        .merge(diagnostics::router());
    Group::new(Caller::Operator, state)
        .routes(Credential::Admin, admin)
        .routes(Credential::AdminOrBearer, metrics::router())
        .into_router()
}
