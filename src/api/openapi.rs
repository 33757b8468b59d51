//! The OpenAPI document (`/api/v2/openapi.json`) and Swagger UI (`/docs`), built from one table of
//! every route. `tests/api/openapi.rs` checks that each row is served.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Paths, Required, ResponseBuilder};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Public,
    Admin,
    Owner,
    Worker,
    VmToken,
    WorkerToken,
    Otp,
}

impl Credential {
    fn schemes(self) -> &'static [&'static str] {
        match self {
            Credential::Public | Credential::Otp => &[],
            Credential::Admin => &["api_key"],
            Credential::Owner => &["api_key", "build_token"],
            Credential::Worker => &["vm_token", "worker_token", "api_key"],
            Credential::VmToken => &["vm_token"],
            Credential::WorkerToken => &["worker_token"],
        }
    }
}

use Credential::*;

/// Every route: method, path, tag, summary, credential.
pub const ROUTES: &[(&str, &str, &str, &str, Credential)] = &[
    ("GET", "/health", "health", "Liveness and queue depth", Public),
    (
        "GET",
        "/api/health",
        "health",
        "Liveness and queue depth (alias)",
        Public,
    ),
    (
        "GET",
        "/ready",
        "health",
        "200 when the database answers and migrations are applied",
        Public,
    ),
    (
        "GET",
        "/api/stats",
        "health",
        "Fleet statistics (cached up to 10 s)",
        Public,
    ),
    ("GET", "/metrics", "observability", "Prometheus metrics", Admin),
    (
        "POST",
        "/api/builds/submit",
        "builds",
        "Submit a build (multipart: source, certs, profile, platform)",
        Admin,
    ),
    ("POST", "/api/builds", "builds", "Submit a build (alias, 201)", Admin),
    (
        "GET",
        "/api/builds",
        "builds",
        "List builds (bare array, paginated)",
        Admin,
    ),
    ("GET", "/api/builds/active", "builds", "Builds held by workers", Admin),
    (
        "GET",
        "/api/builds/{id}/status",
        "builds",
        "Build status (G0 vocabulary)",
        Owner,
    ),
    (
        "GET",
        "/api/builds/{id}/logs",
        "builds",
        "Build logs (oldest first; ?after=&limit=)",
        Owner,
    ),
    (
        "POST",
        "/api/builds/{id}/logs",
        "workers",
        "Post one log line or a batch",
        Worker,
    ),
    (
        "GET",
        "/api/builds/{id}/download",
        "builds",
        "Download the result (Range)",
        Owner,
    ),
    (
        "GET",
        "/api/builds/{id}/download/result",
        "builds",
        "Download the result (alias)",
        Owner,
    ),
    (
        "GET",
        "/api/builds/{id}/download/source",
        "builds",
        "Download the source",
        Owner,
    ),
    ("POST", "/api/builds/{id}/cancel", "builds", "Cancel a build", Owner),
    (
        "POST",
        "/api/builds/{id}/retry",
        "builds",
        "New build from the original's source",
        Owner,
    ),
    (
        "GET",
        "/api/builds/{id}/source",
        "workers",
        "Source archive for the holder",
        Worker,
    ),
    (
        "GET",
        "/api/builds/{id}/certs",
        "workers",
        "Decrypted certs bundle (zip) for the holder",
        Worker,
    ),
    (
        "GET",
        "/api/builds/{id}/certs-secure",
        "workers",
        "Certificate, passwords and profiles for the holder",
        Worker,
    ),
    (
        "POST",
        "/api/builds/{id}/heartbeat",
        "workers",
        "Extend the lease; progress and stage",
        Worker,
    ),
    (
        "POST",
        "/api/builds/{id}/telemetry",
        "workers",
        "VM monitor telemetry (counts as a heartbeat)",
        Worker,
    ),
    (
        "POST",
        "/api/builds/{id}/authenticate",
        "vm",
        "Trade the attempt's OTP for a VM token",
        Otp,
    ),
    ("POST", "/api/builds/{id}/vm-ready", "vm", "The VM booted", VmToken),
    (
        "GET",
        "/api/builds/{id}/vm-status",
        "vm",
        "Whether the VM is ready (holder only)",
        Worker,
    ),
    (
        "POST",
        "/api/builds/{id}/artifact",
        "vm",
        "The VM uploads the result",
        VmToken,
    ),
    (
        "POST",
        "/api/workers/register",
        "workers",
        "Register or re-register a worker",
        Admin,
    ),
    (
        "GET",
        "/api/workers/poll",
        "workers",
        "Claim a build (?wait= long poll)",
        Worker,
    ),
    (
        "POST",
        "/api/workers/upload",
        "workers",
        "Report success (with result) or failure",
        Worker,
    ),
    (
        "POST",
        "/api/workers/result",
        "workers",
        "Report success (alias)",
        Worker,
    ),
    (
        "POST",
        "/api/workers/fail",
        "workers",
        "Report failure (alias; JSON or multipart)",
        Worker,
    ),
    (
        "POST",
        "/api/workers/unregister",
        "workers",
        "A worker takes itself out",
        WorkerToken,
    ),
    (
        "POST",
        "/api/workers/abandon",
        "workers",
        "Give the held attempt back",
        WorkerToken,
    ),
    (
        "POST",
        "/api/workers/{id}/unregister",
        "workers",
        "Take a worker out",
        Admin,
    ),
    (
        "GET",
        "/api/workers/{id}/stats",
        "workers",
        "Worker counters and uptime",
        Admin,
    ),
    (
        "POST",
        "/api/diagnostics/report",
        "diagnostics",
        "Store a diagnostic report",
        Admin,
    ),
    (
        "GET",
        "/api/diagnostics/{worker_id}",
        "diagnostics",
        "A worker's reports, newest first",
        Admin,
    ),
    (
        "GET",
        "/api/diagnostics/{worker_id}/latest",
        "diagnostics",
        "A worker's newest report",
        Admin,
    ),
    (
        "GET",
        "/api/v2/builds",
        "operator",
        "Builds with filters and cursor",
        Admin,
    ),
    (
        "GET",
        "/api/v2/builds/{id}",
        "operator",
        "Build detail with attempts and errors",
        Admin,
    ),
    (
        "PATCH",
        "/api/v2/builds/{id}",
        "operator",
        "Change priority, run_at, max_attempts",
        Admin,
    ),
    (
        "DELETE",
        "/api/v2/builds/{id}",
        "operator",
        "Purge a finished build",
        Admin,
    ),
    (
        "GET",
        "/api/v2/builds/{id}/attempts",
        "operator",
        "Attempts of a build",
        Admin,
    ),
    ("POST", "/api/v2/builds/{id}/cancel", "operator", "Cancel", Admin),
    (
        "POST",
        "/api/v2/builds/{id}/retry",
        "operator",
        "Re-run the same build",
        Admin,
    ),
    (
        "POST",
        "/api/v2/builds/{id}/requeue",
        "operator",
        "Give a running attempt back (not to the same worker within the cool-off; ?drain=true drains it)",
        Admin,
    ),
    (
        "POST",
        "/api/v2/builds/{id}/tokens/revoke",
        "operator",
        "Revoke the build access token",
        Admin,
    ),
    ("GET", "/api/v2/workers", "operator", "Workers with cursor", Admin),
    ("GET", "/api/v2/workers/{id}", "operator", "One worker", Admin),
    ("DELETE", "/api/v2/workers/{id}", "operator", "Revoke a worker", Admin),
    (
        "POST",
        "/api/v2/workers/{id}/drain",
        "operator",
        "Finish the current build, take no new one",
        Admin,
    ),
    (
        "POST",
        "/api/v2/workers/{id}/disable",
        "operator",
        "Take no builds",
        Admin,
    ),
    (
        "POST",
        "/api/v2/workers/{id}/enable",
        "operator",
        "Take builds again",
        Admin,
    ),
    (
        "GET",
        "/api/v2/queues",
        "operator",
        "Depth per platform queue, oldest pending age, paused, backpressure limit and full flag",
        Admin,
    ),
    (
        "POST",
        "/api/v2/queues/{platform}/pause",
        "operator",
        "Pause a platform queue",
        Admin,
    ),
    (
        "POST",
        "/api/v2/queues/{platform}/resume",
        "operator",
        "Resume a platform queue",
        Admin,
    ),
    (
        "GET",
        "/api/v2/events",
        "operator",
        "Server-Sent Events of state changes (`id:` per event; resume with `Last-Event-ID`; filters `?build=`, `?worker=`, `?kind=build.log,worker.*`)",
        Admin,
    ),
];

