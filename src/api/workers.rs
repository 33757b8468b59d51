//! Worker endpoints: register, poll, result upload (and its aliases), stats, unregister, abandon.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, header};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::time::Duration;

use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{self, CallerRules, WORKER_TOKEN, header};
use super::error::{ApiError, ApiResult};
use super::extract::{IdPath, JsonBody, QueryParams, bounded_int, parse_json};
use super::multipart::{Parts, read_text};
use super::results::{self, StagedResult};
use super::{AppState, views};
use crate::ids;
use crate::queue::{self, Failure, FailureKind, RegisterRequest, Worker};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/workers/register", post(register))
        .route("/api/workers/poll", get(poll))
        .route("/api/workers/upload", post(upload).layer(DefaultBodyLimit::disable()))
        .route(
            "/api/workers/result",
            post(upload_success).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/workers/fail", post(upload_failure))
        .route("/api/workers/unregister", post(unregister_self))
        .route("/api/workers/abandon", post(abandon))
        .route("/api/workers/{id}/unregister", post(unregister))
        .route("/api/workers/{id}/stats", get(stats))
}

#[derive(Deserialize)]
struct RegisterBody {
    id: Option<String>,
    name: Option<String>,
    capabilities: Option<Value>,
}

/// B15: admin key, or a worker's own token to re-register it.
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Json<Value>> {
    let caller_worker = match header(&headers, WORKER_TOKEN) {
        Some(token) if !auth::admin_if_present(&state, &headers)? => {
            Some(auth::worker_by_token(&state, token).await?.id)
        }
        _ => {
            auth::require_admin(&state, &headers)?;
            None
        }
    };
    let name = body.name.filter(|n| !n.trim().is_empty());
    let capabilities = body.capabilities.filter(|c| !c.is_null());
    let (Some(name), Some(capabilities)) = (name, capabilities) else {
        return Err(ApiError::bad_request("Name and capabilities required"));
    };
    let id = auth::worker_id(body.id.as_deref())?;
    let request = RegisterRequest {
        id,
        name,
        platforms: queue::platforms_of(&capabilities),
        capabilities,
        caller_worker,
    };
    let registration = queue::register(&state.pool, &request, &state.config.queue, Utc::now()).await?;
    state.workers.clear();
    Ok(Json(json!({
        "id": registration.worker.id,
        "status": if registration.reregistered { "re-registered" } else { "registered" },
        "access_token": registration.token,
        "baseImageId": state.config.base_image_id,
    })))
}

#[derive(Deserialize)]
struct PollQuery {
    worker_id: Option<String>,
    wait: Option<String>,
}

/// B16: the held attempt again, or a newly claimed build, or `{"job": null}`.
async fn poll(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(query): QueryParams<PollQuery>,
) -> ApiResult<Json<Value>> {
    let (worker, token) = poll_caller(&state, &headers, query.worker_id.as_deref()).await?;
    let wait = bounded_int(query.wait.as_deref(), "wait", 0, 60)?.unwrap_or(0);
    let now = Utc::now();
    if queue::touch_worker(&state.pool, &worker, &state.config.queue, now).await? {
        state.workers.seen(&worker.id, now);
    }
    let claim = claim_or_wait(&state, &worker, Duration::from_secs(wait as u64)).await?;
    let mut answer = json!({ "job": claim.as_ref().map(|c| views::job(c, &state.config.base_image_id)) });
    if let Some(token) = token {
        answer["access_token"] = json!(token);
    }
    Ok(Json(answer))
}

