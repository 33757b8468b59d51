//! `--server` mode: the `/api/v2` API (and the owner's log endpoint) over HTTP or HTTPS (rustls), with
//! connect and request timeouts, path segments and query values percent-encoded, and errors that show
//! what the server said.

use std::error::Error as _;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use super::redact::redact_url;
use super::{Call, CliResult, Exit, Failure};

/// Most of an error body shown when it is not the API's JSON.
const MAX_SHOWN_BODY: usize = 2048;

/// A running controller.
pub(crate) struct Remote {
    base: Url,
    /// The base URL as the user gave it, password redacted (for messages).
    shown: String,
    api_key: String,
    timeout: Duration,
    client: reqwest::Client,
}

impl Remote {
    pub fn new(server: &str, api_key: &str, ca_cert: Option<&Path>, timeout: Duration) -> CliResult<Remote> {
        let shown = redact_url(server);
        let base =
            Url::parse(server).map_err(|e| Failure::new(Exit::Usage, format!("invalid --server URL {shown}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Failure::new(
                Exit::Usage,
                format!("invalid --server URL {shown}: must start with http:// or https://"),
            ));
        }
        if api_key.is_empty() {
            return Err(Failure::new(
                Exit::Usage,
                "--server needs the admin API key: pass --api-key or set CONTROLLER_API_KEY",
            ));
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            let shown = path.display();
            let pem = std::fs::read(path)
                .map_err(|e| Failure::new(Exit::Usage, format!("cannot read --ca-cert {shown}: {e}")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Failure::new(Exit::Usage, format!("--ca-cert {shown} holds no PEM certificate: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        // No redirect is followed with the key: a download may be redirected to the object store
        // (a presigned URL), which is fetched without it (`download`).
        let client = builder
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("expo-controller-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::new(Exit::Usage, format!("cannot set up the HTTP client: {e}")))?;
        Ok(Remote {
            base,
            shown,
            api_key: api_key.to_string(),
            timeout,
            client,
        })
    }

    /// The URL of `segments` under the base URL, each segment percent-encoded.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    fn request_for(&self, call: &Call) -> (Method, Url, Option<Value>) {
        use Method as M;
        let builds = |id: &str, action: Option<&str>| {
            let mut segments = vec!["api", "v2", "builds", id];
            segments.extend(action);
            self.url(&segments, &[])
        };
        let workers = |id: &str, action: Option<&str>| {
            let mut segments = vec!["api", "v2", "workers", id];
            segments.extend(action);
            self.url(&segments, &[])
        };
        match call {
            Call::ListBuilds {
                state,
                platform,
                worker,
                cursor,
                limit,
            } => {
                let mut query = vec![("limit", limit.to_string())];
                for (name, value) in [
                    ("state", state),
                    ("platform", platform),
                    ("worker", worker),
                    ("cursor", cursor),
                ] {
                    if let Some(value) = value {
                        query.push((name, value.clone()));
                    }
                }
                (M::GET, self.url(&["api", "v2", "builds"], &query), None)
            }
            Call::ShowBuild(id) => (M::GET, builds(id, None), None),
            Call::CancelBuild(id) => (M::POST, builds(id, Some("cancel")), None),
            Call::RetryBuild(id) => (M::POST, builds(id, Some("retry")), None),
            Call::RequeueBuild { id, drain } => {
                let mut url = builds(id, Some("requeue"));
                if *drain {
                    url.query_pairs_mut().append_pair("drain", "true");
                }
                (M::POST, url, None)
            }
            Call::SetPriority { id, priority } => (M::PATCH, builds(id, None), Some(json!({ "priority": priority }))),
            Call::Logs { id, after, limit } => (
                M::GET,
                self.url(
                    &["api", "builds", id, "logs"],
                    &[("after", after.to_string()), ("limit", limit.to_string())],
                ),
                None,
            ),
            Call::ListQueues => (M::GET, self.url(&["api", "v2", "queues"], &[]), None),
            Call::SetPaused { platform, paused } => {
                let action = if *paused { "pause" } else { "resume" };
                (M::POST, self.url(&["api", "v2", "queues", platform, action], &[]), None)
            }
            Call::ListWorkers { cursor, limit } => {
                let mut query = vec![("limit", limit.to_string())];
                if let Some(cursor) = cursor {
                    query.push(("cursor", cursor.clone()));
                }
                (M::GET, self.url(&["api", "v2", "workers"], &query), None)
            }
            Call::ShowWorker(id) => (M::GET, workers(id, None), None),
            Call::SetWorkerState { id, state } => match *state {
                "revoked" => (M::DELETE, workers(id, None), None),
                "draining" => (M::POST, workers(id, Some("drain")), None),
                "disabled" => (M::POST, workers(id, Some("disable")), None),
                _ => (M::POST, workers(id, Some("enable")), None),
            },
            Call::ListKeys => (M::GET, self.url(&["api", "v2", "keys"], &[]), None),
            Call::ShowKey(id) => (M::GET, self.url(&["api", "v2", "keys", id], &[]), None),
            Call::CreateKey(request) => (
                M::POST,
                self.url(&["api", "v2", "keys"], &[]),
                serde_json::to_value(request).ok(),
            ),
            Call::UpdateKey { id, update } => (
                M::PATCH,
                self.url(&["api", "v2", "keys", id], &[]),
                serde_json::to_value(update).ok(),
            ),
            Call::RevokeKey(id) => (M::DELETE, self.url(&["api", "v2", "keys", id], &[]), None),
            Call::ReleaseWorker(id) => (M::POST, workers(id, Some("release")), None),
            Call::ListWebhooks => (M::GET, self.url(&["api", "v2", "webhooks"], &[]), None),
            Call::ShowWebhook(id) => (M::GET, self.url(&["api", "v2", "webhooks", id], &[]), None),
            Call::CreateWebhook(request) => (
                M::POST,
                self.url(&["api", "v2", "webhooks"], &[]),
                serde_json::to_value(request).ok(),
            ),
            Call::DeleteWebhook(id) => (M::DELETE, self.url(&["api", "v2", "webhooks", id], &[]), None),
            Call::TestWebhook(id) => (M::POST, self.url(&["api", "v2", "webhooks", id, "test"], &[]), None),
            Call::WebhookDeliveries { id, limit } => (
                M::GET,
                self.url(
                    &["api", "v2", "webhooks", id, "deliveries"],
                    &[("limit", limit.to_string())],
                ),
                None,
            ),
            Call::Redeliver(id) => (
                M::POST,
                self.url(&["api", "v2", "webhooks", "deliveries", id, "redeliver"], &[]),
                None,
            ),
            Call::ListAudit {
                actor,
                action,
                target,
                since,
                cursor,
                limit,
            } => {
                let mut query = vec![("limit", limit.to_string())];
                for (name, value) in [
                    ("actor", actor),
                    ("action", action),
                    ("target", target),
                    ("since", since),
                    ("cursor", cursor),
                ] {
                    if let Some(value) = value {
                        query.push((name, value.clone()));
                    }
                }
                (M::GET, self.url(&["api", "v2", "audit"], &query), None)
            }
        }
    }

    pub async fn call(&self, call: &Call) -> CliResult<Value> {
        let (method, url, body) = self.request_for(call);
        let mut request = self
            .client
            .request(method, url)
            .timeout(self.timeout)
            .header("X-API-Key", &self.api_key)
            .header("Accept", "application/json");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(&e))?;
        self.answer(status, &bytes)
    }

    /// Starts downloading `segments` (the owner's download endpoints): the response once its status
    /// is 200, after following one redirect to the object store without the key. Only the connection
    /// and the headers are bounded by `--timeout`; the body may take as long as it takes.
    pub async fn download(&self, segments: &[&str]) -> CliResult<reqwest::Response> {
        let url = self.url(segments, &[]);
        let mut response = self
            .headers_within(self.client.get(url).header("X-API-Key", &self.api_key))
            .await?;
        if response.status().is_redirection()
            && let Some(location) = response.headers().get(reqwest::header::LOCATION)
        {
            let target = location
                .to_str()
                .ok()
                .and_then(|l| response.url().join(l).ok())
                .ok_or_else(|| Failure::new(Exit::Server, "the server redirected to an invalid location"))?;
            response = self.headers_within(self.client.get(target)).await?;
        }
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(response);
        }
        let bytes = response.bytes().await.map_err(|e| self.transport(&e))?;
        match self.answer(status, &bytes) {
            Err(failure) => Err(failure),
            Ok(_) => Err(Failure::new(
                Exit::Server,
                format!("{} answered HTTP {status} to a download", self.shown),
            )),
        }
    }

    /// Sends `request`; its status and headers must come within `--timeout`.
    async fn headers_within(&self, request: reqwest::RequestBuilder) -> CliResult<reqwest::Response> {
        match tokio::time::timeout(self.timeout, request.send()).await {
            Ok(sent) => sent.map_err(|e| self.transport(&e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> Failure {
        Failure::new(
            Exit::Timeout,
            format!(
                "{} did not answer within {}s (--timeout)",
                self.shown,
                self.timeout.as_secs()
            ),
        )
    }

    /// A transport error while reading a body (a stall longer than `--timeout`, a cut connection).
    pub fn body_failed(&self, error: &reqwest::Error) -> Failure {
        self.transport(error)
    }

    /// The API's JSON answer, or the failure it describes.
    fn answer(&self, status: StatusCode, bytes: &[u8]) -> CliResult<Value> {
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let parsed = serde_json::from_slice::<Value>(bytes).ok();
        match (status.is_success(), parsed) {
            (true, Some(value)) => Ok(value),
            (false, Some(value)) if value.get("error").is_some() => Err(Failure {
                exit: exit_for(status),
                body: value,
            }),
            (ok, _) => {
                let text = String::from_utf8_lossy(bytes);
                let text = text.trim();
                let mut cut = text.len().min(MAX_SHOWN_BODY);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                let what = if ok { "an answer that is not JSON" } else { "an error" };
                let body = if text.is_empty() {
                    "(empty body)".to_string()
                } else {
                    text[..cut].to_string()
                };
                Err(Failure {
                    exit: if ok { Exit::Server } else { exit_for(status) },
                    body: json!({
                        "error": format!("{} gave {what}: HTTP {status}: {body}", self.shown),
                        "status": status.as_u16(),
                    }),
                })
            }
        }
    }

    /// A request that got no answer: why, in words, and the matching exit code.
    fn transport(&self, error: &reqwest::Error) -> Failure {
        let mut cause = String::new();
        let mut source = error.source();
        while let Some(inner) = source {
            cause = inner.to_string();
            source = inner.source();
        }
        if cause.is_empty() {
            cause = "no answer".to_string();
        }
        let server = &self.shown;
        if error.is_timeout() {
            return self.timed_out();
        }
        if error.is_connect() {
            let hint = if self.base.scheme() == "https" {
                " (TLS handshake or connection failed; if the controller speaks plain HTTP, use http://)"
            } else {
                " (is the controller running, and is this its address?)"
            };
            return Failure::new(Exit::Connect, format!("cannot connect to {server}: {cause}{hint}"));
        }
        Failure::new(Exit::Connect, format!("request to {server} failed: {cause}"))
    }
}

fn exit_for(status: StatusCode) -> Exit {
    if status.is_client_error() {
        Exit::Refused
    } else {
        Exit::Server
    }
}
