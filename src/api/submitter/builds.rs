//! Build endpoints for submitters and operators: submit, list, active, status, cancel, retry.

use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::api::auth::{KeyCaller, OwnedBuild};
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::bounded_int;
use crate::api::group::ApiRouter;
use crate::api::multipart::{MultipartBody, Parts, read_limited, read_text, require_multipart};
use crate::api::views::BuildStatus;
use crate::api::{AppState, views};
use crate::queue::{self, Build, KeyQuota, NewBuild, Platform};
use crate::storage::{Key, Stored, WriteError, bundle, certs};
use crate::{ids, jobs};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;

/// Submitting (the admin key). Uploads are bounded by their own limits, not the default body limit.
pub fn submit_router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(submit_g0))
        .routes(routes!(submit_created))
        .layer(DefaultBodyLimit::disable())
}

/// Following a build (its owner).
pub fn owner_router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(cancel))
        .routes(routes!(retry))
}

/// `ios` or `android`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlatformName {
    Ios,
    Android,
}

/// The multipart form of a submit (B1). Parts are streamed to storage as they arrive.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct SubmitForm {
    /// The app's source archive (zip).
    #[schema(value_type = String, format = Binary)]
    pub source: Vec<u8>,
    /// A certs zip (`*.p12`, `password.txt`, `*.mobileprovision`) or a raw PKCS#12 file.
    #[schema(value_type = Option<String>, format = Binary)]
    pub certs: Option<Vec<u8>>,
    /// A `.mobileprovision` file, added to the certs bundle.
    #[schema(value_type = Option<String>, format = Binary)]
    pub profile: Option<Vec<u8>>,
    pub platform: PlatformName,
    /// −100..100 (default 0).
    pub priority: Option<i32>,
    /// 1..10.
    pub max_attempts: Option<i32>,
    /// RFC 3339: a scheduled build.
    pub run_at: Option<String>,
    /// At most 255 bytes (e.g. `app/main`): once accepted, this submitter's older queued builds with the
    /// same key and platform are cancelled (`Superseded by <id>`).
    pub supersede_key: Option<String>,
    /// `true`: running builds with the key are cancelled too (default `false`).
    pub supersede_running: Option<bool>,
    /// JSON: what the build needs of its worker, e.g. `{"xcode": ">=16.2,<17", "macos": ">=15",
    /// "arch": "arm64", "min_memory_gb": 16, "labels": ["fast-disk"]}` (scheduling.md).
    pub requirements: Option<String>,
    /// Accepted and dropped (never stored in clear).
    #[serde(rename = "appleId")]
    pub apple_id: Option<String>,
    /// Accepted and dropped (never stored in clear).
    #[serde(rename = "applePassword")]
    pub apple_password: Option<String>,
}

/// A build submitted (B1).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    pub id: String,
    /// Always `pending`.
    pub status: String,
    /// Epoch milliseconds.
    pub submitted_at: i64,
    /// The build access token (`X-Build-Token`): read, cancel and retry this build.
    pub access_token: String,
}

/// A build retried as a new build (B14).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Retried {
    pub id: String,
    /// Always `pending`.
    pub status: String,
    /// Epoch milliseconds.
    pub submitted_at: i64,
    /// The new build's access token.
    pub access_token: String,
    pub original_build_id: String,
}

/// A build cancelled (B13).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cancelled {
    /// Always `cancelled`.
    pub status: String,
}

/// B1: 200 with the new build.
#[utoipa::path(post, path = "/api/builds/submit", request_body(content = SubmitForm, content_type = "multipart/form-data"), responses(
    (status = 200, description = "Submitted", body = Submitted),
    (status = 400, description = "`Content must be multipart/form-data`, `Source file required`, `Valid platform required (ios|android)`, `Invalid certs bundle`, …", body = ErrorBody),
    (status = 413, description = "`Source file too large` or `Certs file too large`", body = ErrorBody),
    (status = 422, description = "`No worker can run this build: needs …` (`no_matching_worker`)", body = ErrorBody),
    (status = 429, description = "`Submitter queue limit reached` (`Retry-After`)", body = ErrorBody),
    (status = 503, description = "`Build queue is full` (`Retry-After`)", body = ErrorBody)))]
