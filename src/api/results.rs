//! Build results: streamed to a staging object while the request arrives, moved into place and recorded
//! only if the caller still holds the attempt. A refused or failed completion leaves nothing stored.

use axum::extract::multipart::Field;
use chrono::Utc;

use super::AppState;
use super::auth::BuildCaller;
use super::error::{ApiError, ApiResult};
use crate::ids;
use crate::jobs::discard_unlinked;
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
///
/// The result's key is recorded as pending before the move and linked by the completion's own
/// transaction, so a kill or a failed delete never leaves an object that nothing names. When the
/// completion's outcome is unknown (its answer lost), the row is read again: the attempt completed
/// with this key is a success, and the object is never deleted while a row may name it.
pub async fn complete_with(
    state: &AppState,
    build_id: &str,
    caller: &BuildCaller,
    staged: StagedResult,
) -> Result<(), CompleteError> {
    let key = Key::result(build_id, &ids::new_id()).ok_or_else(|| CompleteError::Api(ApiError::build_not_found()))?;
    if let Err(e) = queue::record_writes(&state.pool, &[key.as_str()]).await {
        let _ = state.storage.delete(&staged.key).await;
        return Err(CompleteError::Api(e.into()));
    }
    if let Err(e) = state.storage.rename(&staged.key, &key).await {
        let _ = state.storage.delete(&staged.key).await;
        // The move may have copied before failing: the pending key covers that object.
        discard_unlinked(&state.pool, &state.storage, &[&key]).await;
        return Err(CompleteError::Api(e.into()));
    }
    let size = staged.stored.size as i64;
    let result = ResultFile {
        key: key.as_str().to_string(),
        size,
        sha256: staged.stored.sha256,
    };
    let error = match queue::complete(&state.pool, build_id, caller.holder(), &result, Utc::now()).await {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    if error.outcome_unknown() {
        return match queue::find_build(&state.pool, build_id).await {
            Ok(Some(build)) if build.result_key.as_deref() == Some(result.key.as_str()) => {
                tracing::warn!(build_id = %build_id, "completion committed although its answer was lost");
                Ok(())
            }
            _ => {
                tracing::warn!(build_id = %build_id, "completion outcome unknown; its result is left to sweep_unlinked");
                Err(CompleteError::Queue(error))
            }
        };
    }
    discard_unlinked(&state.pool, &state.storage, &[&key]).await;
    // The same attempt re-sending the same bytes after a lost answer: already stored, a success.
    if matches!(error, queue::QueueError::Stale)
        && let Ok(Some(build)) = queue::find_build(&state.pool, build_id).await
        && stored_by(&build, caller, &result)
    {
        return Ok(());
    }
    Err(CompleteError::Queue(error))
}

/// Whether `build` was completed by `caller`'s attempt with this very file (size and SHA-256).
fn stored_by(build: &queue::Build, caller: &BuildCaller, result: &ResultFile) -> bool {
    completed_by(build, caller)
        && build.result_size == Some(result.size)
        && build.result_sha256.as_deref() == Some(result.sha256.as_str())
}

/// Whether `build` was completed by `caller`'s attempt, the one that stored its result.
fn completed_by(build: &queue::Build, caller: &BuildCaller) -> bool {
    build.state() == queue::BuildState::Completed
        && build.worker_id.as_deref() == Some(caller.worker_id.as_str())
        && build.result_attempt == Some(build.attempt)
}

/// Whether a caller whose hold is stale may still send its file: only the attempt that completed the
/// build (a re-send after a lost answer, compared by size and SHA-256 once staged). Every other stale
/// caller is refused before its file is read (T9).
pub async fn resend_of_stored(state: &AppState, build_id: &str, caller: &BuildCaller) -> bool {
    matches!(queue::find_build(&state.pool, build_id).await, Ok(Some(build)) if completed_by(&build, caller))
}
