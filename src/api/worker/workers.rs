//! Worker endpoints: register, poll, result upload (and its aliases), stats, unregister, abandon.

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, header};
use axum::{Extension, Json};
use std::time::Duration;

use chrono::Utc;
use serde::Deserialize;
use serde_json::Value;

use super::schema::{
    AbandonRequest, Abandoned, FailureReport, PollAnswer, PollQuery, RegisterRequest as RegisterDoc, Registered,
    ReportStatus, UploadForm as UploadFormDoc,
};
use crate::api::auth::{self, CallerRules, KeyCaller, TokenWorker, WORKER_TOKEN, header};
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{BodyBytes, JsonBody, QueryParams, bounded_int, parse_json};
use crate::api::group::ApiRouter;
use crate::api::multipart::{Parts, read_text};
use crate::api::results::{self, StagedResult};
use crate::api::views::Unregistered;
use crate::api::{AppState, views};
use crate::identity::{self, Principal, Role};
use crate::ids;
use crate::queue::{self, Failure, FailureKind, RegisterRequest, Worker};
use crate::storage::Key;
use utoipa_axum::routes;

/// Register (the admin key, or the worker's own token to re-register).
pub fn register_router() -> ApiRouter {
    ApiRouter::new().routes(routes!(register))
}

/// Poll (a worker token, or the admin key with `?worker_id=`).
pub fn poll_router() -> ApiRouter {
    ApiRouter::new().routes(routes!(poll))
}

/// Result reports (a VM token, a worker token or the admin key, checked before the body is read),
/// bounded by the result limit rather than the default body limit.
pub fn upload_router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(upload))
        .routes(routes!(upload_success))
        .layer(DefaultBodyLimit::disable())
        .routes(routes!(upload_failure))
}

/// What only a worker's own token may do.
pub fn token_router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(unregister_self))
        .routes(routes!(abandon))
}

#[derive(Deserialize)]
struct RegisterBody {
    id: Option<String>,
    name: Option<String>,
    capabilities: Option<Value>,
}

/// B15: admin key, or a worker's own token to re-register it.
#[utoipa::path(post, path = "/api/workers/register", request_body = RegisterDoc, responses(
    (status = 200, description = "Registered, with the worker token", body = Registered),
    (status = 400, description = "`Name and capabilities required`", body = ErrorBody),
    (status = 403, description = "`Invalid API key`", body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    token_worker: Option<Extension<TokenWorker>>,
    key_caller: Option<Extension<KeyCaller>>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Json<Registered>> {
    // Set by the credential layer when the caller re-registers with its own token.
    let caller_worker = token_worker.map(|Extension(TokenWorker(worker))| worker.id);
    let name = body.name.filter(|n| !n.trim().is_empty());
    let capabilities = body.capabilities.filter(|c| !c.is_null());
    let (Some(name), Some(capabilities)) = (name, capabilities) else {
        return Err(ApiError::bad_request("Name and capabilities required"));
    };
    let id = auth::worker_id(body.id.as_deref())?;
    // A worker key registers workers bound to it (and re-registers only those); an admin key any.
    let key = key_caller
        .map(|Extension(KeyCaller(who))| who)
        .filter(|who| who.role() == Role::Worker);
    if let (Some(key), Some(id)) = (&key, &id)
        && auth::worker_by_id(&state, id).await?.is_some()
    {
        auth::may_act_for(&state, key, id).await?;
    }
    let enrollment = key.as_ref().filter(|who| who.enrolling()).and_then(|who| who.key_id());
    if let Some(key_id) = enrollment
        && !identity::spend(&state.pool, key_id, Utc::now()).await?
    {
        return Err(ApiError::unauthorized("Enrollment key already used"));
    }
    let request = RegisterRequest {
        registered_by: key.as_ref().and_then(|who| who.key_id()).map(str::to_string),
        id,
        name,
        platforms: queue::platforms_of(&capabilities),
        capabilities,
        caller_worker,
    };
    let registration = match queue::register(&state.pool, &request, &state.config.queue, Utc::now()).await {
        Ok(registration) => registration,
        Err(e) => {
            // The registration did not happen: the enrollment key is not spent.
            if let Some(key_id) = enrollment {
                identity::unspend(&state.pool, key_id).await?;
            }
            return Err(e.into());
        }
    };
    state.workers.clear();
    let status = if registration.reregistered {
        "re-registered"
    } else {
        "registered"
    };
    Ok(Json(Registered {
        id: registration.worker.id,
        status: status.into(),
        access_token: registration.token,
        base_image_id: state.config.base_image_id.clone(),
    }))
}

/// B16: the held attempt again, or a newly claimed build, or `{"job": null}`.
#[utoipa::path(get, path = "/api/workers/poll", params(PollQuery), responses(
    (status = 200, description = "The held attempt again, a newly claimed build, or `{\"job\": null}`", body = PollAnswer),
    (status = 400, description = "`worker_id required`", body = ErrorBody),
    (status = 404, description = "`Worker not found`", body = ErrorBody)))]