async fn submit_g0(
    state: State<AppState>,
    caller: Option<Extension<KeyCaller>>,
    headers: HeaderMap,
    multipart: MultipartBody,
) -> ApiResult<Json<Submitted>> {
    submit(state, caller, &headers, multipart).await
}

/// B1 alias `POST /api/builds`: 201 with the same body.
#[utoipa::path(post, path = "/api/builds", request_body(content = SubmitForm, content_type = "multipart/form-data"), responses(
    (status = 201, description = "Submitted", body = Submitted),
    (status = 400, description = "`Content must be multipart/form-data`, `Source file required`, `Valid platform required (ios|android)`, `Invalid certs bundle`, …", body = ErrorBody),
    (status = 413, description = "`Source file too large` or `Certs file too large`", body = ErrorBody),
    (status = 422, description = "`No worker can run this build: needs …` (`no_matching_worker`)", body = ErrorBody),
    (status = 429, description = "`Submitter queue limit reached` (`Retry-After`)", body = ErrorBody),
    (status = 503, description = "`Build queue is full` (`Retry-After`)", body = ErrorBody)))]
async fn submit_created(
    state: State<AppState>,
    caller: Option<Extension<KeyCaller>>,
    headers: HeaderMap,
    multipart: MultipartBody,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    Ok((StatusCode::CREATED, submit(state, caller, &headers, multipart).await?))
}

/// What a submit form carried.
#[derive(Default)]
struct SubmitParts {
    source: Option<Stored>,
    certs: Option<Bytes>,
    profile: Option<Bytes>,
    platform: Option<String>,
    priority: Option<String>,
    max_attempts: Option<String>,
    run_at: Option<String>,
    supersede_key: Option<String>,
    supersede_running: Option<String>,
    requirements: Option<queue::Requirements>,
    /// The single-valued parts already read (a repeated one is refused).
    seen: std::collections::HashSet<String>,
}

