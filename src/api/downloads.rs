//! Streaming downloads, shared by the owner downloads (`submitter::downloads`, with `Range`), the
//! worker's source and certs (`worker::files`) and the dashboard. Bodies stream from storage; a storage error mid-stream is logged and the
//! connection closed cleanly (R38).

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::error::{ApiError, ApiResult};
use super::{AppState, auth};
use crate::queue::Build;
use crate::storage::{Key, ObjectRead};

/// With `CONTROLLER_PRESIGN_DOWNLOADS=true` on an S3 store: a `302` to a short-lived presigned GET URL,
/// so the bytes bypass the controller. Only the owner downloads (B7) redirect: the CLI follows redirects
/// and needs none of our headers; worker endpoints always stream.
pub(crate) async fn presigned_redirect(state: &AppState, key: &Key) -> ApiResult<Option<Response>> {
    let settings = &state.config.storage;
    if !settings.presign_downloads {
        return Ok(None);
    }
    let ttl = std::time::Duration::from_secs(settings.effective_presign_ttl_secs());
    let Some(url) = state.storage.presigned_get(key, ttl).await? else {
        return Ok(None);
    };
    let location = HeaderValue::from_str(&url).map_err(ApiError::internal)?;
    let mut response = StatusCode::FOUND.into_response();
    response.headers_mut().insert(header::LOCATION, location);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(Some(response))
}

/// Streams a build's source archive as `<id>.zip`.
pub(crate) async fn stream_source(state: &AppState, headers: &HeaderMap, build: &Build) -> ApiResult<Response> {
    let not_found = || ApiError::not_found("Build source not found");
    let key = build.source_key.as_deref().and_then(Key::parse).ok_or_else(not_found)?;
    let filename = format!("{}.zip", build.id);
    stream_object(state, &key, headers, "application/zip", &filename, not_found).await
}

pub(crate) fn set_attachment(headers: &mut HeaderMap, content_type: &'static str, filename: &str) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
}

/// A single byte range requested with `Range: bytes=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `start..end` (end exclusive), already clamped to the object.
    Satisfiable(u64, u64),
    Unsatisfiable,
}

/// Parses a `Range` header against an object of `size` bytes; `None` means "serve everything"
/// (absent, malformed or multi-range headers, which RFC 9110 lets a server ignore).
pub fn parse_range(value: Option<&str>, size: u64) -> Option<ByteRange> {
    let spec = value?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    let range = match (start.is_empty(), end.is_empty()) {
        (true, false) => {
            let suffix: u64 = end.parse().ok()?;
            if suffix == 0 {
                return Some(ByteRange::Unsatisfiable);
            }
            (size.saturating_sub(suffix), size)
        }
        (false, _) => {
            let first: u64 = start.parse().ok()?;
            if first >= size {
                return Some(ByteRange::Unsatisfiable);
            }
            let last: u64 = if end.is_empty() {
                size.saturating_sub(1)
            } else {
                end.parse().ok()?
            };
            if last < first {
                return None;
            }
            (first, last.saturating_add(1).min(size))
        }
        (true, true) => return None,
    };
    if range.0 >= size {
        Some(ByteRange::Unsatisfiable)
    } else {
        Some(ByteRange::Satisfiable(range.0, range.1))
    }
}

/// Opens an object (or a range of it), mapping a missing object to `not_found`.
async fn open(
    state: &AppState,
    key: &Key,
    range: Option<std::ops::Range<u64>>,
    not_found: &impl Fn() -> ApiError,
) -> ApiResult<ObjectRead> {
    match state.storage.read(key, range).await {
        Ok(object) => Ok(object),
        Err(object_store::Error::NotFound { .. }) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

/// Streams an object as an attachment with `Content-Length`, honouring a single `Range` (206/416).
/// Without a `Range` header the object is opened once; with one, its size is read first to resolve it.
pub(crate) async fn stream_object(
    state: &AppState,
    key: &Key,
    request: &HeaderMap,
    content_type: &'static str,
    filename: &str,
    not_found: impl Fn() -> ApiError,
) -> ApiResult<Response> {
    let (status, object, size) = match auth::header(request, header::RANGE.as_str()) {
        None => {
            let object = open(state, key, None, &not_found).await?;
            let size = object.size;
            (StatusCode::OK, object, size)
        }
        Some(range_header) => {
            let size = match state.storage.size(key).await {
                Ok(size) => size,
                Err(object_store::Error::NotFound { .. }) => return Err(not_found()),
                Err(e) => return Err(e.into()),
            };
            match parse_range(Some(range_header), size) {
                Some(ByteRange::Unsatisfiable) => {
                    let mut response =
                        ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "Range not satisfiable").into_response();
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                        response.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(response);
                }
                Some(ByteRange::Satisfiable(start, end)) => {
                    let object = open(state, key, Some(start..end), &not_found).await?;
                    (StatusCode::PARTIAL_CONTENT, object, size)
                }
                None => (StatusCode::OK, open(state, key, None, &not_found).await?, size),
            }
        }
    };
    let served = object.range.clone();
    let body = Body::from_stream(object.body.map(|chunk| {
        if let Ok(bytes) = &chunk {
            metrics::counter!(crate::metrics::DOWNLOAD_BYTES).increment(bytes.len() as u64);
        }
        chunk.map_err(|e| {
            tracing::warn!(error = %e, "download stream failed; closing connection");
            std::io::Error::other("storage read failed")
        })
    }));
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    set_attachment(headers, content_type, filename);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(served.end - served.start));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", served.start, served.end - 1))
    {
        headers.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), None);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Some(ByteRange::Satisfiable(0, 4)));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Some(ByteRange::Satisfiable(5, 10)));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Some(ByteRange::Satisfiable(7, 10)));
        assert_eq!(
            parse_range(Some("bytes=8-100"), 10),
            Some(ByteRange::Satisfiable(8, 10))
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), Some(ByteRange::Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Some(ByteRange::Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), None);
        assert_eq!(parse_range(Some("items=0-1"), 10), None);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), None);
        assert_eq!(parse_range(Some("bytes=x-2"), 10), None);
    }
}
