//! Worker endpoints: register, poll, upload.

use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{self, WORKER_TOKEN, header};
use super::error::{ApiError, ApiResult};
use super::extract::{JsonBody, QueryParams, bounded_int};
use super::multipart::{MultipartBody, Parts, read_text, require_multipart};
use super::{AppState, views};
use crate::ids;
use crate::queue::{self, Failure, FailureKind, Platform, RegisterRequest, ResultFile, Worker};
use crate::storage::Key;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/workers/register", post(register))
        .route("/api/workers/poll", get(poll))
        .route("/api/workers/upload", post(upload).layer(DefaultBodyLimit::disable()))
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
    let (Some(name), Some(capabilities)) = (
        body.name.filter(|n| !n.trim().is_empty()),
        body.capabilities.filter(|c| !c.is_null()),
    ) else {
        return Err(ApiError::bad_request("Name and capabilities required"));
    };
    let id = auth::worker_id(body.id.as_deref())?;
    let request = RegisterRequest {
        id,
        name,
        platforms: platforms_of(&capabilities),
        capabilities,
        caller_worker,
    };
    let registration = queue::register(&state.pool, &request, &state.config.queue, Utc::now()).await?;
    Ok(Json(json!({
        "id": registration.worker.id,
        "status": if registration.reregistered { "re-registered" } else { "registered" },
        "access_token": registration.token,
        "baseImageId": state.config.base_image_id,
    })))
}

/// `capabilities.platforms`; absent or without a known platform means both.
fn platforms_of(capabilities: &Value) -> Vec<Platform> {
    let listed: Vec<Platform> = capabilities
        .get("platforms")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|p| p.as_str().and_then(Platform::parse))
                .collect()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        Platform::ALL.to_vec()
    } else {
        listed
    }
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
    bounded_int(query.wait.as_deref(), "wait", 0, 60)?;
    let now = Utc::now();
    queue::touch_worker(&state.pool, &worker, &state.config.queue, now).await?;
    let claim = queue::claim(&state.pool, &worker, &state.config.queue, now).await?;
    let mut answer = json!({ "job": claim.as_ref().map(|c| views::job(c, &state.config.base_image_id)) });
    if let Some(token) = token {
        answer["access_token"] = json!(token);
    }
    Ok(Json(answer))
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
    let worker = queue::find_worker(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    Ok((worker, None))
}

/// The parts of an upload form.
#[derive(Default)]
struct UploadForm {
    build_id: Option<String>,
    worker_id: Option<String>,
    success: Option<String>,
    error_message: Option<String>,
    /// The result, streamed to a staging key, with its size and digest.
    staged: Option<(Key, crate::storage::Stored)>,
}

/// B17: the holder of the current attempt reports success (with the result) or failure.
async fn upload(State(state): State<AppState>, headers: HeaderMap, body: MultipartBody) -> ApiResult<Json<Value>> {
    // Reject callers without any credential before accepting a byte of the body.
    if header(&headers, auth::VM_TOKEN).is_none() && header(&headers, WORKER_TOKEN).is_none() {
        auth::require_admin(&state, &headers)?;
    }
    let multipart = require_multipart(body)?;
    let mut form = UploadForm::default();
    let outcome = match read_upload_form(&state, multipart, &mut form).await {
        Ok(()) => finish_upload(&state, &headers, &form).await,
        Err(e) => Err(e),
    };
    if let Some((staging, _)) = &form.staged {
        // Only reached when the result was not moved into place.
        let _ = state.storage.delete(staging).await;
    }
    outcome
}

async fn read_upload_form(state: &AppState, multipart: Multipart, form: &mut UploadForm) -> ApiResult<()> {
    let mut parts = Parts::new(multipart);
    while let Some(field) = parts.next().await? {
        match field.name().unwrap_or_default() {
            "build_id" => form.build_id = Some(read_text(field).await?),
            "worker_id" => form.worker_id = Some(read_text(field).await?),
            "success" => form.success = Some(read_text(field).await?),
            "error_message" => form.error_message = Some(read_text(field).await?),
            "result" if form.staged.is_none() => {
                let key =
                    Key::staging(&ids::new_id()).ok_or_else(|| ApiError::internal(anyhow::anyhow!("staging key")))?;
                let stored = state
                    .storage
                    .write_stream(&key, field, state.config.max_result_bytes)
                    .await
                    .map_err(|e| match e {
                        crate::storage::WriteError::TooLarge(_) => ApiError::too_large("Result file too large"),
                        other => other.into(),
                    })?;
                form.staged = Some((key, stored));
            }
            _ => {}
        }
    }
    Ok(())
}

async fn finish_upload(state: &AppState, headers: &HeaderMap, form: &UploadForm) -> ApiResult<Json<Value>> {
    let build_id = form.build_id.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let field_worker = form.worker_id.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let has_token = header(headers, auth::VM_TOKEN).is_some() || header(headers, WORKER_TOKEN).is_some();
    let (Some(build_id), true) = (build_id, field_worker.is_some() || has_token) else {
        return Err(ApiError::bad_request("build_id and worker_id required"));
    };
    if !ids::valid_id(build_id) {
        return Err(ApiError::bad_request("Invalid id"));
    }
    let caller = auth::build_caller(state, headers, build_id, field_worker).await?;
    let build = queue::find_build(&state.pool, build_id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    if queue::find_worker(&state.pool, &caller.worker_id).await?.is_none() {
        return Err(ApiError::worker_not_found());
    }
    let now = Utc::now();
    if form.success.as_deref().map(str::trim) != Some("true") {
        let message = form
            .error_message
            .clone()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| "Build failed".to_string());
        let failure = Failure {
            kind: FailureKind::Build,
            message,
        };
        queue::fail(
            &state.pool,
            build_id,
            caller.holder(),
            &failure,
            &state.config.queue,
            now,
        )
        .await?;
        return Ok(Json(json!({ "status": "failed" })));
    }
    let Some((staging, stored)) = &form.staged else {
        return no_file_success(&build, &caller);
    };
    let upload_id = ids::new_id();
    let key = Key::result(build_id, &upload_id).ok_or_else(ApiError::build_not_found)?;
    state.storage.rename(staging, &key).await?;
    let result = ResultFile {
        key: key.as_str().to_string(),
        size: stored.size as i64,
        sha256: stored.sha256.clone(),
    };
    if let Err(e) = queue::complete(&state.pool, build_id, caller.holder(), &result, now).await {
        let _ = state.storage.delete(&key).await;
        return Err(e.into());
    }
    Ok(Json(json!({ "status": "success" })))
}

/// A success report without a file: a no-op when this caller's attempt already stored the artifact.
fn no_file_success(build: &queue::Build, caller: &auth::BuildCaller) -> ApiResult<Json<Value>> {
    let completed_by_caller = build.state() == queue::BuildState::Completed
        && build.result_key.is_some()
        && build.worker_id.as_deref() == Some(caller.worker_id.as_str());
    if completed_by_caller {
        return Ok(Json(json!({ "status": "success" })));
    }
    if build.state().is_final() {
        return Err(ApiError::attempt_not_active());
    }
    if !caller.holds(build) {
        return Err(ApiError::not_authorized_for_build());
    }
    Err(ApiError::bad_request("Missing result file"))
}