async fn poll(
    State(state): State<AppState>,
    headers: HeaderMap,
    token_worker: Option<Extension<TokenWorker>>,
    key_caller: Option<Extension<KeyCaller>>,
    QueryParams(query): QueryParams<PollQuery>,
) -> ApiResult<Json<PollAnswer>> {
    let token_worker = token_worker.map(|Extension(TokenWorker(worker))| worker);
    let key = key_caller.map(|Extension(KeyCaller(who))| who);
    // The look-ups and the claim are boxed apart: only the wait's own small state stays allocated while
    // a long poll is parked (P5b: thousands of idle polls), not the largest of these futures.
    let (mut worker, token) = Box::pin(poll_caller(
        &state,
        &headers,
        token_worker,
        key,
        query.worker_id.as_deref(),
    ))
    .await?;
    // The header values share hyper's read buffer of the request head (8 KiB): dropped before the wait,
    // they let it go instead of holding it for the whole poll (P5b).
    drop(headers);
    let wait = bounded_int(query.wait.as_deref(), "wait", 0, 60)?.unwrap_or(0);
    let now = Utc::now();
    Box::pin(touch(&state, &worker, now)).await?;
    let claim = claim_or_wait(&state, &mut worker, Duration::from_secs(wait as u64)).await?;
    Ok(Json(PollAnswer {
        job: claim.as_ref().map(|c| views::job(c, &state.config.base_image_id)),
        access_token: token,
    }))
}

