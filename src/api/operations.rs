//! Operator operations shared by the `/api/v2` handlers and the `expo-controller` CLI's database
//! mode, so both give the same JSON and the same errors.

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::error::{ApiError, ApiResult};
use super::v2_views as views;
use crate::config::QueueConfig;
use crate::queue::operator::{self, WrongState};
use crate::queue::{self, BuildFilter, Platform};

fn conflict(wrong: WrongState) -> ApiError {
    ApiError::conflict(wrong.0)
}

/// A page of builds, newest first: `{"items", "next_cursor"}`.
pub async fn list_builds(pool: &PgPool, mut filter: BuildFilter) -> ApiResult<Value> {
    let limit = filter.limit;
    filter.limit = limit + 1;
    let mut builds = queue::list_builds(pool, &filter).await?;
    let more = builds.len() as i64 > limit;
    builds.truncate(limit as usize);
    let next_cursor = if more {
        builds.last().map(|b| b.id.clone())
    } else {
        None
    };
    Ok(json!({ "items": builds.iter().map(views::build).collect::<Vec<_>>(), "next_cursor": next_cursor }))
}

/// One build with its attempts.
pub async fn show_build(pool: &PgPool, id: &str) -> ApiResult<Value> {
    let build = queue::find_build(pool, id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    let attempts = operator::attempts_of(pool, id).await?;
    let mut body = views::build(&build);
    body["attempts"] = json!(attempts.iter().map(views::attempt).collect::<Vec<_>>());
    Ok(body)
}

pub async fn cancel_build(pool: &PgPool, id: &str) -> ApiResult<Value> {
    let outcome = queue::cancel(pool, id, Utc::now()).await.map_err(|e| match e {
        queue::QueueError::AlreadyFinished => ApiError::conflict("Build already finished"),
        other => other.into(),
    })?;
    Ok(views::build(&outcome.build))
}

pub async fn retry_build(pool: &PgPool, id: &str) -> ApiResult<Value> {
    let build = operator::retry_same(pool, id, Utc::now()).await?.map_err(conflict)?;
    Ok(views::build(&build))
}

pub async fn requeue_build(pool: &PgPool, id: &str, drain: bool) -> ApiResult<Value> {
    let build = operator::requeue(pool, id, drain, Utc::now())
        .await?
        .map_err(conflict)?;
    Ok(views::build(&build))
}

pub async fn set_paused(pool: &PgPool, name: &str, paused: bool) -> ApiResult<Value> {
    let platform = Platform::parse(name).ok_or_else(|| ApiError::not_found("Queue not found"))?;
    operator::set_paused(pool, platform, paused, Utc::now()).await?;
    Ok(json!({ "name": name, "paused": paused }))
}

/// A page of workers by id: `{"items", "next_cursor"}`.
pub async fn list_workers(pool: &PgPool, cursor: Option<&str>, limit: i64) -> ApiResult<Value> {
    let mut workers = operator::list_workers(pool, cursor, limit + 1).await?;
    let more = workers.len() as i64 > limit;
    workers.truncate(limit as usize);
    let next_cursor = if more {
        workers.last().map(|w| w.id.clone())
    } else {
        None
    };
    Ok(json!({ "items": workers.iter().map(views::worker).collect::<Vec<_>>(), "next_cursor": next_cursor }))
}

/// Sets a worker's operator state (`active`, `draining`, `disabled`, `revoked`).
pub async fn set_worker_state(
    pool: &PgPool,
    settings: &QueueConfig,
    id: &str,
    state: &'static str,
) -> ApiResult<Value> {
    let worker = operator::set_worker_state(pool, id, state, settings, Utc::now()).await?;
    Ok(views::worker(&worker))
}
