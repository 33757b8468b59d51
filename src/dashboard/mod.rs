//! The operator's web dashboard at `/dashboard`: server-rendered pages (maud), a small page script and
//! vendored htmx, all embedded in the binary (no request ever leaves the controller's origin). Pages
//! follow the event stream (`/dashboard/events`, the same stream as `/api/v2/events` behind the session
//! cookie) and re-render the regions an event concerns. Actions call the same queue operations as
//! `/api/v2`.

mod actions;
mod ansi;
mod assets;
mod audit;
pub mod cache;
mod charts;
mod pages;
pub mod queries;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::Utc;

use crate::api::{ApiError, AppState, BodyBytes};
use crate::ids::valid_id;
use cache::ReadCache;
use pages::Chrome;
use session::{ClientIp, Session, SignInLimiter};

/// Largest form body the dashboard reads from a signed-in operator (bulk actions name up to 100 builds).
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Largest sign-in form: the one body read from a caller without a session (a key and a CSRF-free form).
const MAX_SIGN_IN_BYTES: usize = 2 * 1024;

/// Answer of a page handler: a page, or an error page.
type PageResult = Result<Response, Response>;

fn fail(error: impl Into<ApiError>) -> Response {
    pages::error_page(error.into())
}

pub fn router(state: &AppState) -> Router<AppState> {
    let limiter = Arc::new(SignInLimiter::new(state.config.dashboard.dashboard_signins_per_minute));
    let cache = Arc::new(ReadCache::new(
        std::time::Duration::from_millis(state.config.dashboard.dashboard_cache_ms),
        state.events.clone(),
    ));
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(overview))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route(
            "/dashboard/login",
            get(login_form)
                .post(login)
                .layer(DefaultBodyLimit::max(MAX_SIGN_IN_BYTES)),
        )
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/assets/{name}", get(assets::serve))
        .route("/dashboard/events", get(events))
        .route("/dashboard/builds", get(builds))
        .route("/dashboard/builds/bulk", post(actions::bulk))
        .route("/dashboard/builds/{id}", get(build))
        .route("/dashboard/builds/{id}/logs", get(build_logs))
        .route("/dashboard/builds/{id}/log.txt", get(build_log_text))
        .route("/dashboard/builds/{id}/download/{what}", get(actions::download))
        .route("/dashboard/builds/{id}/{action}", post(actions::build_action))
        .route("/dashboard/workers", get(workers))
        .route("/dashboard/workers/{id}", get(worker))
        .route("/dashboard/workers/{id}/{action}", post(actions::worker_action))
        .route("/dashboard/queues", get(queues))
        .route("/dashboard/queues/{name}/{action}", post(actions::queue_action))
        .route("/dashboard/keys", get(keys).post(create_key))
        .route("/dashboard/audit", get(audit_page))
        .route("/dashboard/keys/{id}/revoke", post(actions::revoke_key))
        .route("/dashboard/webhooks", get(webhooks).post(create_webhook))
        .route(
            "/dashboard/webhooks/deliveries/{id}/redeliver",
            post(actions::redeliver),
        )
        .route("/dashboard/webhooks/{id}/{action}", post(actions::webhook_action))
        // Any other dashboard path is an HTML 404, not the API's JSON one.
        .route("/dashboard/{*rest}", get(unknown_page))
        .layer(axum::middleware::from_fn_with_state(
            cache.clone(),
            invalidate_after_actions,
        ))
        .layer(Extension(limiter))
        .layer(Extension(cache))
        .layer(Extension(Arc::new(queries::HoursCache::default())))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::from_fn(security_headers))
}

/// A dashboard action that ran (it redirects back) empties this instance's read cache, so the page it
/// redirects to shows the change. Refused requests (403, 400) and sign-ins leave the cache alone.
async fn invalidate_after_actions(
    State(cache): State<Arc<ReadCache>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let action = req.method() == axum::http::Method::POST && req.uri().path() != "/dashboard/login";
    let response = next.run(req).await;
    if action && response.status().is_redirection() {
        cache.invalidate();
    }
    response
}

