//! What the dashboard changes. Every action needs a session, a same-origin request and the session's
//! CSRF token, then calls the operation `/api/v2` calls (`api::operations`, `queue::operator`) and
//! redirects back with a notice (or the refusal, e.g. a build that is already finished).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};

use super::session::{self, Session};
use super::{PageResult, fail, params};
use crate::api::operations;
use crate::api::{ApiError, ApiResult, AppState, BodyBytes};
use crate::identity::Access;
use crate::ids::valid_id;
use crate::queue::Platform;
use crate::storage::Key;

/// Most builds one bulk action touches.
const MAX_BULK: usize = 100;

fn back(path: &str, outcome: Result<String, ApiError>) -> Response {
    let (name, text) = match outcome {
        Ok(notice) => ("notice", notice),
        Err(error) if error.status().is_server_error() => return super::pages::error_page(error),
        Err(error) => ("error", error.message().to_string()),
    };
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair(name, &text)
        .finish();
    let sep = if path.contains('?') { '&' } else { '?' };
    let location = format!("{path}{sep}{query}");
    if HeaderValue::from_str(&location).is_err() {
        // Never a panic (a 500) for a strange return path: back to the list.
        return Redirect::to("/dashboard/builds").into_response();
    }
    Redirect::to(&location).into_response()
}

/// Reads the form and checks origin and CSRF token; a refused request changes nothing.
fn checked_form(session: &Session, headers: &HeaderMap, body: &Bytes) -> Result<HashMap<String, String>, ApiError> {
    // Every dashboard action is an operator's; a viewer is refused whatever the page showed.
    session.may(Access::Operator)?;
    let form = params(std::str::from_utf8(body).ok());
    session::check_action(session, headers, form.get("csrf").map(String::as_str)).inspect_err(|_| {
        tracing::warn!("dashboard action refused: cross-site or missing CSRF token");
    })?;
    Ok(form)
}

