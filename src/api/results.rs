//! Build results: recorded only if the caller still holds the attempt; a refused or failed completion
//! leaves nothing stored. When the build (and the caller's hold) is known before the file arrives — the
//! form's `build_id` comes first, or the build is in the path — the file streams straight to its final
//! key, recorded as a pending write first ([`stream_direct`]). Otherwise it streams to a staging object
//! and is moved into place once the build is known ([`stage`]); on S3 that move is a server-side copy.

use axum::extract::multipart::Field;
use chrono::Utc;

use super::AppState;
use super::auth::BuildCaller;
use super::error::{ApiError, ApiResult};
use crate::ids;
use crate::jobs::discard_unlinked;
use crate::queue::{self, ResultFile};
use crate::storage::{Key, Stored, WriteError};

/// A result stored but not yet attached to a build: in staging, or already at its final key.
pub struct StagedResult {
    key: Key,
    stored: Stored,
    /// `key` is the final key, recorded in `pending_writes` before its first byte was written.
    direct: bool,
    /// The build whose hold was checked before the body, for a loose result key (which names no build):
    /// only that build's completion links it.
    checked_for: Option<String>,
}

impl StagedResult {
    /// Marks a result streamed after `build_id`'s hold was checked (see [`StagedResult::checked_for`]).
    pub fn checked_for(mut self, build_id: &str) -> Self {
        self.checked_for = Some(build_id.to_string());
        self
    }
}

fn too_large(e: WriteError) -> ApiError {
    match e {
        WriteError::TooLarge(_) => ApiError::too_large("Result file too large"),
        other => other.into(),
    }
}

/// Streams a file part to a fresh staging key (413 `Result file too large` past the limit).
pub async fn stage(state: &AppState, field: Field<'_>) -> ApiResult<StagedResult> {
    let key = Key::staging(&ids::new_id()).ok_or_else(|| ApiError::internal(anyhow::anyhow!("staging key")))?;
    let stored = state
        .storage
        .write_stream(&key, field, state.config.max_result_bytes)
        .await
        .map_err(too_large)?;
    Ok(StagedResult {
        key,
        stored,
        direct: false,
        checked_for: None,
    })
}

/// Streams a file part straight to a fresh result key of `build_id` (no staging, no copy), for a
/// caller already found to hold the build. The key is recorded as a pending write before the first
/// byte, so whatever a kill leaves behind is named and `sweep_unlinked` settles it; a failed write is
/// aborted by the store and its key discarded here. Nothing names the object until the completion
/// links it, so a half-written or refused upload is never visible.
pub async fn stream_direct(state: &AppState, build_id: &str, field: Field<'_>) -> ApiResult<StagedResult> {
    let key = result_key(build_id)?;
    queue::record_writes(&state.pool, &[key.as_str()]).await?;
    stream_to(state, key, field).await
}

/// For a caller this instance handed `build_id` moments ago and who holds it in that row
/// ([`crate::api::worker_cache::WorkerCache::handed`]): a loose result key recorded as a pending write
/// by an earlier completion ([`queue::SpareKeys`]), if one is young enough. `None`: check in the database.
pub fn spare_for_handed(state: &AppState, build_id: &str, caller: &BuildCaller) -> Option<Key> {
    state
        .workers
        .handed(&caller.worker_id, build_id)
        .filter(|b| caller.holds(b))?;
    let max_age = std::time::Duration::from_secs(state.config.jobs.staging_max_age_secs / 4);
    let (upload_id, _) = state.spare_results.take(max_age)?;
    Key::loose_result(&upload_id)
}

/// A fresh result key of `build_id` (a new upload id: a late or stale upload never overwrites).
pub fn result_key(build_id: &str) -> ApiResult<Key> {
    Key::result(build_id, &ids::new_id()).ok_or_else(ApiError::build_not_found)
}

/// For the VM's artifact (the build is the path's): records a fresh result key only if `caller` holds
/// the build (one statement), then streams straight to it. The attempt that already stored its result
/// re-sending it after a lost answer is staged, so that the completion compares the bytes; anyone else is
/// refused before a byte of the file is read.
pub async fn stream_held(
    state: &AppState,
    build_id: &str,
    caller: &BuildCaller,
    field: Field<'_>,
) -> ApiResult<StagedResult> {
    let key = result_key(build_id)?;
    match queue::record_held_write(&state.pool, build_id, caller.holder(), key.as_str()).await {
        Ok(()) => stream_to(state, key, field).await,
        Err(queue::QueueError::Stale) if resend_of_stored(state, build_id, caller).await => stage(state, field).await,
        Err(e) => Err(e.into()),
    }
}

/// [`stream_direct`] to a result `key` recorded as a pending write just before (e.g. by
/// [`queue::record_held_write`] together with the hold check). The sweep's age cut-off counts from the
/// end of a write, so the key is kept young while the file streams (a slow upload longer than
/// `CONTROLLER_STAGING_MAX_AGE_SECS` is not doomed under it) and once more when it is complete, if the
/// write was slow ([`queue::refresh_slow_writes`]).
pub async fn stream_to(state: &AppState, key: Key, field: Field<'_>) -> ApiResult<StagedResult> {
    let started = std::time::Instant::now();
    let keeper = keep_young(state, &key);
    let written = state
        .storage
        .write_stream(&key, field, state.config.max_result_bytes)
        .await;
    keeper.abort();
    let max_age = state.config.jobs.staging_max_age_secs;
    let refreshed = match &written {
        Ok(_) => queue::refresh_slow_writes(&state.pool, &[key.as_str()], started, max_age)
            .await
            .map_err(ApiError::from),
        Err(_) => Ok(()),
    };
    match (written, refreshed) {
        (Ok(stored), Ok(())) => Ok(StagedResult {
            key,
            stored,
            direct: true,
            checked_for: None,
        }),
        (Ok(_), Err(e)) => {
            discard_direct(state, &key).await;
            Err(e)
        }
        (Err(e), _) => {
            discard_unlinked(&state.pool, &state.storage, &[&key]).await;
            Err(too_large(e))
        }
    }
}