/// Every dashboard answer: a strict same-origin Content-Security-Policy, no framing, no sniffing,
/// no caching of pages.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_asset = req.uri().path().starts_with("/dashboard/assets/");
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !is_asset && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Query parameters as a map (the last value of a repeated key wins).
fn params(raw: Option<&str>) -> HashMap<String, String> {
    raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// A non-empty, trimmed, short parameter.
fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params
        .get(name)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty() && v.len() <= 200)
}

fn is_fragment(params: &HashMap<String, String>) -> bool {
    params.contains_key("fragment")
}

fn chrome<'a>(title: &'a str, nav: &'a str, session: &'a Session, params: &'a HashMap<String, String>) -> Chrome<'a> {
    Chrome {
        title,
        nav,
        csrf: &session.csrf,
        who: &session.name,
        role: session.role.as_str(),
        notice: param(params, "notice"),
        error: param(params, "error"),
        events_at: session.events_at,
    }
}

fn html(markup: maud::Markup) -> Response {
    markup.into_response()
}

async fn login_form(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let p = params(raw.as_deref());
    let next = p.get("next").map(String::as_str).and_then(session::safe_next);
    match session::from_headers(&state.pool, &headers).await {
        Ok(Some(_)) => Redirect::to(next.unwrap_or("/dashboard")).into_response(),
        _ => html(pages::login(None, next)),
    }
}

/// Sign-in: same origin only; a wrong key is answered after a delay and wrong keys are limited per IP.
async fn login(
    State(state): State<AppState>,
    Extension(limiter): Extension<Arc<SignInLimiter>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> Response {
    if !session::same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            pages::login(Some("Cross-site sign-in refused."), None),
        )
            .into_response();
    }
    let form = params(std::str::from_utf8(&body).ok());
    let next = form.get("next").map(String::as_str).and_then(session::safe_next);
    let key = form.get("key").map(String::as_str).unwrap_or_default();
    let Some(who) = session::sign_in_as(&state, key).await else {
        // Only wrong keys are delayed and limited (T6): the right key always signs in. Every wrong key
        // waits, limited or not: answering a limited guess at once would let a guesser keep its rate up.
        tokio::time::sleep(session::WRONG_KEY_DELAY).await;
        if !limiter.allow(ip) {
            tracing::warn!(%ip, "dashboard sign-in rate limited");
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                pages::login(Some("Too many wrong keys. Wait a minute and try again."), next),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            return response;
        }
        tracing::warn!(%ip, "dashboard sign-in with a wrong key");
        // A refused sign-in is recorded without the key (only those the limiter let through, so a
        // guesser cannot grow the table faster than the limit).
        let actor = crate::audit::Actor::anonymous(Some(ip), session::header_str(&headers, header::USER_AGENT));
        let change = crate::audit::Change::new("dashboard.sign_in", "session", "dashboard")
            .after(serde_json::json!({ "outcome": "refused" }));
        if let Err(error) = crate::audit::record_alone(&state.pool, &actor, change).await {
            return fail(error);
        }
        return (StatusCode::UNAUTHORIZED, pages::login(Some("Wrong key."), next)).into_response();
    };
    let ttl = state.config.dashboard.dashboard_session_ttl_secs;
    let user_agent = session::header_str(&headers, header::USER_AGENT);
    let actor = crate::audit::Actor::key(&who, Some(ip), user_agent);
    match session::create(&state.pool, ttl, &who, Utc::now(), &actor).await {
        Ok(id) => {
            tracing::info!(%ip, role = who.role().as_str(), "dashboard sign-in");
            let mut response = Redirect::to(next.unwrap_or("/dashboard")).into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, session::set_cookie(&headers, &id, ttl));
            response
        }
        Err(error) => fail(error),
    }
}

