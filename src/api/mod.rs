//! The HTTP API. Each area owns its router; they are merged here with the layers every request
//! shares: request ids, tracing, panic capture and the rule that every error body is `{"error": ...}`.

//!
//! Routes are grouped by who calls them, one folder each: `public/`, `worker/`, `submitter/`,
//! `operator/`. A group adds its routes with the credential they accept (`group.rs`), so the
//! credential is enforced by a layer before any handler runs; shared pieces (credentials, errors,
//! extractors, multipart, streaming, views) live beside them.

pub mod auth;
pub(crate) mod downloads;
mod error;
mod extract;
pub mod group;
mod multipart;
mod multipart_limits;
pub mod openapi;
pub mod operator;
pub mod public;
mod ratelimit;
mod results;
pub mod submitter;
mod views;
mod worker;
pub(crate) mod worker_cache;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// The operator operations the handlers share with the CLI (they live below the API layer).
pub use crate::ops as operations;
pub use error::{ApiError, ApiResult};
pub use extract::BodyBytes;

use tokio::sync::watch;

use crate::config::{Config, Secrets};
use crate::queue::Wakeups;
use crate::storage::Storage;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Connections for the claim statement alone (`db::connect_claims`: its generic plan, always).
    pub claim_pool: PgPool,
    pub storage: Storage,
    pub config: Arc<Config>,
    pub secrets: Arc<Secrets>,
    /// `/api/stats` answer and when it was computed.
    pub stats_cache: Arc<tokio::sync::Mutex<Option<(std::time::Instant, public::Stats)>>>,
    /// Wakes long-polling workers when their queue gets work.
    pub wakeups: Arc<Wakeups>,
    /// Flips to `true` when the server shuts down (releases long polls at once).
    pub shutdown: watch::Receiver<bool>,
    /// Recent worker lookups (polls authenticate without a round trip).
    pub workers: Arc<worker_cache::WorkerCache>,
    /// State-change events (SSE).
    pub events: Arc<crate::events::Events>,
    /// Recent key look-ups (each trusted for a second, so revocations reach every instance in time).
    pub keys: Arc<crate::identity::KeyCache>,
    /// Source keys recorded as pending writes ahead of their submits (by the previous submit's insert).
    pub spare_sources: Arc<crate::queue::SpareKeys>,
    /// Loose result keys recorded as pending writes ahead of their uploads (by the previous completion).
    pub spare_results: Arc<crate::queue::SpareKeys>,
    /// The platform queues this instance saw at their limit (counted before a submit's body only then).
    pub full_queues: Arc<crate::queue::FullQueues>,
}

impl AppState {
    pub fn new(
        pool: PgPool,
        storage: Storage,
        config: Config,
        secrets: Secrets,
        shutdown: watch::Receiver<bool>,
        events: Arc<crate::events::Events>,
    ) -> Self {
        Self {
            claim_pool: pool.clone(),
            pool,
            storage,
            config: Arc::new(config),
            secrets: Arc::new(secrets),
            stats_cache: Arc::default(),
            wakeups: Wakeups::new(),
            shutdown,
            workers: Arc::default(),
            events,
            keys: Arc::default(),
            spare_sources: Arc::default(),
            spare_results: Arc::default(),
            full_queues: Arc::default(),
        }
    }
}

impl AppState {
    /// After an operator action changed a build (retry, requeue, patch): this instance's long polls of
    /// its queue stop trusting their emptiness hint; a requeue also forgets the cached workers (the
    /// worker it came from may be draining now).
    pub fn build_changed(&self, build: &crate::queue::Build, requeued: bool) {
        self.attempt_changed(&build.id);
        if requeued {
            self.workers.clear();
        }
        self.wakeups.invalidate(build.platform());
    }

    /// After a build's attempt may have ended or changed here (a cancel, an abandon, a delete): its
    /// holder's downloads read the row again instead of the row its claim kept.
    pub fn attempt_changed(&self, build_id: &str) {
        self.workers.build_changed(build_id);
    }

    /// After a worker's admin state changed: polls authenticate from the database again.
    pub fn worker_changed(&self) {
        self.workers.clear();
    }