async fn submit(
    State(state): State<AppState>,
    caller: Option<Extension<KeyCaller>>,
    headers: &HeaderMap,
    body: MultipartBody,
) -> ApiResult<Json<Submitted>> {
    // Who submits, for the audit rows of the builds it supersedes.
    let user_agent = headers.get("user-agent").and_then(|v| v.to_str().ok());
    let actor = match &caller {
        Some(Extension(KeyCaller(who))) => crate::audit::Actor::key(who, None, user_agent),
        None => crate::audit::Actor::anonymous(None, user_agent),
    };
    // A stored key without a max queued (0, as this instance's key cache read its row within the last
    // second) skips the early count: the insert enforces the key's quota from its row in any case.
    let unlimited =
        matches!(&caller, Some(Extension(KeyCaller(crate::identity::Principal::Key(key)))) if key.max_queued == 0);
    // The stored key that submits (`None`: the built-in admin key).
    let submitted_by = caller.and_then(|Extension(KeyCaller(who))| who.key_id().map(str::to_string));
    let idempotency_key = idempotency_key(headers)?;
    let multipart = require_multipart(body)?;
    // A retry of a submit whose build exists (its answer was lost) is answered with that build, not
    // refused by a quota or queue limit the first submit itself may have reached.
    let replay = match idempotency_key.as_deref() {
        Some(key) => queue::idempotency::names_a_build(&state.pool, submitted_by.as_deref(), key).await?,
        None => false,
    };
    if !replay && !unlimited {
        submitter_room(&state, submitted_by.as_deref()).await?;
    }
    // Backpressure (R58) before a byte of the body is read: only when a queue may be at its limit
    // (queue::FullQueues: seen full here, or at half its limit at the last look of the once-a-second
    // watcher) is it counted here; when every platform queue is full the submit is
    // refused, otherwise a full platform is refused as soon as its part arrives, and the insert checks
    // again, exactly, in any case.
    let full = if replay || !state.full_queues.suspected() {
        Vec::new()
    } else {
        full_queues(&state).await?
    };
    if Platform::ALL.iter().all(|p| full.contains(p)) {
        Platform::ALL.iter().for_each(|p| queue::count_refusal(*p));
        return Err(queue_full_error());
    }
    // The source's key is a pending write before anything is written: whatever this request leaves
    // behind (a kill, a lost commit answer, a failed delete) stays named, and `sweep_unlinked` settles
    // it. A spare recorded by an earlier submit's insert (queue::SpareKeys) costs no statement here.
    let spare_age = std::time::Duration::from_secs(state.config.jobs.staging_max_age_secs / 4);
    let spare = state.spare_sources.take(spare_age);
    let is_spare = spare.is_some();
    let (build_id, recorded) = spare.unwrap_or_else(|| (ids::new_id(), std::time::Instant::now()));
    let keys = (Key::source(&build_id), Key::certs(&build_id));
    let (Some(source_key), Some(certs_key)) = keys else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "generated id {build_id} is not a valid key"
        )));
    };
    if !is_spare {
        queue::record_writes(&state.pool, &[source_key.as_str()]).await?;
    }
    let access_token = ids::new_secret();
    let mut unsettled = false;
    let mut form = SubmitParts::default();
    let outcome = match read_submit_form(&state, multipart, &source_key, &full, &mut form).await {
        Ok(()) => {
            let new = Creating {
                build_id: &build_id,
                source_key: &source_key,
                certs_key: &certs_key,
                access_token: &access_token,
                idempotency_key: idempotency_key.as_deref(),
                recorded,
                unlimited,
            };
            create_build(&state, new, form, submitted_by, &actor, &mut unsettled).await
        }
        Err(e) => Err(e),
    };
    let error = match outcome {
        Ok(Created::New(answer)) => return Ok(answer),
        // A replay stores nothing new: what this request streamed is discarded.
        Ok(Created::Replayed(answer)) => {
            jobs::discard_unlinked(&state.pool, &state.storage, &[&source_key, &certs_key]).await;
            return Ok(answer);
        }
        Err(error) => error,
    };
    if unsettled {
        // The insert may have committed with its answer lost: the row, if it exists, is the answer,
        // and its objects are never deleted here.
        return match queue::find_build(&state.pool, &build_id).await {
            Ok(Some(build)) => {
                tracing::warn!(build_id = %build_id, "submit committed although its answer was lost");
                state.wakeups.invalidate(build.platform());
                Ok(Json(submitted(&build, access_token)))
            }
            _ => {
                tracing::warn!(build_id = %build_id, "submit outcome unknown; its objects are left to sweep_unlinked");
                Err(error)
            }
        };
    }
    // Refused before any row could exist: nothing is left behind.
    jobs::discard_unlinked(&state.pool, &state.storage, &[&source_key, &certs_key]).await;
    Err(error)
}

/// What a submit creates.
struct Creating<'a> {
    build_id: &'a str,
    source_key: &'a Key,
    certs_key: &'a Key,
    access_token: &'a str,
    idempotency_key: Option<&'a str>,
    /// When the source key was recorded as a pending write (before the body).
    recorded: std::time::Instant,
    /// The submitting stored key has no max queued, as this instance's key cache read its row within the
    /// last second: its insert needs no per-key lock (queue::enqueue_submit).
    unlimited: bool,
}

/// A submit's answer: a new build, or the build an earlier submit with the same `Idempotency-Key` made.
enum Created {
    New(Json<Submitted>),
    Replayed(Json<Submitted>),
}

/// The request's `Idempotency-Key` (400 when malformed, before any byte of the body is read).
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let value = headers.get("idempotency-key").map(|v| v.to_str().unwrap_or("\u{0}"));
    queue::idempotency::parse_key(value).map_err(ApiError::bad_request)
}

fn submitted(build: &Build, access_token: String) -> Submitted {
    Submitted {
        id: build.id.clone(),
        status: "pending".into(),
        submitted_at: build.submitted_at.timestamp_millis(),
        access_token,
    }
}