async fn logout(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    let form = params(std::str::from_utf8(&body).ok());
    session::check_action(&session, &headers, form.get("csrf").map(String::as_str)).map_err(fail)?;
    session::end(&state.pool, &session).await.map_err(fail)?;
    let mut response = Redirect::to("/dashboard/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session::clear_cookie());
    Ok(response)
}

/// The event stream behind the session cookie: the same stream as `/api/v2/events`.
async fn events(
    State(state): State<AppState>,
    _session: Session,
    headers: HeaderMap,
    Query(query): Query<crate::events::StreamQuery>,
) -> Response {
    match query.resolve(&headers) {
        Ok((filter, last_event_id)) => {
            crate::events::sse_response(&state.events, filter, last_event_id, state.shutdown.clone()).into_response()
        }
        Err(message) => (StatusCode::BAD_REQUEST, message).into_response(),
    }
}

async fn overview(
    State(state): State<AppState>,
    Extension(hours): Extension<Arc<queries::HoursCache>>,
    Extension(cache): Extension<Arc<ReadCache>>,
    session: Session,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    let now = Utc::now();
    let o = cache
        .overview(|| queries::overview(&state.pool, &state.config.queue, &hours, now))
        .await
        .map_err(fail)?;
    let names = cache.names(|| queries::worker_names(&state.pool)).await.map_err(fail)?;
    let content = pages::overview(&o, &names, now);
    if is_fragment(&p) {
        return Ok(html(content));
    }
    let body = pages::region("overview", "/dashboard?fragment=1", "*", content);
    Ok(html(pages::layout(&chrome("Overview", "overview", &session, &p), body)))
}

fn bad(message: &'static str) -> ApiError {
    ApiError::bad_request(message)
}

/// Parses the builds page's filters; anything malformed is a 400 page.
fn filter_of(p: &HashMap<String, String>) -> Result<queries::Filter, ApiError> {
    let id_param = |name: &str, message: &'static str| -> Result<Option<String>, ApiError> {
        match param(p, name) {
            None => Ok(None),
            Some(v) if valid_id(v) => Ok(Some(v.to_string())),
            Some(_) => Err(bad(message)),
        }
    };
    let state = match param(p, "state") {
        None => None,
        Some(s) if pages::STATES.contains(&s) => Some(s.to_string()),
        Some(_) => return Err(bad("Unknown state")),
    };
    let platform = match param(p, "platform") {
        None => None,
        Some(s @ ("ios" | "android")) => Some(s.to_string()),
        Some(_) => return Err(bad("Unknown platform")),
    };
    let within_hours = match param(p, "within") {
        None => None,
        Some(h) => match h.parse::<i64>() {
            Ok(h @ (1 | 24 | 168 | 720)) => Some(h),
            _ => return Err(bad("Unknown time window")),
        },
    };
    Ok(queries::Filter {
        state,
        platform,
        // A worker's name or id (names are what operators know).
        worker: param(p, "worker").map(str::to_string),
        within_hours,
        // The full id or its first characters (the tables show the first ten).
        id: id_param("id", "Invalid build id")?,
        before: id_param("before", "Invalid cursor")?,
    })
}

/// The filter as a query string, without the cursor.
fn filter_query(f: &queries::Filter) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (name, value) in [
        ("id", f.id.clone()),
        ("state", f.state.clone()),
        ("platform", f.platform.clone()),
        ("worker", f.worker.clone()),
        ("within", f.within_hours.map(|h| h.to_string())),
    ] {
        if let Some(value) = value {
            q.append_pair(name, &value);
        }
    }
    q.finish()
}

