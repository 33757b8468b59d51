//! Whoever submits builds: submitting (the admin key), then following one build with its
//! `X-Build-Token` or the admin key (status, logs, downloads, cancel, retry; the token is matched
//! against the build by the `OwnedBuild` extractor every owner handler takes).

mod builds;
mod downloads;
mod logs;

use axum::Router;

use super::AppState;
use super::auth::Credential;
use super::group::{Caller, Group};

pub fn router(state: &AppState) -> Router<AppState> {
    let owner = Router::new()
        .merge(builds::owner_router())
        .merge(logs::router())
        .merge(downloads::router());
    Group::new(Caller::Submitter, state)
        .routes(Credential::Admin, builds::submit_router())
        .routes(Credential::Owner, owner)
        .into_router()
}
