//! Routes grouped by who calls them. A group is the only way a route enters the API, and adding
//! routes to a group names their credential: the group wraps them in that credential's route layer
//! ([`Credential::guard`]), documents it (tag = the group, security = the credential's schemes,
//! `x-credential`), and refuses credentials its callers do not use. So an operator route is behind
//! a key by construction, and a route cannot exist undocumented: routes are added as
//! `utoipa_axum::routes!` of handlers carrying `#[utoipa::path]`.
//!
//! [`ROLES`] is the one place that decides the least role each route needs (identity.md): a route
//! without an entry cannot be added to a group (the router refuses to build, at start-up and in every
//! test), the guard enforces the entry, and the document shows it (`x-role`).

use axum::Router;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::security::SecurityRequirement;
use utoipa::openapi::{OpenApi, RefOr, ResponseBuilder};
use utoipa_axum::router::OpenApiRouter;

use super::AppState;
use super::auth::Credential;
use crate::identity::Access;

/// The least role of every route, by method and path (identity.md, "Roles"). `NoKey`: the route takes
/// no key (public, or only a worker token, VM token or OTP).
pub const ROLES: &[(&str, &str, Access)] = &[
    // Anyone.
    ("get", "/health", Access::NoKey),
    ("get", "/ready", Access::NoKey),
    ("get", "/api/health", Access::NoKey),
    ("get", "/api/stats", Access::NoKey),
    ("get", "/api/v2/openapi.json", Access::NoKey),
    // Workers (a worker key for the workers it registered, or the admin) and their VMs.
    ("post", "/api/workers/register", Access::Worker),
    ("get", "/api/workers/poll", Access::Worker),
    ("post", "/api/workers/upload", Access::Worker),
    ("post", "/api/workers/result", Access::Worker),
    ("post", "/api/workers/fail", Access::Worker),
    ("post", "/api/workers/unregister", Access::NoKey),
    ("post", "/api/workers/abandon", Access::NoKey),
    ("get", "/api/builds/{id}/source", Access::Worker),
    ("get", "/api/builds/{id}/certs", Access::Worker),
    ("get", "/api/builds/{id}/certs-secure", Access::Worker),
    ("post", "/api/builds/{id}/logs", Access::Worker),
    ("post", "/api/builds/{id}/heartbeat", Access::Worker),
    ("post", "/api/builds/{id}/telemetry", Access::Worker),
    ("get", "/api/builds/{id}/vm-status", Access::Worker),
    ("post", "/api/builds/{id}/vm-ready", Access::NoKey),
    ("post", "/api/builds/{id}/artifact", Access::NoKey),
    ("post", "/api/builds/{id}/authenticate", Access::NoKey),
    ("post", "/api/diagnostics/report", Access::Worker),
    // Submitters (their own builds; the build token as before) and the admin.
    ("post", "/api/builds/submit", Access::Submitter),
    ("post", "/api/builds", Access::Submitter),
    ("get", "/api/builds/{id}/status", Access::Submitter),
    ("get", "/api/builds/{id}/logs", Access::Submitter),
    ("get", "/api/builds/{id}/download", Access::Submitter),
    ("get", "/api/builds/{id}/download/result", Access::Submitter),
    ("get", "/api/builds/{id}/download/source", Access::Submitter),
    ("post", "/api/builds/{id}/cancel", Access::Submitter),
    ("post", "/api/builds/{id}/retry", Access::Submitter),
    ("get", "/api/builds", Access::SubmitterOrViewer),
    // Reads: viewers and up.
    ("get", "/api/builds/active", Access::Viewer),
    ("get", "/api/workers/{id}/stats", Access::Viewer),
    ("get", "/api/diagnostics/{worker_id}", Access::Viewer),
    ("get", "/api/diagnostics/{worker_id}/latest", Access::Viewer),
    ("get", "/metrics", Access::Viewer),
    ("get", "/api/v2/builds", Access::Viewer),
    ("get", "/api/v2/builds/{id}", Access::Viewer),
    ("get", "/api/v2/builds/{id}/attempts", Access::Viewer),
    ("get", "/api/v2/workers", Access::Viewer),
    ("get", "/api/v2/workers/{id}", Access::Viewer),
    ("get", "/api/v2/queues", Access::Viewer),
    ("get", "/api/v2/events", Access::Viewer),
    // Operator actions.
    ("post", "/api/v2/builds/{id}/cancel", Access::Operator),
    ("post", "/api/v2/builds/{id}/retry", Access::Operator),
    ("post", "/api/v2/builds/{id}/requeue", Access::Operator),
    ("patch", "/api/v2/builds/{id}", Access::Operator),
    ("post", "/api/v2/workers/{id}/drain", Access::Operator),
    ("post", "/api/v2/workers/{id}/release", Access::Operator),
    ("post", "/api/v2/workers/{id}/disable", Access::Operator),
    ("post", "/api/v2/workers/{id}/enable", Access::Operator),
    ("post", "/api/v2/queues/{platform}/pause", Access::Operator),
    ("post", "/api/v2/queues/{platform}/resume", Access::Operator),
    ("post", "/api/workers/{id}/unregister", Access::Operator),
    // The owner: deleting, revoking, keys.
    ("delete", "/api/v2/builds/{id}", Access::Admin),
    ("post", "/api/v2/builds/{id}/tokens/revoke", Access::Admin),
    ("delete", "/api/v2/workers/{id}", Access::Admin),
    ("get", "/api/v2/keys", Access::Admin),
    ("post", "/api/v2/keys", Access::Admin),
    ("get", "/api/v2/keys/{id}", Access::Admin),
    ("patch", "/api/v2/keys/{id}", Access::Admin),
    ("delete", "/api/v2/keys/{id}", Access::Admin),
    ("get", "/api/v2/audit", Access::Admin),
    // Webhooks: the admin's see every build, a submitter key's only its own (crate::webhooks).
    ("get", "/api/v2/webhooks", Access::Submitter),
    ("post", "/api/v2/webhooks", Access::Submitter),
    ("get", "/api/v2/webhooks/{id}", Access::Submitter),
    ("patch", "/api/v2/webhooks/{id}", Access::Submitter),
    ("delete", "/api/v2/webhooks/{id}", Access::Submitter),
    ("post", "/api/v2/webhooks/{id}/test", Access::Submitter),
    ("get", "/api/v2/webhooks/{id}/deliveries", Access::Submitter),
    ("post", "/api/v2/webhooks/deliveries/{id}/redeliver", Access::Submitter),
];