/// Refreshes `key`'s pending-write age every half staging cut-off while its write runs.
fn keep_young(state: &AppState, key: &Key) -> tokio::task::JoinHandle<()> {
    let (pool, key) = (state.pool.clone(), key.as_str().to_string());
    let every = std::time::Duration::from_secs((state.config.jobs.staging_max_age_secs / 2).max(1));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if let Err(error) = queue::refresh_writes(&pool, &[key.as_str()]).await {
                tracing::warn!(%error, "could not keep a streaming result's pending key young");
            }
        }
    })
}

/// Deletes a result that was not used (no row names it: the report was refused or never made).
pub async fn discard(state: &AppState, staged: Option<StagedResult>) {
    if let Some(staged) = staged {
        if staged.direct {
            discard_direct(state, &staged.key).await;
        } else {
            let _ = state.storage.delete(&staged.key).await;
        }
    }
}

/// Deletes a result written straight to its final key after a definite refusal, and settles its
/// pending key. The key is this request's own (a fresh upload id) and no row names it, so the object
/// is deleted even when a sweep already doomed or forgot its key (a write that outlived the staging
/// cut-off, whose object the sweep could not see yet).
async fn discard_direct(state: &AppState, key: &Key) {
    discard_unlinked(&state.pool, &state.storage, &[key]).await;
    if let Err(error) = state.storage.delete(key).await {
        // The sweep may already have forgotten the key: name it again, doomed, so sweep_unlinked retries.
        if let Err(e) = queue::doom_forgotten_write(&state.pool, key.as_str()).await {
            tracing::error!(key = %key.as_str(), error = %e, "could not record a refused result for deletion");
        }
        tracing::warn!(key = %key.as_str(), %error, "could not delete a refused result; sweep_unlinked retries");
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

/// Moves the staged result under the build (unless it was written there directly) and completes the
/// caller's attempt with it.
///
/// The result's key is recorded as pending before the move (or the direct write) and linked by the completion's own
/// transaction, so a kill or a failed delete never leaves an object that nothing names. When the
/// completion's outcome is unknown (its answer lost), the row is read again: the attempt completed
/// with this key is a success, and the object is never deleted while a row may name it.
pub async fn complete_with(
    state: &AppState,
    build_id: &str,
    caller: &BuildCaller,
    staged: StagedResult,
) -> Result<(), CompleteError> {
    let key = if staged.direct {
        // A loose result (a spare key) belongs to no build until this completion links it, and only the
        // completion of the build whose hold was checked before its body may.
        let foreign = if staged.key.is_loose_result() {
            staged.checked_for.as_deref() != Some(build_id)
        } else {
            Key::result(build_id, "x").is_none_or(|k| !same_build(&k, &staged.key))
        };
        if foreign {
            // Written for another build: never linked here.
            discard_direct(state, &staged.key).await;
            return Err(CompleteError::Api(ApiError::build_not_found()));
        }
        staged.key
    } else {
        let key =
            Key::result(build_id, &ids::new_id()).ok_or_else(|| CompleteError::Api(ApiError::build_not_found()))?;
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
        key
    };
    let size = staged.stored.size as i64;
    let result = ResultFile {
        key: key.as_str().to_string(),
        size,
        sha256: staged.stored.sha256,
    };
    // The completion records a loose result key for a later upload to this instance (queue::SpareKeys).
    let spare = state
        .spare_results
        .wanted()
        .then(ids::new_id)
        .and_then(|id| Key::loose_result(&id).map(|key| (id, key)));
    let spare_key = spare.as_ref().map(|(_, key)| key.as_str());
    let started = std::time::Instant::now();
    let error =
        match queue::complete_recording(&state.pool, build_id, caller.holder(), &result, spare_key, Utc::now()).await {
            Ok(_) => {
                if let Some((id, _)) = spare {
                    state.spare_results.put(id, started);
                }
                return Ok(());
            }
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
    if staged.direct {
        discard_direct(state, &key).await;
    } else {
        discard_unlinked(&state.pool, &state.storage, &[&key]).await;
    }
    // The same attempt re-sending the same bytes after a lost answer: already stored, a success.
    if matches!(error, queue::QueueError::Stale)
        && let Ok(Some(build)) = queue::find_build(&state.pool, build_id).await
        && stored_by(&build, caller, &result)
    {
        return Ok(());
    }
    Err(CompleteError::Queue(error))
}

/// Whether two keys lie under the same build.
fn same_build(a: &Key, b: &Key) -> bool {
    a.as_str().rsplit_once('/').map(|(dir, _)| dir) == b.as_str().rsplit_once('/').map(|(dir, _)| dir)
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
