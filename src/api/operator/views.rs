//! JSON of the native API: RFC 3339 times, the native state vocabulary (`ops::views`), ETags on reads.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};

// The views moved below the API layer (shared with the operator CLI); re-exported for the handlers.
pub use crate::ops::views::{attempt, build, queue, worker};

/// A read answer with an `ETag`; `304 Not Modified` when the client already has it.
pub fn etagged(request: &HeaderMap, body: Value) -> Response {
    let text = body.to_string();
    let tag = format!("W/\"{}\"", crate::ids::hex(&Sha256::digest(text.as_bytes())[..12]));
    let matches = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    // The text hashed is the body sent: serialised once.
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], text).into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}