async fn read_submit_form(
    state: &AppState,
    multipart: Multipart,
    source_key: &Key,
    full: &[Platform],
    form: &mut SubmitParts,
) -> ApiResult<()> {
    let limits = &state.config;
    let mut parts = Parts::new(multipart);
    while let Some(field) = parts.next().await? {
        match field.name().unwrap_or_default() {
            "source" if form.source.is_none() => {
                let stored = state
                    .storage
                    .write_stream(source_key, field, limits.max_source_bytes)
                    .await;
                form.source = Some(stored.map_err(|e| match e {
                    WriteError::TooLarge(_) => ApiError::too_large("Source file too large"),
                    other => other.into(),
                })?);
            }
            "certs" => form.certs = Some(read_limited(field, limits.max_certs_bytes, "Certs file too large").await?),
            "profile" => {
                form.profile = Some(read_limited(field, limits.max_certs_bytes, "Certs file too large").await?)
            }
            "platform" | "requirements" if !form.seen.insert(field.name().unwrap_or_default().to_string()) => {
                return Err(ApiError::bad_request(format!(
                    "Duplicate {} field",
                    field.name().unwrap_or_default()
                )));
            }
            "platform" => {
                let platform = read_text(field).await?;
                // A full queue is refused as soon as the platform is known, before the rest is read.
                if let Some(p) = Platform::parse(platform.trim())
                    && full.contains(&p)
                {
                    queue::count_refusal(p);
                    return Err(queue_full_error());
                }
                form.platform = Some(platform);
                refuse_unmatched(state, form).await?;
            }
            "requirements" => {
                let text = read_text(field).await?;
                form.requirements = queue::Requirements::parse(&text).map_err(ApiError::bad_request)?;
                refuse_unmatched(state, form).await?;
            }
            "priority" => form.priority = Some(read_text(field).await?),
            "max_attempts" => form.max_attempts = Some(read_text(field).await?),
            "run_at" => form.run_at = Some(read_text(field).await?),
            "supersede_key" => form.supersede_key = Some(read_text(field).await?),
            "supersede_running" => form.supersede_running = Some(read_text(field).await?),
            // appleId / applePassword and unknown parts are read and dropped: never stored in clear.
            _ => {}
        }
    }
    Ok(())
}

/// 422 `no_matching_worker` once both the platform and requirements are known (usually before the
/// source part), when no registered worker could ever run the build (unless `CONTROLLER_ACCEPT_UNMATCHED`).
async fn refuse_unmatched(state: &AppState, form: &SubmitParts) -> ApiResult<()> {
    let (Some(req), Some(platform)) = (&form.requirements, form.platform.as_deref()) else {
        return Ok(());
    };
    let Some(platform) = Platform::parse(platform.trim()) else {
        return Ok(());
    };
    if state.config.queue.accept_unmatched {
        return Ok(());
    }
    match queue::unmatched(&state.pool, platform, req).await? {
        Some(message) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message).with_code("no_matching_worker")),
        None => Ok(()),
    }
}