async fn builds(
    State(state): State<AppState>,
    Extension(cache): Extension<Arc<ReadCache>>,
    session: Session,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    let filter = filter_of(&p).map_err(fail)?;
    let now = Utc::now();
    let found = cache
        .builds(&filter, || queries::builds(&state.pool, &filter, now))
        .await
        .map_err(fail)?;
    let (rows, more, waiting) = found.as_ref();
    let base_query = filter_query(&filter);
    let names = cache.names(|| queries::worker_names(&state.pool)).await.map_err(fail)?;
    let table = pages::builds_table(rows, *more, &base_query, filter.before.is_none(), &names, waiting, now);
    if is_fragment(&p) {
        return Ok(html(table));
    }
    let mut page_query = base_query.clone();
    if let Some(before) = &filter.before {
        page_query = if page_query.is_empty() {
            format!("before={before}")
        } else {
            format!("{page_query}&before={before}")
        };
    }
    let body = pages::builds_page(&filter, &page_query, table, session.action_csrf());
    Ok(html(pages::layout(&chrome("Builds", "builds", &session, &p), body)))
}

async fn build(
    State(state): State<AppState>,
    Extension(cache): Extension<Arc<ReadCache>>,
    session: Session,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    if !valid_id(&id) {
        return Err(pages::not_found("Build not found"));
    }
    let found = cache
        .build(&id, || queries::build_page(&state.pool, &id))
        .await
        .map_err(fail)?;
    let page = found
        .as_ref()
        .as_ref()
        .ok_or_else(|| pages::not_found("Build not found"))?;
    let now = Utc::now();
    let names = cache.names(|| queries::worker_names(&state.pool)).await.map_err(fail)?;
    if is_fragment(&p) {
        return Ok(html(pages::build_summary(page, &names, session.action_csrf(), now)));
    }
    let logs = queries::log_tail(&state.pool, &id).await.map_err(fail)?;
    let needle = param(&p, "q");
    let found = match needle {
        Some(needle) => queries::log_search(&state.pool, &id, needle).await.map_err(fail)?,
        None => Vec::new(),
    };
    let search = needle.map(|needle| pages::LogSearch { needle, found: &found });
    let body = pages::build_page(page, &logs, search, &names, session.action_csrf(), now);
    let title = format!("Build {}", id.get(..10).unwrap_or(&id));
    Ok(html(pages::layout(&chrome(&title, "builds", &session, &p), body)))
}

/// Log lines after `?after=<seq>`, as HTML rows for the live tail.
async fn build_logs(
    State(state): State<AppState>,
    _session: Session,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    if !valid_id(&id) {
        return Err(pages::not_found("Build not found"));
    }
    let seq = |name: &str| match param(&p, name).map(str::parse::<i64>) {
        None => Ok(None),
        Some(Ok(n)) if n >= 0 => Ok(Some(n)),
        Some(_) => Err(bad("Invalid line number")),
    };
    // `?before=<seq>`: the lines before (the viewer's "Load earlier lines"); else those after `?after=`.
    let lines = match seq("before").map_err(fail)? {
        Some(before) => queries::log_before(&state.pool, &id, before).await.map_err(fail)?,
        None => {
            let after = seq("after").map_err(fail)?.unwrap_or(0);
            queries::log_after(&state.pool, &id, after).await.map_err(fail)?
        }
    };
    Ok(html(pages::log_lines(&lines)))
}

/// The whole log as plain text (colour codes removed), streamed in chunks so a long log is never held
/// in memory at once.
async fn build_log_text(State(state): State<AppState>, _session: Session, Path(id): Path<String>) -> PageResult {
    if !valid_id(&id) {
        return Err(pages::not_found("Build not found"));
    }
    if crate::queue::find_build(&state.pool, &id)
        .await
        .map_err(fail)?
        .is_none()
    {
        return Err(pages::not_found("Build not found"));
    }
    let pool = state.pool.clone();
    let build = id.clone();
    let chunks = futures_util::stream::unfold(Some(0i64), move |after| {
        let pool = pool.clone();
        let build = build.clone();
        async move {
            let after = after?;
            match queries::log_chunk(&pool, &build, after).await {
                Ok(lines) if lines.is_empty() => None,
                Ok(lines) => {
                    let next = lines.last().map(|l| l.seq);
                    let mut text = String::new();
                    for l in &lines {
                        text.push_str(&format!(
                            "{} {:<5} {}\n",
                            l.ts.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                            l.level,
                            ansi::strip(&l.message)
                        ));
                    }
                    Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(text)), next))
                }
                Err(error) => {
                    tracing::warn!(%error, "reading a log for download failed");
                    Some((Err(std::io::Error::other("log read failed")), None))
                }
            }
        }
    });
    let short = id.get(..10).unwrap_or(&id);
    let disposition = format!("attachment; filename=\"build-{short}.log\"");
    let mut response = axum::body::Body::from_stream(chunks).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// A worker's page: its details, current build, recent attempts, diagnostics and actions.