/// The least role of a route (`None`: not in [`ROLES`]).
pub fn access(method: &str, path: &str) -> Option<Access> {
    ROLES
        .iter()
        .find(|(m, p, _)| m.eq_ignore_ascii_case(method) && *p == path)
        .map(|(_, _, access)| *access)
}

/// Routes with their documentation.
pub type ApiRouter = OpenApiRouter<AppState>;

/// Who calls a group of routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Anyone: health, statistics, the API document.
    Public,
    /// Build machines: workers, their VMs and host monitors.
    Worker,
    /// Whoever submits a build and then follows it with its token (or the admin key).
    Submitter,
    /// Operators: the admin API, `/api/v2`, metrics.
    Operator,
}

impl Caller {
    pub const ALL: [Caller; 4] = [Caller::Public, Caller::Worker, Caller::Submitter, Caller::Operator];

    pub fn name(self) -> &'static str {
        match self {
            Caller::Public => "public",
            Caller::Worker => "worker",
            Caller::Submitter => "submitter",
            Caller::Operator => "operator",
        }
    }

    pub fn parse(name: &str) -> Option<Caller> {
        Caller::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The credentials routes of this group may demand.
    pub fn credentials(self) -> &'static [Credential] {
        match self {
            Caller::Public => &[Credential::Public],
            Caller::Worker => &[
                Credential::AdminOrWorkerToken,
                Credential::WorkerTokenOrAdmin,
                Credential::Upload,
                Credential::WorkerToken,
                Credential::BuildScoped,
                Credential::BuildScopedWorker,
                Credential::VmToken,
                Credential::Otp,
            ],
            Caller::Submitter => &[Credential::Admin, Credential::Owner],
            Caller::Operator => &[Credential::Admin, Credential::AdminOrBearer],
        }
    }
}

/// The routes of one caller group, each set with its credential.
pub struct Group {
    caller: Caller,
    parts: Vec<(Credential, ApiRouter)>,
}

impl Group {
    pub fn new(caller: Caller) -> Self {
        Self {
            caller,
            parts: Vec::new(),
        }
    }

    /// Adds routes behind `credential`. A credential the group's callers do not use is a programming
    /// error, caught when the router is built (at start-up and by every test).
    pub fn routes(mut self, credential: Credential, mut routes: ApiRouter) -> Self {
        assert!(
            self.caller.credentials().contains(&credential),
            "{credential:?} is not a credential of the {} group",
            self.caller.name()
        );
        document(routes.get_openapi_mut(), self.caller, credential);
        self.parts.push((credential, routes));
        self
    }