/// Validates the form, stores the certs and inserts the row. `unsettled` is set when the insert failed
/// in a way that may still have committed.
async fn create_build(
    state: &AppState,
    new: Creating<'_>,
    form: SubmitParts,
    submitted_by: Option<String>,
    actor: &crate::audit::Actor,
    unsettled: &mut bool,
) -> ApiResult<Created> {
    let Some(source) = form.source else {
        return Err(ApiError::bad_request("Source file required"));
    };
    let platform = form
        .platform
        .as_deref()
        .map(str::trim)
        .and_then(Platform::parse)
        .ok_or_else(|| ApiError::bad_request("Valid platform required (ios|android)"))?;
    let priority = bounded_int(form.priority.as_deref(), "priority", -100, 100)?.unwrap_or(0) as i32;
    let max_attempts = bounded_int(form.max_attempts.as_deref(), "max_attempts", 1, 10)?
        .map_or(state.config.queue.max_attempts, |n| n as i32);
    let run_at = parse_run_at(form.run_at.as_deref())?;
    let supersede = queue::supersede::parse(form.supersede_key.as_deref(), form.supersede_running.as_deref())
        .map_err(ApiError::bad_request)?;
    let stored_certs = match (form.certs.as_deref(), form.profile.as_deref()) {
        (None, None) => None,
        (certs_part, profile) => {
            let bundle =
                bundle::normalise(certs_part, profile).map_err(|_| ApiError::bad_request("Invalid certs bundle"))?;
            let sealed = certs::encrypt(&state.secrets.certs_key, &bundle);
            queue::record_writes(&state.pool, &[new.certs_key.as_str()]).await?;
            state.storage.put(new.certs_key, Bytes::from(sealed)).await?;
            Some(new.certs_key.as_str().to_string())
        }
    };
    let row = NewBuild {
        requirements: form.requirements,
        submitted_by,
        id: new.build_id.to_string(),
        platform,
        priority,
        max_attempts,
        run_at,
        retry_build_failures: state.config.queue.retry_build_failures,
        source_key: new.source_key.as_str().to_string(),
        source_size: source.size as i64,
        certs_key: stored_certs,
        access_token_hash: ids::hash_secret(new.access_token),
        original_build_id: None,
    };
    // The sweep's age counts from the end of a write: a slow source stream makes its keys young again
    // before the insert claims them.
    let mut written = vec![new.source_key.as_str()];
    written.extend(row.certs_key.as_deref());
    let max_age = state.config.jobs.staging_max_age_secs;
    queue::refresh_slow_writes(&state.pool, &written, new.recorded, max_age).await?;
    if let Some(replay) = claim_idempotency_key(state, &new, &row).await? {
        return Ok(Created::Replayed(replay));
    }
    let build = match enqueue(state, &row, new.unlimited, unsettled).await {
        Ok(build) => build,
        Err(error) => {
            // Refused before the insert: the key is free again (unless the insert may have committed).
            if let (Some(key), false) = (new.idempotency_key, *unsettled) {
                let submitter = row.submitted_by.as_deref();
                let _ = queue::idempotency::release(&state.pool, submitter, key, &row.id).await;
            }
            return Err(error);
        }
    };
    if let Some((key, running)) = supersede
        && let Err(error) = queue::supersede::supersede(&state.pool, &build.id, &key, running, Utc::now(), actor).await
    {
        // The build is committed: answer with it (a retry without an Idempotency-Key would make a
        // second one); the older builds stay queued and the next submit with the key supersedes them.
        tracing::error!(build_id = %build.id, %error, "could not supersede older builds");
    }
    Ok(Created::New(Json(submitted(&build, new.access_token.to_string()))))
}

/// With an `Idempotency-Key`: claims it for this build, or answers as the earlier submit with that key
/// did (422 `idempotency_key_reused` for a different request, 409 while the first is still in flight).
async fn claim_idempotency_key(
    state: &AppState,
    new: &Creating<'_>,
    row: &NewBuild,
) -> ApiResult<Option<Json<Submitted>>> {
    let Some(key) = new.idempotency_key else {
        return Ok(None);
    };
    let requirements = row
        .requirements
        .as_ref()
        .map(|r| r.match_doc().to_string())
        .unwrap_or_default();
    let fingerprint = format!(
        "platform={};source_size={};requirements={requirements}",
        row.platform.as_str(),
        row.source_size
    );
    let claim = queue::idempotency::KeyClaim {
        submitter: row.submitted_by.as_deref(),
        key,
        fingerprint: &fingerprint,
        build_id: &row.id,
        access_token: new.access_token,
    };
    match queue::idempotency::claim(&state.pool, &state.secrets.certs_key, &claim).await? {
        queue::idempotency::Claimed::Fresh => Ok(None),
        queue::idempotency::Claimed::Replay { build, access_token } => Ok(Some(Json(submitted(&build, access_token)))),
        queue::idempotency::Claimed::Reused => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key already used for a different request",
        )
        .with_code("idempotency_key_reused")
        .with_field("code", "idempotency_key_reused")),
        queue::idempotency::Claimed::InFlight => Err(ApiError::new(
            StatusCode::CONFLICT,
            "A submit with this Idempotency-Key is still in progress",
        )
        .with_code("conflict")),
    }
}