    /// After a queue resumed: this instance's waiting long polls look at once (other instances follow
    /// the queue's notification).
    pub fn queue_resumed(&self, platform: crate::queue::Platform) {
        self.wakeups.wake_all(platform);
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole API.
pub fn router(state: AppState) -> Router {
    let rates = ratelimit::Rates {
        per_ip: state.config.rate_limit_per_ip,
        per_credential: state.config.rate_limit_per_credential,
        per_admin: state.config.http.rate_limit_per_admin_key,
    };
    let limits = Arc::new(ratelimit::RateLimits::new(rates, &state.secrets.api_key));
    // The dashboard shares the per-IP limit (T7): one limiter for every route.
    let dashboard =
        crate::dashboard::router(&state)
            .with_state(state.clone())
            .layer(axum::middleware::from_fn_with_state(
                PerRoute {
                    limits: limits.clone(),
                    api: false,
                },
                per_route,
            ));
    let mut routes = Router::new();
    for group in openapi::groups() {
        let (group_routes, _) = group.build(&state);
        routes = routes.merge(group_routes);
    }
    routes
        .merge(openapi::swagger_ui())
        .fallback(|| async { ApiError::not_found("Not found") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed") })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            PerRoute { limits, api: true },
            per_route,
        ))
        // The dashboard answers in HTML, so it sits outside the JSON error rewriting.
        .merge(dashboard)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error").into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId))
}

/// Longest request id a client may choose.
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// Whether a client's `X-Request-Id` may be kept (and logged): 1–64 characters of `A–Z a–z 0–9 . _ : -`.
pub fn safe_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
        && id.iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

/// A client's `X-Request-Id` outside the safe alphabet or length is replaced by a new one (T12), so it
/// can never forge fields in a log line (`x status=500 user=admin`). Called on every request head by
/// the connection loop (`transport`), before the request-id layer, instead of a middleware layer of its
/// own (each `from_fn` layer clones the stack below it and boxes two futures per request).
pub fn drop_unsafe_request_id(headers: &mut axum::http::HeaderMap) {
    let mut ids = headers.get_all(REQUEST_ID).iter();
    let keep = match (ids.next(), ids.next()) {
        (None, _) => return,
        (Some(id), None) => safe_request_id(id.as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !keep {
        headers.remove(REQUEST_ID);
    }
}

/// What the per-route middleware needs: the rate limits, and whether the routes are the JSON API (its
/// error answers are rewritten to JSON and its multipart bodies bounded) or the HTML dashboard.
#[derive(Clone)]
struct PerRoute {
    limits: Arc<ratelimit::RateLimits>,
    api: bool,
}

/// The per-route layers in one middleware (one boxed future per request instead of four), in the order
/// they had as separate layers, outermost first:
/// 1. JSON errors (API only): an error answer produced outside our handlers gets a JSON body;
/// 2. the request's duration, recorded by route template, method and status (and logged);
/// 3. the rate limits (429 with `Retry-After`);
/// 4. the multipart structure bounds on the body as it streams (API only).
async fn per_route(axum::extract::State(layers): axum::extract::State<PerRoute>, req: Request, next: Next) -> Response {
    let native = layers.api && (req.uri().path().starts_with("/api/v2/") || req.uri().path() == "/api/v2");
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let started = std::time::Instant::now();
    let response = match layers.limits.refusal(&req) {
        Some(refused) => refused,
        None if layers.api => next.run(multipart_limits::bound(req)).await,
        None => next.run(req).await,
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    log_request(&route, status, elapsed);
    metrics::histogram!(crate::metrics::HTTP_SECONDS, "route" => route, "method" => method, "status" => status.to_string())
        .record(elapsed.as_secs_f64());
    if layers.api {
        json_errors(response, native)
    } else {
        response
    }
}

/// One line per request, inside the request span (method, path, request id, build and worker ids):
/// INFO, except probes and scrapes (DEBUG) so they do not drown the rest.
fn log_request(route: &str, status: u16, elapsed: std::time::Duration) {
    let duration_ms = (elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
    if matches!(route, "/health" | "/ready" | "/metrics") {
        tracing::debug!(route = %route, status, duration_ms, "request");
    } else {
        tracing::info!(route = %route, status, duration_ms, "request");
    }
}

/// The span of one request: every log line inside carries the request id, and the build and worker ids
/// when the request names them (path, `X-Worker-Id` header or `worker_id` query).
fn request_span(req: &Request) -> tracing::Span {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let path = req.uri().path();
    let build_id = ["/api/builds/", "/api/v2/builds/"]
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix))
        .and_then(|rest| rest.split('/').next())
        .filter(|id| crate::ids::valid_id(id) && *id != "active" && *id != "submit")
        .unwrap_or("-");
    let worker_id = req
        .headers()
        .get(auth::WORKER_ID)
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            req.uri()
                .query()?
                .split('&')
                .find_map(|kv| kv.strip_prefix("worker_id="))
        })
        .filter(|id| crate::ids::valid_id(id))
        .unwrap_or("-");
    // Text values are recorded as strings, so the text log format prints them quoted (a value can never
    // pose as another field) and the JSON format as plain strings (T12).
    tracing::info_span!("request", method = %req.method(), path, request_id, build_id, worker_id)
}

#[derive(Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&crate::ids::new_id()).ok().map(RequestId::new)
    }
}

/// Safety net: an error answer produced outside our handlers (framework rejections, panics) gets a
/// JSON body with a generic message, so no client ever sees plain text or internal details (R30).
/// `/api/v2` (the native and admin API) answers (`native`) carry a machine-readable `code` beside
/// `error` (R47); G0 answers keep their exact shape.
fn json_errors(response: Response, native: bool) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 {
        return response;
    }
    if is_json {
        let info = response.extensions().get::<error::ErrorInfo>().cloned();
        return match info {
            Some(info) if native => {
                let mut body = info.body;
                body["code"] = serde_json::json!(info.code);
                let (mut parts, _) = response.into_parts();
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, Body::from(body.to_string()))
            }
            _ => response,
        };
    }
    let message = match status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::METHOD_NOT_ALLOWED => "Method not allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "Request body too large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported media type",
        s if s.is_server_error() => "Internal server error",
        _ => "Bad request",
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut body = serde_json::json!({ "error": message });
    if native {
        body["code"] = serde_json::json!(error::code_for(status));
    }
    let body = body.to_string();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}