async fn worker(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    if !valid_id(&id) {
        return Err(pages::not_found("Worker not found"));
    }
    let page = queries::worker_page(&state.pool, &id)
        .await
        .map_err(fail)?
        .ok_or_else(|| pages::not_found("Worker not found"))?;
    let admin = session.role == crate::identity::Role::Admin;
    let content = pages::worker_page(&page, session.action_csrf(), admin, Utc::now());
    if is_fragment(&p) {
        return Ok(html(content));
    }
    let body = pages::region(
        "worker-page",
        &format!("/dashboard/workers/{id}?fragment=1"),
        &format!("worker:{id} build.*"),
        content,
    );
    let title = format!("Worker {}", page.worker.name);
    Ok(html(pages::layout(&chrome(&title, "workers", &session, &p), body)))
}

/// Any other dashboard path (signed in): an HTML 404.
async fn unknown_page(_session: Session) -> Response {
    pages::not_found("No such page")
}

async fn workers(
    State(state): State<AppState>,
    Extension(cache): Extension<Arc<ReadCache>>,
    session: Session,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    let rows = cache.workers(|| queries::workers(&state.pool)).await.map_err(fail)?;
    let table = pages::workers(
        &rows,
        session.action_csrf(),
        session.role == crate::identity::Role::Admin,
        Utc::now(),
    );
    if is_fragment(&p) {
        return Ok(html(table));
    }
    let body = maud::html! {
        div.page-head { h1 { "Workers" } p.muted { (rows.len()) " registered" } }
        (pages::region("workers-table", "/dashboard/workers?fragment=1", "worker.* build.*", table))
    };
    Ok(html(pages::layout(&chrome("Workers", "workers", &session, &p), body)))
}

/// The admin's Keys page: every key (never a secret), a form to create one, Revoke.
async fn keys(State(state): State<AppState>, session: Session, RawQuery(raw): RawQuery) -> PageResult {
    session.may(crate::identity::Access::Admin).map_err(fail)?;
    let p = params(raw.as_deref());
    keys_page(&state, &session, &p, None).await
}

/// The audit log (the admin's), with the filters of `GET /api/v2/audit`.
async fn audit_page(State(state): State<AppState>, session: Session, RawQuery(raw): RawQuery) -> PageResult {
    session.may(crate::identity::Access::Admin).map_err(fail)?;
    let p = params(raw.as_deref());
    let get = |name: &str| p.get(name).map(String::as_str);
    let list = crate::ops::list_audit(
        &state.pool,
        get("actor"),
        get("action"),
        get("target"),
        get("since"),
        get("cursor"),
        50,
    )
    .await
    .map_err(fail)?;
    Ok(html(pages::layout(
        &chrome("Audit", "audit", &session, &p),
        audit::page(&list, &p),
    )))
}

/// The admin's Webhooks page.
async fn webhooks(State(state): State<AppState>, session: Session, RawQuery(raw): RawQuery) -> PageResult {
    session.may(crate::identity::Access::Admin).map_err(fail)?;
    let p = params(raw.as_deref());
    webhooks_page(&state, &session, &p, None).await
}