/// Enqueues; this instance's next poll for the platform looks at the queue even before the
/// notification comes back from PostgreSQL. The insert also records a spare source key for a later
/// submit (queue::SpareKeys) and tells whether the queue is now full (queue::FullQueues).
async fn enqueue(state: &AppState, new: &NewBuild, unlimited: bool, unsettled: &mut bool) -> ApiResult<Build> {
    let spare = state
        .spare_sources
        .wanted()
        .then(ids::new_id)
        .and_then(|id| Key::source(&id).map(|key| (id, key)));
    let mut conn = state.pool.acquire().await?;
    let max_queued = state.config.queue.max_queued_builds;
    let started = std::time::Instant::now();
    let spare_key = spare.as_ref().map(|(_, key)| key.as_str());
    let key_quota = if unlimited { KeyQuota::None } else { KeyQuota::Maybe };
    match queue::enqueue_submit(&mut conn, new, max_queued, key_quota, spare_key, Utc::now()).await {
        Ok(inserted) => {
            state.full_queues.set(new.platform, inserted.at_limit);
            if let Some((id, _)) = spare {
                state.spare_sources.put(id, started);
            }
            state.wakeups.invalidate(new.platform);
            Ok(inserted.build)
        }
        Err(error) => {
            if matches!(error, queue::QueueError::QueueFull) {
                state.full_queues.set(new.platform, true);
            }
            *unsettled = error.outcome_unknown();
            Err(error.into())
        }
    }
}

/// 429 `submitter_queue_full` when the submitting key has max queued builds queued (before any body).
async fn submitter_room(state: &AppState, key_id: Option<&str>) -> ApiResult<()> {
    if queue::submitter_queue_full(&state.pool, key_id).await? {
        return Err(ApiError::submitter_queue_full());
    }
    Ok(())
}

/// The platform queues at their backpressure limit, counted (the instance's hint follows the count).
async fn full_queues(state: &AppState) -> ApiResult<Vec<Platform>> {
    let mut conn = state.pool.acquire().await?;
    let full = queue::full_queues(&mut conn, state.config.queue.max_queued_builds).await?;
    state.full_queues.counted(&full);
    Ok(full)
}

fn queue_full_error() -> ApiError {
    ApiError::from(queue::QueueError::QueueFull)
}

fn parse_run_at(value: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(raw) => DateTime::parse_from_rfc3339(raw)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| ApiError::bad_request("Invalid run_at: must be an RFC 3339 time")),
    }
}

/// B4 (owner: admin key or the build's token).
#[utoipa::path(get, path = "/api/builds/{id}/status", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "The build in the G0 vocabulary", body = BuildStatus),
    (status = 403, description = "`Invalid or expired build token` or `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody)))]
async fn status(OwnedBuild { build, .. }: OwnedBuild) -> ApiResult<Json<BuildStatus>> {
    Ok(Json(views::build_status(&build)))
}

/// B13: cancel; the body is ignored (the CLI sends an empty body with `Content-Type: application/json`).
#[utoipa::path(post, path = "/api/builds/{id}/cancel", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "Cancelled", body = Cancelled),
    (status = 400, description = "`Build already finished`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    OwnedBuild { build, actor, .. }: OwnedBuild,
) -> ApiResult<Json<Cancelled>> {
    let id = build.id;
    let outcome = queue::cancel(&state.pool, &id, Utc::now(), &actor).await?;
    state.attempt_changed(&id);
    if let Some(worker) = &outcome.interrupted_worker {
        tracing::info!(build_id = %id, worker_id = %worker, "held build cancelled; worker told at its next call");
    }
    Ok(Json(Cancelled {
        status: "cancelled".into(),
    }))
}

/// B14: a new build from the original's stored source (and certs while still held). With only the
/// build's token, the original must be finished and have no unfinished retry (R49); a full queue is
/// 503 (R58). Both are checked before the source is copied, and again when the retry is inserted.
#[utoipa::path(post, path = "/api/builds/{id}/retry", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "A new build from the original's source", body = Retried),
    (status = 400, description = "`Original build source no longer available. Please submit a new build.`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 429, description = "`Submitter queue limit reached` (`Retry-After`)", body = ErrorBody),
    (status = 503, description = "`Build queue is full`", body = ErrorBody)))]
