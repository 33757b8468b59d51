//! The one error type of the API: renders `{"error": ...}` with the right status; internal causes are
//! logged once (inside the request's span, so with its request id) and never shown to the caller (R9).

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::queue::QueueError;
use crate::storage::WriteError;

/// `Retry-After` of a 503 caused by the artifact store.
pub const STORAGE_RETRY_AFTER_SECS: u64 = 5;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: Cow<'static, str>,
    retry_after: Option<u64>,
    cause: Option<anyhow::Error>,
    /// Stable machine-readable code (R47), shown beside `error` in `/api/v2` answers only.
    code: Option<&'static str>,
    /// One extra field of the body (e.g. the id a conflict refers to).
    extra: Option<(&'static str, String)>,
}

/// The code and message of an error answer, kept on the response so that `/api/v2` answers can show
/// the code while G0 answers keep their exact `{"error"}` shape.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub code: &'static str,
    /// The body as sent (`{"error", ...}`).
    pub body: serde_json::Value,
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `{"error": "<message>"}`: every error answer of the G0 routes (api.md §1), with the exact
/// message of the contract.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error, example = json!({"error": "Build not found"}))]
pub struct ErrorBody {
    /// What went wrong, in words a client may match on.
    pub error: String,
}

/// `{"error": "<message>", "code": "<code>"}`: every error answer under `/api/v2` (R47).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": "Build not found", "code": "build_not_found"}))]
pub struct CodedError {
    /// What went wrong, in words.
    pub error: String,
    /// A stable machine-readable code (`build_not_found`, `conflict`, `invalid_json`, `queue_full`, …).
    pub code: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            cause: None,
            code: None,
            extra: None,
        }
    }

    /// Sets the machine-readable code (default: derived from the status).
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Adds one field to the body beside `error`.
    pub fn with_field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.extra = Some((name, value.into()));
        self
    }

    /// 503 `Build queue is full` with `Retry-After` (R58).
    pub fn queue_full(retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs.max(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "Build queue is full").with_code("queue_full")
        }
    }

    /// 429 `Submitter queue limit reached` with `Retry-After`: the submitter has max queued builds queued.
    /// The body carries `code` on every route, G0 included (scheduling.md: the answer is
    /// `{"error": "Submitter queue limit reached", "code": "submitter_queue_full"}`).
    pub fn submitter_queue_full() -> Self {
        Self {
            retry_after: Some(QUEUE_FULL_RETRY_AFTER_SECS),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "Submitter queue limit reached")
                .with_code("submitter_queue_full")
                .with_field("code", "submitter_queue_full")
        }
    }

    /// The stable code of this error.
    pub fn code(&self) -> &'static str {
        self.code.unwrap_or_else(|| code_for(self.status))
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn too_large(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// A small body that did not arrive within the header timeout of its head (T1).
    pub fn request_timeout() -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "Request body not received in time").with_code("request_timeout")
    }

    /// A 500 whose cause is logged but not shown.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
        }
    }

    /// A 503: the database (or another dependency) is unavailable; the cause is logged.
    pub fn unavailable(cause: impl Into<anyhow::Error>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "Service unavailable")
        }
    }

    /// A 503 with `Retry-After`: the artifact store is unreachable or failing; the cause is logged and
    /// counted (`expo_storage_errors_total`, which the storage alert watches: not every 503).
    pub fn storage_unavailable(cause: impl Into<anyhow::Error>) -> Self {
        metrics::counter!(crate::metrics::STORAGE_ERRORS).increment(1);
        Self {
            cause: Some(cause.into()),
            retry_after: Some(STORAGE_RETRY_AFTER_SECS),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "Storage unavailable")
        }
    }

    pub fn build_not_found() -> Self {
        Self::not_found("Build not found").with_code("build_not_found")
    }

    pub fn worker_not_found() -> Self {
        Self::not_found("Worker not found").with_code("worker_not_found")
    }

    pub fn not_authorized_for_build() -> Self {
        Self::forbidden("Worker not authorized for this build")
    }

    pub fn attempt_not_active() -> Self {
        Self::conflict("Build attempt is no longer active").with_code("attempt_not_active")
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message a client sees.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        if matches!(error, QueueError::QueueFull) {
            return ApiError::queue_full(QUEUE_FULL_RETRY_AFTER_SECS);
        }
        if matches!(error, QueueError::SubmitterQueueFull) {
            return ApiError::submitter_queue_full();
        }
        match crate::ops::refusal(&error) {
            Some(refusal) => {
                let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
                let refused = ApiError::new(status, refusal.message).with_code(refusal.code);
                match refusal.field {
                    Some((name, value)) => refused.with_field(name, value),
                    None => refused,
                }
            }
            None => match error {
                QueueError::Db(e) | QueueError::DbUncommitted(e) => ApiError::from(e),
                QueueError::ObjectsGone => ApiError {
                    retry_after: Some(STORAGE_RETRY_AFTER_SECS),
                    ..ApiError::unavailable(error)
                },
                other => ApiError::internal(anyhow::anyhow!("unmapped queue error: {other}")),
            },
        }
    }
}

impl From<crate::ops::OpError> for ApiError {
    fn from(error: crate::ops::OpError) -> Self {
        match error {
            crate::ops::OpError::Refused { status, message, code } => {
                ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), message).with_code(code)
            }
            crate::ops::OpError::Queue(e) => e.into(),
        }
    }
}

/// What a `Retry-After` says when a queue is full.
pub const QUEUE_FULL_RETRY_AFTER_SECS: u64 = 30;

/// The default code of a status.
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        429 => "rate_limited",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "error",
    }
}

impl From<sqlx::Error> for ApiError {
    /// Database unreachable (connection refused, pool exhausted, server shutting down or restarting:
    /// SQLSTATE classes 08 and 57) is a 503 the client may retry; anything else is a 500.
    fn from(error: sqlx::Error) -> Self {
        let unavailable = match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
            sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(e) => e.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57")),
            _ => false,
        };
        if unavailable {
            ApiError::unavailable(error)
        } else {
            ApiError::internal(error)
        }
    }
}

impl From<object_store::Error> for ApiError {
    /// Errors that are our own mistakes, and local-disk failures (as before S3 existed), are 500s;
    /// anything a remote store did (unreachable, timed out, refused, failed) is a 503 the client may
    /// retry.
    fn from(error: object_store::Error) -> Self {
        use object_store::Error as E;
        match error {
            E::Generic {
                store: "LocalFileSystem",
                ..
            }
            | E::InvalidPath { .. }
            | E::NotImplemented { .. }
            | E::NotSupported { .. }
            | E::UnknownConfigurationKey { .. }
            | E::JoinError { .. } => ApiError::internal(error),
            other => ApiError::storage_unavailable(other),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::TooLarge(_) => ApiError::too_large("Request body too large"),
            WriteError::Body(_) => ApiError::bad_request("Invalid multipart body"),
            WriteError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(cause) = &self.cause {
            tracing::error!(
                status = self.status.as_u16(),
                cause = format!("{cause:#}"),
                "request failed"
            );
        }
        let mut body = json!({ "error": self.message });
        if let Some((name, value)) = &self.extra {
            body[*name] = json!(value);
        }
        let code = self.code();
        let info = ErrorInfo {
            code,
            body: body.clone(),
        };
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(info);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