async fn webhooks_page(
    state: &AppState,
    session: &Session,
    p: &HashMap<String, String>,
    created: Option<&crate::webhooks::CreatedWebhook>,
) -> PageResult {
    let actor = session.actor();
    let list = crate::webhooks::list(&state.pool, &actor).await.map_err(fail)?;
    let mut rows = Vec::new();
    for webhook in list.items {
        let deliveries = crate::webhooks::deliveries(&state.pool, &webhook.id, 10, &actor)
            .await
            .map_err(fail)?;
        rows.push((webhook, deliveries.items));
    }
    let body = pages::webhooks(&rows, &session.csrf, created);
    Ok(html(pages::layout(&chrome("Webhooks", "webhooks", session, p), body)))
}

/// Creates a webhook and shows its secret on the answer itself, once (never in a URL or a redirect).
async fn create_webhook(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    let form = actions::checked_admin_form(&session, &headers, &body).map_err(fail)?;
    let text = |name: &str| form.get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let request = crate::webhooks::WebhookRequest {
        url: text("url"),
        events: text("events").map(|e| {
            e.split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        }),
        description: text("description"),
    };
    let allow_private = state.config.webhooks.webhook_allow_private;
    let outcome = crate::webhooks::create(
        &state.pool,
        &state.secrets.certs_key,
        allow_private,
        &request,
        &session.actor(),
    )
    .await;
    match outcome {
        Ok(created) => webhooks_page(&state, &session, &HashMap::new(), Some(&created)).await,
        Err(error) => {
            let mut p = HashMap::new();
            p.insert("error".to_string(), ApiError::from(error).message().to_string());
            webhooks_page(&state, &session, &p, None).await
        }
    }
}

async fn keys_page(
    state: &AppState,
    session: &Session,
    p: &HashMap<String, String>,
    created: Option<&crate::ops::keys::CreatedKey>,
) -> PageResult {
    let list = crate::ops::keys::list_keys(&state.pool).await.map_err(fail)?;
    let body = pages::keys(&list.items, &session.csrf, created);
    Ok(html(pages::layout(&chrome("Keys", "keys", session, p), body)))
}

/// Creates a key and shows its secret on the answer itself, once (never in a URL or a redirect).
async fn create_key(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    let form = actions::checked_admin_form(&session, &headers, &body).map_err(fail)?;
    let text = |name: &str| form.get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let days = match text("expires_in_days") {
        None => None,
        Some(days) => Some(
            days.parse::<i64>()
                .ok()
                .and_then(|d| d.checked_mul(86_400))
                .ok_or_else(|| fail(ApiError::bad_request("expires_in_days must be a whole number of days")))?,
        ),
    };
    let request = crate::ops::keys::KeyRequest {
        name: text("name"),
        role: text("role"),
        expires_in_secs: days,
        enroll: Some(form.contains_key("enroll")),
        ..Default::default()
    };
    let defaults = crate::identity::QuotaDefaults {
        max_running: state.config.submitter_max_running,
        max_queued: state.config.submitter_max_queued,
    };
    match crate::ops::keys::create_key(&state.pool, &request, defaults, &session.actor()).await {
        Ok(created) => keys_page(&state, &session, &HashMap::new(), Some(&created)).await,
        Err(error) => {
            let mut p = HashMap::new();
            p.insert("error".to_string(), ApiError::from(error).message().to_string());
            keys_page(&state, &session, &p, None).await
        }
    }
}

async fn queues(
    State(state): State<AppState>,
    Extension(cache): Extension<Arc<ReadCache>>,
    session: Session,
    RawQuery(raw): RawQuery,
) -> PageResult {
    let p = params(raw.as_deref());
    let views = cache
        .queues(|| crate::queue::operator::queue_views(&state.pool, Utc::now()))
        .await
        .map_err(fail)?;
    let table = pages::queues(&views, session.action_csrf());
    if is_fragment(&p) {
        return Ok(html(table));
    }
    let body = maud::html! {
        div.page-head { h1 { "Queues" } p.muted { "A paused queue keeps its builds; workers take none until it is resumed." } }
        (pages::region("queues-table", "/dashboard/queues?fragment=1", "*", table))
    };
    Ok(html(pages::layout(&chrome("Queues", "queues", &session, &p), body)))
}
