//! Streaming multipart helpers: file parts go to storage chunk by chunk; text parts are small and bounded.

use axum::extract::Multipart;
use axum::extract::multipart::{Field, MultipartRejection};
use bytes::{Bytes, BytesMut};

use super::error::{ApiError, ApiResult};

/// Largest text part accepted.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Most parts accepted in one request.
pub const MAX_PARTS: usize = 64;

/// The answer for a body that failed to parse: the bound it broke (R42), or 400.
fn invalid(error: &(dyn std::error::Error + 'static)) -> ApiError {
    match super::multipart_limits::limit_error(error) {
        Some(limit) => ApiError::new(limit.status, limit.message),
        None => ApiError::bad_request("Invalid multipart body"),
    }
}

/// A multipart body; anything else is rejected by [`require_multipart`].
pub type MultipartBody = Result<Multipart, MultipartRejection>;

/// The multipart body, or 400 `Content must be multipart/form-data`.
pub fn require_multipart(body: MultipartBody) -> ApiResult<Multipart> {
    body.map_err(|_| ApiError::bad_request("Content must be multipart/form-data"))
}

/// Walks the parts of a multipart body, bounding their number.
pub struct Parts {
    inner: Multipart,
    seen: usize,
}

impl Parts {
    pub fn new(inner: Multipart) -> Self {
        Self { inner, seen: 0 }
    }

    pub async fn next(&mut self) -> ApiResult<Option<Field<'_>>> {
        self.seen += 1;
        if self.seen > MAX_PARTS {
            return Err(ApiError::bad_request("Too many multipart parts"));
        }
        self.inner.next_field().await.map_err(|e| invalid(&e))
    }
}

/// Reads a text part (at most [`MAX_TEXT_BYTES`]), NUL replaced by U+FFFD (R45).
pub async fn read_text(field: Field<'_>) -> ApiResult<String> {
    let bytes = read_limited(field, MAX_TEXT_BYTES as u64, "Form field too large").await?;
    String::from_utf8(bytes.to_vec())
        .map(crate::text::scrub_owned)
        .map_err(|_| ApiError::bad_request("Form fields must be UTF-8"))
}

/// Reads a small file part into memory, answering 413 with `too_large` past `limit` bytes.
pub async fn read_limited(mut field: Field<'_>, limit: u64, too_large: &'static str) -> ApiResult<Bytes> {
    let mut buffer = BytesMut::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| invalid(&e))? {
        if (buffer.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large(too_large));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}
