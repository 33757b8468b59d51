//! Build results: streamed to a staging object while the request arrives, moved into place and recorded
//! only if the caller still holds the attempt. A refused or failed completion leaves nothing stored.

use axum::extract::multipart::Field;
use chrono::Utc;

use super::AppState;
use super::auth::BuildCaller;
use super::error::{ApiError, ApiResult};
use crate::ids;
use crate::queue::{self, ResultFile};
use crate::storage::{Key, Stored, WriteError};

/// A result streamed to staging, not yet attached to a build.
pub struct StagedResult {
    key: Key,
    stored: Stored,
}

/// Streams a file part to a fresh staging key (413 `Result file too large` past the limit).
pub async fn stage(state: &AppState, field: Field<'_>) -> ApiResult<StagedResult> {
    let key = Key::staging(&ids::new_id()).ok_or_else(|| ApiError::internal(anyhow::anyhow!("staging key")))?;
    let stored = state
        .storage
        .write_stream(&key, field, state.config.max_result_bytes)
        .await
        .map_err(|e| match e {
            WriteError::TooLarge(_) => ApiError::too_large("Result file too large"),
            other => other.into(),
        })?;
    Ok(StagedResult { key, stored })
}

/// Deletes a staged result that was not used.
pub async fn discard(state: &AppState, staged: Option<StagedResult>) {
    if let Some(staged) = staged {
        let _ = state.storage.delete(&staged.key).await;
    }
}

/// Why a completion did not happen.
pub enum CompleteError {
    /// The queue refused it (the caller may explain it better).
    Queue(queue::QueueError),
    Api(ApiError),
}

impl From<CompleteError> for ApiError {
    fn from(error: CompleteError) -> Self {
        match error {
            CompleteError::Queue(e) => e.into(),
            CompleteError::Api(e) => e,
        }
    }
}

/// Moves the staged result under the build and completes the caller's attempt with it.
pub async fn complete_with(
    state: &AppState,
    build_id: &str,
    caller: &BuildCaller,
    staged: StagedResult,
) -> Result<(), CompleteError> {
    let key = Key::result(build_id, &ids::new_id()).ok_or_else(|| CompleteError::Api(ApiError::build_not_found()))?;
    if let Err(e) = state.storage.rename(&staged.key, &key).await {
        let _ = state.storage.delete(&staged.key).await;
        return Err(CompleteError::Api(e.into()));
    }
    let size = staged.stored.size as i64;
    let result = ResultFile {
        key: key.as_str().to_string(),
        size,
        sha256: staged.stored.sha256,
    };
    if let Err(e) = queue::complete(&state.pool, build_id, caller.holder(), &result, Utc::now()).await {
        let _ = state.storage.delete(&key).await;
        return Err(CompleteError::Queue(e));
    }
    Ok(())
}