/// Claims for the worker; with `wait`, holds the request until its queue gets work (woken by NOTIFY),
/// the time passes, or the server shuts down. No database connection is held while waiting.
async fn claim_or_wait(state: &AppState, worker: &mut Worker, wait: Duration) -> ApiResult<Option<queue::Claim>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut shutdown = state.shutdown.clone();
    loop {
        // Subscribe before looking, so a build committed in between still wakes us.
        let mut subscription = (!wait.is_zero()).then(|| state.wakeups.subscribe(&worker.platforms()));
        let claim = Box::pin(claim_unless_known_empty(state, worker)).await?;
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

/// Records the worker's contact (debounced; an offline worker comes back) and, when it was written,
/// tells the cached copies.
async fn touch(state: &AppState, worker: &Worker, now: chrono::DateTime<Utc>) -> ApiResult<bool> {
    let written = queue::touch_worker(&state.pool, worker, &state.config.queue, now).await?;
    if written {
        state.workers.seen(&worker.id, now);
    }
    Ok(written)
}

/// Claims, except that an idle worker polling queues known to be empty is answered without a query (a
/// long poll then waits at once: the notification of the next build wakes a subscribed poller, which
/// claims).
async fn claim_unless_known_empty(state: &AppState, worker: &mut Worker) -> ApiResult<Option<queue::Claim>> {
    let platforms = worker.platforms();
    // Only an idle worker (it may not hold an attempt to re-deliver) that accepts work uses the hint.
    let hint_applies = worker.status == "idle" && worker.accepts_work();
    if hint_applies && state.wakeups.known_empty(&platforms) {
        return Ok(None);
    }
    let seen = state.wakeups.generations(&platforms);
    let now = Utc::now();
    let asked = std::time::Instant::now();
    let claim = queue::claim(&state.claim_pool, worker, &state.config.queue, now).await?;
    match &claim {
        // Nothing for this worker; the queues are empty for everyone unless a build is only held back
        // from this worker by the requeue cool-off (R51).
        None if hint_applies => {
            let settings = &state.config.queue;
            if !queue::held_back_by_requeue(&state.pool, &worker.id, settings, Utc::now()).await? {
                state.wakeups.mark_empty(&seen);
            }
        }
        // The worker is busy now: its cached copies say so (and the emptiness hint counts the build).
        Some(claim) => {
            if !claim.redelivered {
                state.wakeups.claimed(claim.build.platform(), &claim.build.id);
            }
            state
                .workers
                .claimed(&worker.id, &claim.build, (!claim.redelivered).then_some(now), asked);
            if claim.worker_status == "offline" && !worker.is_out() {
                // Marked offline while it was building, after its copy was cached: this poll brings
                // it back, as a poll with a fresh copy would have.
                let mut marked = worker.clone();
                marked.status = claim.worker_status.clone();
                touch(state, &marked, now).await?;
            }
        }
        // The copy said busy, yet the worker holds nothing: its attempt ended without this instance
        // seeing it (a lease rescue, a cancel, an offline sweep meanwhile). Look it up again, and bring
        // it back online if it was marked offline, as a poll with a fresh copy would have.
        None if worker.status == "busy" => {
            state.workers.forget(&worker.id);
            if let Some(mut fresh) = auth::worker_by_id(state, &worker.id).await? {
                let now = Utc::now();
                if touch(state, &fresh, now).await? {
                    fresh.last_seen_at = now;
                    if fresh.status == "offline" {
                        fresh.status = "idle".into();
                    }
                }
                *worker = fresh;
            }
        }
        None => {}
    }
    Ok(claim)
}

/// Token mode (`X-Worker-Token`, resolved by the credential layer) or G0 mode (admin key, checked by
/// the layer, + `?worker_id=`).
async fn poll_caller(
    state: &AppState,
    headers: &HeaderMap,
    token_worker: Option<Worker>,
    key: Option<Principal>,
    worker_id: Option<&str>,
) -> ApiResult<(Worker, Option<String>)> {
    if let (Some(worker), Some(token)) = (token_worker, header(headers, WORKER_TOKEN)) {
        return Ok((worker, Some(token.to_string())));
    }
    let id = auth::worker_id(worker_id)?.ok_or_else(|| ApiError::bad_request("worker_id required"))?;
    if let Some(key) = &key {
        auth::may_act_for(state, key, &id).await?;
    }
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
#[utoipa::path(post, path = "/api/workers/upload", request_body(content = UploadFormDoc, content_type = "multipart/form-data"), responses(
    (status = 200, description = "`success` (completed) or `failed`", body = ReportStatus),
    (status = 400, description = "`build_id and worker_id required`, `Missing result file`, `Content must be multipart/form-data`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`", body = ErrorBody),
    (status = 404, description = "`Build not found` or `Worker not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody),
    (status = 413, description = "`Result file too large`", body = ErrorBody)))]
async fn upload(state: State<AppState>, headers: HeaderMap, request: Request) -> ApiResult<Json<ReportStatus>> {
    report(state, headers, request, None).await
}

/// B17 alias: a success report.
#[utoipa::path(post, path = "/api/workers/result", request_body(content = UploadFormDoc, content_type = "multipart/form-data"), responses(
    (status = 200, description = "`success`", body = ReportStatus),
    (status = 400, description = "`build_id and worker_id required`, `Missing result file`, `Content must be multipart/form-data`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`", body = ErrorBody),
    (status = 404, description = "`Build not found` or `Worker not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody),
    (status = 413, description = "`Result file too large`", body = ErrorBody)))]
async fn upload_success(state: State<AppState>, headers: HeaderMap, request: Request) -> ApiResult<Json<ReportStatus>> {
    report(state, headers, request, Some(true)).await
}