async fn retry(
    State(state): State<AppState>,
    OwnedBuild {
        build: original,
        admin,
        actor,
    }: OwnedBuild,
) -> ApiResult<Json<Retried>> {
    let id = original.id.clone();
    let limited = (!admin).then_some(state.config.queue.max_retries_per_build);
    {
        let mut conn = state.pool.acquire().await?;
        queue::check_retry(&mut conn, &id, limited).await?;
    }
    submitter_room(&state, original.submitted_by.as_deref()).await?;
    if full_queues(&state).await?.contains(&original.platform()) {
        queue::count_refusal(original.platform());
        return Err(queue_full_error());
    }
    let gone = || ApiError::bad_request("Original build source no longer available. Please submit a new build.");
    let source = original.source_key.as_deref().and_then(Key::parse).ok_or_else(gone)?;
    let new_id = ids::new_id();
    let (Some(new_source), Some(new_certs)) = (Key::source(&new_id), Key::certs(&new_id)) else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "generated id {new_id} is not a valid key"
        )));
    };
    // Recorded before the copies: whatever this request leaves behind stays named (sweep_unlinked).
    let mut writes = vec![new_source.as_str()];
    if original.certs_key.is_some() {
        writes.push(new_certs.as_str());
    }
    queue::record_writes(&state.pool, &writes).await?;
    let written = [&new_source, &new_certs];
    let discard = || jobs::discard_unlinked(&state.pool, &state.storage, &written);
    if state.storage.copy(&source, &new_source).await.is_err() {
        discard().await;
        return Err(gone());
    }
    let mut certs_key = None;
    if let Some(old_certs) = original.certs_key.as_deref().and_then(Key::parse)
        && state.storage.copy(&old_certs, &new_certs).await.is_ok()
    {
        certs_key = Some(new_certs.as_str().to_string());
    }
    let access_token = ids::new_secret();
    let new = NewBuild {
        requirements: original
            .requirements
            .as_ref()
            .and_then(|r| queue::Requirements::parse(&r.0.to_string()).ok().flatten()),
        submitted_by: original.submitted_by.clone(),
        id: new_id.clone(),
        platform: original.platform(),
        priority: original.priority,
        max_attempts: original.max_attempts,
        run_at: None,
        retry_build_failures: original.retry_build_failures,
        source_key: new_source.as_str().to_string(),
        source_size: original.source_size.unwrap_or(0),
        certs_key,
        access_token_hash: ids::hash_secret(&access_token),
        original_build_id: Some(original.id.clone()),
    };
    let max_queued = state.config.queue.max_queued_builds;
    let build =
        match queue::enqueue_retry(&state.pool, &new, &original.id, limited, max_queued, Utc::now(), &actor).await {
            Ok(build) => build,
            // The insert may have committed with its answer lost: the row, if it exists, is the answer;
            // otherwise its objects are left to sweep_unlinked, never deleted here.
            Err(e) if e.outcome_unknown() => match queue::find_build(&state.pool, &new_id).await {
                Ok(Some(build)) => build,
                _ => return Err(e.into()),
            },
            Err(e) => {
                discard().await;
                return Err(e.into());
            }
        };
    Ok(Json(Retried {
        id: build.id,
        status: "pending".into(),
        submitted_at: build.submitted_at.timestamp_millis(),
        access_token,
        original_build_id: original.id,
    }))
}
