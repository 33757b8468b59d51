//! Whoever submits builds: submitting (the admin key), then following one build with its
//! `X-Build-Token` or the admin key (status, logs, downloads, cancel, retry; the token is matched
//! against the build by the `OwnedBuild` extractor every owner handler takes).

mod builds;
mod downloads;
mod logs;

use super::auth::Credential;
use super::group::{ApiRouter, Caller, Group};

pub fn group() -> Group {
    let owner = ApiRouter::new()
        .merge(builds::owner_router())
        .merge(logs::router())
        .merge(downloads::router());
    Group::new(Caller::Submitter)
        .routes(Credential::Admin, builds::submit_router())
        .routes(Credential::Owner, owner)
}
