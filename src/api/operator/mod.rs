//! Operators: the admin API (`/api/v2`, the G0 admin endpoints, diagnostics, keys) and `/metrics`.
//! Every route here is behind a key whose role the route's entry in `api::group::ROLES` admits,
//! enforced by the group's layer.

mod audit;
mod builds;
mod diagnostics;
mod fleet;
mod keys;
mod legacy;
mod metrics;
pub mod schema;
pub mod views;
mod webhooks;

use super::auth::Credential;
use super::group::{ApiRouter, Caller, Group};

pub fn group() -> Group {
    let admin = ApiRouter::new()
        .merge(builds::router())
        .merge(fleet::router())
        .merge(legacy::router())
        .merge(keys::router())
        .merge(audit::router())
        .merge(diagnostics::router())
        .merge(webhooks::router());
    Group::new(Caller::Operator)
        .routes(Credential::Admin, admin)
        .routes(Credential::AdminOrBearer, metrics::router())
}