/// Claims for the worker; with `wait`, holds the request until its queue gets work (woken by NOTIFY),
/// the time passes, or the server shuts down. No database connection is held while waiting.
async fn claim_or_wait(state: &AppState, worker: &Worker, wait: Duration) -> ApiResult<Option<queue::Claim>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut shutdown = state.shutdown.clone();
    loop {
        // Subscribe before looking, so a build committed in between still wakes us.
        let mut subscription = (!wait.is_zero()).then(|| state.wakeups.subscribe(&worker.platforms()));
        let claim = claim_unless_known_empty(state, worker).await?;
        let Some(subscription) = subscription.as_mut().filter(|_| claim.is_none()) else {
            return Ok(claim);
        };
        if *shutdown.borrow() {
            return Ok(None);
        }
        tokio::select! {
            _ = subscription.wait() => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

/// Claims, except that an idle worker polling queues known to be empty is answered without a query.
async fn claim_unless_known_empty(state: &AppState, worker: &Worker) -> ApiResult<Option<queue::Claim>> {
    let platforms = worker.platforms();
    // Only an idle worker (it may not hold an attempt to re-deliver) that accepts work uses the hint.
    let hint_applies = worker.status == "idle" && worker.accepts_work();
    if hint_applies && state.wakeups.known_empty(&platforms) {
        return Ok(None);
    }
    let seen = state.wakeups.generations(&platforms);
    let claim = queue::claim(&state.pool, worker, &state.config.queue, Utc::now()).await?;
    match &claim {
        // Nothing for this worker; the queues are empty for everyone unless a build is only held back
        // from this worker by the requeue cool-off (R51).
        None if hint_applies => {
            let settings = &state.config.queue;
            if !queue::held_back_by_requeue(&state.pool, &worker.id, settings, Utc::now()).await? {
                state.wakeups.mark_empty(&seen);
            }
        }
        // The worker's status changed (it is busy now): refresh its cached copy.
        Some(_) => state.workers.forget(&worker.id),
        None => {}
    }
    Ok(claim)
}

/// Token mode (`X-Worker-Token`) or G0 mode (admin key + `?worker_id=`).
async fn poll_caller(
    state: &AppState,
    headers: &HeaderMap,
    worker_id: Option<&str>,
) -> ApiResult<(Worker, Option<String>)> {
    if let Some(token) = header(headers, WORKER_TOKEN) {
        let worker = auth::worker_by_token(state, token).await?;
        return Ok((worker, Some(token.to_string())));
    }
    auth::require_admin(state, headers)?;
    let id = auth::worker_id(worker_id)?.ok_or_else(|| ApiError::bad_request("worker_id required"))?;
    let worker = auth::worker_by_id(state, &id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    Ok((worker, None))
}

/// The fields of an upload (multipart, or JSON for `/api/workers/fail`).
#[derive(Default, Deserialize)]
struct UploadForm {
    build_id: Option<String>,
    worker_id: Option<String>,
    success: Option<String>,
    error_message: Option<String>,
    #[serde(skip)]
    staged: Option<StagedResult>,
}

/// B17: the holder of the current attempt reports success (with the result) or failure.
async fn upload(state: State<AppState>, headers: HeaderMap, request: Request) -> ApiResult<Json<Value>> {
    report(state, headers, request, None).await
}

/// B17 alias: a success report.
async fn upload_success(state: State<AppState>, headers: HeaderMap, request: Request) -> ApiResult<Json<Value>> {
    report(state, headers, request, Some(true)).await
}

/// B17 alias: a failure report, JSON or multipart.
async fn upload_failure(state: State<AppState>, headers: HeaderMap, request: Request) -> ApiResult<Json<Value>> {
    report(state, headers, request, Some(false)).await
}

async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    success: Option<bool>,
) -> ApiResult<Json<Value>> {
    // Authenticate before accepting a byte of the body (R41).
    auth::require_upload_credential(&state, &headers).await?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut form = if is_json && success == Some(false) {
        let bytes = Bytes::from_request(request, &state)
            .await
            .map_err(|_| ApiError::bad_request("Invalid JSON body"))?;
        parse_json(&bytes)?
    } else {
        let multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|_| ApiError::bad_request("Content must be multipart/form-data"))?;
        let mut form = UploadForm::default();
        if let Err(e) = read_upload_form(&state, multipart, &mut form).await {
            results::discard(&state, form.staged.take()).await;
            return Err(e);
        }
        form
    };
    if let Some(success) = success {
        form.success = Some(success.to_string());
    }
    let staged = form.staged.take();
    finish_report(&state, &headers, form, staged).await
}

async fn read_upload_form(state: &AppState, multipart: Multipart, form: &mut UploadForm) -> ApiResult<()> {
    let mut parts = Parts::new(multipart);
    while let Some(field) = parts.next().await? {
        match field.name().unwrap_or_default() {
            "build_id" => form.build_id = Some(read_text(field).await?),
            "worker_id" => form.worker_id = Some(read_text(field).await?),
            "success" => form.success = Some(read_text(field).await?),
            "error_message" => form.error_message = Some(read_text(field).await?),
            "result" if form.staged.is_none() => form.staged = Some(results::stage(state, field).await?),
            _ => {}
        }
    }
    Ok(())
}

async fn finish_report(
    state: &AppState,
    headers: &HeaderMap,
    form: UploadForm,
    staged: Option<StagedResult>,
) -> ApiResult<Json<Value>> {
    let outcome = apply_report(state, headers, &form, staged.is_some()).await;
    match (outcome, staged) {
        (Ok(Report::Complete { build_id, caller }), Some(staged)) => {
            match results::complete_with(state, &build_id, &caller, staged).await {
                Ok(()) => Ok(Json(json!({ "status": "success" }))),
                Err(results::CompleteError::Queue(e)) => Err(explain(state, &caller.worker_id, e).await),
                Err(results::CompleteError::Api(e)) => Err(e),
            }
        }
        (Ok(Report::Answered(answer)), staged) => {
            results::discard(state, staged).await;
            Ok(Json(answer))
        }
        (Ok(Report::Complete { .. }), None) => Err(ApiError::bad_request("Missing result file")),
        (Err(e), staged) => {
            results::discard(state, staged).await;
            Err(e)
        }
    }
}

enum Report {
    /// Attach the staged result and complete.
    Complete {
        build_id: String,
        caller: auth::BuildCaller,
    },
    /// Done; answer this.
    Answered(Value),
}

async fn apply_report(state: &AppState, headers: &HeaderMap, form: &UploadForm, has_file: bool) -> ApiResult<Report> {
    let build_id = form.build_id.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let field_worker = form.worker_id.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let has_token = header(headers, auth::VM_TOKEN).is_some() || header(headers, WORKER_TOKEN).is_some();
    let (Some(build_id), true) = (build_id, field_worker.is_some() || has_token) else {
        return Err(ApiError::bad_request("build_id and worker_id required"));
    };
    if !ids::valid_id(build_id) {
        return Err(ApiError::bad_request("Invalid id"));
    }
    let caller = auth::build_caller(state, headers, build_id, field_worker, CallerRules::default()).await?;
    let success = form.success.as_deref().map(str::trim) == Some("true");
    if success && has_file {
        // The common case goes straight to the fenced completion; refusals are explained afterwards.
        return Ok(Report::Complete {
            build_id: build_id.to_string(),
            caller,
        });
    }
    if !success {
        let message = form
            .error_message
            .clone()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| "Build failed".into());
        let failure = Failure {
            kind: FailureKind::Build,
            message,
        };
        let outcome = queue::fail(
            &state.pool,
            build_id,
            caller.holder(),
            &failure,
            &state.config.queue,
            Utc::now(),
        )
        .await;
        return match outcome {
            Ok(_) => Ok(Report::Answered(json!({ "status": "failed" }))),
            Err(e) => Err(explain(state, &caller.worker_id, e).await),
        };
    }
    // A success report without a file: a no-op when this caller's attempt already stored the artifact.
    let build = queue::find_build(&state.pool, build_id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    if auth::worker_by_id(state, &caller.worker_id).await?.is_none() {
        return Err(ApiError::worker_not_found());
    }
    let completed_by_caller = build.state() == queue::BuildState::Completed
        && build.result_key.is_some()
        && build.worker_id.as_deref() == Some(caller.worker_id.as_str());
    if completed_by_caller {
        return Ok(Report::Answered(json!({ "status": "success" })));
    }
    if build.state().is_final() {
        return Err(ApiError::attempt_not_active());
    }
    if !caller.holds(&build) {
        // A stale holder gets 409 like every other stale call (R53); a stranger 403.
        let refusal = queue::refusal(&state.pool, build_id, &caller.worker_id).await?;
        return Err(explain(state, &caller.worker_id, refusal).await);
    }
    Err(ApiError::bad_request("Missing result file"))
}

/// The answer for a refused report: unknown build (the queue says so first), then unknown worker,
/// then the queue's reason.
async fn explain(state: &AppState, worker_id: &str, error: queue::QueueError) -> ApiError {
    if matches!(error, queue::QueueError::NotHolder | queue::QueueError::Stale)
        && matches!(auth::worker_by_id(state, worker_id).await, Ok(None))
    {
        return ApiError::worker_not_found();
    }
    error.into()
}

/// B18: counters and uptime of a worker.
async fn stats(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    auth::require_admin(&state, &headers)?;
    let worker = queue::find_worker(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    let uptime = (Utc::now() - worker.registered_at).num_seconds().max(0);
    Ok(Json(json!({
        "totalBuilds": worker.builds_completed + worker.builds_failed,
        "successfulBuilds": worker.builds_completed,
        "failedBuilds": worker.builds_failed,
        "workerName": worker.name,
        "status": worker.status,
        "uptime": views::uptime(uptime),
    })))
}

/// B19 (admin): take a worker out; its attempt goes back to the queue.
async fn unregister(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    auth::require_admin(&state, &headers)?;
    let moved = queue::unregister(&state.pool, &id, &state.config.queue, Utc::now()).await?;
    state.workers.clear();
    Ok(Json(json!({ "success": true, "builds_reassigned": moved })))
}

/// B19 (worker token): a worker takes itself out.
async fn unregister_self(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let token =
        header(&headers, WORKER_TOKEN).ok_or_else(|| ApiError::unauthorized("Missing X-Worker-Token header"))?;
    let worker = auth::worker_by_token(&state, token).await?;
    let moved = queue::unregister(&state.pool, &worker.id, &state.config.queue, Utc::now()).await?;
    state.workers.clear();
    Ok(Json(json!({ "success": true, "builds_reassigned": moved })))
}

#[derive(Deserialize)]
struct AbandonBody {
    build_id: Option<String>,
    reason: Option<String>,
}

/// §4: the holder gives its attempt back (an infrastructure failure: retried while attempts remain).
async fn abandon(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AbandonBody>,
) -> ApiResult<Json<Value>> {
    let token =
        header(&headers, WORKER_TOKEN).ok_or_else(|| ApiError::unauthorized("Missing X-Worker-Token header"))?;
    let worker = auth::worker_by_token(&state, token).await?;
    let build_id = body
        .build_id
        .filter(|id| ids::valid_id(id))
        .ok_or_else(|| ApiError::bad_request("build_id required"))?;
    let reason = body
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "abandoned by worker".into());
    let failure = Failure {
        kind: FailureKind::Infrastructure,
        message: format!("Worker abandoned the build: {reason}"),
    };
    let holder = queue::Holder::worker(&worker.id);
    let build = queue::fail(
        &state.pool,
        &build_id,
        holder,
        &failure,
        &state.config.queue,
        Utc::now(),
    )
    .await?;
    Ok(Json(json!({ "success": true, "status": build.state().g0() })))
}