/// [`checked_form`] for the admin's actions (keys).
pub(super) fn checked_admin_form(
    session: &Session,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<HashMap<String, String>, ApiError> {
    session.may(Access::Admin)?;
    checked_form(session, headers, body)
}

/// Revokes a key (the admin's): refused everywhere within 2 s, at once here.
pub async fn revoke_key(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    checked_admin_form(&session, &headers, &body).map_err(fail)?;
    let outcome = crate::ops::keys::revoke_key(&state.pool, &id, &session.actor())
        .await
        .map(|key| {
            state.keys.clear();
            format!("Key {} revoked", key.name)
        })
        .map_err(ApiError::from);
    Ok(back("/dashboard/keys", outcome))
}

/// Test, pause, resume or delete a webhook (the admin's).
pub async fn webhook_action(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    checked_admin_form(&session, &headers, &body).map_err(fail)?;
    let actor = session.actor();
    let pool = &state.pool;
    let active = |active| crate::webhooks::WebhookUpdate {
        active: Some(active),
        ..Default::default()
    };
    let allow_private = state.config.webhooks.webhook_allow_private;
    let outcome = match action.as_str() {
        "test" => crate::webhooks::test(pool, &id, &actor)
            .await
            .map(|d| format!("Test event queued (delivery {})", d.id)),
        "pause" => crate::webhooks::update(pool, allow_private, &id, &active(false), &actor)
            .await
            .map(|_| "Webhook paused".to_string()),
        "resume" => crate::webhooks::update(pool, allow_private, &id, &active(true), &actor)
            .await
            .map(|_| "Webhook resumed".to_string()),
        "delete" => crate::webhooks::delete(pool, &id, &actor)
            .await
            .map(|()| "Webhook deleted".to_string()),
        _ => return Err(fail(ApiError::not_found("Unknown action"))),
    };
    Ok(back("/dashboard/webhooks", outcome.map_err(ApiError::from)))
}

/// Sends a delivery again (same message id).
pub async fn redeliver(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    checked_admin_form(&session, &headers, &body).map_err(fail)?;
    let outcome = crate::webhooks::redeliver(&state.pool, &id, &session.actor())
        .await
        .map(|d| format!("Delivery {} queued again", d.id))
        .map_err(ApiError::from);
    Ok(back("/dashboard/webhooks", outcome))
}

/// One build action, as `/api/v2` does it (the queue layer emits the events).
async fn apply_to_build(
    state: &AppState,
    session: &Session,
    id: &str,
    action: &str,
    form: &HashMap<String, String>,
) -> ApiResult<String> {
    let actor = session.actor();
    let short = id.get(..10).unwrap_or(id);
    match action {
        "cancel" => {
            operations::cancel_build(&state.pool, id, &actor).await?;
            state.attempt_changed(id);
            Ok(format!("Build {short} cancelled"))
        }
        "retry" => {
            let build = operations::retry(&state.pool, id, &actor).await?;
            state.build_changed(&build, false);
            Ok(format!("Build {short} queued again"))
        }
        "requeue" => {
            let build = operations::requeue(&state.pool, id, false, &actor).await?;
            state.build_changed(&build, true);
            Ok(format!("Build {short} requeued"))
        }
        "requeue-drain" => {
            let build = operations::requeue(&state.pool, id, true, &actor).await?;
            state.build_changed(&build, true);
            Ok(format!("Build {short} requeued and its worker draining"))
        }
        "priority" => {
            let priority = form
                .get("priority")
                .and_then(|p| p.trim().parse::<i64>().ok())
                .filter(|p| (-100..=100).contains(p))
                .ok_or_else(|| ApiError::bad_request("Priority must be a whole number from -100 to 100"))?;
            let build = operations::patch(&state.pool, id, Some(priority), None, None, &actor).await?;
            state.build_changed(&build, false);
            Ok(format!("Priority of build {short} set to {priority}"))
        }
        _ => Err(ApiError::not_found("Unknown action")),
    }
}

pub async fn build_action(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    let form = checked_form(&session, &headers, &body).map_err(fail)?;
    if !valid_id(&id) {
        return Err(super::pages::not_found("Build not found"));
    }
    let outcome = apply_to_build(&state, &session, &id, &action, &form).await;
    Ok(back(&format!("/dashboard/builds/{id}"), outcome))
}

/// Cancel or retry the selected builds; reports how many did and did not apply.
pub async fn bulk(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    checked_form(&session, &headers, &body).map_err(fail)?;
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let value = |name: &str| pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let return_to = value("return")
        // Visible ASCII only (T15): a CR/LF here could not become a Location header.
        .filter(|r| r.starts_with("/dashboard/builds") && !r.contains("//") && !r.contains('\\'))
        .filter(|r| r.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("/dashboard/builds")
        .to_string();
    let action = match value("action") {
        Some(a @ ("cancel" | "retry")) => a.to_string(),
        _ => return Ok(back(&return_to, Err(ApiError::bad_request("Choose Cancel or Retry")))),
    };
    // "All matching the filter": the builds the list's filter (in the return path) finds, up to MAX_BULK.
    let matching: Vec<String> = if value("scope") == Some("matching") {
        let query = return_to.split_once('?').map_or("", |(_, q)| q);
        let filter = super::filter_of(&params(Some(query))).map_err(fail)?;
        let (rows, _) = super::queries::builds_up_to(&state.pool, &filter, chrono::Utc::now(), MAX_BULK as i64)
            .await
            .map_err(fail)?;
        rows.into_iter().map(|b| b.id).collect()
    } else {
        Vec::new()
    };
    let ids: Vec<&str> = if value("scope") == Some("matching") {
        matching.iter().map(String::as_str).collect()
    } else {
        pairs
            .iter()
            .filter(|(k, v)| k == "id" && valid_id(v))
            .map(|(_, v)| v.as_str())
            .take(MAX_BULK)
            .collect()
    };
    if ids.is_empty() {
        return Ok(back(
            &return_to,
            Err(ApiError::bad_request("Select at least one build")),
        ));
    }
    let (mut done, mut refused) = (0, 0);
    for id in &ids {
        match apply_to_build(&state, &session, id, &action, &HashMap::new()).await {
            Ok(_) => done += 1,
            Err(e) if e.status().is_server_error() => return Err(fail(e)),
            Err(_) => refused += 1,
        }
    }
    let verb = if action == "cancel" { "cancelled" } else { "retried" };
    let mut notice = format!("{done} build(s) {verb}");
    if refused > 0 {
        notice.push_str(&format!(", {refused} skipped (not in a state that allows it)"));
    }
    Ok(back(&return_to, Ok(notice)))
}

pub async fn worker_action(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    checked_form(&session, &headers, &body).map_err(fail)?;
    if !valid_id(&id) {
        return Err(super::pages::not_found("Worker not found"));
    }
    if action == "release" {
        let outcome = async {
            let worker = operations::release_worker(&state.pool, &id, &session.actor()).await?;
            state.worker_changed();
            let name = worker["name"].as_str().unwrap_or(&id).to_string();
            Ok(format!("Worker {name} released from quarantine"))
        }
        .await;
        return Ok(back("/dashboard/workers", outcome));
    }
    let (admin_state, verb) = match action.as_str() {
        "drain" => ("draining", "draining"),
        "disable" => ("disabled", "disabled"),
        "enable" => ("active", "enabled"),
        "revoke" => ("revoked", "revoked"),
        _ => return Err(super::pages::not_found("Unknown action")),
    };
    if admin_state == "revoked" {
        session.may(Access::Admin).map_err(fail)?;
    }
    let outcome = async {
        let worker =
            operations::set_worker_state(&state.pool, &state.config.queue, &id, admin_state, &session.actor()).await?;
        state.worker_changed();
        let name = worker["name"].as_str().unwrap_or(&id).to_string();
        Ok(format!("Worker {name} {verb}"))
    }
    .await;
    Ok(back("/dashboard/workers", outcome))
}

pub async fn queue_action(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    BodyBytes(body): BodyBytes,
) -> PageResult {
    checked_form(&session, &headers, &body).map_err(fail)?;
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return Err(super::pages::not_found("Unknown action")),
    };
    let Some(platform) = Platform::parse(&name) else {
        return Err(super::pages::not_found("Queue not found"));
    };
    let outcome = operations::set_paused(&state.pool, platform.as_str(), paused, &session.actor())
        .await
        .map(|_| {
            if !paused {
                state.queue_resumed(platform);
            }
            format!("Queue {name} {}", if paused { "paused" } else { "resumed" })
        })
        .map_err(ApiError::from);
    Ok(back("/dashboard/queues", outcome))
}

/// A build's source or result, streamed, for a signed-in operator.
pub async fn download(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Path((id, what)): Path<(String, String)>,
) -> PageResult {
    // Sources and results are not for viewers.
    session.may(Access::Operator).map_err(fail)?;
    if !valid_id(&id) {
        return Err(super::pages::not_found("Build not found"));
    }
    let build = crate::queue::find_build(&state.pool, &id)
        .await
        .map_err(fail)?
        .ok_or_else(|| super::pages::not_found("Build not found"))?;
    let (key, content_type, filename) = match what.as_str() {
        "source" => (build.source_key.as_deref(), "application/zip", format!("{id}.zip")),
        "result" => (
            build.result_key.as_deref(),
            "application/octet-stream",
            format!("{id}.{}", build.platform().result_extension()),
        ),
        _ => return Err(super::pages::not_found("Not found")),
    };
    let key = key
        .and_then(Key::parse)
        .ok_or_else(|| super::pages::not_found("Artifact not found"))?;
    crate::api::downloads::stream_object(&state, &key, &headers, content_type, &filename, || {
        ApiError::not_found("Artifact not found")
    })
    .await
    .map_err(fail)
}