    /// The group's router, every set of routes behind its credential's layer, and its document.
    pub fn build(self, state: &AppState) -> (Router<AppState>, OpenApi) {
        let mut router = Router::new();
        let mut doc = OpenApi::default();
        for (credential, routes) in self.parts {
            let (routes, part) = routes.split_for_parts();
            let routes = match credential {
                Credential::Public | Credential::Otp => routes,
                _ => routes.route_layer(axum::middleware::from_fn_with_state(
                    std::sync::Arc::new((state.clone(), credential)),
                    Credential::guard,
                )),
            };
            router = router.merge(routes);
            doc.merge(part);
        }
        (router, doc)
    }

    /// The group's document alone.
    pub fn openapi(self) -> OpenApi {
        let mut doc = OpenApi::default();
        for (_, routes) in self.parts {
            doc.merge(routes.into_openapi());
        }
        doc
    }
}

/// Marks every operation of `doc` with its caller group and credential, and gives it the error
/// answers every route can produce.
fn document(doc: &mut OpenApi, caller: Caller, credential: Credential) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let native = path.starts_with("/api/v2/");
        let operations = [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("patch", &mut item.patch),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation.as_mut() else {
                continue;
            };
            // Unique by construction (one operation per method and path), stable for generated clients.
            operation.operation_id = Some(operation_id(method, path));
            operation.tags = Some(vec![caller.name().to_string()]);
            let schemes = credential.schemes();
            operation.security = Some(if schemes.is_empty() {
                vec![SecurityRequirement::default()]
            } else {
                schemes
                    .iter()
                    .map(|s| SecurityRequirement::new(*s, Vec::<String>::new()))
                    .collect()
            });
            let Some(access) = access(method, path) else {
                panic!(
                    "{} {path} has no role: decide it in api::group::ROLES",
                    method.to_uppercase()
                );
            };
            let extensions = ExtensionsBuilder::new()
                .add("x-role", access.name())
                .add("x-caller", caller.name())
                .add("x-credential", credential.name())
                .build();
            match operation.extensions.as_mut() {
                Some(existing) => existing.merge(extensions),
                None => operation.extensions = Some(extensions),
            }
            let errors = &mut operation.responses.responses;
            let schema = if native { "CodedError" } else { "Error" };
            if let Some(missing) = credential.missing_message() {
                errors.entry("401".into()).or_insert_with(|| {
                    error_response(
                        &format!("No credential, or one that is not valid: `{{\"error\": \"{missing}\"}}`"),
                        schema,
                    )
                });
            }
            errors
                .entry("4XX".into())
                .or_insert_with(|| error_response("Refused: the error says why", schema));
            errors
                .entry("5XX".into())
                .or_insert_with(|| error_response("Server or storage unavailable", schema));
        }
    }
}

/// `post /api/builds/{id}/cancel` → `post_api_builds_id_cancel`.
pub fn operation_id(method: &str, path: &str) -> String {
    let words = path
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase);
    std::iter::once(method.to_ascii_lowercase())
        .chain(words)
        .collect::<Vec<_>>()
        .join("_")
}

fn error_response(description: &str, schema: &str) -> RefOr<utoipa::openapi::Response> {
    let body = utoipa::openapi::ContentBuilder::new()
        .schema(Some(utoipa::openapi::Ref::from_schema_name(schema)))
        .build();
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content("application/json", body)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operator route cannot be made public (nor given a worker's credential): the group refuses
    /// when the router is built.
    #[test]
    #[should_panic(expected = "is not a credential of the operator group")]
    fn an_operator_route_cannot_be_public() {
        let _ = Group::new(Caller::Operator).routes(Credential::Public, ApiRouter::new());
    }

    #[test]
    #[should_panic(expected = "is not a credential of the operator group")]
    fn an_operator_route_cannot_take_a_worker_token() {
        let _ = Group::new(Caller::Operator).routes(Credential::WorkerToken, ApiRouter::new());
    }

    /// Every credential but the public ones answers a request without it with 401 and a message.
    #[test]
    fn guarded_credentials_name_what_is_missing() {
        for caller in Caller::ALL {
            for credential in caller.credentials() {
                let public = matches!(credential, Credential::Public | Credential::Otp);
                assert_eq!(credential.missing_message().is_none(), public, "{credential:?}");
                assert_eq!(credential.schemes().is_empty(), public, "{credential:?}");
            }
        }
        assert_eq!(
            operation_id("post", "/api/builds/{id}/cancel"),
            "post_api_builds_id_cancel"
        );
    }
}
