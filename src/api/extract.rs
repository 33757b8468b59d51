//! Extractors whose rejections are rendered by [`ApiError`] (never axum's plain-text bodies).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::ids::valid_id;

/// A JSON body; malformed JSON is 400, an oversized body 413.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::too_large("Request body too large"))
            }
            Err(_) => Err(ApiError::bad_request("Invalid JSON body")),
        }
    }
}

/// Query parameters; anything that does not parse is 400 (R13).
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|_| ApiError::bad_request("Invalid query parameters"))
    }
}

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
