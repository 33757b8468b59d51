//! Extractors whose rejections are rendered by [`ApiError`] (never axum's plain-text bodies). Every
//! JSON body goes through [`parse_json`], which applies the text rule (NUL → U+FFFD, R45) and says
//! why a body was refused (R47).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::ids::valid_id;

/// A JSON body (`Content-Type: application/json` or `*+json`); the cause of a refusal is named:
/// wrong content type, malformed JSON, or a value of the wrong type. An oversized body is 413.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::bad_request("Expected Content-Type: application/json").with_code("content_type"));
        }
        let BodyBytes(bytes) = BodyBytes::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The whole body as bytes (axum's `Bytes`, within the route's body limit), refused the way every body
/// is: 413 beyond the limit, 408 when it did not arrive in time (the small-body deadline, T1), else 400.
pub struct BodyBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for BodyBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(BodyBytes)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large("Request body too large")
                } else {
                    body_failure(&rejection)
                }
            })
    }
}

/// Why reading a body failed: 413 past a length limit, 408 past the small-body deadline, else 400.
pub fn body_failure(error: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut too_large = false;
    let mut late = false;
    let mut cause = Some(error);
    while let Some(current) = cause {
        too_large |= current.is::<http_body_util::LengthLimitError>();
        late |= current.is::<crate::transport::BodyDeadline>();
        cause = current.source();
    }
    if too_large {
        ApiError::too_large("Request body too large")
    } else if late {
        ApiError::request_timeout()
    } else {
        ApiError::bad_request("Invalid request body")
    }
}

/// Reads a body the handler took unread (`axum::body::Body`), once the caller is authenticated, up to
/// `limit` bytes: 413 `Request body too large` beyond it, 400 when the client cuts it. Handlers whose
/// credential is resolved in the handler (build-scoped callers) take the body this way, so a stranger's
/// request is refused before anything of its body is read.
pub async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|error| body_failure(&error))
}

/// Whether the request says its body is JSON.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || (v.starts_with("application/") && v.ends_with("+json")))
}

/// Parses a JSON body after replacing NUL escapes (R45): 400 `Invalid JSON body: <cause>` naming the
/// line and column, e.g. `expected a string at line 1 column 9`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(&crate::text::scrub_json(bytes))
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")).with_code("invalid_json"))
}

/// Query parameters; anything that does not parse is 400 with the cause (R13, R47). Structs that
/// deny unknown fields turn an unknown parameter into a 400 too.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|rejection| {
                let text = rejection.body_text();
                let cause = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::bad_request(format!("Invalid query parameters: {cause}")).with_code("invalid_query")
            })
    }
}

/// Query parameters of an endpoint that takes none: any parameter is 400.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The `{id}` path segment, validated as an id before anything else sees it (R8).
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::bad_request("Invalid id"))?;
        if valid_id(&id) {
            Ok(IdPath(id))
        } else {
            Err(ApiError::bad_request("Invalid id"))
        }
    }
}

/// Parses an optional numeric text value within bounds; `None` if absent, 400 if malformed.
pub fn bounded_int(value: Option<&str>, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    let Some(raw) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match raw.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::bad_request(format!(
            "Invalid {name}: must be an integer from {min} to {max}"
        ))),
    }
}