/// B17 alias: a failure report, JSON or multipart.
#[utoipa::path(post, path = "/api/workers/fail", request_body(content(
    (FailureReport = "application/json"), (UploadFormDoc = "multipart/form-data"))), responses(
    (status = 200, description = "`failed`", body = ReportStatus),
    (status = 400, description = "`build_id and worker_id required`, `Missing result file`, `Content must be multipart/form-data`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`", body = ErrorBody),
    (status = 404, description = "`Build not found` or `Worker not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody),
    (status = 413, description = "`Result file too large`", body = ErrorBody)))]
async fn upload_failure(state: State<AppState>, headers: HeaderMap, request: Request) -> ApiResult<Json<ReportStatus>> {
    report(state, headers, request, Some(false)).await
}

async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    success: Option<bool>,
) -> ApiResult<Json<ReportStatus>> {
    // The credential was checked by the group's layer before a byte of the body was read (R41).
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let mut form = if is_json && success == Some(false) {
        let BodyBytes(bytes) = BodyBytes::from_request(request, &state).await?;
        parse_json(&bytes)?
    } else {
        let multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|_| ApiError::bad_request("Content must be multipart/form-data"))?;
        let mut form = UploadForm::default();
        if let Err(e) = read_upload_form(&state, &headers, multipart, &mut form).await {
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

async fn read_upload_form(
    state: &AppState,
    headers: &HeaderMap,
    multipart: Multipart,
    form: &mut UploadForm,
) -> ApiResult<()> {
    let mut parts = Parts::new(multipart);
    while let Some(field) = parts.next().await? {
        match field.name().unwrap_or_default() {
            "build_id" => form.build_id = Some(read_text(field).await?),
            "worker_id" => form.worker_id = Some(read_text(field).await?),
            "success" => form.success = Some(read_text(field).await?),
            "error_message" => form.error_message = Some(read_text(field).await?),
            "result" if form.staged.is_none() => {
                // The build and its holder known before the file: it streams to its final key.
                form.staged = Some(match check_hold_early(state, headers, form).await? {
                    Early::Recorded(key, build_id) => {
                        results::stream_to(state, key, field).await?.checked_for(&build_id)
                    }
                    Early::Resend(build_id) => results::stream_direct(state, &build_id, field).await?,
                    Early::Unknown => results::stage(state, field).await?,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// T9: when the fields before the file already name the build and the caller, a caller that does not
/// hold the build is refused before a byte of the file is read or staged (the answer it would get
/// after the upload); the holder's file streams straight to a result key of the build, recorded as a
/// pending write by the statement that checks the hold. Otherwise the file is staged and the report
/// decides afterwards.
async fn check_hold_early(state: &AppState, headers: &HeaderMap, form: &UploadForm) -> ApiResult<Early> {
    let build_id = form.build_id.as_deref().map(str::trim).filter(|v| ids::valid_id(v));
    let field_worker = form.worker_id.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let has_token = header(headers, auth::VM_TOKEN).is_some() || header(headers, WORKER_TOKEN).is_some();
    let Some(build_id) = build_id.filter(|_| field_worker.is_some() || has_token) else {
        return Ok(Early::Unknown);
    };
    let caller = auth::build_caller(state, headers, build_id, field_worker, CallerRules::default()).await?;
    // A build this instance handed the caller's worker moments ago is checked against the claimed row
    // it keeps (WorkerCache::handed, as the source download); its file goes to a loose result key an
    // earlier completion recorded (queue::SpareKeys): no statement before the body. The completion
    // checks the hold again, exactly. Anyone else is checked (and the key recorded) in the database.
    if let Some(key) = results::spare_for_handed(state, build_id, &caller) {
        return Ok(Early::Recorded(key, build_id.to_string()));
    }
    let key = results::result_key(build_id)?;
    match queue::record_held_write(&state.pool, build_id, caller.holder(), key.as_str()).await {
        Ok(()) => Ok(Early::Recorded(key, build_id.to_string())),
        // The attempt that stored the result re-sending it after a lost answer: the file is read so
        // that `complete_with` compares it (200 for the same bytes, 409 otherwise).
        Err(queue::QueueError::Stale) if results::resend_of_stored(state, build_id, &caller).await => {
            Ok(Early::Resend(build_id.to_string()))
        }
        Err(e) => Err(explain(state, &caller.worker_id, e).await),
    }
}

/// What the fields before a result file told.
enum Early {
    /// The caller holds the build (the second field): its file goes to this result key, already recorded
    /// as pending.
    Recorded(Key, String),
    /// The attempt that completed the build re-sending its file (compared once stored).
    Resend(String),
    /// The build or the caller is not known yet: the file is staged.
    Unknown,
}

async fn finish_report(
    state: &AppState,
    headers: &HeaderMap,
    form: UploadForm,
    staged: Option<StagedResult>,
) -> ApiResult<Json<ReportStatus>> {
    let outcome = apply_report(state, headers, &form, staged.is_some()).await;
    match (outcome, staged) {
        (Ok(Report::Complete { build_id, caller }), Some(staged)) => {
            match results::complete_with(state, &build_id, &caller, staged).await {
                Ok(()) => {
                    state.workers.finished(&caller.worker_id, &build_id);
                    Ok(Json(ReportStatus {
                        status: "success".into(),
                    }))
                }
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
    Answered(ReportStatus),
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
            Ok(_) => {
                // A failure may quarantine the worker: its next poll looks it up again.
                state.workers.forget(&caller.worker_id);
                Ok(Report::Answered(ReportStatus {
                    status: "failed".into(),
                }))
            }
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
        return Ok(Report::Answered(ReportStatus {
            status: "success".into(),
        }));
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

/// B19 (worker token): a worker takes itself out.
#[utoipa::path(post, path = "/api/workers/unregister", responses(
    (status = 200, description = "Offline, token revoked, its attempt back in the queue", body = Unregistered)))]
async fn unregister_self(
    State(state): State<AppState>,
    Extension(TokenWorker(worker)): Extension<TokenWorker>,
) -> ApiResult<Json<Unregistered>> {
    let moved = queue::unregister(&state.pool, &worker.id, &state.config.queue, Utc::now(), None).await?;
    state.workers.clear();
    Ok(Json(Unregistered {
        success: true,
        builds_reassigned: moved,
    }))
}

#[derive(Deserialize)]
struct AbandonBody {
    build_id: Option<String>,
    reason: Option<String>,
}

/// §4: the holder gives its attempt back (an infrastructure failure: retried while attempts remain).
/// With `"reason": "owner_reclaimed"` the Mac's owner took it back: the build is pending again at the
/// front of its queue without spending an attempt (at most `CONTROLLER_MAX_RELEASES` times).
#[utoipa::path(post, path = "/api/workers/abandon", request_body = AbandonRequest, responses(
    (status = 200, description = "The attempt given back (an infrastructure failure, or released for its owner)", body = Abandoned),
    (status = 400, description = "`build_id required`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn abandon(
    State(state): State<AppState>,
    Extension(TokenWorker(worker)): Extension<TokenWorker>,
    JsonBody(body): JsonBody<AbandonBody>,
) -> ApiResult<Json<Abandoned>> {
    let build_id = body
        .build_id
        .filter(|id| ids::valid_id(id))
        .ok_or_else(|| ApiError::bad_request("build_id required"))?;
    let reason = body
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "abandoned by worker".into());
    let holder = queue::Holder::worker(&worker.id);
    // The attempt ends (or is given back) whatever the outcome: its downloads read the row again.
    state.attempt_changed(&build_id);
    if reason == queue::OWNER_RECLAIMED {
        let build = queue::release_for_owner(&state.pool, &build_id, holder, &state.config.queue, Utc::now()).await?;
        return Ok(Json(Abandoned {
            success: true,
            status: build.state().g0().to_string(),
        }));
    }
    let failure = Failure {
        kind: FailureKind::Infrastructure,
        message: format!("Worker abandoned the build: {reason}"),
    };
    let build = queue::fail(
        &state.pool,
        &build_id,
        holder,
        &failure,
        &state.config.queue,
        Utc::now(),
    )
    .await?;
    Ok(Json(Abandoned {
        success: true,
        status: build.state().g0().to_string(),
    }))
}
