//! Build endpoints for submitters and the workers that run them: submit, status, source.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::auth;
use super::error::{ApiError, ApiResult};
use super::extract::{IdPath, QueryParams, bounded_int};
use super::multipart::{MultipartBody, Parts, read_limited, read_text, require_multipart};
use super::{AppState, views};
use crate::ids;
use crate::queue::{self, NewBuild, Platform};
use crate::storage::{Key, WriteError, certs};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/builds/submit", post(submit_g0).layer(DefaultBodyLimit::disable()))
        .route("/api/builds", post(submit_created).layer(DefaultBodyLimit::disable()))
        .route("/api/builds/{id}/status", get(status))
        .route("/api/builds/{id}/source", get(source))
}

/// B1: 200 with the new build.
async fn submit_g0(state: State<AppState>, headers: HeaderMap, multipart: MultipartBody) -> ApiResult<Json<Value>> {
    submit(state, headers, multipart).await
}

/// B1 alias `POST /api/builds`: 201 with the same body.
async fn submit_created(
    state: State<AppState>,
    headers: HeaderMap,
    multipart: MultipartBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    Ok((StatusCode::CREATED, submit(state, headers, multipart).await?))
}

/// What a submit form carried besides the source.
#[derive(Default)]
struct SubmitForm {
    source: Option<crate::storage::Stored>,
    certs: Option<Bytes>,
    profile: Option<Bytes>,
    platform: Option<String>,
    priority: Option<String>,
    max_attempts: Option<String>,
    run_at: Option<String>,
}

async fn submit(State(state): State<AppState>, headers: HeaderMap, body: MultipartBody) -> ApiResult<Json<Value>> {
    auth::require_admin(&state, &headers)?;
    let multipart = require_multipart(body)?;
    let build_id = ids::new_id();
    let source_key = Key::source(&build_id).ok_or_else(|| ApiError::internal(anyhow::anyhow!("id")))?;
    let certs_key = Key::certs(&build_id).ok_or_else(|| ApiError::internal(anyhow::anyhow!("id")))?;
    let mut form = SubmitForm::default();
    let outcome = match read_submit_form(&state, multipart, &source_key, &mut form).await {
        Ok(()) => create_build(&state, &build_id, &source_key, &certs_key, form).await,
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        // Nothing is left behind: no row (never inserted) and no file.
        let _ = state.storage.delete(&source_key).await;
        let _ = state.storage.delete(&certs_key).await;
    }
    outcome
}

async fn read_submit_form(
    state: &AppState,
    multipart: Multipart,
    source_key: &Key,
    form: &mut SubmitForm,
) -> ApiResult<()> {
    let limits = &state.config;
    let mut parts = Parts::new(multipart);
    while let Some(field) = parts.next().await? {
        match field.name().unwrap_or_default() {
            "source" if form.source.is_none() => {
                let stored = state
                    .storage
                    .write_stream(source_key, field, limits.max_source_bytes)
                    .await
                    .map_err(|e| match e {
                        WriteError::TooLarge(_) => ApiError::too_large("Source file too large"),
                        other => other.into(),
                    })?;
                form.source = Some(stored);
            }
            "certs" => form.certs = Some(read_limited(field, limits.max_certs_bytes, "Certs file too large").await?),
            "profile" => {
                form.profile = Some(read_limited(field, limits.max_certs_bytes, "Certs file too large").await?)
            }
            "platform" => form.platform = Some(read_text(field).await?),
            "priority" => form.priority = Some(read_text(field).await?),
            "max_attempts" => form.max_attempts = Some(read_text(field).await?),
            "run_at" => form.run_at = Some(read_text(field).await?),
            // appleId / applePassword and unknown parts are read and dropped: never stored in clear.
            _ => {}
        }
    }
    Ok(())
}

async fn create_build(
    state: &AppState,
    build_id: &str,
    source_key: &Key,
    certs_key: &Key,
    form: SubmitForm,
) -> ApiResult<Json<Value>> {
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
    let stored_certs = match (form.certs, form.profile) {
        (None, None) => None,
        (certs, profile) => {
            let bundle = certs_bundle(certs, profile);
            state
                .storage
                .put(
                    certs_key,
                    Bytes::from(certs::encrypt(&state.secrets.certs_key, &bundle)),
                )
                .await?;
            Some(certs_key.as_str().to_string())
        }
    };
    let access_token = ids::new_secret();
    let new = NewBuild {
        id: build_id.to_string(),
        platform,
        priority,
        max_attempts,
        run_at,
        retry_build_failures: state.config.queue.retry_build_failures,
        source_key: source_key.as_str().to_string(),
        source_size: source.size as i64,
        certs_key: stored_certs,
        access_token_hash: ids::hash_secret(&access_token),
        original_build_id: None,
    };
    let mut tx = state.pool.begin().await?;
    let build = queue::enqueue(&mut tx, &new, Utc::now()).await?;
    tx.commit().await?;
    Ok(Json(json!({
        "id": build.id,
        "status": "pending",
        "submitted_at": build.submitted_at.timestamp_millis(),
        "access_token": access_token,
    })))
}

/// The plaintext certs bundle kept (encrypted) for the build: the uploaded bundle, with a separate
/// provisioning profile appended as a length-prefixed section.
fn certs_bundle(certs: Option<Bytes>, profile: Option<Bytes>) -> Vec<u8> {
    let mut bundle = Vec::new();
    for part in [certs, profile] {
        let part = part.unwrap_or_default();
        bundle.extend_from_slice(&(part.len() as u64).to_be_bytes());
        bundle.extend_from_slice(&part);
    }
    bundle
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
async fn status(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    auth::require_owner_credential(&headers)?;
    let build = queue::find_build(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    auth::require_owner(&state, &headers, &build)?;
    Ok(Json(views::build_status(&build)))
}

/// B8: the source archive, only for the holder of the current attempt.
async fn source(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(query): QueryParams<WorkerQuery>,
) -> ApiResult<Response> {
    let caller = auth::build_caller(&state, &headers, &id, query.worker_id.as_deref()).await?;
    let build = queue::find_build(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    if !caller.holds(&build) {
        return Err(ApiError::not_authorized_for_build());
    }
    let key = build
        .source_key
        .as_deref()
        .and_then(Key::parse)
        .ok_or_else(|| ApiError::not_found("Source not found"))?;
    stream_object(&state, &key, "application/zip", &format!("{id}.zip")).await
}

/// `?worker_id=` on build-scoped worker endpoints.
#[derive(serde::Deserialize)]
pub(super) struct WorkerQuery {
    pub worker_id: Option<String>,
}

/// Streams a stored object as an attachment.
pub(super) async fn stream_object(
    state: &AppState,
    key: &Key,
    content_type: &'static str,
    filename: &str,
) -> ApiResult<Response> {
    let object = match state.storage.get(key, None).await {
        Ok(object) => object,
        Err(object_store::Error::NotFound { .. }) => return Err(ApiError::not_found("Build result not found")),
        Err(e) => return Err(e.into()),
    };
    let length = object.meta.size;
    let body = Body::from_stream(object.into_stream().map(|chunk| {
        chunk.map_err(|e| {
            tracing::warn!(error = %e, "download stream failed; closing connection");
            std::io::Error::other("storage read failed")
        })
    }));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
