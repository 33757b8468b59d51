//! Build machines: workers (register, poll, report), their VMs (OTP, VM token, artifact) and host
//! monitors. Each set of routes is added with the credential it accepts (api.md §2); build-scoped
//! credentials are then matched against the build's current attempt by `auth::build_caller`.

mod files;
mod progress;
pub mod schema;
mod vm;
mod workers;

use super::auth::Credential;
use super::group::{Caller, Group};

pub fn group() -> Group {
    Group::new(Caller::Worker)
        .routes(Credential::AdminOrWorkerToken, workers::register_router())
        .routes(Credential::WorkerTokenOrAdmin, workers::poll_router())
        .routes(Credential::Upload, workers::upload_router())
        .routes(Credential::WorkerToken, workers::token_router())
        .routes(Credential::BuildScoped, files::router())
        .routes(Credential::BuildScoped, progress::router())
        .routes(Credential::BuildScopedWorker, vm::status_router())
        .routes(Credential::VmToken, vm::vm_router())
        .routes(Credential::Otp, vm::otp_router())
}