fn method(name: &str) -> HttpMethod {
    match name {
        "POST" => HttpMethod::Post,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        "PUT" => HttpMethod::Put,
        _ => HttpMethod::Get,
    }
}

fn header_scheme(header: &str) -> SecurityScheme {
    SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(header)))
}

/// The document describing every route.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for (verb, path, tag, summary, credential) in ROUTES {
        let mut operation = OperationBuilder::new()
            .tag(*tag)
            .summary(Some(*summary))
            .operation_id(Some(format!("{} {path}", verb.to_lowercase())))
            .response("200", ResponseBuilder::new().description("Success"))
            .response(
                "4XX",
                ResponseBuilder::new().description("`{\"error\": \"...\"}` with the exact message of api.md"),
            );
        for segment in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(segment)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True),
            );
        }
        for scheme in credential.schemes() {
            operation = operation.security(SecurityRequirement::new(*scheme, Vec::<String>::new()));
        }
        paths.add_path_operation(*path, vec![method(verb)], operation.build());
    }
    let components = ComponentsBuilder::new()
        .security_scheme("api_key", header_scheme("X-API-Key"))
        .security_scheme("build_token", header_scheme("X-Build-Token"))
        .security_scheme("worker_token", header_scheme("X-Worker-Token"))
        .security_scheme("vm_token", header_scheme("X-VM-Token"))
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("expo-controller")
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .paths(paths)
        .components(Some(components))
        .build()
}

/// `/docs` (Swagger UI) and `/api/v2/openapi.json`.
pub fn router<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .url("/api/v2/openapi.json", document())
        .into()
}
