//! The OpenAPI document (`/api/v2/openapi.json`) and Swagger UI (`/docs`). The document is generated
//! from the routes: every route is added to its caller group as a `#[utoipa::path]` handler
//! (`utoipa_axum::routes!`), and the group adds its credential (security, 401), its tag and the
//! error answers. Nothing here lists routes by hand.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use utoipa::OpenApi as _;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi};

use super::error::{CodedError, ErrorBody};
use super::group::{Caller, Group};
use super::{operator, public, submitter, worker};

/// Every group of the API, in the order the router merges them.
pub fn groups() -> [Group; 4] {
    [public::group(), worker::group(), submitter::group(), operator::group()]
}

#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(ErrorBody, CodedError)))]
struct Shared;

/// Adds what every document carries to the merged documents of the groups: title, version,
/// security schemes, the error schemas.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info = InfoBuilder::new()
        .title("expo-controller")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The controller of Expo Free Agent. Routes are grouped by caller (tags `public`, `worker`, \
             `submitter`, `operator`); each operation names the credentials it accepts (`security`, \
             any one of) and `x-credential`. Errors are `{\"error\": …}` (schema `Error`); under \
             `/api/v2` they also carry a stable `code` (schema `CodedError`). Times are epoch \
             milliseconds on the G0 routes and RFC 3339 under `/api/v2`.",
        ))
        .build();
    doc.merge(Shared::openapi());
    let components = doc.components.get_or_insert_with(Default::default);
    let header =
        |name: &str, what: &str| SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(name, what)));
    components.add_security_scheme(
        "api_key",
        header(
            "X-API-Key",
            "A key (`efa_…`) whose role the route admits (`x-role`), or the built-in admin key",
        ),
    );
    components.add_security_scheme(
        "build_token",
        header("X-Build-Token", "A build's access token (issued at submit and retry)"),
    );
    components.add_security_scheme(
        "worker_token",
        header("X-Worker-Token", "A worker's token (issued at register)"),
    );
    components.add_security_scheme(
        "vm_token",
        header("X-VM-Token", "A build VM's token (issued by /authenticate)"),
    );
    components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    doc
}

/// The whole document.
pub fn document() -> OpenApi {
    let mut doc = OpenApi::default();
    for group in groups() {
        doc.merge(group.openapi());
    }
    finish(doc)
}

static DOCUMENT: LazyLock<Result<bytes::Bytes, String>> =
    LazyLock::new(|| document().to_json().map(bytes::Bytes::from).map_err(|e| e.to_string()));

/// This document.
#[utoipa::path(get, path = "/api/v2/openapi.json", responses(
    (status = 200, description = "The OpenAPI 3.1 document of every route", content_type = "application/json", body = Object),
))]
pub async fn openapi_json() -> Response {
    match DOCUMENT.as_ref() {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, "application/json")], text.clone()).into_response(),
        Err(e) => super::ApiError::internal(anyhow::anyhow!("OpenAPI document: {e}")).into_response(),
    }
}

/// `/docs` (Swagger UI, vendored) reading `/api/v2/openapi.json`.
pub fn swagger_ui<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    let ui: axum::Router<S> = utoipa_swagger_ui::SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::from("/api/v2/openapi.json"))
        .into();
    ui.layer(axum::middleware::from_fn(docs_headers))
}

/// `/docs` (T13–T15): same-origin content only, never framed (clickjacking "Try it out"), no sniffing.
/// Swagger UI sets inline styles, so styles may be inline; scripts come from the origin only.
async fn docs_headers(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// Every documented route: method (upper case), path, caller group, summary, credential name.
/// Read from the generated document, for tests that walk the route table.
pub const ROUTES: RouteTable = RouteTable;

/// See [`ROUTES`].
#[derive(Debug, Clone, Copy)]
pub struct RouteTable;

type Row = (&'static str, &'static str, &'static str, &'static str, &'static str);

type OwnedRow = (String, String, String, String, String);

static TABLE: LazyLock<Vec<OwnedRow>> = LazyLock::new(|| {
    let doc = serde_json::to_value(document()).unwrap_or_default();
    let mut rows = Vec::new();
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    for (path, item) in paths {
        for (method, operation) in item.as_object().cloned().unwrap_or_default() {
            if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let text = |key: &str| operation[key].as_str().unwrap_or_default().to_string();
            rows.push((
                method.to_uppercase(),
                path.clone(),
                text("x-caller"),
                text("summary"),
                text("x-credential"),
            ));
        }
    }
    rows
});

impl IntoIterator for RouteTable {
    type Item = Row;
    type IntoIter = std::vec::IntoIter<Row>;

    fn into_iter(self) -> Self::IntoIter {
        TABLE
            .iter()
            .map(|(m, p, c, s, k)| (m.as_str(), p.as_str(), c.as_str(), s.as_str(), k.as_str()))
            .collect::<Vec<_>>()
            .into_iter()
    }
}

impl RouteTable {
    /// The caller group of a documented route.
    pub fn caller(method: &str, path: &str) -> Option<Caller> {
        ROUTES
            .into_iter()
            .find(|(m, p, ..)| m.eq_ignore_ascii_case(method) && *p == path)
            .and_then(|(_, _, caller, ..)| Caller::parse(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Building the document builds every group: a group given a credential its callers do not use
    /// panics here, and every operation gets a caller, a credential and a unique operationId.
    #[test]
    fn every_operation_has_a_group_and_a_credential() {
        let doc = serde_json::to_value(document()).expect("serialises");
        let mut ids = std::collections::BTreeSet::new();
        let mut count = 0;
        let mut unsummarised = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                count += 1;
                let caller = op["x-caller"].as_str().and_then(Caller::parse);
                assert!(caller.is_some(), "{method} {path}");
                assert!(op["x-credential"].is_string(), "{method} {path}");
                if !op["summary"].is_string() {
                    unsummarised.push(format!("{method} {path}"));
                }
                assert!(ids.insert(op["operationId"].to_string()), "{method} {path}");
            }
        }
        assert!(
            unsummarised.is_empty(),
            "no summary (the handler's doc comment): {unsummarised:?}"
        );
        assert_eq!(ROUTES.into_iter().count(), count);
        assert_eq!(RouteTable::caller("GET", "/api/v2/builds"), Some(Caller::Operator));
        assert_eq!(
            RouteTable::caller("POST", "/api/builds/submit"),
            Some(Caller::Submitter)
        );
    }
}
