//! Anyone: health, readiness, fleet statistics, and the API document (Swagger UI at `/docs` is
//! added beside it by `api::router`).

mod health;

pub use health::Stats;

use super::auth::Credential;
use super::group::{ApiRouter, Caller, Group};

pub fn group() -> Group {
    Group::new(Caller::Public)
        .routes(Credential::Public, health::router())
        .routes(
            Credential::Public,
            ApiRouter::new().routes(utoipa_axum::routes!(super::openapi::openapi_json)),
        )
}
